//! Upgrading Caravan: a controller of a new release moves the sites' relays
//! to its relay image one site at a time, the next only once the previous
//! one's Deployment has rolled out and its relay is back, of the new
//! release. (The harness plays the kubelet: a relay started from its
//! Deployment says the release its image's tag names, and the Deployment's
//! status then says it rolled out.)

use std::time::Duration;

use caravan_api::{images, RELEASE};
use caravan_tests::{wait_for, Caravan};
use k8s_openapi::api::apps::v1::Deployment;

const T: Duration = Duration::from_secs(150);

/// The image of each site's relay Deployment, hq's then branch's.
async fn images_of(c: &Caravan) -> anyhow::Result<(String, String)> {
    let image = |name: &'static str| async move {
        let d = c.api::<Deployment>().get(&format!("{name}-relay")).await?;
        anyhow::Ok(
            d.spec
                .and_then(|s| s.template.spec)
                .and_then(|p| p.containers.first()?.image.clone())
                .unwrap_or_default(),
        )
    };
    Ok((image("hq").await?, image("branch").await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_controller_moves_the_relays_to_its_image_one_site_at_a_time() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    // Release "A": relays of 0.1.0, which 0.2's controller works with.
    let old = format!("{}:0.1.0", images::RELAY);
    assert!(RELEASE.starts_with("0.2."), "pick the release before anew");
    c.restart_controller_with(&[("--relay-image", old.clone())])
        .await?;
    let repo = c.seed_example_fleet().await?;
    repo.write(
        "fleet/branch.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec: {parent: hq}\n",
    )?;
    repo.commit("A branch under hq")?;
    let hq = c.start_relay("hq").await?;
    c.start_relay("branch").await?;
    c.start_agent("desk", &hq)?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    for site in ["hq", "branch"] {
        wait_for(&format!("{site}'s relay to say 0.1.0"), T, || async {
            let s = c.site(site).await?.status.unwrap_or_default();
            Ok((s.relay_version.as_deref() == Some("0.1.0")).then_some(()))
        })
        .await?;
    }
    assert_eq!(images_of(&c).await?, (old.clone(), old.clone()));

    // Release "B": one relay moves, the other waits for it.
    let new = images::relay();
    c.restart_controller_with(&[("--relay-image", new.clone())])
        .await?;
    let (first, second) = wait_for("one relay to move", T, || async {
        Ok(match images_of(&c).await? {
            (hq, branch) if hq == new && branch == old => Some(("hq", "branch")),
            (hq, branch) if hq == old && branch == new => Some(("branch", "hq")),
            (hq, branch) if hq == new && branch == new => anyhow::bail!("both moved at once"),
            _ => None,
        })
    })
    .await?;
    // Both Sites were looked at meanwhile (every 30 s at the latest): the
    // second still waits, and says for whom.
    c.wait_event("Normal", second, "RelayUpgradeWaiting", first)
        .await?;
    // A controller that starts again meanwhile (a new leader) finds the
    // relay on its way in the cluster, and holds the second too: it says so
    // in an Event of its own (a new process records a new Event object).
    c.restart_controller().await?;
    wait_for("the new controller to hold the second site", T, || async {
        let events = c
            .api::<k8s_openapi::api::events::v1::Event>()
            .list(&Default::default())
            .await?;
        let held = events
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some("RelayUpgradeWaiting")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(second)
            })
            .count();
        Ok((held >= 2).then_some(()))
    })
    .await?;
    let still = images_of(&c).await?;
    assert!(
        still.0 == old || still.1 == old,
        "the second moved before the first was back: {still:?}"
    );
    // The first comes back on the new image (the kubelet rolls its pod):
    // the second moves.
    c.restart_relay(first).await?;
    wait_for("the second relay to move", T, || async {
        Ok((images_of(&c).await? == (new.clone(), new.clone())).then_some(()))
    })
    .await?;
    c.restart_relay(second).await?;
    for site in ["hq", "branch"] {
        wait_for(&format!("{site}'s relay to say {RELEASE}"), T, || async {
            let s = c.site(site).await?.status.unwrap_or_default();
            Ok((s.relay_version.as_deref() == Some(RELEASE)).then_some(()))
        })
        .await?;
    }
    // Nothing was installed again on the way.
    let log = std::fs::read_to_string(c.dir.join("logs/agent-desk.log"))?;
    assert_eq!(log.matches("installed package=hello").count(), 1, "{log}");
    Ok(())
}

/// `--agent-update auto`: the controller of a new release rolls its own
/// agent out, once the relays run its release: the endpoint of an older
/// agent updates itself (its binary replaced, reporting the new release),
/// one already of the release downloads nothing, and the job's Event says
/// the bytes each endpoint is sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_controller_updates_the_agents_once_their_relay_is_back() -> anyhow::Result<()> {
    use caravan_api::v1alpha1::DistributionJob;
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = Caravan::start("fleet").await?;
    let old_relay = format!("{}:0.1.0", images::RELAY);
    c.restart_controller_with(&[("--relay-image", old_relay)])
        .await?;
    c.seed_example_fleet().await?;
    let hq = c.start_relay("hq").await?;
    // The endpoints run their own copy of the agent, which updates replace;
    // "old" is of release 0.1.0 (it says so), "current" of this one.
    let installed = c.dir.join("opt/bin/caravan-agent");
    std::fs::create_dir_all(installed.parent().unwrap())?;
    std::fs::copy(caravan_tests::bin("caravan-agent")?, &installed)?;
    let before = std::fs::read(&installed)?;
    c.agent_bin = Some(installed.clone());
    c.agent_args
        .extend(["--binary".into(), installed.display().to_string()]);
    c.agent_env.insert(
        "old".into(),
        vec![("CARAVAN_CLAIM_RELEASE".into(), "0.1.0".into())],
    );
    c.start_agent("old", &hq)?;
    c.start_agent("current", &hq)?;
    c.wait_job("hello-everywhere", "Succeeded", "2/2", T)
        .await?;

    // Release B's agent build (what its image holds): the real agent, of
    // this release (it says no other).
    let real = c.dir.join("real-agent");
    std::fs::copy(caravan_tests::bin("caravan-agent")?, &real)?;
    let build = c.dir.join("release-b/caravan-agent");
    std::fs::create_dir_all(build.parent().unwrap())?;
    std::fs::write(
        &build,
        format!(
            "#!/bin/sh\nunset CARAVAN_CLAIM_RELEASE\nexec {} \"$@\"\n",
            real.display()
        ),
    )?;
    std::fs::set_permissions(&build, std::fs::Permissions::from_mode(0o755))?;
    c.restart_controller_with(&[
        ("--relay-image", images::relay()),
        ("--agent-update", "auto".into()),
        ("--agent-binary", build.display().to_string()),
    ])
    .await?;
    // Not before hq's relay runs this release.
    wait_for("hq's relay Deployment to move", T, || async {
        let d = c.api::<Deployment>().get("hq-relay").await?;
        let image = d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.containers.first()?.image.clone());
        Ok((image == Some(images::relay())).then_some(()))
    })
    .await?;
    // A round of the update has looked, and held: the relay is not back.
    wait_for("the agent update to wait for hq's relay", T, || async {
        let log = std::fs::read_to_string(&c.controller.log)?;
        Ok(log
            .contains("agent update waits for these sites' relays")
            .then_some(()))
    })
    .await?;
    let jobs = c.api::<DistributionJob>();
    assert!(
        jobs.get_opt("caravan-agent-update").await?.is_none(),
        "the relay is not back yet"
    );
    c.restart_relay("hq").await?;
    let note = c
        .wait_event(
            "Normal",
            "caravan-agent-update",
            "AgentUpdateStarted",
            "per endpoint",
        )
        .await?;
    let job = c
        .wait_job("caravan-agent-update", "Succeeded", "2/2", T)
        .await?;
    assert!(job.spec.rollout.is_none(), "the default rollout: gated");
    let size = c
        .api::<caravan_api::v1alpha1::Package>()
        .get(&format!("caravan-agent-{RELEASE}"))
        .await?
        .spec
        .artifact
        .size;
    assert!(note.contains(&format!("({size} bytes)")), "{note}");
    // The old endpoint runs B's build now, and says B's release.
    assert_eq!(
        std::fs::read(&installed)?,
        std::fs::read(&build)?,
        "replaced"
    );
    assert_ne!(std::fs::read(&installed)?, before);
    wait_for("the updated agent to report its release", T, || async {
        let a = c.agent_of("old").await?;
        Ok((a.status.and_then(|s| s.version).as_deref() == Some(RELEASE)).then_some(()))
    })
    .await?;
    // The current one fetched nothing.
    let log = std::fs::read_to_string(c.dir.join("logs/agent-current.log"))?;
    assert!(log.contains("is the agent running"), "{log}");
    assert!(!log.contains("restarting into the new agent"), "{log}");
    Ok(())
}
