//! `caravan-bench-agent`: the agent's footprint. One agent enrolls and
//! installs the example package, then idles while long-polling (memory and
//! CPU per poll), then installs a large package (memory while it downloads,
//! verifies and extracts it). Prints a Markdown table.
//!
//! `make bench-agent` (release builds), or
//! `target/release/caravan-bench-agent [SIZE_MIB=1024] [IDLE_SECONDS=60]`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use caravan_tests::{
    procs::{cpu_seconds, memory_mib, peak_mib, thread_cpu_ns, thread_cpu_seconds_since},
    Caravan,
};

/// The agent's long-poll wait in the harness (`--poll-wait`).
const POLL_WAIT: u64 = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args
        .next()
        .map_or(Ok(1024), |a| a.parse())
        .context("size in MiB")?;
    let idle_secs: u64 = args
        .next()
        .map_or(Ok(60), |a| a.parse())
        .context("idle seconds")?;

    let mut c = Caravan::start("bench").await?;
    let (repo, _relay) = c.hello_installed("bench").await?;
    let pid = c.agents[0].proc.pid();

    // Idle: nothing changes, the agent long-polls.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu0 = thread_cpu_ns(pid);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu = thread_cpu_seconds_since(pid, &cpu0);
    let polls = start.elapsed().as_secs_f64() / POLL_WAIT as f64;
    let idle_rss = memory_mib(pid, "VmRSS");
    let idle_peak = peak_mib(pid);

    // A large package: download, sha256, extraction.
    let src = c.dir.join("big");
    std::fs::create_dir_all(&src)?;
    caravan_tests::write_noise(&src.join("data.bin"), size_mib << 20)?;
    c.push_package(&src, "big", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.write(
        "fleet/big-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: big}\nspec:\n  packages: [{name: big}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    let install_cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    repo.commit("big for hq")?;
    c.wait_job("big", "Succeeded", "1/1", Duration::from_secs(900))
        .await?;
    let install_secs = started.elapsed().as_secs_f64();
    let install_cpu = cpu_seconds(pid) - install_cpu0;
    let install_peak = peak_mib(pid);

    println!("\n## agent footprint (idle {idle_secs} s with {POLL_WAIT} s long-polls; then a {size_mib} MiB package)\n");
    println!("| idle RSS MiB | peak before install MiB | CPU µs per poll | install s | install CPU s | peak during install MiB |\n|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {idle_rss:.1} | {idle_peak:.1} | {:.0} | {install_secs:.1} | {install_cpu:.1} | {install_peak:.1} |",
        idle_cpu * 1e6 / polls
    );
    println!(
        "\ngoal: idle RSS under 10 MiB ({}), memory flat during the install: peak {:.2}x the idle peak",
        if idle_rss < 10.0 { "met" } else { "not met" },
        install_peak / idle_peak
    );
    Ok(())
}
