//! A per-blob lock on a volume several processes share: the controller's
//! built-in store under its replicas (one ReadWriteMany volume), and a
//! relay's cache under the replicas of a site's relay. Whatever changes a
//! blob holds its lock — in the store, an upload from its first byte until
//! the blob is renamed into place, a push finding the blob present (its
//! grace starts again) and the collector removing it; in a relay's cache,
//! the fetch from upstream. The lock is an exclusive `flock` on a file
//! next to the blob (an upload's own file, in the store); the kernel drops
//! it when the holder dies, so a crashed process leaves no stale lock, and
//! Linux's NFS client turns it into an NFS lock every client sees.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// How often a lock whose file keeps being renamed away is tried again
/// before it counts as held by somebody else.
const ATTEMPTS: usize = 16;

/// A held lock (released when dropped).
#[derive(Debug)]
pub struct BlobLock {
    file: File,
    path: PathBuf,
}

impl BlobLock {
    /// Takes the lock at `path` unless somebody holds it (`None`).
    pub async fn try_take(path: PathBuf) -> io::Result<Option<Self>> {
        tokio::task::spawn_blocking(move || Self::try_take_blocking(path))
            .await
            .map_err(io::Error::other)?
    }

    fn try_take_blocking(path: PathBuf) -> io::Result<Option<Self>> {
        for _ in 0..ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(e),
            }
            // The one who held it before may have renamed this file into
            // the store or removed it: the lock is the path's only while the
            // path still names the file locked. Looked up by opening it
            // (which an NFS client checks with the server), not from a
            // possibly cached `stat`.
            match File::open(&path).and_then(|f| f.metadata()) {
                Ok(now) if same_file(&now, &file.metadata()?) => {
                    return Ok(Some(Self { file, path }))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The locked file (in the store, what an upload writes).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock's file unless it holds part of an upload; the lock
    /// stays held until dropped (and whoever opened the file meanwhile
    /// finds it gone when their turn comes).
    pub fn remove_if_empty(&self) -> io::Result<()> {
        if self.file.metadata()?.len() == 0 {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_renamed_file_is_no_longer_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = BlobLock::try_take(path.clone()).await.unwrap().unwrap();
        // A second open file description (another replica) is refused.
        assert!(BlobLock::try_take(path.clone()).await.unwrap().is_none());
        // The holder renames its file away (the upload is stored) and lets go.
        std::fs::rename(&path, dir.path().join("stored")).unwrap();
        drop(held);
        let again = BlobLock::try_take(path.clone()).await.unwrap().unwrap();
        assert!(path.exists(), "a new lock file, not the stored one");
        again.remove_if_empty().unwrap();
        assert!(!path.exists());
        assert!(dir.path().join("stored").exists());
    }
}
