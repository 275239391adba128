//! The decision, for each assignment, of what to do about it: a pure
//! function of the desired state, what is installed and what the agent
//! found on the endpoint. `converge` carries the plan out.
//!
//! - One job per package: the controller marks the assignments of jobs
//!   that lose a package to another (`supersededBy`, see the job's
//!   `priority`), and they are reported as `Conflict`, naming the winner.
//!   Should two installs of a package still meet, the first (in job order)
//!   wins and the others wait their turn; an uninstall of a package a job
//!   installs is a conflict too.
//! - An install is done when the package is installed at that digest and in
//!   place in the install root, unless its files drifted and the job asks
//!   for repair.
//! - Installed packages no job installs any more are removed, unless held
//!   (a suspended job, or a job whose package reference does not resolve).
//! - An optional job's package installs only once the endpoint's user chose
//!   it (`Available` until then); a required install the user put off waits
//!   for the deferral to end (the deadline still expires it).
//! - A job's packages install (or go) in its order, and one that has not
//!   (failed, or waiting for its retry) stops the rest of the job there;
//!   a package whose `requires` are not installed at a version in range
//!   waits for them too (the controller puts them before it in the job).
//! - Nothing is removed while an installed package that stays requires it;
//!   removals go dependents first.
//! - A frozen state (an agent not approved, or not known yet) changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use caravan_api::{
    v1alpha1::{InstallMethod, JobAction},
    wire::{AgentDesired, Assignment},
    Digest,
};

mod order;

use order::{block, removal_order};

use crate::{choices::Choices, state::Installed};

/// One assignment's identity: job, package and digest.
pub type Key = (String, String, Digest);

pub fn key(a: &Assignment) -> Key {
    (a.job.clone(), a.package.clone(), a.digest)
}

/// What the agent knows when it decides.
pub struct Situation<'a> {
    pub desired: &'a AgentDesired,
    pub installed: &'a Installed,
    /// Installed packages whose recorded version is in place in the install root.
    pub live: &'a BTreeSet<String>,
    /// Installed packages whose files drifted.
    pub drifted: &'a BTreeSet<String>,
    /// Assignments that failed a moment ago and wait for their retry.
    pub waiting: &'a HashSet<Key>,
    /// Assignments found not applicable to this endpoint: they stop none of
    /// their job's other packages.
    pub not_applicable: &'a HashSet<Key>,
    /// The time: a job's schedule starts (`notBefore`) and ends (`deadline`).
    pub now: chrono::DateTime<chrono::Utc>,
    /// The endpoint's time zone, for maintenance windows in local time.
    pub zone: &'a jiff::tz::TimeZone,
    /// What the endpoint's user chose: optional packages, deferrals.
    pub choices: &'a Choices,
}

/// Why an install runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Not installed, or installed at another version.
    New,
    /// Installed, but gone from the install root.
    Missing,
    /// Installed, but its files drifted and the job asks for repair.
    Repair,
}

/// What to do about one assignment.
#[derive(Debug, PartialEq)]
pub enum Decision<'a> {
    /// Reached already.
    Done(&'a Assignment),
    /// Failed a moment ago: tried again once its retry is due.
    Wait(&'a Assignment),
    /// Another job installs the package first: this install waits its turn.
    Queued(&'a Assignment),
    /// Before the job's `notBefore`, or outside its maintenance windows:
    /// an install downloads ahead, and waits until the time given.
    Early(&'a Assignment, chrono::DateTime<chrono::Utc>),
    /// Not started by the job's deadline: it will not be.
    Expired(&'a Assignment),
    /// The job's schedule cannot be read (said why): nothing starts.
    Unreadable(&'a Assignment, String),
    /// Offered by an optional job, not chosen by the endpoint's user.
    Available(&'a Assignment),
    /// Put off by the endpoint's user until the time given.
    Deferred(&'a Assignment, chrono::DateTime<chrono::Utc>),
    /// Not started: something before it is not there (said what).
    Blocked(&'a Assignment, String),
    /// Not for this endpoint: what it requires is not (said why).
    NotApplicable(&'a Assignment, String),
    /// Another job has the package: nothing is done for this one.
    Conflict {
        assignment: &'a Assignment,
        winner: &'a str,
    },
    Install(&'a Assignment, Why),
    Uninstall(&'a Assignment),
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    /// One decision per assignment, in the desired state's order.
    pub decisions: Vec<Decision<'a>>,
    /// Installed packages no job installs any more, to remove.
    pub removals: Vec<&'a str>,
}

/// What the job's schedule says about starting `a` now: nothing when it
/// may start, else what to do instead.
fn held<'a>(a: &'a Assignment, s: &Situation) -> Option<Decision<'a>> {
    if a.schedule.expired(s.now) {
        return Some(Decision::Expired(a));
    }
    if let Some(until) = s.choices.deferred_until(a, s.now) {
        return Some(Decision::Deferred(a, until));
    }
    match a.schedule.starts(s.now, s.zone) {
        Ok(None) => None,
        Ok(Some(t)) => Some(Decision::Early(a, t)),
        Err(e) => Some(Decision::Unreadable(a, e.to_string())),
    }
}

pub fn plan<'a>(s: &Situation<'a>) -> Plan<'a> {
    if s.desired.frozen {
        return Plan::default();
    }
    let assignments = &s.desired.assignments;
    let mut wanted: BTreeMap<&str, &Assignment> = BTreeMap::new();
    // (An optional package no one chose installs nothing.)
    for a in assignments.iter().filter(|a| {
        a.action == JobAction::Install
            && a.superseded_by.is_none()
            && (!a.optional || s.choices.chosen(a))
    }) {
        wanted.entry(a.package.as_str()).or_insert(a);
    }
    let mut decisions: Vec<_> = assignments
        .iter()
        .map(|a| {
            if let Some(winner) = &a.superseded_by {
                return Decision::Conflict {
                    assignment: a,
                    winner,
                };
            }
            let waiting = s.waiting.contains(&key(a));
            match a.action {
                JobAction::Install => {
                    let at_digest = s
                        .installed
                        .get(&a.package)
                        .is_some_and(|r| r.digest == a.digest);
                    // A new agent binary is not in the install root.
                    let live =
                        a.install.method == InstallMethod::Agent || s.live.contains(&a.package);
                    let repair = a.repair && s.drifted.contains(&a.package);
                    // Another job installs another version first (one that
                    // installs the same one takes this one along).
                    let queued = wanted
                        .get(a.package.as_str())
                        .is_some_and(|w| w.job != a.job && w.digest != a.digest);
                    match (at_digest, live, repair) {
                        // Reached, whoever installed it: even while waiting.
                        (true, true, false) => Decision::Done(a),
                        _ if a.optional && !s.choices.chosen(a) => Decision::Available(a),
                        _ if waiting => Decision::Wait(a),
                        _ if queued => Decision::Queued(a),
                        // Putting back what the job installed is not bound by its schedule.
                        (true, false, _) => Decision::Install(a, Why::Missing),
                        (true, true, true) => Decision::Install(a, Why::Repair),
                        (false, ..) => held(a, s).unwrap_or(Decision::Install(a, Why::New)),
                    }
                }
                JobAction::Uninstall => match wanted.get(a.package.as_str()) {
                    Some(w) => Decision::Conflict {
                        assignment: a,
                        winner: &w.job,
                    },
                    None if !s.installed.contains_key(&a.package) => Decision::Done(a),
                    None if waiting => Decision::Wait(a),
                    None => held(a, s).unwrap_or(Decision::Uninstall(a)),
                },
            }
        })
        .collect();
    block(&mut decisions, s, &wanted);
    // A removal a job schedules waits for its hours (and an expired one
    // for the next job): nothing removes the package before.
    let scheduled: BTreeSet<&str> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Early(a, _)
            | Decision::Expired(a)
            | Decision::Unreadable(a, _)
            | Decision::Deferred(a, _)
            | Decision::Blocked(a, _)
                if a.action == JobAction::Uninstall =>
            {
                Some(a.package.as_str())
            }
            _ => None,
        })
        .collect();
    let unwanted: Vec<&str> = s
        .installed
        .keys()
        .filter(|p| {
            !wanted.contains_key(p.as_str())
                && !s.desired.hold.contains(p)
                && !scheduled.contains(p.as_str())
        })
        .map(String::as_str)
        .collect();
    Plan {
        decisions,
        removals: removal_order(unwanted, s.installed),
    }
}

/// The assignment a decision is about.
fn assignment<'a>(d: &Decision<'a>) -> &'a Assignment {
    match d {
        Decision::Done(a)
        | Decision::Wait(a)
        | Decision::Queued(a)
        | Decision::Early(a, _)
        | Decision::Expired(a)
        | Decision::Unreadable(a, _)
        | Decision::Available(a)
        | Decision::Deferred(a, _)
        | Decision::Blocked(a, _)
        | Decision::NotApplicable(a, _)
        | Decision::Install(a, _)
        | Decision::Uninstall(a) => a,
        Decision::Conflict { assignment, .. } => assignment,
    }
}

#[cfg(test)]
mod tests;
