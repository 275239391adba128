//! The relay's content-addressed blob cache, `<dir>/sha256/<hex>`.
//!
//! A missing blob is fetched from upstream once, however many agents ask at
//! the same time (the others wait for that fetch), into `<dir>/partial/<hex>`,
//! resuming from what an interrupted fetch left there. It enters the cache
//! only after its sha256 matches.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use futures::{
    future::{BoxFuture, Shared},
    FutureExt, StreamExt,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

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

/// A fetch in progress, awaited by every request for the same blob.
type Fetch = Shared<BoxFuture<'static, Result<PathBuf, Arc<CacheError>>>>;

pub struct Cache {
    dir: PathBuf,
    upstream: Upstream,
    inflight: Mutex<HashMap<String, Fetch>>,
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
}

/// Keeps a blob from eviction while a response serves it.
pub struct Lease {
    cache: Arc<Cache>,
    hex: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
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
        })
    }

    pub fn path(&self, hex: &str) -> PathBuf {
        self.dir.join("sha256").join(hex)
    }

    /// Returns the path of the cached blob, fetching it first if needed, and
    /// whether it was already cached. Concurrent requests for a missing blob
    /// share one fetch, which runs as a task of its own: it completes (or
    /// fails cleanly) even if every requester goes away.
    pub async fn ensure(self: &Arc<Self>, hex: &str) -> Result<(PathBuf, bool), Arc<CacheError>> {
        let path = self.path(hex);
        self.used
            .lock()
            .expect("lock poisoned")
            .insert(hex.to_string(), SystemTime::now());
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok((path, true));
        }
        let fetch = self
            .inflight
            .lock()
            .expect("lock poisoned")
            .entry(hex.to_string())
            .or_insert_with(|| {
                let (cache, hex) = (Arc::clone(self), hex.to_string());
                let task = tokio::spawn(async move {
                    let result = cache.fetch(&hex).await.map_err(Arc::new);
                    if result.is_ok() {
                        match cache.enforce_limit(&hex).await {
                            Ok(evicted) => evicted.iter().for_each(
                                |h| tracing::info!(blob = %h, "evicted (cache size limit)"),
                            ),
                            Err(e) => tracing::warn!(error = %e, "cache size limit not enforced"),
                        }
                    }
                    cache.inflight.lock().expect("lock poisoned").remove(&hex);
                    result
                });
                async move {
                    task.await
                        .unwrap_or_else(|e| Err(Arc::new(CacheError::Task(e.to_string()))))
                }
                .boxed()
                .shared()
            })
            .clone();
        fetch.await.map(|p| (p, false))
    }

    /// The transfer window, if any.
    pub fn window(&self) -> Option<crate::window::Window> {
        self.window
    }

    async fn fetch(&self, hex: &str) -> Result<PathBuf, CacheError> {
        if let Some(window) = self.window {
            if let Some(minutes) = window.opens_in_now() {
                return Err(CacheError::OutsideWindow { window, minutes });
            }
        }
        let partial = self.dir.join("partial").join(hex);
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| CacheError::Io { path, source }
        };
        // Resume: hash what an earlier, interrupted fetch already stored.
        let (mut hasher, mut offset) = caravan_net::hash_partial(&partial)
            .await
            .map_err(io(&partial))?;
        let res = match self.upstream.blob(hex, offset).await {
            // The partial file is as long as the blob or longer: start over.
            Err(UpstreamError::Status { status, .. })
                if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE =>
            {
                tokio::fs::remove_file(&partial)
                    .await
                    .map_err(io(&partial))?;
                offset = 0;
                self.upstream.blob(hex, 0).await?
            }
            r => r?,
        };
        let resumed = res.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        if !resumed {
            hasher = Sha256::new();
            offset = 0;
        }
        tracing::info!(blob = %hex, resume_from = offset, "fetching blob from upstream");
        let mut file = caravan_net::open_partial(&partial, resumed)
            .await
            .map_err(io(&partial))?;
        let mut body = res.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| CacheError::Transfer {
                hex: hex.to_string(),
                source,
            })?;
            hasher.update(&chunk);
            self.upstream_bytes.inc_by(chunk.len() as u64);
            if let Some(limit) = &self.limit {
                limit.take(chunk.len()).await;
            }
            file.write_all(&chunk).await.map_err(io(&partial))?;
        }
        file.sync_all().await.map_err(io(&partial))?;
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
}

impl Cache {
    /// Keeps `hex` from eviction until the lease is dropped.
    pub fn lease(self: &Arc<Self>, hex: &str) -> Lease {
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
    /// are assigned). An agent still downloading one keeps its open file.
    pub async fn retain(
        &self,
        keep: &std::collections::HashSet<&str>,
    ) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut dir = tokio::fs::read_dir(self.dir.join("sha256")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let hex = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(format!("sha256:{hex}").as_str()) {
                tokio::fs::remove_file(entry.path()).await?;
                removed.push(hex);
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
