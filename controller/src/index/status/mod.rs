//! Status of jobs, computed from the plan and the agents' reports, and
//! (`artifacts`) of packages and cabinets. No I/O: the engine writes what
//! these return.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::*,
};
use kube::{
    runtime::events::{Event, EventType},
    Resource,
};

use super::{
    name, namespace,
    outcome::{outcome, Outcome},
    plan::JobPlan,
    Now,
};

mod artifacts;

pub use artifacts::*;

/// An Event when an object's `Ready` condition changes between `old` and
/// `new` (or first appears): `up` when it becomes True, a Warning `down`
/// with the condition's message when it becomes False.
pub fn ready_transition(
    old: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    new: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    up: &str,
    down: &str,
) -> Vec<Event> {
    let ready = |cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        cs.iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.status == "True", c.message.clone()))
    };
    let (was, now) = (old.and_then(ready), ready(new));
    match now {
        Some((is, message)) if was.as_ref().map(|w| w.0) != Some(is) => vec![Event {
            type_: if is {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: (if is { up } else { down }).into(),
            note: Some(message),
            action: "Reconcile".into(),
            secondary: None,
        }],
        _ => vec![],
    }
}

/// A package's artifact verified, or unavailable.
pub fn package_events(old: Option<&PackageStatus>, new: &PackageStatus) -> Vec<Event> {
    ready_transition(
        old.map(|o| o.conditions.as_slice()),
        &new.conditions,
        "ArtifactVerified",
        "ArtifactUnavailable",
    )
}

/// A cabinet's store usable, or not.
pub fn cabinet_events(old: Option<&CabinetStatus>, new: &CabinetStatus) -> Vec<Event> {
    ready_transition(
        old.map(|o| o.conditions.as_slice()),
        &new.conditions,
        "CabinetReady",
        "CabinetNotReady",
    )
}

/// A site's relay connected, or lost.
pub fn site_events(old: Option<&SiteStatus>, new: &SiteStatus) -> Vec<Event> {
    ready_transition(
        old.map(|o| o.conditions.as_slice()),
        &new.conditions,
        "RelayConnected",
        "RelayLost",
    )
}

/// An agent let in again (`Approved`) or cut off (`Revoked`), when its
/// `spec.approved` goes from `was` to `now`. A first sight (`was` unknown)
/// is worth nothing: enrollment has its own Event.
pub fn approval_event(was: Option<bool>, now: bool) -> Option<Event> {
    let (type_, reason, note) = match (was?, now) {
        (false, true) => (
            EventType::Normal,
            "Approved",
            "approved: its relay serves it from its next request on",
        ),
        (true, false) => (
            EventType::Warning,
            "Revoked",
            "revoked: its relay turns it away from its next request on; it keeps what it has installed",
        ),
        _ => return None,
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    })
}

/// The Events a job's change of status from `old` to `new` is worth: its
/// rollout pausing, going on (resumed, or a batch started), and the job
/// completing or failing. Each batch's are told apart by their action, so
/// that one batch's Event is not folded into another's.
pub fn job_events(old: Option<&DistributionJobStatus>, new: &DistributionJobStatus) -> Vec<Event> {
    let event = |type_, reason: &str, action: String, note: String| Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action,
        secondary: None,
    };
    let mut events = Vec::new();
    let before = old.and_then(|o| o.rollout.as_ref());
    if let Some(r) = &new.rollout {
        let batch = format!("Batch{}", r.batch);
        let was_paused = before.is_some_and(|b| b.paused.is_some() && b.revision == r.revision);
        match &r.paused {
            Some(why) if !was_paused => events.push(event(
                EventType::Warning,
                "RolloutPaused",
                batch.clone(),
                format!("{why}; raise spec.rollout.resume (caravan job resume) to go on"),
            )),
            None if was_paused => events.push(event(
                EventType::Normal,
                "RolloutResumed",
                batch.clone(),
                format!("resumed: batch {} of {} under way", r.batch, r.batches),
            )),
            _ => {}
        }
        if before.is_some_and(|b| b.revision == r.revision && b.batch < r.batch) {
            events.push(event(
                EventType::Normal,
                "BatchStarted",
                batch,
                format!(
                    "batch {} of {} started: {} of {} destinations have the job",
                    r.batch, r.batches, r.released, new.total
                ),
            ));
        }
    }
    let was = old.map(|o| o.phase);
    if new.phase == JobPhase::Succeeded && was != Some(JobPhase::Succeeded) {
        events.push(event(
            EventType::Normal,
            "Complete",
            "Complete".into(),
            format!("{} destinations succeeded", new.progress),
        ));
    }
    if new.phase == JobPhase::Failed && was != Some(JobPhase::Failed) {
        let first = new
            .failures
            .first()
            .map(|f| {
                format!(
                    "; first: agent {} package {}: {}",
                    f.agent, f.package, f.reason
                )
            })
            .unwrap_or_default();
        events.push(event(
            EventType::Warning,
            "Failed",
            "Fail".into(),
            format!("{} destination(s) failed{first}", new.failed),
        ));
    }
    events
}

/// `text`, cut at `max` bytes (on a character boundary).
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Agents by `(namespace, name)`.
pub type AgentIndex<'a> = HashMap<(&'a str, &'a str), &'a Agent>;

pub fn agent_index(agents: &[Arc<Agent>]) -> AgentIndex<'_> {
    agents
        .iter()
        .map(|a| ((namespace(a.as_ref()), name(a.as_ref())), a.as_ref()))
        .collect()
}

/// The counter a destination adds one to, in its job's status and its
/// site's rollup alike.
enum Tally {
    Succeeded,
    Failed,
    Pending,
    Available,
    Expired,
    NotApplicable,
    Conflict,
}

/// The status of `job`, from its plan and what its target agents reported.
pub fn job_status(
    job: &DistributionJob,
    plan: Option<&JobPlan>,
    agents: &AgentIndex,
    now: Now,
) -> DistributionJobStatus {
    let generation = job.meta().generation;
    let empty = JobPlan::default();
    let plan = plan.unwrap_or(&empty);
    let ns = namespace(job);
    let mut st = DistributionJobStatus {
        observed_generation: generation,
        ..Default::default()
    };
    let mut rollup: BTreeMap<&str, SiteRollup> = BTreeMap::new();
    let mut first_conflict = None;
    for (name, assignments) in &plan.targets {
        let agent = agents.get(&(ns, name.as_str())).copied();
        let site = agent.map_or("", |a| a.spec.site.as_str());
        let r = rollup.entry(site).or_insert_with(|| SiteRollup {
            site: site.to_string(),
            ..Default::default()
        });
        r.total += 1;
        st.total += 1;
        // Each destination counts once in the job and its site (`Tally`),
        // and a pending one also by what it is doing (the job only).
        let tally = match outcome(agent, assignments, now) {
            // Done with what resolved, but not with the job: a package it
            // names does not exist (yet).
            Outcome::Succeeded if !plan.unresolved.is_empty() => {
                match job.spec.schedule.as_ref().is_some_and(|s| s.expired(now)) {
                    true => Tally::Expired,
                    false => Tally::Pending,
                }
            }
            Outcome::Succeeded => Tally::Succeeded,
            Outcome::Failed(package, reason, retry_at) => {
                st.retrying += u32::from(retry_at.is_some());
                if st.failures.len() < MAX_FAILURES_LISTED {
                    st.failures.push(DestinationFailure {
                        agent: name.clone(),
                        site: site.to_string(),
                        package,
                        reason: cut(reason, MAX_FAILURE_REASON_BYTES),
                        retry_at,
                    });
                }
                Tally::Failed
            }
            Outcome::Pending => Tally::Pending,
            Outcome::Downloaded => {
                st.downloaded += 1;
                Tally::Pending
            }
            Outcome::Deferred => {
                st.deferred += 1;
                Tally::Pending
            }
            Outcome::Downloading => {
                st.downloading += 1;
                Tally::Pending
            }
            Outcome::Installing => {
                st.installing += 1;
                Tally::Pending
            }
            Outcome::Available => Tally::Available,
            Outcome::Expired => Tally::Expired,
            Outcome::NotApplicable => Tally::NotApplicable,
            Outcome::Conflict(package, winner) => {
                first_conflict.get_or_insert((name.clone(), package, winner));
                Tally::Conflict
            }
        };
        let (job_count, site_count) = match tally {
            Tally::Succeeded => (&mut st.succeeded, &mut r.succeeded),
            Tally::Failed => (&mut st.failed, &mut r.failed),
            Tally::Pending => (&mut st.pending, &mut r.pending),
            Tally::Available => (&mut st.available, &mut r.available),
            Tally::Expired => (&mut st.expired, &mut r.expired),
            Tally::NotApplicable => (&mut st.not_applicable, &mut r.not_applicable),
            Tally::Conflict => (&mut st.conflict, &mut r.conflict),
        };
        *job_count += 1;
        *site_count += 1;
    }
    st.sites = rollup.into_values().collect();
    st.rollout = plan.rollout.as_ref().map(|g| g.status.clone());
    let paused = st.rollout.as_ref().and_then(|r| r.paused.clone());
    let applicable = st.total - st.not_applicable;
    st.progress = format!("{}/{applicable}", st.succeeded);
    let settled = st.succeeded + st.failed + st.conflict + st.expired + st.available;
    let all_settled = st.total > 0 && settled == applicable;
    st.phase = if job.spec.suspend {
        JobPhase::Suspended
    } else if st.total > 0 && st.succeeded == applicable {
        JobPhase::Succeeded
    } else if st.total > 0 && settled == applicable && st.failed > 0 {
        JobPhase::Failed
    } else if st.total > 0 && settled == applicable && st.expired > 0 {
        JobPhase::Expired
    } else if st.total > 0 && settled == applicable && st.available > 0 {
        JobPhase::Available
    } else if st.total > 0 && settled == applicable {
        JobPhase::Conflict
    } else if paused.is_some() {
        JobPhase::Paused
    } else if settled > 0 {
        JobPhase::Progressing
    } else {
        JobPhase::Pending
    };

    let mut conds = Vec::new();
    conds.push(match plan.problems.first() {
        None => conditions::new(
            conditions::RESOLVED_REFS,
            true,
            reasons::RESOLVED,
            "all references resolved",
            generation,
        ),
        Some((reason, _)) => conditions::new(
            conditions::RESOLVED_REFS,
            false,
            reason,
            plan.problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            generation,
        ),
    });
    if st.total == 0 && plan.problems.is_empty() {
        conds.push(conditions::new(
            conditions::READY,
            false,
            reasons::NO_DESTINATIONS,
            "no enrolled agent matches the destinations",
            generation,
        ));
    } else if let Some((agent, package, winner)) = &first_conflict {
        conds.push(conditions::new(
            conditions::READY,
            false,
            reasons::CONFLICT,
            format!(
                "{} destination(s) lose a package to a job that takes precedence; first: agent \
                 {agent} has package {package} from job {winner}",
                st.conflict
            ),
            generation,
        ));
    } else {
        // (An optional job is done once its packages are offered.)
        let ok = matches!(st.phase, JobPhase::Succeeded | JobPhase::Available);
        conds.push(conditions::new(
            conditions::READY,
            ok,
            if ok {
                reasons::SUCCEEDED
            } else {
                reasons::PROGRESSING
            },
            format!(
                "{} of {applicable} destinations succeeded, {} failed ({} to be tried again), {} \
                 not applicable{}{}",
                st.succeeded,
                st.failed,
                st.retrying,
                st.not_applicable,
                [
                    (st.expired, "expired at the deadline"),
                    (st.available, "with the packages on offer"),
                    (st.deferred, "put off by their user"),
                ]
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, what)| format!(", {n} {what}"))
                .collect::<String>(),
                match job
                    .spec
                    .schedule
                    .as_ref()
                    .map(|s| { (s.not_before.filter(|t| now < *t), !s.windows.is_empty()) })
                {
                    Some((Some(t), windows)) => format!(
                        "; installs start at {}{} ({} downloaded ahead)",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        if windows {
                            ", in maintenance windows"
                        } else {
                            ""
                        },
                        st.downloaded
                    ),
                    Some((None, true)) => format!(
                        "; installs run in maintenance windows ({} downloaded, waiting for one)",
                        st.downloaded
                    ),
                    _ => String::new(),
                }
            ),
            generation,
        ));
    }
    conds.push(conditions::new(
        conditions::COMPLETE,
        matches!(st.phase, JobPhase::Succeeded | JobPhase::Available),
        if matches!(st.phase, JobPhase::Succeeded | JobPhase::Available) {
            reasons::SUCCEEDED
        } else {
            reasons::PROGRESSING
        },
        format!("{}/{applicable} destinations succeeded", st.succeeded),
        generation,
    ));
    conds.push(match (&paused, job.spec.suspend) {
        (_, true) => conditions::new(
            conditions::PAUSED,
            true,
            reasons::SUSPENDED,
            "the job is suspended (spec.suspend): nobody new gets it",
            generation,
        ),
        (Some(why), false) => conditions::new(
            conditions::PAUSED,
            true,
            reasons::FAILURE_THRESHOLD,
            format!("{why}; the next batch waits for spec.rollout.resume to be raised (caravan job resume)"),
            generation,
        ),
        (None, false) => conditions::new(
            conditions::PAUSED,
            false,
            reasons::PROGRESSING,
            "the rollout is not paused",
            generation,
        ),
    });
    let progressing = !all_settled && paused.is_none() && !job.spec.suspend;
    conds.push(conditions::new(
        conditions::PROGRESSING,
        progressing,
        match () {
            _ if progressing => reasons::PROGRESSING,
            _ if job.spec.suspend => reasons::SUSPENDED,
            _ if paused.is_some() => reasons::FAILURE_THRESHOLD,
            _ => reasons::FINISHED,
        },
        match &st.rollout {
            Some(r) => format!(
                "batch {} of {}: {} of {} destinations have the job",
                r.batch, r.batches, r.released, st.total
            ),
            None => format!("{} of {} destinations settled", settled, st.total),
        },
        generation,
    ));
    conds.push(match st.failures.first() {
        None => conditions::new(
            conditions::FAILED,
            false,
            reasons::SUCCEEDED,
            "no destination failed",
            generation,
        ),
        Some(f) => conditions::new(
            conditions::FAILED,
            true,
            reasons::DESTINATIONS_FAILED,
            format!(
                "{} destination(s) failed; first: agent {} package {}: {}",
                st.failed, f.agent, f.package, f.reason
            ),
            generation,
        ),
    });
    st.conditions = conds;
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_revoked_or_approved_again_is_worth_an_event_and_a_first_sight_is_not() {
        let reason = |was, now| approval_event(was, now).map(|e| (e.type_, e.reason));
        assert_eq!(
            reason(Some(true), false),
            Some((EventType::Warning, "Revoked".to_string()))
        );
        assert_eq!(
            reason(Some(false), true),
            Some((EventType::Normal, "Approved".to_string()))
        );
        for (was, now) in [
            (None, true),
            (None, false),
            (Some(true), true),
            (Some(false), false),
        ] {
            assert_eq!(reason(was, now), None, "{was:?} -> {now}");
        }
    }

    fn ready(
        status: bool,
        message: &str,
    ) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        vec![conditions::new(
            conditions::READY,
            status,
            "R",
            message,
            Some(1),
        )]
    }

    #[test]
    fn a_ready_condition_that_changes_is_an_event_and_one_that_stays_is_not() {
        let up = ready_transition(None, &ready(true, "relay is connected"), "Up", "Down");
        assert_eq!((up.len(), up[0].reason.as_str()), (1, "Up"));
        assert_eq!(up[0].type_, EventType::Normal);
        let down = ready_transition(
            Some(&ready(true, "")),
            &ready(false, "relay silent"),
            "Up",
            "Down",
        );
        assert_eq!(
            (down[0].reason.as_str(), down[0].type_),
            ("Down", EventType::Warning)
        );
        assert_eq!(down[0].note.as_deref(), Some("relay silent"));
        assert!(
            ready_transition(Some(&ready(true, "a")), &ready(true, "b"), "Up", "Down").is_empty()
        );
        assert!(ready_transition(Some(&ready(true, "a")), &[], "Up", "Down").is_empty());
    }
}
