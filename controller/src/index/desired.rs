//! Every site's desired state, as served to its relay: what each of its
//! agents must have, the blobs of the jobs aimed at it (prestaged whether
//! or not agents have enrolled) and the blobs of the sites below it (whose
//! relays fetch them from this one, so each blob crosses each link once).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use caravan_api::{
    v1alpha1::{Cabinet, DistributionJob, Package, Site},
    wire::{AgentDesired, BlobSource, SiteDesired},
    Digest,
};
use kube::ResourceExt;

use super::{
    key_of,
    plan::Plan,
    status::{ArtifactState, Artifacts},
    SiteKey,
};

/// Every site's desired state, its agents' parts not signed yet.
pub type Unsigned = HashMap<SiteKey, SiteDesired<AgentDesired>>;

/// Builds every site's document from the plan (whose per-site agent
/// states it takes); top-level sites are told which blobs to fetch from a
/// registry (`sources`).
pub fn desired(
    sites: &[Arc<Site>],
    jobs: &[Arc<DistributionJob>],
    plan: &mut Plan,
    sources: &HashMap<Digest, BlobSource>,
) -> Unsigned {
    let mut desired: Unsigned = sites
        .iter()
        .map(|s| {
            let key = key_of(s.as_ref());
            let agents = plan.by_site.remove(&key).unwrap_or_default();
            let d = SiteDesired {
                site: s.name_any(),
                blobs: blobs_of(&agents),
                agents,
                agent_keys: plan.agent_keys.remove(&key).unwrap_or_default(),
                ..Default::default()
            };
            (key, d)
        })
        .collect();
    // The blobs of jobs aimed at a site are prestaged there, agents or not.
    for job in jobs.iter().filter(|j| !j.spec.suspend) {
        let key = key_of(job.as_ref());
        let Some(jp) = plan.jobs.get(&key) else {
            continue;
        };
        for site in &jp.sites {
            if let Some(d) = desired.get_mut(&(key.0.clone(), site.clone())) {
                d.prestage.extend(jp.digests.iter().copied());
            }
        }
    }
    for d in desired.values_mut() {
        d.prestage.sort();
        d.prestage.dedup();
    }
    // Each site's relay also serves the blobs of every site below it.
    let parents: HashMap<SiteKey, SiteKey> = sites
        .iter()
        .filter_map(|s| Some((key_of(s.as_ref()), (s.namespace()?, s.spec.parent.clone()?))))
        .collect();
    let mut lower: HashMap<SiteKey, BTreeSet<Digest>> = HashMap::new();
    for (key, d) in &desired {
        let mut seen = BTreeSet::from([key.clone()]);
        let mut at = key;
        // Up the chain of parents (a cycle stops where it closes).
        while let Some(parent) = parents.get(at).filter(|p| seen.insert((*p).clone())) {
            let own = d.blobs.iter().chain(&d.prestage);
            lower.entry(parent.clone()).or_default().extend(own);
            at = parent;
        }
    }
    for (key, digests) in lower {
        if let Some(d) = desired.get_mut(&key) {
            d.lower = digests.into_iter().collect();
        }
    }
    // Relays of top-level sites fetch from the registry what its cabinet
    // says relays fetch; those below fetch it from them.
    for (_, d) in desired
        .iter_mut()
        .filter(|(k, _)| !parents.contains_key(*k))
    {
        d.sources = d
            .all_digests()
            .filter_map(|digest| Some((*digest, sources.get(digest)?.clone())))
            .collect();
    }
    desired
}

/// Where relays fetch the artifacts of `oci` cabinets whose layers come from
/// relays: each package's repository, for the artifacts verified there.
pub fn sources(
    packages: &[Arc<Package>],
    cabinets: &[Arc<Cabinet>],
    artifacts: &Artifacts,
) -> HashMap<Digest, BlobSource> {
    packages
        .iter()
        .filter(|p| {
            matches!(
                artifacts.get(&key_of(p.as_ref())),
                Some(ArtifactState::InRegistry(_))
            )
        })
        .filter_map(|p| {
            let c = cabinets
                .iter()
                .find(|c| c.namespace() == p.namespace() && c.name_any() == p.spec.cabinet)?;
            let store = &c.spec.store;
            let source = BlobSource {
                repository: format!(
                    "{}/{}",
                    store.repository.as_deref()?.trim_end_matches('/'),
                    p.spec.name
                ),
                size: p.spec.artifact.size,
                ca_bundle: store.ca_bundle.clone(),
            };
            Some((p.spec.artifact.digest, source))
        })
        .collect()
}

/// The blobs of a site's agents, for the relay (which does not open the
/// signed documents to know what to keep).
fn blobs_of(agents: &BTreeMap<String, AgentDesired>) -> Vec<Digest> {
    let mut blobs: Vec<Digest> = agents
        .values()
        .flat_map(|a| &a.assignments)
        .map(|a| a.digest)
        .collect();
    blobs.sort();
    blobs.dedup();
    blobs
}
