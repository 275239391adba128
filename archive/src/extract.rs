//! Safe extraction of package archives (tar + zstd).
//!
//! Every entry is checked before anything is written: no absolute paths, no
//! `..`, no links that point outside the target, no device files or FIFOs, and
//! an entry's data must match its header size. Extraction goes into a fresh
//! directory, so a refused archive leaves nothing behind but that
//! directory, which the caller removes.

use std::{
    io::Read,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive entry {path:?}: {problem}")]
    Refused { path: String, problem: &'static str },
    #[error("reading archive: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A relative path that stays inside the directory it is joined to.
fn contained(path: &Path) -> bool {
    let mut depth = 0i32;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// The decompressed stream of an archive.
type Stream<R> = zstd::stream::read::Decoder<'static, std::io::BufReader<R>>;

fn open<R: Read>(reader: R) -> Result<tar::Archive<Stream<R>>, ArchiveError> {
    let decoder = zstd::stream::read::Decoder::new(reader).map_err(ArchiveError::Read)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    Ok(archive)
}

/// Checks one entry: its path stays inside the target, it is a file,
/// directory or link that stays inside too. Returns whether it is a
/// metadata-only entry to skip.
fn vet<R: Read>(entry: &tar::Entry<R>, path: &Path) -> Result<bool, ArchiveError> {
    let refuse = |problem| ArchiveError::Refused {
        path: path.display().to_string(),
        problem,
    };
    if !contained(path) || path.components().next().is_none() {
        return Err(refuse("path is absolute or leaves the target directory"));
    }
    let kind = entry.header().entry_type();
    use tar::EntryType as T;
    match kind {
        T::Regular | T::Continuous | T::Directory => Ok(false),
        T::Symlink | T::Link => {
            let target = entry
                .link_name()
                .map_err(ArchiveError::Read)?
                .ok_or_else(|| refuse("link without a target"))?
                .into_owned();
            let resolved = if kind == T::Symlink {
                path.parent().unwrap_or(Path::new("")).join(&target)
            } else {
                target.clone()
            };
            if target.is_absolute() || !contained(&resolved) {
                return Err(refuse("link points outside the target directory"));
            }
            Ok(false)
        }
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => Ok(true),
        _ => Err(refuse(
            "device files, FIFOs and other special entries are not allowed",
        )),
    }
}

/// Walks every entry of the archive, vetting it, then handing it to `each`;
/// returns the number of files.
fn walk<R: Read>(
    reader: R,
    mut each: impl FnMut(&mut tar::Entry<Stream<R>>, &Path) -> Result<(), ArchiveError>,
) -> Result<u64, ArchiveError> {
    let mut archive = open(reader)?;
    let mut files = 0;
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let path = entry.path().map_err(ArchiveError::Read)?.into_owned();
        if vet(&entry, &path)? {
            continue;
        }
        each(&mut entry, &path)?;
        if entry.header().entry_type().is_file() {
            files += 1;
        }
    }
    Ok(files)
}

/// Reads a whole archive without writing anything: every entry is vetted
/// and every file's data must be as long as its header says. Returns the
/// number of files.
pub fn check(reader: impl Read) -> Result<u64, ArchiveError> {
    walk(reader, |entry, path| {
        let size = entry.header().size().map_err(ArchiveError::Read)?;
        let read = std::io::copy(entry, &mut std::io::sink()).map_err(ArchiveError::Read)?;
        if read != size {
            return Err(ArchiveError::Refused {
                path: path.display().to_string(),
                problem: "data size does not match the header",
            });
        }
        Ok(())
    })
}

/// Extracts a zstd-compressed tar from `reader` into `dest` (created, must
/// not exist), vetting each entry before it is written. Run [`check`] over
/// the same bytes first so that a hostile archive is refused before anything
/// is written at all.
pub fn extract(reader: impl Read, dest: &Path) -> Result<u64, ArchiveError> {
    std::fs::create_dir(dest).map_err(|source| ArchiveError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    walk(reader, |entry, path| {
        // `unpack_in` also refuses to write through symlinks that leave `dest`.
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|source| ArchiveError::Write {
                path: dest.join(path),
                source,
            })?;
        if !unpacked {
            return Err(ArchiveError::Refused {
                path: path.display().to_string(),
                problem: "path leaves the target directory",
            });
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path, type, data and link target of one raw tar entry.
    type Entry<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

    /// Builds a tar.zst with raw headers, so hostile entries can be made.
    fn archive(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Write the name bytes directly: `set_path` refuses `..`.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                let ln = &mut h.as_old_mut().linkname;
                ln[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
    }

    fn try_extract(entries: &[Entry]) -> (Result<u64, ArchiveError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let r = extract(&archive(entries)[..], &dir.path().join("out"));
        (r, dir)
    }

    #[test]
    fn an_entry_shorter_than_its_header_says_is_refused() {
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_size(100_000);
        h.set_mode(0o644);
        h.set_cksum();
        // The header promises 100000 bytes; the archive ends after 10.
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 10]);
        let dir = tempfile::tempdir().unwrap();
        let r = extract(
            &zstd::encode_all(&raw[..], 3).unwrap()[..],
            &dir.path().join("out"),
        );
        assert!(r.is_err(), "a truncated entry must not count as extracted");
    }

    #[test]
    fn a_plain_archive_is_extracted() {
        use tar::EntryType as T;
        let (r, dir) = try_extract(&[
            ("bin/", T::Directory, b"", None),
            ("bin/hello", T::Regular, b"hi", None),
            ("link", T::Symlink, b"", Some("bin/hello")),
        ]);
        assert_eq!(r.unwrap(), 1);
        assert_eq!(std::fs::read(dir.path().join("out/link")).unwrap(), b"hi");
    }

    #[test]
    fn hostile_entries_are_refused_before_writing_outside() {
        use tar::EntryType as T;
        let cases: &[(&str, &[Entry])] = &[
            ("dotdot", &[("../evil", T::Regular, b"x", None)]),
            ("absolute", &[("/tmp/evil", T::Regular, b"x", None)]),
            ("symlink out", &[("l", T::Symlink, b"", Some("../../etc"))]),
            (
                "absolute symlink",
                &[("l", T::Symlink, b"", Some("/etc/passwd"))],
            ),
            ("hardlink out", &[("h", T::Link, b"", Some("../x"))]),
            ("device", &[("dev", T::Char, b"", None)]),
            ("fifo", &[("fifo", T::Fifo, b"", None)]),
        ];
        for (what, entries) in cases {
            let e = check(&archive(entries)[..]).expect_err(what);
            assert!(
                matches!(e, ArchiveError::Refused { .. }),
                "{what}: check: {e}"
            );
            let (r, dir) = try_extract(entries);
            let e = r.expect_err(what);
            assert!(matches!(e, ArchiveError::Refused { .. }), "{what}: {e}");
            assert!(!dir.path().join("evil").exists(), "{what}");
        }
    }
}
