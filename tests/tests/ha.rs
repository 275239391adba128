//! High availability: two controller replicas on one data directory behind
//! a Service. One leads (the `caravan-controller` Lease) and alone writes
//! status; both serve relays. The leader is killed mid-job: the other takes
//! the Lease within seconds, the relay reaches it through the Service, the
//! job completes, and every endpoint ran the install exactly once.

use std::time::{Duration, Instant};

use caravan_api::v1alpha1::{DistributionJob, JobPhase, Site};
use caravan_tests::{wait_for, Caravan, Options};
use k8s_openapi::api::coordination::v1::Lease;

const T: Duration = Duration::from_secs(120);
const AGENTS: [&str; 4] = ["desk-1", "desk-2", "desk-3", "desk-4"];

async fn holder(c: &Caravan) -> anyhow::Result<Option<String>> {
    Ok(c.api::<Lease>()
        .get_opt("caravan-controller")
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_mid_job_hands_over_within_seconds_and_installs_each_destination_once(
) -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "ha",
        Options {
            service: true,
            ..Default::default()
        },
    )
    .await?;
    wait_for("the first controller to lead", T, || async {
        Ok((holder(&c).await?.as_deref() == Some("controller")).then_some(()))
    })
    .await?;
    let (mut replica, _) = c.start_replica().await?;
    let repo = c.seed_example_fleet().await?;

    // Each run of the install is a line in a file beside the install root;
    // each takes a few seconds, so the leader dies while the job runs.
    let src = c.dir.join("src/counted");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("install.sh"),
        "#!/bin/sh\necho run >> \"$CARAVAN_INSTALL_ROOT/../counted-runs\"\nsleep 3\n",
    )?;
    c.push_package_with(
        &src,
        "counted",
        "1.0.0",
        &repo.work.join("fleet/packages"),
        &["--install", "script"],
    )?;
    repo.write(
        "fleet/counted-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: counted}\n\
         spec:\n  packages: [{name: counted}]\n  destinations: {sites: [{name: hq}]}\n  rollout: {batches: [{size: 100%}]}\n",
    )?;
    repo.commit("counted for hq")?;
    let relay = c.start_relay("hq").await?;
    for name in AGENTS {
        c.start_agent(name, &relay)?;
    }
    let roots: Vec<_> = AGENTS.iter().map(|a| c.agent_dirs(a).1).collect();
    let runs = |name: &str| {
        let root = &roots[AGENTS.iter().position(|a| *a == name).unwrap()];
        std::fs::read_to_string(root.with_file_name("counted-runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_for("the first install to start", T, || async {
        Ok(AGENTS.iter().any(|a| runs(a) > 0).then_some(()))
    })
    .await?;
    assert!(
        !std::fs::read_to_string(&replica.log)?.contains("leading: reconciling"),
        "the follower does not reconcile"
    );

    // The leader dies without releasing the Lease.
    c.controller.kill();
    let killed = Instant::now();
    wait_for("the replica to lead", T, || async {
        Ok((holder(&c).await?.as_deref() == Some("controller-replica")).then_some(()))
    })
    .await?;
    let handover = killed.elapsed();
    assert!(
        handover < Duration::from_secs(20),
        "handed over in {handover:?} (Lease 10 s)"
    );
    let job = wait_for("the job to succeed under the new leader", T, || async {
        let j = c.api::<DistributionJob>().get("counted").await?;
        let st = j.status.unwrap_or_default();
        Ok((st.phase == JobPhase::Succeeded).then_some(st.progress))
    })
    .await?;
    assert_eq!(job, "4/4");
    for name in AGENTS {
        assert_eq!(runs(name), 1, "{name} installed exactly once");
    }
    // The relay, now served by the replica, is seen as connected.
    let site = c.api::<Site>().get("hq").await?;
    let ready = site.status.unwrap_or_default().conditions;
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{ready:?}"
    );
    assert!(replica.running(), "{}", replica.log_tail(30));
    eprintln!("handover after the leader was killed: {handover:?}");
    Ok(())
}
