//! The built-in cabinet store: a content-addressed directory of blobs,
//! `<root>/sha256/<hex>`. A blob is written to a temporary file while its
//! sha256 is computed and renamed into place only if it matches the digest it
//! was uploaded under, so the store never holds a blob under a wrong name.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Mutex,
};

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("digest mismatch: uploaded bytes have sha256:{actual}, expected sha256:{expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("upload interrupted after {received} bytes ({reason}); resume it from there")]
    Interrupted { received: u64, reason: String },
    #[error(
        "cannot resume at byte {requested}: the stored part of this upload has {stored} bytes"
    )]
    Offset { requested: u64, stored: u64 },
    #[error("another upload of this blob is in progress")]
    Busy,
    #[error("blob store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The built-in store. Uploads are resumable: an interrupted one keeps what
/// arrived in `<root>/uploads/<hex>`, and a later upload of the same blob can
/// continue at that offset.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    /// Blobs being uploaded right now (one upload per blob at a time).
    uploading: Mutex<HashSet<String>>,
}

impl BlobStore {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            uploading: Mutex::new(HashSet::new()),
        }
    }

    /// Where the blob with this sha256 hex digest lives.
    pub fn path(&self, hex: &str) -> PathBuf {
        self.root.join("sha256").join(hex)
    }

    fn partial(&self, hex: &str) -> PathBuf {
        self.root.join("uploads").join(hex)
    }

    /// Size of the stored blob, if present.
    pub async fn size(&self, hex: &str) -> Option<u64> {
        tokio::fs::metadata(self.path(hex))
            .await
            .ok()
            .map(|m| m.len())
    }

    /// Bytes of an interrupted upload of `hex` kept to be resumed.
    pub async fn upload_offset(&self, hex: &str) -> u64 {
        tokio::fs::metadata(self.partial(hex))
            .await
            .map_or(0, |m| m.len())
    }

    /// Streams `body` into the store under `hex`, continuing an interrupted
    /// upload at `offset` (0: from the start), and verifies the digest of the
    /// whole blob before it enters the store. Returns the blob's size.
    pub async fn put<S, E>(&self, hex: &str, offset: u64, mut body: S) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let _guard = UploadGuard::take(&self.uploading, hex)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        for dir in [self.root.join("sha256"), self.root.join("uploads")] {
            tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        }
        let partial = self.partial(hex);
        let (mut hasher, mut size) = if offset > 0 {
            let (hasher, stored) = caravan_net::hash_partial(&partial)
                .await
                .map_err(io(&partial))?;
            if stored != offset {
                return Err(StoreError::Offset {
                    requested: offset,
                    stored,
                });
            }
            (hasher, stored)
        } else {
            (Sha256::new(), 0)
        };
        let mut file = caravan_net::open_partial(&partial, offset > 0)
            .await
            .map_err(io(&partial))?;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // Keep what arrived, to be resumed.
                    file.sync_all().await.map_err(io(&partial))?;
                    return Err(StoreError::Interrupted {
                        received: size,
                        reason: e.to_string(),
                    });
                }
            };
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io(&partial))?;
        }
        file.sync_all().await.map_err(io(&partial))?;
        let actual = hex::encode(hasher.finalize());
        if actual != hex {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(StoreError::DigestMismatch {
                expected: hex.to_string(),
                actual,
            });
        }
        let dest = self.path(hex);
        tokio::fs::rename(&partial, &dest)
            .await
            .map_err(io(&dest))?;
        Ok(size)
    }
}

impl BlobStore {
    /// Fetches a blob from an `http` cabinet into the store, verifying its
    /// size and digest. The error says what went wrong, naming the URL.
    pub async fn pull(
        &self,
        hex: &str,
        url: &str,
        size: u64,
        http: &reqwest::Client,
    ) -> Result<u64, String> {
        let res = http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("fetching {url}: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("fetching {url}: {}", res.status()));
        }
        if let Some(len) = res.content_length().filter(|len| *len != size) {
            return Err(format!("{url} is {len} bytes; the Package says {size}"));
        }
        let got = self
            .put(hex, 0, res.bytes_stream())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if got != size {
            let _ = tokio::fs::remove_file(self.path(hex)).await;
            return Err(format!("{url} is {got} bytes; the Package says {size}"));
        }
        Ok(got)
    }
}

/// Marks a blob as being uploaded until dropped.
struct UploadGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    hex: String,
}

impl<'a> UploadGuard<'a> {
    fn take(set: &'a Mutex<HashSet<String>>, hex: &str) -> Result<Self, StoreError> {
        if !set.lock().expect("lock poisoned").insert(hex.to_string()) {
            return Err(StoreError::Busy);
        }
        Ok(Self {
            set,
            hex: hex.to_string(),
        })
    }
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("lock poisoned").remove(&self.hex);
    }
}

impl BlobStore {
    /// Removes blobs not in `keep` whose last change is older than `grace`.
    /// Returns the digests removed.
    pub async fn remove_unreferenced(
        &self,
        keep: &std::collections::HashSet<String>,
        grace: std::time::Duration,
    ) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut dir = match tokio::fs::read_dir(self.root.join("sha256")).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(e),
        };
        while let Some(entry) = dir.next_entry().await? {
            let hex = entry.file_name().to_string_lossy().into_owned();
            let age = entry
                .metadata()
                .await?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if !keep.contains(&hex) && age >= grace {
                // A relay still reading it keeps its open file; new requests get 404.
                tokio::fs::remove_file(entry.path()).await?;
                removed.push(hex);
            }
        }
        Ok(removed)
    }
}

/// Removes, every `--blob-gc-interval-seconds`, the blobs no Package
/// references any more (after `--blob-grace-seconds`), so deleting a
/// package from Git frees its space.
pub async fn collect_garbage(ctx: std::sync::Arc<crate::context::Context>) {
    let interval = std::time::Duration::from_secs(ctx.config.blob_gc_interval_seconds.max(1));
    let grace = std::time::Duration::from_secs(ctx.config.blob_grace_seconds);
    loop {
        tokio::time::sleep(interval).await;
        // Only with a complete view of the packages: a half-filled cache
        // would make every blob look unreferenced.
        if futures::FutureExt::now_or_never(ctx.stores.packages.wait_until_ready()).is_none() {
            continue;
        }
        let keep = ctx
            .stores
            .packages
            .state()
            .iter()
            .filter_map(|p| {
                caravan_api::v1alpha1::sha256_hex(&p.spec.artifact.digest).map(str::to_owned)
            })
            .collect();
        match ctx.blobs.remove_unreferenced(&keep, grace).await {
            Ok(removed) => {
                for hex in removed {
                    tracing::info!(blob = %format!("sha256:{hex}"), "removed blob no package references");
                }
            }
            Err(e) => tracing::warn!(error = %e, "blob garbage collection failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(data: &[u8]) -> impl Stream<Item = Result<bytes::Bytes, String>> + Unpin {
        let chunks: Vec<_> = data
            .chunks(3)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks)
    }

    #[tokio::test]
    async fn blobs_enter_the_store_only_under_their_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf());
        let data = b"hello caravan";
        let hex = hex::encode(Sha256::digest(data));
        assert_eq!(
            store.put(&hex, 0, body(data)).await.unwrap(),
            data.len() as u64
        );
        assert_eq!(store.size(&hex).await, Some(data.len() as u64));

        let wrong = "0".repeat(64);
        let err = store.put(&wrong, 0, body(data)).await.unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert_eq!(store.size(&wrong).await, None);
        assert_eq!(
            store.upload_offset(&wrong).await,
            0,
            "a wrong upload is not kept"
        );
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf());
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let hex = hex::encode(Sha256::digest(&data));
        // The connection drops after 4000 bytes.
        let broken = futures::stream::iter(vec![
            Ok(bytes::Bytes::copy_from_slice(&data[..4000])),
            Err("reset".to_string()),
        ]);
        let err = store.put(&hex, 0, broken).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Interrupted { received: 4000, .. }),
            "{err}"
        );
        assert_eq!(store.upload_offset(&hex).await, 4000);
        // Resuming anywhere else is refused; at the right offset it completes.
        assert!(matches!(
            store.put(&hex, 3000, body(&data[3000..])).await,
            Err(StoreError::Offset { stored: 4000, .. })
        ));
        assert_eq!(
            store.put(&hex, 4000, body(&data[4000..])).await.unwrap(),
            10_000
        );
        assert_eq!(std::fs::read(store.path(&hex)).unwrap(), data);
        assert_eq!(store.upload_offset(&hex).await, 0);
    }
}
