//! The relay's content-addressed blob cache, `<dir>/sha256/<hex>`.
//!
//! A missing blob is fetched from upstream once, however many agents ask at
//! the same time, into `<dir>/partial/<hex>`: resuming from what an
//! interrupted fetch left there, and riding out upstream outages by resuming
//! again. Responses stream the blob from that file while it arrives; it
//! enters the cache only after its sha256 matches.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::{
    future::{BoxFuture, Shared},
    FutureExt, Stream, StreamExt,
};
use sha2::{Digest, Sha256};
use tokio::{io::AsyncWriteExt, sync::watch};

use crate::upstream::{Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(
        "digest mismatch: upstream sent sha256:{actual} for blob sha256:{expected}; not cached"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("upstream transfer of sha256:{hex} broke off: {source}")]
    Transfer {
        hex: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream transfer of sha256:{hex} ended at byte {at} of {len}")]
    Short { hex: String, at: u64, len: u64 },
    #[error("upstream sent sha256:{hex} without its length")]
    NoLength { hex: String },
    #[error(
        "upstream sent sha256:{hex} anew instead of resuming it; fetching it again from the start"
    )]
    Restarted { hex: String },
    #[error("blob not cached yet, and upstream fetches wait for the transfer window {window} (opens in {minutes} min)")]
    OutsideWindow {
        window: crate::window::Window,
        minutes: u32,
    },
    #[error("fetch task failed: {0}")]
    Task(String),
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    /// Whether trying again may succeed: upstream was away or broke off, as
    /// opposed to refusing the request or sending a wrong blob.
    fn transient(&self) -> bool {
        match self {
            Self::Upstream(UpstreamError::Request { .. })
            | Self::Transfer { .. }
            | Self::Short { .. } => true,
            Self::Upstream(UpstreamError::Status { status, .. }) => status.is_server_error(),
            _ => false,
        }
    }
}

/// The result of a fetch, awaited by every request for the same blob.
type Fetch = Shared<BoxFuture<'static, Result<PathBuf, Arc<CacheError>>>>;

/// How far the fetch of a blob has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Upstream has not answered yet.
    Starting,
    /// The first `written` of the blob's `len` bytes are in its partial file.
    Arriving { len: u64, written: u64 },
    /// Over: the fetch's result says how it ended.
    Over,
}

/// A fetch in progress.
#[derive(Clone)]
struct Inflight {
    result: Fetch,
    progress: watch::Receiver<Progress>,
}

/// A blob as a response reads it: from the cache, or from its partial file
/// as far as it has arrived. The digest of an arriving blob is checked at
/// the end (by the relay before caching it, and by the agent), and a failed
/// fetch ends the stream with an error, so a reader never takes a wrong blob
/// for a complete one.
pub struct Reader {
    file: Arc<std::fs::File>,
    pub len: u64,
    /// Whether the blob was in the cache already when asked for.
    pub hit: bool,
    /// The fetch, while the blob is arriving.
    fetch: Option<Inflight>,
    buf: bytes::BytesMut,
}

/// Attempts a fetch makes, each resuming where the last broke off, before it fails.
const ATTEMPTS: u32 = 6;

impl Reader {
    /// The bytes of `range` of the blob, as they arrive. Every read is
    /// sized by how many responses run at that moment (see
    /// [`caravan_net::server::blob_chunk`]); `lease` is held until the
    /// stream is dropped.
    pub fn stream(
        self,
        range: std::ops::Range<u64>,
        lease: Lease,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        let end = range.end;
        futures::stream::try_unfold(
            (self, range.start, lease),
            move |(mut this, pos, lease)| async move {
                let max = caravan_net::server::blob_chunk(lease.cache.serving()) as u64;
                let max = max.min(end.saturating_sub(pos));
                Ok(this.chunk(pos, max).await?.map(|chunk| {
                    let next = pos + chunk.len() as u64;
                    (chunk, (this, next, lease))
                }))
            },
        )
    }

    /// Up to `max` bytes from `pos` on, waiting for some to arrive if none
    /// have; `None` at the end of the blob.
    async fn chunk(&mut self, pos: u64, max: u64) -> std::io::Result<Option<Bytes>> {
        if pos >= self.len || max == 0 {
            return Ok(None);
        }
        let available = self.available(pos).await?;
        let file = Arc::clone(&self.file);
        let len = (available - pos).min(max) as usize;
        // Read straight into a buffer the connection then writes from; its
        // memory is used again once the connection has let go of it (fresh
        // memory for every read costs more than zeroing the old).
        let mut buf = std::mem::take(&mut self.buf);
        let mut buf = tokio::task::spawn_blocking(move || {
            buf.reserve(len);
            buf.resize(len, 0);
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, pos).map(|()| buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        let chunk = buf.split().freeze();
        self.buf = buf;
        Ok(Some(chunk))
    }

    /// How much of the blob is there to read, waiting until it is more than `pos`.
    async fn available(&mut self, pos: u64) -> std::io::Result<u64> {
        let Some(fetch) = &mut self.fetch else {
            return Ok(self.len);
        };
        loop {
            let progress = *fetch.progress.borrow_and_update();
            let available = match progress {
                Progress::Starting => 0,
                Progress::Arriving { written, .. } => written,
                Progress::Over => break,
            };
            if available > pos {
                return Ok(available);
            }
            if fetch.progress.changed().await.is_err() {
                break;
            }
        }
        // The fetch is over: all of it is there, or none of it is good.
        match fetch.result.clone().await {
            Ok(_) => {
                self.fetch = None;
                Ok(self.len)
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }
}

pub struct Cache {
    dir: PathBuf,
    upstream: Upstream,
    inflight: Mutex<HashMap<String, Inflight>>,
    upstream_bytes: prometheus_client::metrics::counter::Counter,
    /// Limit on the bytes per second fetched from upstream, if any.
    limit: Option<crate::ratelimit::RateLimit>,
    /// Largest total size of the cached blobs, if limited.
    max_bytes: Option<u64>,
    /// When upstream fetches may start, if limited.
    window: Option<crate::window::Window>,
    /// When each blob was last asked for (least recently used go first).
    used: Mutex<HashMap<String, SystemTime>>,
    /// Responses reading each blob now: never evicted while read.
    in_use: Mutex<HashMap<String, usize>>,
    /// Responses reading blobs now, all together.
    serving: std::sync::atomic::AtomicUsize,
}

/// Keeps a blob from eviction while a response serves it.
pub struct Lease {
    cache: Arc<Cache>,
    hex: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cache.serving.fetch_sub(1, Ordering::Relaxed);
        let mut in_use = self.cache.in_use.lock().expect("lock poisoned");
        if let Some(n) = in_use.get_mut(&self.hex) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.hex);
            }
        }
    }
}

impl Cache {
    pub async fn open(
        dir: PathBuf,
        upstream: Upstream,
        upstream_bytes: prometheus_client::metrics::counter::Counter,
        limit: Option<crate::ratelimit::RateLimit>,
        max_bytes: Option<u64>,
        window: Option<crate::window::Window>,
    ) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir.join("sha256")).await?;
        tokio::fs::create_dir_all(dir.join("partial")).await?;
        Ok(Self {
            dir,
            upstream,
            inflight: Mutex::new(HashMap::new()),
            upstream_bytes,
            limit,
            max_bytes,
            window,
            used: Mutex::new(HashMap::new()),
            in_use: Mutex::new(HashMap::new()),
            serving: Default::default(),
        })
    }

    pub fn path(&self, hex: &str) -> PathBuf {
        self.dir.join("sha256").join(hex)
    }

    fn partial(&self, hex: &str) -> PathBuf {
        self.dir.join("partial").join(hex)
    }

    /// The path of the cached blob, after fetching it if needed (prestaging).
    pub async fn ensure(self: &Arc<Self>, hex: &str) -> Result<PathBuf, Arc<CacheError>> {
        match self.start(hex).await {
            Ok(path) => Ok(path),
            Err(fetch) => fetch.result.await,
        }
    }

    /// The blob: from the cache if it is there, else as it arrives from
    /// upstream (once upstream has started sending it).
    pub async fn get(self: &Arc<Self>, hex: &str) -> Result<Reader, Arc<CacheError>> {
        let mut fetch = match self.start(hex).await {
            Ok(path) => return self.cached(path, true).map_err(Arc::new),
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
        match std::fs::File::open(self.partial(hex)) {
            Ok(file) if len > 0 => Ok(Reader {
                file: Arc::new(file),
                len,
                hit: false,
                fetch: Some(fetch),
                buf: Default::default(),
            }),
            // Over already (complete and moved into the cache, or failed).
            _ => {
                let path = fetch.result.await?;
                self.cached(path, false).map_err(Arc::new)
            }
        }
    }

    fn cached(&self, path: PathBuf, hit: bool) -> Result<Reader, CacheError> {
        let io = |source| CacheError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(Reader {
            file: Arc::new(file),
            len,
            hit,
            fetch: None,
            buf: Default::default(),
        })
    }

    /// `Ok` with the path of a cached blob, else the fetch of it: the one in
    /// progress, or a new one. A fetch runs as a task of its own, so it
    /// completes (or fails cleanly) even if every requester goes away.
    async fn start(self: &Arc<Self>, hex: &str) -> Result<PathBuf, Inflight> {
        let path = self.path(hex);
        self.used
            .lock()
            .expect("lock poisoned")
            .insert(hex.to_string(), SystemTime::now());
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let mut inflight = self.inflight.lock().expect("lock poisoned");
        if let Some(fetch) = inflight.get(hex) {
            return Err(fetch.clone());
        }
        let (progress, progress_rx) = watch::channel(Progress::Starting);
        let (cache, hex) = (Arc::clone(self), hex.to_string());
        let task = tokio::spawn({
            let hex = hex.clone();
            async move {
                let result = cache.fetch(&hex, &progress).await.map_err(Arc::new);
                if result.is_ok() {
                    match cache.enforce_limit(&hex).await {
                        Ok(evicted) => evicted
                            .iter()
                            .for_each(|h| tracing::info!(blob = %h, "evicted (cache size limit)")),
                        Err(e) => tracing::warn!(error = %e, "cache size limit not enforced"),
                    }
                }
                cache.inflight.lock().expect("lock poisoned").remove(&hex);
                progress.send_replace(Progress::Over);
                result
            }
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
        inflight.insert(hex, fetch.clone());
        Err(fetch)
    }

    /// The transfer window, if any.
    pub fn window(&self) -> Option<crate::window::Window> {
        self.window
    }

    /// Fetches a blob into the cache, resuming after upstream failures.
    async fn fetch(
        &self,
        hex: &str,
        progress: &watch::Sender<Progress>,
    ) -> Result<PathBuf, CacheError> {
        if let Some(window) = self.window {
            if let Some(minutes) = window.opens_in_now() {
                return Err(CacheError::OutsideWindow { window, minutes });
            }
        }
        let partial = self.partial(hex);
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| CacheError::Io { path, source }
        };
        // Resume: hash what an earlier, interrupted fetch already stored.
        let (hasher, written) = caravan_net::hash_partial(&partial)
            .await
            .map_err(io(&partial))?;
        let mut transfer = Transfer {
            hex,
            hasher,
            written,
            file: None,
        };
        let mut attempt = 1;
        let mut backoff = Duration::from_secs(1);
        loop {
            let before = transfer.written;
            match self.transfer(&mut transfer, progress).await {
                Ok(()) => break,
                Err(e) if e.transient() && attempt < ATTEMPTS => {
                    tracing::warn!(blob = %hex, error = %e, at = transfer.written, retry_in = ?backoff, "upstream fetch interrupted; resuming");
                    tokio::time::sleep(backoff).await;
                    // Progress made: the link works, if unsteadily.
                    if transfer.written > before {
                        attempt = 1;
                        backoff = Duration::from_secs(1);
                    } else {
                        attempt += 1;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                Err(e) => {
                    if matches!(e, CacheError::Restarted { .. }) {
                        let _ = tokio::fs::remove_file(&partial).await;
                    }
                    return Err(e);
                }
            }
        }
        let Transfer { hasher, file, .. } = transfer;
        if let Some((file, _)) = file {
            file.sync_all().await.map_err(io(&partial))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != hex {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(CacheError::DigestMismatch {
                expected: hex.to_string(),
                actual,
            });
        }
        let path = self.path(hex);
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(io(&path))?;
        Ok(path)
    }

    /// One upstream request of a fetch: appends what it sends to the partial file.
    async fn transfer(
        &self,
        t: &mut Transfer<'_>,
        progress: &watch::Sender<Progress>,
    ) -> Result<(), CacheError> {
        let partial = self.partial(t.hex);
        let io = |source| CacheError::Io {
            path: partial.clone(),
            source,
        };
        let res = match self.upstream.blob(t.hex, t.written).await {
            // What an earlier process left is as long as the blob or longer: start over.
            Err(UpstreamError::Status { status, .. })
                if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && t.file.is_none() =>
            {
                t.restart();
                self.upstream.blob(t.hex, 0).await?
            }
            r => r?,
        };
        let resumed = res.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        if !resumed && t.written > 0 {
            // Readers have been sent the bytes so far: they must not be spliced with others.
            if t.file.is_some() {
                return Err(CacheError::Restarted {
                    hex: t.hex.to_string(),
                });
            }
            t.restart();
        }
        let len = t.written
            + res.content_length().ok_or_else(|| CacheError::NoLength {
                hex: t.hex.to_string(),
            })?;
        if let Some((_, known)) = &t.file {
            if *known != len {
                return Err(CacheError::Restarted {
                    hex: t.hex.to_string(),
                });
            }
        } else {
            tracing::info!(blob = %t.hex, resume_from = t.written, len, "fetching blob from upstream");
            let file = caravan_net::open_partial(&partial, resumed)
                .await
                .map_err(io)?;
            t.file = Some((file, len));
            progress.send_replace(Progress::Arriving {
                len,
                written: t.written,
            });
        }
        let (file, _) = t.file.as_mut().expect("opened above");
        let mut body = res.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| CacheError::Transfer {
                hex: t.hex.to_string(),
                source,
            })?;
            t.hasher.update(&chunk);
            self.upstream_bytes.inc_by(chunk.len() as u64);
            // Written through to the file before readers are told it is there.
            file.write_all(&chunk).await.map_err(io)?;
            file.flush().await.map_err(io)?;
            t.written += chunk.len() as u64;
            progress.send_replace(Progress::Arriving {
                len,
                written: t.written,
            });
            if let Some(limit) = &self.limit {
                limit.take(chunk.len()).await;
            }
        }
        if t.written != len {
            return Err(CacheError::Short {
                hex: t.hex.to_string(),
                at: t.written,
                len,
            });
        }
        Ok(())
    }
}

/// The state of a fetch across its upstream requests.
struct Transfer<'a> {
    hex: &'a str,
    hasher: Sha256,
    /// Bytes in the partial file.
    written: u64,
    /// The partial file, once upstream has started sending, and the blob's length.
    file: Option<(tokio::fs::File, u64)>,
}

impl Transfer<'_> {
    fn restart(&mut self) {
        self.hasher = Sha256::new();
        self.written = 0;
    }
}

impl Cache {
    /// Keeps `hex` from eviction until the lease is dropped.
    pub fn lease(self: &Arc<Self>, hex: &str) -> Lease {
        self.serving.fetch_add(1, Ordering::Relaxed);
        *self
            .in_use
            .lock()
            .expect("lock poisoned")
            .entry(hex.to_string())
            .or_default() += 1;
        Lease {
            cache: Arc::clone(self),
            hex: hex.to_string(),
        }
    }

    /// How many responses are reading blobs now.
    pub fn serving(&self) -> usize {
        self.serving.load(Ordering::Relaxed)
    }

    /// Evicts least recently used blobs until the cache fits its size
    /// limit, never one being served nor `protect` (the blob just fetched).
    pub async fn enforce_limit(&self, protect: &str) -> std::io::Result<Vec<String>> {
        let Some(max) = self.max_bytes else {
            return Ok(vec![]);
        };
        let mut blobs = Vec::new();
        let mut total = 0;
        let mut dir = tokio::fs::read_dir(self.dir.join("sha256")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let meta = entry.metadata().await?;
            let hex = entry.file_name().to_string_lossy().into_owned();
            let last = self.used.lock().expect("lock poisoned").get(&hex).copied();
            total += meta.len();
            blobs.push((
                last.unwrap_or(meta.modified()?),
                hex,
                meta.len(),
                entry.path(),
            ));
        }
        blobs.sort();
        let mut evicted = Vec::new();
        for (_, hex, size, path) in blobs {
            if total <= max {
                break;
            }
            if hex == protect
                || self
                    .in_use
                    .lock()
                    .expect("lock poisoned")
                    .contains_key(&hex)
            {
                continue;
            }
            tokio::fs::remove_file(&path).await?;
            self.used.lock().expect("lock poisoned").remove(&hex);
            total -= size;
            evicted.push(hex);
        }
        Ok(evicted)
    }

    /// Bytes of the blobs in the cache.
    pub async fn bytes(&self) -> std::io::Result<u64> {
        let mut total = 0;
        let mut dir = tokio::fs::read_dir(self.dir.join("sha256")).await?;
        while let Some(entry) = dir.next_entry().await? {
            total += entry.metadata().await?.len();
        }
        Ok(total)
    }

    /// Drops the cached blobs not in `keep` (the digests the site's agents
    /// are assigned), and what interrupted fetches of others left. An agent
    /// still downloading one keeps its open file.
    pub async fn retain(
        &self,
        keep: &std::collections::HashSet<&str>,
    ) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for sub in ["sha256", "partial"] {
            let mut dir = tokio::fs::read_dir(self.dir.join(sub)).await?;
            while let Some(entry) = dir.next_entry().await? {
                let hex = entry.file_name().to_string_lossy().into_owned();
                let fetching = || {
                    self.inflight
                        .lock()
                        .expect("lock poisoned")
                        .contains_key(&hex)
                };
                if !keep.contains(format!("sha256:{hex}").as_str()) && !fetching() {
                    tokio::fs::remove_file(entry.path()).await?;
                    removed.push(hex);
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_size_limit_evicts_the_least_recently_used_blob_but_never_one_being_served() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Upstream::new("http://127.0.0.1:9", "token", None).unwrap();
        let cache = Arc::new(
            Cache::open(
                dir.path().to_path_buf(),
                upstream,
                Default::default(),
                None,
                Some(250),
                None,
            )
            .await
            .unwrap(),
        );
        for hex in ["aa", "bb", "cc", "dd"] {
            std::fs::write(cache.path(hex), [0u8; 100]).unwrap();
        }
        // Used in this order: aa (oldest), bb, cc, dd; aa is being served.
        for hex in ["aa", "bb", "cc", "dd"] {
            cache.ensure(hex).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lease = cache.lease("aa");
        let evicted = cache.enforce_limit("dd").await.unwrap();
        assert_eq!(
            evicted,
            ["bb", "cc"],
            "400 bytes down to 200: the oldest not in use go"
        );
        assert!(cache.path("aa").exists() && cache.path("dd").exists());
        drop(lease);
        std::fs::write(cache.path("ee"), [0u8; 100]).unwrap();
        cache.ensure("ee").await.unwrap();
        assert_eq!(
            cache.enforce_limit("ee").await.unwrap(),
            ["aa"],
            "once served, aa is the oldest"
        );
    }
}
