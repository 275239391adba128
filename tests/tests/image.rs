//! Caravan's images without a container engine: `scripts/image.sh` builds
//! the controller's OCI image from the binary, skopeo pushes it to a real
//! registry on loopback (Debian's `docker-registry`, TLS and a password),
//! and the image pulled back by its digest has the entrypoint, the non-root
//! user and a binary that runs (`--version`, in a chroot of the image's
//! root filesystem as that user: every library it needs is inside). The
//! charts, the controller's default relay image and the Dockerfile follow
//! the workspace's version and image names.

use std::{path::Path, process::Command};

use anyhow::Context as _;
use caravan_api::{images, RELEASE};
use caravan_tests::{bin, registry::Registry, repo_root};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_image_is_built_pushed_and_pulled_back_by_digest_and_runs(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(&dir.path().join("registry")).await?;
    let layout = dir.path().join("layout");
    let controller = bin("caravan-controller")?;
    // With the agent of its release beside it (--agent-update auto).
    run(Command::new(repo_root().join("scripts/image.sh"))
        .arg(&controller)
        .arg(&layout)
        .arg(RELEASE)
        .arg(bin("caravan-agent")?))?;

    // Pushed as the chart names it, under the registry's host.
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    std::fs::copy(&registry.ca_file, certs.join("ca.crt"))?;
    let creds = format!("{}:{}", registry.username, registry.password);
    let repository = format!(
        "{}/{}",
        registry.host,
        images::CONTROLLER.split_once('/').unwrap().1
    );
    let certs = certs.display().to_string();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-cert-dir",
        &certs,
        "--dest-creds",
        &creds,
        &format!("oci:{}:{RELEASE}", layout.display()),
        &format!("docker://{repository}:{RELEASE}"),
    ]))?;
    let inspect: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--cert-dir",
        &certs,
        "--creds",
        &creds,
        &format!("docker://{repository}:{RELEASE}"),
    ]))?)?;
    let digest = inspect["Digest"].as_str().context("a digest")?;
    assert!(digest.starts_with("sha256:"), "{inspect}");

    // Pulled back by digest, never by tag.
    let pulled = dir.path().join("pulled");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-cert-dir",
        &certs,
        "--src-creds",
        &creds,
        &format!("docker://{repository}@{digest}"),
        &format!("oci:{}:pulled", pulled.display()),
    ]))?;
    let config: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{}:pulled", pulled.display()),
    ]))?)?;
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/caravan-controller"]),
        "{config}"
    );
    assert_eq!(c["User"], "65532:65532", "{config}");
    assert_eq!(
        c["Labels"]["org.opencontainers.image.version"], RELEASE,
        "{config}"
    );
    assert_eq!(
        (config["os"].as_str(), config["architecture"].as_str()),
        (Some("linux"), Some("amd64"))
    );

    // The image's root filesystem runs the binary as the image's user.
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:pulled", pulled.display()))
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    let version = run(Command::new("/usr/sbin/chroot")
        .arg("--userspec=65532:65532")
        .arg(&rootfs)
        .args(["/usr/local/bin/caravan-controller", "--version"])
        .env_clear())?;
    assert_eq!(version.trim(), format!("caravan-controller {RELEASE}"));
    let agent = run(Command::new("/usr/sbin/chroot")
        .arg("--userspec=65532:65532")
        .arg(&rootfs)
        .args(["/usr/local/bin/caravan-agent", "--version"])
        .env_clear())?;
    assert_eq!(agent.trim(), format!("caravan-agent {RELEASE}"));
    let shells = ["bin/sh", "usr/bin/sh", "bin/bash"];
    assert!(
        shells.iter().all(|s| !rootfs.join(s).exists()),
        "no shell in the image"
    );
    Ok(())
}

/// The value of `key: value` in a YAML or Dockerfile line.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim().trim_matches('"'))
}

#[test]
fn charts_images_and_the_dockerfile_follow_the_workspace_version() -> anyhow::Result<()> {
    let root = repo_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p));
    for chart in ["charts/caravan", "charts/caravan-relay"] {
        let meta = read(&format!("{chart}/Chart.yaml"))?;
        assert_eq!(field(&meta, "version:"), Some(RELEASE), "{chart}");
        assert_eq!(field(&meta, "appVersion:"), Some(RELEASE), "{chart}");
    }
    let values = read("charts/caravan/values.yaml")?;
    let repos: Vec<&str> = values
        .lines()
        .filter_map(|l| l.trim().strip_prefix("repository:"))
        .map(str::trim)
        .collect();
    assert_eq!(
        repos,
        [images::CONTROLLER, images::RELAY],
        "charts/caravan/values.yaml"
    );
    let relay_values = read("charts/caravan-relay/values.yaml")?;
    assert_eq!(field(&relay_values, "repository:"), Some(images::RELAY));
    assert!(
        !values.contains(&format!(":{RELEASE}")) && !relay_values.contains(&format!(":{RELEASE}")),
        "image tags default to the chart's appVersion, not a copy of it"
    );
    let cargo = read("Cargo.toml")?;
    let dockerfile = read("Dockerfile")?;
    assert_eq!(
        field(&dockerfile, "ARG RUST_VERSION="),
        field(&cargo, "rust-version ="),
        "the Dockerfile builds with the workspace's Rust"
    );
    for image in [images::CONTROLLER, images::RELAY] {
        assert!(
            dockerfile.contains(&format!("{image}:{RELEASE}")),
            "{image}"
        );
    }
    assert!(Path::new(&root.join("scripts/image.sh")).exists());
    Ok(())
}
