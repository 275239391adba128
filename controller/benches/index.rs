//! What one computation of the distribution index costs the controller
//! (issue 14: a change that concerns one agent should cost about one
//! agent's worth of work): the engine's whole path from the caches to what
//! relays are served — the index (plan, desired state, statuses), signing
//! each agent's document (or finding it unchanged) and the site feeds —
//! for a fleet of AGENTS agents at SITES sites with a job to every site, as
//! it is first computed, computed again with nothing changed, and after a
//! change that concerns one agent (a job naming it; its report of an
//! install).
//!
//! `cargo bench -p caravan-controller --features fixtures --bench index [-- AGENTS SITES]`
//! (or `make bench-index`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use caravan_api::{v1alpha1::*, wire::AssignmentPhase};
use caravan_controller::{
    index::{self, fixtures::*, ArtifactState, DesiredIndex},
    trust::{Signer, TrustKeys},
};

struct Fleet {
    sites: Vec<Arc<Site>>,
    agents: Vec<Arc<Agent>>,
    jobs: Vec<Arc<DistributionJob>>,
    packages: Vec<Arc<Package>>,
    cabinets: Vec<Arc<Cabinet>>,
    artifacts: index::Artifacts,
}

/// Time spent in each stage of one computation.
#[derive(Default)]
struct Stages {
    index: Duration,
    sign: Duration,
    feed: Duration,
    /// Sites whose feed changed.
    changed: usize,
}

struct Engine {
    signer: Signer,
    served: DesiredIndex,
}

impl Engine {
    /// What the engine does after a burst of changes, stage by stage.
    fn compute(&mut self, f: &Fleet) -> Stages {
        let now = now();
        let start = Instant::now();
        let out = index::compute(&index::Inputs {
            now,
            sites: &f.sites,
            agents: &f.agents,
            jobs: &f.jobs,
            packages: &f.packages,
            cabinets: &f.cabinets,
            artifacts: &f.artifacts,
            unreachable: &HashMap::new(),
        });
        let index = start.elapsed();
        let start = Instant::now();
        let signed = self.signer.sign_sites(out.desired, now);
        let sign = start.elapsed();
        let start = Instant::now();
        let next = self.served.next(signed);
        let feed = start.elapsed();
        let changed = next.as_ref().map_or(0, |n| {
            n.sites
                .iter()
                .filter(|(k, f)| self.served.sites.get(*k).is_none_or(|o| !Arc::ptr_eq(o, f)))
                .count()
        });
        if let Some(next) = next {
            self.served = next;
        }
        std::hint::black_box(out.jobs);
        Stages {
            index,
            sign,
            feed,
            changed,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let agents = args.first().copied().unwrap_or(20_000);
    let sites = args.get(1).copied().unwrap_or(5);

    let site_names: Vec<String> = (0..sites).map(|i| format!("site-{i}")).collect();
    let mut fleet = Fleet {
        sites: all(site_names.iter().map(|s| site(s))),
        agents: (0..agents)
            .map(|i| Arc::new(agent(&format!("a{i}"), &site_names[i % sites])))
            .collect(),
        jobs: all(site_names
            .iter()
            .map(|s| job(&format!("to-{s}"), &["hello"]).to_site(s))),
        packages: all([package("hello", "1.0.0"), package("extra", "1.0.0")]),
        cabinets: all([cabinet("main")]),
        artifacts: ["hello-1.0.0", "extra-1.0.0"]
            .into_iter()
            .map(|p| (key(p), ArtifactState::Stored(10)))
            .collect(),
    };
    let dir = tempfile::tempdir()?;
    let keys = TrustKeys::load_or_create(dir.path())?;
    let mut engine = Engine {
        signer: Signer::new(&keys, Duration::from_secs(7 * 86400)),
        served: DesiredIndex::default(),
    };

    let rss_fleet = rss_mib();
    let mut rows = vec![("first computation", engine.compute(&fleet))];
    let rss_index = rss_mib();
    rows.push(("nothing changed", engine.compute(&fleet)));
    // A job for one agent.
    let mut jobs = fleet.jobs.clone();
    jobs.push(Arc::new(job("one", &["extra"]).to_agent("a0")));
    fleet.jobs = jobs;
    rows.push(("a job for one agent", engine.compute(&fleet)));
    // One agent reports its install (its Agent's status changed).
    let reported = Agent::clone(&fleet.agents[1]).reporting(
        "to-site-1",
        "hello",
        digest_of("hello", "1.0.0"),
        AssignmentPhase::Succeeded,
        "",
    );
    fleet.agents[1] = Arc::new(reported);
    rows.push(("one agent's report", engine.compute(&fleet)));

    println!("{agents} agents at {sites} sites, a job to every site\n");
    println!(
        "| computation | index ms | sign ms | feeds ms | total ms | µs per agent | sites changed |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for (what, s) in rows {
        let total = s.index + s.sign + s.feed;
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
            s.index.as_secs_f64() * 1e3,
            s.sign.as_secs_f64() * 1e3,
            s.feed.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e6 / agents as f64,
            s.changed
        );
    }
    println!(
        "\nRSS: {rss_fleet:.0} MiB with the caches, {rss_index:.0} MiB with the index served too ({:.1} KiB per agent)",
        (rss_index - rss_fleet) * 1024.0 / agents as f64
    );
    Ok(())
}

/// This process's resident memory.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
