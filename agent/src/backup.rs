//! `caravan-agent backup` and `restore`: the endpoint's identity (host ID
//! and secret), its credentials, the root of trust it pinned (and the
//! desired-state version it accepted, so no older one is taken after a
//! restore) and the record of what it installed (with
//! the file manifests drift is checked against), in one file, so that after an OS reinstall it is the same Agent in the cluster
//! and does not reinstall what is still in place. The file holds secrets:
//! it is written readable by its owner only.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use caravan_api::Digest;

use crate::{
    drift::Baseline,
    state::{write_atomic, Credentials, Installed, StateDir},
    transaction::journal,
    trust::Trust,
};

const FORMAT: &str = "caravan-agent-backup/v1";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Backup {
    format: String,
    host_id: String,
    host_secret: String,
    credentials: Option<Credentials>,
    installed: Installed,
    /// What each installed version consisted of (for drift), by digest.
    #[serde(default)]
    manifests: BTreeMap<Digest, Baseline>,
    #[serde(default)]
    trust: Option<Trust>,
    /// The agent's private key (it renews the agent's credential).
    #[serde(default)]
    agent_key: Option<String>,
}

/// Writes the backup of `state` to `out`. The agent must be stopped.
pub fn backup(state: &StateDir, out: &Path) -> anyhow::Result<()> {
    let _lock = state.lock()?;
    let (host_id, host_secret) = state
        .identity()?
        .context("nothing to back up: this agent has no identity yet (it never ran)")?;
    anyhow::ensure!(
        journal::read(state)?.is_none(),
        "a package change was interrupted; start the agent once to finish it, stop it, then back up"
    );
    let installed = state.installed()?;
    let mut manifests = BTreeMap::new();
    for r in installed.values() {
        if let Some(b) = Baseline::load(state, &r.digest)? {
            manifests.insert(r.digest, b);
        }
    }
    let backup = Backup {
        format: FORMAT.into(),
        host_id,
        host_secret,
        credentials: state.credentials()?,
        installed,
        manifests,
        trust: Trust::load(state)?,
        agent_key: state.agent_key_text()?,
    };
    write_atomic(out, &serde_json::to_vec_pretty(&backup)?)
        .with_context(|| format!("writing {}", out.display()))
}

/// Puts the backup `from` into `state`, which must not hold another
/// identity unless `force`. The agent must be stopped.
pub fn restore(state: &StateDir, from: &Path, force: bool) -> anyhow::Result<()> {
    let _lock = state.lock()?;
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let backup: Backup = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a caravan-agent backup", from.display()))?;
    anyhow::ensure!(
        backup.format == FORMAT,
        "{} is a backup in format {:?}; this agent reads {FORMAT:?}",
        from.display(),
        backup.format
    );
    if let Some((id, _)) = state.identity()? {
        anyhow::ensure!(
            force || id == backup.host_id,
            "this state directory already holds host {id}, not {} from the backup; --force replaces it",
            backup.host_id
        );
    }
    state.set_identity(&backup.host_id, &backup.host_secret)?;
    state.set_credentials(backup.credentials.as_ref())?;
    state.set_installed(&backup.installed)?;
    if let Some(trust) = &backup.trust {
        trust.save(state)?;
    }
    if let Some(key) = &backup.agent_key {
        state.set_agent_key(key)?;
    }
    for (digest, b) in &backup.manifests {
        b.save(state, digest)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::InstalledRecord;

    fn agent_with_history(dir: &Path) -> StateDir {
        let state = StateDir::open(dir).unwrap();
        state.host_id().unwrap();
        state
            .set_credentials(Some(&Credentials {
                server: "https://relay".into(),
                agent: "desk-1".into(),
                token: "t0ken".into(),
            }))
            .unwrap();
        let digest = Digest::of(b"hello");
        let record = InstalledRecord {
            name: "hello".into(),
            version: "1".into(),
            digest,
            job: "ns/j".into(),
            install: Default::default(),
            detected: false,
        };
        state
            .set_installed(&Installed::from([("hello".into(), record)]))
            .unwrap();
        Baseline::record(&state.downloads())
            .unwrap()
            .save(&state, &digest)
            .unwrap();
        state
    }

    #[test]
    fn a_restored_state_is_the_same_identity_with_its_records_and_baselines() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let before = agent_with_history(old.path());
        let file = old.path().join("backup.json");
        backup(&before, &file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let after = StateDir::open(new.path()).unwrap();
        restore(&after, &file, false).unwrap();
        assert_eq!(after.identity().unwrap(), before.identity().unwrap());
        assert_eq!(after.credentials().unwrap().unwrap().agent, "desk-1");
        assert_eq!(after.installed().unwrap(), before.installed().unwrap());
        let digest = Digest::of(b"hello");
        assert!(Baseline::load(&after, &digest).unwrap().is_some());
    }

    #[test]
    fn a_backup_refuses_an_interrupted_change_and_a_restore_another_identity() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = agent_with_history(a.path());
        let file = a.path().join("backup.json");
        let entry = journal::Entry {
            package: "hello".into(),
            step: journal::Step::Swapped,
            to: None,
        };
        journal::write(&first, Some(&entry)).unwrap();
        let e = backup(&first, &file).unwrap_err().to_string();
        assert!(e.contains("interrupted"), "{e}");
        journal::write(&first, None).unwrap();
        backup(&first, &file).unwrap();
        let other = agent_with_history(b.path());
        let e = restore(&other, &file, false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        restore(&other, &file, true).unwrap();
        assert_eq!(other.identity().unwrap(), first.identity().unwrap());
    }
}
