//! What the agent checks of an assignment before it downloads anything:
//! the package name is a safe directory name, the package carries a
//! signature this agent accepts (by its own keys, never the relay's), it
//! is not older than the installed version unless the job allows that, and
//! the endpoint meets the package's requirements (os, arch, free disk).

use std::path::Path;

use anyhow::Context as _;
use caravan_api::{names, signing, wire::Assignment};
use ed25519_dalek::VerifyingKey;

/// Refuses an assignment this agent must not install, saying why;
/// `installed` is the version of the package installed now, if any.
pub fn check(
    a: &Assignment,
    installed: Option<&str>,
    trusted: &[VerifyingKey],
    root: &Path,
) -> anyhow::Result<()> {
    names::package_name(&a.package).map_err(anyhow::Error::msg)?;
    check_signature(a, trusted)?;
    check_downgrade(a, installed)?;
    check_requirements(a, root)
}

/// Refuses to install a lower version than the installed one unless the
/// job says so (`allowDowngrade`): an old, vulnerable version cannot come
/// back by replaying an old job.
pub fn check_downgrade(a: &Assignment, installed: Option<&str>) -> anyhow::Result<()> {
    if let Some(have) = installed {
        anyhow::ensure!(
            a.allow_downgrade || caravan_api::version::cmp(&a.version, have).is_ge(),
            "refusing to downgrade package {} from {have} to {}: the job does not allow downgrades (allowDowngrade)",
            a.package,
            a.version
        );
    }
    Ok(())
}

/// Refuses a package that is not signed as this agent's policy (or its
/// cabinet) requires.
pub fn check_signature(a: &Assignment, trusted: &[VerifyingKey]) -> anyhow::Result<()> {
    if trusted.is_empty() {
        anyhow::ensure!(
            !a.require_signature,
            "package {} {} must be signed, but this agent trusts no signing keys (--trusted-key)",
            a.package,
            a.version
        );
        return Ok(());
    }
    signing::verify(trusted, &a.signatures, &a.signed())
        .with_context(|| format!("package {} {} refused", a.package, a.version))?;
    Ok(())
}

/// The package is not for this endpoint (its `os` or `arch`): not a
/// failure, the destination is NotApplicable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotApplicable(pub String);

/// Whether the package is for this endpoint's OS and architecture.
pub fn applicable(a: &Assignment) -> Result<(), NotApplicable> {
    let Some(req) = &a.install.requirements else {
        return Ok(());
    };
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    if !(req.os.is_empty() || req.os.iter().any(|o| o == os)) {
        return Err(NotApplicable(format!(
            "requirement not met: package {} needs os {} (this endpoint runs {os})",
            a.package,
            req.os.join(" or ")
        )));
    }
    if !(req.arch.is_empty() || req.arch.iter().any(|x| x == arch)) {
        return Err(NotApplicable(format!(
            "requirement not met: package {} needs arch {} (this endpoint is {arch})",
            a.package,
            req.arch.join(" or ")
        )));
    }
    Ok(())
}

/// Checks what the package asks of the endpoint, before anything is
/// downloaded: os and arch ([`applicable`]), then free disk (a failure,
/// which may pass later).
pub fn check_requirements(a: &Assignment, root: &Path) -> anyhow::Result<()> {
    applicable(a)?;
    let Some(req) = &a.install.requirements else {
        return Ok(());
    };
    if let Some(min) = req.min_free_disk_bytes {
        std::fs::create_dir_all(root)?;
        let free = free_bytes(root)?;
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

/// Bytes free (for an unprivileged user) on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let st = rustix::fs::statvfs(path)
        .with_context(|| format!("checking free space in {}", path.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// How much a package may unpack to in `root`: at most `max` bytes, and at
/// most nine tenths of the free space, so that no archive (a decompression
/// bomb, say) can fill the endpoint's disk.
pub fn unpack_limits(root: &Path, max: u64) -> anyhow::Result<caravan_archive::Limits> {
    std::fs::create_dir_all(root)?;
    let free = free_bytes(root)?;
    Ok(caravan_archive::Limits {
        max_bytes: max.min(free / 10 * 9),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::v1alpha1::{InstallSpec, Requirements};

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
    fn unsigned_packages_are_refused_when_the_agent_or_the_cabinet_asks_for_signatures() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "job": "ns/j", "action": "install", "package": "app", "version": "1",
            "digest": caravan_api::Digest::of(b"app"), "size": 10, "install": {},
        }))
        .unwrap();
        assert!(check_signature(&a, &[]).is_ok(), "no keys, no requirement");
        a.require_signature = true;
        let e = check_signature(&a, &[]).unwrap_err().to_string();
        assert!(e.contains("trusts no signing keys"), "{e}");
        let trusted = [key.verifying_key()];
        assert!(check_signature(&a, &trusted).is_err(), "unsigned");
        a.signatures = vec![signing::sign(&key, &a.signed())];
        assert!(check_signature(&a, &trusted).is_ok());
        a.version = "2".into();
        assert!(
            check_signature(&a, &trusted).is_err(),
            "a signature of another version"
        );
        a.version = "1".into();
        a.install.health_check = Some("bin/anything".into());
        assert!(
            check_signature(&a, &trusted).is_err(),
            "a signature of another install spec"
        );
        a.package = "../etc".into();
        assert!(check(&a, None, &trusted, Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn a_lower_version_than_installed_needs_the_jobs_leave() {
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "job": "ns/j", "action": "install", "package": "app", "version": "1.9",
            "digest": caravan_api::Digest::of(b"app"), "size": 10, "install": {},
        }))
        .unwrap();
        assert!(check_downgrade(&a, None).is_ok());
        assert!(check_downgrade(&a, Some("1.9")).is_ok(), "a reinstall");
        assert!(check_downgrade(&a, Some("1.2")).is_ok(), "an upgrade");
        let e = check_downgrade(&a, Some("1.10")).unwrap_err().to_string();
        assert!(
            e.contains("refusing to downgrade package app from 1.10 to 1.9"),
            "{e}"
        );
        a.allow_downgrade = true;
        assert!(check_downgrade(&a, Some("1.10")).is_ok());
    }
}
