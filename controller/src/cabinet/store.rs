//! The built-in cabinet store: a content-addressed directory of blobs,
//! `<root>/sha256/<hex>`. A blob is written to a temporary file while its
//! sha256 is computed and renamed into place only if it matches the digest it
//! was uploaded under, so the store never holds a blob under a wrong name.
//! Several controller replicas may share one store: every change to a blob
//! is made under its [`BlobLock`].

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use caravan_api::Digest;
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use caravan_net::lock::BlobLock;

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

/// Wraps an I/O error on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, source }
}

/// The built-in store. Uploads are resumable: an interrupted one keeps what
/// arrived in `<root>/uploads/<hex>`, and a later upload of the same blob can
/// continue at that offset (through any replica).
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the blob lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join(caravan_api::backup::blob_path(digest))
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

    /// Takes the lock of `digest`'s blob (`None`: somebody holds it).
    async fn lock(&self, digest: &Digest) -> Result<Option<BlobLock>, StoreError> {
        let dir = self.root.join("uploads");
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let path = self.partial(digest);
        BlobLock::try_take(path.clone()).await.map_err(io(&path))
    }

    /// The size of the stored blob, for a push about to reference it: its
    /// grace before garbage collection starts again, under its lock, so a
    /// collector cannot remove it between this answer and the push's
    /// commit. `None` while it is absent or somebody else holds its lock
    /// (an upload: the pusher then resumes or waits for that one).
    pub async fn present(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some(lock) = self.lock(digest).await? else {
            return Ok(None);
        };
        let path = self.path(digest);
        let size = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => {
                file.set_modified(SystemTime::now()).map_err(io(&path))?;
                Some(file.metadata().map_err(io(&path))?.len())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        lock.remove_if_empty().map_err(io(lock.path()))?;
        Ok(size)
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
        let blobs = self.root.join("sha256");
        tokio::fs::create_dir_all(&blobs)
            .await
            .map_err(io(&blobs))?;
        // Held until the blob is in place: no other upload of it, through
        // this replica or another, writes the same file meanwhile.
        let lock = self.lock(digest).await?.ok_or(StoreError::Busy)?;
        let partial = lock.path().to_path_buf();
        // Stored meanwhile (through another replica): nothing to write.
        if let Ok(m) = std::fs::File::open(self.path(digest)).and_then(|f| f.metadata()) {
            lock.remove_if_empty().map_err(io(&partial))?;
            return Ok(m.len());
        }
        let (mut hasher, mut size) = if offset > 0 {
            let (hasher, stored) = caravan_net::hash_partial(&partial)
                .await
                .map_err(io(&partial))?;
            if stored != offset {
                lock.remove_if_empty().map_err(io(&partial))?;
                return Err(StoreError::Offset {
                    requested: offset,
                    stored,
                });
            }
            (hasher, stored)
        } else {
            lock.file().set_len(0).map_err(io(&partial))?;
            (Sha256::new(), 0)
        };
        let mut file = tokio::fs::File::from_std(lock.file().try_clone().map_err(io(&partial))?);
        file.seek(std::io::SeekFrom::Start(size))
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

impl BlobStore {
    /// Removes what interrupted uploads left that nobody resumed within
    /// `grace` (an upload in progress, here or at another replica, holds the
    /// lock and keeps its part). Returns how many.
    pub async fn remove_stale_uploads(&self, grace: Duration) -> std::io::Result<usize> {
        let mut removed = 0;
        for (digest, age) in aged_entries(&self.root.join("uploads")).await? {
            if age < grace {
                continue;
            }
            let Some(lock) = self.lock(&digest).await.map_err(std::io::Error::other)? else {
                continue;
            };
            // Look again under the lock: an upload may have written since.
            if age_of(lock.file().metadata()?) >= grace {
                remove_if_there(lock.path())?;
                removed += 1;
            } else {
                lock.remove_if_empty()?;
            }
        }
        Ok(removed)
    }

    /// Removes blobs not in `keep` whose last change (upload, or a push
    /// finding them present) is older than `grace`. Returns the digests
    /// removed.
    pub async fn remove_unreferenced(
        &self,
        keep: &HashSet<Digest>,
        grace: Duration,
    ) -> std::io::Result<Vec<Digest>> {
        let mut removed = Vec::new();
        for (digest, age) in aged_entries(&self.root.join("sha256")).await? {
            if keep.contains(&digest) || age < grace {
                continue;
            }
            let Some(lock) = self.lock(&digest).await.map_err(std::io::Error::other)? else {
                continue; // being uploaded again, or looked at by another replica
            };
            // Under the lock, look again (opening it: an NFS client then
            // asks the server): a push may have just found it.
            let path = self.path(&digest);
            let still_old = match std::fs::File::open(&path).and_then(|f| f.metadata()) {
                Ok(m) => Ok(age_of(m) >= grace),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            };
            // A relay still reading it keeps its open file; new requests get 404.
            let gone = match still_old {
                Ok(true) => remove_if_there(&path).map(|()| true),
                other => other,
            };
            lock.remove_if_empty()?;
            if gone? {
                removed.push(digest);
            }
        }
        Ok(removed)
    }
}

/// The entries of `dir` named by a digest (anything else in there is not
/// the store's), with the time since each last changed.
async fn aged_entries(dir: &Path) -> std::io::Result<Vec<(Digest, Duration)>> {
    let mut found = Vec::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    while let Some(entry) = entries.next_entry().await? {
        let Ok(digest) = Digest::from_hex(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        match entry.metadata().await {
            Ok(m) => found.push((digest, age_of(m))),
            // Gone meanwhile (another replica's collector, a finished upload).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

fn age_of(m: std::fs::Metadata) -> Duration {
    m.modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default()
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
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

    /// Sets the blob's last change `ago` in the past.
    fn age(path: &Path, ago: Duration) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[tokio::test]
    async fn two_replicas_sharing_a_store_never_write_one_blob_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Two controllers on one volume: two stores over one directory.
        let (a, b) = (
            BlobStore::new(dir.path().to_path_buf()),
            BlobStore::new(dir.path().to_path_buf()),
        );
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let digest = Digest::of(&data);
        // a's upload has sent its first half and waits for the rest.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<bytes::Bytes, String>>();
        tx.unbounded_send(Ok(bytes::Bytes::copy_from_slice(&data[..25_000])))
            .unwrap();
        let upload = tokio::spawn({
            let a = BlobStore::new(dir.path().to_path_buf());
            async move { a.put(&digest, 0, u64::MAX, rx).await }
        });
        while a.upload_offset(&digest).await < 25_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // b may neither start over, nor resume, nor call it present.
        assert!(matches!(
            b.put(&digest, 0, u64::MAX, body(&data)).await,
            Err(StoreError::Busy)
        ));
        assert!(matches!(
            b.put(&digest, 25_000, u64::MAX, body(&data[25_000..]))
                .await,
            Err(StoreError::Busy)
        ));
        assert_eq!(b.present(&digest).await.unwrap(), None);
        // Nor may b's collector take the part being written, however old.
        age(&a.partial(&digest), Duration::from_secs(7200));
        assert_eq!(b.remove_stale_uploads(Duration::ZERO).await.unwrap(), 0);
        tx.unbounded_send(Ok(bytes::Bytes::copy_from_slice(&data[25_000..])))
            .unwrap();
        drop(tx);
        assert_eq!(upload.await.unwrap().unwrap(), 50_000);
        assert_eq!(b.present(&digest).await.unwrap(), Some(50_000));
        assert_eq!(std::fs::read(b.path(&digest)).unwrap(), data);
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads"))
                .unwrap()
                .count(),
            0,
            "no lock file is left behind"
        );
    }

    #[tokio::test]
    async fn a_push_finding_a_blob_present_keeps_it_from_the_collector() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf());
        let (found, forgotten) = (Digest::of(b"found again"), Digest::of(b"forgotten"));
        for (d, data) in [(found, &b"found again"[..]), (forgotten, &b"forgotten"[..])] {
            store.put(&d, 0, u64::MAX, body(data)).await.unwrap();
            age(&store.path(&d), Duration::from_secs(7200));
        }
        // A push of `found` asks whether it is there: its grace starts again.
        assert_eq!(store.present(&found).await.unwrap(), Some(11));
        let hour = Duration::from_secs(3600);
        let removed = store
            .remove_unreferenced(&HashSet::new(), hour)
            .await
            .unwrap();
        assert_eq!(removed, [forgotten]);
        assert!(store.size(&found).await.is_some());
        // While another replica holds a blob's lock, it is not removed.
        age(&store.path(&found), Duration::from_secs(7200));
        let held = store.lock(&found).await.unwrap().unwrap();
        let removed = store
            .remove_unreferenced(&HashSet::new(), hour)
            .await
            .unwrap();
        assert!(removed.is_empty());
        drop(held);
        let removed = store
            .remove_unreferenced(&HashSet::new(), hour)
            .await
            .unwrap();
        assert_eq!(removed, [found]);
    }
}
