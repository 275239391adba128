//! The scripts a package runs on the endpoint: its install and uninstall
//! scripts (method `script`) and its health check (any method). A script is
//! a relative path inside the package, run from the package directory; its
//! exit code decides, and the tail of its output is kept for the report.
//!
//! A script gets exactly the environment [`ENVIRONMENT`] and the `CARAVAN_*`
//! variables name, nothing of the agent's own (no bootstrap token, no
//! proxy settings, no credentials). It runs in a process group of its own,
//! and the package's timeout kills the whole group, whatever it started.
//! With `--script-user` it runs as that user ([`RunAs`]: its uid, its
//! primary group and no supplementary group, with `HOME` and `USER` set),
//! not as the agent.

use std::{
    collections::VecDeque,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use caravan_api::v1alpha1::{InstallMethod, InstallSpec};
use tokio::io::AsyncReadExt;

/// How much of a script's output is kept for the report.
const OUTPUT_TAIL: usize = 2048;

/// The environment every script gets, besides `CARAVAN_PACKAGE_NAME`,
/// `CARAVAN_PACKAGE_VERSION`, `CARAVAN_PACKAGE_DIR`, `CARAVAN_INSTALL_ROOT`
/// and `CARAVAN_ACTION`.
pub const ENVIRONMENT: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
];

/// Why a script runs (its `CARAVAN_ACTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Install,
    Uninstall,
    /// The health check, once the new version is in place.
    Health,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Uninstall => "uninstall",
            Self::Health => "health",
        }
    }
}

/// The user scripts run as, instead of the agent's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: std::path::PathBuf,
}

impl RunAs {
    /// The system user `name`.
    pub fn user(name: &str) -> anyhow::Result<Self> {
        use uzers::os::unix::UserExt as _;
        let user = uzers::get_user_by_name(name)
            .with_context(|| format!("script user {name:?} does not exist on this endpoint"))?;
        Ok(Self {
            name: name.to_string(),
            uid: user.uid(),
            gid: user.primary_group_id(),
            home: user.home_dir().to_path_buf(),
        })
    }
}

/// The package a script acts on, and whom it runs as (`None`: the agent).
pub struct Target<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub install: &'a InstallSpec,
    pub run_as: Option<&'a RunAs>,
    /// For the uninstall script of a version being replaced: the version
    /// replacing it (`CARAVAN_UPGRADE_TO`).
    pub upgrade_to: Option<&'a str>,
}

/// The script a `script` package runs for `action`, if it has one.
pub fn script_for(install: &InstallSpec, action: Action) -> Option<&str> {
    if action == Action::Health {
        return install.health_check.as_deref();
    }
    if install.method != InstallMethod::Script {
        return None;
    }
    let script = install.script.as_ref()?;
    match action {
        Action::Install => Some(script.install.as_str()),
        _ => script.uninstall.as_deref(),
    }
}

/// Runs `package`'s script for `action` from its directory `dir`, if it has
/// one. Returns the tail of its output (empty when there is no script).
pub async fn run_for(
    package: &Target<'_>,
    action: Action,
    dir: &Path,
    root: &Path,
) -> anyhow::Result<String> {
    match script_for(package.install, action) {
        Some(script) => run_script(dir, root, script, action, package).await,
        None => Ok(String::new()),
    }
}

/// Runs `script` (a path inside the package directory `dir`) for `action`,
/// killed after the package's timeout. Returns the tail of its output; an
/// error says how it ended and carries the tail too.
pub async fn run_script(
    dir: &Path,
    root: &Path,
    script: &str,
    action: Action,
    package: &Target<'_>,
) -> anyhow::Result<String> {
    let Target {
        name,
        version,
        install,
        run_as,
        upgrade_to,
    } = *package;
    let action = action.as_str();
    let rel = Path::new(script);
    anyhow::ensure!(
        rel.components()
            .all(|c| matches!(c, std::path::Component::Normal(_))),
        "{action} script {script:?} must be a relative path inside the package"
    );
    let path = dir.join(rel);
    anyhow::ensure!(
        path.is_file(),
        "{action} script {script} is not in the package"
    );
    let timeout = Duration::from_secs(
        install
            .script
            .as_ref()
            .map_or(600, |s| s.timeout_seconds)
            .into(),
    );
    let mut cmd = match is_executable(&path) {
        true => command(path.as_os_str(), &[], run_as),
        false => command("/bin/sh".as_ref(), &[path.as_os_str()], run_as),
    };
    cmd.current_dir(dir)
        .env("CARAVAN_PACKAGE_NAME", name)
        .env("CARAVAN_PACKAGE_VERSION", version)
        .env("CARAVAN_PACKAGE_DIR", dir)
        .env("CARAVAN_INSTALL_ROOT", root)
        .env("CARAVAN_ACTION", action)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(to) = upgrade_to {
        cmd.env("CARAVAN_UPGRADE_TO", to);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {action} script {script}"))?;
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_TAIL)));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(collect(out, tail.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(collect(err, tail.clone())));
    }
    let ended = wait(&mut child, timeout).await;
    for r in readers {
        // A grandchild may hold the pipes open; do not wait for it.
        let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
    }
    let output = {
        let t = tail.lock().expect("lock poisoned");
        String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>())
            .trim()
            .to_string()
    };
    match ended {
        Err(_) => anyhow::bail!(
            "{action} script {script} timed out after {}s; output: {output}",
            timeout.as_secs()
        ),
        Ok(status) => {
            let status = status?;
            anyhow::ensure!(
                status.success(),
                "{action} script {script} failed ({status}); output: {output}"
            );
            Ok(output)
        }
    }
}

/// `program` with `args`, as the scripts' user (`None`: the agent's), with
/// only the scripts' environment, no input, in a process group of its own.
pub fn command(
    program: &std::ffi::OsStr,
    args: &[&std::ffi::OsStr],
    run_as: Option<&RunAs>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(ENVIRONMENT)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(user) = run_as {
        // Primary group, then user; the standard library also drops every
        // supplementary group when root changes user.
        cmd.gid(user.gid)
            .uid(user.uid)
            .env("HOME", &user.home)
            .env("USER", &user.name);
    }
    cmd
}

/// Waits for `child` at most `timeout`, then kills it and everything it
/// started (its process group). `Err` when it timed out.
pub async fn wait(
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<std::io::Result<std::process::ExitStatus>, tokio::time::error::Elapsed> {
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let ended = tokio::time::timeout(timeout, child.wait()).await;
    if ended.is_err() {
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = child.kill().await;
    }
    ended
}

/// Reads a pipe to its end, keeping the last `OUTPUT_TAIL` bytes.
async fn collect(mut pipe: impl tokio::io::AsyncRead + Unpin, tail: Arc<Mutex<VecDeque<u8>>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        let mut t = tail.lock().expect("lock poisoned");
        t.extend(&buf[..n]);
        let excess = t.len().saturating_sub(OUTPUT_TAIL);
        t.drain(..excess);
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use caravan_api::v1alpha1::ScriptSpec;

    fn spec(timeout_seconds: u32) -> InstallSpec {
        InstallSpec {
            method: InstallMethod::Script,
            script: Some(ScriptSpec {
                install: "install.sh".into(),
                uninstall: None,
                timeout_seconds,
                uninstall_on_upgrade: false,
            }),
            ..Default::default()
        }
    }

    fn script(dir: &Path, body: &str) {
        std::fs::write(dir.join("install.sh"), format!("#!/bin/sh\n{body}\n")).unwrap();
    }

    #[tokio::test]
    async fn a_script_sees_its_package_and_its_output_tail_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "echo \"$CARAVAN_ACTION $CARAVAN_PACKAGE_NAME $CARAVAN_PACKAGE_VERSION\"; touch \"$CARAVAN_PACKAGE_DIR/done\"");
        let out = run_script(
            dir.path(),
            dir.path(),
            "install.sh",
            Action::Install,
            &Target {
                name: "app",
                version: "1.2",
                install: &spec(10),
                run_as: None,
                upgrade_to: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(out, "install app 1.2");
        assert!(dir.path().join("done").exists());
    }

    #[tokio::test]
    async fn a_failing_or_hanging_script_fails_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            &format!("{}\necho disk full >&2; exit 3", "echo noise; ".repeat(500)),
        );
        let e = run_script(
            dir.path(),
            dir.path(),
            "install.sh",
            Action::Install,
            &Target {
                name: "app",
                version: "1",
                install: &spec(10),
                run_as: None,
                upgrade_to: None,
            },
        )
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("exit status: 3") && msg.ends_with("disk full"),
            "{msg}"
        );
        assert!(msg.len() < OUTPUT_TAIL + 200, "only the tail is kept");

        script(dir.path(), "echo started; sleep 30");
        let start = std::time::Instant::now();
        let e = run_script(
            dir.path(),
            dir.path(),
            "install.sh",
            Action::Install,
            &Target {
                name: "app",
                version: "1",
                install: &spec(1),
                run_as: None,
                upgrade_to: None,
            },
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("timed out after 1s; output: started"),
            "{e}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "killed, not waited for"
        );

        let e = run_script(
            dir.path(),
            dir.path(),
            "../evil.sh",
            Action::Install,
            &Target {
                name: "app",
                version: "1",
                install: &spec(1),
                run_as: None,
                upgrade_to: None,
            },
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("relative path inside the package"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_script_sees_none_of_the_agents_environment() {
        // What the agent may hold in its environment.
        std::env::set_var("CARAVAN_BOOTSTRAP_TOKEN", "s3cret-bootstrap");
        std::env::set_var("HTTPS_PROXY", "http://user:pw@proxy");
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "env | sort");
        let target = Target {
            name: "app",
            version: "1",
            install: &spec(10),
            run_as: None,
            upgrade_to: None,
        };
        let out = run_script(
            dir.path(),
            dir.path(),
            "install.sh",
            Action::Install,
            &target,
        )
        .await
        .unwrap();
        assert!(!out.contains("s3cret") && !out.contains("proxy"), "{out}");
        let names: Vec<&str> = out.lines().filter_map(|l| l.split('=').next()).collect();
        for name in names {
            let documented = ENVIRONMENT.iter().any(|(n, _)| *n == name)
                || name.starts_with("CARAVAN_")
                || ["PWD", "SHLVL", "_"].contains(&name);
            assert!(documented, "{name} in a script's environment:\n{out}");
        }
        assert!(out.contains("CARAVAN_ACTION=install"), "{out}");
    }

    #[tokio::test]
    async fn the_timeout_kills_what_the_script_started_too() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "(sleep 2; touch \"$CARAVAN_PACKAGE_DIR/late\") &\nsleep 30",
        );
        let target = Target {
            name: "app",
            version: "1",
            install: &spec(1),
            run_as: None,
            upgrade_to: None,
        };
        let e = run_script(
            dir.path(),
            dir.path(),
            "install.sh",
            Action::Install,
            &target,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !dir.path().join("late").exists(),
            "the background job outlived the timeout"
        );
    }

    #[tokio::test]
    async fn a_script_runs_as_the_configured_user_and_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        // Readable and runnable by anyone, as a package directory would be.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        script(
            dir.path(),
            "echo \"$(id -u) $(id -g) $(id -G) $USER $HOME\"",
        );
        std::fs::set_permissions(
            dir.path().join("install.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let nobody = RunAs::user("nobody").unwrap();
        let target = Target {
            name: "app",
            version: "1",
            install: &spec(10),
            run_as: Some(&nobody),
            upgrade_to: None,
        };
        let ran = run_script(
            dir.path(),
            dir.path(),
            "install.sh",
            Action::Install,
            &target,
        )
        .await;
        if rustix::process::geteuid().is_root() {
            let expected = format!(
                "{0} {1} {1} nobody {2}",
                nobody.uid,
                nobody.gid,
                nobody.home.display()
            );
            assert_eq!(ran.unwrap(), expected, "its uid, its group alone");
        } else {
            // Only root can run a script as another user: it says so.
            let e = ran.unwrap_err();
            assert!(
                format!("{e:#}").contains("starting install script"),
                "{e:#}"
            );
        }
        let e = RunAs::user("no-such-user-here").unwrap_err();
        assert!(
            e.to_string()
                .contains("\"no-such-user-here\" does not exist"),
            "{e}"
        );
    }
}
