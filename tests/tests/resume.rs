//! Transfers survive a relay being killed: a relay killed in the middle of
//! fetching a blob (prestaging it, at a limited rate) and started again
//! resumes the fetch where it stopped, counted in bytes, and the agent
//! gets the right blob.

use std::time::Duration;

use caravan_tests::{metric, wait_for, Caravan};

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_fetch_resumes_without_fetching_again_what_arrived() -> anyhow::Result<()>
{
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let src = c.dir.join("big");
    std::fs::create_dir_all(&src)?;
    let data = caravan_tests::noise(12_000_000, 1);
    std::fs::write(src.join("data.bin"), &data)?;
    c.push_package(&src, "big", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.write(
        "fleet/big-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: big}\nspec:\n  packages: [{name: big}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    repo.commit("A big package for hq")?;
    let size = std::fs::metadata(
        std::fs::read_dir(c.dir.join("controller/blobs/sha256"))?
            .filter_map(|e| e.ok())
            .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .unwrap()
            .path(),
    )?
    .len();

    // 3 MB/s: the relay prestages the blob as soon as the job reaches it.
    c.relay_args = vec!["--upstream-rate-limit".into(), "3000000".into()];
    let relay = c.start_relay("hq").await?;
    let partial_dir = relay.cache_dir.join("partial");
    let partial_len = || {
        std::fs::read_dir(&partial_dir)
            .ok()
            .and_then(|d| d.filter_map(|e| e.ok()).next())
            .and_then(|e| e.metadata().ok())
            .map_or(0, |m| m.len())
    };
    wait_for(
        "the relay to be part-way through the blob",
        Duration::from_secs(60),
        || async { Ok((partial_len() > 4_000_000).then_some(())) },
    )
    .await?;
    c.relays[0].kill();
    let kept = partial_len();
    assert!(
        kept > 0 && kept < size,
        "killed mid-fetch: {kept} of {size} bytes"
    );

    // Started again on the same cache: it asks only for the rest.
    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;
    c.wait_job("big", "Succeeded", "1/1", Duration::from_secs(120))
        .await?;
    assert_eq!(
        std::fs::read(c.agents[0].install_root.join("big/data.bin"))?,
        data
    );
    let refetched = metric(&relay.url, "caravan_relay_upstream_bytes_total").await?;
    assert_eq!(
        refetched as u64,
        size - kept,
        "only the missing {} bytes crossed the link again",
        size - kept
    );
    Ok(())
}
