//! The built-in cabinet store: a content-addressed directory of blobs,
//! `<root>/sha256/<hex>`. A blob is written to a temporary file while its
//! sha256 is computed and renamed into place only if it matches the digest it
//! was uploaded under, so the store never holds a blob under a wrong name.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Mutex,
};

use caravan_api::Digest;
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("digest mismatch: uploaded bytes have {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upload interrupted after {received} bytes ({reason}); resume it from there")]
    Interrupted { received: u64, reason: String },
    #[error(
        "cannot resume at byte {requested}: the stored part of this upload has {stored} bytes"
    )]
    Offset { requested: u64, stored: u64 },
    #[error("another upload of this blob is in progress")]
    Busy,
    #[error("the blob is larger than {max} bytes; refused")]
    TooLarge { max: u64 },
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
    uploading: Mutex<HashSet<Digest>>,
}

impl BlobStore {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            uploading: Mutex::new(HashSet::new()),
        }
    }

    /// Where the blob lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    fn partial(&self, digest: &Digest) -> PathBuf {
        self.root.join("uploads").join(digest.hex())
    }

    /// Size of the stored blob, if present.
    pub async fn size(&self, digest: &Digest) -> Option<u64> {
        tokio::fs::metadata(self.path(digest))
            .await
            .ok()
            .map(|m| m.len())
    }

    /// Bytes of an interrupted upload of `digest` kept to be resumed.
    pub async fn upload_offset(&self, digest: &Digest) -> u64 {
        tokio::fs::metadata(self.partial(digest))
            .await
            .map_or(0, |m| m.len())
    }

    /// Streams `body` into the store under `digest`, continuing an interrupted
    /// upload at `offset` (0: from the start), and verifies the digest of the
    /// whole blob before it enters the store. A blob growing past `max`
    /// bytes is refused as it arrives. Returns the blob's size.
    pub async fn put<S, E>(
        &self,
        digest: &Digest,
        offset: u64,
        max: u64,
        mut body: S,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let _guard = UploadGuard::take(&self.uploading, digest)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        for dir in [self.root.join("sha256"), self.root.join("uploads")] {
            tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        }
        let partial = self.partial(digest);
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
            size += chunk.len() as u64;
            if size > max {
                drop(file);
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(StoreError::TooLarge { max });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(&partial))?;
        }
        file.sync_all().await.map_err(io(&partial))?;
        let actual = Digest::from_hasher(hasher);
        if actual != *digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(StoreError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        let dest = self.path(digest);
        tokio::fs::rename(&partial, &dest)
            .await
            .map_err(io(&dest))?;
        Ok(size)
    }
}

impl BlobStore {
    /// Fetches a blob from an `http` cabinet into the store, verifying its
    /// size and digest (a server sending more than the Package says is cut
    /// off there). The error says what went wrong, naming the URL.
    pub async fn pull(
        &self,
        digest: &Digest,
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
        self.take(digest, size, res, url).await
    }

    /// Stores the blob a successful response `res` (from `from`) streams,
    /// verifying its size and digest.
    pub async fn take(
        &self,
        digest: &Digest,
        size: u64,
        res: reqwest::Response,
        from: &str,
    ) -> Result<u64, String> {
        if let Some(len) = res.content_length().filter(|len| *len != size) {
            return Err(format!("{from} is {len} bytes; the Package says {size}"));
        }
        let got = self
            .put(digest, 0, size, res.bytes_stream())
            .await
            .map_err(|e| format!("{from}: {e}"))?;
        if got != size {
            let _ = tokio::fs::remove_file(self.path(digest)).await;
            return Err(format!("{from} is {got} bytes; the Package says {size}"));
        }
        Ok(got)
    }
}

/// Marks a blob as being uploaded until dropped.
struct UploadGuard<'a> {
    set: &'a Mutex<HashSet<Digest>>,
    digest: Digest,
}

impl<'a> UploadGuard<'a> {
    fn take(set: &'a Mutex<HashSet<Digest>>, digest: &Digest) -> Result<Self, StoreError> {
        if !set.lock().expect("lock poisoned").insert(*digest) {
            return Err(StoreError::Busy);
        }
        Ok(Self {
            set,
            digest: *digest,
        })
    }
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("lock poisoned").remove(&self.digest);
    }
}

impl BlobStore {
    /// Removes what interrupted uploads left that nobody resumed within
    /// `grace` (an upload in progress keeps its part). Returns how many.
    pub async fn remove_stale_uploads(&self, grace: std::time::Duration) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut dir = match tokio::fs::read_dir(self.root.join("uploads")).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        while let Some(entry) = dir.next_entry().await? {
            let age = entry
                .metadata()
                .await?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            let uploading = Digest::from_hex(&entry.file_name().to_string_lossy())
                .is_ok_and(|d| self.uploading.lock().expect("lock poisoned").contains(&d));
            if age >= grace && !uploading {
                tokio::fs::remove_file(entry.path()).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes blobs not in `keep` whose last change is older than `grace`.
    /// Returns the digests removed.
    pub async fn remove_unreferenced(
        &self,
        keep: &HashSet<Digest>,
        grace: std::time::Duration,
    ) -> std::io::Result<Vec<Digest>> {
        let mut removed = Vec::new();
        let mut dir = match tokio::fs::read_dir(self.root.join("sha256")).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(e),
        };
        while let Some(entry) = dir.next_entry().await? {
            // Only blobs: anything else in there is not the store's to remove.
            let Ok(digest) = Digest::from_hex(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let age = entry
                .metadata()
                .await?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if !keep.contains(&digest) && age >= grace {
                // A relay still reading it keeps its open file; new requests get 404.
                tokio::fs::remove_file(entry.path()).await?;
                removed.push(digest);
            }
        }
        Ok(removed)
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
        let digest = Digest::of(data);
        assert_eq!(
            store.put(&digest, 0, u64::MAX, body(data)).await.unwrap(),
            data.len() as u64
        );
        assert_eq!(store.size(&digest).await, Some(data.len() as u64));

        let wrong = Digest::of(b"something else");
        let err = store
            .put(&wrong, 0, u64::MAX, body(data))
            .await
            .unwrap_err();
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
        let digest = Digest::of(&data);
        // The connection drops after 4000 bytes.
        let broken = futures::stream::iter(vec![
            Ok(bytes::Bytes::copy_from_slice(&data[..4000])),
            Err("reset".to_string()),
        ]);
        let err = store.put(&digest, 0, u64::MAX, broken).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Interrupted { received: 4000, .. }),
            "{err}"
        );
        assert_eq!(store.upload_offset(&digest).await, 4000);
        // Resuming anywhere else is refused; at the right offset it completes.
        assert!(matches!(
            store
                .put(&digest, 3000, u64::MAX, body(&data[3000..]))
                .await,
            Err(StoreError::Offset { stored: 4000, .. })
        ));
        assert_eq!(
            store
                .put(&digest, 4000, u64::MAX, body(&data[4000..]))
                .await
                .unwrap(),
            10_000
        );
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), data);
        assert_eq!(store.upload_offset(&digest).await, 0);
    }

    #[tokio::test]
    async fn only_unreferenced_blobs_past_their_grace_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf());
        let (kept, dropped) = (Digest::of(b"kept"), Digest::of(b"dropped"));
        for (d, data) in [(kept, &b"kept"[..]), (dropped, &b"dropped"[..])] {
            store.put(&d, 0, u64::MAX, body(data)).await.unwrap();
        }
        std::fs::write(dir.path().join("sha256/README"), "not a blob").unwrap();
        let keep = HashSet::from([kept]);
        let grace = std::time::Duration::from_secs(3600);
        assert!(
            store
                .remove_unreferenced(&keep, grace)
                .await
                .unwrap()
                .is_empty(),
            "a fresh upload waits for its commit"
        );
        let removed = store
            .remove_unreferenced(&keep, std::time::Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(removed, [dropped]);
        assert!(store.size(&kept).await.is_some());
        assert!(dir.path().join("sha256/README").exists());
    }

    #[tokio::test]
    async fn a_blob_larger_than_allowed_is_refused_as_it_arrives_and_stale_parts_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf());
        let data = vec![7u8; 10_000];
        let digest = Digest::of(&data);
        let e = store.put(&digest, 0, 4096, body(&data)).await.unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { max: 4096 }), "{e}");
        assert_eq!(store.upload_offset(&digest).await, 0, "nothing kept");
        // An interrupted upload nobody resumes goes after the grace.
        let broken = futures::stream::iter(vec![
            Ok(bytes::Bytes::copy_from_slice(&data[..100])),
            Err("reset".to_string()),
        ]);
        assert!(store.put(&digest, 0, u64::MAX, broken).await.is_err());
        assert_eq!(store.upload_offset(&digest).await, 100);
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(store.remove_stale_uploads(hour).await.unwrap(), 0);
        assert_eq!(
            store
                .remove_stale_uploads(std::time::Duration::ZERO)
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.upload_offset(&digest).await, 0);
    }
}
