//! Crash safety: the agent is killed (SIGKILL) at every step of installs,
//! upgrades and removals. Each time the install root holds the package
//! wholly at its old version or wholly at its new one (never a mix), the
//! next start finishes the change, and no script that had finished runs
//! again.

use std::{os::unix::process::ExitStatusExt, path::Path, time::Duration};

use caravan_tests::{git::GitRepo, wait_for, Caravan, RelayInfo};

const AGENT: &str = "kiosk";

/// The files of version `v` of the test package: every version has its own
/// file set and contents, so a mix of two is visible.
fn files(v: u32) -> Vec<(String, Vec<u8>)> {
    vec![
        ("version.txt".into(), format!("{v}.0.0\n").into_bytes()),
        (format!("only-in-{v}.txt"), format!("v{v}\n").into_bytes()),
        (
            "data.bin".into(),
            caravan_tests::noise(3_000_000, u64::from(v)),
        ),
    ]
}

const INSTALL: &str = "#!/bin/sh\necho \"install $CARAVAN_PACKAGE_VERSION\" >> \"$CARAVAN_INSTALL_ROOT/scripts.log\"\n";
const UNINSTALL: &str = "#!/bin/sh\necho \"uninstall $CARAVAN_PACKAGE_VERSION\" >> \"$CARAVAN_INSTALL_ROOT/scripts.log\"\n";

/// The version wholly in place, `None` if the package is absent; fails on a mix.
fn installed_version(root: &Path) -> anyhow::Result<Option<u32>> {
    let dir = root.join("app");
    if !dir.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(dir.join("version.txt"))?;
    let v: u32 = text.trim().trim_end_matches(".0.0").parse()?;
    let mut want: Vec<(String, Vec<u8>)> = files(v);
    want.push(("install.sh".into(), INSTALL.into()));
    want.push(("uninstall.sh".into(), UNINSTALL.into()));
    want.sort();
    let mut got = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        got.push((
            entry.file_name().to_string_lossy().into_owned(),
            std::fs::read(entry.path())?,
        ));
    }
    got.sort();
    anyhow::ensure!(
        got == want,
        "install root holds a mix: {:?} is not version {v}",
        got.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    Ok(Some(v))
}

/// How often the scripts ran `what` (e.g. `install 3.0.0`).
fn script_runs(root: &Path, what: &str) -> usize {
    std::fs::read_to_string(root.join("scripts.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == what)
        .count()
}

struct Fleet {
    c: Caravan,
    repo: GitRepo,
    relay: RelayInfo,
}

impl Fleet {
    fn push(&self, v: u32) -> anyhow::Result<()> {
        let src = self.c.dir.join(format!("src/app-{v}"));
        std::fs::create_dir_all(&src)?;
        for (name, body) in files(v) {
            std::fs::write(src.join(name), body)?;
        }
        std::fs::write(src.join("install.sh"), INSTALL)?;
        std::fs::write(src.join("uninstall.sh"), UNINSTALL)?;
        let manifests = self.repo.work.join("fleet/packages").display().to_string();
        self.c.cli(&[
            "package",
            "push",
            &src.display().to_string(),
            "--name",
            "app",
            "--version",
            &format!("{v}.0.0"),
            "--manifest-dir",
            &manifests,
            "--install",
            "script",
            "--uninstall-script",
            "uninstall.sh",
        ])?;
        Ok(())
    }

    /// Points the job at the highest version, installing or uninstalling.
    fn job(&self, action: &str) -> anyhow::Result<()> {
        self.repo.write(
            "fleet/app-job.yaml",
            &format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: app}}\nspec:\n  action: {action}\n  packages: [{{name: app}}]\n  destinations: {{sites: [{{name: hq}}]}}\n"),
        )?;
        self.repo.commit(&format!("app: {action}"))?;
        Ok(())
    }

    /// Waits until the relay hands the agent an assignment of `action` for version `v`.
    async fn wait_desired(&self, action: &str, v: u32) -> anyhow::Result<()> {
        let (state, _) = self.c.agent_dirs(AGENT);
        let creds: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state.join("credentials.json"))?)?;
        let token = creds["token"].as_str().unwrap_or_default().to_string();
        let url = format!("{}/v1/desired", self.relay.url);
        wait_for(
            &format!("the relay to ask for {action} of app {v}.0.0"),
            Duration::from_secs(120),
            || async {
                let body = caravan_tests::http()
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .bytes()
                    .await?;
                let d = caravan_tests::fixtures::desired_of(&body)?;
                Ok(d.assignments
                    .iter()
                    .any(|a| {
                        a.package == "app"
                            && a.version == format!("{v}.0.0")
                            && serde_json::to_value(a.action).ok()
                                == Some(serde_json::Value::from(action))
                    })
                    .then_some(()))
            },
        )
        .await
    }

    /// Runs the agent once, to be killed at `failpoint`.
    fn crash_at(&self, failpoint: &str) -> anyhow::Result<()> {
        let status = self.c.run_agent_once(
            AGENT,
            &self.relay,
            &[("CARAVAN_AGENT_FAILPOINT", failpoint)],
        )?;
        anyhow::ensure!(
            status.signal() == Some(9),
            "the agent was to be killed at {failpoint}, but ended with {status}"
        );
        Ok(())
    }

    fn converge(&self) -> anyhow::Result<()> {
        let status = self.c.run_agent_once(AGENT, &self.relay, &[])?;
        anyhow::ensure!(status.success(), "the agent failed: {status}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_at_any_step_leaves_the_old_or_the_new_version_and_finishes_on_restart(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    let f = Fleet { c, repo, relay };
    let (state, root) = f.c.agent_dirs(AGENT);

    // Version 1, installed without trouble (the first run enrolls).
    f.push(1)?;
    f.job("install")?;
    f.converge()?;
    f.wait_desired("install", 1).await?;
    f.converge()?;
    assert_eq!(installed_version(&root)?, Some(1));

    // Upgrades, killed at each step in turn.
    let mut v = 1;
    for (failpoint, left) in [
        ("downloading", "old"),
        ("extracted", "old"),
        ("swapped", "new"),
        ("configured", "new"),
        ("old-dropped", "new"),
    ] {
        v += 1;
        f.push(v)?;
        f.repo.commit(&format!("app {v}.0.0"))?;
        f.wait_desired("install", v).await?;
        f.crash_at(failpoint)?;
        // The old or the new version is there, whole.
        let found = installed_version(&root)?;
        let expected = if left == "old" { v - 1 } else { v };
        assert_eq!(found, Some(expected), "killed at {failpoint}");
        if failpoint == "swapped" {
            let status = std::process::Command::new(caravan_tests::bin("caravan-agent")?)
                .args(["status", "--state-dir", &state.display().to_string()])
                .output()?;
            let text = String::from_utf8(status.stdout)?;
            assert!(
                text.contains("interrupted: package app at step Swapped"),
                "status shows the interrupted change:\n{text}"
            );
        }
        if failpoint == "downloading" {
            let partial = std::fs::read_dir(state.join("downloads"))?.count();
            assert_eq!(partial, 1, "half the download is kept to resume");
        }
        f.converge()?;
        assert_eq!(
            installed_version(&root)?,
            Some(v),
            "after a crash at {failpoint}"
        );
        assert_eq!(
            script_runs(&root, &format!("install {v}.0.0")),
            1,
            "killed at {failpoint}: the install script ran once"
        );
        assert!(
            std::fs::read_dir(root.join(".caravan/versions/app"))?.count() == 1
                && !state.join("journal.json").exists(),
            "killed at {failpoint}: nothing left over"
        );
    }

    // Removals, killed at each step in turn (reinstalled in between).
    for failpoint in ["unconfiguring", "removing", "removed"] {
        f.job("uninstall")?;
        f.wait_desired("uninstall", v).await?;
        let before = script_runs(&root, &format!("uninstall {v}.0.0"));
        f.crash_at(failpoint)?;
        let found = installed_version(&root)?;
        assert!(
            found == Some(v) || found.is_none(),
            "killed at {failpoint}: {found:?}"
        );
        f.converge()?;
        assert_eq!(
            installed_version(&root)?,
            None,
            "after a crash at {failpoint}"
        );
        assert_eq!(
            script_runs(&root, &format!("uninstall {v}.0.0")),
            before + 1,
            "killed at {failpoint}: the uninstall script ran once"
        );
        f.job("install")?;
        f.wait_desired("install", v).await?;
        f.converge()?;
        assert_eq!(installed_version(&root)?, Some(v));
    }
    Ok(())
}
