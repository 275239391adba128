//! Relays sharing one cache directory (the replicas of a site's relay on a
//! ReadWriteMany volume) fetch each blob from upstream once between them.
//! The relay holding the blob's lock (`partial/<hex>.lock`, a
//! [`BlobLock`]) fetches it; the others follow its partial file as it grows
//! (its length, once upstream told it, is in `partial/<hex>.len`) and serve
//! it from there. If that relay lets go of the lock (it failed, or died:
//! the kernel releases the lock of a dead process) before the blob is in
//! the cache, the requests that followed it end with an error and the next
//! one fetches the blob here, resuming from the partial file. The last
//! bytes of a blob reach a reader only once the relay that fetched it found
//! its digest right (see [`super::reader`]).

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
                if let Some(path) = self.follow(digest, progress).await.map_err(io)? {
                    return Ok(path);
                }
                // Its readers have the other relay's partial file, which a
                // fetch here may start anew: they end, and ask again.
                if *progress.borrow() != Progress::Starting {
                    return Err(CacheError::FollowedFetchStopped { digest: *digest });
                }
                continue;
            };
            // The relay that held it may have cached the blob meanwhile.
            let fetched = if exists(&path).await {
                Ok(path)
            } else {
                // A length an interrupted fetch left is not this fetch's to tell.
                let _ = tokio::fs::remove_file(self.len_path(digest)).await;
                self.fetch(digest, progress).await
            };
            let _ = tokio::fs::remove_file(self.len_path(digest)).await;
            // A failed fetch's partial file stays, for the next to resume.
            if let Err(e) = lock.remove_if_empty() {
                tracing::warn!(path = %lock_path.display(), error = %e, "lock file not removed");
            }
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
                .as_deref()
                .and_then(parse_len);
            let written = tokio::fs::metadata(self.partial(digest))
                .await
                .map(|m| m.len());
            if let (Some(len), Ok(written)) = (len, written) {
                progress.send_if_modified(|p| advance(p, len, written));
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

/// A follower's progress, from the length the fetcher told and the size of
/// its partial file: the length once told stays, and `written` only grows.
/// Whether it changed.
fn advance(progress: &mut Progress, len: u64, written: u64) -> bool {
    let written = written.min(len);
    let now = match *progress {
        Progress::Arriving { len: told, .. } if told != len => return false,
        Progress::Arriving {
            written: before, ..
        } => Progress::Arriving {
            len,
            written: written.max(before),
        },
        _ => Progress::Arriving { len, written },
    };
    std::mem::replace(progress, now) != now
}

/// The length a fetcher writes: `<bytes>\n`, the newline last, so a read
/// that caught the file half-written is no length at all.
pub(super) fn format_len(len: u64) -> String {
    format!("{len}\n")
}

fn parse_len(text: &str) -> Option<u64> {
    text.strip_suffix('\n')?.parse().ok()
}

async fn exists(path: &std::path::Path) -> bool {
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::{io::Write, sync::Arc};

    use futures::StreamExt;

    use super::*;
    use crate::cache::{test_cache, Reader};

    const LEN: usize = 400_000;

    /// Another relay on the cache, fetching the blob of `data`: it holds the
    /// lock, has told the length and written the first `arrived` bytes.
    async fn another_relay_fetching(
        cache: &Cache,
        data: &[u8],
        arrived: usize,
    ) -> (BlobLock, std::fs::File) {
        let digest = Digest::of(data);
        let lock = BlobLock::try_take(cache.lock_path(&digest))
            .await
            .unwrap()
            .unwrap();
        std::fs::write(cache.len_path(&digest), format_len(data.len() as u64)).unwrap();
        let mut partial = std::fs::File::create(cache.partial(&digest)).unwrap();
        partial.write_all(&data[..arrived]).unwrap();
        (lock, partial)
    }

    /// A response streaming the whole blob from `reader`.
    fn respond(
        cache: &Arc<Cache>,
        reader: Reader,
        digest: &Digest,
    ) -> tokio::task::JoinHandle<std::io::Result<Vec<u8>>> {
        let lease = cache.lease(digest);
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut stream = Box::pin(reader.stream(0..LEN as u64, lease));
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk?);
            }
            Ok(out)
        })
    }

    #[tokio::test]
    async fn a_relay_serves_the_blob_another_relay_on_its_cache_is_fetching_without_fetching_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let (other, mut partial) = another_relay_fetching(&cache, &data, 100_000).await;

        let reader = tokio::time::timeout(Duration::from_secs(5), cache.get(&digest))
            .await
            .expect("the follower starts serving what has arrived")
            .unwrap();
        assert_eq!((reader.len, reader.hit), (LEN as u64, false));
        assert!(cache.fetching_elsewhere(&digest).await.unwrap());
        let response = respond(&cache, reader, &digest);
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

    #[tokio::test]
    async fn when_the_other_relay_stops_half_way_its_followers_end_with_an_error_not_a_short_blob()
    {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let (other, _partial) = another_relay_fetching(&cache, &data, 100_000).await;
        let reader = cache.get(&digest).await.unwrap();
        let response = respond(&cache, reader, &digest);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(other); // it died, the blob not cached
        let e = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("the follower notices")
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string().contains("stopped before it was complete"),
            "{e}"
        );
    }

    #[test]
    fn a_length_is_whole_or_none_and_progress_only_grows() {
        assert_eq!(parse_len(&format_len(4_000_000)), Some(4_000_000));
        assert_eq!(parse_len("4000"), None, "caught half-written");
        assert_eq!(parse_len(""), None);
        let mut p = Progress::Starting;
        assert!(advance(&mut p, 100, 40));
        assert_eq!(
            p,
            Progress::Arriving {
                len: 100,
                written: 40
            }
        );
        assert!(!advance(&mut p, 100, 30), "never back");
        assert!(!advance(&mut p, 999, 90), "the length once told stays");
        assert!(advance(&mut p, 100, 150));
        assert_eq!(
            p,
            Progress::Arriving {
                len: 100,
                written: 100
            }
        );
    }
}
