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
}

impl Cache {
    pub async fn open(
        dir: PathBuf,
        upstream: Upstream,
        upstream_bytes: prometheus_client::metrics::counter::Counter,
        limit: Option<crate::ratelimit::RateLimit>,
    ) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir.join("sha256")).await?;
        tokio::fs::create_dir_all(dir.join("partial")).await?;
        Ok(Self {
            dir,
            upstream,
            inflight: Mutex::new(HashMap::new()),
            upstream_bytes,
            limit,
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

    async fn fetch(&self, hex: &str) -> Result<PathBuf, CacheError> {
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
