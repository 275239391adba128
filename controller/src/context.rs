//! State shared by every part of the controller.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use kube::runtime::events::Reporter;
use tokio::sync::{mpsc, watch};

use crate::{
    engine::{DesiredIndex, Readers, Writers},
    store::BlobStore,
    tokens::Keys,
    Config,
};

/// The fetch of an artifact from an `http` cabinet.
#[derive(Clone, Debug)]
pub enum Pull {
    Running,
    Failed {
        message: String,
        at: std::time::Instant,
    },
}

/// A failed fetch is tried again after this long.
const PULL_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// A site is named by `(namespace, name)`.
pub type SiteKey = (String, String);

pub struct Context {
    pub client: kube::Client,
    pub config: Config,
    pub keys: Keys,
    pub blobs: BlobStore,
    pub reporter: Reporter,
    pub metrics: crate::metrics::Metrics,
    /// Artifacts being fetched from `http` cabinets, or whose fetch failed.
    pub pulls: Mutex<HashMap<String, Pull>>,
    /// Wakes the engine (a fetch finished).
    pub poke: tokio::sync::Notify,
    /// Client for `http` cabinets.
    pub http: reqwest::Client,
    /// PEM of the CA relays verify this controller with, if configured.
    pub relay_upstream_ca: Option<String>,
    /// Caches of the objects the engine watches; filled by [`crate::engine::run`].
    pub stores: Readers,
    pub(crate) writers: Mutex<Option<Writers>>,
    /// Every site's desired state; replaced as a whole on each change.
    pub desired: watch::Sender<Arc<DesiredIndex>>,
    /// What each site's relay last said about its cache.
    pub relay_stats: Mutex<HashMap<SiteKey, caravan_api::wire::RelayStats>>,
    /// When each site's relay last talked to us.
    pub relay_seen: Mutex<HashMap<SiteKey, chrono::DateTime<chrono::Utc>>>,
    /// Asks the Site reconciler to look at a site again (relay connected).
    pub site_trigger: mpsc::UnboundedSender<SiteKey>,
    pub site_trigger_rx: Mutex<Option<mpsc::UnboundedReceiver<SiteKey>>>,
}

impl Context {
    pub fn new(client: kube::Client, config: Config) -> crate::error::Result<Self> {
        let keys = Keys::load_or_create(&config.data_dir.join("token.key"))?;
        let relay_upstream_ca = match &config.relay_upstream_ca_file {
            Some(path) => {
                Some(std::fs::read_to_string(path).map_err(|e| crate::error::Error::io(path, e))?)
            }
            None => None,
        };

        let blobs = BlobStore::new(config.data_dir.join("blobs"));
        let (writers, stores) = crate::engine::stores();
        let (site_trigger, rx) = mpsc::unbounded_channel();
        Ok(Self {
            client,
            keys,
            blobs,
            reporter: Reporter {
                controller: "caravan-controller".into(),
                instance: None,
            },
            stores,
            writers: Mutex::new(Some(writers)),
            metrics: Default::default(),
            relay_upstream_ca,
            pulls: Mutex::new(HashMap::new()),
            poke: tokio::sync::Notify::new(),
            http: caravan_net::client(None, std::time::Duration::from_secs(60))
                .map_err(|e| crate::error::Error::io("http client", std::io::Error::other(e)))?,
            desired: watch::channel(Arc::new(DesiredIndex::default())).0,
            relay_seen: Mutex::new(HashMap::new()),
            relay_stats: Mutex::new(HashMap::new()),
            site_trigger,
            site_trigger_rx: Mutex::new(Some(rx)),
            config,
        })
    }

    /// Starts (or reports on) fetching an artifact from an `http` cabinet
    /// into the store. `None` once there is nothing to report: the fetch
    /// succeeded, and the blob is in the store.
    pub fn pull(self: &Arc<Self>, hex: &str, url: &str, size: u64) -> Option<Pull> {
        let mut pulls = self.pulls.lock().expect("lock poisoned");
        match pulls.get(hex) {
            Some(Pull::Failed { at, .. }) if at.elapsed() > PULL_RETRY => {}
            Some(state) => return Some(state.clone()),
            None => {}
        }
        pulls.insert(hex.to_string(), Pull::Running);
        let (ctx, hex, url) = (Arc::clone(self), hex.to_string(), url.to_string());
        tokio::spawn(async move {
            let result = ctx.blobs.pull(&hex, &url, size, &ctx.http).await;
            let mut pulls = ctx.pulls.lock().expect("lock poisoned");
            match result {
                Ok(_) => {
                    tracing::info!(%url, "artifact fetched and verified");
                    pulls.remove(&hex);
                }
                Err(message) => {
                    tracing::warn!(%message, "artifact fetch failed");
                    pulls.insert(
                        hex,
                        Pull::Failed {
                            message,
                            at: std::time::Instant::now(),
                        },
                    );
                }
            }
            ctx.poke.notify_one();
        });
        Some(Pull::Running)
    }

    /// Records that a site's relay talked to us; the first contact (or the
    /// first after a silence) makes the Site reconciler mark the relay ready.
    pub fn relay_contact(&self, site: &SiteKey) {
        let now = chrono::Utc::now();
        let previous = self
            .relay_seen
            .lock()
            .expect("lock poisoned")
            .insert(site.clone(), now);
        let stale = previous.is_none_or(|t| {
            now - t > chrono::Duration::seconds(crate::reconcile::site::RELAY_STALE_SECONDS / 2)
        });
        if stale {
            let _ = self.site_trigger.send(site.clone());
        }
    }

    /// When the relay of `site` last talked to us.
    pub fn relay_last_seen(&self, site: &SiteKey) -> Option<chrono::DateTime<chrono::Utc>> {
        self.relay_seen
            .lock()
            .expect("lock poisoned")
            .get(site)
            .copied()
    }

    /// The Kubernetes API for `K`, limited to the configured namespace if any.
    pub fn all<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match &self.config.namespace {
            Some(ns) => kube::Api::namespaced(self.client.clone(), ns),
            None => kube::Api::all(self.client.clone()),
        }
    }
}
