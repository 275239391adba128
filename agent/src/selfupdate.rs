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

use crate::{archive, state::StateDir, RunArgs};

/// Where an agent package carries the new binary.
pub const BINARY: &str = "caravan-agent";

/// How long the new binary has to prove itself.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The path of the binary this process started from. Taken once, at the
/// start (`run` calls it first): once the binary is replaced, the system
/// would name the old one "(deleted)".
pub fn current_exe() -> anyhow::Result<PathBuf> {
    static EXE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let exe =
            std::env::current_exe().map_err(|e| format!("finding the agent's own binary: {e}"))?;
        Ok(std::fs::canonicalize(&exe).unwrap_or(exe))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Extracts the new binary from the verified package `blob` next to this
/// agent's binary and tries it out. Returns its path, ready to be switched in.
pub async fn prepare(blob: &Path, state: &StateDir, args: &RunArgs) -> anyhow::Result<PathBuf> {
    let exe = current_exe()?;
    let next = exe.with_file_name(format!("{BINARY}.next"));
    let staging = state.downloads().join("agent-update");
    let (b, s, n) = (blob.to_path_buf(), staging.clone(), next.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(&s);
        archive::check(std::io::BufReader::new(std::fs::File::open(&b)?))?;
        archive::extract(std::io::BufReader::new(std::fs::File::open(&b)?), &s)?;
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
        .arg(&args.server)
        .arg("--state-dir")
        .arg(&args.state_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(ca) = &args.ca_file {
        cmd.arg("--ca-file").arg(ca);
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

/// Puts the tried-out binary in place of this one (one atomic rename).
pub fn switch(next: &Path) -> anyhow::Result<()> {
    let exe = current_exe()?;
    std::fs::rename(next, &exe).with_context(|| format!("replacing {}", exe.display()))?;
    if let Some(dir) = exe.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
    client
        .desired(None, 0)
        .await
        .context("reading the desired state")?;
    if let Some(report) = state.last_report()? {
        client.report(&report).await.context("reporting")?;
    }
    println!("self-test passed: agent {} reached {server}", creds.agent);
    Ok(())
}
