//! Failed installs, counted per assignment and kept in the state directory
//! (`attempts.json`), so neither a restart nor a crash loop resets the
//! count or skips the pause. Pure bookkeeping (times are passed in); the
//! converger asks it whether an assignment waits and tells it how each
//! install went.
//!
//! - A failed install waits `retry_after`, doubling with each failure (at
//!   most an hour), and is tried `retries` more times; then it is given up
//!   until the job re-runs it.
//! - The job re-runs its failures by changing its retry generation: an
//!   assignment that sees a generation other than the one its failures were
//!   counted under starts afresh — unless the retry does not reach this agent
//!   (`retryExcluded`), which only records the new generation.
//! - A changed assignment (another version, signature or install step) is
//!   another key: counted afresh. A changed limit or schedule is not:
//!   raising `retries` gives a given-up install more tries, and only a retry
//!   generation re-runs what was given up.

use std::{collections::BTreeMap, time::Duration};

use caravan_api::{wire::Assignment, Digest};
use serde::{Deserialize, Serialize};

use crate::state::StateDir;

/// File of the state directory that counts failed installs.
const FILE: &str = "attempts.json";
/// Longest pause before a failed install is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The failed installs of one assignment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Failures {
    /// Installs tried and failed since the last success or re-run.
    pub count: u32,
    /// The job's retry generation they were counted under.
    pub generation: u32,
    /// What the last one said (an install script's output tail).
    pub message: String,
    /// Not tried again before this time (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
}

/// Failed installs by assignment (`<job> <package> <fingerprint>`).
#[derive(Debug, Default, PartialEq)]
pub struct Attempts(BTreeMap<String, Failures>);

/// The key of `a`'s failures: what is installed, and how.
fn key(a: &Assignment) -> String {
    let what = Assignment {
        retries: 0,
        retry_generation: 0,
        retry_excluded: false,
        superseded_by: None,
        schedule: Default::default(),
        ..a.clone()
    };
    let fingerprint = Digest::of(&serde_json::to_vec(&what).unwrap_or_default());
    format!("{} {} {}", a.job, a.package, fingerprint.hex())
}

/// The pause before the next try after `failures` failed installs.
pub fn backoff(retry_after: Duration, failures: u32) -> Duration {
    retry_after
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

impl Attempts {
    /// The counts kept in `state`; a file that cannot be read is started
    /// afresh (it is bookkeeping: at worst an install is tried again).
    pub fn load(state: &StateDir) -> Self {
        match state.json(FILE) {
            Ok(map) => Self(map.unwrap_or_default()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "failed-install counts unreadable; counting afresh");
                Self::default()
            }
        }
    }

    pub fn save(&self, state: &StateDir) {
        let value = (!self.0.is_empty()).then_some(&self.0);
        if let Err(e) = state.set_json(FILE, value) {
            tracing::warn!(error = %format!("{e:#}"), "cannot record failed installs");
        }
    }

    /// Takes a new desired state: forgets the assignments gone, and starts
    /// afresh those re-run by a new retry generation. Returns those, and
    /// whether anything changed.
    pub fn follow<'a>(&mut self, assignments: &'a [Assignment]) -> (Vec<&'a Assignment>, bool) {
        let by_key: BTreeMap<String, &Assignment> =
            assignments.iter().map(|a| (key(a), a)).collect();
        let before = self.0.len();
        self.0.retain(|k, _| by_key.contains_key(k));
        let mut changed = self.0.len() != before;
        let mut rerun = Vec::new();
        for (k, a) in &by_key {
            let Some(f) = self.0.get_mut(k) else {
                continue;
            };
            if f.generation != a.retry_generation {
                changed = true;
                f.generation = a.retry_generation;
                if !a.retry_excluded {
                    self.0.remove(k);
                    rerun.push(*a);
                }
            }
        }
        (rerun, changed)
    }

    /// Counts a failed install of `a` at `now`; returns how many there
    /// were and the pause before the next try (none: given up).
    pub fn failed(
        &mut self,
        a: &Assignment,
        message: &str,
        retry_after: Duration,
        now: u64,
    ) -> (u32, Option<Duration>) {
        let f = self.0.entry(key(a)).or_insert_with(|| Failures {
            generation: a.retry_generation,
            ..Default::default()
        });
        f.count += 1;
        f.message = message.to_string();
        let pause = (f.count <= a.retries).then(|| backoff(retry_after, f.count));
        f.not_before = pause.map(|p| now + p.as_secs());
        (f.count, pause)
    }

    /// Forgets the failures of `a`, which succeeded; returns whether it had any.
    pub fn succeeded(&mut self, a: &Assignment) -> bool {
        self.0.remove(&key(a)).is_some()
    }

    /// The failures of `a`, if it failed as often as its job allows.
    pub fn given_up(&self, a: &Assignment) -> Option<&Failures> {
        self.0.get(&key(a)).filter(|f| f.count > a.retries)
    }

    /// Whether `a` is not to be tried at `now`: given up, or in its pause.
    pub fn waiting(&self, a: &Assignment, now: u64) -> bool {
        self.given_up(a).is_some()
            || self
                .0
                .get(&key(a))
                .and_then(|f| f.not_before)
                .is_some_and(|t| now < t)
    }

    /// Seconds from `now` until the next pause ends, if one has not.
    pub fn next_due(&self, now: u64) -> Option<u64> {
        self.0
            .values()
            .filter_map(|f| f.not_before)
            .filter(|t| *t > now)
            .map(|t| t - now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(retries: u32) -> Assignment {
        serde_json::from_value(serde_json::json!({
            "job": "ns/j", "action": "install", "package": "p", "version": "1",
            "digest": Digest::of(b"p"), "size": 1, "install": {}, "retries": retries,
        }))
        .unwrap()
    }

    const S: Duration = Duration::from_secs(2);

    #[test]
    fn the_pause_between_tries_doubles_up_to_an_hour() {
        let pauses: Vec<_> = (1..=4).map(|n| backoff(S, n)).collect();
        let s = Duration::from_secs;
        assert_eq!(pauses, [s(2), s(4), s(8), s(16)]);
        assert_eq!(backoff(s(60), 40), MAX_BACKOFF);
    }

    #[test]
    fn a_failing_install_pauses_then_gives_up_at_its_limit() {
        let a = assignment(2);
        let mut at = Attempts::default();
        assert_eq!(at.failed(&a, "exit 1", S, 100), (1, Some(S)));
        assert!(at.waiting(&a, 101) && !at.waiting(&a, 102));
        assert_eq!(at.next_due(100), Some(2));
        assert_eq!(at.failed(&a, "exit 1", S, 102), (2, Some(2 * S)));
        assert_eq!(at.failed(&a, "exit 2", S, 106), (3, None));
        assert!(at.waiting(&a, 1_000_000), "given up: waits for a re-run");
        assert_eq!(at.given_up(&a).unwrap().message, "exit 2");
        assert_eq!(at.next_due(106), None);
        // A higher limit gives it more tries; a success forgets it all.
        let more = Assignment {
            retries: 5,
            ..a.clone()
        };
        assert!(!at.waiting(&more, 106));
        assert!(at.succeeded(&more));
        assert!(!at.waiting(&a, 106));
    }

    #[test]
    fn a_new_retry_generation_reruns_only_where_the_retry_reaches() {
        let a = assignment(0);
        let mut at = Attempts::default();
        at.failed(&a, "exit 1", S, 0);
        assert!(at.given_up(&a).is_some());
        // A generation this agent is excluded from is recorded, nothing re-run.
        let elsewhere = Assignment {
            retry_generation: 1,
            retry_excluded: true,
            ..a.clone()
        };
        let slice = std::slice::from_ref(&elsewhere);
        assert_eq!(at.follow(slice), (vec![], true));
        assert!(at.given_up(&elsewhere).is_some());
        assert_eq!(at.follow(slice), (vec![], false), "seen already");
        // One that reaches it (even a lower one Git set back) re-runs it.
        let here = Assignment {
            retry_generation: 0,
            ..a.clone()
        };
        let slice = std::slice::from_ref(&here);
        assert_eq!(at.follow(slice).0, [&here]);
        assert!(at.given_up(&here).is_none());
        // Assignments gone are forgotten.
        at.failed(&here, "exit 1", S, 0);
        assert_eq!(at.follow(&[]), (vec![], true));
        assert_eq!(at, Attempts::default());
    }

    #[test]
    fn a_changed_assignment_is_counted_afresh_but_a_new_limit_or_generation_is_not() {
        let a = assignment(2);
        let same = Assignment {
            retries: 5,
            retry_generation: 3,
            retry_excluded: true,
            superseded_by: Some("ns/k".into()),
            schedule: caravan_api::v1alpha1::Schedule {
                not_before: Some(chrono::Utc::now()),
                windows: vec![Default::default()],
                ..Default::default()
            },
            ..a.clone()
        };
        assert_eq!(key(&a), key(&same));
        let signed = Assignment {
            require_signature: true,
            ..a.clone()
        };
        assert_ne!(key(&a), key(&signed));
    }
}
