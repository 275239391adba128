//! A branch's transfer window, declared on its Site: the controller runs
//! the relay with it (in the Site's time zone), and outside it the agents
//! wait — their state says when it opens, and nothing is reported Failed.
//! Once the window goes, the install completes.

use std::time::Duration;

use caravan_api::{
    v1alpha1::{Agent, DistributionJob, JobPhase},
    wire::AssignmentPhase,
};
use caravan_tests::{wait_for, Caravan};
use chrono::Timelike as _;
use k8s_openapi::api::apps::v1::Deployment;

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn outside_the_sites_transfer_window_downloads_wait_and_say_when_it_opens(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("window").await?;
    let repo = c.seed_example_fleet().await?;
    // Open now if read in UTC, closed in UTC+3 (`Etc/GMT-3`): the relay
    // must read it in the Site's zone.
    let now = chrono::Utc::now();
    let hm = |minutes: i64| {
        let t = now + chrono::Duration::minutes(minutes);
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    let (start, end) = (hm(-30), hm(60));
    let site = std::fs::read_to_string(repo.work.join("fleet/site.yaml"))?;
    let windowed = site.replace(
        "    replicas: 1\n",
        &format!("    replicas: 1\n    transferWindow: {{start: \"{start}\", end: \"{end}\", timeZone: Etc/GMT-3}}\n"),
    );
    assert_ne!(site, windowed);
    repo.write("fleet/site.yaml", &windowed)?;
    repo.commit("hq fetches only in its window")?;
    let deployments = c.api::<Deployment>();
    wait_for("the relay to be given the window", T, || async {
        let d = deployments.get_opt("hq-relay").await?;
        let args = d
            .and_then(|d| d.spec?.template.spec?.containers.first()?.args.clone())
            .unwrap_or_default();
        Ok(args
            .contains(&format!("{start}-{end} Etc/GMT-3"))
            .then_some(()))
    })
    .await?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("desk", &relay)?;

    let says = format!("waiting for the transfer window, opens {start} Etc/GMT-3");
    let state = wait_for("the agent to say it waits for the window", T, || async {
        let agents = c.api::<Agent>().list(&Default::default()).await?;
        Ok(agents.items.into_iter().find_map(|a| {
            a.status?
                .jobs
                .into_iter()
                .find(|j| j.package == "hello" && j.message.contains(&says))
        }))
    })
    .await?;
    assert_eq!(state.phase, AssignmentPhase::Downloading, "{state:?}");
    let job = c.api::<DistributionJob>().list(&Default::default()).await?;
    for j in &job.items {
        let st = j.status.clone().unwrap_or_default();
        assert_ne!(st.phase, JobPhase::Failed, "{st:?}");
        assert!(st.failures.is_empty(), "{st:?}");
    }
    let (_, root) = c.agent_dirs("desk");
    assert!(
        !root.join("hello").exists(),
        "nothing installed outside the window"
    );

    // The window goes: the relay (rolled) fetches, the agent installs.
    repo.write("fleet/site.yaml", &site)?;
    repo.commit("hq fetches any time")?;
    wait_for("the relay to lose the window", T, || async {
        let d = deployments.get_opt("hq-relay").await?;
        let args = d
            .and_then(|d| d.spec?.template.spec?.containers.first()?.args.clone())
            .unwrap_or_default();
        Ok((!args.iter().any(|a| a == "--transfer-window")).then_some(()))
    })
    .await?;
    c.restart_relay("hq").await?;
    wait_for("hello installed once the window is gone", T, || async {
        Ok(root.join("hello/bin/hello").exists().then_some(()))
    })
    .await?;
    Ok(())
}
