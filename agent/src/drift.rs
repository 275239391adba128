//! Drift: what an installed version consists of (its [`Baseline`]: every
//! file's size, mtime and sha256), recorded once its install script has
//! run, and the cheap check against it on every pass: a file whose size and
//! modification time are unchanged is taken as unchanged; only the others
//! are hashed. Changed, deleted and added files are drift. Baselines live in
//! the state directory, one per installed version, and travel in backups.

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use caravan_api::{
    wire::{Drift, DriftChange},
    Digest,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::state::{Installed, StateDir};

/// What one installed version consisted of once installed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    /// By path inside the package.
    pub files: BTreeMap<String, Entry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// sha256 of a file's content, or the target of a symlink (`link:` prefix).
    pub digest: String,
    pub size: u64,
    pub mtime_ns: i128,
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

fn digest(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<String> {
    if meta.file_type().is_symlink() {
        return Ok(format!("link:{}", std::fs::read_link(path)?.display()));
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Every file and symlink under `dir` (directories themselves are not
/// recorded), by relative path.
fn walk(dir: &Path) -> std::io::Result<Vec<(String, PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                stack.push(rel);
            } else {
                out.push((rel.to_string_lossy().into_owned(), entry.path(), meta));
            }
        }
    }
    Ok(out)
}

/// Where the baselines live in the state directory.
const DIR: &str = "manifests";

fn file(digest: &Digest) -> String {
    format!("{DIR}/{}.json", digest.hex())
}

impl Baseline {
    /// The baseline of version `digest`, if recorded.
    pub fn load(state: &StateDir, digest: &Digest) -> anyhow::Result<Option<Self>> {
        state.json(&file(digest))
    }

    /// Records the baseline of version `digest`.
    pub fn save(&self, state: &StateDir, digest: &Digest) -> anyhow::Result<()> {
        state.set_json(&file(digest), Some(self))
    }

    /// Drops the baselines of versions no longer installed.
    pub fn prune(state: &StateDir, installed: &Installed) -> anyhow::Result<()> {
        let keep: Vec<String> = installed.values().map(|r| file(&r.digest)).collect();
        let Ok(dir) = std::fs::read_dir(state.path().join(DIR)) else {
            return Ok(());
        };
        for entry in dir {
            let entry = entry?;
            let name = format!("{DIR}/{}", entry.file_name().to_string_lossy());
            if !keep.contains(&name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Records what `dir` holds now.
    pub fn record(dir: &Path) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        for (rel, path, meta) in walk(dir)? {
            files.insert(
                rel,
                Entry {
                    digest: digest(&path, &meta)?,
                    size: meta.len(),
                    mtime_ns: mtime_ns(&meta),
                },
            );
        }
        Ok(Self { files })
    }

    /// How `dir` differs from the record, for package `package`.
    pub fn drift(&self, package: &str, dir: &Path) -> std::io::Result<Vec<Drift>> {
        let mut drift = Vec::new();
        let mut seen = 0;
        let item = |path: &str, change| Drift {
            package: package.to_string(),
            path: path.to_string(),
            change,
        };
        for (rel, path, meta) in walk(dir)? {
            let change = match self.files.get(&rel) {
                None => Some(DriftChange::Added),
                Some(e) => {
                    seen += 1;
                    let same = (e.size == meta.len() && e.mtime_ns == mtime_ns(&meta))
                        || digest(&path, &meta)? == e.digest;
                    (!same).then_some(DriftChange::Modified)
                }
            };
            drift.extend(change.map(|c| item(&rel, c)));
        }
        if seen < self.files.len() {
            for rel in self.files.keys() {
                if std::fs::symlink_metadata(dir.join(rel)).is_err() {
                    drift.push(item(rel, DriftChange::Deleted));
                }
            }
        }
        drift.sort();
        Ok(drift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_deleted_and_added_files_are_drift_and_a_touched_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        for f in ["a", "b", "bin/c", "d"] {
            std::fs::write(d.join(f), f).unwrap();
        }
        let m = Baseline::record(d).unwrap();
        assert_eq!(m.files.len(), 4);
        assert!(m.drift("p", d).unwrap().is_empty());
        // Same content written again: a new mtime, but no drift.
        std::fs::write(d.join("d"), "d").unwrap();
        std::fs::write(d.join("a"), "A").unwrap();
        std::fs::remove_file(d.join("bin/c")).unwrap();
        std::fs::write(d.join("new"), "x").unwrap();
        let changes: Vec<(String, DriftChange)> = m
            .drift("p", d)
            .unwrap()
            .into_iter()
            .map(|x| (x.path, x.change))
            .collect();
        assert_eq!(
            changes,
            [
                ("a".into(), DriftChange::Modified),
                ("bin/c".into(), DriftChange::Deleted),
                ("new".into(), DriftChange::Added),
            ]
        );
    }

    #[test]
    fn baselines_are_kept_only_for_installed_versions() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let (old, new) = (Digest::of(b"1"), Digest::of(b"2"));
        let b = Baseline::record(dir.path().join("downloads").as_path()).unwrap();
        b.save(&state, &old).unwrap();
        b.save(&state, &new).unwrap();
        let record = crate::state::InstalledRecord {
            name: "app".into(),
            version: "2".into(),
            digest: new,
            job: "ns/j".into(),
            install: Default::default(),
            detected: false,
        };
        Baseline::prune(&state, &Installed::from([("app".into(), record)])).unwrap();
        assert!(Baseline::load(&state, &old).unwrap().is_none());
        assert_eq!(Baseline::load(&state, &new).unwrap(), Some(b));
    }
}
