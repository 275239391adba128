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
        };
        (blob, record)
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
