//! The attack suite: each test mounts one attack for real against running
//! processes and checks that it fails, that nothing is installed or lost,
//! and that the failure is reported where an operator looks. THREAT_MODEL.md
//! names the test for each threat.

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use caravan_api::{conditions, v1alpha1::GitSource};
use caravan_tests::{wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

/// Pushes the directory `dir` as package `name` 1.0.0 (extra CLI arguments
/// after it) and commits a job installing it at site hq.
async fn ship(
    c: &Caravan,
    repo: &caravan_tests::git::GitRepo,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<()> {
    let manifests = repo.work.join("fleet/packages").display().to_string();
    let dir = dir.display().to_string();
    let mut args = vec![
        "package",
        "push",
        &dir,
        "--name",
        name,
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests,
    ];
    args.extend_from_slice(extra);
    c.cli(&args)?;
    let job = format!(
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: {name}}}\nspec:\n  packages: [{{name: {name}}}]\n  destinations: {{sites: [{{name: hq}}]}}\n"
    );
    repo.write(&format!("fleet/{name}-job.yaml"), &job)?;
    repo.commit(&format!("Ship {name}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_of_links_out_of_the_package_is_refused_and_nothing_is_installed(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    // Each link looks harmless alone; together `p2` is the install root's parent.
    let dir = c.dir.join("src/chain");
    std::fs::create_dir_all(dir.join("a/b"))?;
    std::os::unix::fs::symlink("../..", dir.join("a/b/up"))?;
    std::os::unix::fs::symlink("a/b/up/..", dir.join("p1"))?;
    std::os::unix::fs::symlink("p1/..", dir.join("p2"))?;
    ship(&c, &repo, &dir, "chain", &[]).await?;
    let reason = c.wait_failed("chain").await?;
    assert!(
        reason.contains("link points outside the target directory"),
        "{reason}"
    );
    let root = &c.agents[0].install_root;
    assert!(
        std::fs::symlink_metadata(root.join("chain")).is_err(),
        "nothing installed"
    );
    assert!(root.join("hello/VERSION").exists(), "nothing lost");
    let versions = root.join(".caravan/versions/chain");
    assert!(!versions.exists() || std::fs::read_dir(&versions)?.next().is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setuid_or_world_writable_file_is_installed_without_those_bits() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    let dir = c.dir.join("src/suid");
    std::fs::create_dir_all(&dir)?;
    for (file, mode) in [("rootshell", 0o4755), ("shared.conf", 0o666)] {
        std::fs::write(dir.join(file), "x")?;
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(mode))?;
    }
    ship(&c, &repo, &dir, "suid", &[]).await?;
    c.wait_job("suid", "Succeeded", "1/1", T).await?;
    let root = &c.agents[0].install_root;
    let mode = |f: &str| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(root.join("suid").join(f))?
            .permissions()
            .mode()
            & 0o7777)
    };
    assert_eq!(mode("rootshell")?, 0o755);
    assert_eq!(mode("shared.conf")?, 0o664);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_install_script_cannot_read_the_agents_bootstrap_token() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, relay) = c.hello_installed("desk").await?;
    let dir = c.dir.join("src/snoop");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("install.sh"),
        "#!/bin/sh\nenv > \"$CARAVAN_INSTALL_ROOT/stolen-env\"\n",
    )?;
    ship(&c, &repo, &dir, "snoop", &["--install", "script"]).await?;
    c.wait_job("snoop", "Succeeded", "1/1", T).await?;
    let stolen = std::fs::read_to_string(c.agents[0].install_root.join("stolen-env"))?;
    assert!(!relay.bootstrap_token.is_empty());
    assert!(!stolen.contains(&relay.bootstrap_token), "{stolen}");
    assert!(!stolen.contains("CARAVAN_BOOTSTRAP_TOKEN"), "{stolen}");
    assert!(stolen.contains("CARAVAN_PACKAGE_NAME=snoop"), "{stolen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_yaml_alias_bomb_is_refused_and_the_controller_keeps_serving() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    let sources = c.api::<GitSource>();
    let good = sources
        .get("fleet")
        .await?
        .status
        .unwrap()
        .last_applied_revision;
    // 10^9 nodes once expanded; a few kilobytes as written.
    let layer =
        |name: &str, item: &str| format!("{name}: &{name} [{}]\n", vec![item; 1000].join(", "));
    let bomb = layer("a0", "x") + &layer("a1", "*a0") + &layer("a2", "*a1");
    repo.write("fleet/bomb.yaml", &bomb)?;
    let bad = repo.commit("Laugh a billion times")?;
    let status = wait_for("the GitSource to refuse the bomb", T, || async {
        let st = sources.get("fleet").await?.status.unwrap_or_default();
        Ok((st.last_attempted_revision.as_deref() == Some(bad.as_str())).then_some(st))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .unwrap();
    assert_eq!(ready.reason, "InvalidManifest");
    assert!(
        ready.message.contains("fleet/bomb.yaml") && ready.message.contains("nodes"),
        "{}",
        ready.message
    );
    assert_eq!(
        status.last_applied_revision, good,
        "the last good revision stays"
    );
    assert!(c.controller.running(), "the controller is still up");
    // And it still serves: the bomb's removal is applied.
    repo.remove("fleet/bomb.yaml")?;
    let fixed = repo.commit("No more laughing")?;
    wait_for("the next revision to apply", T, || async {
        let st = sources.get("fleet").await?.status.unwrap_or_default();
        Ok((st.last_applied_revision.as_deref() == Some(fixed.as_str())).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gitsource_cannot_read_the_controllers_own_files() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (_repo, _relay) = c.hello_installed("desk").await?;
    // The controller's own checkout of the fleet repository.
    let theirs = c.dir.join("controller/git/fleet/fleet");
    assert!(theirs.exists());
    c.add_git_source("thief", &format!("file://{}", theirs.display()), "fleet", 2)
        .await?;
    let sources = c.api::<GitSource>();
    let ready = wait_for("the GitSource to be refused", T, || async {
        let st = sources.get("thief").await?.status.unwrap_or_default();
        Ok(st
            .conditions
            .into_iter()
            .find(|c| c.type_ == conditions::READY))
    })
    .await?;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "URLNotAllowed")
    );
    assert!(
        ready.message.contains("--allow-local-git-under"),
        "{}",
        ready.message
    );
    let st = sources.get("thief").await?.status.unwrap_or_default();
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::STALLED && c.status == "True"));
    assert_eq!(st.last_attempted_revision, None, "nothing fetched");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_cannot_borrow_the_controllers_privileges() -> anyhow::Result<()> {
    use caravan_api::v1alpha1::Site;
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
    use kube::api::{Patch, PatchParams};
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    // A Secret a user made under the name a relay's Secret would have.
    for (name, value) in [("lagos-relay", "mine")] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }, "stringData": { "password": value },
        }))?;
        c.api::<Secret>()
            .patch(name, &PatchParams::apply("someone"), &Patch::Apply(&secret))
            .await?;
    }
    let site = |name: &str, spec: &str| {
        format!("apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {{name: {name}}}\nspec:\n{spec}")
    };
    repo.write(
        "fleet/miner.yaml",
        &site("miner", "  relay: {image: evil.example.com/miner:latest}\n"),
    )?;
    repo.write(
        "fleet/lagos.yaml",
        &site("lagos", "  relay: {replicas: 1}\n"),
    )?;
    // A user's Secret handed to a relay as its registry credentials.
    repo.write(
        "fleet/borrower.yaml",
        &site(
            "borrower",
            "  relay: {replicas: 1, registryAuthSecret: lagos-relay}\n",
        ),
    )?;
    repo.commit("Three sites asking for more than a relay")?;
    for (name, reason, words) in [
        ("miner", "ImageNotAllowed", "evil.example.com/miner"),
        ("lagos", "ObjectNotOwned", "Secret lagos-relay exists"),
        (
            "borrower",
            "WorkloadRefused",
            "Secret lagos-relay is not labelled caravan.dev/registry-credentials",
        ),
    ] {
        let stalled = wait_for(&format!("site {name} to stall"), T, || async {
            let s = c.api::<Site>().get_opt(name).await?;
            Ok(s.and_then(|s| s.status).and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == conditions::STALLED && c.status == "True")
            }))
        })
        .await
        .map_err(|e| e.context(c.logs()))?;
        assert_eq!(stalled.reason, reason, "{name}: {}", stalled.message);
        assert!(
            stalled.message.contains(words),
            "{name}: {}",
            stalled.message
        );
        let deployment = c
            .api::<Deployment>()
            .get_opt(&format!("{name}-relay"))
            .await?;
        assert!(deployment.is_none(), "no relay is made for {name}");
    }
    let mine = c.api::<Secret>().get("lagos-relay").await?;
    assert!(
        mine.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "the user's Secret is not taken over"
    );
    assert!(!mine.data.unwrap_or_default().contains_key("token"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_version_cannot_come_back_with_other_content() -> anyhow::Result<()> {
    use caravan_api::v1alpha1::Package;
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    let installed = c.agents[0].install_root.join("hello/bin/hello");
    let original = std::fs::read(&installed)?;

    // hello 1.0.0 leaves Git, and so the cluster (the job naming it holds
    // what is installed)...
    repo.remove("fleet/packages/hello-1.0.0.yaml")?;
    repo.commit("Withdraw hello 1.0.0")?;
    wait_for("Package hello-1.0.0 to go", T, || async {
        Ok(c.api::<Package>()
            .get_opt("hello-1.0.0")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    // ...and comes back under the same version with other content.
    let evil = c.dir.join("evil");
    std::fs::create_dir_all(evil.join("bin"))?;
    std::fs::write(evil.join("bin/hello"), "#!/bin/sh\necho pwned\n")?;
    c.push_package(&evil, "hello", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.commit("hello 1.0.0, again")?;

    let ready = wait_for("the sync to refuse the revision", T, || async {
        let gs = c.api::<GitSource>().get("fleet").await?;
        Ok(gs
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| {
                c.type_ == conditions::READY
                    && c.status == "False"
                    && c.message.contains("deleted since")
            }))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    assert!(
        ready.message.contains("hello-1.0.0.yaml"),
        "names the file: {}",
        ready.message
    );
    assert!(c.api::<Package>().get_opt("hello-1.0.0").await?.is_none());
    assert_eq!(
        std::fs::read(&installed)?,
        original,
        "the endpoint keeps the real 1.0.0"
    );
    Ok(())
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM"))?;
    Ok(kib / 1024.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_flood_while_the_controller_is_away_fills_the_relays_queue_and_no_more(
) -> anyhow::Result<()> {
    const QUEUE: usize = 200;
    let mut c = Caravan::start("fleet").await?;
    c.relay_args = vec!["--report-queue".into(), QUEUE.to_string()];
    let (_repo, relay) = c.hello_installed("desk").await?;
    let (agent, token) = c.agents[0].credentials()?;
    // With the controller away, reports cannot go up: they queue at the relay.
    c.controller.kill();
    let body = serde_json::to_vec(&caravan_tests::report_as(&agent))?;
    let url = format!("{}{}", relay.url, caravan_api::wire::paths::REPORT);
    let (mut accepted, mut busy) = (0usize, None);
    let limit = QUEUE * 50;
    while busy.is_none() && accepted < limit {
        let batch = (0..32).map(|_| {
            caravan_tests::http()
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        });
        for res in futures::future::join_all(batch).await {
            let res = res?;
            match res.status().as_u16() {
                202 => accepted += 1,
                503 => busy = Some(res.text().await?),
                other => anyhow::bail!("unexpected {other}: {}", res.text().await?),
            }
        }
    }
    let busy = busy.ok_or_else(|| anyhow::anyhow!("{accepted} reports taken, none refused"))?;
    assert!(busy.contains("report again later"), "{busy}");
    assert!(
        accepted >= QUEUE,
        "{accepted} taken before the queue was full"
    );
    // The relay holds its ground: bounded memory, still serving the agent.
    let peak = peak_mib(c.relays[0].pid())?;
    assert!(peak < 256.0, "relay peak {peak:.0} MiB");
    let desired = caravan_tests::http()
        .get(format!(
            "{}{}",
            relay.url,
            caravan_api::wire::paths::DESIRED
        ))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(desired.status().as_u16(), 200);
    // Once the controller is back, the queue drains (the made-up reports are
    // refused there) and the relay takes reports again.
    c.restart_controller().await?;
    wait_for("the relay to take reports again", T, || async {
        let res = caravan_tests::http()
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        Ok((res.status().as_u16() == 202).then_some(()))
    })
    .await?;
    c.wait_warning(&agent, "ReportNotSigned", "signed by 0")
        .await?;
    Ok(())
}
