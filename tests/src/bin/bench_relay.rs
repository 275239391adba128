//! `caravan-bench-relay`: a relay and nginx (Debian's) serve the same cached
//! blob from the same file to N concurrent clients, one after the other in
//! one run; prints throughput and server CPU-seconds per GiB, and the ratios.
//!
//! `make bench-relay` (release builds, installs nginx), or
//! `target/release/caravan-bench-relay [SIZE_MIB] [CLIENTS]` (default 1024 64).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use caravan_api::v1alpha1::{Agent, Package};
use caravan_tests::{free_port, wait_for, Caravan, Proc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;

const GIB: f64 = (1u64 << 30) as f64;

/// CPU seconds (user + system) used so far by `pid` and its live children.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |p: &str| -> Option<(u32, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            f[1].parse().ok()?,
            f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?,
        ))
    };
    let mut total = ticks(&pid.to_string()).map_or(0, |t| t.1);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((ppid, t)) = name.parse::<u32>().ok().and_then(|_| ticks(&name)) {
            if ppid == pid {
                total += t;
            }
        }
    }
    total as f64 / 100.0 // USER_HZ
}

/// N concurrent downloads of `url`; returns (bytes, seconds).
async fn load(url: &str, token: Option<&str>, clients: usize) -> anyhow::Result<(u64, f64)> {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let tasks = (0..clients).map(|_| {
        let mut req = http.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let res = req.send().await?.error_for_status()?;
            let mut body = res.bytes_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                n += chunk?.len() as u64;
            }
            Ok::<_, anyhow::Error>(n)
        }
    });
    let bytes: u64 = futures::future::try_join_all(tasks)
        .await?
        .into_iter()
        .sum();
    Ok((bytes, start.elapsed().as_secs_f64()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args
        .next()
        .map_or(Ok(1024), |a| a.parse())
        .context("size in MiB")?;
    let clients: usize = args
        .next()
        .map_or(Ok(64), |a| a.parse())
        .context("clients")?;
    let nginx = Path::new("/usr/sbin/nginx");
    anyhow::ensure!(
        nginx.exists(),
        "nginx is not installed (apt-get install nginx)"
    );

    let mut c = Caravan::start("bench").await?;
    let repo = c.seed_example_fleet().await?;
    let src = c.dir.join("big");
    std::fs::create_dir_all(&src)?;
    caravan_tests::write_noise(&src.join("data.bin"), size_mib << 20)?;
    c.push_package(&src, "big", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.write(
        "fleet/big-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: big}\nspec:\n  packages: [{name: big}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    repo.commit("big for hq")?;
    let agent: Agent = serde_json::from_value(serde_json::json!({
        "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
        "metadata": { "name": "bench-client", "namespace": "bench" },
        "spec": { "site": "hq", "hostId": "bench-client-0001" },
    }))?;
    c.api::<Agent>().create(&Default::default(), &agent).await?;
    let relay = c.start_relay("hq").await?;
    let pkg = wait_for("package big", Duration::from_secs(120), || async {
        Ok(c.api::<Package>().get_opt("big-1.0.0").await?)
    })
    .await?;
    let hex = pkg
        .spec
        .artifact
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    let cached = relay.cache_dir.join("sha256").join(&hex);
    wait_for(
        "the relay to prestage the blob",
        Duration::from_secs(600),
        || async { Ok(cached.exists().then_some(())) },
    )
    .await?;
    let secret = c.api::<Secret>().get("hq-relay").await?;
    let token = caravan_net::tokens::issue(
        &String::from_utf8(secret.data.unwrap()["token"].0.clone())?,
        "bench-client",
    );
    let relay_url = format!("{}/v1/blobs/{}", relay.url, pkg.spec.artifact.digest);
    // Wait until the relay serves it to this client (desired state arrived).
    wait_for(
        "the relay to serve the blob",
        Duration::from_secs(60),
        || async {
            let res = reqwest::Client::new()
                .head(&relay_url)
                .bearer_auth(&token)
                .send()
                .await?;
            Ok(res.status().is_success().then_some(()))
        },
    )
    .await?;

    // nginx serves the very same file from the relay's cache directory.
    let port = free_port();
    let dir = c.dir.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            d = dir.display(),
            root = relay.cache_dir.join("sha256").display()
        ),
    )?;
    let nginx_proc = Proc::spawn(
        "nginx",
        nginx,
        &[
            "-c",
            &conf.display().to_string(),
            "-p",
            &dir.display().to_string(),
        ],
        &[],
        &c.dir,
    )?;
    let nginx_url = format!("http://127.0.0.1:{port}/{hex}");
    wait_for("nginx", Duration::from_secs(30), || async {
        Ok(reqwest::Client::new()
            .head(&nginx_url)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| ()))
    })
    .await?;

    println!("caravan-bench-relay: {clients} concurrent clients each download the same cached {size_mib} MiB blob (loopback, one run)");
    println!(
        "{:>8} | {:>10} {:>9} {:>16}",
        "server", "GiB/s", "seconds", "CPU s per GiB"
    );
    let mut results = Vec::new();
    for (name, pid, url, token) in [
        (
            "relay",
            c.relays[0].pid(),
            relay_url.as_str(),
            Some(token.as_str()),
        ),
        ("nginx", nginx_proc.pid(), nginx_url.as_str(), None),
    ] {
        let cpu0 = cpu_seconds(pid);
        let (bytes, secs) = load(url, token, clients).await?;
        let cpu = cpu_seconds(pid) - cpu0;
        anyhow::ensure!(
            bytes == clients as u64 * pkg.spec.artifact.size,
            "{name} served {bytes} bytes"
        );
        let gib = bytes as f64 / GIB;
        println!(
            "{name:>8} | {:>10.2} {secs:>9.1} {:>16.3}",
            gib / secs,
            cpu / gib
        );
        results.push((gib / secs, cpu / gib));
    }
    let (relay, nginx) = (results[0], results[1]);
    println!(
        "relay / nginx: throughput {:.2}x, CPU per GiB {:.2}x (goal: >= 1.0x throughput at <= 1.0x CPU)",
        relay.0 / nginx.0,
        relay.1 / nginx.1
    );
    Ok(())
}
