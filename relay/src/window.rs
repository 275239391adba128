//! A daily transfer window (UTC), `HH:MM-HH:MM`, possibly across midnight:
//! outside it the relay starts no upstream fetch, so a branch on a thin link
//! fills its cache when the link is free.

use std::{fmt, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight, UTC.
    start: u32,
    end: u32,
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let bad = || format!("transfer window {s:?} must look like 22:00-06:00 (UTC)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("transfer window {s:?} is empty"));
        }
        Ok(Self { start, end })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02} UTC",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl Window {
    /// `None` when `minute` (of the day, UTC) is inside the window, else the
    /// minutes until it opens.
    pub fn opens_in(&self, minute: u32) -> Option<u32> {
        let inside = if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        };
        (!inside).then(|| (self.start + 1440 - minute) % 1440)
    }

    /// The same for the current time.
    pub fn opens_in_now(&self) -> Option<u32> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.opens_in(((secs / 60) % 1440) as u32)
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
}
