//! Fetching a blob from upstream into the cache: once, resumed after an
//! interruption (Range + If-Range on the digest), verified before it
//! enters the cache, with progress published to the responses streaming it.

use std::{path::PathBuf, time::Duration};

use caravan_api::Digest;
use caravan_net::Backoff;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::{io::AsyncWriteExt, sync::watch};

use super::{reader::Progress, Cache};
use crate::{registry::RegistryError, upstream::UpstreamError, window::Window};

/// Attempts a fetch makes, each resuming where the last broke off, before it fails.
const ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("digest mismatch: upstream sent {actual} for blob {expected}; not cached")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upstream transfer of {digest} broke off: {source}")]
    Transfer {
        digest: Digest,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream transfer of {digest} ended at byte {at} of {len}")]
    Short { digest: Digest, at: u64, len: u64 },
    #[error("upstream sent {digest} without its length")]
    NoLength { digest: Digest },
    #[error(
        "upstream sent {digest} anew instead of resuming it; fetching it again from the start"
    )]
    Restarted { digest: Digest },
    #[error("waiting for the transfer window, opens {} (in {minutes} min): the relay fetches the blob then", window.opening())]
    OutsideWindow { window: Window, minutes: u32 },
    #[error("the relay on the same cache that was fetching {digest} stopped before it was complete; asking again fetches it here")]
    FollowedFetchStopped { digest: Digest },
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
    /// Whether the range asked for was refused (416).
    fn range_not_satisfiable(&self) -> bool {
        match self {
            Self::Upstream(UpstreamError::Status { status, .. }) => {
                *status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE
            }
            Self::Registry(e) => e.range_not_satisfiable(),
            _ => false,
        }
    }

    /// Whether trying again may succeed: upstream was away or broke off, as
    /// opposed to refusing the request or sending a wrong blob.
    fn transient(&self) -> bool {
        match self {
            Self::Upstream(UpstreamError::Request { .. })
            | Self::Transfer { .. }
            | Self::Short { .. } => true,
            Self::Upstream(UpstreamError::Status { status, .. }) => status.is_server_error(),
            Self::Registry(e) => e.transient(),
            _ => false,
        }
    }
}

impl Cache {
    /// Fetches a blob into the cache, resuming after upstream failures.
    pub(super) async fn fetch(
        &self,
        digest: &Digest,
        progress: &watch::Sender<Progress>,
    ) -> Result<PathBuf, CacheError> {
        if let Some(window) = &self.window {
            if let Some(minutes) = window.opens_in_now() {
                let window = window.clone();
                return Err(CacheError::OutsideWindow { window, minutes });
            }
        }
        let partial = self.partial(digest);
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| CacheError::Io { path, source }
        };
        // Resume: hash what an earlier, interrupted fetch already stored.
        let (hasher, written) = caravan_net::hash_partial(&partial)
            .await
            .map_err(io(&partial))?;
        let mut transfer = Transfer {
            digest,
            hasher,
            written,
            file: None,
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let before = transfer.written;
            match self.transfer(&mut transfer, progress).await {
                Ok(()) => break,
                Err(e) if e.transient() && backoff.failures() + 1 < ATTEMPTS => {
                    let delay = backoff.next_delay();
                    tracing::warn!(blob = %digest, error = %caravan_net::Chain(&e), at = transfer.written, retry_in = ?delay, "upstream fetch interrupted; resuming");
                    tokio::time::sleep(delay).await;
                    // Progress made: the link works, if unsteadily.
                    if transfer.written > before {
                        backoff.reset();
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
        let actual = Digest::from_hasher(hasher);
        if actual != *digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(CacheError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        let path = self.path(digest);
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(io(&path))?;
        Ok(path)
    }

    /// Asks for the blob from byte `offset`: from the registry the site's
    /// desired state names for it, else from upstream. Also says which.
    async fn request(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<(reqwest::Response, &'static str), CacheError> {
        match self.registries.blob(digest, offset).await {
            Some(res) => Ok((res?, "the registry")),
            None => Ok((self.upstream.blob(digest, offset).await?, "upstream")),
        }
    }

    /// One upstream request of a fetch: appends what it sends to the partial file.
    async fn transfer(
        &self,
        t: &mut Transfer<'_>,
        progress: &watch::Sender<Progress>,
    ) -> Result<(), CacheError> {
        let partial = self.partial(t.digest);
        let io = |source| CacheError::Io {
            path: partial.clone(),
            source,
        };
        let (res, from) = match self.request(t.digest, t.written).await {
            // What an earlier process left is as long as the blob or longer: start over.
            Err(e) if e.range_not_satisfiable() && t.file.is_none() => {
                t.restart();
                self.request(t.digest, 0).await?
            }
            r => r?,
        };
        let resumed = res.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        if !resumed && t.written > 0 {
            // Readers have been sent the bytes so far: they must not be spliced with others.
            if t.file.is_some() {
                return Err(CacheError::Restarted { digest: *t.digest });
            }
            t.restart();
        }
        let len = t.written
            + res
                .content_length()
                .ok_or(CacheError::NoLength { digest: *t.digest })?;
        if let Some((_, known)) = &t.file {
            if *known != len {
                return Err(CacheError::Restarted { digest: *t.digest });
            }
        } else {
            tracing::info!(blob = %t.digest, resume_from = t.written, len, "fetching blob from {from}");
            let file = caravan_net::open_partial(&partial, resumed)
                .await
                .map_err(io)?;
            // For relays on the same cache directory following this fetch.
            let len_path = self.len_path(t.digest);
            tokio::fs::write(&len_path, super::shared::format_len(len))
                .await
                .map_err(|source| CacheError::Io {
                    path: len_path,
                    source,
                })?;
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
                digest: *t.digest,
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
                digest: *t.digest,
                at: t.written,
                len,
            });
        }
        Ok(())
    }
}

/// The state of a fetch across its upstream requests.
struct Transfer<'a> {
    digest: &'a Digest,
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
