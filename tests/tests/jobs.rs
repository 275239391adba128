//! Distribution jobs as an operator runs them: a failing install gives up at
//! its job's limit, `caravan job retry` re-runs only the failures,
//! `caravan job status` shows the tree, pause and resume (and Git keeps the
//! fields it declares); jobs that disagree about a package settle it by
//! precedence, the loser showing Conflict; a job naming a missing package
//! never shows Succeeded; a package's dependencies install before it, and
//! a detection rule recognises software already there.

use std::{path::Path, time::Duration};

use caravan_api::{
    conditions,
    v1alpha1::{DistributionJob, JobPhase},
    wire::AssignmentPhase,
};
use caravan_tests::{wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

/// How many times the `flaky` install script ran on the agent whose
/// install root is `root`.
fn runs(root: &Path) -> usize {
    std::fs::read_to_string(root.with_file_name("flaky-runs"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_install_gives_up_at_its_limit_and_retry_reruns_only_the_failures(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("jobs").await?;
    let repo = c.seed_example_fleet().await?;
    // Succeeds where the agent's directory holds `flaky-ok`; counts its runs.
    let src = c.dir.join("src/flaky");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("install.sh"),
        "#!/bin/sh\necho run >> \"$CARAVAN_INSTALL_ROOT/../flaky-runs\"\n\
         test -e \"$CARAVAN_INSTALL_ROOT/../flaky-ok\" || { echo 'license server unreachable' >&2; exit 7; }\n",
    )?;
    c.push_package_with(
        &src,
        "flaky",
        "1.0.0",
        &repo.work.join("fleet/packages"),
        &["--install", "script"],
    )?;
    // Git declares `suspend`: pausing is Git's business for this job.
    repo.write(
        "fleet/flaky-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: flaky}\n\
         spec:\n  packages: [{name: flaky}]\n  destinations: {sites: [{name: hq}]}\n  retries: 1\n  suspend: false\n  rollout: {batches: [{size: 100%}]}\n",
    )?;
    repo.commit("flaky for hq, one retry")?;
    let relay = c.start_relay("hq").await?;
    for name in ["good", "bad"] {
        let (_, root) = c.agent_dirs(name);
        std::fs::create_dir_all(root.parent().unwrap())?;
        if name == "good" {
            std::fs::write(root.with_file_name("flaky-ok"), "")?;
        }
        c.start_agent(name, &relay)?;
    }
    let (_, good) = c.agent_dirs("good");
    let (_, bad) = c.agent_dirs("bad");

    // The first try and one retry (after the agent's 2 s, doubled), then
    // the destination is Failed for good: nothing retries forever.
    let job = wait_for("flaky to give up on one agent", T, || async {
        let j = c.api::<DistributionJob>().get("flaky").await?;
        let st = j.status.clone().unwrap_or_default();
        let done = (st.phase, st.progress.as_str(), st.retrying) == (JobPhase::Failed, "1/2", 0);
        Ok(done.then_some(j))
    })
    .await?;
    let failure = &job.status.unwrap().failures[0];
    assert_eq!(
        failure.agent,
        c.agent_of("bad").await?.metadata.name.unwrap()
    );
    assert!(
        failure.reason.contains("license server unreachable"),
        "{}",
        failure.reason
    );
    assert_eq!(runs(&bad), 2, "the first try and one retry");
    let state = c
        .agent_of("bad")
        .await?
        .status
        .unwrap_or_default()
        .jobs
        .into_iter()
        .find(|j| j.package == "flaky")
        .unwrap();
    assert_eq!(
        (state.phase, state.attempts, state.retry_at),
        (AssignmentPhase::Failed, 2, None)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(runs(&bad), 2, "given up: not tried again");
    assert_eq!(runs(&good), 1);

    // The tree names each destination's state and reason.
    let tree = c.cli(&["job", "status", "flaky", "-n", &c.namespace])?;
    let bad_name = c.agent_of("bad").await?.metadata.name.unwrap();
    let good_name = c.agent_of("good").await?.metadata.name.unwrap();
    assert!(
        tree.starts_with("job flaky: Failed 1/2 succeeded, 1 failed\nsite hq: 1/2, 1 failed\n"),
        "{tree}"
    );
    assert!(
        tree.contains(&format!("  agent {bad_name}: Failed 2 time(s) (re-run it with `caravan job retry`): package flaky 1.0.0 rolled back"))
            && tree.contains("license server unreachable"),
        "{tree}"
    );
    assert!(
        tree.contains(&format!("  agent {good_name}: Succeeded")),
        "{tree}"
    );
    let failed = c.cli(&["job", "status", "flaky", "--failed", "-n", &c.namespace])?;
    assert!(
        failed.contains(&bad_name) && !failed.contains(&good_name),
        "{failed}"
    );

    // Fixed on the endpoint, re-run: only the failure runs again, and a
    // watching operator sees it happen.
    let mut watch = std::process::Command::new(caravan_tests::bin("caravan")?)
        .args(["job", "status", "flaky", "--watch", "-n", &c.namespace])
        .env("KUBECONFIG", &c.cluster.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(c.dir.join("watch.err"))?)
        .spawn()?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (seen, stdout) = (seen.clone(), watch.stdout.take().unwrap());
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut seen = seen.lock().unwrap();
                seen.push_str(&line);
                seen.push('\n');
            }
        })
    };
    wait_for("the watch to show the failure", T, || async {
        Ok(seen
            .lock()
            .unwrap()
            .contains("job flaky: Failed 1/2")
            .then_some(()))
    })
    .await?;
    std::fs::write(bad.with_file_name("flaky-ok"), "")?;
    c.cli(&["job", "retry", "flaky", "-n", &c.namespace])?;
    c.wait_job("flaky", "Succeeded", "2/2", T).await?;
    assert_eq!(
        (runs(&bad), runs(&good)),
        (3, 1),
        "succeeded agents' scripts do not run again"
    );
    let job = c.api::<DistributionJob>().get("flaky").await?;
    assert_eq!(job.spec.retry.map(|r| r.generation), Some(1));
    let both = wait_for(
        "the watch to show the failure, then the success",
        T,
        || async {
            let seen = seen.lock().unwrap().clone();
            Ok((seen.contains("job flaky: Failed 1/2")
                && seen.contains("job flaky: Succeeded 2/2"))
            .then_some(seen))
        },
    )
    .await;
    watch.kill()?;
    watch.wait()?;
    reader.join().unwrap();
    let seen = both.map_err(|e| {
        let err = std::fs::read_to_string(c.dir.join("watch.err")).unwrap_or_default();
        e.context(format!(
            "watch printed: {}\nstderr: {err}",
            seen.lock().unwrap()
        ))
    })?;
    assert!(
        seen.find("Failed 1/2") < seen.find("Succeeded 2/2"),
        "in that order: {seen}"
    );

    // Pause and resume write `suspend` as the CLI, unless Git declares it.
    let err = c
        .cli(&["job", "pause", "flaky", "-n", &c.namespace])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("spec.suspend of DistributionJob flaky is declared in Git"),
        "{err}"
    );
    c.cli(&["job", "pause", "hello-everywhere", "-n", &c.namespace])?;
    wait_for("hello-everywhere to be suspended", T, || async {
        let j = c.api::<DistributionJob>().get("hello-everywhere").await?;
        Ok((j.status.unwrap_or_default().phase == JobPhase::Suspended).then_some(()))
    })
    .await?;
    // A sync of Git later leaves the CLI's field alone.
    repo.write("fleet/note.txt", "a commit that changes nothing declared\n")?;
    repo.commit("touch")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        c.api::<DistributionJob>()
            .get("hello-everywhere")
            .await?
            .spec
            .suspend
    );
    c.cli(&["job", "resume", "hello-everywhere", "-n", &c.namespace])?;
    c.wait_job("hello-everywhere", "Succeeded", "2/2", T)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_that_disagree_settle_by_precedence_and_a_missing_package_never_succeeds(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("conflict").await?;
    let repo = c.seed_example_fleet().await?;
    let manifests = repo.work.join("fleet/packages");
    let v2 = c.dir.join("src/hello-2");
    caravan_tests::copy_dir(
        &caravan_tests::repo_root().join("examples/packages/hello"),
        &v2,
    )?;
    std::fs::write(v2.join("VERSION"), "2.0.0\n")?;
    c.push_package(&v2, "hello", "2.0.0", &manifests)?;
    // hello-everywhere takes the highest version, 2.0.0; `pinned`, newer,
    // holds hello at 1.0.0 on hq's agents. `ghost` names nothing that exists.
    repo.write(
        "fleet/pinned-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: pinned}\n\
         spec:\n  packages: [{name: hello, version: 1.0.0}]\n  destinations: {sites: [{name: hq}]}\n  \
         rollout: {batches: [{size: 100%}]}\n",
    )?;
    repo.write(
        "fleet/ghost-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: ghost}\n\
         spec:\n  packages: [{name: ghost}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    // Creation times have seconds: one later than hello-everywhere's.
    wait_for("hello-everywhere to be applied", T, || async {
        Ok(c.api::<DistributionJob>()
            .get_opt("hello-everywhere")
            .await?)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    repo.commit("hello 2.0.0, a pin to 1.0.0, and a job for a package nobody pushed")?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;

    c.wait_job("pinned", "Succeeded", "1/1", T).await?;
    let lost = c.wait_job("hello-everywhere", "Conflict", "0/1", T).await?;
    let ready = lost
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == conditions::READY)
        .unwrap();
    assert_eq!(ready.reason, "Conflict");
    assert!(
        ready
            .message
            .contains("has package hello from job conflict/pinned"),
        "{}",
        ready.message
    );
    wait_installed(&c, "agent-1", "1.0.0").await?;
    // The Agent says so too, naming the winner.
    let state =
        wait_for("the agent to report the conflict", T, || async {
            let a = c.agent_of("agent-1").await?;
            Ok(a.status.unwrap_or_default().jobs.into_iter().find(|j| {
                j.job == "conflict/hello-everywhere" && j.phase == AssignmentPhase::Conflict
            }))
        })
        .await?;
    assert!(
        state
            .message
            .contains("job conflict/pinned takes precedence"),
        "{}",
        state.message
    );

    // A priority beats age: hello-everywhere wins, 2.0.0 goes in.
    repo.write(
        "fleet/job.yaml",
        &std::fs::read_to_string(caravan_tests::repo_root().join("examples/fleet/job.yaml"))?
            .replace("  action: install\n", "  action: install\n  priority: 10\n"),
    )?;
    repo.commit("hello-everywhere takes precedence")?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    c.wait_job("pinned", "Conflict", "0/1", T).await?;
    wait_installed(&c, "agent-1", "2.0.0").await?;

    // The job whose package does not exist never counts the agent, done
    // with everything else, as Succeeded.
    let ghost = c.api::<DistributionJob>().get("ghost").await?;
    let st = ghost.status.unwrap();
    assert_eq!(
        (st.phase, st.succeeded, st.pending),
        (JobPhase::Pending, 0, 1)
    );
    let resolved = st
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::RESOLVED_REFS)
        .unwrap();
    assert!(
        resolved.message.contains("package ghost not found"),
        "{}",
        resolved.message
    );
    let complete = st
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::COMPLETE)
        .unwrap();
    assert_eq!(complete.status, "False");
    Ok(())
}

/// Waits until the endpoint `host` has hello `version` installed.
async fn wait_installed(c: &Caravan, host: &str, version: &str) -> anyhow::Result<()> {
    wait_for(&format!("hello {version} on {host}"), T, || async {
        let a = c.agent_of(host).await?;
        Ok(a.status
            .unwrap_or_default()
            .installed
            .iter()
            .any(|p| p.name == "hello" && p.version == version)
            .then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_three_level_tree_jobs_reach_exactly_their_agents_and_a_selector_picks_up_a_late_one(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("tree").await?;
    let repo = c.seed_example_fleet().await?;
    let manifests = repo.work.join("fleet/packages");
    // hq → east → east-1, and hq → west.
    for (site, parent) in [("east", "hq"), ("east-1", "east"), ("west", "hq")] {
        repo.write(
            &format!("fleet/{site}-site.yaml"),
            &format!("apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {{name: {site}}}\nspec: {{parent: {parent}}}\n"),
        )?;
    }
    let tools = c.dir.join("src/tools");
    std::fs::create_dir_all(&tools)?;
    std::fs::write(tools.join("README"), "tools for the east\n")?;
    c.push_package(&tools, "tools", "1.0.0", &manifests)?;
    let exotic = c.dir.join("src/exotic");
    std::fs::create_dir_all(&exotic)?;
    std::fs::write(exotic.join("README"), "for another OS\n")?;
    c.cli(&[
        "package",
        "push",
        &exotic.display().to_string(),
        "--name",
        "exotic",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests.display().to_string(),
        "--os",
        "plan9",
    ])?;
    let job = |name: &str, package: &str, destinations: &str| {
        repo.write(
            &format!("fleet/{name}-job.yaml"),
            &format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: {name}}}\nspec:\n  packages: [{{name: {package}}}]\n  rollout: {{batches: [{{size: 100%}}]}}\n  destinations:\n{destinations}"),
        )
    };
    // An all-lower-clients job from the middle of the tree.
    job(
        "east-tools",
        "tools",
        "    sites: [{name: east, includeLower: true}]\n",
    )?;
    // Kiosks, by the label their own configuration declares and the OS
    // their agent reports: nobody yet.
    job(
        "kiosk-app",
        "tools",
        "    agentSelector:\n      matchExpressions:\n      - {key: agent.caravan.dev/role, operator: In, values: [kiosk]}\n      - {key: caravan.dev/os, operator: In, values: [linux]}\n",
    )?;
    job(
        "exotic",
        "exotic",
        "    sites: [{name: hq, includeLower: true}]\n",
    )?;
    repo.commit("A tree of sites and three jobs")?;
    let mut relays = std::collections::BTreeMap::new();
    for site in ["hq", "east", "east-1", "west"] {
        relays.insert(site, c.start_relay(site).await?);
        c.start_agent(&format!("at-{site}"), &relays[site])?;
    }
    c.wait_job("hello-everywhere", "Succeeded", "4/4", T)
        .await?;
    let east = c.wait_job("east-tools", "Succeeded", "2/2", T).await?;
    assert_eq!(
        east.status.unwrap().total,
        2,
        "the agents of east and east-1 only"
    );
    for (host, has) in [
        ("at-hq", false),
        ("at-east", true),
        ("at-east-1", true),
        ("at-west", false),
    ] {
        let installed = c.agent_of(host).await?.status.unwrap_or_default().installed;
        assert_eq!(installed.iter().any(|p| p.name == "tools"), has, "{host}");
    }
    let tree = c.cli(&["job", "status", "east-tools", "-n", &c.namespace])?;
    assert!(
        tree.contains("site hq: no destinations\n  site east: 1/1\n")
            && tree.contains("\n    site east-1: 1/1\n"),
        "{tree}"
    );
    // A package for another OS: not applicable anywhere, and the job completes.
    let exotic = c.wait_job("exotic", "Succeeded", "0/0", T).await?;
    assert_eq!(exotic.status.unwrap().not_applicable, 4);

    // Nobody yet: the job says so.
    wait_for("kiosk-app to have no destinations", T, || async {
        let j = c.api::<DistributionJob>().get("kiosk-app").await?;
        let st = j.status.unwrap_or_default();
        let ready = st.conditions.iter().find(|c| c.type_ == conditions::READY);
        Ok((st.total == 0 && ready.is_some_and(|r| r.reason == "NoDestinations")).then_some(()))
    })
    .await?;
    // A kiosk enrolls late at west, saying what it is in its own configuration.
    c.agent_args
        .extend(["--label".to_string(), "role=kiosk".to_string()]);
    c.start_agent("kiosk-1", &relays["west"])?;
    c.wait_job("kiosk-app", "Succeeded", "1/1", T).await?;
    let agent = c.agent_of("kiosk-1").await?;
    let labels = agent.metadata.labels.unwrap_or_default();
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let facts = caravan_api::facts::os_release;
    assert_eq!(
        labels.get("agent.caravan.dev/role").map(String::as_str),
        Some("kiosk")
    );
    assert_eq!(
        labels.get("caravan.dev/os").map(String::as_str),
        Some(std::env::consts::OS)
    );
    assert_eq!(
        labels.get("caravan.dev/arch").map(String::as_str),
        Some(std::env::consts::ARCH)
    );
    assert_eq!(
        labels.get("caravan.dev/hostname").map(String::as_str),
        Some("kiosk-1")
    );
    assert_eq!(
        labels.get("caravan.dev/distro"),
        facts(&release, "ID").as_ref()
    );
    assert_eq!(
        labels.get("caravan.dev/os-version"),
        facts(&release, "VERSION_ID").as_ref()
    );
    assert!(
        !labels.contains_key("role"),
        "an endpoint never sets an administrator's label"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_downloads_ahead_installs_from_its_start_and_expires_what_it_did_not_reach(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("schedule").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("on", &relay)?;
    c.start_agent("off", &relay)?;
    c.wait_job("hello-everywhere", "Succeeded", "2/2", T)
        .await?;
    // One endpoint is switched off before the job comes.
    c.agents[1].proc.kill();
    let src = c.dir.join("src/timed");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("README"), "installed in its hours\n")?;
    c.push_package(&src, "timed", "1.0.0", &repo.work.join("fleet/packages"))?;
    let now = chrono::Utc::now();
    let not_before = now + chrono::Duration::seconds(25);
    let deadline = now + chrono::Duration::seconds(45);
    let time =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    repo.write(
        "fleet/timed-job.yaml",
        &format!(
            "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: timed}}\n\
             spec:\n  packages: [{{name: timed}}]\n  destinations: {{sites: [{{name: hq}}]}}\n  \
             schedule: {{notBefore: \"{}\", deadline: \"{}\"}}\n  rollout: {{batches: [{{size: 100%}}]}}\n",
            time(not_before),
            time(deadline)
        ),
    )?;
    repo.commit("timed, installed from in 25 s, until 45 s")?;
    // A time that is not one is refused when written (with kubectl too),
    // never left for the controller to choke on.
    let bad = c.dir.join("bad-time.yaml");
    std::fs::write(
        &bad,
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: bad-time}\n\
         spec:\n  packages: [{name: timed}]\n  destinations: {sites: [{name: hq}]}\n  \
         schedule: {notBefore: \"tonight at ten\"}\n",
    )?;
    let refused = c
        .cluster
        .kubectl(&[
            "apply",
            "-n",
            &c.namespace,
            "-f",
            &bad.display().to_string(),
        ])
        .unwrap_err();
    assert!(
        refused.to_string().contains("spec.schedule.notBefore"),
        "{refused}"
    );
    // Before the start: downloaded and verified, not installed.
    let ahead = wait_phase(&c, "on", "timed", AssignmentPhase::Downloaded).await?;
    assert!(
        chrono::Utc::now() < not_before,
        "downloaded before the start"
    );
    assert!(
        ahead
            .message
            .contains(&format!("installs from {}", time(not_before))),
        "{}",
        ahead.message
    );
    let digest = c
        .api::<caravan_api::v1alpha1::Package>()
        .get("timed-1.0.0")
        .await?
        .spec
        .artifact
        .digest;
    assert!(c.agents[0]
        .state_dir
        .join(format!("downloads/{}.part", digest.hex()))
        .exists());
    assert!(
        !c.agents[0].install_root.join("timed").exists(),
        "not installed before the start"
    );
    wait_for("the job to count it downloaded ahead", T, || async {
        let job = c.api::<DistributionJob>().get("timed").await?;
        Ok((job.status.unwrap_or_default().downloaded == 1).then_some(()))
    })
    .await?;

    // From the start: installed (in its hours).
    let done = wait_phase(&c, "on", "timed", AssignmentPhase::Succeeded).await?;
    assert!(
        done.time.as_str() >= time(not_before).as_str(),
        "{} is before the start",
        done.time
    );
    assert!(c.agents[0].install_root.join("timed/README").exists());

    // After the deadline: the endpoint that was off is Expired, and when it
    // comes back it installs nothing.
    let job = c.wait_job("timed", "Expired", "1/2", T).await?;
    assert_eq!(job.status.unwrap().expired, 1);
    let (state_dir, root) = c.agent_dirs("off");
    c.agents[1].proc = c.spawn_agent("off", &relay, &state_dir, &root)?;
    let expired = wait_phase(&c, "off", "timed", AssignmentPhase::Expired).await?;
    assert!(
        expired
            .message
            .contains("not started by the job's deadline"),
        "{}",
        expired.message
    );
    assert!(
        !root.join("timed").exists(),
        "nothing started after the deadline"
    );
    Ok(())
}

/// The state the endpoint `host` reports for `package`.
async fn package_state(
    c: &Caravan,
    host: &str,
    package: &str,
) -> anyhow::Result<Option<caravan_api::wire::JobState>> {
    let a = c.agent_of(host).await?;
    Ok(a.status
        .unwrap_or_default()
        .jobs
        .into_iter()
        .find(|j| j.package == package))
}

/// Waits until the endpoint `host` reports `phase` for `package`.
async fn wait_phase(
    c: &Caravan,
    host: &str,
    package: &str,
    phase: AssignmentPhase,
) -> anyhow::Result<caravan_api::wire::JobState> {
    let what = format!("{host} to report {package} {phase:?}");
    wait_for(&what, T, || async {
        Ok(package_state(c, host, package)
            .await?
            .filter(|s| s.phase == phase))
    })
    .await
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_maintenance_window_in_local_time_holds_the_install_but_not_the_download(
) -> anyhow::Result<()> {
    use chrono::Timelike as _;
    let mut c = Caravan::start("window").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    // One endpoint three hours east of UTC, one at UTC.
    for (host, tz) in [("east", "Etc/GMT-3"), ("west", "UTC")] {
        c.agent_env
            .insert(host.into(), vec![("TZ".into(), tz.into())]);
        c.start_agent(host, &relay)?;
    }
    c.wait_job("hello-everywhere", "Succeeded", "2/2", T)
        .await?;
    let src = c.dir.join("src/nightly");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("README"), "installed in the window\n")?;
    c.push_package(&src, "nightly", "1.0.0", &repo.work.join("fleet/packages"))?;
    // A window that opens in 40 s on the eastern endpoint's clock, for
    // ten minutes (in the endpoint's local time: no time zone named).
    let opens = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + 40, 0).unwrap();
    let local = opens + chrono::Duration::hours(3);
    let cron = format!(
        "{} {} {} * * *",
        local.second(),
        local.minute(),
        local.hour()
    );
    repo.write(
        "fleet/nightly-job.yaml",
        &format!(
            "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: nightly}}\n\
             spec:\n  packages: [{{name: nightly}}]\n  destinations: {{sites: [{{name: hq}}]}}\n  \
             schedule:\n    windows: [{{cron: \"{cron}\", duration: 10m}}]\n  \
             rollout: {{batches: [{{size: 100%}}]}}\n"
        ),
    )?;
    repo.commit("nightly, in a maintenance window")?;

    // Both download ahead and wait, each for the window on its own clock.
    let downloaded = |host| wait_phase(&c, host, "nightly", AssignmentPhase::Downloaded);
    let east = downloaded("east").await?;
    assert!(chrono::Utc::now() < opens, "downloaded before the window");
    let says = |when| format!("installs in the maintenance window from {}", rfc3339(when));
    assert!(east.message.contains(&says(opens)), "{}", east.message);
    let west = downloaded("west").await?;
    let west_opens = opens + chrono::Duration::hours(3);
    assert!(west.message.contains(&says(west_opens)), "{}", west.message);
    let digest = c
        .api::<caravan_api::v1alpha1::Package>()
        .get("nightly-1.0.0")
        .await?
        .spec
        .artifact
        .digest;
    for a in &c.agents {
        assert!(
            a.state_dir
                .join(format!("downloads/{}.part", digest.hex()))
                .exists(),
            "{} has the blob before the window",
            a.name
        );
        assert!(!a.install_root.join("nightly").exists());
    }

    // Inside its window the eastern endpoint installs; the other waits.
    let done = wait_phase(&c, "east", "nightly", AssignmentPhase::Succeeded).await?;
    assert!(
        done.time.as_str() >= rfc3339(opens).as_str(),
        "{} is before the window",
        done.time
    );
    let job = c.wait_job("nightly", "Progressing", "1/2", T).await?;
    let status = job.status.unwrap_or_default();
    assert_eq!(status.downloaded, 1);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .unwrap();
    assert!(
        ready
            .message
            .contains("installs run in maintenance windows (1 downloaded"),
        "{}",
        ready.message
    );
    let west = package_state(&c, "west", "nightly").await?.unwrap();
    assert_eq!(west.phase, AssignmentPhase::Downloaded);
    assert!(!c.agents[1].install_root.join("nightly").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_gated_by_default_pausing_at_the_first_failure_until_resumed() -> anyhow::Result<()>
{
    let mut c = Caravan::start("rollout").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    let hosts = ["r1", "r2", "r3", "r4"];
    for host in hosts {
        c.start_agent(host, &relay)?;
    }
    c.wait_job("hello-everywhere", "Succeeded", "4/4", T)
        .await?;
    // Fails until the endpoint holds `canary-ok`; counts its runs.
    let src = c.dir.join("src/canary");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("install.sh"),
        "#!/bin/sh\necho run >> \"$CARAVAN_INSTALL_ROOT/../canary-runs\"\n\
         test -e \"$CARAVAN_INSTALL_ROOT/../canary-ok\" || { echo 'missing dependency' >&2; exit 3; }\n",
    )?;
    c.push_package_with(
        &src,
        "canary",
        "1.0.0",
        &repo.work.join("fleet/packages"),
        &["--install", "script"],
    )?;
    // No `rollout`: gated, as every new job is.
    repo.write(
        "fleet/canary-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: canary}\n\
         spec:\n  packages: [{name: canary}]\n  destinations: {sites: [{name: hq}]}\n  retries: 0\n",
    )?;
    repo.commit("canary for hq, gated")?;
    let runs = |c: &Caravan| -> usize {
        hosts
            .iter()
            .map(|h| {
                let (_, root) = c.agent_dirs(h);
                std::fs::read_to_string(root.with_file_name("canary-runs"))
                    .map(|s| s.lines().count())
                    .unwrap_or(0)
            })
            .sum()
    };

    // The first destination fails: the rollout pauses, and nobody else
    // ran the script.
    let job = c.wait_job("canary", "Paused", "0/4", T).await?;
    let status = job.status.unwrap_or_default();
    let rollout = status.rollout.clone().unwrap();
    let why = "1 of the 1 finished destinations of batch 1 failed (threshold 10%)";
    assert_eq!(
        (rollout.batch, rollout.batches, rollout.released),
        (1, 3, 1)
    );
    assert_eq!(rollout.paused.as_deref(), Some(why));
    let paused = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::PAUSED)
        .unwrap();
    assert_eq!(
        (paused.status.as_str(), paused.reason.as_str()),
        ("True", conditions::reasons::FAILURE_THRESHOLD)
    );
    assert!(paused.message.starts_with(why), "{}", paused.message);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(runs(&c), 1, "only the first batch ran it");
    let table = c
        .cluster
        .kubectl(&["get", "dj", "canary", "-n", &c.namespace])?;
    let (head, row) = table.split_once('\n').unwrap();
    assert!(head.contains("BATCH"), "{table}");
    assert!(row.contains("Paused") && row.contains(" 1 "), "{table}");
    let events = c.cluster.kubectl(&[
        "get",
        "events",
        "-n",
        &c.namespace,
        "--field-selector",
        "involvedObject.name=canary",
    ])?;
    assert!(events.contains("RolloutPaused"), "{events}");

    // Fixed on the endpoints and resumed: the rest get it (the failure
    // stays failed until it is re-run).
    for host in hosts {
        let (_, root) = c.agent_dirs(host);
        std::fs::write(root.with_file_name("canary-ok"), "")?;
    }
    c.cli(&["job", "resume", "canary", "-n", &c.namespace])?;
    let job = c.wait_job("canary", "Failed", "3/4", T).await?;
    let rollout = job.status.unwrap_or_default().rollout.unwrap();
    assert_eq!(
        (rollout.batch, rollout.paused, rollout.resumed),
        (3, None, 1)
    );
    assert_eq!(runs(&c), 4);
    let events = c.cluster.kubectl(&[
        "get",
        "events",
        "-n",
        &c.namespace,
        "--field-selector",
        "involvedObject.name=canary",
    ])?;
    assert!(events.contains("RolloutResumed"), "{events}");
    c.cli(&["job", "retry", "canary", "-n", &c.namespace])?;
    c.wait_job("canary", "Succeeded", "4/4", T).await?;
    assert_eq!(runs(&c), 5, "the failure ran again, nothing else");
    Ok(())
}

/// Runs `caravan-agent ARGS --state-dir …` for endpoint `host`; its output,
/// or what it said when it failed.
fn on_endpoint(c: &Caravan, host: &str, args: &[&str]) -> anyhow::Result<Result<String, String>> {
    let (state, _) = c.agent_dirs(host);
    let out = std::process::Command::new(caravan_tests::bin("caravan-agent")?)
        .args(args)
        .arg("--state-dir")
        .arg(&state)
        .output()?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(match out.status.success() {
        true => Ok(text(out.stdout)),
        false => Err(text(out.stderr)),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_optional_package_installs_only_when_chosen_and_a_deferral_holds_until_its_end(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("choices").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    for host in ["pick", "skip"] {
        c.start_agent(host, &relay)?;
    }
    c.wait_job("hello-everywhere", "Succeeded", "2/2", T)
        .await?;
    let manifests = repo.work.join("fleet/packages");
    for name in ["extras", "office", "patch"] {
        let src = c.dir.join("src").join(name);
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("README"), format!("{name}\n"))?;
        c.push_package(&src, name, "1.0.0", &manifests)?;
    }
    let now = chrono::Utc::now();
    let job = |name: &str, rest: &str| {
        repo.write(
            &format!("fleet/{name}-job.yaml"),
            &format!(
                "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: {name}}}\n\
                 spec:\n  packages: [{{name: {name}}}]\n  destinations: {{sites: [{{name: hq}}]}}\n  \
                 rollout: {{batches: [{{size: 100%}}]}}\n{rest}"
            ),
        )
    };
    job("extras", "  optional: true\n")?;
    job(
        "office",
        &format!(
            "  deferral: {{limit: 1, delay: 25s}}\n  schedule: {{notBefore: \"{}\"}}\n",
            rfc3339(now + chrono::Duration::seconds(20))
        ),
    )?;
    job(
        "patch",
        &format!(
            "  deferral: {{limit: 3, delay: 1h}}\n  schedule: {{deadline: \"{}\"}}\n",
            rfc3339(now + chrono::Duration::minutes(10))
        ),
    )?;
    repo.commit("extras on offer, office that can wait, an urgent patch")?;

    // Offered, not installed, until chosen on the endpoint.
    let job = c.wait_job("extras", "Available", "0/2", T).await?;
    assert_eq!(job.status.unwrap_or_default().available, 2);
    let offered = on_endpoint(&c, "pick", &["available"])?.unwrap();
    assert!(
        offered.starts_with(&format!("extras 1.0.0 (job {}/extras)", c.namespace)),
        "{offered}"
    );
    let refused = on_endpoint(&c, "pick", &["install", "hello"])?.unwrap_err();
    assert!(
        refused.contains("no job offers package hello here"),
        "{refused}"
    );

    // The user of one endpoint puts office off (once: its limit).
    wait_phase(&c, "pick", "office", AssignmentPhase::Downloaded).await?;
    let said = on_endpoint(&c, "pick", &["defer", "office"])?.unwrap();
    let until: chrono::DateTime<chrono::Utc> = said
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .map_err(|e| anyhow::anyhow!("{said}: {e}"))?;
    let again = on_endpoint(&c, "pick", &["defer", "office"])?.unwrap_err();
    assert!(
        again.contains("put off 1 time(s): that is its limit"),
        "{again}"
    );
    // The deadline wins over a deferral that would end after it.
    let late = on_endpoint(&c, "pick", &["defer", "patch"])?.unwrap_err();
    assert!(late.contains("must install by its deadline"), "{late}");

    // Chosen: installed at once, and the job counts it.
    on_endpoint(&c, "pick", &["install", "extras"])?.unwrap();
    let job = c.wait_job("extras", "Available", "1/2", T).await?;
    assert_eq!(job.status.unwrap_or_default().available, 1);
    assert!(c.agents[0].install_root.join("extras/README").exists());
    assert!(!c.agents[1].install_root.join("extras").exists());

    // Office: the other endpoint installs it from its start; the deferred
    // one waits for its deferral to end, then installs it.
    let deferred = wait_phase(&c, "pick", "office", AssignmentPhase::Deferred).await?;
    assert!(deferred
        .message
        .contains("put off by the endpoint's user until"));
    wait_phase(&c, "skip", "office", AssignmentPhase::Succeeded).await?;
    if chrono::Utc::now() < until {
        assert!(!c.agents[0].install_root.join("office").exists());
    }
    let done = wait_phase(&c, "pick", "office", AssignmentPhase::Succeeded).await?;
    assert!(
        done.time.as_str() >= rfc3339(until).as_str(),
        "installed at {} before the deferral ended at {until}",
        done.time
    );
    c.wait_job("office", "Succeeded", "2/2", T).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dependencies_install_first_and_a_detection_rule_recognises_preinstalled_software(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("requires").await?;
    let repo = c.seed_example_fleet().await?;
    let manifests = repo.work.join("fleet/packages");
    // Each script notes itself in the agent's `order` file.
    let note = |name: &str| {
        format!("#!/bin/sh\necho \"$CARAVAN_ACTION {name} $CARAVAN_PACKAGE_VERSION\" >> \"$CARAVAN_INSTALL_ROOT/../order\"\n")
    };
    let scripts = ["--install", "script", "--uninstall-script", "uninstall.sh"];
    for version in ["1.1.0", "1.4.0", "2.0.0"] {
        let src = c.dir.join("src/libfoo").join(version);
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("install.sh"), note("libfoo"))?;
        std::fs::write(src.join("uninstall.sh"), note("libfoo"))?;
        c.push_package_with(&src, "libfoo", version, &manifests, &scripts)?;
    }
    // viewer needs libfoo 1.2 or later below 2, and is recognised (without
    // being installed) where the vendor's build is there: its binary, by
    // digest, and the endpoint's own record of it.
    let vendor = c.dir.join("vendor-app");
    std::fs::write(&vendor, b"the vendor's app 2.0.0 build")?;
    let digest = caravan_api::Digest::of(b"the vendor's app 2.0.0 build");
    let src = c.dir.join("src/viewer");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("install.sh"),
        format!(
            "{}test -e \"$CARAVAN_INSTALL_ROOT/libfoo/install.sh\" || {{ echo 'libfoo missing' >&2; exit 9; }}\n",
            note("viewer")
        ),
    )?;
    std::fs::write(src.join("uninstall.sh"), note("viewer"))?;
    let detect_file = format!("{}={digest}", vendor.display());
    c.push_package_with(
        &src,
        "viewer",
        "2.0.0",
        &manifests,
        &[
            "--install",
            "script",
            "--uninstall-script",
            "uninstall.sh",
            "--requires",
            "libfoo@>=1.2, <2",
            "--detect-file",
            &detect_file,
            "--detect-command",
            "test -e \"$CARAVAN_INSTALL_ROOT/../vendor-installed\"",
        ],
    )?;
    let relay = c.start_relay("hq").await?;
    for host in ["fresh", "vendor"] {
        let (_, root) = c.agent_dirs(host);
        std::fs::create_dir_all(root.parent().unwrap())?;
        if host == "vendor" {
            std::fs::write(root.with_file_name("vendor-installed"), "")?;
        }
        c.start_agent(host, &relay)?;
    }
    repo.write(
        "fleet/app-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: app}\n\
         spec:\n  packages: [{name: viewer}]\n  destinations: {sites: [{name: hq}]}\n  \
         rollout: {batches: [{size: 100%}]}\n",
    )?;
    repo.commit("app for hq")?;
    c.wait_job("app", "Succeeded", "2/2", T).await?;

    let order = |host: &str| {
        let (_, root) = c.agent_dirs(host);
        std::fs::read_to_string(root.with_file_name("order")).unwrap_or_default()
    };
    // The highest libfoo in range, before viewer.
    assert_eq!(
        order("fresh"),
        "install libfoo 1.4.0\ninstall viewer 2.0.0\n"
    );
    // viewer was there already: recognised, not installed again.
    assert_eq!(order("vendor"), "install libfoo 1.4.0\n");
    let viewer = wait_phase(&c, "vendor", "viewer", AssignmentPhase::Succeeded).await?;
    assert!(
        viewer
            .message
            .starts_with("already present, not installed by Caravan: ")
            && viewer.message.contains(&format!("has digest {digest}")),
        "{}",
        viewer.message
    );
    // (Besides the example fleet's hello.)
    let installed = |a: caravan_api::v1alpha1::Agent| {
        a.status
            .unwrap_or_default()
            .installed
            .into_iter()
            .filter(|p| p.name != "hello")
            .map(|p| (p.name, p.version, p.detected))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        installed(c.agent_of("vendor").await?),
        [
            ("libfoo".into(), "1.4.0".into(), false),
            ("viewer".into(), "2.0.0".into(), true)
        ]
    );
    assert!(!c.agents[1].install_root.join("viewer").exists());

    // The job gone: Caravan removes what it installed, and only forgets
    // what it found.
    repo.remove("fleet/app-job.yaml")?;
    repo.commit("app no more")?;
    wait_for(
        "both endpoints to have neither viewer nor libfoo",
        T,
        || async {
            let mut empty = true;
            for host in ["fresh", "vendor"] {
                empty &= installed(c.agent_of(host).await?).is_empty();
            }
            Ok(empty.then_some(()))
        },
    )
    .await?;
    // What requires goes before what it requires; the vendor's viewer is
    // forgotten, its uninstall script never run.
    assert_eq!(
        order("fresh"),
        "install libfoo 1.4.0\ninstall viewer 2.0.0\nuninstall viewer 2.0.0\nuninstall libfoo 1.4.0\n"
    );
    assert_eq!(
        order("vendor"),
        "install libfoo 1.4.0\nuninstall libfoo 1.4.0\n"
    );
    assert!(!c.agents[0].install_root.join("viewer").exists());
    Ok(())
}
