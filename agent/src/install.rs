//! Putting a package in place and taking it away: requirements, extraction
//! next to the live version and a swap by renames, install and uninstall
//! scripts with a timeout, and rollback to the previous version when an
//! install script fails.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use caravan_api::{
    v1alpha1::{InstallMethod, InstallSpec},
    wire::Assignment,
};
use tokio::io::AsyncReadExt;

use crate::archive;

/// How much of a script's output is kept for the report.
const OUTPUT_TAIL: usize = 2048;

/// Work directory of the agent inside the install root (same filesystem, so renames are atomic).
fn work_dir(root: &Path) -> PathBuf {
    root.join(".caravan")
}

/// Checks what the package asks of the endpoint, before anything is downloaded.
pub fn check_requirements(a: &Assignment, root: &Path) -> anyhow::Result<()> {
    let Some(req) = &a.install.requirements else {
        return Ok(());
    };
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    anyhow::ensure!(
        req.os.is_empty() || req.os.iter().any(|o| o == os),
        "requirement not met: package {} needs os {} (this endpoint runs {os})",
        a.package,
        req.os.join(" or ")
    );
    anyhow::ensure!(
        req.arch.is_empty() || req.arch.iter().any(|x| x == arch),
        "requirement not met: package {} needs arch {} (this endpoint is {arch})",
        a.package,
        req.arch.join(" or ")
    );
    if let Some(min) = req.min_free_disk_bytes {
        std::fs::create_dir_all(root)?;
        let st = rustix::fs::statvfs(root)
            .with_context(|| format!("checking free space in {}", root.display()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let needed = min.saturating_add(a.size);
        anyhow::ensure!(
            free >= needed,
            "requirement not met: package {} needs {needed} bytes free in {} (the package and {min} more), {free} are",
            a.package,
            root.display()
        );
    }
    Ok(())
}

/// Where a package's versions live. Each version is extracted whole into
/// `.caravan/versions/<package>/<digest>`; `<root>/<package>` is a symlink
/// to one of them, switched from the old to the new one by a single rename,
/// so the package is always wholly at one version. The previous version is
/// kept until the new one is committed, for rolling back.
struct Slots {
    live: PathBuf,
    versions: PathBuf,
    staging: PathBuf,
    /// The new symlink, before it is renamed over `live`.
    link: PathBuf,
    failed: PathBuf,
}

fn slots(root: &Path, package: &str) -> Slots {
    let work = work_dir(root);
    Slots {
        live: root.join(package),
        versions: work.join("versions").join(package),
        staging: work.join("staging").join(package),
        link: work.join("links").join(package),
        failed: work.join("failed").join(package),
    }
}

/// The directory name of a version: its digest's hex.
fn version_id(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes `dir`'s entries (renames into or out of it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().expect("a slot has a parent"))
}

/// Points `live` at version `id` in one atomic step. A real directory in
/// its place (a package put there by hand) is moved into the versions as
/// `id_before` first.
fn switch_to(s: &Slots, id: &str, id_before: &str) -> std::io::Result<()> {
    if std::fs::symlink_metadata(&s.live).is_ok_and(|m| m.is_dir()) {
        std::fs::rename(&s.live, s.versions.join(id_before))?;
    }
    create_parent(&s.link)?;
    remove_file_if_exists(&s.link)?;
    let package = s.live.file_name().expect("a package has a name");
    let target = Path::new(".caravan/versions").join(package).join(id);
    std::os::unix::fs::symlink(target, &s.link)?;
    std::fs::rename(&s.link, &s.live)?;
    sync_dir(s.live.parent().expect("the install root"))
}

/// The version `live` points at, if any.
fn live_id(s: &Slots) -> Option<String> {
    let target = std::fs::read_link(&s.live).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Takes `path` (a symlink or a directory) away at once, then deletes it.
fn discard(path: &Path, aside: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => std::fs::remove_file(path),
        Ok(_) => {
            remove_dir_if_exists(aside)?;
            create_parent(aside)?;
            std::fs::rename(path, aside)?;
            remove_dir_if_exists(aside)
        }
    }
}

/// Deletes every version of `package` but `keep`.
fn drop_versions_but(s: &Slots, keep: Option<&str>) -> std::io::Result<()> {
    let Ok(dir) = std::fs::read_dir(&s.versions) else {
        return Ok(());
    };
    for entry in dir {
        let entry = entry?;
        if Some(entry.file_name().to_string_lossy().as_ref()) != keep {
            remove_dir_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// Puts the previous version of `package` back in place (digest
/// `previous`; nothing at all if there was none), from wherever an install
/// stopped, and deletes the new one.
pub fn roll_back(root: &Path, package: &str, previous: Option<&str>) -> anyhow::Result<()> {
    let s = slots(root, package);
    remove_dir_if_exists(&s.staging)?;
    match previous.map(version_id) {
        Some(id) if s.versions.join(id).exists() => {
            if live_id(&s).as_deref() != Some(id) {
                switch_to(&s, id, id)?;
            }
            drop_versions_but(&s, Some(id))?;
        }
        // Not installed before (or installed by hand, and still in place).
        _ if std::fs::symlink_metadata(&s.live).is_ok_and(|m| m.is_dir()) => {
            drop_versions_but(&s, None)?;
        }
        _ => {
            discard(&s.live, &s.failed)?;
            drop_versions_but(&s, None)?;
        }
    }
    Ok(())
}

/// Whether version `digest` of `package` is in place (a cheap check: the
/// symlink and the directory it points at).
pub fn is_live(root: &Path, package: &str, digest: &str) -> bool {
    let s = slots(root, package);
    live_id(&s).as_deref() == Some(version_id(digest)) && s.live.is_dir()
}

/// Keeps the new version of `package` (digest `current`): the others go.
pub fn drop_old(root: &Path, package: &str, current: &str) -> anyhow::Result<()> {
    drop_versions_but(&slots(root, package), Some(version_id(current)))?;
    Ok(())
}

/// Extracts the archive of version `digest` (the previous one is
/// `previous`) into a directory of its own, then makes it live in one
/// atomic step, keeping the previous version for [`roll_back`] until
/// [`drop_old`]. A crash anywhere in here is undone by [`roll_back`].
pub fn stage_and_swap(
    blob: &Path,
    root: &Path,
    package: &str,
    digest: &str,
    previous: Option<&str>,
) -> anyhow::Result<()> {
    let s = slots(root, package);
    let id = version_id(digest);
    remove_dir_if_exists(&s.staging)?;
    create_parent(&s.staging)?;
    std::fs::create_dir_all(&s.versions)?;
    // A first pass reads the whole archive and writes nothing: a hostile or
    // damaged one is refused before anything reaches the disk.
    archive::check(std::io::BufReader::new(std::fs::File::open(blob)?))?;
    let file = std::fs::File::open(blob)?;
    if let Err(e) = archive::extract(std::io::BufReader::new(file), &s.staging) {
        let _ = std::fs::remove_dir_all(&s.staging);
        return Err(e.into());
    }
    // The new files reach the disk before the switch can make them live.
    rustix::fs::syncfs(std::fs::File::open(root)?)?;
    let target = s.versions.join(id);
    if live_id(&s).as_deref() == Some(id) && target.is_dir() {
        // Installed again over itself (a repair): the fresh copy and the
        // live one trade places in one atomic step.
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        if renameat_with(CWD, &s.staging, CWD, &target, RenameFlags::EXCHANGE).is_err() {
            // A filesystem without exchange: briefly absent instead.
            discard(&target, &s.failed)?;
            std::fs::rename(&s.staging, &target)?;
        }
        remove_dir_if_exists(&s.staging)?;
        sync_dir(&s.versions)?;
        return Ok(());
    }
    remove_dir_if_exists(&target)?;
    std::fs::rename(&s.staging, &target)?;
    sync_dir(&s.versions)?;
    crate::failpoint::hit("extracted");
    let before = previous.map(version_id).unwrap_or("unrecorded");
    switch_to(&s, id, before)?;
    Ok(())
}

/// Removes a package: its symlink (or directory) at once, then its versions.
pub fn remove_package(root: &Path, package: &str) -> anyhow::Result<()> {
    let s = slots(root, package);
    discard(&s.live, &s.failed)?;
    if root.exists() {
        sync_dir(root)?;
    }
    remove_dir_if_exists(&s.versions)?;
    Ok(())
}

/// The script a `script` package runs for `action`, if it has one.
pub fn script_for<'a>(install: &'a InstallSpec, action: &str) -> Option<&'a str> {
    if action == "health" {
        return install.health_check.as_deref();
    }
    if install.method != InstallMethod::Script {
        return None;
    }
    let script = install.script.as_ref()?;
    match action {
        "install" => Some(script.install.as_str()),
        _ => script.uninstall.as_deref(),
    }
}

/// Runs `script` (a path inside the package directory `dir`) for `action`,
/// killed after the package's timeout. Returns the tail of its output; an
/// error says how it ended and carries the tail too.
pub async fn run_script(
    dir: &Path,
    root: &Path,
    script: &str,
    action: &str,
    name: &str,
    version: &str,
    install: &InstallSpec,
) -> anyhow::Result<String> {
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
    let mut cmd = if is_executable(&path) {
        tokio::process::Command::new(&path)
    } else {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg(&path);
        c
    };
    cmd.current_dir(dir)
        .env("CARAVAN_PACKAGE_NAME", name)
        .env("CARAVAN_PACKAGE_VERSION", version)
        .env("CARAVAN_PACKAGE_DIR", dir)
        .env("CARAVAN_INSTALL_ROOT", root)
        .env("CARAVAN_ACTION", action)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
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
    let ended = tokio::time::timeout(timeout, child.wait()).await;
    if ended.is_err() {
        let _ = child.kill().await;
    }
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
    use caravan_api::v1alpha1::{Requirements, ScriptSpec};

    fn spec(timeout_seconds: u32) -> InstallSpec {
        InstallSpec {
            method: InstallMethod::Script,
            script: Some(ScriptSpec {
                install: "install.sh".into(),
                uninstall: None,
                timeout_seconds,
            }),
            requirements: None,
            health_check: None,
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
            "install",
            "app",
            "1.2",
            &spec(10),
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
            "install",
            "app",
            "1",
            &spec(10),
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
            "install",
            "app",
            "1",
            &spec(1),
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
            "install",
            "app",
            "1",
            &spec(1),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("relative path inside the package"),
            "{e}"
        );
    }

    #[test]
    fn requirements_are_checked_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "job": "ns/j", "action": "install", "package": "app", "version": "1",
            "digest": format!("sha256:{}", "a".repeat(64)), "size": 10, "install": {},
        }))
        .unwrap();
        assert!(check_requirements(&a, dir.path()).is_ok());
        let req = |r: Requirements| InstallSpec {
            requirements: Some(r),
            ..Default::default()
        };
        a.install = req(Requirements {
            os: vec!["plan9".into()],
            ..Default::default()
        });
        let e = check_requirements(&a, dir.path()).unwrap_err().to_string();
        assert!(e.contains("needs os plan9"), "{e}");
        a.install = req(Requirements {
            arch: vec![std::env::consts::ARCH.into()],
            os: vec![std::env::consts::OS.into()],
            ..Default::default()
        });
        assert!(check_requirements(&a, dir.path()).is_ok());
        a.install = req(Requirements {
            min_free_disk_bytes: Some(u64::MAX / 2),
            ..Default::default()
        });
        let e = check_requirements(&a, dir.path()).unwrap_err().to_string();
        assert!(e.contains("bytes free"), "{e}");
    }

    #[test]
    fn a_rolled_back_install_restores_the_previous_version() {
        let root = tempfile::tempdir().unwrap();
        let pack = |content: &str| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, "VERSION", content.as_bytes())
                .unwrap();
            let path = root.path().join(format!("{content}.tar.zst"));
            std::fs::write(
                &path,
                zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap(),
            )
            .unwrap();
            path
        };
        let (v1, v2) = (pack("1"), pack("2"));
        let (d1, d2) = ("sha256:11", "sha256:22");
        let r = root.path();
        let live = r.join("app");
        let version = || std::fs::read_to_string(live.join("VERSION")).unwrap();
        stage_and_swap(&v1, r, "app", d1, None).unwrap();
        drop_old(r, "app", d1).unwrap();
        stage_and_swap(&v2, r, "app", d2, Some(d1)).unwrap();
        assert_eq!(version(), "2");
        roll_back(r, "app", Some(d1)).unwrap();
        assert_eq!(version(), "1");
        assert!(
            !r.join(".caravan/versions/app/22").exists(),
            "the failed version is gone"
        );
        // A first install rolled back leaves nothing.
        remove_package(r, "app").unwrap();
        stage_and_swap(&v2, r, "app", d2, None).unwrap();
        roll_back(r, "app", None).unwrap();
        assert!(std::fs::symlink_metadata(&live).is_err());
        // A package put there by hand is taken over, and given back on rollback.
        std::fs::create_dir_all(&live).unwrap();
        std::fs::write(live.join("VERSION"), "by hand").unwrap();
        stage_and_swap(&v2, r, "app", d2, None).unwrap();
        assert_eq!(version(), "2");
        roll_back(r, "app", Some("unrecorded")).unwrap();
        assert_eq!(version(), "by hand");
    }
}
