//! The built-in cabinet store: a content-addressed directory of blobs,
//! `<root>/sha256/<hex>`. A blob is written to a temporary file while its
//! sha256 is computed and renamed into place only if it matches the digest it
//! was uploaded under, so the store never holds a blob under a wrong name.

use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("digest mismatch: uploaded bytes have sha256:{actual}, expected sha256:{expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("upload interrupted: {0}")]
    Body(String),
    #[error("blob store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the blob with this sha256 hex digest lives.
    pub fn path(&self, hex: &str) -> PathBuf {
        self.root.join("sha256").join(hex)
    }

    /// Size of the stored blob, if present.
    pub async fn size(&self, hex: &str) -> Option<u64> {
        tokio::fs::metadata(self.path(hex))
            .await
            .ok()
            .map(|m| m.len())
    }

    /// Streams `body` into the store under `hex`, verifying the digest.
    /// Returns the number of bytes stored.
    pub async fn put<S, E>(&self, hex: &str, mut body: S) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dir = self.root.join("sha256");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        // Each upload writes its own file, removed if the upload fails or is
        // cancelled (the guard), so concurrent uploads of one blob cannot mix.
        let tmp = TempPath(dir.join(format!(".upload-{hex}-{:016x}", rand::random::<u64>())));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp.0)
            .await
            .map_err(io(&tmp.0))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io(&tmp.0))?;
        }
        file.sync_all().await.map_err(io(&tmp.0))?;
        let actual = hex::encode(hasher.finalize());
        if actual != hex {
            return Err(StoreError::DigestMismatch {
                expected: hex.to_string(),
                actual,
            });
        }
        let dest = self.path(hex);
        tokio::fs::rename(&tmp.0, &dest).await.map_err(io(&dest))?;
        tmp.keep();
        Ok(size)
    }
}

/// Removes the file when dropped (an upload that did not complete), unless kept.
struct TempPath(PathBuf);

impl TempPath {
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(data: &'static [u8]) -> impl Stream<Item = Result<bytes::Bytes, String>> + Unpin {
        futures::stream::iter(data.chunks(3).map(|c| Ok(bytes::Bytes::from_static(c))))
    }

    #[tokio::test]
    async fn blobs_enter_the_store_only_under_their_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf());
        let data = b"hello caravan";
        let hex = hex::encode(Sha256::digest(data));
        assert_eq!(
            store.put(&hex, body(data)).await.unwrap(),
            data.len() as u64
        );
        assert_eq!(store.size(&hex).await, Some(data.len() as u64));

        let wrong = "0".repeat(64);
        let err = store.put(&wrong, body(data)).await.unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert_eq!(store.size(&wrong).await, None);
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("sha256"))
                .unwrap()
                .count(),
            1
        );
    }
}
