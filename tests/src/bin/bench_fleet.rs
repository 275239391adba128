//! `caravan-bench-fleet`: a fleet of simulated agents that speak the real
//! protocol to real relays, controller and kube-apiserver — thousands per
//! process, in several processes — and a job for all of them.
//!
//! Each simulated agent is an Agent object with its own ed25519 key and its
//! own HTTP connection to the relay. It pins the controller's root, reads
//! and long-polls its desired state, verifies each document's signature
//! (rollback and expiry included), downloads each assigned blob and checks
//! its digest and size, and sends reports it signs, with a sequence that
//! only grows. It installs nothing (no scripts run): it is the protocol's
//! load, not an endpoint's work. `--fail PERCENT` makes that share of the
//! agents report their installs as failed; `--think MS` waits up to that
//! long (at random) before acting on a new document.
//!
//! ```text
//! caravan-bench-fleet [AGENTS=10000] [PROCESSES=4] [POLL_WAIT_SECONDS=60] [--sites N] [--fail PERCENT] [--think MS]
//! ```
//!
//! `--sites N` spreads the agents evenly over `hq` and `N - 1` branch sites
//! below it (whose relays fetch from hq's). A site whose agents one relay
//! process cannot hold runs more replicas of its relay
//! ([`AGENTS_PER_RELAY`]), as a Site declares; every relay process gets at
//! least one generator process of its own.
//!
//! The fleet first installs the example package (the warm-up); then a job
//! for a new package is committed to Git, everyone at once. Prints the time
//! from the commit to each agent's report of success (p50, p99, max; from
//! the agents' own clocks, all on this machine), the API server's writes
//! per agent, and the memory of the relay, the controller and the
//! generators per agent, the API server's health during the job (`/readyz`,
//! its request latencies) and the size of etcd (`make bench-fleet`).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use caravan_api::{
    signing,
    trust::{self, Accepted, Root},
    v1alpha1::{Agent, JobAction},
    wire::{
        paths, AgentReport, AgentServed, AssignmentPhase, Envelope, InstalledPackage, JobState,
        MAX_AGENT_DESIRED_BYTES,
    },
};
use caravan_tests::{
    caravan::{Options, READ_VERBS, WRITE_VERBS},
    procs::memory_mib,
    Caravan,
};
use ed25519_dalek::SigningKey;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use sha2::Digest as _;
use tokio::io::AsyncBufReadExt;

/// The most simulated agents one relay process serves: each waiting agent
/// is a socket, and a process here may hold 20,000 files.
const AGENTS_PER_RELAY: usize = 10_000;
const T: Duration = Duration::from_secs(1800);
/// The environment variable that hands the relay's token to generators.
const TOKEN_ENV: &str = "CARAVAN_BENCH_RELAY_TOKEN";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Agent `i`'s name and key (the same in the bench and its generators).
fn identity(i: usize) -> (String, SigningKey) {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    (format!("sim-{i:06}"), SigningKey::from_bytes(&seed))
}

/// Options of the simulated agents.
#[derive(Clone, Copy)]
struct Behaviour {
    wait: u64,
    fail_percent: u64,
    think_ms: u64,
}

impl Behaviour {
    fn args(&self) -> Vec<String> {
        vec![
            self.wait.to_string(),
            self.fail_percent.to_string(),
            self.think_ms.to_string(),
        ]
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Every simulated agent is a socket.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("generate") {
        let n = |i: usize| -> anyhow::Result<u64> {
            args.get(i)
                .context("generate URL FIRST COUNT WAIT FAIL THINK")?
                .parse()
                .with_context(|| format!("argument {i}: a number"))
        };
        let behaviour = Behaviour {
            wait: n(4)?,
            fail_percent: n(5)?,
            think_ms: n(6)?,
        };
        return generate(&args[1], n(2)? as usize, n(3)? as usize, behaviour).await;
    }
    let mut positional = vec![];
    let mut behaviour = Behaviour {
        wait: 60,
        fail_percent: 0,
        think_ms: 0,
    };
    let mut sites = 1;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--fail" => behaviour.fail_percent = it.next().context("--fail PERCENT")?.parse()?,
            "--think" => behaviour.think_ms = it.next().context("--think MS")?.parse()?,
            "--sites" => sites = it.next().context("--sites N")?.parse()?,
            n => positional.push(
                n.parse::<u64>()
                    .with_context(|| format!("{n:?}: a number"))?,
            ),
        }
    }
    let layout = Layout {
        agents: positional.first().copied().unwrap_or(10_000) as usize,
        sites: sites.max(1),
    };
    let processes = positional.get(1).copied().unwrap_or(4).max(1) as usize;
    behaviour.wait = positional.get(2).copied().unwrap_or(60);
    bench(layout, processes, behaviour).await
}

/// Where the simulated agents are: evenly over `sites` sites, `hq` and
/// branches below it, in blocks (agent `i` at site `i / per_site`).
#[derive(Clone, Copy)]
struct Layout {
    agents: usize,
    sites: usize,
}

impl Layout {
    fn site(s: usize) -> String {
        match s {
            0 => "hq".into(),
            s => format!("branch-{s}"),
        }
    }

    fn per_site(&self) -> usize {
        self.agents.div_ceil(self.sites)
    }

    /// The site of agent `i`.
    fn site_of(&self, i: usize) -> String {
        Self::site(i / self.per_site())
    }

    /// The agents of site `s`.
    fn agents_of(&self, s: usize) -> std::ops::Range<usize> {
        let per = self.per_site();
        (s * per).min(self.agents)..((s + 1) * per).min(self.agents)
    }

    /// How many relay processes each site runs.
    fn replicas(&self) -> usize {
        self.per_site().div_ceil(AGENTS_PER_RELAY).max(1)
    }

    /// The Site manifests: hq's example with its replicas, and each
    /// branch below hq.
    fn manifests(&self, hq: &str) -> Vec<(String, String)> {
        let replicas = format!("replicas: {}\n", self.replicas());
        let mut out = vec![(
            "fleet/site.yaml".into(),
            hq.replace("replicas: 1\n", &replicas),
        )];
        for s in 1..self.sites {
            out.push((
                format!("fleet/site-{}.yaml", Self::site(s)),
                format!(
                    "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {{name: {}}}\n\
                     spec:\n  parent: hq\n  relay:\n    {replicas}",
                    Self::site(s)
                ),
            ));
        }
        out
    }
}

/// Splits `range` into `n` near-equal consecutive parts.
fn split(range: std::ops::Range<usize>, n: usize) -> Vec<std::ops::Range<usize>> {
    let per = range.len().div_ceil(n.max(1)).max(1);
    (0..n)
        .map(|k| {
            (range.start + k * per).min(range.end)..(range.start + (k + 1) * per).min(range.end)
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// One generator process's agents, from `first`, `count` of them.
async fn generate(relay: &str, first: usize, count: usize, b: Behaviour) -> anyhow::Result<()> {
    let secret = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} not set"))?;
    let token = |name: &str| caravan_net::agent_tokens::issue(&secret, name, None);
    // The controller's roots, pinned on first sight (as an agent without a
    // pin in its enrollment bundle does).
    let (name, _) = identity(first);
    // One client for all: each request in flight has a connection of its
    // own (as each agent has), without a TLS configuration and pool per
    // agent (tens of KiB each).
    let http = caravan_tests::http_builder()
        .pool_idle_timeout(caravan_net::IDLE_CONNECTION)
        .timeout(Duration::from_secs(b.wait + 60))
        .build()?;
    let chain: Vec<Envelope> = http
        .get(format!("{relay}{}", paths::ROOTS))
        .bearer_auth(token(&name))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let (root, _) = trust::pin(&chain, None)?;
    let root = Arc::new(root);
    let mut agents = tokio::task::JoinSet::new();
    for i in first..first + count {
        let (name, key) = identity(i);
        let fails = fails(i, b);
        let sim = Simulated {
            token: token(&name),
            name,
            key,
            http: http.clone(),
            relay: relay.to_string(),
            root: root.clone(),
            fails,
            think_ms: b.think_ms,
        };
        agents.spawn(sim.run(b.wait));
        // Do not storm the relay with thousands of connections at once.
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!("started {count}");
    while let Some(r) = agents.join_next().await {
        r??;
    }
    Ok(())
}

struct Simulated {
    name: String,
    key: SigningKey,
    token: String,
    http: reqwest::Client,
    relay: String,
    root: Arc<Root>,
    fails: bool,
    think_ms: u64,
}

impl Simulated {
    /// Reads and long-polls its desired state, acting on every new one,
    /// until an error it cannot go on from.
    async fn run(self, wait: u64) -> anyhow::Result<()> {
        let (mut etag, mut accepted) = (None::<String>, None::<Accepted>);
        let mut installed: BTreeMap<String, InstalledPackage> = BTreeMap::new();
        let mut jobs: Vec<JobState> = vec![];
        let mut sequence = 0;
        let mut parked = false;
        loop {
            let url = match etag {
                Some(_) => format!("{}{}", self.relay, paths::poll(paths::DESIRED, wait)),
                None => format!("{}{}", self.relay, paths::DESIRED),
            };
            let mut req = self.http.get(&url).bearer_auth(&self.token);
            if let Some(e) = &etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, e);
            }
            if etag.is_some() && !parked {
                parked = true;
                println!("parked {}", self.name);
            }
            let answer = match req.send().await.and_then(|r| r.error_for_status()) {
                Ok(res) => caravan_net::poll_answer::<AgentServed>(res, MAX_AGENT_DESIRED_BYTES)
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            };
            let (new_etag, served) = match answer {
                Ok(Some(answer)) => answer,
                Ok(None) => continue,
                // Not served yet, or the relay is busy: as an agent does,
                // ask again a little later.
                Err(e) => {
                    self.trouble(&e).await;
                    continue;
                }
            };
            let (desired, acc) = trust::verify_desired(
                &served,
                &self.root,
                &self.name,
                accepted.as_ref(),
                chrono::Utc::now(),
            )
            .with_context(|| format!("{}: desired state refused", self.name))?;
            if self.think_ms > 0 {
                let ms = rand::random::<u64>() % self.think_ms;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let mut done = vec![];
            let new: Vec<_> = desired
                .assignments
                .iter()
                .filter(|a| {
                    a.action == JobAction::Install
                        && a.superseded_by.is_none()
                        && installed
                            .get(&a.package)
                            .is_none_or(|p| p.digest != a.digest)
                        && !jobs.iter().any(|j| j.job == a.job && j.digest == a.digest)
                })
                .collect();
            for a in new {
                let phase = match self.fails {
                    true => AssignmentPhase::Failed,
                    false => {
                        self.fetch_retrying(a).await?;
                        installed.insert(
                            a.package.clone(),
                            InstalledPackage {
                                name: a.package.clone(),
                                version: a.version.clone(),
                                digest: a.digest,
                                detected: false,
                            },
                        );
                        AssignmentPhase::Succeeded
                    }
                };
                jobs.retain(|j| !(j.job == a.job && j.package == a.package));
                jobs.push(JobState {
                    job: a.job.clone(),
                    package: a.package.clone(),
                    digest: a.digest,
                    action: a.action,
                    phase,
                    message: match self.fails {
                        true => "simulated failure".into(),
                        false => String::new(),
                    },
                    time: chrono::Utc::now().to_rfc3339(),
                    attempts: 1,
                    retry_at: None,
                });
                done.push(a.job.clone());
            }
            sequence = unix_ms().max(sequence + 1);
            let report = AgentReport {
                agent: self.name.clone(),
                sequence,
                version: caravan_api::RELEASE.into(),
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
                installed: installed.values().cloned().collect(),
                jobs: jobs.clone(),
                drift: vec![],
                desired_version: desired.version,
                desired_refused: None,
                facts: Default::default(),
            };
            let signed = trust::sign_report(&report, &self.key);
            loop {
                let sent = self
                    .http
                    .post(format!("{}{}", self.relay, paths::REPORT))
                    .bearer_auth(&self.token)
                    .json(&signed)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                match sent {
                    Ok(_) => break,
                    Err(e) => self.trouble(&e.into()).await,
                }
            }
            let at = unix_ms();
            for job in done {
                println!("done {job} {} {at} {}", self.name, self.fails);
            }
            (etag, accepted) = (Some(new_etag), Some(acc));
        }
    }

    /// [`Self::fetch`], again while it fails (as an agent does: the relay
    /// may not have the blob yet), up to a minute.
    async fn fetch_retrying(&self, a: &caravan_api::wire::Assignment) -> anyhow::Result<()> {
        for _ in 0..30 {
            match self.fetch(a).await {
                Ok(()) => return Ok(()),
                Err(e) => self.trouble(&e).await,
            }
        }
        self.fetch(a).await
    }

    /// Says what went wrong (counted by the bench) and waits 2 s.
    async fn trouble(&self, e: &anyhow::Error) {
        // The agent's name left out, so that alike troubles count together.
        let why = format!("{e:#}")
            .replace('\n', " ")
            .replace(&self.name, "<agent>");
        println!("trouble {} {why}", self.name);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// Downloads an assigned blob, checking its size and digest.
    async fn fetch(&self, a: &caravan_api::wire::Assignment) -> anyhow::Result<()> {
        let res = self
            .http
            .get(format!("{}{}", self.relay, paths::blob(&a.digest)))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        let mut body = res.bytes_stream();
        let (mut hash, mut len) = (sha2::Sha256::new(), 0u64);
        while let Some(chunk) = body.try_next().await? {
            len += chunk.len() as u64;
            anyhow::ensure!(len <= a.size, "blob {} longer than {}", a.digest, a.size);
            hash.update(&chunk);
        }
        anyhow::ensure!(
            len == a.size,
            "blob {}: {len} of {} bytes",
            a.digest,
            a.size
        );
        anyhow::ensure!(
            hex::encode(hash.finalize()) == a.digest.hex(),
            "blob {}: digest mismatch",
            a.digest
        );
        Ok(())
    }
}

/// What the generators say, line by line.
enum Said {
    Parked,
    Done {
        job: String,
        at_ms: u64,
    },
    /// A request failed and is tried again (its message).
    Trouble(String),
    /// A generator ended: it never does unless it failed.
    Exited,
}

async fn bench(layout: Layout, processes: usize, b: Behaviour) -> anyhow::Result<()> {
    let agents = layout.agents;
    let options = Options {
        default_lease: true,
        ..Default::default()
    };
    let mut c = Caravan::start_with("bench", options).await?;
    let repo = c.seed_example_fleet().await?;
    // The sites, each with the relay replicas its agents need.
    let hq = std::fs::read_to_string(repo.work.join("fleet/site.yaml"))?;
    for (path, text) in layout.manifests(&hq) {
        repo.write(&path, &text)?;
    }
    repo.commit("The fleet's sites")?;
    // The simulated agents' Agent objects, each with its key.
    let api = c.api::<Agent>();
    futures::stream::iter(0..agents)
        .map(|i| {
            let api = api.clone();
            async move {
                let (name, key) = identity(i);
                let agent: Agent = serde_json::from_value(serde_json::json!({
                    "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
                    "metadata": { "name": name, "namespace": "bench" },
                    "spec": {
                        "site": layout.site_of(i),
                        "hostId": format!("host-{name}"),
                        "hostname": name,
                        "publicKey": signing::encode_public(&key.verifying_key()),
                    },
                }))?;
                api.create(&Default::default(), &agent).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await?;
    // Every relay process (hq's first: the branches' fetch from it), with
    // the agents it serves.
    c.relay_plaintext = true;
    let mut relays = vec![];
    for s in 0..layout.sites {
        let site = Layout::site(s);
        let secret = c.api::<Secret>().get(&format!("{site}-relay")).await?;
        let token = String::from_utf8(secret.data.context("relay Secret")?["token"].0.clone())?;
        if s > 0 {
            // The branches fetch from hq's relay, which serves plain HTTP here.
            c.relay_args = vec!["--insecure".into()];
        }
        for (r, served) in split(layout.agents_of(s), layout.replicas())
            .into_iter()
            .enumerate()
        {
            let relay = match r {
                0 => c.start_relay(&site).await?,
                r => c.start_relay_replica(&site, r).await?,
            };
            let pid = c.relays.last().context("a relay started")?.pid();
            relays.push((relay.url, pid, token.clone(), served));
        }
    }
    let generators_per_relay = processes.div_ceil(relays.len()).max(1);

    // The generators, their lines gathered into one channel.
    let (tx, mut said) = tokio::sync::mpsc::unbounded_channel();
    let mut generators = vec![];
    for (url, _, token, served) in &relays {
        for part in split(served.clone(), generators_per_relay) {
            let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
            cmd.arg("generate")
                .arg(url)
                .args([part.start.to_string(), part.len().to_string()])
                .args(b.args())
                .env(TOKEN_ENV, token)
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn()?;
            let mut lines =
                tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let words: Vec<&str> = line.splitn(3, ' ').collect();
                    let msg = match words[..] {
                        ["parked", _] => Said::Parked,
                        ["done", job, rest] => Said::Done {
                            job: job.to_string(),
                            at_ms: rest
                                .split(' ')
                                .nth(1)
                                .and_then(|t| t.parse().ok())
                                .unwrap_or(0),
                        },
                        ["trouble", _, why] => Said::Trouble(why.to_string()),
                        _ => continue,
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Said::Exited);
            });
            generators.push(child);
        }
    }
    drop(tx);
    let started = Instant::now();
    let failing = (0..agents).filter(|i| fails(*i, b)).count();
    let all = format!("{}/{agents}", agents - failing);
    let (mut parked, mut warm) = (0, 0);
    let mut troubles = Troubles::default();
    while parked < agents || warm < agents {
        match tokio::time::timeout(T, said.recv()).await {
            Ok(Some(Said::Parked)) => parked += 1,
            Ok(Some(Said::Done { job, .. })) if job.ends_with("/hello-everywhere") => warm += 1,
            Ok(Some(Said::Trouble(why))) => troubles.add(why),
            Ok(Some(Said::Done { .. })) => {}
            _ => anyhow::bail!(
                "the generators stopped: {parked} parked, {warm} installed hello; tried again: {troubles}"
            ),
        }
    }
    let warm_troubles = std::mem::take(&mut troubles);
    let warm_secs = started.elapsed().as_secs_f64();
    c.wait_job("hello-everywhere", expected_phase(b), &all, T)
        .await?;
    // Reports and status writes of the warm-up settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_before = memory_mib(c.controller.pid(), "VmRSS");
    let relays_rss: f64 = relays
        .iter()
        .map(|(_, pid, ..)| memory_mib(*pid, "VmRSS"))
        .sum();
    let generators_rss: f64 = generators
        .iter()
        .filter_map(|g| g.id())
        .map(|pid| memory_mib(pid, "VmRSS"))
        .sum();

    // The measured job: a new package for everyone at once.
    let src = c.dir.join("src/fleet-pkg");
    std::fs::create_dir_all(&src)?;
    caravan_tests::write_noise(&src.join("data.bin"), 64 << 10)?;
    c.push_package(
        &src,
        "fleet-pkg",
        "1.0.0",
        &repo.work.join("fleet/packages"),
    )?;
    repo.write(
        "fleet/fleet-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: fleet}\n\
         spec:\n  packages: [{name: fleet-pkg}]\n  destinations: {sites: [{name: hq, includeLower: true}]}\n  \
         rollout: {batches: [{size: 100%}]}\n",
    )?;
    let before = c.api_metrics()?;
    // The API server's health while the job runs: /readyz every second.
    let health = Arc::new(std::sync::Mutex::new(Readiness::default()));
    let asking = tokio::spawn(readiness(c.cluster.client.clone(), health.clone()));
    let committed = unix_ms();
    repo.commit("fleet-pkg for every site")?;
    let mut latencies = Vec::with_capacity(agents);
    while latencies.len() < agents {
        match tokio::time::timeout(T, said.recv()).await {
            Ok(Some(Said::Done { job, at_ms })) if job.ends_with("/fleet") => {
                latencies.push(at_ms.saturating_sub(committed) as f64 / 1000.0)
            }
            Ok(Some(Said::Trouble(why))) => troubles.add(why),
            Ok(Some(Said::Done { .. } | Said::Parked)) => {}
            _ => anyhow::bail!(
                "the generators stopped: {} of {agents} done; tried again: {troubles}",
                latencies.len()
            ),
        }
    }
    let job = c.wait_job("fleet", expected_phase(b), &all, T).await;
    let status_secs = (unix_ms() - committed) as f64 / 1000.0;
    job?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    asking.abort();
    let health = std::mem::take(&mut *health.lock().expect("lock poisoned"));
    let after = c.api_metrics()?;
    let delta = |f: &dyn Fn(&str) -> bool| after.writes_since(&before, f) / agents as f64;
    let latency = |verbs, q| after.latency_since(&before, verbs, q);
    let etcd_mib = c
        .cluster
        .etcd_db
        .as_ref()
        .and_then(|db| std::fs::metadata(db).ok())
        .map_or(0.0, |m| m.len() as f64 / (1 << 20) as f64);
    let rss_after = memory_mib(c.controller.pid(), "VmRSS");
    let rss_peak = memory_mib(c.controller.pid(), "VmHWM");
    let (api_rss, api_peak) = c.cluster.pid("kube-apiserver").map_or((0.0, 0.0), |pid| {
        (memory_mib(pid, "VmRSS"), memory_mib(pid, "VmHWM"))
    });
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let kib_per = |mib: f64| mib * 1024.0 / agents as f64;

    println!(
        "\n## fleet: {agents} simulated agents at {} sites ({} relay processes) by {} generator processes, poll wait {} s{}{}\n",
        layout.sites,
        relays.len(),
        generators.len(),
        b.wait,
        if b.fail_percent > 0 { format!(", {}% failing", b.fail_percent) } else { String::new() },
        if b.think_ms > 0 { format!(", think up to {} ms", b.think_ms) } else { String::new() },
    );
    println!(
        "warm-up (connect, install the example package): {warm_secs:.1} s; requests tried again: {warm_troubles}"
    );
    println!("during the job, requests tried again: {troubles}\n");
    println!(
        "| commit → agent's report p50 s | p99 s | max s | commit → job {} s | API writes per agent (Agents) | all API writes per agent |\n|---:|---:|---:|---:|---:|---:|",
        expected_phase(b)
    );
    println!(
        "| {:.1} | {:.1} | {:.1} | {status_secs:.1} | {:.2} | {:.2} |",
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
        delta(&|k| k.starts_with("agents")),
        delta(&|_| true),
    );
    println!(
        "\n| relays RSS MiB (KiB per agent) | controller RSS MiB before → after the job (peak) | API server RSS MiB (peak) | generators RSS MiB (KiB per agent) | etcd MiB |\n|---:|---:|---:|---:|---:|"
    );
    println!(
        "| {relays_rss:.0} ({:.1}) | {rss_before:.0} → {rss_after:.0} ({rss_peak:.0}) | {api_rss:.0} ({api_peak:.0}) | {generators_rss:.0} ({:.1}) | {etcd_mib:.0} |",
        kib_per(relays_rss),
        kib_per(generators_rss)
    );
    println!(
        "\nAPI server during the job: /readyz {} of {} ok, slowest answer {} ms; request latency p50 / p99 (histogram bucket bounds): writes {} / {} s, reads {} / {} s",
        health.ok,
        health.asked,
        health.slowest_ms,
        latency(WRITE_VERBS, 0.5),
        latency(WRITE_VERBS, 0.99),
        latency(READ_VERBS, 0.5),
        latency(READ_VERBS, 0.99),
    );
    Ok(())
}

/// How the API server answered `/readyz` ([`readiness`]).
#[derive(Default)]
struct Readiness {
    asked: usize,
    ok: usize,
    slowest_ms: u128,
}

/// Asks the API server's `/readyz` every second, adding to `found`, until
/// aborted.
async fn readiness(client: kube::Client, found: Arc<std::sync::Mutex<Readiness>>) {
    loop {
        let asked = Instant::now();
        let ok = match http::Request::get("/readyz").body(Vec::new()) {
            Ok(req) => client
                .request_text(req)
                .await
                .is_ok_and(|t| t.trim() == "ok"),
            Err(_) => false,
        };
        {
            let mut f = found.lock().expect("lock poisoned");
            f.asked += 1;
            f.ok += usize::from(ok);
            f.slowest_ms = f.slowest_ms.max(asked.elapsed().as_millis());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Failed requests the agents tried again, by what went wrong.
#[derive(Default)]
struct Troubles(BTreeMap<String, usize>);

impl Troubles {
    fn add(&mut self, why: String) {
        // Alike but for the agent or blob named.
        let key: String = why.chars().take(100).collect();
        *self.0.entry(key).or_default() += 1;
    }
}

impl std::fmt::Display for Troubles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: usize = self.0.values().sum();
        match self.0.iter().max_by_key(|(_, n)| **n) {
            None => write!(f, "none"),
            Some((why, n)) => write!(f, "{total} (most often, {n}x: {why})"),
        }
    }
}

/// Whether agent `i` fails its installs (a spread `fail_percent` of them).
fn fails(i: usize, b: Behaviour) -> bool {
    (i as u64 * 7919) % 100 < b.fail_percent
}

/// The phase the jobs end in: Failed when some agents fail.
fn expected_phase(b: Behaviour) -> &'static str {
    match b.fail_percent {
        0 => "Succeeded",
        _ => "Failed",
    }
}
