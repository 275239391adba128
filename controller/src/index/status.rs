//! Status of jobs, packages and cabinets, computed from the plan, the
//! agents' reports and where each artifact stands. No I/O: the engine
//! writes what these return.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use caravan_api::{
    conditions::{self, reasons},
    signing,
    v1alpha1::*,
    wire::{Assignment, AssignmentPhase},
};
use kube::{Resource, ResourceExt};

use super::{key_of, plan::JobPlan, ObjectKey};

/// The time the status is computed for.
pub type Now = chrono::DateTime<chrono::Utc>;

/// Where one target agent stands for one job.
enum Outcome {
    Succeeded,
    /// (package, reason, when it is tried again if it is).
    Failed(String, String, Option<String>),
    Pending,
    /// Pending, with every package left downloaded, waiting for `notBefore`.
    Downloaded,
    /// Not done by the deadline.
    Expired,
    /// Every package is for another OS or architecture.
    NotApplicable,
    /// Another job that takes precedence has a package: (package, that job).
    Conflict(String, String),
}

fn outcome(agent: Option<&Agent>, assignments: &[Assignment], now: Now) -> Outcome {
    let reported = agent
        .and_then(|a| a.status.as_ref())
        .map(|s| s.jobs.as_slice())
        .unwrap_or_default();
    let (mut done, mut not_applicable, mut lost, mut expired, mut downloaded) = (0, 0, 0, 0, 0);
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
            Some((AssignmentPhase::Installing | AssignmentPhase::Removing, _)) => {}
            // Not started, and too late to (whether the agent said so yet or not).
            _ if a.schedule.expired(now) => expired += 1,
            Some((AssignmentPhase::Downloaded, _)) => downloaded += 1,
            _ => {}
        }
    }
    let unsettled = assignments.len() - done - not_applicable - lost - expired;
    if unsettled > 0 && unsettled == downloaded {
        Outcome::Downloaded
    } else if unsettled > 0 {
        Outcome::Pending
    } else if expired > 0 {
        Outcome::Expired
    } else if let Some((package, winner)) = conflict {
        Outcome::Conflict(package, winner)
    } else if !assignments.is_empty() && not_applicable == assignments.len() {
        Outcome::NotApplicable
    } else {
        Outcome::Succeeded
    }
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
pub type AgentIndex<'a> = HashMap<ObjectKey, &'a Agent>;

pub fn agent_index(agents: &[Arc<Agent>]) -> AgentIndex<'_> {
    agents
        .iter()
        .map(|a| (key_of(a.as_ref()), a.as_ref()))
        .collect()
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
    let ns = job.namespace();
    let mut st = DistributionJobStatus {
        observed_generation: generation,
        ..Default::default()
    };
    let mut rollup: BTreeMap<String, SiteRollup> = BTreeMap::new();
    let mut first_conflict = None;
    for (name, assignments) in &plan.targets {
        let agent = agents
            .get(&(ns.clone().unwrap_or_default(), name.clone()))
            .copied();
        let site = agent.map(|a| a.spec.site.clone()).unwrap_or_default();
        let r = rollup.entry(site.clone()).or_insert_with(|| SiteRollup {
            site: site.clone(),
            ..Default::default()
        });
        r.total += 1;
        st.total += 1;
        match outcome(agent, assignments, now) {
            // Done with what resolved, but not with the job: a package it
            // names does not exist (yet).
            Outcome::Succeeded if !plan.unresolved.is_empty() => {
                let past = job.spec.schedule.as_ref().is_some_and(|s| s.expired(now));
                if past {
                    r.expired += 1;
                    st.expired += 1;
                } else {
                    r.pending += 1;
                    st.pending += 1;
                }
            }
            Outcome::Succeeded => {
                r.succeeded += 1;
                st.succeeded += 1;
            }
            Outcome::Failed(package, reason, retry_at) => {
                r.failed += 1;
                st.failed += 1;
                st.retrying += u32::from(retry_at.is_some());
                if st.failures.len() < MAX_FAILURES_LISTED {
                    st.failures.push(DestinationFailure {
                        agent: name.clone(),
                        site,
                        package,
                        reason: cut(reason, MAX_FAILURE_REASON_BYTES),
                        retry_at,
                    });
                }
            }
            Outcome::Pending => {
                r.pending += 1;
                st.pending += 1;
            }
            Outcome::Downloaded => {
                r.pending += 1;
                st.pending += 1;
                st.downloaded += 1;
            }
            Outcome::Expired => {
                r.expired += 1;
                st.expired += 1;
            }
            Outcome::NotApplicable => {
                r.not_applicable += 1;
                st.not_applicable += 1;
            }
            Outcome::Conflict(package, winner) => {
                r.conflict += 1;
                st.conflict += 1;
                first_conflict.get_or_insert((name.clone(), package, winner));
            }
        }
    }
    st.sites = rollup.into_values().collect();
    let applicable = st.total - st.not_applicable;
    st.progress = format!("{}/{applicable}", st.succeeded);
    let settled = st.succeeded + st.failed + st.conflict + st.expired;
    st.phase = if job.spec.suspend {
        JobPhase::Suspended
    } else if st.total > 0 && st.succeeded == applicable {
        JobPhase::Succeeded
    } else if st.total > 0 && settled == applicable && st.failed > 0 {
        JobPhase::Failed
    } else if st.total > 0 && settled == applicable && st.expired > 0 {
        JobPhase::Expired
    } else if st.total > 0 && settled == applicable {
        JobPhase::Conflict
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
        let ok = st.phase == JobPhase::Succeeded;
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
                match st.expired {
                    0 => String::new(),
                    n => format!(", {n} expired at the deadline"),
                },
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
        st.phase == JobPhase::Succeeded,
        if st.phase == JobPhase::Succeeded {
            reasons::SUCCEEDED
        } else {
            reasons::PROGRESSING
        },
        format!("{}/{applicable} destinations succeeded", st.succeeded),
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

/// Where a package's artifact stands in the controller's store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactState {
    /// In the store, this many bytes.
    Stored(u64),
    /// Being fetched from its `http` cabinet.
    Fetching,
    /// The last fetch from its `http` cabinet failed (tried again shortly).
    FetchFailed(String),
    /// Not in the store.
    Missing,
}

/// Where each package's artifact stands, by package (two packages of one
/// digest in different cabinets stand apart: one may be fetched, the other pushed).
pub type Artifacts = HashMap<ObjectKey, ArtifactState>;

/// The status of package `p`: its artifact (present, of the declared size)
/// and its signatures (checked against the keys its cabinet trusts).
pub fn package_status(
    p: &Package,
    cabinets: &[Arc<Cabinet>],
    artifacts: &Artifacts,
) -> PackageStatus {
    let generation = p.meta().generation;
    let cabinet = cabinets
        .iter()
        .find(|c| c.namespace() == p.namespace() && c.name_any() == p.spec.cabinet);
    let digest = &p.spec.artifact.digest;
    let state = artifacts.get(&key_of(p)).unwrap_or(&ArtifactState::Missing);
    let artifact = match (cabinet, state) {
        (None, _) => Err((
            reasons::UNKNOWN_CABINET,
            format!("cabinet {} not found", p.spec.cabinet),
        )),
        (Some(c), ArtifactState::Stored(size)) if *size == p.spec.artifact.size => {
            Ok(match c.spec.store.artifact_url(digest) {
                Some(url) => format!("artifact fetched from {url}, size and digest verified"),
                None => format!("artifact {digest} stored"),
            })
        }
        (Some(_), ArtifactState::Stored(size)) => Err((
            reasons::ARTIFACT_MISSING,
            format!(
                "stored artifact is {size} bytes, manifest says {}",
                p.spec.artifact.size
            ),
        )),
        (Some(c), ArtifactState::Fetching) => Err((
            reasons::ARTIFACT_FETCHING,
            format!(
                "fetching {}",
                c.spec.store.artifact_url(digest).unwrap_or_default()
            ),
        )),
        (Some(_), ArtifactState::FetchFailed(message)) => {
            Err((reasons::ARTIFACT_UNAVAILABLE, message.clone()))
        }
        (Some(_), ArtifactState::Missing) => Err((
            reasons::ARTIFACT_MISSING,
            format!(
                "artifact {digest} is not in cabinet {}; push it with `caravan package push`",
                p.spec.cabinet
            ),
        )),
    };
    let mut conds = Vec::new();
    // Signatures are checked against the keys the cabinet trusts.
    let signed = cabinet
        .filter(|c| !c.spec.trusted_keys.is_empty() || c.spec.require_signatures)
        .map(|c| {
            let keys: Vec<_> = c
                .spec
                .trusted_keys
                .iter()
                .filter_map(|k| signing::parse_public(&k.public_key).ok())
                .collect();
            signing::verify(
                &keys,
                &p.spec.signatures,
                &signing::Signed::of_spec(&p.spec),
            )
        });
    if let Some(result) = &signed {
        conds.push(match result {
            Ok(key) => conditions::new(
                conditions::SIGNED,
                true,
                reasons::SIGNATURE_VERIFIED,
                format!("signed by trusted key {key}"),
                generation,
            ),
            Err(e) => conditions::new(
                conditions::SIGNED,
                false,
                reasons::SIGNATURE_INVALID,
                e.to_string(),
                generation,
            ),
        });
    }
    let require = cabinet.is_some_and(|c| c.spec.require_signatures);
    let ready = match (&artifact, &signed) {
        (Err((reason, msg)), _) => {
            conditions::new(conditions::READY, false, reason, msg.clone(), generation)
        }
        (Ok(_), Some(Err(e))) if require => conditions::new(
            conditions::READY,
            false,
            reasons::SIGNATURE_INVALID,
            format!(
                "cabinet {} requires a trusted signature: {e}",
                p.spec.cabinet
            ),
            generation,
        ),
        (Ok(msg), _) => conditions::new(
            conditions::READY,
            true,
            reasons::ARTIFACT_AVAILABLE,
            msg.clone(),
            generation,
        ),
    };
    conds.insert(0, ready);
    PackageStatus {
        observed_generation: generation,
        artifact_available: artifact.is_ok(),
        conditions: conds,
    }
}

/// The status of cabinet `c`: its packages and their bytes, and whether
/// the store works: the built-in store always does; an `http` store is
/// not Ready while fetching an artifact from it fails.
pub fn cabinet_status(
    c: &Cabinet,
    packages: &[Arc<Package>],
    artifacts: &Artifacts,
) -> CabinetStatus {
    let generation = c.meta().generation;
    let mine: Vec<_> = packages
        .iter()
        .filter(|p| p.namespace() == c.namespace() && p.spec.cabinet == c.name_any())
        .collect();
    let ready = match (c.spec.store.type_, c.spec.store.url.as_deref()) {
        (StoreType::Http, url) => {
            let url = url.unwrap_or_default();
            let state = |p: &Package| artifacts.get(&key_of(p));
            let fetched = mine
                .iter()
                .filter(|p| matches!(state(p), Some(ArtifactState::Stored(_))))
                .count();
            let failed = mine.iter().find_map(|p| match state(p) {
                Some(ArtifactState::FetchFailed(m)) => Some(m),
                _ => None,
            });
            let counts = format!("{fetched} of {} artifacts fetched and verified", mine.len());
            match failed {
                None => conditions::new(
                    conditions::READY,
                    true,
                    reasons::SUCCEEDED,
                    format!("http store {url}: {counts}"),
                    generation,
                ),
                Some(m) => conditions::new(
                    conditions::READY,
                    false,
                    reasons::ARTIFACT_UNAVAILABLE,
                    format!("http store {url}: {counts}; {m}"),
                    generation,
                ),
            }
        }
        (StoreType::Builtin, _) => conditions::new(
            conditions::READY,
            true,
            reasons::SUCCEEDED,
            "built-in store available",
            generation,
        ),
    };
    CabinetStatus {
        observed_generation: generation,
        packages: mine.len() as u32,
        bytes: mine.iter().map(|p| p.spec.artifact.size).sum(),
        conditions: vec![ready],
    }
}
