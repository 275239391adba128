//! Safe extraction of package archives (tar + zstd).
//!
//! Every entry is checked before it is written:
//! - its path is relative and stays inside the target (no `..` above it);
//! - it is a file, a directory or a link (no devices, FIFOs, sockets);
//! - it does not lie beneath a symbolic link of the archive (nothing is
//!   written through a link), and is declared once;
//! - a link's target, resolved through every symbolic link of the archive
//!   (so a chain of links that each look harmless cannot climb out), stays
//!   inside the target; absolute link targets are refused. Links are judged
//!   once the whole archive is read: nothing is ever written through one,
//!   and an archive whose links escape is refused (and, when extracting,
//!   its directory left for the caller to remove);
//! - its data is as long as its header says;
//! - all files together stay within [`Limits`] (bytes and entries), so a
//!   small archive cannot fill the disk.
//!
//! Files keep their modes, except setuid, setgid, sticky and world-write
//! bits, which are dropped. Extraction goes into a fresh directory, so a
//! refused archive leaves nothing behind but that directory, which the
//! caller removes.

use std::{
    collections::{BTreeMap, HashSet},
    io::Read,
    path::{Component, Path, PathBuf},
};

/// Mode bits never given to an extracted file: setuid, setgid, sticky, o+w.
pub const MODE_MASK: u32 = 0o7002;

/// Most symbolic links one path may be resolved through (as `SYMLOOP_MAX`).
const MAX_LINK_HOPS: u32 = 40;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive entry {path:?}: {problem}")]
    Refused { path: String, problem: &'static str },
    #[error("archive too large: {0}")]
    TooLarge(String),
    #[error("reading archive: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How much an archive may unpack to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of all files together.
    pub max_bytes: u64,
    /// Entries of every kind.
    pub max_entries: u64,
}

impl Default for Limits {
    /// 64 GiB in at most a million entries.
    fn default() -> Self {
        Self {
            max_bytes: 64 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// `path` with `.` dropped and `..` applied, if it stays inside (is relative
/// and never climbs above its start).
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The symbolic links of an archive so far, and what its entries occupy.
#[derive(Default)]
struct Tree {
    /// Link path → target, as written.
    symlinks: BTreeMap<PathBuf, PathBuf>,
    /// Hard link path → target (relative to the root).
    hardlinks: Vec<(PathBuf, PathBuf)>,
    /// Every entry's path.
    entries: HashSet<PathBuf>,
    /// Every directory some entry lies beneath.
    parents: HashSet<PathBuf>,
    bytes: u64,
}

impl Tree {
    /// Where `path` (relative to the root) really is, following the
    /// archive's symbolic links; `None` if it leaves the root or loops.
    fn resolve(&self, path: &Path, hops: &mut u32) -> Option<PathBuf> {
        let mut out = PathBuf::new();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    if !out.pop() {
                        return None;
                    }
                }
                Component::Normal(name) => {
                    out.push(name);
                    if let Some(target) = self.symlinks.get(&out) {
                        *hops = hops.checked_sub(1)?;
                        if target.is_absolute() {
                            return None;
                        }
                        let from = out.parent().unwrap_or(Path::new("")).join(target);
                        out = self.resolve(&from, hops)?;
                    }
                }
                Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        Some(out)
    }

    /// Records one entry, refusing what the rules forbid (see the module docs).
    fn add<R: Read>(
        &mut self,
        entry: &tar::Entry<R>,
        path: &Path,
        limits: &Limits,
    ) -> Result<(), ArchiveError> {
        let refuse = |problem| ArchiveError::Refused {
            path: path.display().to_string(),
            problem,
        };
        let norm = normalize(path)
            .filter(|p| p.components().next().is_some())
            .ok_or_else(|| refuse("path is absolute or leaves the target directory"))?;
        if self.entries.len() as u64 >= limits.max_entries {
            return Err(ArchiveError::TooLarge(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let mut parent = norm.parent();
        while let Some(p) = parent.filter(|p| p.components().next().is_some()) {
            if self.symlinks.contains_key(p) {
                return Err(refuse("path lies beneath a symbolic link"));
            }
            parent = p.parent();
        }
        if !self.entries.insert(norm.clone()) {
            return Err(refuse("path is declared twice"));
        }
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous => {
                let size = entry.header().size().map_err(ArchiveError::Read)?;
                self.bytes = self.bytes.saturating_add(size);
                if self.bytes > limits.max_bytes {
                    return Err(ArchiveError::TooLarge(format!(
                        "its files unpack to more than {} bytes",
                        limits.max_bytes
                    )));
                }
            }
            T::Directory => {}
            T::Symlink | T::Link => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .ok_or_else(|| refuse("link without a target"))?
                    .into_owned();
                if target.is_absolute() {
                    return Err(refuse("link points outside the target directory"));
                }
                if self.parents.contains(&norm) {
                    return Err(refuse("a link would replace a directory of the archive"));
                }
                if kind == T::Symlink {
                    self.symlinks.insert(norm.clone(), target);
                } else {
                    // A hard link is made at once, to whatever its target is
                    // now: judged before it is written, and again at the end.
                    if self.resolve(&target, &mut { MAX_LINK_HOPS }).is_none() {
                        return Err(refuse("link points outside the target directory"));
                    }
                    self.hardlinks.push((norm.clone(), target));
                }
            }
            _ => {
                return Err(refuse(
                    "device files, FIFOs and other special entries are not allowed",
                ))
            }
        }
        let mut parent = norm.parent();
        while let Some(p) = parent.filter(|p| p.components().next().is_some()) {
            self.parents.insert(p.to_path_buf());
            parent = p.parent();
        }
        Ok(())
    }

    /// Once every entry is known: every link, resolved through all the
    /// archive's symbolic links, stays inside (so a chain cannot escape
    /// however its links are ordered).
    fn verify_links(&self) -> Result<(), ArchiveError> {
        for (link, target) in &self.symlinks {
            let from = link.parent().unwrap_or(Path::new("")).join(target);
            if self.resolve(&from, &mut { MAX_LINK_HOPS }).is_none() {
                return Err(ArchiveError::Refused {
                    path: link.display().to_string(),
                    problem: "link points outside the target directory (through other links)",
                });
            }
        }
        for (link, target) in &self.hardlinks {
            if self.resolve(target, &mut { MAX_LINK_HOPS }).is_none() {
                return Err(ArchiveError::Refused {
                    path: link.display().to_string(),
                    problem: "link points outside the target directory",
                });
            }
        }
        Ok(())
    }
}

/// The decompressed stream of an archive.
type Stream<R> = zstd::stream::read::Decoder<'static, std::io::BufReader<R>>;

fn open<R: Read>(reader: R) -> Result<tar::Archive<Stream<R>>, ArchiveError> {
    let decoder = zstd::stream::read::Decoder::new(reader).map_err(ArchiveError::Read)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_mask(MODE_MASK);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    Ok(archive)
}

/// Walks every entry of the archive, vetting it, then handing it to `each`;
/// returns the number of files.
fn walk<R: Read>(
    reader: R,
    limits: &Limits,
    mut each: impl FnMut(&mut tar::Entry<Stream<R>>, &Path) -> Result<(), ArchiveError>,
) -> Result<u64, ArchiveError> {
    let mut archive = open(reader)?;
    let mut tree = Tree::default();
    let mut files = 0;
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let path = entry.path().map_err(ArchiveError::Read)?.into_owned();
        use tar::EntryType as T;
        if matches!(
            entry.header().entry_type(),
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            continue;
        }
        tree.add(&entry, &path, limits)?;
        each(&mut entry, &path)?;
        if entry.header().entry_type().is_file() {
            files += 1;
        }
    }
    tree.verify_links()?;
    Ok(files)
}

/// Reads a whole archive without writing anything: every entry is vetted
/// and every file's data must be as long as its header says. Returns the
/// number of files.
pub fn check(reader: impl Read, limits: &Limits) -> Result<u64, ArchiveError> {
    walk(reader, limits, |entry, path| {
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
pub fn extract(reader: impl Read, dest: &Path, limits: &Limits) -> Result<u64, ArchiveError> {
    std::fs::create_dir(dest).map_err(|source| ArchiveError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    walk(reader, limits, |entry, path| {
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
        let r = extract(
            &archive(entries)[..],
            &dir.path().join("out"),
            &Limits::default(),
        );
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
            &Limits::default(),
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
            (
                // Each link looks harmless on its own; together they climb out.
                "link chain",
                &[
                    ("a/", T::Directory, b"", None),
                    ("a/b/", T::Directory, b"", None),
                    ("a/b/up", T::Symlink, b"", Some("../..")),
                    ("p1", T::Symlink, b"", Some("a/b/up/..")),
                    ("p2", T::Symlink, b"", Some("p1/..")),
                ],
            ),
            (
                "link chain declared backwards",
                &[
                    ("p1", T::Symlink, b"", Some("a/b/up/..")),
                    ("a/", T::Directory, b"", None),
                    ("a/b/", T::Directory, b"", None),
                    ("a/b/up", T::Symlink, b"", Some("../..")),
                ],
            ),
            (
                "through a link",
                &[
                    ("l", T::Symlink, b"", Some(".")),
                    ("l/evil", T::Regular, b"x", None),
                ],
            ),
            (
                "link loop",
                &[
                    ("a", T::Symlink, b"", Some("b")),
                    ("b", T::Symlink, b"", Some("a")),
                ],
            ),
            (
                "twice",
                &[
                    ("f", T::Regular, b"x", None),
                    ("f", T::Symlink, b"", Some("g")),
                ],
            ),
            (
                "hardlink through a link",
                &[
                    ("up", T::Symlink, b"", Some("..")),
                    ("h", T::Link, b"", Some("up/x")),
                ],
            ),
        ];
        for (what, entries) in cases {
            let e = check(&archive(entries)[..], &Limits::default()).expect_err(what);
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

    #[test]
    fn links_that_stay_inside_are_kept() {
        use tar::EntryType as T;
        let (r, dir) = try_extract(&[
            ("lib/", T::Directory, b"", None),
            ("lib/libx.so.1", T::Regular, b"elf", None),
            ("lib/libx.so", T::Symlink, b"", Some("../lib/./libx.so.1")),
            ("current", T::Symlink, b"", Some("lib")),
            ("dangling", T::Symlink, b"", Some("lib/not-there")),
            ("hard", T::Link, b"", Some("lib/libx.so.1")),
        ]);
        assert_eq!(r.unwrap(), 1, "one regular file");
        let out = dir.path().join("out");
        assert_eq!(std::fs::read(out.join("current/libx.so")).unwrap(), b"elf");
        assert_eq!(std::fs::read(out.join("hard")).unwrap(), b"elf");
    }

    #[test]
    fn setuid_setgid_sticky_and_world_write_bits_are_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let mut b = tar::Builder::new(Vec::new());
        for (name, mode) in [("suid", 0o4755), ("shared", 0o2777), ("plain", 0o750)] {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).unwrap();
            h.set_size(1);
            h.set_mode(mode);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        }
        let bytes = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        extract(&bytes[..], &out, &Limits::default()).unwrap();
        let mode = |n: &str| std::fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("shared"), 0o775);
        assert_eq!(mode("plain"), 0o750);
    }

    #[test]
    fn an_archive_larger_unpacked_than_allowed_is_refused_before_anything_is_written() {
        use tar::EntryType as T;
        let entries: &[Entry] = &[
            ("a", T::Regular, &[0u8; 600], None),
            ("b", T::Regular, &[0u8; 600], None),
        ];
        let small = Limits {
            max_bytes: 1000,
            max_entries: 10,
        };
        let e = check(&archive(entries)[..], &small).unwrap_err();
        assert!(e.to_string().contains("more than 1000 bytes"), "{e}");
        let few = Limits {
            max_bytes: 1 << 20,
            max_entries: 1,
        };
        let e = check(&archive(entries)[..], &few).unwrap_err();
        assert!(e.to_string().contains("more than 1 entries"), "{e}");
        assert!(check(&archive(entries)[..], &Limits::default()).is_ok());
    }
}
