//! Every site's desired state, as served to its relay: what each of its
//! agents must have, the blobs of the jobs aimed at it (prestaged whether
//! or not agents have enrolled) and the blobs of the sites below it (whose
//! relays fetch them from this one, so each blob crosses each link once).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, OnceLock},
};

use caravan_api::{
    v1alpha1::{Cabinet, DistributionJob, Package, Site},
    wire::{AgentDocument, Assignment, AssignmentList, BlobSource, SiteDesired},
    Digest,
};
use kube::ResourceExt;
use sha2::Digest as _;

use super::{
    key_of,
    plan::Plan,
    status::{ArtifactState, Artifacts},
    SiteKey,
};

/// Every site's desired state, its agents' parts not signed yet.
pub type Unsigned = HashMap<SiteKey, SiteDesired<AgentPlan>>;

/// A job's assignments, one list shared by every agent that has them
/// unchanged: they are copied once per job, not once per agent. An agent
/// whose list differs (excluded from a retry, a package lost to another
/// job) has a copy of its own, made by [`Assigned::edit`]. The list as sent
/// (and its digest, which names it in agents' documents) is made once,
/// when first asked for.
#[derive(Debug)]
pub struct Assigned {
    list: Vec<Assignment>,
    sent: OnceLock<(Digest, AssignmentList)>,
}

impl Assigned {
    pub fn new(list: Vec<Assignment>) -> Arc<Self> {
        Arc::new(Self {
            list,
            sent: OnceLock::new(),
        })
    }

    /// The list as sent, and its digest.
    pub fn sent(&self) -> &(Digest, AssignmentList) {
        self.sent.get_or_init(|| AssignmentList::new(&self.list))
    }

    /// The digest of the list as sent.
    pub fn digest(&self) -> Digest {
        self.sent().0
    }

    /// The list of `this` to change: copied first if it is shared.
    pub fn edit(this: &mut Arc<Self>) -> &mut Vec<Assignment> {
        let me = Arc::make_mut(this);
        me.sent = OnceLock::new();
        &mut me.list
    }
}

/// A copy to edit: its content is hashed anew.
impl Clone for Assigned {
    fn clone(&self) -> Self {
        Self {
            list: self.list.clone(),
            sent: OnceLock::new(),
        }
    }
}

impl PartialEq for Assigned {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl std::ops::Deref for Assigned {
    type Target = [Assignment];
    fn deref(&self) -> &[Assignment] {
        &self.list
    }
}

/// One agent's desired state as the plan leaves it: the assignments of the
/// jobs it has, shared with them, and the packages to hold. Its document
/// ([`AgentDocument`]) is made, and signed, only when its [`content`]
/// changed (`trust::Signer`): an agent nothing changed for costs a hash of
/// a few dozen bytes.
///
/// [`content`]: AgentPlan::content
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentPlan {
    pub agent: String,
    /// The assignments, job by job.
    pub assigned: Vec<Arc<Assigned>>,
    /// Package names to leave as they are, sorted.
    pub hold: Vec<String>,
}

impl AgentPlan {
    pub fn assignments(&self) -> impl Iterator<Item = &Assignment> {
        self.assigned.iter().flat_map(|a| a.iter())
    }

    /// A hash of the document: two plans whose documents differ differ in
    /// it (every part is written with its length).
    pub fn content(&self) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        let len = |n: usize| (n as u64).to_le_bytes();
        h.update(len(self.agent.len()));
        h.update(&self.agent);
        h.update(len(self.hold.len()));
        for hold in &self.hold {
            h.update(len(hold.len()));
            h.update(hold);
        }
        h.update(len(self.assigned.len()));
        for a in &self.assigned {
            h.update(a.digest().as_bytes());
        }
        h.finalize().into()
    }

    /// The document (unsigned: no version nor expiry yet). Every field is
    /// named: one added to the document must be added to [`content`] too.
    ///
    /// [`content`]: AgentPlan::content
    pub fn document(&self) -> AgentDocument {
        AgentDocument {
            agent: self.agent.clone(),
            lists: self.assigned.iter().map(|a| a.digest()).collect(),
            hold: self.hold.clone(),
            frozen: false,
            version: 0,
            expires: String::new(),
        }
    }
}

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
            let (lists, blobs) = lists_of(&agents);
            let d = SiteDesired {
                site: s.name_any(),
                lists,
                blobs,
                agents,
                agent_keys: plan.agent_keys.remove(&key).unwrap_or_default(),
                unserved: plan.unserved.remove(&key).unwrap_or_default(),
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

/// The assignment lists of a site's agents, each once, and their blobs
/// (for the relay, which does not open the lists to know what to keep);
/// each shared list read once.
fn lists_of(
    agents: &BTreeMap<String, AgentPlan>,
) -> (BTreeMap<Digest, AssignmentList>, Vec<Digest>) {
    let mut seen = HashSet::new();
    let mut lists = BTreeMap::new();
    let mut blobs = Vec::new();
    for list in agents.values().flat_map(|a| &a.assigned) {
        if !seen.insert(Arc::as_ptr(list)) {
            continue;
        }
        let (digest, sent) = list.sent();
        if lists.insert(*digest, sent.clone()).is_none() {
            blobs.extend(list.iter().map(|a| a.digest));
        }
    }
    blobs.sort();
    blobs.dedup();
    (lists, blobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::fixtures::*;
    use caravan_api::wire::Assignment;

    fn assignment(package: &str) -> Assignment {
        serde_json::from_value(serde_json::json!({
            "job": "ns/j",
            "action": caravan_api::v1alpha1::JobAction::Install,
            "package": package,
            "version": "1.0.0",
            "digest": digest_of(package, "1.0.0"),
            "size": 10,
            "install": caravan_api::v1alpha1::InstallSpec::default(),
        }))
        .unwrap()
    }

    fn plan(agent: &str, assigned: &[&Arc<Assigned>], hold: &[&str]) -> AgentPlan {
        AgentPlan {
            agent: agent.into(),
            assigned: assigned.iter().map(|a| Arc::clone(a)).collect(),
            hold: hold.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn an_agent_plans_content_changes_with_its_document_and_only_then() {
        let shared = Assigned::new(vec![assignment("hello")]);
        let same = Assigned::new(vec![assignment("hello")]);
        let a1 = plan("a1", &[&shared], &[]);
        // The same document from another (equal) list: the same content.
        assert_eq!(a1.content(), plan("a1", &[&same], &[]).content());
        // Every part of the document counts: agent, lists, holds.
        let others = [
            plan("a2", &[&shared], &[]),
            plan("a1", &[], &[]),
            plan("a1", &[&shared, &shared], &[]),
            plan("a1", &[&shared], &["hello"]),
            plan("a1", &[&shared], &["hel", "lo"]),
            plan("a1", &[&Assigned::new(vec![assignment("tools")])], &[]),
        ];
        for other in &others {
            assert_ne!(a1.content(), other.content(), "{other:?}");
        }
        // An agent's own copy, edited, changes its content and no one else's.
        let mut mine = shared.clone();
        Assigned::edit(&mut mine)[0].superseded_by = Some("ns/other".into());
        assert_ne!(plan("a1", &[&mine], &[]).content(), a1.content());
        assert_eq!(shared[0].superseded_by, None);
        assert_eq!(plan("a1", &[&shared], &[]).content(), a1.content());
        // The document names the lists in order, and the holds; the site
        // carries each list once, as hashed.
        let two = plan("a1", &[&shared, &mine], &["x"]);
        let doc = two.document();
        assert_eq!(doc.lists, [shared.digest(), mine.digest()]);
        assert_ne!(shared.digest(), mine.digest());
        assert_eq!(
            (doc.agent.as_str(), doc.hold.as_slice()),
            ("a1", &["x".to_string()][..])
        );
        let agents = BTreeMap::from([
            ("a1".to_string(), two),
            ("a2".to_string(), plan("a2", &[&same], &[])),
        ]);
        let (lists, blobs) = lists_of(&agents);
        assert_eq!(lists.len(), 2, "{lists:?}");
        for (digest, list) in &lists {
            assert_eq!(Digest::of(list.json().as_bytes()), *digest);
        }
        assert_eq!(
            lists[&mine.digest()].open(&mine.digest()).unwrap()[0]
                .superseded_by
                .as_deref(),
            Some("ns/other")
        );
        assert_eq!(blobs, [digest_of("hello", "1.0.0")]);
    }
}
