//! Self-update: a package of the agent itself is distributed like any
//! other. The agent tries the new binary out, replaces its own binary with
//! it and restarts into it (same process); a new binary that cannot come up
//! and report is thrown away, the old one carries on and the job says why.

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use caravan_tests::{bin, Caravan};

const T: Duration = Duration::from_secs(120);

/// Pushes version `version` of the agent package, its binary being `script`.
fn push_agent(c: &Caravan, manifests: &Path, version: &str, script: &str) -> anyhow::Result<()> {
    let dir = c.dir.join("agent-pkg").join(version);
    std::fs::create_dir_all(&dir)?;
    let binary = dir.join("caravan-agent");
    std::fs::write(&binary, script)?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    c.cli(&[
        "package",
        "push",
        &dir.display().to_string(),
        "--name",
        "caravan-agent",
        "--version",
        version,
        "--manifest-dir",
        &manifests.display().to_string(),
        "--install",
        "agent",
    ])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_updates_itself_and_keeps_its_binary_when_the_new_one_fails() -> anyhow::Result<()>
{
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    // The agent runs from its own copy of the binary, which updates replace.
    let installed = c.dir.join("opt/bin/caravan-agent");
    std::fs::create_dir_all(installed.parent().unwrap())?;
    std::fs::copy(bin("caravan-agent")?, &installed)?;
    c.agent_bin = Some(installed.clone());
    // The new "binaries" below are wrappers around the real one.
    c.agent_args = vec!["--binary".into(), installed.display().to_string()];
    c.start_agent("edge", &relay)?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;

    // 2.0.0: the real agent behind a wrapper that notes every start.
    let real = c.dir.join("real-agent");
    std::fs::copy(bin("caravan-agent")?, &real)?;
    let marks = c.dir.join("agent-starts.log");
    let v2 = format!(
        "#!/bin/sh\necho \"$1\" >> {}\nexec {} \"$@\"\n",
        marks.display(),
        real.display()
    );
    let manifests = repo.work.join("fleet/packages");
    push_agent(&c, &manifests, "2.0.0", &v2)?;
    repo.write(
        "fleet/agent-update.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: agent-update}\nspec:\n  packages: [{name: caravan-agent}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    repo.commit("Agents: 2.0.0")?;
    c.wait_job("agent-update", "Succeeded", "1/1", T).await?;
    assert_eq!(
        std::fs::read_to_string(&installed)?,
        v2,
        "the binary was replaced"
    );
    // Tried out, then restarted into (the report goes just before the restart).
    let starts = || std::fs::read_to_string(&marks).unwrap_or_default();
    caravan_tests::wait_for("the restart into 2.0.0", T, || async {
        Ok((starts().lines().count() >= 2).then_some(()))
    })
    .await?;
    assert_eq!(starts().lines().collect::<Vec<_>>(), ["self-test", "run"]);
    assert!(c.agents[0].proc.running(), "the same process runs on");
    let previous = installed.with_file_name("caravan-agent.previous");
    caravan_tests::wait_for("the update to be confirmed", T, || async {
        Ok((!previous.exists()).then_some(()))
    })
    .await?;

    // 3.0.0 cannot start: the old binary stays and carries on.
    push_agent(
        &c,
        &manifests,
        "3.0.0",
        "#!/bin/sh\necho 'agent 3.0.0: missing libfoo.so' >&2\nexit 127\n",
    )?;
    repo.commit("Agents: 3.0.0")?;
    let reason = &c.wait_failed("agent-update").await?;
    assert!(
        reason.contains("self-test") && reason.contains("missing libfoo.so"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_to_string(&installed)?,
        v2,
        "the binary was kept"
    );
    assert!(c.agents[0].proc.running());
    // Still the working agent: hello stays Succeeded through it all.
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;

    // 4.0.0 passes its self-test but dies once restarted into: the service
    // manager's OnFailure runs the kept binary's rollback-update, and the
    // agent, started again, is the previous one and says why.
    let v4 = format!(
        "#!/bin/sh\nif [ \"$1\" = self-test ]; then exec {} \"$@\"; fi\necho 'agent 4.0.0: panicked at start' >&2\nexit 101\n",
        real.display()
    );
    push_agent(&c, &manifests, "4.0.0", &v4)?;
    repo.commit("Agents: 4.0.0")?;
    let deadline = std::time::Instant::now() + T;
    while c.agents[0].proc.running() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent was to restart into 4.0.0 and die"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(std::fs::read_to_string(&installed)?, v4);
    assert!(
        previous.exists(),
        "the previous binary is kept until the new one reports"
    );
    let (state, root) = c.agent_dirs("edge");
    let out = std::process::Command::new(&previous)
        .args([
            "rollback-update",
            "--state-dir",
            &state.display().to_string(),
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&installed)?, v2, "back to 2.0.0");
    c.agents[0].proc = c.spawn_agent("edge", &relay, &state, &root)?;
    let reason = &c.wait_failed("agent-update").await?;
    assert!(reason.contains("did not come up and report"), "{reason}");
    assert!(
        c.agents[0].proc.running(),
        "2.0.0 runs and is not replaced again"
    );
    assert_eq!(std::fs::read_to_string(&installed)?, v2);
    Ok(())
}
