//! Relays sharing one cache directory (the replicas of a site's relay on a
//! ReadWriteMany volume) fetch each blob from upstream once between them.
//! The relay holding the lock on `partial/<hex>.lock` fetches the blob; the
//! others follow its partial file as it grows (its length is in
//! `partial/<hex>.len`) and serve it from there, and take the fetch over,
//! resuming where it stopped, if that relay lets go of the lock (it
//! failed, or died: the kernel releases the lock of a dead process) before
//! the blob is in the cache.

use std::{path::PathBuf, time::Duration};

use caravan_api::Digest;
use caravan_net::lock::BlobLock;
use tokio::sync::watch;

use super::{reader::Progress, Cache, CacheError};

/// How often a follower looks at another relay's fetch.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

impl Cache {
    pub(super) fn lock_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("partial")
            .join(format!("{}.lock", digest.hex()))
    }

    pub(super) fn len_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("partial")
            .join(format!("{}.len", digest.hex()))
    }

    /// Fetches the blob into the cache unless a relay on the same cache
    /// directory is fetching it already: then follows that fetch.
    pub(super) async fn fetch_shared(
        &self,
        digest: &Digest,
        progress: &watch::Sender<Progress>,
    ) -> Result<PathBuf, CacheError> {
        let path = self.path(digest);
        let lock_path = self.lock_path(digest);
        let io = |source| CacheError::Io {
            path: lock_path.clone(),
            source,
        };
        loop {
            let Some(lock) = BlobLock::try_take(lock_path.clone()).await.map_err(io)? else {
                match self.follow(digest, progress).await.map_err(io)? {
                    Some(path) => return Ok(path),
                    None => continue,
                }
            };
            // The relay that held it may have cached the blob meanwhile.
            let fetched = if exists(&path).await {
                Ok(path)
            } else {
                self.fetch(digest, progress).await
            };
            if fetched.is_ok() {
                let _ = tokio::fs::remove_file(self.len_path(digest)).await;
            }
            // A failed fetch's partial file stays, for the next to resume.
            lock.remove_if_empty().map_err(io)?;
            return fetched;
        }
    }

    /// Follows another relay's fetch of the blob, publishing how far its
    /// partial file has got: `Some` once the blob is in the cache, `None`
    /// if that relay lets go of it without.
    async fn follow(
        &self,
        digest: &Digest,
        progress: &watch::Sender<Progress>,
    ) -> std::io::Result<Option<PathBuf>> {
        tracing::info!(blob = %digest, "another relay on this cache is fetching the blob; serving it as it arrives there");
        let path = self.path(digest);
        loop {
            if exists(&path).await {
                return Ok(Some(path));
            }
            let len = tokio::fs::read_to_string(self.len_path(digest))
                .await
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            let written = tokio::fs::metadata(self.partial(digest))
                .await
                .map(|m| m.len());
            if let (Some(len), Ok(written)) = (len, written) {
                progress.send_if_modified(|p| {
                    let now = Progress::Arriving {
                        len,
                        written: written.min(len),
                    };
                    std::mem::replace(p, now) != now
                });
            }
            if !self.fetching_elsewhere(digest).await? {
                return Ok(None);
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }

    /// Whether another relay on this cache directory is fetching `digest` now.
    pub(super) async fn fetching_elsewhere(&self, digest: &Digest) -> std::io::Result<bool> {
        let path = self.lock_path(digest);
        if !exists(&path).await {
            return Ok(false);
        }
        Ok(BlobLock::try_take(path).await?.is_none())
    }
}

async fn exists(path: &std::path::Path) -> bool {
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::StreamExt;

    use super::*;
    use crate::cache::test_cache;

    #[tokio::test]
    async fn a_relay_serves_the_blob_another_relay_on_its_cache_is_fetching_without_fetching_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data: Vec<u8> = (0..400_000).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        // The other relay: holds the lock, has said the length, writes the partial file.
        let other = BlobLock::try_take(cache.lock_path(&digest))
            .await
            .unwrap()
            .unwrap();
        std::fs::write(cache.len_path(&digest), data.len().to_string()).unwrap();
        let mut partial = std::fs::File::create(cache.partial(&digest)).unwrap();
        partial.write_all(&data[..100_000]).unwrap();

        let reader = tokio::time::timeout(Duration::from_secs(5), cache.get(&digest))
            .await
            .expect("the follower starts serving what has arrived")
            .unwrap();
        assert_eq!((reader.len, reader.hit), (data.len() as u64, false));
        assert!(cache.fetching_elsewhere(&digest).await.unwrap());
        let lease = cache.lease(&digest);
        let response = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut stream = Box::pin(reader.stream(0..400_000, lease));
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk?);
            }
            std::io::Result::Ok(out)
        });
        for piece in data[100_000..].chunks(100_000) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            partial.write_all(piece).unwrap();
        }
        // The other relay caches the blob and lets go.
        std::fs::rename(cache.partial(&digest), cache.path(&digest)).unwrap();
        drop(other);
        let got = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("the follower ends with the other relay's fetch")
            .unwrap()
            .unwrap();
        assert_eq!(got, data);
        assert_eq!(
            cache.ensure(&digest).await.unwrap(),
            cache.path(&digest),
            "in the cache, fetched once (this relay's upstream is unreachable)"
        );
        assert!(!cache.fetching_elsewhere(&digest).await.unwrap());
    }
}
