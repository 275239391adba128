//! The controller's part of a backup ([`caravan_api::backup`]): what of its
//! data directory cannot be made again, written as a tar (`GET
//! /v1/backup`), and read back into a controller that awaits it (`PUT
//! /v1/restore`).
//!
//! - **Taken while running, consistent.** Keys, roots and the ledger are
//!   read whole; a blob is opened before it is sized, so one the collector
//!   removes meanwhile is still sent whole (blobs never change), and hashed
//!   as it is read: a damaged one fails the backup, naming it, rather than
//!   the restore.
//! - **Restored only into a controller that has nothing to lose.** One
//!   started with `--await-restore` on an empty data directory marks the
//!   directory ([`awaiting`]) and does nothing but wait: it applies no
//!   object, signs nothing, serves no relay. A controller with keys of its
//!   own never takes a restore, so no restore can swap the root a running
//!   fleet pins.
//! - **All or nothing.** Every entry is checked as it arrives (a name of
//!   [`DataEntry`], a regular file, within its size; a blob's bytes hash to
//!   its name; the roots chain to the newest key) into a staging directory,
//!   and only a whole, valid archive replaces anything. What it replaces
//!   is moved aside (`before-restore-<time>/`), not deleted.

use std::{
    collections::HashSet,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use caravan_api::{
    backup::{self, DataEntry},
    Digest,
};
use sha2::{Digest as _, Sha256};

/// The file marking a data directory that awaits a restore.
const AWAITING: &str = "awaiting-restore";
/// Where an arriving restore is put together.
const STAGING: &str = "restore.partial";

/// Why a restore was refused, or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The archive is not a backup this controller takes.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether the controller, started with `--await-restore`, is to wait for
/// a restore: the data directory is marked, or holds none of a
/// controller's data (then it is marked now, before any key is made). One
/// that holds some (a key lost, but a root agents pin) is not: a restore
/// would move that root aside.
pub fn awaiting(data_dir: &Path) -> std::io::Result<bool> {
    let marker = data_dir.join(AWAITING);
    if marker.exists() {
        return Ok(true);
    }
    let blobs = data_dir.join(backup::BLOBS_DIR).join("sha256");
    let has_blobs = std::fs::read_dir(&blobs).is_ok_and(|mut d| d.next().is_some());
    let has_data = [backup::TOKEN_KEY, backup::LEDGER, backup::TRUST_DIR]
        .iter()
        .any(|name| data_dir.join(name).exists());
    if has_data || has_blobs {
        return Ok(false);
    }
    std::fs::create_dir_all(data_dir)?;
    caravan_net::fs::write_private(&marker, b"", caravan_net::fs::Existing::Replace)?;
    Ok(true)
}

/// Refuses a data directory that awaits a restore to a controller started
/// without `--await-restore`: it would make keys and serve a fleet that a
/// restore could then replace.
pub fn refuse_awaiting(data_dir: &Path) -> anyhow::Result<()> {
    let marker = data_dir.join(AWAITING);
    anyhow::ensure!(
        !marker.exists(),
        "{} awaits a restore: start with --await-restore and run `caravan restore`, or remove {} to start afresh",
        data_dir.display(),
        marker.display()
    );
    Ok(())
}

/// Whether `data_dir` still awaits a restore (another replica may have
/// taken it).
pub fn still_awaiting(data_dir: &Path) -> bool {
    data_dir.join(AWAITING).exists()
}

/// The refusal of a restore into a controller with keys of its own.
pub const HAS_KEYS: &str = "this controller has keys of its own: a backup is restored only into a controller started with --await-restore on an empty data directory";

/// Writes the data of a backup of `data_dir` as a tar to `out` (ended with
/// [`tar::Builder::into_inner`]'s terminator). Returns the blobs written
/// (one the collector removed before it was opened is not).
pub fn write(data_dir: &Path, out: impl Write) -> std::io::Result<usize> {
    let mut tar = tar::Builder::new(out);
    let mut entries = vec![DataEntry::TokenKey, DataEntry::Ledger];
    let trust = data_dir.join(backup::TRUST_DIR);
    let mut version = 1;
    while trust.join(backup::trust_root_name(version)).exists() {
        // Old keys may be kept offline: the roots are what agents follow.
        entries.extend([DataEntry::TrustKey(version), DataEntry::TrustRoot(version)]);
        version += 1;
    }
    let mut blobs: Vec<Digest> =
        match std::fs::read_dir(data_dir.join(backup::BLOBS_DIR).join("sha256")) {
            Ok(dir) => dir
                .filter_map(|e| Digest::from_hex(&e.ok()?.file_name().to_string_lossy()).ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(e),
        };
    blobs.sort();
    entries.extend(blobs.into_iter().map(DataEntry::Blob));
    let mut count = 0;
    for entry in entries {
        let path = entry.path();
        let file = match std::fs::File::open(data_dir.join(&path)) {
            Ok(f) => f,
            // No ledger yet, an old key kept offline, a blob collected.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o600);
        let mut reader = Hashing {
            inner: file.take(size),
            hash: Sha256::new(),
        };
        tar.append_data(&mut header, &path, &mut reader)?;
        // A damaged blob would make the whole backup unrestorable: found
        // out now, not at the restore.
        if let DataEntry::Blob(digest) = &entry {
            let actual = Digest::from_hasher(reader.hash);
            if &actual != digest {
                return Err(std::io::Error::other(format!(
                    "blob {digest} in the store is damaged (its bytes have {actual}): remove {} and push its package again",
                    data_dir.join(&path).display()
                )));
            }
            count += 1;
        }
    }
    tar.into_inner()?.flush()?;
    Ok(count)
}

/// A reader that hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// What a restore brought: the blobs, and the bytes of every entry.
#[derive(Debug)]
pub struct Restored {
    pub blobs: usize,
    pub bytes: u64,
}

/// Reads the data of a backup (a tar, as [`write`] makes it) from `input`
/// into `data_dir`, which must be [`awaiting`] one; blobs may hold at most
/// `max_blob` bytes. Nothing is replaced unless the whole archive is valid.
pub fn restore(data_dir: &Path, max_blob: u64, input: impl Read) -> Result<Restored, RestoreError> {
    if !still_awaiting(data_dir) {
        return Err(RestoreError::Refused(HAS_KEYS.into()));
    }
    // One restore at a time, whichever replica it reaches.
    let lock_path = data_dir.join(format!("{STAGING}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    if let Err(e) = lock.try_lock() {
        return Err(match e {
            std::fs::TryLockError::WouldBlock => {
                RestoreError::Refused("a restore is in progress".into())
            }
            std::fs::TryLockError::Error(e) => io(&lock_path)(e),
        });
    }
    if !still_awaiting(data_dir) {
        return Err(RestoreError::Refused(HAS_KEYS.into()));
    }
    let staging = data_dir.join(STAGING);
    match std::fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&staging)(e)),
        _ => {}
    }
    private_dir(&staging)?;
    let (found, bytes) = stage(&staging, max_blob, input)?;
    check(&staging, &found)?;
    let blobs = found
        .iter()
        .filter(|e| matches!(e, DataEntry::Blob(_)))
        .count();
    commit(data_dir, &staging, &found)?;
    Ok(Restored { blobs, bytes })
}

/// Puts every entry of `input` into `staging`, checked; returns them and
/// their bytes.
fn stage(
    staging: &Path,
    max_blob: u64,
    input: impl Read,
) -> Result<(Vec<DataEntry>, u64), RestoreError> {
    let refuse = RestoreError::Refused;
    let mut archive = tar::Archive::new(input);
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut bytes = 0;
    let entries = archive
        .entries()
        .map_err(|e| refuse(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refuse(format!("the archive is damaged: {e}")))?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| refuse("an entry's name is not UTF-8".into()))?;
        let kind = DataEntry::parse(&name).map_err(refuse)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(refuse(format!("{name:?} is not a regular file")));
        }
        let size = entry.size();
        let max = kind.max_size(max_blob);
        if size > max {
            return Err(refuse(format!(
                "{name:?} has {size} bytes, more than the {max} it may have"
            )));
        }
        if kind == DataEntry::TokenKey && size != backup::TOKEN_KEY_BYTES {
            return Err(refuse(format!(
                "{name:?} has {size} bytes, not {}",
                backup::TOKEN_KEY_BYTES
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(refuse(format!("{name:?} is in the archive twice")));
        }
        let path = staging.join(&name);
        private_dir(path.parent().expect("an entry's path has a parent"))?;
        // Keys among them: readable by the controller alone.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))?
        };
        let mut hash = Sha256::new();
        let mut buf = vec![0; 256 << 10];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| refuse(format!("{name:?} is cut short: {e}")))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io(&path))?;
        }
        file.sync_all().map_err(io(&path))?;
        if let DataEntry::Blob(digest) = &kind {
            let actual = Digest::from_hasher(hash);
            if &actual != digest {
                return Err(refuse(format!(
                    "{name:?} is not the blob it is named after: its bytes have {actual}"
                )));
            }
        }
        bytes += size;
        found.push(kind);
    }
    Ok((found, bytes))
}

/// Creates `dir` (and what leads to it) for the controller alone.
fn private_dir(dir: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// The staged data holds together: a key, roots that chain to the newest
/// key, a ledger that reads.
fn check(staging: &Path, found: &[DataEntry]) -> Result<(), RestoreError> {
    let refuse = RestoreError::Refused;
    if !found.contains(&DataEntry::TokenKey) {
        return Err(refuse(format!("the archive has no {}", backup::TOKEN_KEY)));
    }
    if !found.contains(&DataEntry::TrustRoot(1)) {
        return Err(refuse(format!(
            "the archive has no {}/{}",
            backup::TRUST_DIR,
            backup::trust_root_name(1)
        )));
    }
    crate::trust::TrustKeys::load_or_create(&staging.join(backup::TRUST_DIR))
        .map_err(|e| refuse(format!("its trust root does not hold together: {e}")))?;
    if found.contains(&DataEntry::Ledger) {
        crate::identity::Ledger::load(staging.join(backup::LEDGER))
            .map_err(|e| refuse(format!("its {} does not read: {e:#}", backup::LEDGER)))?;
    }
    Ok(())
}

/// Moves the staged data into `data_dir` (what it replaces aside), then
/// removes the mark: from then on the controller starts with these keys.
fn commit(data_dir: &Path, staging: &Path, found: &[DataEntry]) -> Result<(), RestoreError> {
    let aside = data_dir.join(format!(
        "before-restore-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ")
    ));
    private_dir(&aside)?;
    for name in [backup::TOKEN_KEY, backup::LEDGER, backup::TRUST_DIR] {
        let (from, to) = (data_dir.join(name), aside.join(name));
        match std::fs::rename(&from, &to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&from)(e)),
            _ => {}
        }
        let staged = staging.join(name);
        if staged.exists() {
            std::fs::rename(&staged, &from).map_err(io(&staged))?;
        }
    }
    let blobs = data_dir.join(backup::BLOBS_DIR).join("sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    for entry in found {
        if let DataEntry::Blob(_) = entry {
            let path = entry.path();
            let from = staging.join(&path);
            std::fs::rename(&from, data_dir.join(&path)).map_err(io(&from))?;
        }
    }
    std::fs::remove_dir_all(staging).map_err(io(staging))?;
    // Everything in place for good before the mark goes.
    for dir in [
        data_dir.to_path_buf(),
        blobs,
        data_dir.join(backup::TRUST_DIR),
    ] {
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
    }
    let marker = data_dir.join(AWAITING);
    std::fs::remove_file(&marker).map_err(io(&marker))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory as a controller leaves it: key, roots, ledger, blobs.
    fn populated(dir: &Path) -> Vec<u8> {
        crate::credentials::CredentialKey::load_or_create(&dir.join(backup::TOKEN_KEY)).unwrap();
        crate::trust::TrustKeys::load_or_create(&dir.join(backup::TRUST_DIR)).unwrap();
        crate::trust::TrustKeys::rotate(&dir.join(backup::TRUST_DIR)).unwrap();
        std::fs::write(
            dir.join(backup::LEDGER),
            br#"{"packages":[],"cabinetsRequiringSignatures":[]}"#,
        )
        .unwrap();
        let blob = b"package bytes".to_vec();
        let digest = Digest::of(&blob);
        let path = dir.join(backup::BLOBS_DIR).join(backup::blob_path(&digest));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &blob).unwrap();
        // Not the store's, not backed up: an interrupted upload, a checkout.
        std::fs::create_dir_all(dir.join("blobs/uploads")).unwrap();
        std::fs::write(dir.join("blobs/uploads/x"), b"partial").unwrap();
        let mut out = Vec::new();
        assert_eq!(write(dir, &mut out).unwrap(), 1);
        out
    }

    fn awaiting_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        assert!(awaiting(dir.path()).unwrap());
        dir
    }

    fn read(dir: &Path, name: &str) -> Vec<u8> {
        std::fs::read(dir.join(name)).unwrap()
    }

    #[test]
    fn a_backup_restores_into_a_waiting_controller_and_only_there() {
        let old = tempfile::tempdir().unwrap();
        let archive = populated(old.path());
        let fresh = awaiting_dir();
        // Started again before the restore: still waiting, whatever it made.
        crate::credentials::CredentialKey::load_or_create(&fresh.path().join(backup::TOKEN_KEY))
            .unwrap();
        assert!(awaiting(fresh.path()).unwrap());
        let restored = restore(fresh.path(), 1 << 20, archive.as_slice()).unwrap();
        assert_eq!(restored.blobs, 1);
        for name in [
            backup::TOKEN_KEY,
            backup::LEDGER,
            "trust/key-2",
            "trust/root-2.json",
        ] {
            assert_eq!(read(fresh.path(), name), read(old.path(), name), "{name}");
        }
        let keys = |d: &Path| crate::trust::TrustKeys::load_or_create(&d.join("trust")).unwrap();
        assert_eq!(
            keys(fresh.path()).fingerprint(),
            keys(old.path()).fingerprint()
        );
        assert!(!fresh.path().join("blobs/uploads/x").exists());
        assert!(!fresh.path().join(STAGING).exists());
        // Done: the controller has keys now, and takes no other restore.
        assert!(!awaiting(fresh.path()).unwrap());
        let again = restore(fresh.path(), 1 << 20, archive.as_slice()).unwrap_err();
        assert!(again.to_string().contains("--await-restore"), "{again}");
        // Nor does one that never waited, even started with
        // --await-restore: it holds a controller's data (even with its key
        // lost, its root is what agents pin).
        std::fs::remove_file(old.path().join(backup::TOKEN_KEY)).unwrap();
        assert!(!awaiting(old.path()).unwrap());
        let err = restore(old.path(), 1 << 20, archive.as_slice()).unwrap_err();
        assert!(err.to_string().contains("keys of its own"), "{err}");
        // A directory awaiting a restore is not run without --await-restore.
        let waiting = awaiting_dir();
        let err = refuse_awaiting(waiting.path()).unwrap_err();
        assert!(err.to_string().contains("awaits a restore"), "{err}");
        refuse_awaiting(fresh.path()).unwrap();
    }

    /// Rewrites the archive's entries with `change` applied to each
    /// (path, bytes); `None` drops it.
    fn rewritten(
        archive: &[u8],
        change: impl Fn(&str, Vec<u8>) -> Option<(String, Vec<u8>)>,
    ) -> Vec<u8> {
        let mut out = tar::Builder::new(Vec::new());
        for entry in tar::Archive::new(archive).entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            if let Some((path, bytes)) = change(&path, bytes) {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o600);
                // Raw, as a hostile writer would: `set_path` refuses `..`.
                header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                header.set_cksum();
                out.append(&header, bytes.as_slice()).unwrap();
            }
        }
        out.into_inner().unwrap()
    }

    #[test]
    fn a_damaged_blob_in_the_store_fails_the_backup_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        populated(dir.path());
        let digest = Digest::of(b"package bytes");
        let path = dir
            .path()
            .join(backup::BLOBS_DIR)
            .join(backup::blob_path(&digest));
        std::fs::write(&path, b"rotten bytes!").unwrap();
        let err = write(dir.path(), &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("blob {digest} in the store is damaged")),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_or_hostile_archive_is_refused_whole_and_names_the_problem() {
        let old = tempfile::tempdir().unwrap();
        let archive = populated(old.path());
        let digest = Digest::of(b"package bytes");
        let blob = format!("blobs/sha256/{}", digest.hex());
        let cases: Vec<(Vec<u8>, String)> = vec![
            (
                rewritten(&archive, |p, b| {
                    Some((
                        p.to_string(),
                        if p.starts_with("blobs/") {
                            b"tampered".to_vec()
                        } else {
                            b
                        },
                    ))
                }),
                format!("{blob:?} is not the blob it is named after"),
            ),
            (
                rewritten(&archive, |p, b| {
                    Some((p.replace("token.key", "../token.key"), b))
                }),
                "\"../token.key\" is not a file of a controller's data directory".into(),
            ),
            (
                rewritten(&archive, |p, b| {
                    (p != "token.key").then(|| (p.to_string(), b))
                }),
                "the archive has no token.key".into(),
            ),
            (
                rewritten(&archive, |p, b| {
                    (p != "trust/key-2").then(|| (p.to_string(), b))
                }),
                "its trust root does not hold together".into(),
            ),
            (
                rewritten(&archive, |p, b| {
                    Some((
                        p.to_string(),
                        if p == backup::LEDGER {
                            b"{".to_vec()
                        } else {
                            b
                        },
                    ))
                }),
                "published.json does not read".into(),
            ),
            (
                archive[..archive.len() / 2].to_vec(),
                "the archive is damaged".into(),
            ),
            (b"garbage".repeat(100), "damaged".into()),
        ];
        for (bad, expected) in cases {
            let fresh = awaiting_dir();
            let mine = crate::credentials::CredentialKey::load_or_create(
                &fresh.path().join(backup::TOKEN_KEY),
            )
            .map(|_| read(fresh.path(), backup::TOKEN_KEY))
            .unwrap();
            let err = restore(fresh.path(), 1 << 20, bad.as_slice()).unwrap_err();
            assert!(
                err.to_string().contains(&expected),
                "{err} (expected {expected})"
            );
            // Nothing replaced, still waiting.
            assert_eq!(read(fresh.path(), backup::TOKEN_KEY), mine);
            assert!(!fresh.path().join(&blob).exists());
            assert!(awaiting(fresh.path()).unwrap());
        }
        // A blob larger than the controller takes.
        let fresh = awaiting_dir();
        let err = restore(fresh.path(), 4, archive.as_slice()).unwrap_err();
        assert!(err.to_string().contains("more than the 4"), "{err}");
    }
}
