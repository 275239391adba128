//! Transfers survive interruptions: a relay killed in the middle of
//! fetching a blob (at a limited rate) and started again, or an upstream
//! that goes away mid-fetch and comes back, resume the fetch where it
//! stopped, counted in bytes, and the agent gets the right blob.

use std::{path::PathBuf, time::Duration};

use caravan_tests::{metric, wait_for, Caravan};

/// Commits a 12 MB package and a job sending it to hq; returns its content
/// and the size of its blob.
async fn big_package_for_hq(c: &Caravan) -> anyhow::Result<(Vec<u8>, u64)> {
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
    Ok((data, size))
}

/// Bytes in the relay's partial file (of the one blob being fetched; not
/// its `.lock` or `.len` beside it).
fn partial_len(cache_dir: &std::path::Path) -> u64 {
    std::fs::read_dir(cache_dir.join("partial"))
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .find(|e| !e.file_name().to_string_lossy().contains('.'))
        })
        .and_then(|e| e.metadata().ok())
        .map_or(0, |m| m.len())
}

async fn wait_part_way(cache_dir: &std::path::Path) -> anyhow::Result<()> {
    wait_for(
        "the relay to be part-way through the blob",
        Duration::from_secs(60),
        || async { Ok((partial_len(cache_dir) > 4_000_000).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_fetch_resumes_without_fetching_again_what_arrived() -> anyhow::Result<()>
{
    let mut c = Caravan::start("fleet").await?;
    let (data, size) = big_package_for_hq(&c).await?;
    // 3 MB/s: the relay prestages the blob as soon as the job reaches it.
    c.relay_args = vec!["--upstream-rate-limit".into(), "3000000".into()];
    let relay = c.start_relay("hq").await?;
    wait_part_way(&relay.cache_dir).await?;
    c.relays[0].kill();
    let kept = partial_len(&relay.cache_dir);
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

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_cut_mid_fetch_is_resumed_and_agents_streaming_the_blob_get_it_whole(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (data, size) = big_package_for_hq(&c).await?;
    c.relay_args = vec!["--upstream-rate-limit".into(), "3000000".into()];
    let relay = c.start_relay("hq").await?;
    // The agent downloads the blob from the relay while it arrives there,
    // which `caravan-agent status` shows.
    c.start_agent("agent-1", &relay)?;
    wait_part_way(&relay.cache_dir).await?;
    let state = c.agents[0].state_dir.display().to_string();
    let shown = wait_for(
        "status to show the download",
        Duration::from_secs(30),
        || async {
            let out = std::process::Command::new(caravan_tests::bin("caravan-agent")?)
                .args(["status", "--state-dir", &state])
                .output()?;
            let text = String::from_utf8(out.stdout)?;
            Ok(text
                .lines()
                .find(|l| l.contains("big: Downloading") && l.contains("% ("))
                .map(str::to_owned))
        },
    )
    .await?;
    assert!(shown.contains("MiB)"), "{shown}");

    // The controller dies mid-transfer and is back a few seconds later.
    c.controller.kill();
    let cut_at = partial_len(&relay.cache_dir);
    assert!(cut_at < size, "cut mid-fetch: {cut_at} of {size} bytes");
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.restart_controller().await?;

    c.wait_job("big", "Succeeded", "1/1", Duration::from_secs(120))
        .await?;
    assert_eq!(
        std::fs::read(c.agents[0].install_root.join("big/data.bin"))?,
        data
    );
    assert_eq!(
        metric(&relay.url, "caravan_relay_upstream_bytes_total").await? as u64,
        size + hello_size(&c)?,
        "every byte crossed the link once, the example package's included"
    );
    let cached: PathBuf = relay.cache_dir.join("sha256");
    assert_eq!(std::fs::read_dir(cached)?.count(), 2, "both blobs cached");
    Ok(())
}

/// Size of the example package's blob, which hq's relay also fetches.
fn hello_size(c: &Caravan) -> anyhow::Result<u64> {
    let mut sizes: Vec<u64> = std::fs::read_dir(c.dir.join("controller/blobs/sha256"))?
        .map(|e| Ok(e?.metadata()?.len()))
        .collect::<std::io::Result<_>>()?;
    sizes.sort();
    Ok(sizes[0])
}
