//! Detection: whether a package's version is on the endpoint already,
//! though Caravan did not install it there (its `install.detect` rules).
//! Every rule must hold: a file (with its digest, if given), a version
//! file whose first line is the version, a command that exits 0.
//!
//! The rules come with the package's signed metadata, and are only looked
//! at once the package passed the endpoint's policy (signatures included).
//! A command runs as package scripts do (their user and environment, no
//! shell, `CARAVAN_ACTION=detect`, `CARAVAN_INSTALL_ROOT`) and is killed
//! after [`TIMEOUT`]; files are read by the agent, only if regular files,
//! and a rule not decided within [`TIMEOUT`] does not hold. Detection
//! trusts the endpoint's files: whoever can write a rule's path can make a
//! version look present.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use caravan_api::{v1alpha1::DetectionRule, Digest};
use sha2::{Digest as _, Sha256};

use crate::transaction::scripts::{self, RunAs};

/// A rule not decided by then does not hold (a command is killed).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The most a version file is read of.
const VERSION_FILE_MAX: u64 = 4096;

/// When every rule holds, what was found (for the report); `None` when one
/// does not, or there are none.
pub async fn present(
    rules: &[DetectionRule],
    package: &str,
    version: &str,
    root: &Path,
    run_as: Option<&RunAs>,
) -> Option<String> {
    if rules.is_empty() {
        return None;
    }
    let mut found = Vec::new();
    for rule in rules {
        match holds(rule, package, version, root, run_as).await {
            Ok(what) => found.push(what),
            Err(e) => {
                tracing::info!(%package, %version, reason = format!("{e:#}"), "not detected");
                return None;
            }
        }
    }
    Some(found.join("; "))
}

/// What the rule found, or why it does not hold.
async fn holds(
    rule: &DetectionRule,
    package: &str,
    version: &str,
    root: &Path,
    run_as: Option<&RunAs>,
) -> anyhow::Result<String> {
    rule.check().map_err(anyhow::Error::msg)?;
    if let Some(path) = &rule.file {
        let path = Path::new(path).to_path_buf();
        let want = rule.digest;
        let shown = path.display().to_string();
        return blocking(move || file(&path, want.as_ref()))
            .await
            .with_context(|| format!("file {shown}"));
    }
    if let Some(path) = &rule.version_file {
        let path = Path::new(path).to_path_buf();
        let v = version.to_string();
        return blocking(move || version_file(&path, &v)).await;
    }
    command(&rule.command, package, version, root, run_as).await
}

/// File work off the async threads, given up after [`TIMEOUT`] (a huge
/// file to hash, a hung network mount).
async fn blocking(
    f: impl FnOnce() -> anyhow::Result<String> + Send + 'static,
) -> anyhow::Result<String> {
    match tokio::time::timeout(TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(done) => done.context("detection task")?,
        Err(_) => anyhow::bail!("not done after {}s", TIMEOUT.as_secs()),
    }
}

/// Opens `path` if it is a regular file (checked on what was opened, and
/// without blocking on a FIFO put in its place).
fn open_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    anyhow::ensure!(f.metadata()?.is_file(), "not a regular file");
    Ok(f)
}

fn file(path: &Path, want: Option<&Digest>) -> anyhow::Result<String> {
    let mut f = open_file(path)?;
    let Some(want) = want else {
        return Ok(format!("file {} exists", path.display()));
    };
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    let got = Digest::from_hasher(hasher);
    anyhow::ensure!(got == *want, "has digest {got}, not {want}");
    Ok(format!("file {} has digest {want}", path.display()))
}

fn version_file(path: &Path, version: &str) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    open_file(path)
        .and_then(|f| Ok(f.take(VERSION_FILE_MAX).read_to_string(&mut text)?))
        .with_context(|| format!("version file {}", path.display()))?;
    let first = text.lines().next().unwrap_or_default().trim();
    anyhow::ensure!(
        first == version,
        "version file {} says {first:?}, not {version:?}",
        path.display()
    );
    Ok(format!("version file {} says {version}", path.display()))
}

async fn command(
    argv: &[String],
    package: &str,
    version: &str,
    root: &Path,
    run_as: Option<&RunAs>,
) -> anyhow::Result<String> {
    let (program, args) = argv.split_first().context("empty command")?;
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut cmd = scripts::command(program.as_ref(), &args, run_as);
    cmd.current_dir("/")
        .env("CARAVAN_PACKAGE_NAME", package)
        .env("CARAVAN_PACKAGE_VERSION", version)
        .env("CARAVAN_INSTALL_ROOT", root)
        .env("CARAVAN_ACTION", "detect")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let shown = argv.join(" ");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting command {shown}"))?;
    match scripts::wait(&mut child, TIMEOUT).await {
        Err(_) => anyhow::bail!("command {shown} timed out after {}s", TIMEOUT.as_secs()),
        Ok(status) => {
            let status = status?;
            anyhow::ensure!(status.success(), "command {shown} ended with {status}");
            Ok(format!("command {shown} exits 0"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(f: impl FnOnce(&mut DetectionRule)) -> DetectionRule {
        let mut r = DetectionRule::default();
        f(&mut r);
        r
    }

    #[tokio::test]
    async fn every_rule_must_hold_for_a_version_to_be_detected() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("hello");
        std::fs::write(&bin, b"hello binary").unwrap();
        let version = dir.path().join("VERSION");
        std::fs::write(&version, "2.1.0\nbuilt by hand\n").unwrap();
        let path = |p: &Path| p.display().to_string();
        let digest = Digest::of(b"hello binary");
        let exists = rule(|r| r.file = Some(path(&bin)));
        let same = rule(|r| {
            r.file = Some(path(&bin));
            r.digest = Some(digest);
        });
        let other = rule(|r| {
            r.file = Some(path(&bin));
            r.digest = Some(Digest::of(b"another build"));
        });
        let says = rule(|r| r.version_file = Some(path(&version)));
        let ok = rule(|r| {
            r.command = vec![
                "/bin/sh".into(),
                "-c".into(),
                "test \"$CARAVAN_PACKAGE_VERSION\" = 2.1.0".into(),
            ]
        });
        let fails = rule(|r| r.command = vec!["/bin/false".into()]);
        let missing = rule(|r| r.file = Some(path(&dir.path().join("nope"))));
        // A FIFO where a version file should be: not read (nor waited on).
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let pipe = rule(|r| r.version_file = Some(path(&fifo)));
        let found = present(
            &[exists, same.clone(), says.clone(), ok.clone()],
            "hello",
            "2.1.0",
            dir.path(),
            None,
        )
        .await
        .expect("detected");
        assert!(found.contains(&format!("has digest {digest}")), "{found}");
        assert!(found.contains("says 2.1.0"), "{found}");
        for (rules, version) in [
            (vec![same.clone(), other], "2.1.0"),
            (vec![same.clone(), says.clone()], "2.2.0"),
            (vec![same.clone(), fails], "2.1.0"),
            (vec![missing], "2.1.0"),
            (vec![pipe], "2.1.0"),
            (vec![ok], "2.2.0"),
            (vec![], "2.1.0"),
        ] {
            assert_eq!(
                present(&rules, "hello", version, dir.path(), None).await,
                None,
                "{rules:?} {version}"
            );
        }
    }
}
