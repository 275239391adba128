//! Where one destination stands for one job, from what its agent reported
//! (pure): the job's status counts these, and its rollout waits for them.

use caravan_api::{
    v1alpha1::Agent,
    wire::{Assignment, AssignmentPhase},
};

use super::Now;

/// Where one target agent stands for one job.
pub enum Outcome {
    Succeeded,
    /// (package, reason, when it is tried again if it is).
    Failed(String, String, Option<String>),
    Pending,
    /// Pending, with every package left downloaded, waiting for `notBefore`.
    Downloaded,
    /// Pending: the endpoint's user put an install off.
    Deferred,
    /// Pending, a package downloading.
    Downloading,
    /// Pending, a package installing (or being removed).
    Installing,
    /// Settled, with optional packages on offer and not chosen.
    Available,
    /// Not done by the deadline.
    Expired,
    /// Every package is for another OS or architecture.
    NotApplicable,
    /// Another job that takes precedence has a package: (package, that job).
    Conflict(String, String),
}

pub fn outcome(agent: Option<&Agent>, assignments: &[Assignment], now: Now) -> Outcome {
    let reported = agent
        .and_then(|a| a.status.as_ref())
        .map(|s| s.jobs.as_slice())
        .unwrap_or_default();
    let (mut done, mut not_applicable, mut lost, mut expired, mut downloaded) = (0, 0, 0, 0, 0);
    let (mut available, mut deferred, mut downloading, mut installing) = (0, 0, 0, 0);
    let mut conflict = None;
    for a in assignments {
        // Another job has this package here: nothing to wait for.
        if let Some(winner) = &a.superseded_by {
            lost += 1;
            conflict.get_or_insert_with(|| (a.package.clone(), winner.clone()));
            continue;
        }
        let state = reported.iter().find(|s| {
            s.job == a.job && s.package == a.package && s.digest == a.digest && s.action == a.action
        });
        match state.map(|s| (s.phase, &s.message)) {
            Some((AssignmentPhase::Succeeded, _)) => done += 1,
            Some((AssignmentPhase::NotApplicable, _)) => not_applicable += 1,
            Some((AssignmentPhase::Failed, msg)) => {
                let retry_at = state.and_then(|s| s.retry_at.clone());
                return Outcome::Failed(a.package.clone(), msg.clone(), retry_at);
            }
            // (Reported before a deadline was moved later: not expired now.)
            Some((AssignmentPhase::Expired, _)) if a.schedule.expired(now) => expired += 1,
            // Started before the deadline: it finishes.
            Some((AssignmentPhase::Installing | AssignmentPhase::Removing, _)) => installing += 1,
            // Not started, and too late to (whether the agent said so yet or not).
            _ if a.schedule.expired(now) => expired += 1,
            Some((AssignmentPhase::Downloaded, _)) => downloaded += 1,
            Some((AssignmentPhase::Available, _)) => available += 1,
            Some((AssignmentPhase::Deferred, _)) => deferred += 1,
            Some((AssignmentPhase::Downloading, _)) => downloading += 1,
            _ => {}
        }
    }
    let unsettled = assignments.len() - done - not_applicable - lost - expired - available;
    if unsettled > 0 && installing > 0 {
        Outcome::Installing
    } else if unsettled > 0 && downloading > 0 {
        Outcome::Downloading
    } else if unsettled > 0 && deferred > 0 {
        Outcome::Deferred
    } else if unsettled > 0 && unsettled == downloaded {
        Outcome::Downloaded
    } else if unsettled > 0 {
        Outcome::Pending
    } else if expired > 0 {
        Outcome::Expired
    } else if let Some((package, winner)) = conflict {
        Outcome::Conflict(package, winner)
    } else if available > 0 {
        Outcome::Available
    } else if !assignments.is_empty() && not_applicable == assignments.len() {
        Outcome::NotApplicable
    } else {
        Outcome::Succeeded
    }
}
