//! `caravan-bench-package`: pushes and distributes one large package and
//! prints throughput and peak memory of the CLI (build + push), the
//! controller (store), the relay and the agent, for 100 MiB and 1 GiB, so
//! that memory can be seen to stay flat as the package grows. Each size is
//! run three ways: the built-in cabinet, an `oci` cabinet in a registry on
//! loopback (Debian's `docker-registry`, TLS and basic auth) whose layers the
//! controller fetches, and one whose layers the relay fetches
//! (`layersFrom: Relays`).
//!
//! Run it on release builds: `make bench-package` (or
//! `cargo build --release --workspace --bins && target/release/caravan-bench-package [MiB ...]`).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use caravan_tests::{bin, procs::peak_mib, registry::Registry, Caravan};

const MIB: u64 = 1 << 20;

/// Where the package is pushed, and who fetches it from there.
#[derive(Clone, Copy, PartialEq)]
enum Cabinet {
    Builtin,
    /// A registry; the controller fetches the layer.
    Oci,
    /// A registry; the relay fetches the layer.
    OciRelays,
}

impl Cabinet {
    fn label(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Oci => "oci",
            Self::OciRelays => "oci-relays",
        }
    }
}

struct Row {
    cabinet: Cabinet,
    size_mib: u64,
    push_secs: f64,
    cli_peak: f64,
    controller_peak: f64,
    distribute_secs: f64,
    relay_peak: f64,
    agent_peak: f64,
}

async fn run(size_mib: u64, cabinet: Cabinet) -> anyhow::Result<Row> {
    let mut c = Caravan::start("bench").await?;
    let repo = c.seed_example_fleet().await?;
    let src = c.dir.join("big");
    std::fs::create_dir_all(&src)?;
    caravan_tests::write_noise(&src.join("data.bin"), size_mib * MIB)?;
    let manifests = repo.work.join("fleet/packages");
    let registry = match cabinet {
        Cabinet::Builtin => None,
        Cabinet::Oci | Cabinet::OciRelays => {
            let registry = Registry::start(&c.dir.join("registry")).await?;
            let from = match cabinet {
                Cabinet::OciRelays => "Relays",
                _ => "Controller",
            };
            let yaml = registry.connect(&mut c, "registry", "caravan/bench", from)?;
            repo.write("fleet/registry.yaml", &yaml)?;
            Some(registry)
        }
    };

    // Build + push, sampling the CLI's peak memory while it runs.
    let start = Instant::now();
    let mut cli = std::process::Command::new(bin("caravan")?);
    cli.args(["package", "push"])
        .arg(&src)
        .args(["--name", "big", "--version", "1.0.0", "--manifest-dir"])
        .arg(&manifests)
        .env("CARAVAN_SERVER", &c.api_url)
        .env("CARAVAN_UPLOAD_TOKEN", &c.upload_token)
        .env("CARAVAN_CA_FILE", &c.controller_ca_file)
        .stdout(std::process::Stdio::null());
    if let Some(registry) = &registry {
        cli.args(["--cabinet", "registry", "--registry"])
            .arg(registry.repository("caravan/bench"))
            .arg("--registry-ca-file")
            .arg(&registry.ca_file)
            .args(["--registry-username", &registry.username])
            .env("CARAVAN_REGISTRY_PASSWORD", &registry.password);
    }
    let mut cli = cli.spawn()?;
    let mut cli_peak: f64 = 0.0;
    let status = loop {
        cli_peak = cli_peak.max(peak_mib(cli.id()));
        if let Some(status) = cli.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    anyhow::ensure!(status.success(), "caravan package push failed");
    let push_secs = start.elapsed().as_secs_f64();

    repo.write(
        "fleet/big-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: big}\nspec:\n  packages: [{name: big}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    repo.commit("Distribute big")?;
    let relay = c.start_relay("hq").await?;
    let start = Instant::now();
    c.start_agent("agent-1", &relay)?;
    c.wait_job("big", "Succeeded", "1/1", Duration::from_secs(1800))
        .await?;
    let distribute_secs = start.elapsed().as_secs_f64();
    let installed = std::fs::metadata(c.agents[0].install_root.join("big/data.bin"))?.len();
    anyhow::ensure!(installed == size_mib * MIB, "installed {installed} bytes");
    Ok(Row {
        cabinet,
        size_mib,
        push_secs,
        cli_peak,
        controller_peak: peak_mib(c.controller.pid()),
        distribute_secs,
        relay_peak: peak_mib(c.relays[0].pid()),
        agent_peak: peak_mib(c.agents[0].proc.pid()),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .context("sizes in MiB")?;
    let sizes = if sizes.is_empty() {
        vec![100, 1024]
    } else {
        sizes
    };
    println!("caravan-bench-package: build+push, then distribute to one agent through one relay (binaries in {})", caravan_tests::bin_dir().display());
    println!(
        "{:>10} {:>9} | {:>12} {:>12} {:>15} | {:>15} {:>13} {:>13}",
        "cabinet",
        "size MiB",
        "push MiB/s",
        "CLI peak MiB",
        "ctrl peak MiB",
        "distrib MiB/s",
        "relay pk MiB",
        "agent pk MiB"
    );
    let mut rows = Vec::new();
    for cabinet in [Cabinet::Builtin, Cabinet::Oci, Cabinet::OciRelays] {
        for &size in &sizes {
            let r = run(size, cabinet)
                .await
                .with_context(|| format!("benchmark of {size} MiB, {}", cabinet.label()))?;
            print_row(&r);
            rows.push(r);
        }
    }
    for cabinet in [Cabinet::Builtin, Cabinet::Oci, Cabinet::OciRelays] {
        let mine: Vec<_> = rows.iter().filter(|r| r.cabinet == cabinet).collect();
        if let [small, .., large] = mine.as_slice() {
            println!(
                "{}: peak memory, {} MiB vs {} MiB package ({}x the data): CLI {:.2}x, controller {:.2}x, relay {:.2}x, agent {:.2}x",
                cabinet.label(),
                large.size_mib,
                small.size_mib,
                large.size_mib / small.size_mib.max(1),
                large.cli_peak / small.cli_peak,
                large.controller_peak / small.controller_peak,
                large.relay_peak / small.relay_peak,
                large.agent_peak / small.agent_peak
            );
        }
    }
    Ok(())
}

fn print_row(r: &Row) {
    println!(
        "{:>10} {:>9} | {:>12.1} {:>12.1} {:>15.1} | {:>15.1} {:>13.1} {:>13.1}",
        r.cabinet.label(),
        r.size_mib,
        r.size_mib as f64 / r.push_secs,
        r.cli_peak,
        r.controller_peak,
        r.size_mib as f64 / r.distribute_secs,
        r.relay_peak,
        r.agent_peak
    );
}
