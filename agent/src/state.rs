//! The agent's state directory: host identity, credentials, the record of
//! installed packages, the last report (for `caravan-agent status`),
//! download progress and partial downloads. Other modules keep their own
//! files here through [`StateDir::json`] and [`StateDir::set_json`] (the
//! install journal, drift baselines, self-update state). Every file is
//! replaced atomically (write, fsync, rename) and readable by its owner only.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use caravan_api::{
    wire::{AgentReport, InstalledPackage},
    Digest,
};
use caravan_net::fs::{write_private, Existing};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone)]
pub struct Credentials {
    pub server: String,
    pub agent: String,
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// File of the agent's private key (hex of the 32-byte ed25519 seed).
const AGENT_KEY: &str = "agent-key";

/// What the agent installed for one package.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstalledRecord {
    pub name: String,
    pub version: String,
    pub digest: Digest,
    pub job: String,
    /// How it was installed (its uninstall script, if any).
    #[serde(default)]
    pub install: caravan_api::v1alpha1::InstallSpec,
    /// Found present by the package's detection rules: Caravan put no
    /// files in the install root for it, and removing it only forgets it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detected: bool,
}

impl From<&InstalledRecord> for InstalledPackage {
    fn from(r: &InstalledRecord) -> Self {
        Self {
            name: r.name.clone(),
            version: r.version.clone(),
            digest: r.digest,
            detected: r.detected,
        }
    }
}

/// The installed packages, by name.
pub type Installed = BTreeMap<String, InstalledRecord>;

/// How far the download in progress has got (for `caravan-agent status`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub package: String,
    pub version: String,
    pub digest: Digest,
    pub received: u64,
    pub total: u64,
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed) the state directory.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("downloads"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn downloads(&self) -> PathBuf {
        self.dir.join("downloads")
    }

    /// Where the archive of version `digest` is downloaded to (and resumed from).
    pub fn download(&self, digest: &Digest) -> PathBuf {
        self.downloads().join(format!("{}.part", digest.hex()))
    }

    /// Deletes the partial downloads (`<hex>.part`) of versions not in
    /// `needed`; anything else in the directory is left alone.
    pub fn prune_downloads(&self, needed: &std::collections::HashSet<Digest>) {
        let Ok(entries) = std::fs::read_dir(self.downloads()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".part")) else {
                continue;
            };
            let keep = needed.iter().any(|d| d.hex() == hex);
            if !keep {
                tracing::info!(file = %entry.path().display(), "deleting a download no job needs");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The host's stable identity, created on first start.
    pub fn host_id(&self) -> anyhow::Result<String> {
        self.random_once("host-id", 16)
    }

    /// The secret that proves this host's identity when it enrolls again.
    pub fn host_secret(&self) -> anyhow::Result<String> {
        self.random_once("host-secret", 32)
    }

    /// The key pair the agent enrolls with and renews its credential by
    /// (made on first use; the private half never leaves this directory).
    pub fn agent_key(&self) -> anyhow::Result<ed25519_dalek::SigningKey> {
        let text = self.random_once(AGENT_KEY, 32)?;
        let bytes: [u8; 32] = hex::decode(&text)
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| {
                format!(
                    "{} is not a key; restore it from a backup or remove it",
                    self.dir.join(AGENT_KEY).display()
                )
            })?;
        Ok(ed25519_dalek::SigningKey::from_bytes(&bytes))
    }

    /// The agent key as stored, if there is one (for a backup).
    pub fn agent_key_text(&self) -> anyhow::Result<Option<String>> {
        match std::fs::read_to_string(self.dir.join(AGENT_KEY)) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("reading the agent key"),
        }
    }

    /// Puts back the agent key (restoring a backup).
    pub fn set_agent_key(&self, text: &str) -> anyhow::Result<()> {
        write_atomic(&self.dir.join(AGENT_KEY), text.as_bytes())
    }

    /// The host ID and secret, if the agent has created them.
    pub fn identity(&self) -> anyhow::Result<Option<(String, String)>> {
        if !self.dir.join("host-id").exists() {
            return Ok(None);
        }
        Ok(Some((self.host_id()?, self.host_secret()?)))
    }

    /// Sets the host ID, before the agent enrolls (`--host-id-from`).
    pub fn set_host_id(&self, id: &str) -> anyhow::Result<()> {
        write_atomic(&self.dir.join("host-id"), id.as_bytes())
    }

    /// Sets the host ID and secret (restoring a backup).
    pub fn set_identity(&self, id: &str, secret: &str) -> anyhow::Result<()> {
        write_atomic(&self.dir.join("host-id"), id.as_bytes())?;
        write_atomic(&self.dir.join("host-secret"), secret.as_bytes())
    }

    /// Takes the state directory for this process alone: the running agent
    /// holds it, so backup and restore cannot change it under the agent.
    pub fn lock(&self) -> anyhow::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                anyhow::anyhow!(
                    "the agent is running on {}; stop it first (systemctl stop caravan-agent)",
                    self.dir.display()
                )
            },
        )?;
        Ok(file)
    }

    /// Reads `name`, creating it with `bytes` random bytes (hex) if missing.
    fn random_once(&self, name: &str, bytes: usize) -> anyhow::Result<String> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            Ok(_) => anyhow::bail!(
                "{} is empty; restore it from a backup or remove it",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let v = hex::encode((0..bytes).map(|_| rand::random::<u8>()).collect::<Vec<_>>());
                write_atomic(&path, v.as_bytes())?;
                Ok(v)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn credentials(&self) -> anyhow::Result<Option<Credentials>> {
        self.read_json("credentials.json")
    }

    pub fn set_credentials(&self, c: Option<&Credentials>) -> anyhow::Result<()> {
        match c {
            Some(c) => self.write_json("credentials.json", c),
            None => remove_synced(&self.dir.join("credentials.json")),
        }
    }

    pub fn installed(&self) -> anyhow::Result<Installed> {
        Ok(self.read_json("installed.json")?.unwrap_or_default())
    }

    pub fn set_installed(&self, installed: &Installed) -> anyhow::Result<()> {
        self.write_json("installed.json", installed)
    }

    /// The download in progress, if any.
    pub fn progress(&self) -> Option<Progress> {
        self.read_json("progress.json").ok().flatten()
    }

    /// Records download progress: atomically, but not synced (it is only shown).
    pub fn set_progress(&self, p: Option<&Progress>) {
        let path = self.dir.join("progress.json");
        let _ = match p {
            Some(p) => {
                let tmp = path.with_extension("tmp");
                serde_json::to_vec(p)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| std::fs::write(&tmp, bytes))
                    .and_then(|()| std::fs::rename(&tmp, &path))
            }
            None => std::fs::remove_file(&path),
        };
    }

    pub fn last_report(&self) -> anyhow::Result<Option<AgentReport>> {
        self.read_json("last-report.json")
    }

    /// Signs `report` with the agent key, as the enrolled agent, under a
    /// sequence above every report signed before (the time in milliseconds,
    /// or one more than the last), and keeps it as the last report.
    pub fn sign_report(
        &self,
        mut report: AgentReport,
    ) -> anyhow::Result<caravan_api::trust::Envelope> {
        let creds = self
            .credentials()?
            .context("not enrolled: no agent name to report as")?;
        let last = self.last_report().ok().flatten().map_or(0, |r| r.sequence);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        report.agent = creds.agent;
        report.sequence = now.max(last + 1);
        self.write_json("last-report.json", &report)?;
        Ok(caravan_api::trust::sign_report(&report, &self.agent_key()?))
    }

    /// A JSON file of the state directory (`name` may be in a
    /// subdirectory), if it exists.
    pub fn json<T: DeserializeOwned>(&self, name: &str) -> anyhow::Result<Option<T>> {
        self.read_json(name)
    }

    /// Writes (durably) or removes a JSON file of the state directory.
    pub fn set_json<T: Serialize>(&self, name: &str, value: Option<&T>) -> anyhow::Result<()> {
        match value {
            Some(v) => self.write_json(name, v),
            None => remove_synced(&self.dir.join(name)),
        }
    }

    fn read_json<T: DeserializeOwned>(&self, name: &str) -> anyhow::Result<Option<T>> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(&path, &serde_json::to_vec_pretty(value)?)
    }
}

/// Removes `path` (if it exists) durably.
fn remove_synced(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => caravan_net::fs::sync_parent(path)
            .with_context(|| format!("syncing the directory of {}", path.display())),
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new file,
/// never a mix. State files hold credentials: only the owner may read them.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_private(path, bytes, Existing::Replace)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateDir::open(dir.path()).unwrap().host_id().unwrap();
        let b = StateDir::open(dir.path()).unwrap().host_id().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }
}
