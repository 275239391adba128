//! `caravan-agent backup` and `restore`: the endpoint's identity (host ID
//! and secret), its credentials and the record of what it installed (with
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
    for (digest, b) in &backup.manifests {
        b.save(state, digest)?;
    }
    Ok(())
}
