use caravan_api::{
    v1alpha1::{InstallMethod, InstallSpec, ScriptSpec},
    Digest,
};

use super::*;

/// An install root, a state directory and archives to install from.
struct Endpoint {
    dir: tempfile::TempDir,
    state: StateDir,
    root: std::path::PathBuf,
}

impl Endpoint {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        Self { dir, state, root }
    }

    fn tx(&self) -> (Transaction<'_>, &Path) {
        let tx = Transaction {
            state: &self.state,
            root: &self.root,
            max_unpacked_bytes: 1 << 30,
            run_as: None,
        };
        (tx, &self.root)
    }

    /// An archive of `VERSION` = `version` and, with `script`, an install.sh.
    fn package(
        &self,
        version: &str,
        script: Option<&str>,
    ) -> (std::path::PathBuf, InstalledRecord) {
        let src = self.dir.path().join(format!("src-{version}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        let mut install = InstallSpec::default();
        if let Some(body) = script {
            std::fs::write(src.join("install.sh"), format!("#!/bin/sh\n{body}\n")).unwrap();
            install.method = InstallMethod::Script;
            install.script = Some(ScriptSpec {
                install: "install.sh".into(),
                uninstall: None,
                timeout_seconds: 10,
                uninstall_on_upgrade: false,
            });
        }
        let blob = self.dir.path().join(format!("{version}.tar.zst"));
        let artifact = caravan_archive::pack(&src, &blob).unwrap();
        let record = InstalledRecord {
            name: "app".into(),
            version: version.into(),
            digest: artifact.digest,
            job: "ns/j".into(),
            install,
            detected: false,
        };
        (blob, record)
    }

    /// An archive of `version` whose scripts append what they do to the
    /// endpoint's `log` (see [`Self::log`]); its install fails if `fails`.
    fn logging(
        &self,
        version: &str,
        uninstall_on_upgrade: bool,
        fails: bool,
    ) -> (std::path::PathBuf, InstalledRecord) {
        let log = self.dir.path().join("log");
        let exit = if fails { "exit 3" } else { "" };
        let (blob, mut record) = self.package(
            version,
            Some(&format!(
                "echo \"install {version}\" >> {}\n{exit}",
                log.display()
            )),
        );
        // Repacked with the uninstall script beside the install script.
        let src = self.dir.path().join(format!("src-{version}"));
        std::fs::write(
            src.join("uninstall.sh"),
            format!(
                "#!/bin/sh\necho \"uninstall {version} to ${{CARAVAN_UPGRADE_TO:-nothing}}\" >> {}\n",
                log.display()
            ),
        )
        .unwrap();
        record.digest = caravan_archive::pack(&src, &blob).unwrap().digest;
        let script = record.install.script.as_mut().unwrap();
        script.uninstall = Some("uninstall.sh".into());
        script.uninstall_on_upgrade = uninstall_on_upgrade;
        (blob, record)
    }

    /// What the scripts of [`Self::logging`] packages did, in order.
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn live_version(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("root/app/VERSION")).ok()
    }
}

#[tokio::test]
async fn an_install_commits_and_the_next_replaces_it_whole() {
    let e = Endpoint::new();
    let (tx, root) = e.tx();
    let mut installed = Installed::new();
    let (v1, r1) = e.package("1", None);
    let (v2, r2) = e.package("2", Some("echo configured"));
    tx.install(&v1, &r1, &mut installed).await.unwrap();
    let done = tx.install(&v2, &r2, &mut installed).await.unwrap();
    assert_eq!(done.output, "configured");
    assert!(done.baseline.files.contains_key("VERSION"));
    assert_eq!(e.live_version().as_deref(), Some("2"));
    assert_eq!(e.state.installed().unwrap()["app"].digest, r2.digest);
    assert!(journal::read(&e.state).unwrap().is_none());
    assert!(is_live(root, "app", &r2.digest));
    assert!(
        !root
            .join(".caravan/versions/app")
            .join(r1.digest.hex())
            .exists(),
        "the old version is gone"
    );
    assert!(Baseline::load(&e.state, &r1.digest).unwrap().is_none());
}

#[tokio::test]
async fn a_failing_install_script_puts_the_previous_version_back() {
    let e = Endpoint::new();
    let (tx, _) = e.tx();
    let mut installed = Installed::new();
    let (v1, r1) = e.package("1", None);
    let (v2, r2) = e.package("2", Some("echo broken >&2; exit 4"));
    tx.install(&v1, &r1, &mut installed).await.unwrap();
    let err = format!(
        "{:#}",
        tx.install(&v2, &r2, &mut installed).await.err().unwrap()
    );
    assert!(
        err.contains("rolled back") && err.contains("broken"),
        "{err}"
    );
    assert_eq!(e.live_version().as_deref(), Some("1"));
    assert_eq!(
        installed["app"].digest, r1.digest,
        "the record still names 1"
    );
    assert!(journal::read(&e.state).unwrap().is_none());
}

#[tokio::test]
async fn an_upgrade_runs_the_old_versions_uninstall_first_when_it_asks_to() {
    // Asked for: 1 goes (told the version coming), then 2 installs.
    let e = Endpoint::new();
    let (tx, _) = e.tx();
    let mut installed = Installed::new();
    let (v1, r1) = e.logging("1", true, false);
    let (v2, r2) = e.logging("2", false, false);
    tx.install(&v1, &r1, &mut installed).await.unwrap();
    tx.install(&v2, &r2, &mut installed).await.unwrap();
    assert_eq!(e.log(), ["install 1", "uninstall 1 to 2", "install 2"]);
    // Not asked for (2 upgrades in place); a removal says nothing comes.
    let (v3, r3) = e.logging("3", false, false);
    tx.install(&v3, &r3, &mut installed).await.unwrap();
    tx.uninstall("app", &mut installed).await.unwrap();
    assert_eq!(e.log()[3..], ["install 3", "uninstall 3 to nothing"]);
}

#[tokio::test]
async fn a_failed_upgrade_after_the_old_versions_uninstall_sets_the_old_version_up_again() {
    let e = Endpoint::new();
    let (tx, _) = e.tx();
    let mut installed = Installed::new();
    let (v1, r1) = e.logging("1", true, false);
    let (v2, r2) = e.logging("2", false, true);
    tx.install(&v1, &r1, &mut installed).await.unwrap();
    let err = format!(
        "{:#}",
        tx.install(&v2, &r2, &mut installed).await.err().unwrap()
    );
    assert!(err.contains("rolled back"), "{err}");
    assert_eq!(
        e.log(),
        ["install 1", "uninstall 1 to 2", "install 2", "install 1"]
    );
    assert_eq!(e.live_version().as_deref(), Some("1"));
    assert_eq!(installed["app"].digest, r1.digest);
    assert!(journal::read(&e.state).unwrap().is_none());
}

#[tokio::test]
async fn a_detected_version_is_installed_over_as_new_and_only_forgotten_on_removal() {
    let e = Endpoint::new();
    let (tx, root) = e.tx();
    let (_, mut r1) = e.logging("1", true, false);
    r1.detected = true;
    let mut installed = Installed::from([("app".to_string(), r1.clone())]);
    // Nothing of 1 is Caravan's: its uninstall does not run, 2 installs fresh.
    let (v2, r2) = e.logging("2", false, false);
    tx.install(&v2, &r2, &mut installed).await.unwrap();
    assert_eq!(e.log(), ["install 2"]);
    assert_eq!(e.live_version().as_deref(), Some("2"));
    // Removed: 2 (Caravan's) goes, its uninstall script run.
    tx.uninstall("app", &mut installed).await.unwrap();
    assert_eq!(e.log(), ["install 2", "uninstall 2 to nothing"]);
    // A detected version removed: forgotten; nothing runs, nothing in the
    // install root (here, software someone else put there) is touched.
    std::fs::create_dir_all(root.join("app")).unwrap();
    std::fs::write(root.join("app/VERSION"), "1").unwrap();
    let mut installed = Installed::from([("app".to_string(), r1)]);
    tx.uninstall("app", &mut installed).await.unwrap();
    assert!(installed.is_empty());
    assert!(e.state.installed().unwrap().is_empty());
    assert_eq!(e.log(), ["install 2", "uninstall 2 to nothing"]);
    assert_eq!(e.live_version().as_deref(), Some("1"));
}

#[tokio::test]
async fn an_uninstall_removes_the_package_and_its_record() {
    let e = Endpoint::new();
    let (tx, root) = e.tx();
    let mut installed = Installed::new();
    let (v1, r1) = e.package("1", None);
    tx.install(&v1, &r1, &mut installed).await.unwrap();
    tx.uninstall("app", &mut installed).await.unwrap();
    assert!(std::fs::symlink_metadata(root.join("app")).is_err());
    assert!(e.state.installed().unwrap().is_empty());
    tx.uninstall("app", &mut installed).await.unwrap();
}

#[test]
fn recovery_rolls_back_unfinished_installs_and_finishes_what_had_run() {
    let to = InstalledRecord {
        name: "app".into(),
        version: "2".into(),
        digest: Digest::of(b"2"),
        job: "ns/j".into(),
        install: Default::default(),
        detected: false,
    };
    assert_eq!(recovery(Step::Staging, Some(&to)), Recovery::RollBack);
    assert_eq!(recovery(Step::Swapped, Some(&to)), Recovery::RollBack);
    assert_eq!(recovery(Step::Configured, Some(&to)), Recovery::Commit(&to));
    assert_eq!(recovery(Step::Unconfiguring, None), Recovery::Nothing);
    assert_eq!(recovery(Step::Removing, None), Recovery::Remove);
}

/// Installs 1, then leaves an install of 2 interrupted at `step` (files as
/// they are at that step), and recovers.
async fn interrupted_at(
    step: Step,
) -> (Endpoint, InstalledRecord, InstalledRecord, Option<String>) {
    let e = Endpoint::new();
    let (tx, root) = e.tx();
    let mut installed = Installed::new();
    let (v1, r1) = e.package("1", None);
    let (v2, r2) = e.package("2", None);
    tx.install(&v1, &r1, &mut installed).await.unwrap();
    // What the crashed install had done by then: 2 staged and swapped in.
    layout::stage_and_swap(
        &v2,
        root,
        "app",
        &r2.digest,
        Some(&r1.digest),
        &Default::default(),
    )
    .unwrap();
    let to = matches!(step, Step::Staging | Step::Swapped | Step::Configured).then(|| r2.clone());
    tx.journal("app", step, to.as_ref()).unwrap();
    let what = recover(&e.state, root).unwrap();
    (e, r1, r2, what)
}

#[tokio::test]
async fn an_install_killed_before_its_script_finished_comes_back_at_the_old_version() {
    for step in [Step::Staging, Step::Swapped] {
        let (e, r1, _, what) = interrupted_at(step).await;
        assert_eq!(e.live_version().as_deref(), Some("1"), "{step:?}");
        assert_eq!(e.state.installed().unwrap()["app"].digest, r1.digest);
        assert!(what.unwrap().contains("rolled back"));
        assert!(journal::read(&e.state).unwrap().is_none());
    }
}

#[tokio::test]
async fn an_install_killed_after_its_script_finished_is_committed() {
    let (e, _, r2, what) = interrupted_at(Step::Configured).await;
    assert_eq!(e.live_version().as_deref(), Some("2"));
    assert_eq!(e.state.installed().unwrap()["app"].digest, r2.digest);
    assert!(what.unwrap().contains("finished"));
}

#[tokio::test]
async fn a_removal_killed_after_its_script_finished_is_finished() {
    let (e, ..) = interrupted_at(Step::Removing).await;
    assert_eq!(e.live_version(), None);
    assert!(e.state.installed().unwrap().is_empty());
}

#[tokio::test]
async fn nothing_to_recover_changes_nothing() {
    let e = Endpoint::new();
    let (_, root) = e.tx();
    assert_eq!(recover(&e.state, root).unwrap(), None);
}
