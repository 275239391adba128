//! A job's rollout (pure): which of its destinations have the job, batch by
//! batch, and where the rollout stands.
//!
//! - Destinations are taken in an order fixed per job (a hash of the job
//!   and the agent's name), so a batch's members do not depend on the order
//!   agents enrolled in. Batch `i` takes destinations (of its sites, where
//!   it names some) until its size is reached, those of earlier batches
//!   counted; the last takes every one left.
//! - The next batch starts once every destination of the batch under way
//!   finished (succeeded, failed for good, not applicable, expired, or
//!   lost to another job), and `wait` passed.
//! - When the failures of the batch under way reach the threshold (once
//!   enough of it finished), the rollout pauses: no batch starts until
//!   `resume` changes; any change of it goes on with the next batch. (The
//!   last batch does not pause: it holds nobody back.)
//! - A destination that started the job keeps it, whatever the order says
//!   later (an agent enrolling does not take its place): what a rollout
//!   gave is never taken back.
//! - Another version of the packages starts the rollout again.

use std::collections::BTreeSet;

use caravan_api::{
    v1alpha1::{Agent, DistributionJob, RolloutPlan, RolloutStatus, Share},
    wire::Assignment,
    Digest,
};

use super::{
    outcome::{outcome, Outcome},
    Now,
};

/// What one destination has done about the job, for the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing reported about the job's packages.
    NotStarted,
    /// Started and not finished (or failed, and tried again).
    Running,
    Succeeded,
    /// Failed, its retries spent.
    Failed,
    /// Nothing to do: not applicable, expired, or lost to another job.
    Settled,
}

/// What the agent of a destination did about the job's `assignments`.
pub fn progress(agent: Option<&Agent>, assignments: &[Assignment], now: Now) -> Progress {
    let started = agent.and_then(|a| a.status.as_ref()).is_some_and(|s| {
        s.jobs.iter().any(|j| {
            assignments.iter().any(|a| {
                a.job == j.job
                    && a.package == j.package
                    && a.digest == j.digest
                    && a.action == j.action
            })
        })
    });
    match outcome(agent, assignments, now) {
        Outcome::Succeeded => Progress::Succeeded,
        Outcome::Failed(_, _, None) => Progress::Failed,
        Outcome::Failed(..) => Progress::Running,
        Outcome::Downloading | Outcome::Installing => Progress::Running,
        Outcome::Pending | Outcome::Downloaded | Outcome::Deferred if started => Progress::Running,
        Outcome::Pending | Outcome::Downloaded | Outcome::Deferred => Progress::NotStarted,
        Outcome::Expired | Outcome::NotApplicable | Outcome::Conflict(..) | Outcome::Available => {
            Progress::Settled
        }
    }
}

/// One destination of the job.
#[derive(Clone, Debug)]
pub struct Destination<'a> {
    pub agent: &'a str,
    pub site: &'a str,
    pub progress: Progress,
}

/// The rollout's answer.
#[derive(Debug, PartialEq)]
pub struct Gate {
    /// The destinations (agent names) that have the job.
    pub released: BTreeSet<String>,
    pub status: RolloutStatus,
}

/// Where `job`'s rollout (read as `plan`) stands over `destinations` at
/// `now`. `lower` gives a site and every site below it; `revision` names
/// the packages the job has now.
pub fn gate(
    job: &DistributionJob,
    plan: &RolloutPlan,
    destinations: &[Destination],
    lower: impl Fn(&str) -> BTreeSet<String>,
    revision: &str,
    now: Now,
) -> Gate {
    let job_key = format!(
        "{}/{}",
        job.metadata.namespace.as_deref().unwrap_or_default(),
        job.metadata.name.as_deref().unwrap_or_default()
    );
    let mut order: Vec<(Digest, &Destination)> = destinations
        .iter()
        .map(|d| (Digest::of(format!("{job_key}/{}", d.agent).as_bytes()), d))
        .collect();
    // Those that started first: an agent enrolling later never takes
    // their place in a batch.
    order.sort_by_key(|(h, d)| (d.progress == Progress::NotStarted, *h, d.agent));
    let order: Vec<&Destination> = order.into_iter().map(|(_, d)| d).collect();

    // The members of each batch.
    let n = plan.batches.len().max(1);
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    let mut batches: Vec<Vec<&Destination>> = Vec::with_capacity(n);
    for (i, b) in plan.batches.iter().enumerate() {
        let last = i + 1 == n;
        let scope: Option<BTreeSet<String>> =
            (!b.sites.is_empty() && !last).then(|| b.sites.iter().flat_map(|s| lower(s)).collect());
        let pool: Vec<&Destination> = order
            .iter()
            .filter(|d| scope.as_ref().is_none_or(|s| s.contains(d.site)))
            .copied()
            .collect();
        let want = if last {
            pool.len()
        } else {
            b.size.of(pool.len() as u32) as usize
        };
        // A destination with nothing to do (not applicable, lost to
        // another job) is taken but does not count: the batch takes the
        // next, so that it is tried somewhere.
        let counts = |d: &Destination| d.progress != Progress::Settled;
        let mut have = pool
            .iter()
            .filter(|d| taken.contains(d.agent) && counts(d))
            .count();
        let mut members = Vec::new();
        for d in pool {
            if have >= want {
                break;
            }
            if taken.insert(d.agent) {
                members.push(d);
                have += usize::from(counts(d));
            }
        }
        batches.push(members);
    }

    // Where the rollout stands: as the job's status left it, unless the
    // packages changed since.
    let previous = job
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .filter(|r| r.revision == revision);
    let mut st = previous.unwrap_or_else(|| RolloutStatus {
        batch: 1,
        resumed: plan.resume,
        ..Default::default()
    });
    st.batches = n as u32;
    st.batch = st.batch.clamp(1, n as u32);
    st.revision = revision.to_string();
    // Raised: go on. Lowered (a revert in Git): only noted.
    let advance_now = plan.resume > st.resumed;
    st.resumed = plan.resume;
    let mut advance = false;
    if advance_now {
        st.paused = None;
        advance = true;
    }
    loop {
        if std::mem::take(&mut advance) && (st.batch as usize) < n {
            st.batch += 1;
            st.finished_at = None;
        }
        if st.paused.is_some() {
            break;
        }
        let members = &batches[st.batch as usize - 1];
        let count = |f: &dyn Fn(Progress) -> bool| members.iter().filter(|d| f(d.progress)).count();
        let failed = count(&|p| p == Progress::Failed);
        let finished = count(&|p| matches!(p, Progress::Succeeded | Progress::Failed));
        let settled = count(&|p| p == Progress::Settled);
        let done = finished + settled;
        // (Of the members with something to do.)
        let enough = finished >= (plan.min_completed as usize).min(members.len() - settled);
        // (The last batch has everyone left: pausing it holds nobody back.)
        let breached = failed > 0
            && enough
            && (st.batch as usize) < n
            && match plan.failure_threshold {
                Share::Count(c) => failed >= c as usize,
                Share::Percent(p) => failed * 100 >= p as usize * finished,
            };
        if breached {
            st.paused = Some(format!(
                "{failed} of the {finished} finished destinations of batch {} failed (threshold {})",
                st.batch, plan.failure_threshold
            ));
            break;
        }
        if done == members.len() && (st.batch as usize) < n {
            let since = *st.finished_at.get_or_insert(now);
            let next = plan.wait.map(|w| since.checked_add_signed(w));
            if next.is_none_or(|t| t.is_some_and(|t| now >= t)) {
                advance = true;
                continue;
            }
        }
        break;
    }
    let released: BTreeSet<String> = batches[..st.batch as usize]
        .iter()
        .flatten()
        .map(|d| d.agent)
        .chain(
            order
                .iter()
                .filter(|d| d.progress != Progress::NotStarted && d.progress != Progress::Settled)
                .map(|d| d.agent),
        )
        .map(str::to_string)
        .collect();
    st.released = released.len() as u32;
    Gate {
        released,
        status: st,
    }
}

/// The gate of a job whose rollout cannot be read: it stands where the
/// job's status left it, and only the destinations that started keep the
/// job (nothing is taken back, nobody new gets it).
pub fn frozen(job: &DistributionJob, destinations: &[Destination]) -> Gate {
    let released: BTreeSet<String> = destinations
        .iter()
        .filter(|d| !matches!(d.progress, Progress::NotStarted | Progress::Settled))
        .map(|d| d.agent.to_string())
        .collect();
    let mut status = job
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .unwrap_or_default();
    status.released = released.len() as u32;
    Gate { released, status }
}

/// When a job's rollout next starts a batch by itself: a `wait` between
/// batches ending.
pub fn wakes(job: &DistributionJob, plan: &RolloutPlan) -> Option<Now> {
    let st = job.status.as_ref()?.rollout.as_ref()?;
    st.finished_at?
        .checked_add_signed(plan.wait?)
        .filter(|_| st.paused.is_none())
}
