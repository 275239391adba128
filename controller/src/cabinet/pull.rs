//! Fetching the artifacts of `http` and `oci` cabinets into the store. The
//! engine asks for every artifact such a cabinet holds that the store lacks
//! ([`Pulls::ensure`]); each is fetched once, by a task of its own, its
//! size and digest verified before it enters the store. A failed fetch is
//! reported (and tried again after a while); a finished one wakes the
//! engine ([`Pulls::finished`]), which then sees the blob in the store.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caravan_api::Digest;
use tokio::sync::Notify;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

use super::{
    registry::{Fetched, OciSource},
    BlobStore,
};
use crate::index::ArtifactState;

/// A failed fetch is tried again after this long.
const RETRY: Duration = Duration::from_secs(30);

/// A verified artifact whose layers relays fetch is checked again this often
/// (a manifest deleted from the registry shows on the Package).
const REVERIFY: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
enum Pull {
    /// Being fetched, or checked; `verified`: checked again, and still taken
    /// as verified (`size` bytes) meanwhile.
    Running {
        verified: Option<u64>,
    },
    Failed {
        message: String,
        at: Instant,
    },
    /// The pinned manifest in `source` names the artifact (`size` bytes);
    /// relays fetch its layer.
    Verified {
        size: u64,
        source: String,
        at: Instant,
    },
}

/// Where a cabinet keeps an artifact the store lacks.
#[derive(Clone, Debug)]
pub enum Source {
    /// An `http` cabinet: at this URL.
    Http(String),
    /// An `oci` cabinet, for this Package (which hears of a moved tag).
    Oci(Box<(OciSource, ObjectReference)>),
}

impl Source {
    /// Where exactly the artifact is (an `oci` one: its repository and the
    /// pinned manifest), to tell a check of one place from another's.
    fn key(&self) -> String {
        match self {
            Self::Http(url) => url.clone(),
            Self::Oci(oci) => {
                let o = &oci.0;
                format!(
                    "{}/{}@{}",
                    o.store.repository.as_deref().unwrap_or_default(),
                    o.package,
                    o.manifest.map(|m| m.to_string()).unwrap_or_default()
                )
            }
        }
    }
}

/// An `oci` cabinet's registry is asked this often whether it answers and
/// takes the cabinet's credentials (even with no package to fetch).
pub const PROBE_EVERY: Duration = Duration::from_secs(300);

/// The probes of a cabinet's registry: whether one runs, when the last
/// ended, and what it found wrong.
#[derive(Default)]
struct Probe {
    running: bool,
    ended: Option<Instant>,
    error: Option<String>,
}

/// The fetches from `http` and `oci` cabinets, owned by the engine.
pub struct Pulls {
    blobs: Arc<BlobStore>,
    http: reqwest::Client,
    /// For the registry credentials of `oci` cabinets.
    kube: kube::Client,
    /// For the Events on Packages whose tag moved.
    recorder: Recorder,
    pulls: Arc<Mutex<HashMap<Digest, Pull>>>,
    /// By cabinet and what it says of its registry.
    probes: Arc<Mutex<HashMap<String, Probe>>>,
    done: Arc<Notify>,
}

impl Pulls {
    pub fn new(
        blobs: Arc<BlobStore>,
        http: reqwest::Client,
        kube: kube::Client,
        recorder: Recorder,
    ) -> Self {
        Self {
            blobs,
            http,
            kube,
            recorder,
            pulls: Default::default(),
            probes: Default::default(),
            done: Default::default(),
        }
    }

    /// Where the fetch of `digest` (`size` bytes) from `source` stands,
    /// starting it unless it runs already or failed a moment ago. Only for
    /// artifacts the store lacks.
    pub fn ensure(&self, digest: Digest, source: Source, size: u64) -> ArtifactState {
        let verify_only = matches!(&source, Source::Oci(oci) if oci.0.layers_from_relays());
        let key = source.key();
        let mut pulls = self.pulls.lock().expect("lock poisoned");
        let mut verified = None;
        match pulls.get(&digest) {
            Some(Pull::Failed { at, .. }) if at.elapsed() > RETRY => {}
            Some(Pull::Failed { message, .. }) => {
                return ArtifactState::FetchFailed(message.clone())
            }
            Some(Pull::Running {
                verified: Some(size),
            }) if verify_only => return ArtifactState::InRegistry(*size),
            Some(Pull::Running { .. }) => return ArtifactState::Fetching,
            // Verified where the Package says now: taken as it is for a
            // while, then checked again (still taken meanwhile).
            Some(Pull::Verified { size, source, at }) if verify_only && *source == key => {
                if at.elapsed() < REVERIFY {
                    return ArtifactState::InRegistry(*size);
                }
                verified = Some(*size);
            }
            Some(Pull::Verified { .. }) | None => {}
        }
        pulls.insert(digest, Pull::Running { verified });
        let (blobs, http, kube, recorder, all, done) = (
            self.blobs.clone(),
            self.http.clone(),
            self.kube.clone(),
            self.recorder.clone(),
            self.pulls.clone(),
            self.done.clone(),
        );
        tokio::spawn(async move {
            let result = match &source {
                Source::Http(url) => blobs.pull(&digest, url, size, &http).await,
                Source::Oci(oci) => match oci
                    .0
                    .fetch(&kube, (!verify_only).then_some(&*blobs), &digest, size)
                    .await
                {
                    Ok(Fetched {
                        size,
                        tag_moved: Some(note),
                    }) => {
                        tracing::warn!(%note, "tag moved");
                        let event = Event {
                            type_: EventType::Warning,
                            reason: "TagMoved".into(),
                            note: Some(note),
                            action: "Fetch".into(),
                            secondary: None,
                        };
                        if let Err(e) = recorder.publish(&event, &oci.1).await {
                            tracing::debug!(error = %e, "event not recorded");
                        }
                        Ok(size)
                    }
                    other => other.map(|f| f.size),
                },
            };
            let mut pulls = all.lock().expect("lock poisoned");
            match result {
                Ok(size) if verify_only => {
                    tracing::info!(%digest, ?source, "artifact verified in the registry; relays fetch it");
                    pulls.insert(
                        digest,
                        Pull::Verified {
                            size,
                            source: key,
                            at: Instant::now(),
                        },
                    );
                }
                Ok(_) => {
                    tracing::info!(%digest, ?source, "artifact fetched and verified");
                    pulls.remove(&digest);
                }
                Err(message) => {
                    tracing::warn!(%message, "artifact fetch failed");
                    pulls.insert(
                        digest,
                        Pull::Failed {
                            message,
                            at: Instant::now(),
                        },
                    );
                }
            }
            done.notify_one();
        });
        match verified {
            Some(size) => ArtifactState::InRegistry(size),
            None => ArtifactState::Fetching,
        }
    }

    /// Why the registry of the `oci` cabinet `source` (no package) cannot
    /// be used, as its last probe found; probes it again every
    /// [`PROBE_EVERY`] (at once when the cabinet's registry, Secret or CA
    /// changed), the engine woken with the answer.
    pub fn unreachable(&self, cabinet: &str, source: OciSource) -> Option<String> {
        let prefix = format!("{}/{cabinet}|", source.namespace);
        let key = format!(
            "{prefix}{:?}|{:?}|{:?}",
            source.store.repository, source.store.credentials_secret, source.store.ca_bundle
        );
        let mut probes = self.probes.lock().expect("lock poisoned");
        // What was found of the cabinet as it was before goes.
        probes.retain(|k, _| !k.starts_with(&prefix) || *k == key);
        let probe = probes.entry(key.clone()).or_default();
        // (A little early rather than a whole period late: the engine's
        // wake-ups come every PROBE_EVERY.)
        let due = !probe.running
            && probe
                .ended
                .is_none_or(|t| t.elapsed() + Duration::from_secs(30) > PROBE_EVERY);
        if due {
            probe.running = true;
            let (kube, all, done) = (self.kube.clone(), self.probes.clone(), self.done.clone());
            tokio::spawn(async move {
                let result = source.probe(&kube).await;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "cabinet registry probe failed");
                }
                if let Some(p) = all.lock().expect("lock poisoned").get_mut(&key) {
                    *p = Probe {
                        running: false,
                        ended: Some(Instant::now()),
                        error: result.err(),
                    };
                }
                done.notify_one();
            });
        }
        probe.error.clone()
    }

    /// Resolves when a fetch has finished since the last call.
    pub async fn finished(&self) {
        self.done.notified().await
    }
}
