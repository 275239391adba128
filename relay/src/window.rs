//! A daily transfer window, `HH:MM-HH:MM` (possibly across midnight) in a
//! time zone (UTC unless named): outside it the relay starts no upstream
//! fetch, so a branch on a thin link fills its cache when the link is free,
//! and its agents are told to wait until it opens.

use std::{fmt, str::FromStr};

use jiff::{tz::TimeZone, Timestamp};

#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Minutes after midnight, in `zone`.
    start: u32,
    end: u32,
    zone: TimeZone,
    /// How the zone was named (`Europe/Berlin`, `UTC`).
    zone_name: String,
}

impl FromStr for Window {
    type Err = String;
    /// `22:00-06:00` (UTC) or `22:00-06:00 Europe/Berlin`.
    fn from_str(s: &str) -> Result<Self, String> {
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let bad = || {
            format!("transfer window {s:?} must look like 22:00-06:00, optionally followed by a time zone (22:00-06:00 Europe/Berlin)")
        };
        let (span, zone_name) = match s.trim().split_once(' ') {
            Some((span, zone)) => (span, zone.trim()),
            None => (s.trim(), "UTC"),
        };
        let (a, b) = span.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("transfer window {s:?} is empty"));
        }
        let zone = TimeZone::get(zone_name)
            .map_err(|e| format!("transfer window {s:?}: time zone {zone_name:?}: {e}"))?;
        Ok(Self {
            start,
            end,
            zone,
            zone_name: zone_name.to_string(),
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02} {}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60,
            self.zone_name
        )
    }
}

impl Window {
    /// `None` when `minute` (of the day, in the window's zone) is inside
    /// the window, else the minutes until it opens.
    pub fn opens_in(&self, minute: u32) -> Option<u32> {
        let inside = if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        };
        (!inside).then(|| (self.start + 1440 - minute) % 1440)
    }

    /// The same at `now`, counted to the next opening in the zone's own
    /// calendar: a daylight-saving change before it makes the wait an hour
    /// shorter or longer than the clock faces say.
    pub fn opens_in_at(&self, now: Timestamp) -> Option<u32> {
        let local = now.to_zoned(self.zone.clone());
        let wall = self.opens_in(local.hour() as u32 * 60 + local.minute() as u32)?;
        let (h, m) = ((self.start / 60) as i8, (self.start % 60) as i8);
        let opening = |date: jiff::civil::Date| date.at(h, m, 0, 0).to_zoned(self.zone.clone());
        let next = match opening(local.date()) {
            Ok(today) if today.timestamp() > now => Ok(today),
            _ => local.date().tomorrow().and_then(opening),
        };
        Some(next.map_or(wall, |next| {
            let seconds = next.timestamp().as_second() - now.as_second();
            u32::try_from((seconds + 59) / 60).unwrap_or(wall)
        }))
    }

    /// The same for the current time.
    pub fn opens_in_now(&self) -> Option<u32> {
        self.opens_in_at(Timestamp::now())
    }

    /// When it opens, as people there say it: `22:00 Europe/Berlin`.
    pub fn opening(&self) -> String {
        format!(
            "{:02}:{:02} {}",
            self.start / 60,
            self.start % 60,
            self.zone_name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_may_cross_midnight() {
        let night: Window = "22:00-06:00".parse().unwrap();
        assert_eq!(night.opens_in(23 * 60), None);
        assert_eq!(night.opens_in(5 * 60 + 59), None);
        assert_eq!(night.opens_in(6 * 60), Some(16 * 60));
        assert_eq!(night.opens_in(21 * 60 + 30), Some(30));
        let lunch: Window = "12:00-13:00".parse().unwrap();
        assert_eq!(lunch.opens_in(12 * 60 + 30), None);
        assert_eq!(lunch.opens_in(13 * 60), Some(23 * 60));
        assert_eq!(lunch.to_string(), "12:00-13:00 UTC");
        assert!("25:00-01:00".parse::<Window>().is_err());
        assert!("10:00-10:00".parse::<Window>().is_err());
    }

    #[test]
    fn a_window_is_read_in_its_time_zone() {
        let berlin: Window = "22:00-06:00 Europe/Berlin".parse().unwrap();
        assert_eq!(berlin.to_string(), "22:00-06:00 Europe/Berlin");
        assert_eq!(berlin.opening(), "22:00 Europe/Berlin");
        // 21:30 UTC in January is 22:30 in Berlin: open.
        let winter: Timestamp = "2026-01-15T21:30:00Z".parse().unwrap();
        assert_eq!(berlin.opens_in_at(winter), None);
        // 20:30 UTC in July is 22:30 in Berlin (summer time): open; 19:30 is not.
        let summer: Timestamp = "2026-07-15T20:30:00Z".parse().unwrap();
        assert_eq!(berlin.opens_in_at(summer), None);
        let early: Timestamp = "2026-07-15T19:30:00Z".parse().unwrap();
        assert_eq!(berlin.opens_in_at(early), Some(30));
        let utc: Window = "22:00-06:00".parse().unwrap();
        assert_eq!(
            utc.opens_in_at(summer),
            Some(90),
            "the same hours in UTC differ"
        );
        let e = "22:00-06:00 Mars/Olympus".parse::<Window>().unwrap_err();
        assert!(e.contains("time zone"), "{e}");
    }

    #[test]
    fn the_wait_counts_the_daylight_saving_change_before_the_window_opens() {
        let morning: Window = "08:00-09:00 Europe/Berlin".parse().unwrap();
        // 22:00 in Berlin on the night clocks go forward (02:00 → 03:00):
        // ten hours on the clock face, nine in fact.
        let spring: Timestamp = "2026-03-28T21:00:00Z".parse().unwrap();
        assert_eq!(morning.opens_in_at(spring), Some(9 * 60));
        // ...and eleven when they go back.
        let autumn: Timestamp = "2026-10-24T20:00:00Z".parse().unwrap();
        assert_eq!(morning.opens_in_at(autumn), Some(11 * 60));
        // Later the same day: no change in between.
        let day: Timestamp = "2026-03-29T05:30:00Z".parse().unwrap();
        assert_eq!(morning.opens_in_at(day), Some(30));
    }
}
