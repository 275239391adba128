//! Where a package lives in the install root, and the moves that change
//! it: each version is extracted whole into
//! `<root>/.caravan/versions/<package>/<digest hex>`, and `<root>/<package>`
//! is a symlink switched from one version to the next by a single rename,
//! so the package is always wholly at one version. The previous version is
//! kept until the new one is committed, for rolling back.

use std::path::{Path, PathBuf};

use caravan_api::Digest;

/// Work directory of the agent inside the install root (same filesystem, so renames are atomic).
fn work_dir(root: &Path) -> PathBuf {
    root.join(".caravan")
}

/// The paths of one package in the install root.
struct Slots {
    live: PathBuf,
    versions: PathBuf,
    staging: PathBuf,
    /// The new symlink, before it is renamed over `live`.
    link: PathBuf,
    failed: PathBuf,
}

fn slots(root: &Path, package: &str) -> Slots {
    let work = work_dir(root);
    Slots {
        live: root.join(package),
        versions: work.join("versions").join(package),
        staging: work.join("staging").join(package),
        link: work.join("links").join(package),
        failed: work.join("failed").join(package),
    }
}

/// A version recorded before the agent managed the package (a directory
/// put there by hand), as it is kept among the versions.
const UNRECORDED: &str = "unrecorded";

fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes `dir`'s entries (renames into or out of it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().expect("a slot has a parent"))
}

/// Points `live` at version `id` in one atomic step. A real directory in
/// its place (a package put there by hand) is moved into the versions as
/// `id_before` first.
fn switch_to(s: &Slots, id: &str, id_before: &str) -> std::io::Result<()> {
    if std::fs::symlink_metadata(&s.live).is_ok_and(|m| m.is_dir()) {
        std::fs::rename(&s.live, s.versions.join(id_before))?;
    }
    create_parent(&s.link)?;
    remove_file_if_exists(&s.link)?;
    let package = s.live.file_name().expect("a package has a name");
    let target = Path::new(".caravan/versions").join(package).join(id);
    std::os::unix::fs::symlink(target, &s.link)?;
    std::fs::rename(&s.link, &s.live)?;
    sync_dir(s.live.parent().expect("the install root"))
}

/// The version `live` points at, if any.
fn live_id(s: &Slots) -> Option<String> {
    let target = std::fs::read_link(&s.live).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Takes `path` (a symlink or a directory) away at once, then deletes it.
fn discard(path: &Path, aside: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => std::fs::remove_file(path),
        Ok(_) => {
            remove_dir_if_exists(aside)?;
            create_parent(aside)?;
            std::fs::rename(path, aside)?;
            remove_dir_if_exists(aside)
        }
    }
}

/// Deletes every version of `package` but `keep`.
fn drop_versions_but(s: &Slots, keep: Option<&str>) -> std::io::Result<()> {
    let Ok(dir) = std::fs::read_dir(&s.versions) else {
        return Ok(());
    };
    for entry in dir {
        let entry = entry?;
        if Some(entry.file_name().to_string_lossy().as_ref()) != keep {
            remove_dir_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// Puts the previous version of `package` back in place (digest
/// `previous`; nothing at all if there was none), from wherever an install
/// stopped, and deletes the new one.
pub fn roll_back(root: &Path, package: &str, previous: Option<&Digest>) -> anyhow::Result<()> {
    let s = slots(root, package);
    remove_dir_if_exists(&s.staging)?;
    let previous = previous
        .map(Digest::hex)
        .unwrap_or_else(|| UNRECORDED.to_string());
    match previous.as_str() {
        id if s.versions.join(id).exists() => {
            if live_id(&s).as_deref() != Some(id) {
                switch_to(&s, id, id)?;
            }
            drop_versions_but(&s, Some(id))?;
        }
        // Not installed before (or installed by hand, and still in place).
        _ if std::fs::symlink_metadata(&s.live).is_ok_and(|m| m.is_dir()) => {
            drop_versions_but(&s, None)?;
        }
        _ => {
            discard(&s.live, &s.failed)?;
            drop_versions_but(&s, None)?;
        }
    }
    Ok(())
}

/// Whether version `digest` of `package` is in place (a cheap check: the
/// symlink and the directory it points at).
pub fn is_live(root: &Path, package: &str, digest: &Digest) -> bool {
    let s = slots(root, package);
    live_id(&s) == Some(digest.hex()) && s.live.is_dir()
}

/// Keeps the new version of `package` (digest `current`): the others go.
pub fn drop_old(root: &Path, package: &str, current: &Digest) -> anyhow::Result<()> {
    drop_versions_but(&slots(root, package), Some(&current.hex()))?;
    Ok(())
}

/// Extracts the archive of version `digest` (the previous one is
/// `previous`) into a directory of its own, then makes it live in one
/// atomic step, keeping the previous version for [`roll_back`] until
/// [`drop_old`]. A crash anywhere in here is undone by [`roll_back`].
pub fn stage_and_swap(
    blob: &Path,
    root: &Path,
    package: &str,
    digest: &Digest,
    previous: Option<&Digest>,
    limits: &caravan_archive::Limits,
) -> anyhow::Result<()> {
    let s = slots(root, package);
    let id = &digest.hex();
    remove_dir_if_exists(&s.staging)?;
    create_parent(&s.staging)?;
    std::fs::create_dir_all(&s.versions)?;
    // A first pass reads the whole archive and writes nothing: a hostile or
    // damaged one is refused before anything reaches the disk.
    caravan_archive::check(std::io::BufReader::new(std::fs::File::open(blob)?), limits)?;
    let file = std::fs::File::open(blob)?;
    if let Err(e) = caravan_archive::extract(std::io::BufReader::new(file), &s.staging, limits) {
        let _ = std::fs::remove_dir_all(&s.staging);
        return Err(e.into());
    }
    // The new files reach the disk before the switch can make them live.
    rustix::fs::syncfs(std::fs::File::open(root)?)?;
    let target = s.versions.join(id);
    if live_id(&s).as_deref() == Some(id.as_str()) && target.is_dir() {
        // Installed again over itself (a repair): the fresh copy and the
        // live one trade places in one atomic step.
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        if renameat_with(CWD, &s.staging, CWD, &target, RenameFlags::EXCHANGE).is_err() {
            // A filesystem without exchange: briefly absent instead.
            discard(&target, &s.failed)?;
            std::fs::rename(&s.staging, &target)?;
        }
        remove_dir_if_exists(&s.staging)?;
        sync_dir(&s.versions)?;
        return Ok(());
    }
    remove_dir_if_exists(&target)?;
    std::fs::rename(&s.staging, &target)?;
    sync_dir(&s.versions)?;
    crate::failpoint::hit("extracted");
    let before = previous
        .map(Digest::hex)
        .unwrap_or_else(|| UNRECORDED.to_string());
    switch_to(&s, id, &before)?;
    Ok(())
}

/// Removes a package: its symlink (or directory) at once, then its versions.
pub fn remove_package(root: &Path, package: &str) -> anyhow::Result<()> {
    let s = slots(root, package);
    discard(&s.live, &s.failed)?;
    if root.exists() {
        sync_dir(root)?;
    }
    remove_dir_if_exists(&s.versions)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolled_back_install_restores_the_previous_version() {
        let root = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let pack = |content: &str| {
            std::fs::write(src.path().join("VERSION"), content).unwrap();
            let path = root.path().join(format!("{content}.tar.zst"));
            caravan_archive::pack(src.path(), &path).unwrap();
            path
        };
        let (v1, v2) = (pack("1"), pack("2"));
        let (d1, d2) = (&Digest::of(b"1"), &Digest::of(b"2"));
        let r = root.path();
        let live = r.join("app");
        let version = || std::fs::read_to_string(live.join("VERSION")).unwrap();
        stage_and_swap(&v1, r, "app", d1, None, &Default::default()).unwrap();
        drop_old(r, "app", d1).unwrap();
        stage_and_swap(&v2, r, "app", d2, Some(d1), &Default::default()).unwrap();
        assert_eq!(version(), "2");
        roll_back(r, "app", Some(d1)).unwrap();
        assert_eq!(version(), "1");
        assert!(
            !r.join(".caravan/versions/app").join(d2.hex()).exists(),
            "the failed version is gone"
        );
        // A first install rolled back leaves nothing.
        remove_package(r, "app").unwrap();
        stage_and_swap(&v2, r, "app", d2, None, &Default::default()).unwrap();
        roll_back(r, "app", None).unwrap();
        assert!(std::fs::symlink_metadata(&live).is_err());
        // A package put there by hand is taken over, and given back on rollback.
        std::fs::create_dir_all(&live).unwrap();
        std::fs::write(live.join("VERSION"), "by hand").unwrap();
        stage_and_swap(&v2, r, "app", d2, None, &Default::default()).unwrap();
        assert_eq!(version(), "2");
        roll_back(r, "app", None).unwrap();
        assert_eq!(version(), "by hand");
    }
}
