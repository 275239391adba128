//! Script packages and requirements: an install script that runs with its
//! package's environment and whose output is reported, one that fails and is
//! rolled back with its output as the reason, a package whose requirements
//! the endpoint does not meet, and an uninstall script when a job goes away.

use std::time::Duration;

use caravan_tests::{wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn install_scripts_decide_success_and_requirements_are_checked_first() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let manifests = repo.work.join("fleet/packages").display().to_string();
    let make = |name: &str, files: &[(&str, &str)]| -> anyhow::Result<String> {
        let dir = c.dir.join("src").join(name);
        std::fs::create_dir_all(&dir)?;
        for (file, body) in files {
            std::fs::write(dir.join(file), body)?;
        }
        Ok(dir.display().to_string())
    };
    let svc = make("svc", &[
        ("install.sh", "#!/bin/sh\necho \"installing $CARAVAN_PACKAGE_NAME $CARAVAN_PACKAGE_VERSION\"\ntouch \"$CARAVAN_INSTALL_ROOT/svc.enabled\"\n"),
        ("uninstall.sh", "#!/bin/sh\nrm \"$CARAVAN_INSTALL_ROOT/svc.enabled\"\n"),
    ])?;
    c.cli(&[
        "package",
        "push",
        &svc,
        "--name",
        "svc",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests,
        "--install",
        "script",
        "--uninstall-script",
        "uninstall.sh",
        "--script-timeout",
        "30",
    ])?;
    let broken = make(
        "broken",
        &[(
            "install.sh",
            "#!/bin/sh\necho 'port 8080 already in use' >&2\nexit 4\n",
        )],
    )?;
    c.cli(&[
        "package",
        "push",
        &broken,
        "--name",
        "broken",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests,
        "--install",
        "script",
    ])?;
    let exotic = make("exotic", &[("README", "for another OS")])?;
    c.cli(&[
        "package",
        "push",
        &exotic,
        "--name",
        "exotic",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests,
        "--os",
        "plan9",
    ])?;
    // A script package without its script is refused at build time.
    let err = c
        .cli(&[
            "package",
            "build",
            &exotic,
            "--name",
            "x",
            "--version",
            "1",
            "--install",
            "script",
            "--manifest-dir",
            &manifests,
        ])
        .unwrap_err();
    assert!(
        err.to_string().contains("install.sh is not a file"),
        "{err}"
    );
    for app in ["svc", "broken", "exotic"] {
        repo.write(
            &format!("fleet/{app}-job.yaml"),
            &format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: {app}}}\nspec:\n  packages: [{{name: {app}}}]\n  destinations: {{sites: [{{name: hq}}]}}\n"),
        )?;
    }
    repo.commit("Three script-era packages")?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;
    let root = c.agents[0].install_root.clone();

    c.wait_job("svc", "Succeeded", "1/1", T).await?;
    assert!(root.join("svc.enabled").exists(), "the install script ran");
    let agent = c
        .api::<caravan_api::v1alpha1::Agent>()
        .list(&Default::default())
        .await?
        .items
        .remove(0);
    let state = agent
        .status
        .unwrap()
        .jobs
        .into_iter()
        .find(|j| j.package == "svc")
        .unwrap();
    assert_eq!(
        state.message, "installing svc 1.0.0",
        "the script's output is reported"
    );

    let reason = &c.wait_failed("broken").await?;
    assert!(
        reason.contains("exit status: 4")
            && reason.contains("port 8080 already in use")
            && reason.contains("rolled back"),
        "{reason}"
    );
    assert!(
        !root.join("broken").exists(),
        "a failed install leaves nothing behind"
    );

    // A package for another OS is not applicable here, not a failure: the
    // job completes without this endpoint, which says why on its Agent.
    let job = c.wait_job("exotic", "Succeeded", "0/0", T).await?;
    assert_eq!(
        job.status.map(|s| (s.failed, s.not_applicable)),
        Some((0, 1))
    );
    let state = c
        .agent_of("agent-1")
        .await?
        .status
        .unwrap_or_default()
        .jobs
        .into_iter()
        .find(|j| j.package == "exotic")
        .expect("exotic reported");
    assert_eq!(
        state.phase,
        caravan_api::wire::AssignmentPhase::NotApplicable
    );
    assert!(
        state.message.contains("needs os plan9"),
        "{}",
        state.message
    );
    assert!(!root.join("exotic").exists());

    // The job goes away: the uninstall script runs, then the files go.
    repo.remove("fleet/svc-job.yaml")?;
    repo.commit("Retire svc")?;
    wait_for("svc to be uninstalled", T, || async {
        Ok((!root.join("svc").exists() && !root.join("svc.enabled").exists()).then_some(()))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    Ok(())
}

/// Pushes version `version` of package `web` with health check `check`.
fn push_web(c: &Caravan, manifests: &str, version: &str, check: &str) -> anyhow::Result<()> {
    let dir = c.dir.join("src").join(version);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("VERSION"), version)?;
    std::fs::write(dir.join("check.sh"), check)?;
    c.cli(&[
        "package",
        "push",
        &dir.display().to_string(),
        "--name",
        "web",
        "--version",
        version,
        "--manifest-dir",
        manifests,
        "--health-check",
        "check.sh",
    ])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_health_check_puts_the_previous_version_back() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let manifests = repo.work.join("fleet/packages").display().to_string();
    push_web(
        &c,
        &manifests,
        "1.0.0",
        "#!/bin/sh\ntest -f \"$CARAVAN_PACKAGE_DIR/VERSION\"\n",
    )?;
    repo.write(
        "fleet/web-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: web}\nspec:\n  packages: [{name: web}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    repo.commit("web 1.0.0")?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;
    let root = c.agents[0].install_root.clone();
    c.wait_job("web", "Succeeded", "1/1", T).await?;
    assert_eq!(std::fs::read_to_string(root.join("web/VERSION"))?, "1.0.0");

    // 2.0.0 installs, but its health check fails: back to 1.0.0.
    push_web(
        &c,
        &manifests,
        "2.0.0",
        "#!/bin/sh\necho 'web: port 8443 not answering' >&2\nexit 3\n",
    )?;
    repo.commit("web 2.0.0")?;
    let reason = &c.wait_failed("web").await?;
    assert!(
        reason.contains("health")
            && reason.contains("port 8443 not answering")
            && reason.contains("rolled back"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("web/VERSION"))?,
        "1.0.0",
        "the previous version is back"
    );
    Ok(())
}
