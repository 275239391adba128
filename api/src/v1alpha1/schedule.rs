//! When a job's installs may run: a start, a deadline and maintenance
//! windows. The controller checks a schedule when it reads a job; each
//! agent decides with it (in its own local time where a window says so).

use chrono::{DateTime, Utc};
use jiff::{tz::TimeZone, SignedDuration, Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// When a job's installs (and removals) may run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// No install starts before this time (RFC 3339). Agents download the
    /// package before it, so the time is spent installing, not downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub not_before: Option<DateTime<Utc>>,
    /// No install starts after this time: destinations not done by then end
    /// as Expired (an install under way finishes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub deadline: Option<DateTime<Utc>>,
    /// Maintenance windows: with any, an install (or removal) starts only
    /// while one of them is open. Agents download the package before, so
    /// the window is spent installing, not downloading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<Window>,
}

/// A maintenance window: it opens at each time its cron expression names
/// and stays open for its duration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    /// When the window opens, as cron reads it: minute, hour, day of month,
    /// month, day of week (`0 22 * * 1-5` is 22:00 on weekdays); a sixth
    /// field in front gives the second.
    #[schemars(length(min = 1, max = 128))]
    pub cron: String,
    /// How long the window stays open: `4h`, `1h30m`, `90m`.
    #[schemars(length(min = 1, max = 32))]
    pub duration: String,
    /// The time zone the cron expression is read in (an IANA name such as
    /// `Europe/Berlin`, or `UTC`). Without it, each endpoint's own local
    /// time: `0 22 * * *` is 22:00 wherever the endpoint is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,
}

/// An RFC 3339 time, as the API server checks it: a time it cannot read is
/// refused when written, never left for the controller to choke on.
pub(super) fn date_time(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "format": "date-time" })
}

/// A schedule that cannot be read, naming the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule.windows[{index}].cron {cron:?}: {reason}")]
    Cron {
        index: usize,
        cron: String,
        reason: String,
    },
    #[error("schedule.windows[{index}].duration {duration:?}: {reason}")]
    Duration {
        index: usize,
        duration: String,
        reason: String,
    },
    #[error("schedule.windows[{index}].timeZone {zone:?}: {reason}")]
    TimeZone {
        index: usize,
        zone: String,
        reason: String,
    },
}

/// A window, read.
struct Parsed {
    cron: croner::Cron,
    duration: SignedDuration,
    zone: Option<TimeZone>,
}

/// The longest a window may stay open (a week: longer is always open).
const MAX_WINDOW: SignedDuration = SignedDuration::from_hours(24 * 7);

impl Window {
    fn parse(&self, index: usize) -> Result<Parsed, ScheduleError> {
        let cron = croner::parser::CronParser::builder()
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(&self.cron)
            .map_err(|e| ScheduleError::Cron {
                index,
                cron: self.cron.clone(),
                reason: e.to_string(),
            })?;
        let duration_error = |reason: String| ScheduleError::Duration {
            index,
            duration: self.duration.clone(),
            reason,
        };
        let duration: SignedDuration = self
            .duration
            .parse()
            .map_err(|e: jiff::Error| duration_error(e.to_string()))?;
        if duration <= SignedDuration::ZERO || duration > MAX_WINDOW {
            return Err(duration_error(
                "a window is open for more than nothing and at most a week".into(),
            ));
        }
        let zone = match &self.time_zone {
            None => None,
            Some(name) => Some(TimeZone::get(name).map_err(|e| ScheduleError::TimeZone {
                index,
                zone: name.clone(),
                reason: e.to_string(),
            })?),
        };
        Ok(Parsed {
            cron,
            duration,
            zone,
        })
    }

    /// The first time at or after `t` this window is open (`None`: never).
    fn open_from(p: &Parsed, t: Timestamp, local: &TimeZone) -> Option<Timestamp> {
        let at = t.to_zoned(p.zone.clone().unwrap_or_else(|| local.clone()));
        // Opened last at or before `t`, and still open?
        if let Ok(opened) = p.cron.find_previous_occurrence(&at, true) {
            if opened
                .timestamp()
                .checked_add(p.duration)
                .is_ok_and(|closes| closes > t)
            {
                return Some(t);
            }
        }
        p.cron
            .find_next_occurrence(&at, false)
            .ok()
            .map(|z| z.timestamp())
    }
}

impl Schedule {
    /// Whether the deadline has passed at `now`.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Whether the schedule can be read (every window's cron expression,
    /// duration and time zone).
    pub fn check(&self) -> Result<(), ScheduleError> {
        self.windows
            .iter()
            .enumerate()
            .try_for_each(|(i, w)| w.parse(i).map(|_| ()))
    }

    /// When an install may start, seen at `now` on an endpoint whose local
    /// time zone is `local`: `Ok(None)` now; `Ok(Some(t))` not before `t`
    /// (the start, or the next window to open). A window that never opens
    /// again waits for ever (the deadline, if any, expires it).
    pub fn starts(
        &self,
        now: DateTime<Utc>,
        local: &TimeZone,
    ) -> Result<Option<DateTime<Utc>>, ScheduleError> {
        let from = self.not_before.map_or(now, |t| t.max(now));
        let start = if self.windows.is_empty() {
            Some(from)
        } else {
            let from = to_jiff(from);
            let mut first: Option<Timestamp> = None;
            for (i, w) in self.windows.iter().enumerate() {
                let p = w.parse(i)?;
                if let Some(t) = Window::open_from(&p, from, local) {
                    first = Some(first.map_or(t, |f| f.min(t)));
                }
            }
            first.map(to_chrono)
        };
        Ok(match start {
            Some(t) if t <= now => None,
            Some(t) => Some(t),
            None => Some(DateTime::<Utc>::MAX_UTC),
        })
    }
}

fn to_jiff(t: DateTime<Utc>) -> Timestamp {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).unwrap_or(
        if t.timestamp() < 0 {
            Timestamp::MIN
        } else {
            Timestamp::MAX
        },
    )
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn window(cron: &str, duration: &str, zone: Option<&str>) -> Schedule {
        Schedule {
            windows: vec![Window {
                cron: cron.into(),
                duration: duration.into(),
                time_zone: zone.map(Into::into),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn without_windows_installs_start_at_the_start() {
        let s = Schedule {
            not_before: Some(at("2026-12-06T13:00:00Z")),
            ..Default::default()
        };
        let utc = TimeZone::UTC;
        assert_eq!(
            s.starts(at("2026-12-06T12:00:00Z"), &utc),
            Ok(Some(at("2026-12-06T13:00:00Z")))
        );
        assert_eq!(s.starts(at("2026-12-06T13:00:00Z"), &utc), Ok(None));
        assert_eq!(
            Schedule::default().starts(at("2026-12-06T13:00:00Z"), &utc),
            Ok(None)
        );
    }

    #[test]
    fn a_window_is_open_for_its_duration_from_each_time_its_cron_names() {
        // 22:00 on weekdays, for two hours; 2026-12-04 is a Friday.
        let s = window("0 22 * * 1-5", "2h", Some("UTC"));
        let utc = TimeZone::UTC;
        let friday_night = at("2026-12-04T22:00:00Z");
        assert_eq!(
            s.starts(at("2026-12-04T21:59:00Z"), &utc),
            Ok(Some(friday_night))
        );
        assert_eq!(s.starts(friday_night, &utc), Ok(None));
        // Past midnight, into Saturday: still Friday's window.
        assert_eq!(s.starts(at("2026-12-04T23:59:59Z"), &utc), Ok(None));
        // Closed at the end; the next is Monday's.
        assert_eq!(
            s.starts(at("2026-12-05T00:00:00Z"), &utc),
            Ok(Some(at("2026-12-07T22:00:00Z")))
        );
    }

    #[test]
    fn a_window_opens_no_earlier_than_the_start() {
        let mut s = window("0 2 * * *", "3h", Some("UTC"));
        s.not_before = Some(at("2026-12-06T04:00:00Z"));
        // The window is open at the start: installs begin then.
        assert_eq!(
            s.starts(at("2026-12-06T01:00:00Z"), &TimeZone::UTC),
            Ok(Some(at("2026-12-06T04:00:00Z")))
        );
        s.not_before = Some(at("2026-12-06T05:00:00Z"));
        assert_eq!(
            s.starts(at("2026-12-06T01:00:00Z"), &TimeZone::UTC),
            Ok(Some(at("2026-12-07T02:00:00Z")))
        );
    }

    #[test]
    fn the_earliest_of_several_windows_opens_first() {
        let mut s = window("0 22 * * *", "1h", Some("UTC"));
        s.windows.push(Window {
            cron: "30 12 * * *".into(),
            duration: "30m".into(),
            time_zone: Some("UTC".into()),
        });
        assert_eq!(
            s.starts(at("2026-12-06T10:00:00Z"), &TimeZone::UTC),
            Ok(Some(at("2026-12-06T12:30:00Z")))
        );
        assert_eq!(
            s.starts(at("2026-12-06T22:10:00Z"), &TimeZone::UTC),
            Ok(None)
        );
    }

    #[test]
    fn a_window_in_a_named_zone_follows_its_daylight_saving_time() {
        // 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer.
        let s = window("0 2 * * *", "1h", Some("Europe/Berlin"));
        let utc = TimeZone::UTC;
        assert_eq!(
            s.starts(at("2026-12-06T12:00:00Z"), &utc),
            Ok(Some(at("2026-12-07T01:00:00Z")))
        );
        assert_eq!(
            s.starts(at("2026-07-06T12:00:00Z"), &utc),
            Ok(Some(at("2026-07-07T00:00:00Z")))
        );
    }

    #[test]
    fn a_window_without_a_zone_is_read_in_the_endpoints_local_time() {
        let s = window("0 22 * * *", "2h", None);
        let now = at("2026-12-06T12:00:00Z");
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        // 22:00 in Tokyo is 13:00 UTC; in UTC it is 22:00.
        assert_eq!(s.starts(now, &tokyo), Ok(Some(at("2026-12-06T13:00:00Z"))));
        assert_eq!(
            s.starts(now, &TimeZone::UTC),
            Ok(Some(at("2026-12-06T22:00:00Z")))
        );
        // A POSIX TZ string, as the TZ variable may give it.
        let plus_nine = TimeZone::posix("JST-9").unwrap();
        assert_eq!(
            s.starts(now, &plus_nine),
            Ok(Some(at("2026-12-06T13:00:00Z")))
        );
    }

    #[test]
    fn seconds_may_be_given_in_a_sixth_field() {
        let s = window("30 15 10 * * *", "1m", Some("UTC"));
        assert_eq!(
            s.starts(at("2026-12-06T10:15:00Z"), &TimeZone::UTC),
            Ok(Some(at("2026-12-06T10:15:30Z")))
        );
    }

    #[test]
    fn a_schedule_that_cannot_be_read_names_the_part() {
        let bad = |cron: &str, duration: &str, zone: Option<&str>| {
            window(cron, duration, zone)
                .check()
                .unwrap_err()
                .to_string()
        };
        let e = bad("0 25 * * *", "1h", None);
        assert!(
            e.starts_with("schedule.windows[0].cron \"0 25 * * *\": "),
            "{e}"
        );
        let e = bad("every night", "1h", None);
        assert!(
            e.starts_with("schedule.windows[0].cron \"every night\""),
            "{e}"
        );
        let e = bad("0 2 * * *", "soon", None);
        assert!(
            e.starts_with("schedule.windows[0].duration \"soon\": "),
            "{e}"
        );
        let e = bad("0 2 * * *", "0s", None);
        assert!(e.contains("at most a week"), "{e}");
        let e = bad("0 2 * * *", "200h", None);
        assert!(e.contains("at most a week"), "{e}");
        let e = bad("0 2 * * *", "1h", Some("Mars/Olympus"));
        assert!(
            e.starts_with("schedule.windows[0].timeZone \"Mars/Olympus\": "),
            "{e}"
        );
        // A cron expression with a year is refused (five or six fields).
        bad("0 0 2 * * * 2027", "1h", None);
        assert_eq!(window("0 2 * * *", "1h30m", Some("UTC")).check(), Ok(()));
        assert_eq!(window("0 2 * * *", "PT2H", None).check(), Ok(()));
    }
}
