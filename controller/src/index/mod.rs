//! The distribution index: from the cached objects (and where each artifact
//! stands in the store) it computes, with no I/O,
//! - every site's desired state, as its relay serves it to each agent
//!   ([`desired`]), served to relays revision by revision ([`feed`]), and
//! - the status of every job, package and cabinet ([`status`]).
//!
//! The relations it follows:
//!
//! ```text
//!   DistributionJob ──packages──▶ Package ──cabinet──▶ Cabinet (store, trusted keys)
//!         │                          └─ artifact digest ─▶ blob in the store
//!         └─destinations─┬─ sites (includeLower: every site below) ─┐
//!                        ├─ agentSelector (selector)                 ├─▶ Agent ──site──▶ Site ──parent──▶ Site …
//!                        └─ agents (by name)                         ┘
//! ```
//!
//! It is owned by one task, the engine (`engine.rs`), which feeds it
//! the caches after every burst of changes, publishes the desired states on
//! a watch channel and writes the statuses. Everything here is a plain
//! function of plain values, tested as such (`tests.rs`).

pub mod desired;
pub mod feed;
mod outcome;
pub mod plan;
mod requires;
mod rollout;
pub mod status;

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, sync::Arc};

use caravan_api::v1alpha1::*;
use kube::Resource;

pub use desired::{AgentPlan, Assigned, Unsigned};
pub use feed::{DesiredIndex, SignedDocument, SignedPart, SiteFeed};
pub use plan::{JobPlan, Plan};
pub use status::{ArtifactState, Artifacts};

/// The time the index is computed for.
pub type Now = chrono::DateTime<chrono::Utc>;

/// A namespaced object by `(namespace, name)`.
pub type ObjectKey = (String, String);
/// A site by `(namespace, name)`.
pub type SiteKey = ObjectKey;

pub fn key_of<K: Resource>(o: &K) -> ObjectKey {
    (namespace(o).to_string(), name(o).to_string())
}

/// An object's namespace, borrowed (empty if it has none).
pub fn namespace<K: Resource>(o: &K) -> &str {
    o.meta().namespace.as_deref().unwrap_or_default()
}

/// An object's name, borrowed.
pub fn name<K: Resource>(o: &K) -> &str {
    o.meta().name.as_deref().unwrap_or_default()
}

/// A map by namespace and name whose entries are found, taken and put back
/// without copying either: what the engine keeps per agent from one
/// computation to the next (each computation moves into a new map what is
/// still there, and what is gone stays behind).
#[derive(Debug)]
pub struct ByName<V>(HashMap<String, HashMap<String, V>>);

impl<V> Default for ByName<V> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<V> ByName<V> {
    pub fn get(&self, ns: &str, name: &str) -> Option<&V> {
        self.0.get(ns)?.get(name)
    }

    /// The entry of `name` in `ns`, taken out with its name.
    pub fn take(&mut self, ns: &str, name: &str) -> Option<(String, V)> {
        self.0.get_mut(ns)?.remove_entry(name)
    }

    pub fn insert(&mut self, ns: &str, name: String, value: V) {
        match self.0.get_mut(ns) {
            Some(names) => drop(names.insert(name, value)),
            None => drop(
                self.0
                    .insert(ns.to_string(), HashMap::from([(name, value)])),
            ),
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.values().flat_map(|names| names.values())
    }
}

/// Everything the index reads.
pub struct Inputs<'a> {
    pub sites: &'a [Arc<Site>],
    pub agents: &'a [Arc<Agent>],
    pub jobs: &'a [Arc<DistributionJob>],
    pub packages: &'a [Arc<Package>],
    pub cabinets: &'a [Arc<Cabinet>],
    /// Where each package's artifact stands in the store.
    pub artifacts: &'a Artifacts,
    /// Why the registries of `oci` cabinets cannot be used, where they cannot.
    pub unreachable: &'a status::Unreachable,
    /// The time to compute for (schedules, deadlines).
    pub now: Now,
}

/// Everything the index computes.
pub struct Outputs {
    /// Every site's desired state, to be signed (by the `trust` module).
    pub desired: Unsigned,
    pub jobs: Vec<(Arc<DistributionJob>, DistributionJobStatus)>,
    pub packages: Vec<(Arc<Package>, PackageStatus)>,
    pub cabinets: Vec<(Arc<Cabinet>, CabinetStatus)>,
}

pub fn compute(inputs: &Inputs) -> Outputs {
    let Inputs {
        sites,
        agents,
        jobs,
        packages,
        cabinets,
        artifacts,
        unreachable,
        now,
    } = *inputs;
    let mut plan = Plan::compute(sites, agents, jobs, packages, cabinets, now);
    let agent_index = status::agent_index(agents);
    let jobs_status = jobs
        .iter()
        .map(|job| {
            let st =
                status::job_status(job, plan.jobs.get(&key_of(job.as_ref())), &agent_index, now);
            (job.clone(), st)
        })
        .collect();
    Outputs {
        desired: desired::desired(
            sites,
            jobs,
            &mut plan,
            &desired::sources(packages, cabinets, artifacts),
        ),
        jobs: jobs_status,
        packages: packages
            .iter()
            .map(|p| (p.clone(), status::package_status(p, cabinets, artifacts)))
            .collect(),
        cabinets: cabinets
            .iter()
            .map(|c| {
                let st = status::cabinet_status(c, packages, artifacts, unreachable);
                (c.clone(), st)
            })
            .collect(),
    }
}

/// The next time after `now` a job's schedule starts or ends (its
/// `notBefore` or `deadline`), or its rollout's wait between batches ends:
/// the status changes then without any object changing, so the engine
/// recomputes at that time.
pub fn next_boundary(jobs: &[Arc<DistributionJob>], now: Now) -> Option<Now> {
    jobs.iter()
        .flat_map(|j| {
            let schedule = j.spec.schedule.as_ref();
            let wait = Rollout::plan(j.spec.rollout.as_ref())
                .ok()
                .and_then(|p| rollout::wakes(j, &p));
            [
                schedule.and_then(|s| s.not_before),
                schedule.and_then(|s| s.deadline),
                wait,
            ]
        })
        .flatten()
        .filter(|t| *t > now)
        .min()
}
