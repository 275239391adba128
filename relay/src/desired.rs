//! The site's desired state: long-polled from the controller, sliced per
//! agent (each agent's part serialized once, with its own ETag, so an agent
//! is woken only when its own part changes), and acted on at once: blobs no
//! agent needs any more leave the cache, and those the site (and the sites
//! below) will need are fetched before anyone asks (prestaging).

use std::{collections::HashMap, sync::Arc, time::Duration};

use caravan_api::wire::{AgentDesired, SiteDesired};
use caravan_net::{Backoff, Document};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{cache::Cache, upstream::Upstream};

/// The site's desired state as last received, sliced per agent.
#[derive(Debug, Default)]
pub struct SiteState {
    /// The site's desired state without its agents (in `agents`).
    pub desired: SiteDesired,
    /// Per agent: its part, served as is.
    pub agents: HashMap<String, Arc<Document<AgentDesired>>>,
}

impl SiteState {
    /// Moves each agent's part of `desired` into its own document.
    pub fn new(mut desired: SiteDesired) -> Self {
        let agents = std::mem::take(&mut desired.agents)
            .into_iter()
            .map(|(name, d)| (name, Arc::new(Document::new(d))))
            .collect();
        Self { desired, agents }
    }

    /// What `agent` must have. An agent the controller has not described
    /// (enrolled a moment ago, or its Agent object deleted) changes nothing.
    pub fn agent(&self, agent: &str) -> Arc<Document<AgentDesired>> {
        self.agents
            .get(agent)
            .cloned()
            .unwrap_or_else(|| Arc::new(Document::new(AgentDesired::frozen(agent))))
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
                tracing::info!(site = %desired.site, agents = desired.agents.len(), etag = %new_etag, "desired state updated");
                etag = Some(new_etag);
                drop_unwanted(&cache, &desired).await;
                prestage(&cache, &desired);
                state.send_replace(Some(Arc::new(SiteState::new(desired))));
                backoff.reset();
            }
            Ok(None) => backoff.reset(),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "fetching desired state from upstream failed");
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
                tracing::warn!(blob = %digest, error = %e, "prestaging failed; agents will ask again");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::wire::AgentDesired;

    #[test]
    fn each_agent_gets_its_own_part_and_an_unknown_agent_changes_nothing() {
        let mut desired = SiteDesired {
            site: "hq".into(),
            ..Default::default()
        };
        for a in ["a1", "a2"] {
            desired.agents.insert(
                a.into(),
                AgentDesired {
                    agent: a.into(),
                    hold: vec![format!("held-by-{a}")],
                    ..Default::default()
                },
            );
        }
        let state = SiteState::new(desired);
        assert!(state.desired.agents.is_empty(), "moved, not copied");
        let a1 = state.agent("a1");
        assert_eq!(a1.value.hold, ["held-by-a1"]);
        assert_ne!(a1.etag, state.agent("a2").etag);
        let stranger = state.agent("new-one");
        assert!(stranger.value.frozen && stranger.value.agent == "new-one");
    }
}
