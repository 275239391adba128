//! `caravan-bench-job`: a distribution job to a fleet of real agents. The
//! agents enroll and install the example package; then a job for a new
//! package is committed to Git, once everyone at once and once gated (the
//! default rollout). For each: the time from the commit to the last agent's
//! `Succeeded`, and the writes the API server took meanwhile (from its own
//! `apiserver_request_total`), per agent. Prints a Markdown table.
//!
//! `make bench-job` (release builds), or
//! `target/release/caravan-bench-job [AGENTS=200] [POLL_WAIT_SECONDS=10]`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use caravan_tests::{caravan::Options, Caravan};

const T: Duration = Duration::from_secs(900);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agents: usize = args
        .next()
        .map_or(Ok(200), |a| a.parse())
        .context("number of agents")?;
    let poll_wait: u64 = args
        .next()
        .map_or(Ok(10), |a| a.parse())
        .context("poll wait in seconds")?;

    let mut c = Caravan::start_with(
        "bench",
        Options {
            enrollments_per_second: Some(1000),
            ..Default::default()
        },
    )
    .await?;
    c.agent_poll_wait = poll_wait;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    let enrolled = Instant::now();
    for i in 0..agents {
        c.start_agent(&format!("e{i:04}"), &relay)?;
    }
    let all = format!("{agents}/{agents}");
    c.wait_job("hello-everywhere", "Succeeded", &all, T).await?;
    let enroll_secs = enrolled.elapsed().as_secs_f64();
    // Let the reports of the first install settle.
    tokio::time::sleep(Duration::from_secs(5)).await;

    println!(
        "\n## job: {agents} agents (poll wait {poll_wait} s), a job for a new 64 KiB package\n"
    );
    println!("enrolled and installed the example package: {enroll_secs:.1} s\n");
    println!(
        "| rollout | commit → last Succeeded s | API writes per agent (Agent objects) | all API writes per agent | job status writes | Events |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for (name, rollout) in [
        ("at-once", "  rollout: {batches: [{size: 100%}]}\n"),
        ("gated", ""),
    ] {
        let src = c.dir.join("src").join(name);
        std::fs::create_dir_all(&src)?;
        caravan_tests::write_noise(&src.join("data.bin"), 64 << 10)?;
        c.push_package(&src, name, "1.0.0", &repo.work.join("fleet/packages"))?;
        repo.write(
            &format!("fleet/{name}-job.yaml"),
            &format!(
                "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: {name}}}\n\
                 spec:\n  packages: [{{name: {name}}}]\n  destinations: {{sites: [{{name: hq}}]}}\n{rollout}"
            ),
        )?;
        let before = c.api_metrics()?;
        let committed = Instant::now();
        repo.commit(&format!("{name} for hq"))?;
        c.wait_job(name, "Succeeded", &all, T).await?;
        let secs = committed.elapsed().as_secs_f64();
        // Reports and status writes still in flight.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = c.api_metrics()?;
        let delta = |f: &dyn Fn(&str) -> bool| after.writes_since(&before, f);
        let per_agent = |n: f64| n / agents as f64;
        println!(
            "| {name} | {secs:.1} | {:.2} | {:.2} | {:.0} | {:.0} |",
            per_agent(delta(&|k| k.starts_with("agents"))),
            per_agent(delta(&|_| true)),
            delta(&|k| k.starts_with("distributionjobs")),
            delta(&|k| k.starts_with("events")),
        );
    }
    println!(
        "\n(`AGENTS={agents}` real `caravan-agent` processes behind one relay, one controller, a real \
         kube-apiserver; writes are POST/PUT/PATCH/DELETE by resource from its `/metrics`.)"
    );
    Ok(())
}
