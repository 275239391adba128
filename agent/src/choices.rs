//! What the endpoint's user chose: optional packages to install
//! (`caravan-agent install NAME`, from those `caravan-agent available`
//! lists) and required installs put off (`caravan-agent defer JOB`). The
//! commands check a choice against the desired state the running agent last
//! accepted and keep it in `choices.json` in the state directory; the agent
//! reads it at each pass (and wakes when it changes).

use std::collections::{BTreeMap, BTreeSet};

use caravan_api::{
    v1alpha1::JobAction,
    wire::{AgentDesired, Assignment},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::StateDir;

/// The file the choices are kept in.
pub const FILE: &str = "choices.json";
/// The file the running agent keeps the desired state it last accepted in.
pub const DESIRED: &str = "desired.json";

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Choices {
    /// Optional packages to install, by name.
    #[serde(default)]
    pub install: BTreeSet<String>,
    /// Per job (`namespace/name`): the deferrals taken.
    #[serde(default)]
    pub deferred: BTreeMap<String, Deferred>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Deferred {
    /// How many times the job's installs were put off.
    pub count: u32,
    /// When the last deferral ends.
    pub until: DateTime<Utc>,
}

impl Choices {
    /// The choices kept in `state` (none if unreadable: a broken file
    /// holds nothing back).
    pub fn load(state: &StateDir) -> Self {
        match state.json(FILE) {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the user's choices are unreadable; ignored"
                );
                Self::default()
            }
        }
    }

    pub fn save(&self, state: &StateDir) -> anyhow::Result<()> {
        state.set_json(FILE, Some(self))
    }

    /// Whether the user chose the optional package of `a` (or, for a
    /// package it brings because others require it, one of those).
    pub fn chosen(&self, a: &Assignment) -> bool {
        std::iter::once(&a.package)
            .chain(&a.required_by)
            .any(|p| self.install.contains(p))
    }

    /// Until when the user put `a` off, seen at `now`, if they did.
    pub fn deferred_until(&self, a: &Assignment, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.deferred
            .get(&a.job)
            .map(|d| d.until)
            .filter(|until| *until > now)
    }

    /// Chooses to install the optional package `name` that `desired` offers.
    pub fn choose(&mut self, name: &str, desired: &AgentDesired) -> Result<(), String> {
        if !offered(desired).any(|a| a.package == name) {
            return Err(format!(
                "no job offers package {name} here (see `caravan-agent available`)"
            ));
        }
        self.install.insert(name.to_string());
        Ok(())
    }

    /// Puts the required installs of `job` (its name, or `namespace/name`)
    /// off by its deferral's delay, at `now`; returns the job's key and
    /// when the deferral ends.
    pub fn defer(
        &mut self,
        job: &str,
        desired: &AgentDesired,
        now: DateTime<Utc>,
    ) -> Result<(String, DateTime<Utc>), String> {
        let mine = |a: &&Assignment| {
            (a.job == job || a.job.rsplit_once('/').is_some_and(|(_, n)| n == job))
                && a.action == JobAction::Install
                && !a.optional
        };
        let a = desired
            .assignments
            .iter()
            .find(mine)
            .ok_or_else(|| format!("job {job} installs nothing required here"))?;
        let key = a.job.clone();
        let d = a
            .deferral
            .as_ref()
            .ok_or_else(|| format!("job {key} does not let its installs be put off"))?;
        let delay = d.delay()?;
        let taken = self.deferred.get(&key).map_or(0, |d| d.count);
        if taken >= d.limit {
            return Err(format!(
                "job {key} was put off {taken} time(s): that is its limit"
            ));
        }
        let until = now + delay;
        if let Some(deadline) = a.schedule.deadline.filter(|d| until > *d) {
            return Err(format!(
                "job {key} must install by its deadline {}: putting it off for {} would end after that",
                deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                d.delay
            ));
        }
        self.deferred.insert(
            key.clone(),
            Deferred {
                count: taken + 1,
                until,
            },
        );
        Ok((key, until))
    }
}

/// The optional installs `desired` offers.
pub fn offered(desired: &AgentDesired) -> impl Iterator<Item = &Assignment> {
    desired.assignments.iter().filter(|a| {
        a.optional
                && a.action == JobAction::Install
                && a.superseded_by.is_none()
                // Comes with the packages that require it.
                && a.required_by.is_empty()
    })
}

/// `caravan-agent available`: the optional packages offered here, and
/// whether each is chosen.
pub fn render_available(desired: &AgentDesired, choices: &Choices) -> String {
    let mut out = String::new();
    for a in offered(desired) {
        out.push_str(&format!(
            "{} {} (job {}){}\n",
            a.package,
            a.version,
            a.job,
            if choices.chosen(a) { ": chosen" } else { "" }
        ));
    }
    if out.is_empty() {
        out.push_str("no optional packages are offered here\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::{v1alpha1::Deferral, Digest};

    fn at(time: &str) -> DateTime<Utc> {
        format!("2026-12-01T{time}:00Z").parse().unwrap()
    }

    fn assignment(job: &str, package: &str, optional: bool) -> Assignment {
        serde_json::from_value(serde_json::json!({
            "job": format!("ns/{job}"), "action": "install", "package": package,
            "version": "1.0.0", "digest": Digest::of(package.as_bytes()), "size": 1,
            "install": {}, "optional": optional,
        }))
        .unwrap()
    }

    fn desired(assignments: Vec<Assignment>) -> AgentDesired {
        AgentDesired {
            agent: "a1".into(),
            assignments,
            ..Default::default()
        }
    }

    #[test]
    fn only_an_offered_package_can_be_chosen() {
        let d = desired(vec![
            assignment("extras", "gimp", true),
            assignment("base", "hello", false),
        ]);
        let mut c = Choices::default();
        assert_eq!(c.choose("gimp", &d), Ok(()));
        assert!(c.chosen(&d.assignments[0]));
        let e = c.choose("hello", &d).unwrap_err();
        assert_eq!(
            e,
            "no job offers package hello here (see `caravan-agent available`)"
        );
        assert_eq!(
            render_available(&d, &c),
            "gimp 1.0.0 (job ns/extras): chosen\n"
        );
    }

    #[test]
    fn a_deferral_is_limited_and_never_ends_after_the_deadline() {
        let mut a = assignment("office", "suite", false);
        a.deferral = Some(Deferral {
            limit: 2,
            delay: "1h".into(),
        });
        a.schedule.deadline = Some(at("14:30"));
        let d = desired(vec![a]);
        let mut c = Choices::default();
        assert_eq!(
            c.defer("office", &d, at("12:00")),
            Ok(("ns/office".into(), at("13:00")))
        );
        assert_eq!(
            c.deferred_until(&d.assignments[0], at("12:30")),
            Some(at("13:00"))
        );
        assert_eq!(c.deferred_until(&d.assignments[0], at("13:00")), None);
        // The second would end at 14:31, after the deadline: the deadline wins.
        let e = c.defer("ns/office", &d, at("13:31")).unwrap_err();
        assert!(
            e.contains("must install by its deadline 2026-12-01T14:30:00Z"),
            "{e}"
        );
        assert_eq!(
            c.defer("office", &d, at("13:00")),
            Ok(("ns/office".into(), at("14:00")))
        );
        let e = c.defer("office", &d, at("13:10")).unwrap_err();
        assert_eq!(e, "job ns/office was put off 2 time(s): that is its limit");
    }

    #[test]
    fn only_a_job_that_allows_it_can_be_put_off() {
        let d = desired(vec![
            assignment("base", "hello", false),
            assignment("extras", "gimp", true),
        ]);
        let mut c = Choices::default();
        assert_eq!(
            c.defer("base", &d, at("12:00")).unwrap_err(),
            "job ns/base does not let its installs be put off"
        );
        assert_eq!(
            c.defer("extras", &d, at("12:00")).unwrap_err(),
            "job extras installs nothing required here"
        );
        assert_eq!(c, Choices::default());
    }
}
