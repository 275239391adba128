//! The site's desired state: long-polled from the controller, sliced per
//! agent (each agent's part serialized once, with its own ETag, so an agent
//! is woken only when its own part changes), and acted on at once: blobs no
//! agent needs any more leave the cache, and those the site (and the sites
//! below) will need are fetched before anyone asks (prestaging).
//!
//! Each agent's part is a document the controller signed: the relay passes
//! it on as it came and reads from it only which blobs the agent may fetch.
//! It could not change it without the agent noticing.

use std::{collections::HashMap, sync::Arc, time::Duration};

use caravan_api::{
    trust::Envelope,
    wire::{AgentDesired, SiteDesired},
    Digest,
};
use caravan_net::{Backoff, Document};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{cache::Cache, upstream::Upstream};

/// The site's desired state as last received, sliced per agent.
#[derive(Debug)]
pub struct SiteState {
    /// The site's desired state without its agents (in `agents`).
    pub desired: SiteDesired,
    /// Per agent: its part, served as is.
    pub agents: HashMap<String, Arc<AgentPart>>,
    /// The controller's roots, served as is.
    pub roots: Arc<Document<Vec<Envelope>>>,
}

/// One agent's signed document as served (its bytes and their ETag: the
/// relay keeps no other copy) and the blobs it names.
#[derive(Debug)]
pub struct AgentPart {
    pub body: bytes::Bytes,
    pub etag: String,
    pub blobs: Vec<Digest>,
}

impl AgentPart {
    fn new(envelope: Envelope) -> Self {
        // A document the relay cannot read names no blob it would hand out;
        // it is passed on all the same, for the agent to refuse and report.
        let blobs = envelope
            .unverified_payload()
            .ok()
            .and_then(|body| serde_json::from_slice::<AgentDesired>(&body).ok())
            .map(|d| d.assignments.into_iter().map(|a| a.digest).collect())
            .unwrap_or_default();
        let (body, etag) = caravan_net::document::serialize(&envelope);
        Self { body, etag, blobs }
    }
}

impl SiteState {
    /// Moves each agent's part of `desired` into its own document.
    pub fn new(mut desired: SiteDesired) -> Self {
        let agents = std::mem::take(&mut desired.agents)
            .into_iter()
            .map(|(name, d)| (name, Arc::new(AgentPart::new(d))))
            .collect();
        let roots = Arc::new(Document::new(std::mem::take(&mut desired.roots)));
        Self {
            desired,
            agents,
            roots,
        }
    }

    /// This state with `changes` applied: an answer of changes since it
    /// (see [`SiteDesired::since`]). Only the agents that changed are read.
    pub fn apply(&self, mut changes: SiteDesired) -> Self {
        let mut agents = self.agents.clone();
        let mut keys = self.desired.agent_keys.clone();
        for name in std::mem::take(&mut changes.removed) {
            agents.remove(&name);
            keys.remove(&name);
        }
        // An agent's entry is replaced whole: a key it no longer has goes.
        for (name, envelope) in std::mem::take(&mut changes.agents) {
            keys.remove(&name);
            agents.insert(name, Arc::new(AgentPart::new(envelope)));
        }
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
            roots,
        }
    }

    /// What `agent` must have; `None` for an agent the controller does not
    /// serve here (awaiting approval, revoked, deleted, or of another site).
    pub fn agent(&self, agent: &str) -> Option<Arc<AgentPart>> {
        self.agents.get(agent).cloned()
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
    use caravan_api::{trust::DESIRED_TYPE, wire::AgentDesired};

    fn payload(part: &AgentPart) -> AgentDesired {
        let envelope: Envelope = serde_json::from_slice(&part.body).unwrap();
        serde_json::from_slice(&envelope.unverified_payload().unwrap()).unwrap()
    }

    #[test]
    fn each_agent_gets_its_own_part_and_an_unknown_agent_none() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let mut desired = SiteDesired {
            site: "hq".into(),
            roots: vec![caravan_api::trust::Root::signed(1, &[&key])],
            ..Default::default()
        };
        let blob = Digest::of(b"a1's blob");
        for a in ["a1", "a2"] {
            let mut d = AgentDesired {
                agent: a.into(),
                hold: vec![format!("held-by-{a}")],
                ..Default::default()
            };
            if a == "a1" {
                d.assignments = vec![serde_json::from_value(serde_json::json!({
                    "job": "ns/j", "action": "install", "package": "p", "version": "1",
                    "digest": blob, "size": 1, "install": {}
                }))
                .unwrap()];
            }
            let body = serde_json::to_vec(&d).unwrap();
            desired
                .agents
                .insert(a.into(), Envelope::sign(DESIRED_TYPE, &body, &[&key]));
        }
        let state = SiteState::new(desired);
        assert!(state.desired.agents.is_empty(), "moved, not copied");
        assert_eq!(state.roots.value.len(), 1);
        let a1 = state.agent("a1").unwrap();
        let a2 = state.agent("a2").unwrap();
        assert_eq!(payload(&a1).hold, ["held-by-a1"]);
        assert_eq!(a1.blobs, [blob], "a1 may fetch its blob");
        assert!(a2.blobs.is_empty());
        assert_ne!(a1.etag, a2.etag);
        assert!(state.agent("new-one").is_none(), "a stranger is not served");
    }

    #[test]
    fn changes_apply_to_the_state_they_were_made_for() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let part = |agent: &str, hold: &str| {
            let d = AgentDesired {
                agent: agent.into(),
                hold: vec![hold.into()],
                ..Default::default()
            };
            Envelope::sign(DESIRED_TYPE, &serde_json::to_vec(&d).unwrap(), &[&key])
        };
        let site = |agents: &[(&str, &str)], keys: &[&str]| SiteDesired {
            site: "hq".into(),
            roots: vec![caravan_api::trust::Root::signed(1, &[&key])],
            agents: agents
                .iter()
                .map(|(a, h)| (a.to_string(), part(a, h)))
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
                .map(|(n, p)| (n.clone(), p.etag.clone()))
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
    }
}
