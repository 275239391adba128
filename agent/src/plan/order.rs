//! The order rules of the plan: a job's packages in their order (one not
//! there stops the rest), what packages require (installed first, never
//! removed or moved out of range under them) and removals dependents first.

use std::collections::BTreeMap;

use caravan_api::{v1alpha1::JobAction, wire::Assignment};

use super::{assignment, key, Decision, Situation, Why};
use crate::state::Installed;

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
pub(super) fn removal_order<'a>(mut unwanted: Vec<&'a str>, installed: &Installed) -> Vec<&'a str> {
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
pub(super) fn block(
    decisions: &mut [Decision<'_>],
    s: &Situation,
    wanted: &BTreeMap<&str, &Assignment>,
) {
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
