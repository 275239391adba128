//! The relay's content-addressed blob cache, `<dir>/sha256/<hex>`.
//!
//! A missing blob is fetched from upstream once, however many agents ask at
//! the same time ([`fetch`]), into `<dir>/partial/<hex>`: resuming from what
//! an interrupted fetch left there, and riding out upstream outages by
//! resuming again. Responses stream the blob from that file while it
//! arrives ([`reader`]); it enters the cache only after its sha256 matches.
//! What no agent needs any more is dropped, and a size limit evicts the
//! least recently used blobs, never one being served ([`evict`]). Relays
//! sharing the cache directory fetch each blob once between them
//! ([`shared`]).

mod evict;
mod fetch;
mod reader;
mod shared;

use std::{
    collections::HashMap,
    fs::File,
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::SystemTime,
};

use caravan_api::Digest;
use futures::FutureExt;
use tokio::sync::watch;

pub use evict::Lease;
pub use fetch::CacheError;
pub use reader::Reader;
use reader::{Inflight, Progress};

use crate::{ratelimit::RateLimit, registry::Registries, upstream::Upstream, window::Window};

pub struct Cache {
    dir: PathBuf,
    upstream: Upstream,
    /// Blobs fetched from a registry instead of `upstream`.
    pub registries: Registries,
    inflight: Mutex<HashMap<Digest, Inflight>>,
    upstream_bytes: prometheus_client::metrics::counter::Counter,
    /// Limit on the bytes per second fetched from upstream, if any.
    limit: Option<RateLimit>,
    /// Largest total size of the cached blobs, if limited.
    max_bytes: Option<u64>,
    /// When upstream fetches may start, if limited.
    window: Option<Window>,
    /// When each blob was last asked for (least recently used go first).
    used: Mutex<HashMap<Digest, SystemTime>>,
    /// Responses reading each blob now: never evicted while read.
    in_use: Mutex<HashMap<Digest, usize>>,
    /// Responses reading blobs now, all together.
    serving: std::sync::atomic::AtomicUsize,
    /// The open file of each cached blob being sent, shared by the
    /// responses that send it (each reads at its own offsets): a blob sent
    /// to 10,000 agents at once is one open file, not 10,000 against the
    /// process's limit. Closed when the last response ends.
    open: Mutex<HashMap<Digest, Weak<File>>>,
}

/// How a cache fetches and how big it may grow.
#[derive(Default)]
pub struct Limits {
    /// Bytes per second all upstream fetches take together.
    pub rate: Option<RateLimit>,
    /// Largest total size of the cached blobs.
    pub max_bytes: Option<u64>,
    /// When upstream fetches may start.
    pub window: Option<Window>,
}

impl Cache {
    pub async fn open(
        dir: PathBuf,
        upstream: Upstream,
        registries: Registries,
        upstream_bytes: prometheus_client::metrics::counter::Counter,
        limits: Limits,
    ) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir.join("sha256")).await?;
        tokio::fs::create_dir_all(dir.join("partial")).await?;
        Ok(Self {
            dir,
            upstream,
            registries,
            inflight: Mutex::new(HashMap::new()),
            upstream_bytes,
            limit: limits.rate,
            max_bytes: limits.max_bytes,
            window: limits.window,
            used: Mutex::new(HashMap::new()),
            in_use: Mutex::new(HashMap::new()),
            serving: Default::default(),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The cached blob's file: the one open already, if a response is
    /// sending it, else opened now.
    fn file(&self, digest: &Digest) -> std::io::Result<Arc<File>> {
        let mut open = self.open.lock().expect("lock poisoned");
        if let Some(file) = open.get(digest).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let file = Arc::new(File::open(self.path(digest))?);
        open.retain(|_, f| f.strong_count() > 0);
        open.insert(*digest, Arc::downgrade(&file));
        Ok(file)
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    fn partial(&self, digest: &Digest) -> PathBuf {
        self.dir.join("partial").join(digest.hex())
    }

    /// The transfer window, if any.
    pub fn window(&self) -> Option<&Window> {
        self.window.as_ref()
    }

    /// The path of the cached blob, after fetching it if needed (prestaging).
    pub async fn ensure(self: &Arc<Self>, digest: &Digest) -> Result<PathBuf, Arc<CacheError>> {
        match self.start(digest).await {
            Ok(path) => Ok(path),
            Err(fetch) => fetch.result.await,
        }
    }

    /// The blob: from the cache if it is there, else as it arrives from
    /// upstream (once upstream has started sending it).
    pub async fn get(self: &Arc<Self>, digest: &Digest) -> Result<Reader, Arc<CacheError>> {
        let mut fetch = match self.start(digest).await {
            Ok(_) => return self.reader(digest, true).map_err(Arc::new),
            Err(fetch) => fetch,
        };
        let len = loop {
            let progress = *fetch.progress.borrow_and_update();
            match progress {
                Progress::Arriving { len, .. } => break len,
                Progress::Over => break 0,
                Progress::Starting => {
                    if fetch.progress.changed().await.is_err() {
                        break 0;
                    }
                }
            }
        };
        match std::fs::File::open(self.partial(digest)) {
            Ok(file) if len > 0 => Ok(Reader::arriving(file, len, fetch)),
            // Over already (complete and moved into the cache, or failed).
            _ => {
                fetch.result.await?;
                self.reader(digest, false).map_err(Arc::new)
            }
        }
    }

    /// A reader of the cached blob.
    fn reader(&self, digest: &Digest, hit: bool) -> Result<Reader, CacheError> {
        Reader::cached(self.file(digest), self.path(digest), hit)
    }

    /// The blob's file, if it is in the cache now.
    pub fn cached(&self, digest: &Digest) -> Option<Arc<File>> {
        let file = self.file(digest).ok()?;
        self.used
            .lock()
            .expect("lock poisoned")
            .insert(*digest, SystemTime::now());
        Some(file)
    }

    /// `Ok` with the path of a cached blob, else the fetch of it: the one in
    /// progress, or a new one. A fetch runs as a task of its own, so it
    /// completes (or fails cleanly) even if every requester goes away.
    async fn start(self: &Arc<Self>, digest: &Digest) -> Result<PathBuf, Inflight> {
        let path = self.path(digest);
        self.used
            .lock()
            .expect("lock poisoned")
            .insert(*digest, SystemTime::now());
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let mut inflight = self.inflight.lock().expect("lock poisoned");
        if let Some(fetch) = inflight.get(digest) {
            return Err(fetch.clone());
        }
        let (progress, progress_rx) = watch::channel(Progress::Starting);
        let (cache, digest) = (Arc::clone(self), *digest);
        let task = tokio::spawn(async move {
            let result = cache
                .fetch_shared(&digest, &progress)
                .await
                .map_err(Arc::new);
            if result.is_ok() {
                match cache.enforce_limit(&digest).await {
                    Ok(evicted) => evicted
                        .iter()
                        .for_each(|d| tracing::info!(blob = %d, "evicted (cache size limit)")),
                    Err(e) => tracing::warn!(error = %e, "cache size limit not enforced"),
                }
            }
            cache
                .inflight
                .lock()
                .expect("lock poisoned")
                .remove(&digest);
            progress.send_replace(Progress::Over);
            result
        });
        let fetch = Inflight {
            result: async move {
                task.await
                    .unwrap_or_else(|e| Err(Arc::new(CacheError::Task(e.to_string()))))
            }
            .boxed()
            .shared(),
            progress: progress_rx,
        };
        inflight.insert(digest, fetch.clone());
        Err(fetch)
    }
}

/// A cache in `dir` for unit tests, whose upstream is unreachable (it can
/// only serve what is there, or what another relay on `dir` fetches).
#[cfg(test)]
pub(crate) async fn test_cache(dir: &std::path::Path, max_bytes: Option<u64>) -> Arc<Cache> {
    let upstream = Upstream::new("http://127.0.0.1:9", "token", None).unwrap();
    let limits = Limits {
        max_bytes,
        ..Default::default()
    };
    let cache = Cache::open(
        dir.to_path_buf(),
        upstream,
        Default::default(),
        Default::default(),
        limits,
    );
    Arc::new(cache.await.unwrap())
}
