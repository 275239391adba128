//! Writing files that hold secrets or state: readable by their owner only
//! (mode 0600) and durable (the file and its directory are synced), so a
//! crash leaves the old file or the new one, never a mix or a half-written
//! file. The data goes to a new temporary file of a random name (created
//! exclusively, so a planted file or symlink is never written through) in
//! the same directory, which is then renamed into place.

use std::{io::Write, path::Path};

/// What [`write_private`] does when the file exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace it atomically (a symlink in its place is replaced, not followed).
    Replace,
    /// Refuse (`AlreadyExists`): a key that must never be overwritten.
    Keep,
}

/// Writes `bytes` to `path`, mode 0600, durably.
pub fn write_private(path: &Path, bytes: &[u8], existing: Existing) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Mode 0600 and O_EXCL, as tempfile creates them on Unix.
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    match existing {
        Existing::Replace => file.persist(path).map_err(|e| e.error)?,
        Existing::Keep => file.persist_noclobber(path).map_err(|e| e.error)?,
    };
    sync_parent(path)
}

/// Makes the entries of `path`'s directory (a rename into it, a removal) durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_in_the_way_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("backup.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_private(&path, b"secrets", Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"secrets");
    }

    #[test]
    fn private_files_are_owner_only_and_keys_are_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"one", Existing::Replace).unwrap();
        write_private(&path, b"two", Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = write_private(&path, b"three", Existing::Keep).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }
}
