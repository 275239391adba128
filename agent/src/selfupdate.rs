//! Self-update: a package with `method: agent` carries a new `caravan-agent`
//! binary. The running agent tries it out first (`caravan-agent self-test`:
//! the new binary must start, reach the relay with this agent's credentials
//! and deliver a report); only then does it put the new binary in place of
//! its own (one atomic rename) and restart into it (exec, same process, so
//! a service manager sees no exit). A new binary that does not come up and
//! report is thrown away and the old one carries on, the reason reported.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use serde::{Deserialize, Serialize};

use caravan_api::Digest;

use crate::{
    config::Config,
    state::{InstalledRecord, StateDir},
};

use caravan_api::v1alpha1::AGENT_BINARY as BINARY;

/// How long the new binary has to prove itself.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(60);

static EXE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();

/// Fixes, at the start, which file is the agent's binary: `explicit` (when
/// a wrapper starts the agent), else the executable this process started
/// from, taken before an update replaces it and the system would call it
/// "(deleted)".
pub fn pin_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    EXE.get_or_init(|| match explicit {
        Some(path) => Ok(path),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("finding the agent's own binary: {e}"))?;
            Ok(std::fs::canonicalize(&exe).unwrap_or(exe))
        }
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The agent's binary (see [`pin_binary`]).
pub fn current_exe() -> anyhow::Result<PathBuf> {
    pin_binary(None)
}

/// Extracts the new binary from the verified package `blob` next to this
/// agent's binary and tries it out. Returns its path, ready to be switched in.
pub async fn prepare(blob: &Path, state: &StateDir, config: &Config) -> anyhow::Result<PathBuf> {
    let exe = current_exe()?;
    let next = exe.with_file_name(format!("{BINARY}.next"));
    let staging = state.downloads().join("agent-update");
    let (b, s, n) = (blob.to_path_buf(), staging.clone(), next.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(&s);
        // An agent package holds a binary, not a filesystem.
        let limits = caravan_archive::Limits {
            max_bytes: 1 << 30,
            max_entries: 1000,
        };
        caravan_archive::check(std::io::BufReader::new(std::fs::File::open(&b)?), &limits)?;
        caravan_archive::extract(
            std::io::BufReader::new(std::fs::File::open(&b)?),
            &s,
            &limits,
        )?;
        let new = s.join(BINARY);
        anyhow::ensure!(
            std::fs::symlink_metadata(&new).is_ok_and(|m| m.is_file()),
            "the package has no {BINARY} binary at its root"
        );
        std::fs::copy(&new, &n).with_context(|| format!("copying to {}", n.display()))?;
        std::fs::set_permissions(&n, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::File::open(&n)?.sync_all()?;
        let _ = std::fs::remove_dir_all(&s);
        Ok(())
    })
    .await
    .context("update task")??;

    let mut cmd = tokio::process::Command::new(&next);
    cmd.arg("self-test")
        .arg("--server")
        .arg(&config.server)
        .arg("--state-dir")
        .arg(&config.state_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(ca) = &config.ca_file {
        cmd.arg("--ca-file").arg(ca);
    }
    if config.insecure {
        cmd.arg("--insecure");
    }
    let out = tokio::time::timeout(SELF_TEST_TIMEOUT, cmd.output()).await;
    let failure = match out {
        Ok(Ok(out)) if out.status.success() => None,
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Some(format!("{}: {tail}", out.status))
        }
        Ok(Err(e)) => Some(format!("it did not start: {e}")),
        Err(_) => Some(format!("no answer within {SELF_TEST_TIMEOUT:?}")),
    };
    if let Some(why) = failure {
        let _ = std::fs::remove_file(&next);
        anyhow::bail!("the new agent binary failed its self-test, the old one carries on ({why})");
    }
    Ok(next)
}

/// An update on probation: the new binary is in place but has not yet
/// delivered a report. Until it does, the previous binary is kept as
/// `<binary>.previous`, and `caravan-agent.previous rollback-update` (the
/// systemd unit's `OnFailure=`) puts it back.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct Probation {
    binary: PathBuf,
    previous_binary: PathBuf,
    package: String,
    digest: Digest,
    /// The record of the agent package before the update.
    previous_record: Option<InstalledRecord>,
}

/// A new agent that did not come up after its update: not tried again.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Refused {
    digest: Digest,
    reason: String,
}

/// State files of self-updates: the update on probation, the one refused.
const PROBATION: &str = "self-update.json";
const REFUSED: &str = "self-update-refused.json";

/// Whether an update awaits the new binary's first report.
pub fn on_probation(state: &StateDir) -> anyhow::Result<bool> {
    Ok(state.json::<Probation>(PROBATION)?.is_some())
}

/// Why version `digest` of the agent is not tried again, if it was refused.
pub fn refusal(state: &StateDir, digest: &Digest) -> anyhow::Result<Option<String>> {
    Ok(state
        .json::<Refused>(REFUSED)?
        .filter(|r| r.digest == *digest)
        .map(|r| r.reason))
}

/// Puts the tried-out binary in place of this one (one atomic rename),
/// keeping the old one as `<binary>.previous` until the new one reports.
pub fn switch(
    next: &Path,
    state: &StateDir,
    package: &str,
    digest: &Digest,
    previous_record: Option<InstalledRecord>,
) -> anyhow::Result<()> {
    let exe = current_exe()?;
    let probation = Probation {
        previous_binary: exe.with_file_name(format!("{BINARY}.previous")),
        binary: exe.clone(),
        package: package.into(),
        digest: *digest,
        previous_record,
    };
    let _ = std::fs::remove_file(&probation.previous_binary);
    std::fs::hard_link(&exe, &probation.previous_binary)
        .with_context(|| format!("keeping {}", probation.previous_binary.display()))?;
    state.set_json(PROBATION, Some(&probation))?;
    std::fs::rename(next, &exe).with_context(|| format!("replacing {}", exe.display()))?;
    if let Some(dir) = exe.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The new binary has delivered a report: the update is confirmed.
pub fn confirm(state: &StateDir) -> anyhow::Result<()> {
    if let Some(p) = state.json::<Probation>(PROBATION)? {
        let _ = std::fs::remove_file(&p.previous_binary);
        state.set_json::<Probation>(PROBATION, None)?;
        tracing::info!(digest = %p.digest, "self-update confirmed");
    }
    Ok(())
}

/// `caravan-agent rollback-update`: back to the binary before an update
/// that has not reported, which is not tried again.
pub fn roll_back(state: &StateDir) -> anyhow::Result<String> {
    let _lock = state.lock()?;
    let Some(p) = state.json::<Probation>(PROBATION)? else {
        return Ok("no self-update on probation: nothing to roll back".into());
    };
    std::fs::rename(&p.previous_binary, &p.binary)
        .with_context(|| format!("putting {} back", p.previous_binary.display()))?;
    let mut installed = state.installed()?;
    match &p.previous_record {
        Some(r) => installed.insert(r.name.clone(), r.clone()),
        None => installed.remove(&p.package),
    };
    state.set_installed(&installed)?;
    state.set_json(
        REFUSED,
        Some(&Refused {
            digest: p.digest,
            reason: "the new agent did not come up and report after the update; back to the previous binary".into(),
        }),
    )?;
    state.set_json::<Probation>(PROBATION, None)?;
    Ok(format!(
        "rolled back to the agent binary before {}",
        p.digest
    ))
}

/// Restarts this process into its (new) binary with the same arguments.
pub fn restart() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let exe = match current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    tracing::info!(binary = %exe.display(), "restarting into the new agent");
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::Error::new(err).context(format!("restarting into {}", exe.display()))
}

/// `caravan-agent self-test`: with the state directory's credentials, reach
/// the relay, read the desired state and deliver the last report again.
pub async fn self_test(
    server: &str,
    state_dir: &Path,
    ca_file: Option<&Path>,
) -> anyhow::Result<()> {
    let state = StateDir::open(state_dir)?;
    let creds = state
        .credentials()?
        .context("no credentials in the state directory")?;
    let mut client = crate::client::Client::new(server, ca_file)?;
    client.set_token(Some(creds.token));
    if let Err(crate::client::ClientError::Unauthorized(_)) = client.desired(None, 0).await {
        // The credential ran out: renewing it is part of what must work.
        crate::enroll::renew(&state, &mut client).await?;
    }
    client
        .desired(None, 0)
        .await
        .context("reading the desired state")?;
    if let Some(report) = state.last_report()? {
        let signed = state.sign_report(report)?;
        client.report(&signed).await.context("reporting")?;
    }
    println!("self-test passed: agent {} reached {server}", creds.agent);
    Ok(())
}
