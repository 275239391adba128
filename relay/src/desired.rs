//! The site's desired state: long-polled from the controller, sliced per
//! agent (each agent's envelope serialized once, with its own ETag, so an
//! agent is woken only when its own part changes; its answer is composed
//! per request from the envelope and the site's shared lists), and acted on at once: blobs no
//! agent needs any more leave the cache, and those the site (and the sites
//! below) will need are fetched before anyone asks (prestaging).
//!
//! Each agent's part is a document the controller signed, naming the
//! assignment lists of its jobs by digest: the relay keeps each list once
//! for the site, passes document and lists on as they came, and reads from
//! them only which blobs the agent may fetch. It could change neither
//! without the agent noticing.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use caravan_api::{
    trust::Envelope,
    wire::{AgentDocument, AgentServed, AssignmentList, SiteDesired},
    Digest,
};
use caravan_net::{Backoff, Document};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{cache::Cache, upstream::Upstream};

/// The site's desired state as last received, sliced per agent.
#[derive(Debug)]
pub struct SiteState {
    /// The site's desired state without its agents (in `agents`) and lists
    /// (in `lists`).
    pub desired: SiteDesired,
    /// Per agent: its part, served as is.
    pub agents: HashMap<String, Arc<AgentPart>>,
    /// The assignment lists the agents' documents name, each kept once.
    pub lists: HashMap<Digest, Arc<ListPart>>,
    /// The controller's roots, served as is.
    pub roots: Arc<Document<Vec<Envelope>>>,
}

/// An assignment list as the controller sent it, and the blobs it names.
#[derive(Debug)]
pub struct ListPart {
    list: AssignmentList,
    blobs: Vec<Digest>,
}

impl ListPart {
    /// The list, if it is what its digest names (the agent checks that
    /// too: a list that is not is only the controller's, or this relay's,
    /// mistake, and is left out for the agent to report as withheld).
    fn new(digest: &Digest, list: AssignmentList) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Blob {
            digest: Digest,
        }
        if Digest::of(list.json().as_bytes()) != *digest {
            tracing::warn!(list = %digest, "an assignment list that does not hash to its digest; left out");
            return None;
        }
        let blobs = serde_json::from_str::<Vec<Blob>>(list.json())
            .map(|l| l.into_iter().map(|b| b.digest).collect())
            .unwrap_or_default();
        Some(Self { list, blobs })
    }
}

/// One agent's signed document as received (the relay keeps no other
/// copy), its ETag, the lists it names (shared with the site's other
/// agents) and the blobs they name.
#[derive(Debug)]
pub struct AgentPart {
    document: Box<serde_json::value::RawValue>,
    lists: BTreeMap<Digest, AssignmentList>,
    pub etag: String,
    pub blobs: Vec<Digest>,
}

impl AgentPart {
    fn new(envelope: Envelope, lists: &HashMap<Digest, Arc<ListPart>>) -> Self {
        // A document the relay cannot read names no list it would send nor
        // blob it would hand out; it is passed on all the same, for the
        // agent to refuse and report.
        let named = envelope
            .unverified_payload()
            .ok()
            .and_then(|body| serde_json::from_slice::<AgentDocument>(&body).ok())
            .map(|d| d.lists)
            .unwrap_or_default();
        let named: Vec<(Digest, &ListPart)> = named
            .into_iter()
            .filter_map(|d| match lists.get(&d) {
                Some(list) => Some((d, list.as_ref())),
                None => {
                    tracing::warn!(list = %d, "a document names an assignment list the controller did not send; its agent will refuse it");
                    None
                }
            })
            .collect();
        let mut blobs: Vec<Digest> = named
            .iter()
            .flat_map(|(_, l)| l.blobs.iter().copied())
            .collect();
        blobs.sort();
        blobs.dedup();
        let lists: BTreeMap<Digest, AssignmentList> = named
            .into_iter()
            .map(|(d, l)| (d, l.list.clone()))
            .collect();
        // The ETag of what is served: the envelope's bytes and the digests
        // of the lists served with it (each held only if its bytes have it).
        let json = serde_json::to_string(&envelope).expect("wire types serialize");
        let mut served = json.clone().into_bytes();
        lists.keys().for_each(|d| served.extend(d.as_bytes()));
        let etag = caravan_net::document::etag_of(&served);
        let document = serde_json::value::RawValue::from_string(json).expect("serialized as JSON");
        Self {
            document,
            lists,
            etag,
            blobs,
        }
    }

    /// What the agent is served: its document and the lists it names.
    pub fn body(&self) -> bytes::Bytes {
        let served = AgentServed {
            document: &*self.document,
            lists: &self.lists,
        };
        serde_json::to_vec(&served)
            .expect("wire types serialize")
            .into()
    }
}

impl SiteState {
    /// Moves each agent's part of `desired` into its own document.
    pub fn new(mut desired: SiteDesired) -> Self {
        let lists = Self::lists(HashMap::new(), std::mem::take(&mut desired.lists));
        let agents = std::mem::take(&mut desired.agents)
            .into_iter()
            .map(|(name, d)| (name, Arc::new(AgentPart::new(d, &lists))))
            .collect();
        let roots = Arc::new(Document::new(std::mem::take(&mut desired.roots)));
        Self {
            desired,
            agents,
            lists,
            roots,
        }
    }

    /// `held` with `new` added (read once each).
    fn lists(
        mut held: HashMap<Digest, Arc<ListPart>>,
        new: BTreeMap<Digest, AssignmentList>,
    ) -> HashMap<Digest, Arc<ListPart>> {
        for (digest, list) in new {
            if let std::collections::hash_map::Entry::Vacant(e) = held.entry(digest) {
                if let Some(part) = ListPart::new(&digest, list) {
                    e.insert(Arc::new(part));
                }
            }
        }
        held
    }

    /// This state with `changes` applied: an answer of changes since it
    /// (see [`SiteDesired::since`]). Only the agents that changed are read;
    /// lists no agent names any more are forgotten.
    pub fn apply(&self, mut changes: SiteDesired) -> Self {
        let mut agents = self.agents.clone();
        let mut keys = self.desired.agent_keys.clone();
        let lists = Self::lists(self.lists.clone(), std::mem::take(&mut changes.lists));
        for name in std::mem::take(&mut changes.removed) {
            agents.remove(&name);
            keys.remove(&name);
        }
        // An agent's entry is replaced whole: a key it no longer has goes.
        for (name, envelope) in std::mem::take(&mut changes.agents) {
            keys.remove(&name);
            agents.insert(name, Arc::new(AgentPart::new(envelope, &lists)));
        }
        let named: HashSet<&Digest> = agents.values().flat_map(|a| a.lists.keys()).collect();
        let lists = lists
            .iter()
            .filter(|(d, _)| named.contains(d))
            .map(|(d, l)| (*d, l.clone()))
            .collect();
        keys.append(&mut changes.agent_keys);
        changes.agent_keys = keys;
        changes.since = None;
        let roots = match changes.roots == self.roots.value {
            true => self.roots.clone(),
            false => Arc::new(Document::new(std::mem::take(&mut changes.roots))),
        };
        changes.roots.clear();
        Self {
            desired: changes,
            agents,
            lists,
            roots,
        }
    }

    /// What `agent` must have; `None` for an agent the controller does not
    /// serve here (awaiting approval, revoked, deleted, or of another site).
    pub fn agent(&self, agent: &str) -> Option<Arc<AgentPart>> {
        self.agents.get(agent).cloned()
    }

    /// Whether `agent` is enrolled here and not served (awaiting approval,
    /// or revoked), as opposed to not known here at all.
    pub fn unserved(&self, agent: &str) -> bool {
        self.desired
            .unserved
            .binary_search_by(|n| n.as_str().cmp(agent))
            .is_ok()
    }
}

/// How long a long-poll of the controller waits.
const POLL_WAIT_SECONDS: u64 = 30;

/// Long-polls the controller for the site's desired state until shutdown,
/// publishing each new one on `state`.
pub async fn sync(
    upstream: Upstream,
    cache: Arc<Cache>,
    state: watch::Sender<Option<Arc<SiteState>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut etag: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let answer = tokio::select! {
            a = upstream.desired(etag.as_deref(), POLL_WAIT_SECONDS) => a,
            () = shutdown.cancelled() => return Ok(()),
        };
        match answer {
            Ok(Some((new_etag, desired))) => {
                let changed = desired.agents.len() + desired.removed.len();
                let held = state.borrow().clone();
                let next = match (&desired.since, held) {
                    (None, _) => SiteState::new(desired),
                    (Some(since), Some(held)) if Some(since) == etag.as_ref() => {
                        held.apply(desired)
                    }
                    (Some(since), _) => {
                        // Not what this relay holds: ask for the whole state.
                        tracing::warn!(%since, held = ?etag, "changes for another revision of the desired state; asking for all of it");
                        etag = None;
                        continue;
                    }
                };
                tracing::info!(site = %next.desired.site, agents = next.agents.len(), changed, etag = %new_etag, "desired state updated");
                etag = Some(new_etag);
                drop_unwanted(&cache, &next.desired).await;
                cache.registries.set(next.desired.sources.clone());
                prestage(&cache, &next.desired);
                state.send_replace(Some(Arc::new(next)));
                backoff.reset();
            }
            Ok(None) => backoff.reset(),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %caravan_net::Chain(&e), retry_in = ?delay, "fetching desired state from upstream failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// What no agent of the site (or below) is assigned any more leaves the cache.
async fn drop_unwanted(cache: &Cache, desired: &SiteDesired) {
    let keep = desired.all_digests().collect();
    match cache.retain(&keep).await {
        Ok(removed) => removed
            .iter()
            .for_each(|name| tracing::info!(blob = %name, "dropped from the cache")),
        Err(e) => tracing::warn!(error = %e, "cache cleanup failed"),
    }
}

/// Fetches what the site (and the sites below) will need before anyone
/// asks, one blob at a time, inside the transfer window.
fn prestage(cache: &Arc<Cache>, desired: &SiteDesired) {
    let wanted: Vec<_> = desired.all_digests().copied().collect();
    let cache = cache.clone();
    tokio::spawn(async move {
        for digest in wanted {
            if let Some(minutes) = cache.window().and_then(|w| w.opens_in_now()) {
                tracing::info!(blob = %digest, minutes, "prestaging waits for the transfer window");
                tokio::time::sleep(Duration::from_secs(u64::from(minutes) * 60)).await;
            }
            if let Err(e) = cache.ensure(&digest).await {
                tracing::warn!(blob = %digest, error = %caravan_net::Chain(&e), "prestaging failed; agents will ask again");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::{trust::DESIRED_TYPE, wire::Assignment};

    fn served(part: &AgentPart) -> AgentServed {
        serde_json::from_slice(&part.body()).unwrap()
    }

    fn payload(part: &AgentPart) -> AgentDocument {
        let envelope = served(part).document;
        serde_json::from_slice(&envelope.unverified_payload().unwrap()).unwrap()
    }

    /// A list of one assignment of `blob`, and its digest.
    fn list(blob: &Digest) -> (Digest, AssignmentList) {
        let a: Assignment = serde_json::from_value(serde_json::json!({
            "job": "ns/j", "action": "install", "package": "p", "version": "1",
            "digest": blob, "size": 1, "install": {}
        }))
        .unwrap();
        AssignmentList::new(&[a])
    }

    fn sign(d: &AgentDocument, key: &ed25519_dalek::SigningKey) -> Envelope {
        Envelope::sign(DESIRED_TYPE, &serde_json::to_vec(d).unwrap(), &[key])
    }

    #[test]
    fn each_agent_gets_its_own_part_and_an_unknown_agent_none() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let blob = Digest::of(b"a1's blob");
        let (digest, l) = list(&blob);
        let mut desired = SiteDesired {
            site: "hq".into(),
            roots: vec![caravan_api::trust::Root::signed(1, &[&key])],
            lists: [(digest, l.clone())].into(),
            ..Default::default()
        };
        for a in ["a1", "a2"] {
            let d = AgentDocument {
                agent: a.into(),
                hold: vec![format!("held-by-{a}")],
                lists: if a == "a1" { vec![digest] } else { vec![] },
                ..Default::default()
            };
            desired.agents.insert(a.into(), sign(&d, &key));
        }
        let state = SiteState::new(desired);
        assert!(state.desired.agents.is_empty(), "moved, not copied");
        assert!(state.desired.lists.is_empty(), "moved, not copied");
        assert_eq!(state.roots.value.len(), 1);
        let a1 = state.agent("a1").unwrap();
        let a2 = state.agent("a2").unwrap();
        assert_eq!(payload(&a1).hold, ["held-by-a1"]);
        assert_eq!(a1.blobs, [blob], "a1 may fetch its blob");
        assert_eq!(
            served(&a1).lists,
            [(digest, l)].into(),
            "served with its list"
        );
        assert!(a2.blobs.is_empty() && served(&a2).lists.is_empty());
        assert_ne!(a1.etag, a2.etag);
        assert!(state.agent("new-one").is_none(), "a stranger is not served");
    }

    #[test]
    fn a_list_that_is_not_what_its_digest_names_is_left_out() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let (digest, good) = list(&Digest::of(b"good"));
        let (_, other) = list(&Digest::of(b"evil"));
        let d = AgentDocument {
            agent: "a1".into(),
            lists: vec![digest],
            ..Default::default()
        };
        let state = |list: AssignmentList| {
            SiteState::new(SiteDesired {
                site: "hq".into(),
                agents: [("a1".to_string(), sign(&d, &key))].into(),
                lists: [(digest, list)].into(),
                ..Default::default()
            })
        };
        let a1 = state(other).agent("a1").unwrap();
        assert!(a1.blobs.is_empty(), "no blob of the bad list is handed out");
        assert!(
            served(&a1).lists.is_empty(),
            "the agent reports it withheld"
        );
        // Served with its list, the same document is another answer: an
        // agent holding the one without is not told "unchanged".
        let whole = state(good).agent("a1").unwrap();
        assert_eq!(served(&whole).lists.len(), 1);
        assert_ne!(whole.etag, a1.etag);
    }

    #[test]
    fn changes_apply_to_the_state_they_were_made_for() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let (x, y) = (list(&Digest::of(b"x")), list(&Digest::of(b"y")));
        let lists = BTreeMap::from([x.clone(), y.clone()]);
        let part = |agent: &str, hold: &str| {
            let named = if hold == "x" { x.0 } else { y.0 };
            let d = AgentDocument {
                agent: agent.into(),
                hold: vec![hold.into()],
                lists: vec![named],
                ..Default::default()
            };
            sign(&d, &key)
        };
        // As the controller sends it: the lists the agents' documents name.
        let site = |agents: &[(&str, &str)], keys: &[&str]| SiteDesired {
            site: "hq".into(),
            roots: vec![caravan_api::trust::Root::signed(1, &[&key])],
            agents: agents
                .iter()
                .map(|(a, h)| (a.to_string(), part(a, h)))
                .collect(),
            lists: lists
                .iter()
                .filter(|(d, _)| {
                    agents
                        .iter()
                        .any(|(_, h)| (if *h == "x" { x.0 } else { y.0 }) == **d)
                })
                .map(|(d, l)| (*d, l.clone()))
                .collect(),
            agent_keys: keys
                .iter()
                .map(|a| (a.to_string(), format!("ed25519:{a}")))
                .collect(),
            blobs: vec![Digest::of(keys.concat().as_bytes())],
            ..Default::default()
        };
        let held = SiteState::new(site(
            &[("a1", "x"), ("a2", "x"), ("a3", "x")],
            &["a1", "a2", "a3"],
        ));
        assert_eq!(held.lists.len(), 1);
        // a2 changes and loses its key, a3 leaves, a4 arrives.
        let mut changes = site(&[("a2", "y"), ("a4", "x")], &["a4"]);
        changes.blobs = vec![Digest::of(b"a1a4")];
        changes.since = Some("\"r1\"".into());
        changes.removed = vec!["a3".into()];
        let applied = held.apply(changes);
        let whole = SiteState::new(site(
            &[("a1", "x"), ("a2", "y"), ("a4", "x")],
            &["a1", "a4"],
        ));
        let etags = |s: &SiteState| {
            let mut e: Vec<_> = s
                .agents
                .iter()
                .map(|(n, p)| (n.clone(), p.etag.clone(), p.body()))
                .collect();
            e.sort();
            e
        };
        assert_eq!(etags(&applied), etags(&whole));
        assert_eq!(
            applied.desired, whole.desired,
            "keys and blobs as in the whole state"
        );
        assert!(
            Arc::ptr_eq(&applied.roots, &held.roots),
            "unchanged roots are kept"
        );
        assert!(
            Arc::ptr_eq(&applied.agents["a1"], &held.agents["a1"]),
            "a1 is not read again"
        );
        assert!(
            Arc::ptr_eq(&applied.lists[&x.0], &held.lists[&x.0]),
            "x is not read again"
        );
        // Once no agent names x, it is forgotten.
        let mut changes = site(&[("a1", "y"), ("a4", "y")], &["a1", "a4"]);
        changes.since = Some("\"r2\"".into());
        let applied = applied.apply(changes);
        assert_eq!(applied.lists.keys().collect::<Vec<_>>(), [&y.0]);
    }
}
