//! `caravan-bench-relay`: a relay on loopback, against nginx (Debian's) where
//! there is a peer to compare with, everything measured in one run.
//!
//! ```text
//! caravan-bench-relay large [SIZE_MIB=1024] [CLIENTS=64]
//!     the same cached blob to concurrent clients, relay vs nginx (same file),
//!     over plain HTTP and over HTTPS: throughput and server CPU-seconds per GiB
//! caravan-bench-relay small [SECONDS=5] [CLIENTS=32]
//!     desired-state answers and 304 revalidations per server CPU-second,
//!     relay vs nginx serving a static file of the same bytes
//! caravan-bench-relay fanout [CLIENTS=1000] [SIZE_MIB=100]
//!     concurrent downloads of a cold blob: upstream bytes, wall time, peak memory
//! caravan-bench-relay longpoll [AGENTS=20000]
//!     agents long-polling: memory per waiting agent; a change for one agent
//!     and one for all: change to answer, long-polls answered, CPU spent
//! ```
//!
//! With no arguments it runs all four with their defaults (`make bench-relay`).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use caravan_api::v1alpha1::{Agent, DistributionJob, Package};
use caravan_tests::{
    free_port,
    procs::{cpu_seconds, memory_mib, peak_mib},
    wait_for, Caravan, Proc, RelayInfo,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use reqwest::{header, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const GIB: f64 = (1u64 << 30) as f64;
const SITE: &str = "hq";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Thousands of connections on both ends of loopback (the relay inherits it).
    let nofile = rustix::process::Rlimit {
        current: Some(65536),
        maximum: Some(65536),
    };
    if rustix::process::setrlimit(rustix::process::Resource::Nofile, nofile).is_err() {
        // Not allowed here: up to the hard limit, then.
        let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        limit.current = limit.maximum;
        rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)?;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> anyhow::Result<u64> {
        args.get(i)
            .map_or(Ok(default), |a| a.parse())
            .with_context(|| format!("argument {i}: a number"))
    };
    match args.first().map(String::as_str) {
        Some("large") => large(arg(1, 1024)?, arg(2, 64)? as usize).await,
        Some("small") => small(arg(1, 5)?, arg(2, 32)? as usize).await,
        Some("fanout") => fanout(arg(1, 1000)? as usize, arg(2, 100)?).await,
        Some("longpoll") => longpoll(arg(1, 20_000)? as usize).await,
        None => {
            large(1024, 64).await?;
            small(5, 32).await?;
            fanout(1000, 100).await?;
            longpoll(20_000).await
        }
        Some(other) => {
            anyhow::bail!("unknown benchmark {other:?}: large, small, fanout or longpoll")
        }
    }
}

/// Caravan with the example fleet, `agents` Agent objects at hq (named
/// `<prefix>-<i>`), and hq's relay started with `relay_args`.
struct Setup {
    c: Caravan,
    repo: caravan_tests::git::GitRepo,
    relay: RelayInfo,
    relay_pid: u32,
    /// hq's relay token, from which agent tokens are made.
    relay_token: String,
}

impl Setup {
    /// A relay serving plain HTTP, as nginx does where they are compared.
    async fn start(agents: usize, prefix: &str, relay_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(agents, prefix, relay_args, false).await
    }

    /// A relay serving HTTPS (with the certificate the chart gives it) if
    /// `https`, else plain HTTP.
    async fn start_with(
        agents: usize,
        prefix: &str,
        relay_args: &[&str],
        https: bool,
    ) -> anyhow::Result<Self> {
        let mut c = Caravan::start("bench").await?;
        let repo = c.seed_example_fleet().await?;
        create_agents(&c, prefix, agents).await?;
        c.relay_args = relay_args.iter().map(|a| a.to_string()).collect();
        c.relay_plaintext = !https;
        c.agent_args.push("--insecure".into());
        let relay = c.start_relay(SITE).await?;
        let secret = c.api::<Secret>().get(&format!("{SITE}-relay")).await?;
        let relay_token = String::from_utf8(secret.data.unwrap()["token"].0.clone())?;
        let relay_pid = c.relays[0].pid();
        Ok(Self {
            c,
            repo,
            relay,
            relay_pid,
            relay_token,
        })
    }

    fn token(&self, agent: &str) -> String {
        caravan_net::agent_tokens::issue(&self.relay_token, agent, None)
    }

    /// Pushes a package of `size_mib` MiB of noise and a job sending it to hq.
    async fn big_package(&self, size_mib: u64) -> anyhow::Result<Package> {
        let src = self.c.dir.join("big");
        std::fs::create_dir_all(&src)?;
        caravan_tests::write_noise(&src.join("data.bin"), size_mib << 20)?;
        self.c
            .push_package(&src, "big", "1.0.0", &self.repo.work.join("fleet/packages"))?;
        self.repo.write(
            "fleet/big-job.yaml",
            "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: big}\nspec:\n  packages: [{name: big}]\n  destinations: {sites: [{name: hq}]}\n  rollout: {batches: [{size: 100%}]}\n",
        )?;
        self.repo.commit("big for hq")?;
        wait_for("package big", Duration::from_secs(120), || async {
            Ok(self.c.api::<Package>().get_opt("big-1.0.0").await?)
        })
        .await
    }

    /// The URL of a blob at the relay, once the relay serves it to `agent`
    /// from its cache (fetched whole and verified).
    async fn blob_url(&self, pkg: &Package, agent: &str) -> anyhow::Result<String> {
        let digest = &pkg.spec.artifact.digest;
        let url = format!("{}/v1/blobs/{digest}", self.relay.url);
        let token = self.token(agent);
        let cached = self.relay.cache_dir.join("sha256").join(digest.hex());
        wait_for(
            "the relay to serve the blob from its cache",
            Duration::from_secs(600),
            || async {
                let res = caravan_tests::http()
                    .head(&url)
                    .bearer_auth(&token)
                    .send()
                    .await?;
                Ok((res.status().is_success() && cached.exists()).then_some(()))
            },
        )
        .await?;
        Ok(url)
    }

    /// Starts nginx serving `root` (its config under the Caravan directory),
    /// over HTTPS with the relay's certificate if the relay serves HTTPS.
    async fn nginx(&self, root: &Path) -> anyhow::Result<(Proc, String)> {
        let nginx = Path::new("/usr/sbin/nginx");
        anyhow::ensure!(
            nginx.exists(),
            "nginx is not installed (apt-get install nginx)"
        );
        let port = free_port();
        let dir = self.c.dir.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        let (listen, scheme) = match &self.relay.tls {
            Some((cert, key)) => (
                format!(
                    "listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {};",
                    cert.display(),
                    openssl_key(key, &dir)?.display()
                ),
                "https",
            ),
            None => (format!("listen 127.0.0.1:{port};"), "http"),
        };
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  server {{ {listen} root {root}; }}\n}}\n",
                d = dir.display(),
                root = root.display()
            ),
        )?;
        let proc = Proc::spawn(
            "nginx",
            nginx,
            &[
                "-c",
                &conf.display().to_string(),
                "-p",
                &dir.display().to_string(),
            ],
            &[],
            &self.c.dir,
        )?;
        let url = format!("{scheme}://127.0.0.1:{port}");
        wait_for("nginx", Duration::from_secs(30), || async {
            Ok(caravan_tests::http()
                .get(&url)
                .send()
                .await
                .ok()
                .map(|_| ()))
        })
        .await?;
        Ok((proc, url))
    }
}

/// The relay's Ed25519 key in a form Debian's OpenSSL 3.0 reads (PKCS#8
/// v1: without the public key, which it does not parse), written in `dir`.
fn openssl_key(key: &Path, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use base64::Engine as _;
    use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, KeypairBytes};
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = std::fs::read_to_string(key)?;
    let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut pair = KeypairBytes::from_pkcs8_der(&b64.decode(der)?)
        .map_err(|e| anyhow::anyhow!("the relay's key: {e}"))?;
    pair.public_key = None;
    let der = pair
        .to_pkcs8_der()
        .map_err(|e| anyhow::anyhow!("the relay's key: {e}"))?;
    let path = dir.join("tls.key");
    std::fs::write(
        &path,
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64.encode(der.as_bytes())
        ),
    )?;
    Ok(path)
}

/// Creates Agent objects `<prefix>-0` .. at hq, as enrollment would.
async fn create_agents(c: &Caravan, prefix: &str, n: usize) -> anyhow::Result<()> {
    let api = c.api::<Agent>();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let agent: Agent = serde_json::from_value(serde_json::json!({
                    "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
                    "metadata": { "name": format!("{prefix}-{i}"), "namespace": "bench" },
                    "spec": { "site": SITE, "hostId": format!("{prefix}-host-{i:06}") },
                }))?;
                api.create(&Default::default(), &agent).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
}

/// N concurrent downloads of `url`; returns the bytes.
async fn download_all(url: &str, token: Option<&str>, clients: usize) -> anyhow::Result<u64> {
    let http = caravan_tests::http();
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
            anyhow::Ok(n)
        }
    });
    Ok(futures::future::try_join_all(tasks)
        .await?
        .into_iter()
        .sum())
}

async fn large(size_mib: u64, clients: usize) -> anyhow::Result<()> {
    for https in [false, true] {
        large_over(size_mib, clients, https).await?;
    }
    Ok(())
}

async fn large_over(size_mib: u64, clients: usize, https: bool) -> anyhow::Result<()> {
    let s = Setup::start_with(1, "client", &[], https).await?;
    let pkg = s.big_package(size_mib).await?;
    let relay_url = s.blob_url(&pkg, "client-0").await?;
    let token = s.token("client-0");
    let (nginx, nginx_base) = s.nginx(&s.relay.cache_dir.join("sha256")).await?;
    let nginx_url = format!("{nginx_base}/{}", pkg.spec.artifact.digest.hex());

    let over = if https { "HTTPS" } else { "plain HTTP" };
    println!("\n## large, {over}: {clients} concurrent clients each download the same cached {size_mib} MiB blob\n");
    println!("| server | GiB/s | seconds | CPU s per GiB |\n|---|---:|---:|---:|");
    let mut results = Vec::new();
    for (name, pid, url, token) in [
        (
            "relay",
            s.relay_pid,
            relay_url.as_str(),
            Some(token.as_str()),
        ),
        ("nginx", nginx.pid(), nginx_url.as_str(), None),
    ] {
        let cpu0 = cpu_seconds(pid);
        let start = Instant::now();
        let bytes = download_all(url, token, clients).await?;
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid) - cpu0;
        anyhow::ensure!(
            bytes == clients as u64 * pkg.spec.artifact.size,
            "{name} served {bytes} bytes"
        );
        let gib = bytes as f64 / GIB;
        println!(
            "| {name} | {:.2} | {secs:.1} | {:.3} |",
            gib / secs,
            cpu / gib
        );
        results.push((gib / secs, cpu / gib));
    }
    let (relay, nginx) = (results[0], results[1]);
    println!(
        "\nrelay / nginx: throughput {:.2}x, CPU per GiB {:.2}x (goal: >= 1.0x throughput at <= 1.0x CPU)",
        relay.0 / nginx.0,
        relay.1 / nginx.1
    );
    Ok(())
}

/// `clients` connections asking `req` again and again for `seconds`; every
/// answer must have status `expect`. Returns the answers counted.
async fn hammer(
    req: reqwest::RequestBuilder,
    expect: StatusCode,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks = (0..clients).map(|_| {
        let req = req.try_clone().expect("no streaming body");
        async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let res = req.try_clone().expect("no streaming body").send().await?;
                anyhow::ensure!(res.status() == expect, "answered {}", res.status());
                res.bytes().await?;
                n += 1;
            }
            anyhow::Ok(n)
        }
    });
    Ok(futures::future::try_join_all(tasks)
        .await?
        .into_iter()
        .sum())
}

async fn small(seconds: u64, clients: usize) -> anyhow::Result<()> {
    let s = Setup::start(1, "client", &[]).await?;
    let http = caravan_tests::http();
    let desired = format!("{}/v1/desired", s.relay.url);
    let token = s.token("client-0");
    // The agent's desired state, once it has its assignment.
    let (body, etag) = wait_for(
        "client-0's desired state",
        Duration::from_secs(60),
        || async {
            let res = http.get(&desired).bearer_auth(&token).send().await?;
            let etag = res.headers()[header::ETAG].to_str()?.to_string();
            let body = res.bytes().await?;
            let d = caravan_tests::fixtures::desired_of(&body)?;
            Ok((!d.assignments.is_empty()).then_some((body, etag)))
        },
    )
    .await?;
    // nginx serves the same bytes as a static file.
    let root = s.c.dir.join("static");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("desired.json"), &body)?;
    let (nginx, nginx_base) = s.nginx(&root).await?;
    let static_url = format!("{nginx_base}/desired.json");
    let static_etag = http.get(&static_url).send().await?.headers()[header::ETAG]
        .to_str()?
        .to_string();

    println!("\n## small: {clients} keep-alive connections for {seconds} s each; the answer is {} bytes\n", body.len());
    println!("| answer | server | answers/s | server CPU s | answers per CPU-second |\n|---|---|---:|---:|---:|");
    for (what, expect, relay_req, nginx_req) in [
        (
            "desired state (200)",
            StatusCode::OK,
            http.get(&desired).bearer_auth(&token),
            http.get(&static_url),
        ),
        (
            "revalidation (304)",
            StatusCode::NOT_MODIFIED,
            http.get(&desired)
                .bearer_auth(&token)
                .header(header::IF_NONE_MATCH, &etag),
            http.get(&static_url)
                .header(header::IF_NONE_MATCH, &static_etag),
        ),
    ] {
        let mut per_cpu = Vec::new();
        for (name, pid, req) in [
            ("relay", s.relay_pid, relay_req),
            ("nginx", nginx.pid(), nginx_req),
        ] {
            let cpu0 = cpu_seconds(pid);
            let start = Instant::now();
            let n = hammer(req, expect, clients, seconds).await?;
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_seconds(pid) - cpu0;
            println!(
                "| {what} | {name} | {:.0} | {cpu:.2} | {:.0} |",
                n as f64 / secs,
                n as f64 / cpu
            );
            per_cpu.push(n as f64 / cpu);
        }
        println!(
            "\n{what}: relay / nginx answers per CPU-second {:.2}x\n",
            per_cpu[0] / per_cpu[1]
        );
    }
    Ok(())
}

async fn fanout(clients: usize, size_mib: u64) -> anyhow::Result<()> {
    // A 100 MiB/s link upstream (a WAN), so every client asks while the blob is still cold.
    let rate = 100u64 << 20;
    let s = Setup::start(
        clients,
        "fan",
        &["--upstream-rate-limit", &rate.to_string()],
    )
    .await?;
    let pkg = s.big_package(size_mib).await?;
    let url = format!("{}/v1/blobs/{}", s.relay.url, pkg.spec.artifact.digest);
    let cached = s
        .relay
        .cache_dir
        .join("sha256")
        .join(pkg.spec.artifact.digest.hex());
    anyhow::ensure!(!cached.exists(), "the blob must be cold");
    let http = caravan_tests::http_builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let start = Instant::now();
    let tasks = (0..clients).map(|i| {
        let (http, url, token) = (http.clone(), url.clone(), s.token(&format!("fan-{i}")));
        async move {
            // Asks as soon as the relay knows the blob is this agent's.
            let res = loop {
                let res = http.get(&url).bearer_auth(&token).send().await?;
                if res.status() != StatusCode::FORBIDDEN {
                    break res.error_for_status()?;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let mut body = res.bytes_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                n += chunk?.len() as u64;
            }
            anyhow::Ok(n)
        }
    });
    let bytes: u64 = futures::future::try_join_all(tasks)
        .await?
        .into_iter()
        .sum();
    let secs = start.elapsed().as_secs_f64();
    let size = pkg.spec.artifact.size;
    anyhow::ensure!(bytes == clients as u64 * size, "served {bytes} bytes");
    let metric = |name: &'static str| caravan_tests::metric(&s.relay.url, name);
    let upstream = metric("caravan_relay_upstream_bytes_total").await?;
    let hello =
        s.c.api::<Package>()
            .get("hello-1.0.0")
            .await?
            .spec
            .artifact
            .size as f64;
    let misses = metric("caravan_relay_cache_misses_total").await?;
    println!("\n## fanout: {clients} concurrent downloads of a cold {size_mib} MiB blob, upstream limited to {} MiB/s\n", rate >> 20);
    println!("| upstream bytes (x blob) | served GiB | wall s | GiB/s | asked while cold | relay peak MiB |\n|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} | {:.1} | {secs:.1} | {:.2} | {misses:.0} of {clients} | {:.1} |",
        (upstream - hello) / size as f64,
        bytes as f64 / GIB,
        bytes as f64 / GIB / secs,
        peak_mib(s.relay_pid)
    );
    Ok(())
}

/// One simulated agent on a raw HTTP/1.1 connection: reads its desired
/// state, then long-polls with its ETag, sending `(agent, when)` on
/// `answers` for every new state, and waits again.
async fn poller(
    agent: usize,
    addr: std::net::SocketAddr,
    token: String,
    connecting: Arc<tokio::sync::Semaphore>,
    parked: Arc<AtomicUsize>,
    answers: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
) -> anyhow::Result<()> {
    let permit = connecting.acquire().await?;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let mut conn = BufReader::new(stream);
    let ask = |etag: Option<&str>| {
        format!(
            "GET /v1/desired{} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {token}\r\n\
             {}: {}\r\n{}\r\n",
            if etag.is_some() { "?wait=300" } else { "" },
            caravan_api::skew::VERSION_HEADER,
            caravan_api::RELEASE,
            etag.map(|e| format!("If-None-Match: {e}\r\n"))
                .unwrap_or_default()
        )
    };
    conn.get_mut().write_all(ask(None).as_bytes()).await?;
    let (status, mut etag) = read_response(&mut conn).await?;
    anyhow::ensure!(status == 200, "desired state: {status}");
    let mut first = Some(permit);
    loop {
        conn.get_mut()
            .write_all(ask(Some(&etag)).as_bytes())
            .await?;
        if first.take().is_some() {
            parked.fetch_add(1, Ordering::Relaxed);
        }
        conn.fill_buf().await?;
        let answered = Instant::now();
        let (status, new_etag) = read_response(&mut conn).await?;
        anyhow::ensure!(
            status == 200 && new_etag != etag,
            "long-poll answered {status}"
        );
        etag = new_etag;
        if answers.send((agent, answered)).is_err() {
            return Ok(());
        }
    }
}

/// Reads one HTTP/1.1 response; returns its status and ETag, skipping the body.
async fn read_response(
    conn: &mut BufReader<tokio::net::TcpStream>,
) -> anyhow::Result<(u16, String)> {
    let mut line = String::new();
    let (mut status, mut etag, mut len) = (0, String::new(), 0usize);
    loop {
        line.clear();
        anyhow::ensure!(conn.read_line(&mut line).await? > 0, "connection closed");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(code) = l.strip_prefix("HTTP/1.1 ") {
            status = code.get(..3).unwrap_or_default().parse()?;
        } else if let Some((k, v)) = l.split_once(": ") {
            match k.to_ascii_lowercase().as_str() {
                "etag" => etag = v.to_string(),
                "content-length" => len = v.parse()?,
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await?;
    Ok((status, etag))
}

async fn longpoll(agents: usize) -> anyhow::Result<()> {
    // Each waiting agent is a socket at both ends; leave room for the rest.
    let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX) as usize;
    let agents = if agents + 200 > fds {
        println!("\n(open files are limited to {fds} on this machine, and not to be raised: {} agents instead of {agents})", fds - 200);
        fds - 200
    } else {
        agents
    };
    let s = Setup::start(agents, "lp", &[]).await?;
    let http = caravan_tests::http();
    // Every agent has its assignment at the relay.
    let last = s.token(&format!("lp-{}", agents - 1));
    wait_for(
        "the relay to know every agent",
        Duration::from_secs(600),
        || async {
            let body = http
                .get(format!("{}/v1/desired", s.relay.url))
                .bearer_auth(&last)
                .send()
                .await?
                .bytes()
                .await?;
            let d = caravan_tests::fixtures::desired_of(&body)?;
            Ok((!d.assignments.is_empty()).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = memory_mib(s.relay_pid, "VmRSS");

    let addr: std::net::SocketAddr = s.relay.url.trim_start_matches("http://").parse()?;
    let parked = Arc::new(AtomicUsize::new(0));
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut pollers = tokio::task::JoinSet::new();
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..agents {
        let token = s.token(&format!("lp-{i}"));
        let (connecting, parked, tx) = (connecting.clone(), parked.clone(), tx.clone());
        pollers.spawn(poller(i, addr, token, connecting, parked, tx));
    }
    drop(tx);
    while parked.load(Ordering::Relaxed) < agents {
        // A poller that ended before the change failed: say why.
        if let Some(r) = pollers.try_join_next() {
            r??;
            anyhow::bail!("a poller ended before anything changed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(
        answers.try_recv().is_err(),
        "a long-poll was answered before anything changed"
    );
    let waiting_rss = memory_mib(s.relay_pid, "VmRSS");
    let controller_pid = s.c.controller.pid();
    let cpu = || (cpu_seconds(controller_pid), cpu_seconds(s.relay_pid));
    // The controller's recomputes: how many, and their time in all.
    let engine = || async {
        let m = |name: &'static str| caravan_tests::waits::metric(&s.c.api_url, name);
        anyhow::Ok((
            m(r#"caravan_reconcile_duration_seconds_count{kind="Engine"}"#).await?,
            m(r#"caravan_reconcile_duration_seconds_sum{kind="Engine"}"#).await?,
        ))
    };

    // A change that concerns one agent (a job naming it): only its
    // long-poll is answered, the others keep waiting.
    let job = |name: &str, destinations: serde_json::Value| {
        serde_json::from_value::<DistributionJob>(serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "DistributionJob",
            "metadata": { "name": name, "namespace": "bench" },
            "spec": {
                "packages": [{"name": "hello"}],
                "destinations": destinations,
                "rollout": {"batches": [{"size": "100%"}]},
            },
        }))
    };
    let jobs = s.c.api::<DistributionJob>();
    let (cpu0, engine0, changed) = (cpu(), engine().await?, Instant::now());
    let one = job("lp-one", serde_json::json!({"agents": ["lp-0"]}))?;
    jobs.create(&Default::default(), &one).await?;
    let (agent, at) = answers.recv().await.context("the pollers ended")?;
    anyhow::ensure!(agent == 0, "agent lp-{agent} was answered, not lp-0");
    let one = at.duration_since(changed).as_secs_f64() * 1000.0;
    // Whatever else the change costs, it has the time to happen.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu1, engine1) = (cpu(), engine().await?);
    let mut others = 0;
    while answers.try_recv().is_ok() {
        others += 1;
    }

    // A change that concerns every agent: a new job for the site.
    let changed = Instant::now();
    let site = job("lp-site", serde_json::json!({"sites": [{"name": SITE}]}))?;
    jobs.create(&Default::default(), &site).await?;
    let mut latencies = Vec::with_capacity(agents);
    while latencies.len() < agents {
        let (_, at) = answers.recv().await.context("the pollers ended")?;
        latencies.push(at.duration_since(changed).as_secs_f64() * 1000.0);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu2, engine2) = (cpu(), engine().await?);
    pollers.abort_all();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!("\n## longpoll: {agents} agents long-polling one relay; a job for one of them, then one for their site\n");
    println!("| relay RSS idle MiB | with agents waiting MiB | KiB per waiting agent |\n|---:|---:|---:|");
    println!(
        "| {idle_rss:.1} | {waiting_rss:.1} | {:.1} |",
        (waiting_rss - idle_rss) * 1024.0 / agents as f64,
    );
    println!("\n| change | long-polls answered | change→answer p50 ms | p99 ms | max ms | controller CPU s | recomputes, ms each | relay CPU s |\n|---|---:|---:|---:|---:|---:|---:|---:|");
    let recomputes = |(n0, s0): (f64, f64), (n1, s1): (f64, f64)| {
        format!(
            "{}, {:.0}",
            n1 - n0,
            (s1 - s0) * 1000.0 / (n1 - n0).max(1.0)
        )
    };
    println!(
        "| a job for one agent | {} | {one:.0} | {one:.0} | {one:.0} | {:.2} | {} | {:.2} |",
        1 + others,
        cpu1.0 - cpu0.0,
        recomputes(engine0, engine1),
        cpu1.1 - cpu0.1
    );
    println!(
        "| a job for the site | {agents} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {:.2} |",
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
        cpu2.0 - cpu1.0,
        recomputes(engine1, engine2),
        cpu2.1 - cpu1.1
    );
    Ok(())
}
