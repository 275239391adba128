//! `caravan-bench-control-plane`: the controller from a cold start with a
//! large fleet in the API server. SITES Sites, PACKAGES Packages (all of
//! one small artifact in the built-in cabinet: the cost measured is the
//! objects', not the bytes'), AGENTS Agents spread over the sites and a job
//! sending a package to every site (one destination per Agent) are
//! created in a real kube-apiserver and taken in by the running controller
//! (every Package Ready, every Site's status at its generation); the
//! controller is then killed and started again, and the bench waits until
//! the new process has reconciled every Site and its engine has counted
//! every Agent (its own metrics). Prints the time, the controller's memory
//! and CPU, and the API server's readiness and request latency.
//!
//! `make bench-control-plane` (release builds), or
//! `target/release/caravan-bench-control-plane [AGENTS=10000] [SITES=100] [PACKAGES=1000]`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use caravan_api::v1alpha1::{Agent, DistributionJob, Package, Site};
use caravan_tests::{
    metric,
    procs::{cpu_seconds, memory_mib, peak_mib},
    wait_for, Caravan,
};
use futures::{stream, StreamExt, TryStreamExt};
use kube::{
    api::{ListParams, PostParams},
    Api,
};
use serde::{de::DeserializeOwned, Serialize};

const T: Duration = Duration::from_secs(600);
/// Creates in flight at once.
const CONCURRENCY: usize = 32;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: usize, what: &str| -> anyhow::Result<usize> {
        args.next()
            .map_or(Ok(default), |a| a.parse())
            .with_context(|| format!("number of {what}"))
    };
    let (agents, sites, packages) = (
        arg(10_000, "agents")?,
        arg(100, "sites")?,
        arg(1_000, "packages")?,
    );

    let mut c = Caravan::start("bench").await?;
    c.seed_example_fleet().await?;
    let hello = wait_for("package hello Ready", T, || async {
        let p = c.api::<Package>().get_opt("hello-1.0.0").await?;
        Ok(p.filter(ready))
    })
    .await?;

    let created = Instant::now();
    create(c.api::<Site>(), sites, |i| {
        serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Site",
            "metadata": { "name": format!("site-{i:03}") },
            "spec": { "relay": { "replicas": 1 } },
        })
    })
    .await?;
    let spec = &hello.spec;
    create(c.api::<Package>(), packages, |i| {
        serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Package",
            "metadata": { "name": format!("bench-{i:04}-1.0.0") },
            "spec": {
                "cabinet": spec.cabinet, "name": format!("bench-{i:04}"), "version": "1.0.0",
                "artifact": spec.artifact, "install": spec.install,
            },
        })
    })
    .await?;
    create(c.api::<Agent>(), agents, |i| {
        serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
            "metadata": { "name": format!("a{i:06}") },
            "spec": { "site": format!("site-{:03}", i % sites.max(1)), "hostId": format!("bench-host-{i:06}"), "approved": true },
        })
    })
    .await?;
    // One job sending hello to every bench site: each Agent has an
    // assignment in its desired state, and the job a destination each.
    let site_list: Vec<_> = (0..sites)
        .map(|i| serde_json::json!({ "name": format!("site-{i:03}") }))
        .collect();
    create(c.api::<DistributionJob>(), 1, |_| {
        serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "DistributionJob",
            "metadata": { "name": "bench-all" },
            "spec": { "packages": [{ "name": "hello" }], "destinations": { "sites": site_list } },
        })
    })
    .await?;
    let create_secs = created.elapsed().as_secs_f64();
    // The running controller takes it all in: that is where a cold start must get to.
    settled(&c, agents, sites, packages).await?;
    let warm_rss = memory_mib(c.controller.pid(), "VmRSS");

    let requests_before = apiserver_requests(&c)?;
    let started = Instant::now();
    c.restart_controller().await?;
    let serving = started.elapsed().as_secs_f64();
    // The statuses in the API server are the old process's: what counts is
    // the new one's own work, from its metrics.
    wait_for("the new controller to take everything in", T, || async {
        let counted = metric(&c.api_url, "caravan_agents").await.unwrap_or(0.0) as usize;
        let site_reconciles = metric(
            &c.api_url,
            r#"caravan_reconcile_duration_seconds_count{kind="Site"}"#,
        )
        .await
        .unwrap_or(0.0) as usize;
        Ok((counted >= agents && site_reconciles > sites).then_some(()))
    })
    .await?;
    let ready = started.elapsed().as_secs_f64();
    settled(&c, agents, sites, packages).await?;
    let pid = c.controller.pid();
    let (rss, peak, cpu) = (memory_mib(pid, "VmRSS"), peak_mib(pid), cpu_seconds(pid));
    let requests = apiserver_requests(&c)? - requests_before;
    let readyz = c.cluster.kubectl(&["get", "--raw", "/readyz"])?;
    let latency = apiserver_latency_p99(&c)?;

    println!(
        "\n## control plane: {agents} Agents, {sites} Sites, {packages} Packages, controller from a cold start\n"
    );
    println!("created in the API server in {create_secs:.1} s\n");
    println!(
        "| serving s | all Ready s | RSS MiB | peak RSS MiB | CPU s | RSS before the restart MiB | API requests over the start | API server readyz | API server p99 s (all requests so far) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---|---:|"
    );
    println!(
        "| {serving:.1} | {ready:.1} | {rss:.1} | {peak:.1} | {cpu:.1} | {warm_rss:.1} | {requests:.0} | {} | {latency:.3} |",
        readyz.trim()
    );
    println!(
        "\n(\"serving\": the new process answers `/readyz`; \"all Ready\": it has reconciled every Site and \
         its engine has computed every site's desired state and every Package's status with every Agent \
         counted (from its own metrics: the statuses in the API server are the killed process's). Goal for \
         1,000 Packages + 100 Sites + 10,000 Agents: ≤ 60 s and ≤ 256 MiB.)"
    );
    Ok(())
}

/// Creates `object(0..n)` through `api`, `CONCURRENCY` at a time.
async fn create<K>(
    api: Api<K>,
    n: usize,
    object: impl Fn(usize) -> serde_json::Value,
) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    stream::iter(0..n)
        .map(|i| {
            let (api, value) = (api.clone(), object(i));
            async move {
                let o: K = serde_json::from_value(value)?;
                api.create(&PostParams::default(), &o).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

fn ready(p: &Package) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Waits until every Package is Ready, every Site's status is at its
/// generation and the engine's last computation counted every Agent.
async fn settled(c: &Caravan, agents: usize, sites: usize, packages: usize) -> anyhow::Result<()> {
    wait_for("the control plane to settle", T, || async {
        let lp = ListParams::default();
        let ps = c.api::<Package>().list(&lp).await?;
        let ready_packages = ps.items.iter().filter(|p| ready(p)).count();
        let ss = c.api::<Site>().list(&lp).await?;
        let reconciled = ss
            .items
            .iter()
            .filter(|s| {
                s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
            })
            .count();
        let counted = metric(&c.api_url, "caravan_agents").await.unwrap_or(0.0) as usize;
        // The example fleet's own: hq and hello.
        Ok((ready_packages > packages && reconciled > sites && counted >= agents).then_some(()))
    })
    .await
}

/// Requests the API server has answered so far.
fn apiserver_requests(c: &Caravan) -> anyhow::Result<f64> {
    let metrics = c.cluster.kubectl(&["get", "--raw", "/metrics"])?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// The 99th percentile of the API server's request latency so far (all
/// verbs but WATCH), from its histogram's buckets.
fn apiserver_latency_p99(c: &Caravan) -> anyhow::Result<f64> {
    let metrics = c.cluster.kubectl(&["get", "--raw", "/metrics"])?;
    let mut buckets: std::collections::BTreeMap<u64, f64> = Default::default();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("apiserver_request_duration_seconds_bucket{") else {
            continue;
        };
        if rest.contains("verb=\"WATCH\"") || rest.contains("verb=\"CONNECT\"") {
            continue;
        }
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let le = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'));
        let le = match le {
            Some("+Inf") => f64::INFINITY,
            Some(v) => v.parse().unwrap_or(f64::INFINITY),
            None => continue,
        };
        // Keyed by the bound's bits (bounds are positive, so they sort alike).
        *buckets.entry(le.to_bits()).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    let total = buckets.values().last().copied().unwrap_or(0.0);
    Ok(buckets
        .iter()
        .find(|(_, n)| **n >= total * 0.99)
        .map_or(0.0, |(le, _)| f64::from_bits(*le)))
}
