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

/// The installed packages that require `package` (at the version installed).
fn dependents<'i>(package: &'i str, installed: &'i Installed) -> impl Iterator<Item = &'i str> {
    let version = installed.get(package).map(|r| r.version.as_str());
    installed
        .values()
        .filter(move |r| {
            r.install
                .requires
                .iter()
                .any(|d| d.name == package && version.is_some_and(|v| d.admits(v).unwrap_or(true)))
        })
        .map(|r| r.name.as_str())
}

/// `unwanted` without what a package that stays requires, dependents
/// before what they require.
fn removal_order<'a>(mut unwanted: Vec<&'a str>, installed: &Installed) -> Vec<&'a str> {
    // What stays keeps what it requires, and so on down.
    loop {
        let kept: Vec<usize> = (0..unwanted.len())
            .filter(|&i| dependents(unwanted[i], installed).any(|d| !unwanted.contains(&d)))
            .collect();
        if kept.is_empty() {
            break;
        }
        for i in kept.into_iter().rev() {
            tracing::debug!(
                package = unwanted[i],
                "kept: a package that stays requires it"
            );
            unwanted.remove(i);
        }
    }
    let mut order = Vec::with_capacity(unwanted.len());
    while !unwanted.is_empty() {
        // Those no other removal requires go first (in a cycle, any).
        let next = (0..unwanted.len())
            .find(|&i| {
                !dependents(unwanted[i], installed)
                    .any(|d| d != unwanted[i] && unwanted.contains(&d))
            })
            .unwrap_or(0);
        order.push(unwanted.remove(next));
    }
    order
}

/// Stops what must wait: a job's install or removal while one before it in
/// the job has not happened (its failure stops the rest); an install whose
/// `requires` are not installed at a version in range (not applicable here
/// when what it requires is not), or that would leave an installed package
/// that stays out of its range; a removal of a package another installed
/// one requires (dependents go first).
fn block(decisions: &mut [Decision<'_>], s: &Situation, wanted: &BTreeMap<&str, &Assignment>) {
    let mut verdicts = Vec::with_capacity(decisions.len());
    for (i, d) in decisions.iter().enumerate() {
        let a = match d {
            Decision::Install(a, Why::New) | Decision::Uninstall(a) => *a,
            _ => {
                verdicts.push(None);
                continue;
            }
        };
        let before = decisions[..i]
            .iter()
            .find(|e| {
                let b = assignment(e);
                b.job == a.job
                    && !s.not_applicable.contains(&key(b))
                    && !matches!(
                        e,
                        Decision::Done(_) | Decision::Conflict { .. } | Decision::Available(_)
                    )
            })
            .map(assignment);
        let verdict = match (before, a.action) {
            (Some(b), _) => Some(Blocked::Wait(format!(
                "not started: package {} before it in the job is not {} yet",
                b.package,
                match b.action {
                    JobAction::Install => "installed",
                    JobAction::Uninstall => "removed",
                }
            ))),
            (None, JobAction::Install) => unmet(a, s).or_else(|| breaks(a, s, wanted)),
            (None, JobAction::Uninstall) => dependents(&a.package, s.installed)
                .find(|d| *d != a.package)
                .map(|d| {
                    Blocked::Wait(format!(
                        "not removed: package {d} installed here requires it"
                    ))
                }),
        };
        verdicts.push(verdict);
    }
    for (d, verdict) in decisions.iter_mut().zip(verdicts) {
        match verdict {
            Some(Blocked::Wait(why)) => *d = Decision::Blocked(assignment(d), why),
            Some(Blocked::NotApplicable(why)) => *d = Decision::NotApplicable(assignment(d), why),
            None => {}
        }
    }
}

enum Blocked {
    Wait(String),
    NotApplicable(String),
}

/// What `a` requires that is not installed at a version in range.
fn unmet(a: &Assignment, s: &Situation) -> Option<Blocked> {
    a.install.requires.iter().find_map(|d| {
        let have = s.installed.get(&d.name);
        // The job's own assignment of it, found not for this endpoint.
        let inapplicable =
            s.desired.assignments.iter().any(|o| {
                o.job == a.job && o.package == d.name && s.not_applicable.contains(&key(o))
            });
        match have.map(|r| d.admits(&r.version)) {
            Some(Ok(true)) => None,
            _ if inapplicable => Some(Blocked::NotApplicable(format!(
                "it requires {d}, which is not for this endpoint"
            ))),
            Some(_) => Some(Blocked::Wait(format!(
                "not started: it requires {d}, and {} {} is installed",
                d.name,
                have.map_or("", |r| r.version.as_str())
            ))),
            None => Some(Blocked::Wait(format!(
                "not started: it requires {d}, not installed yet"
            ))),
        }
    })
}

/// An installed package that stays (at the version a job wants, or held)
/// and requires `a`'s package in a range `a`'s version is not in.
fn breaks(a: &Assignment, s: &Situation, wanted: &BTreeMap<&str, &Assignment>) -> Option<Blocked> {
    s.installed
        .values()
        .filter(|r| r.name != a.package)
        .find_map(|r| {
            let requires = match wanted.get(r.name.as_str()) {
                Some(w) => &w.install.requires,
                None if s.desired.hold.contains(&r.name) => &r.install.requires,
                // Going.
                None => return None,
            };
            requires
                .iter()
                .find(|d| d.name == a.package && !d.admits(&a.version).unwrap_or(false))
                .map(|d| {
                    Blocked::Wait(format!(
                        "not started: package {} installed here requires {d}",
                        r.name
                    ))
                })
        })
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
mod tests {
    use super::*;
    use crate::state::InstalledRecord;

    fn assignment(job: &str, action: JobAction, package: &str, version: &str) -> Assignment {
        serde_json::from_value(serde_json::json!({
            "job": format!("ns/{job}"), "action": action, "package": package, "version": version,
            "digest": Digest::of(format!("{package}-{version}").as_bytes()), "size": 1, "install": {},
        }))
        .unwrap()
    }

    fn at(time: &str) -> chrono::DateTime<chrono::Utc> {
        format!("2026-12-01T{time}:00Z").parse().unwrap()
    }

    fn install(job: &str, package: &str, version: &str) -> Assignment {
        assignment(job, JobAction::Install, package, version)
    }

    fn installed(records: &[(&str, &str)]) -> Installed {
        records
            .iter()
            .map(|(p, v)| {
                let r = InstalledRecord {
                    name: p.to_string(),
                    version: v.to_string(),
                    digest: Digest::of(format!("{p}-{v}").as_bytes()),
                    job: "ns/old".into(),
                    install: Default::default(),
                    detected: false,
                };
                (p.to_string(), r)
            })
            .collect()
    }

    /// Plans `assignments` (held: `hold`) over `on` (package, version),
    /// all live and none drifted unless said.
    struct Case {
        desired: AgentDesired,
        installed: Installed,
        live: BTreeSet<String>,
        drifted: BTreeSet<String>,
        waiting: HashSet<Key>,
        not_applicable: HashSet<Key>,
        now: chrono::DateTime<chrono::Utc>,
        zone: jiff::tz::TimeZone,
        choices: Choices,
    }

    impl Case {
        fn new(assignments: Vec<Assignment>, on: &[(&str, &str)]) -> Self {
            let installed = installed(on);
            Self {
                live: installed.keys().cloned().collect(),
                desired: AgentDesired {
                    agent: "a1".into(),
                    assignments,
                    ..Default::default()
                },
                installed,
                drifted: BTreeSet::new(),
                waiting: HashSet::new(),
                not_applicable: HashSet::new(),
                now: at("12:00"),
                zone: jiff::tz::TimeZone::UTC,
                choices: Choices::default(),
            }
        }

        fn plan(&self) -> Plan<'_> {
            plan(&Situation {
                desired: &self.desired,
                installed: &self.installed,
                live: &self.live,
                drifted: &self.drifted,
                waiting: &self.waiting,
                not_applicable: &self.not_applicable,
                now: self.now,
                zone: &self.zone,
                choices: &self.choices,
            })
        }
    }

    #[test]
    fn what_is_installed_at_the_digest_is_done_and_the_rest_installs() {
        let c = Case::new(
            vec![install("j", "hello", "2"), install("j", "tools", "1")],
            &[("hello", "1"), ("tools", "1")],
        );
        let p = c.plan();
        let a = &c.desired.assignments;
        assert_eq!(
            p.decisions,
            [Decision::Install(&a[0], Why::New), Decision::Done(&a[1])]
        );
        assert!(p.removals.is_empty());
    }

    #[test]
    fn the_first_job_installs_a_package_and_an_uninstall_of_it_cannot_win() {
        let c = Case::new(
            vec![
                install("a", "hello", "2"),
                install("b", "hello", "3"),
                assignment("c", JobAction::Uninstall, "hello", "2"),
            ],
            &[],
        );
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Install(&a[0], Why::New),
                Decision::Queued(&a[1]),
                Decision::Conflict {
                    assignment: &a[2],
                    winner: "ns/a"
                },
            ]
        );
    }

    #[test]
    fn an_assignment_the_controller_marks_superseded_is_a_conflict_and_leaves_the_winner_alone() {
        // The uninstall job takes precedence: the install is superseded, and
        // what is installed is removed as the winner asks.
        let mut c = Case::new(
            vec![
                install("a", "hello", "2"),
                assignment("u", JobAction::Uninstall, "hello", "1"),
            ],
            &[("hello", "1")],
        );
        c.desired.assignments[0].superseded_by = Some("ns/u".into());
        let a = &c.desired.assignments;
        let p = c.plan();
        assert_eq!(
            p.decisions,
            [
                Decision::Conflict {
                    assignment: &a[0],
                    winner: "ns/u"
                },
                Decision::Uninstall(&a[1]),
            ]
        );
        assert_eq!(p.removals, ["hello"], "a superseded install keeps nothing");
    }

    #[test]
    fn an_uninstall_removes_what_is_there_and_is_done_when_it_is_gone() {
        let c = Case::new(
            vec![assignment("u", JobAction::Uninstall, "hello", "1")],
            &[("hello", "1")],
        );
        let a = &c.desired.assignments;
        assert_eq!(c.plan().decisions, [Decision::Uninstall(&a[0])]);
        let c = Case::new(
            vec![assignment("u", JobAction::Uninstall, "hello", "1")],
            &[],
        );
        assert_eq!(
            c.plan().decisions,
            [Decision::Done(&c.desired.assignments[0])]
        );
    }

    #[test]
    fn a_package_missing_from_the_root_or_drifted_under_repair_is_installed_again() {
        let mut c = Case::new(vec![install("j", "hello", "1")], &[("hello", "1")]);
        c.live.clear();
        assert_eq!(
            c.plan().decisions,
            [Decision::Install(&c.desired.assignments[0], Why::Missing)]
        );
        let mut c = Case::new(vec![install("j", "hello", "1")], &[("hello", "1")]);
        c.drifted.insert("hello".into());
        assert_eq!(
            c.plan().decisions,
            [Decision::Done(&c.desired.assignments[0])],
            "drift is reported, not repaired, unless asked"
        );
        c.desired.assignments[0].repair = true;
        assert_eq!(
            c.plan().decisions,
            [Decision::Install(&c.desired.assignments[0], Why::Repair)]
        );
    }

    #[test]
    fn a_failed_assignment_waits_for_its_retry_unless_it_is_reached_already() {
        let mut c = Case::new(vec![install("j", "hello", "1")], &[]);
        c.waiting.insert(key(&c.desired.assignments[0]));
        assert_eq!(
            c.plan().decisions,
            [Decision::Wait(&c.desired.assignments[0])]
        );
        c.installed = installed(&[("hello", "1")]);
        c.live.insert("hello".into());
        assert_eq!(
            c.plan().decisions,
            [Decision::Done(&c.desired.assignments[0])]
        );
    }

    #[test]
    fn a_job_installing_the_same_version_as_one_that_gave_up_installs_it_itself() {
        let mut c = Case::new(
            vec![install("a", "hello", "1"), install("b", "hello", "1")],
            &[],
        );
        c.waiting.insert(key(&c.desired.assignments[0]));
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [Decision::Wait(&a[0]), Decision::Install(&a[1], Why::New)]
        );
    }

    #[test]
    fn what_no_job_installs_is_removed_unless_held_and_a_frozen_agent_changes_nothing() {
        let mut c = Case::new(
            vec![install("j", "hello", "1")],
            &[("hello", "1"), ("old", "1"), ("kept", "1")],
        );
        c.desired.hold = vec!["kept".into()];
        assert_eq!(c.plan().removals, ["old"]);
        c.desired.frozen = true;
        assert_eq!(c.plan(), Plan::default());
    }

    #[test]
    fn a_schedule_holds_new_installs_and_removals_to_its_hours() {
        let mut c = Case::new(
            vec![
                install("j", "hello", "2"),
                assignment("u", JobAction::Uninstall, "old", "1"),
                install("k", "tools", "1"),
            ],
            &[("old", "1"), ("tools", "1")],
        );
        for a in &mut c.desired.assignments {
            a.schedule.not_before = Some(at("13:00"));
            a.schedule.deadline = Some(at("14:00"));
        }
        c.live.remove("tools");
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Early(&a[0], at("13:00")),
                Decision::Early(&a[1], at("13:00")),
                Decision::Install(&a[2], Why::Missing),
            ],
            "before the start; putting back what is installed is not held"
        );
        assert!(c.plan().removals.is_empty(), "the removal waits too");
        c.now = at("13:00");
        assert_eq!(
            c.plan().decisions[..2],
            [
                Decision::Install(&a[0], Why::New),
                Decision::Uninstall(&a[1])
            ]
        );
        c.now = at("14:00");
        assert_eq!(
            c.plan().decisions[..2],
            [Decision::Expired(&a[0]), Decision::Expired(&a[1])]
        );
    }

    #[test]
    fn a_maintenance_window_holds_new_installs_until_it_opens_in_the_endpoints_time() {
        let mut c = Case::new(
            vec![
                install("j", "hello", "2"),
                assignment("u", JobAction::Uninstall, "old", "1"),
            ],
            &[("old", "1")],
        );
        for a in &mut c.desired.assignments {
            // 14:00 local time, for an hour.
            a.schedule.windows = vec![caravan_api::v1alpha1::Window {
                cron: "0 14 * * *".into(),
                duration: "1h".into(),
                time_zone: None,
            }];
        }
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Early(&a[0], at("14:00")),
                Decision::Early(&a[1], at("14:00")),
            ]
        );
        assert!(c.plan().removals.is_empty(), "the removal waits too");
        // Two hours east of UTC, the window opened at 12:00 UTC.
        c.zone = jiff::tz::TimeZone::fixed(jiff::tz::offset(2));
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Install(&a[0], Why::New),
                Decision::Uninstall(&a[1])
            ]
        );
    }

    #[test]
    fn a_schedule_that_cannot_be_read_starts_nothing_and_says_why() {
        let mut c = Case::new(vec![install("j", "hello", "2")], &[]);
        c.desired.assignments[0].schedule.windows = vec![caravan_api::v1alpha1::Window {
            cron: "at night".into(),
            duration: "1h".into(),
            time_zone: None,
        }];
        match &c.plan().decisions[..] {
            [Decision::Unreadable(_, why)] => {
                assert!(
                    why.starts_with("schedule.windows[0].cron \"at night\""),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_optional_package_installs_once_chosen_and_a_deferral_holds_an_install() {
        let mut c = Case::new(
            vec![
                install("extras", "gimp", "2"),
                install("base", "hello", "1"),
            ],
            &[],
        );
        c.desired.assignments[0].optional = true;
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Available(&a[0]),
                Decision::Install(&a[1], Why::New)
            ]
        );
        c.choices.install.insert("gimp".into());
        c.choices.deferred.insert(
            "ns/base".into(),
            crate::choices::Deferred {
                count: 1,
                until: at("13:00"),
            },
        );
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Install(&a[0], Why::New),
                Decision::Deferred(&a[1], at("13:00"))
            ]
        );
        c.now = at("13:00");
        assert_eq!(c.plan().decisions[1], Decision::Install(&a[1], Why::New));
    }

    fn requiring(mut a: Assignment, name: &str, range: &str) -> Assignment {
        a.install.requires.push(caravan_api::v1alpha1::Dependency {
            name: name.into(),
            version: Some(range.into()),
        });
        a
    }

    #[test]
    fn a_jobs_packages_go_in_order_and_one_not_there_stops_the_rest() {
        let mut c = Case::new(
            vec![
                install("j", "libfoo", "1.2.0"),
                requiring(install("j", "app", "2"), "libfoo", "^1.2"),
                install("j", "tools", "1"),
                install("other", "hello", "1"),
            ],
            &[],
        );
        c.desired.assignments[0].required_by = vec!["app".into()];
        let a = &c.desired.assignments;
        let not_yet =
            |p: &str| format!("not started: package {p} before it in the job is not installed yet");
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Install(&a[0], Why::New),
                Decision::Blocked(&a[1], not_yet("libfoo")),
                Decision::Blocked(&a[2], not_yet("libfoo")),
                Decision::Install(&a[3], Why::New),
            ]
        );
        // libfoo failed: it stops the rest of its job, not the other job.
        c.waiting.insert(key(&a[0]));
        let d = c.plan().decisions;
        assert_eq!(d[0], Decision::Wait(&a[0]));
        assert_eq!(d[2], Decision::Blocked(&a[2], not_yet("libfoo")));
        assert_eq!(d[3], Decision::Install(&a[3], Why::New));
        // libfoo not for this endpoint: neither is app; tools goes on.
        c.not_applicable.insert(key(&a[0]));
        let d = c.plan().decisions;
        let why = "it requires libfoo ^1.2, which is not for this endpoint";
        assert_eq!(d[1], Decision::NotApplicable(&a[1], why.into()));
        c.not_applicable.insert(key(&a[1]));
        assert_eq!(c.plan().decisions[2], Decision::Install(&a[2], Why::New));
        // An old libfoo, out of range, does not do either.
        c.not_applicable.clear();
        c.installed = installed(&[("libfoo", "1.0.0")]);
        c.waiting.insert(key(&a[0]));
        let needs = "not started: it requires libfoo ^1.2, and libfoo 1.0.0 is installed";
        c.desired.assignments.swap(0, 1);
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions[0],
            Decision::Blocked(&a[0], needs.into())
        );
        c.desired.assignments.swap(0, 1);
        let a = &c.desired.assignments;
        // Installed in range (by this job or another): app goes.
        c.waiting.clear();
        c.not_applicable.clear();
        c.installed = installed(&[("libfoo", "1.2.0")]);
        c.live = c.installed.keys().cloned().collect();
        let d = c.plan().decisions;
        assert_eq!(d[0], Decision::Done(&a[0]));
        assert_eq!(d[1], Decision::Install(&a[1], Why::New));
    }

    #[test]
    fn what_an_installed_package_requires_stays_and_dependents_go_first() {
        let mut c = Case::new(
            vec![
                install("j", "web", "1"),
                assignment("u", JobAction::Uninstall, "libbar", "1"),
            ],
            &[
                ("web", "1"),
                ("viewer", "1"),
                ("libfoo", "1.0.0"),
                ("libbar", "1"),
                ("zlib", "1"),
            ],
        );
        let require = |c: &mut Case, who: &str, what: &str| {
            let r = c.installed.get_mut(who).unwrap();
            r.install.requires.push(caravan_api::v1alpha1::Dependency {
                name: what.into(),
                version: None,
            });
        };
        // viewer (going) requires libfoo and zlib; web (staying) requires zlib and libbar.
        require(&mut c, "viewer", "libfoo");
        require(&mut c, "viewer", "zlib");
        require(&mut c, "web", "zlib");
        require(&mut c, "web", "libbar");
        let p = c.plan();
        assert_eq!(p.removals, ["viewer", "libfoo"]);
        let a = &c.desired.assignments;
        assert_eq!(
            p.decisions[1],
            Decision::Blocked(
                &a[1],
                "not removed: package web installed here requires it".into()
            )
        );
    }

    #[test]
    fn nothing_moves_a_package_out_of_the_range_of_one_that_stays_or_removes_it_first() {
        let mut c = Case::new(
            vec![
                requiring(install("apps", "app", "1"), "libfoo", "^1"),
                install("libs", "libfoo", "2.0.0"),
                assignment("clean", JobAction::Uninstall, "libfoo", "1.4.0"),
            ],
            &[("app", "1"), ("libfoo", "1.4.0")],
        );
        c.installed.get_mut("app").unwrap().install = c.desired.assignments[0].install.clone();
        c.desired.assignments[0].digest = c.installed["app"].digest;
        let a = &c.desired.assignments;
        let d = c.plan().decisions;
        assert_eq!(d[0], Decision::Done(&a[0]));
        assert_eq!(
            d[1],
            Decision::Blocked(
                &a[1],
                "not started: package app installed here requires libfoo ^1".into()
            )
        );
        // (The uninstall loses to the install, and would wait for app too.)
        assert!(matches!(d[2], Decision::Conflict { .. }));
        c.desired.assignments.remove(1);
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions[1],
            Decision::Blocked(
                &a[1],
                "not removed: package app installed here requires it".into()
            )
        );
        // app upgraded by its job to a version that takes libfoo 2: it may go.
        let mut c2 = Case::new(
            vec![
                install("libs", "libfoo", "2.0.0"),
                requiring(install("apps", "app", "2"), "libfoo", "^2"),
            ],
            &[("app", "1"), ("libfoo", "1.4.0")],
        );
        c2.installed.get_mut("app").unwrap().install.requires =
            requiring(install("apps", "app", "1"), "libfoo", "^1")
                .install
                .requires;
        let a = &c2.desired.assignments;
        assert_eq!(c2.plan().decisions[0], Decision::Install(&a[0], Why::New));
    }

    #[test]
    fn an_optional_jobs_dependency_comes_with_the_package_chosen() {
        let mut c = Case::new(
            vec![
                install("extras", "libgfx", "1"),
                requiring(install("extras", "gimp", "2"), "libgfx", "*"),
            ],
            &[],
        );
        for a in c.desired.assignments.iter_mut() {
            a.optional = true;
        }
        c.desired.assignments[0].required_by = vec!["gimp".into()];
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [Decision::Available(&a[0]), Decision::Available(&a[1])]
        );
        assert_eq!(
            crate::choices::offered(&c.desired)
                .map(|a| a.package.as_str())
                .collect::<Vec<_>>(),
            ["gimp"]
        );
        c.choices.install.insert("gimp".into());
        let a = &c.desired.assignments;
        assert_eq!(c.plan().decisions[0], Decision::Install(&a[0], Why::New));
    }

    #[test]
    fn an_optional_package_nobody_chose_holds_back_no_other_job_and_is_not_kept() {
        // Another job installs another version: not queued behind the offer.
        let mut c = Case::new(
            vec![install("extras", "gimp", "2"), install("base", "gimp", "1")],
            &[("tools", "1")],
        );
        c.desired.assignments[0].optional = true;
        let a = &c.desired.assignments;
        assert_eq!(
            c.plan().decisions,
            [
                Decision::Available(&a[0]),
                Decision::Install(&a[1], Why::New)
            ]
        );
        assert_eq!(c.plan().removals, ["tools"]);
    }
}
