//! What leaves the cache: blobs no agent of the site (or below) needs any
//! more ([`Cache::retain`]), and, beyond `--cache-max-bytes`, the least
//! recently used ones ([`Cache::enforce_limit`]), never one a response is
//! reading ([`Lease`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{atomic::Ordering, Arc},
};

use caravan_api::Digest;
use caravan_net::lock::BlobLock;

use super::Cache;

/// Keeps a blob from eviction while a response serves it.
pub struct Lease {
    cache: Arc<Cache>,
    digest: Digest,
}

impl Lease {
    /// How many responses are reading blobs now, this one included.
    pub fn serving(&self) -> usize {
        self.cache.serving()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cache.serving.fetch_sub(1, Ordering::Relaxed);
        let mut in_use = self.cache.in_use.lock().expect("lock poisoned");
        if let Some(n) = in_use.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.digest);
            }
        }
    }
}

impl Cache {
    /// Keeps `digest` from eviction until the lease is dropped.
    pub fn lease(self: &Arc<Self>, digest: &Digest) -> Lease {
        self.serving.fetch_add(1, Ordering::Relaxed);
        *self
            .in_use
            .lock()
            .expect("lock poisoned")
            .entry(*digest)
            .or_default() += 1;
        Lease {
            cache: Arc::clone(self),
            digest: *digest,
        }
    }

    /// How many responses are reading blobs now.
    pub fn serving(&self) -> usize {
        self.serving.load(Ordering::Relaxed)
    }

    /// Evicts least recently used blobs until the cache fits its size
    /// limit, never one being served nor `protect` (the blob just fetched).
    pub async fn enforce_limit(&self, protect: &Digest) -> std::io::Result<Vec<Digest>> {
        let Some(max) = self.max_bytes else {
            return Ok(vec![]);
        };
        let mut blobs = Vec::new();
        let mut total = 0;
        let mut dir = tokio::fs::read_dir(self.dir.join("sha256")).await?;
        while let Some(entry) = dir.next_entry().await? {
            // Only blobs count (anything else goes with the next `retain`).
            let Ok(digest) = Digest::from_hex(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let meta = entry.metadata().await?;
            total += meta.len();
            let last = self
                .used
                .lock()
                .expect("lock poisoned")
                .get(&digest)
                .copied();
            blobs.push((
                last.unwrap_or(meta.modified()?),
                digest,
                meta.len(),
                entry.path(),
            ));
        }
        blobs.sort();
        let mut evicted = Vec::new();
        for (_, digest, size, path) in blobs {
            if total <= max {
                break;
            }
            let in_use = || {
                self.in_use
                    .lock()
                    .expect("lock poisoned")
                    .contains_key(&digest)
            };
            if digest == *protect || in_use() {
                continue;
            }
            tokio::fs::remove_file(&path).await?;
            self.used.lock().expect("lock poisoned").remove(&digest);
            total -= size;
            evicted.push(digest);
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
    /// are assigned), what interrupted fetches of others left, and anything
    /// else in the cache's directories. What fetches left goes under the
    /// blob's lock, so never what another relay on the directory is
    /// fetching. An agent still downloading a blob keeps its open file.
    pub async fn retain(&self, keep: &HashSet<&Digest>) -> std::io::Result<Vec<String>> {
        let wanted = |d: &Digest| {
            keep.contains(d) || self.inflight.lock().expect("lock poisoned").contains_key(d)
        };
        let mut removed = Vec::new();
        let mut dir = tokio::fs::read_dir(self.dir.join("sha256")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !Digest::from_hex(&name).is_ok_and(|d| wanted(&d)) {
                tokio::fs::remove_file(entry.path()).await?;
                removed.push(name);
            }
        }
        // `partial/<hex>`, `<hex>.len` and `<hex>.lock`, by blob.
        let mut left: HashMap<Digest, Vec<String>> = HashMap::new();
        let mut dir = tokio::fs::read_dir(self.dir.join("partial")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name
                .strip_suffix(".lock")
                .or_else(|| name.strip_suffix(".len"))
                .unwrap_or(&name);
            match Digest::from_hex(hex) {
                Ok(d) if wanted(&d) => {}
                Ok(d) => left.entry(d).or_default().push(name),
                Err(_) => {
                    tokio::fs::remove_file(entry.path()).await?;
                    removed.push(name);
                }
            }
        }
        for (digest, names) in left {
            let Some(lock) = BlobLock::try_take(self.lock_path(&digest)).await? else {
                continue; // another relay on the directory is fetching it
            };
            for name in &names {
                if !name.ends_with(".lock") {
                    match tokio::fs::remove_file(self.dir.join("partial").join(name)).await {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            lock.remove_if_empty()?;
            removed.extend(names);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::cache::test_cache;

    #[tokio::test]
    async fn the_size_limit_evicts_the_least_recently_used_blob_but_never_one_being_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), Some(250)).await;
        let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(|s| Digest::of(s.as_bytes()));
        for digest in [a, b, c, d] {
            std::fs::write(cache.path(&digest), [0u8; 100]).unwrap();
        }
        // Used in this order: a (oldest), b, c, d; a is being served.
        for digest in [a, b, c, d] {
            cache.ensure(&digest).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lease = cache.lease(&a);
        let evicted = cache.enforce_limit(&d).await.unwrap();
        assert_eq!(
            evicted,
            [b, c],
            "400 bytes down to 200: the oldest not in use go"
        );
        assert!(cache.path(&a).exists() && cache.path(&d).exists());
        drop(lease);
        std::fs::write(cache.path(&e), [0u8; 100]).unwrap();
        cache.ensure(&e).await.unwrap();
        assert_eq!(
            cache.enforce_limit(&e).await.unwrap(),
            [a],
            "once served, a is the oldest"
        );
    }

    #[tokio::test]
    async fn blobs_no_agent_needs_leave_the_cache_with_their_partial_files_unless_another_relay_fetches_them(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let [kept, dropped] = ["kept", "dropped"].map(|s| Digest::of(s.as_bytes()));
        std::fs::write(cache.path(&kept), "kept").unwrap();
        std::fs::write(cache.path(&dropped), "dropped").unwrap();
        std::fs::write(cache.partial(&dropped), "drop").unwrap();
        std::fs::write(cache.lock_path(&dropped), "").unwrap();
        std::fs::write(dir.path().join("sha256/stray"), "?").unwrap();
        // Another relay on the directory is fetching this one: it stays.
        let elsewhere = Digest::of(b"elsewhere");
        let _lock = caravan_net::lock::BlobLock::try_take(cache.lock_path(&elsewhere))
            .await
            .unwrap()
            .unwrap();
        std::fs::write(cache.partial(&elsewhere), "else").unwrap();
        std::fs::write(cache.len_path(&elsewhere), "8").unwrap();
        let mut removed = cache.retain(&HashSet::from([&kept])).await.unwrap();
        removed.sort();
        let mut expected = [
            dropped.hex(),
            dropped.hex(),
            format!("{}.lock", dropped.hex()),
            "stray".to_string(),
        ];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(cache.path(&kept).exists());
        assert!(cache.partial(&elsewhere).exists() && cache.len_path(&elsewhere).exists());
        assert_eq!(cache.bytes().await.unwrap(), 4);
    }
}
