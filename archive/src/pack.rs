//! Packing a directory reproducibly: tar + zstd with entries in sorted order,
//! zero timestamps and owners, file modes kept, symlinks kept as links and
//! empty directories kept, so the same directory always gives the same digest.

use std::{
    fs,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::Context as _;
use caravan_api::{v1alpha1::Artifact, Digest};
use sha2::{Digest as _, Sha256};

/// Writes the archive of `dir` to `out` and returns its digest and size.
pub fn pack(dir: &Path, out: &Path) -> anyhow::Result<Artifact> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let hashing = HashingWriter {
        inner: BufWriter::new(file),
        hasher: Sha256::new(),
        size: 0,
    };
    let encoder = zstd::stream::write::Encoder::new(hashing, 3)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    add_dir(&mut tar, dir, Path::new(""))?;
    let mut hashing = tar.into_inner()?.finish()?;
    hashing.inner.flush()?;
    hashing.inner.get_ref().sync_all()?;
    Ok(Artifact {
        digest: Digest::from_hasher(hashing.hasher),
        size: hashing.size,
        manifest: None,
    })
}

fn add_dir<W: Write>(tar: &mut tar::Builder<W>, root: &Path, rel: &Path) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = rel.join(entry.file_name());
        let meta = fs::symlink_metadata(entry.path())?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(mode(&meta));
        if meta.file_type().is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, &path, fs::read_link(entry.path())?)?;
        } else if meta.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, &path, std::io::empty())?;
            add_dir(tar, root, &path)?;
        } else if meta.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            tar.append_data(&mut header, &path, fs::File::open(entry.path())?)?;
        } else {
            anyhow::bail!(
                "{}: only files, directories and symlinks can be packaged",
                entry.path().display()
            );
        }
    }
    Ok(())
}

#[cfg(unix)]
fn mode(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_directory_always_gives_the_same_digest() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("bin")).unwrap();
        fs::create_dir_all(src.path().join("empty")).unwrap();
        fs::write(src.path().join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("bin/hello", src.path().join("hello")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let a = pack(src.path(), &out.path().join("a")).unwrap();
        // Touch the files: timestamps must not matter.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(src.path().join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        let b = pack(src.path(), &out.path().join("b")).unwrap();
        assert_eq!(a, b);
        assert_eq!(fs::metadata(out.path().join("a")).unwrap().len(), a.size);
        fs::write(src.path().join("bin/hello"), b"changed").unwrap();
        assert_ne!(
            pack(src.path(), &out.path().join("c")).unwrap().digest,
            a.digest
        );
    }
}
