//! What signing desired state costs (issue 10): the controller's signing
//! throughput in documents per second — for documents that changed (an
//! ed25519 signature each) and for unchanged ones (a content hash each,
//! the signature reused) — against the peer of serializing the same
//! documents unsigned with their assignments in them, as the controller
//! did before it signed them, and before they named their jobs'
//! assignment lists by digest; the agent's time to verify one document
//! (its lists included); and what a signed report costs the agent that
//! signs it and the controller that verifies it.
//!
//! `cargo bench -p caravan-controller --bench signing [-- AGENTS ASSIGNMENTS]`
//! (or `make bench-signing`).

use std::{collections::HashMap, hint::black_box, time::Instant};

use caravan_api::{
    signing,
    trust::{pin, verify_desired},
    v1alpha1::{InstallSpec, JobAction},
    wire::{AgentDesired, AgentServed, Assignment, SiteDesired},
    Digest,
};
use caravan_controller::{
    index::{AgentPlan, Assigned, DesiredIndex},
    trust::{Signer, TrustKeys},
};
use ed25519_dalek::SigningKey;

const SITES: usize = 10;

fn documents(
    agents: usize,
    assignments: usize,
) -> HashMap<(String, String), SiteDesired<AgentPlan>> {
    let release = SigningKey::from_bytes(&[9; 32]);
    let packages: Vec<Assignment> = (0..assignments)
        .map(|i| {
            let install = InstallSpec::default();
            let digest = Digest::of(format!("package-{i}").as_bytes());
            let (package, version) = (format!("package-{i}"), format!("1.{i}.0"));
            let sig = signing::sign(
                &release,
                &signing::Signed {
                    name: &package,
                    version: &version,
                    digest: &digest,
                    size: 50 << 20,
                    install: &install,
                },
            );
            Assignment {
                job: format!("job-{i}"),
                action: JobAction::Install,
                package,
                version,
                digest,
                size: 50 << 20,
                install,
                signatures: vec![sig],
                require_signature: true,
                repair: false,
                allow_downgrade: false,
                retries: 2,
                retry_generation: 0,
                retry_excluded: false,
                superseded_by: None,
                schedule: Default::default(),
                optional: false,
                deferral: None,
                required_by: vec![],
            }
        })
        .collect();
    // Shared by every agent, as a job's assignments are.
    let packages = Assigned::new(packages);
    let mut sites: HashMap<_, SiteDesired<AgentPlan>> = HashMap::new();
    for n in 0..agents {
        let site = format!("site-{}", n % SITES);
        let agent = format!("endpoint-{n:06}");
        let doc = AgentPlan {
            agent: agent.clone(),
            assigned: vec![packages.clone()],
            ..Default::default()
        };
        sites
            .entry(("fleet".into(), site.clone()))
            .or_insert_with(|| SiteDesired {
                site,
                lists: [packages.sent().clone()].into(),
                ..Default::default()
            })
            .agents
            .insert(agent, doc);
    }
    sites
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let agents = args.first().copied().unwrap_or(10_000);
    let assignments = args.get(1).copied().unwrap_or(10);
    let dir = tempfile::tempdir()?;
    let keys = TrustKeys::load_or_create(dir.path())?;
    let docs = documents(agents, assignments);
    let now = chrono::Utc::now();

    // Peer: the same site documents serialized unsigned, each with its
    // assignments, as served before.
    let unsigned_docs: Vec<SiteDesired<AgentDesired>> = docs
        .values()
        .map(|s| {
            s.clone().map_agents(|_, plan, _| AgentDesired {
                agent: plan.agent.clone(),
                assignments: plan.assignments().cloned().collect(),
                hold: plan.hold.clone(),
                ..Default::default()
            })
        })
        .collect();
    let start = Instant::now();
    for site in &unsigned_docs {
        black_box(serde_json::to_vec(site)?);
    }
    let unsigned = start.elapsed().as_secs_f64();
    let unsigned_bytes: usize = unsigned_docs
        .iter()
        .flat_map(|s| s.agents.values())
        .map(|d| serde_json::to_vec(d).map(|b| b.len()).unwrap_or(0))
        .sum();
    drop(unsigned_docs);

    let mut signer = Signer::new(&keys, std::time::Duration::from_secs(7 * 86400));
    let again = docs.clone();
    let mut one_changed = docs.clone();
    let start = Instant::now();
    let signed = signer.sign_sites(docs, now);
    let (key, site) = signed.iter().next().expect("a site");
    let (key, (name, envelope)) = (key.clone(), site.agents.iter().next().expect("an agent"));
    // What its relay serves the agent: its document and the lists it names.
    let served = AgentServed {
        document: envelope.0.envelope.clone(),
        lists: envelope
            .0
            .lists
            .iter()
            .map(|d| (*d, site.lists[d].clone()))
            .collect(),
    };
    let (name, roots) = (name.clone(), site.roots.clone());
    let index = DesiredIndex::default().next(signed).expect("new sites");
    let cold = start.elapsed().as_secs_f64();
    let start = Instant::now();
    assert!(index.next(signer.sign_sites(again, now)).is_none());
    let warm = start.elapsed().as_secs_f64();

    // A relay's answers: the whole site, or one agent's change since the
    // revision it holds (its document changed, everything else as it was).
    let feed = &index.sites[&key];
    let start = Instant::now();
    let (etag, whole) = feed
        .answer(None, true, || Some(()))
        .expect("leave to make it")
        .expect("an answer");
    let whole_answer = start.elapsed().as_secs_f64();
    one_changed
        .get_mut(&key)
        .and_then(|s| s.agents.get_mut(&name))
        .expect("the agent")
        .hold
        .push("changed".into());
    let start = Instant::now();
    let changed = index
        .next(signer.sign_sites(one_changed, now))
        .expect("one agent changed");
    let (_, delta) = changed.sites[&key]
        .answer(Some(&etag), true, || Some(()))
        .expect("changes need no leave")
        .expect("an answer");
    let one_change = start.elapsed().as_secs_f64();

    let name = name.as_str();
    let signed_bytes = serde_json::to_vec(&served.document)?.len();
    let served_bytes = serde_json::to_vec(&served)?.len();
    let (root, _) = pin(&roots, None)?;
    let rounds = 2_000;
    let start = Instant::now();
    for _ in 0..rounds {
        black_box(verify_desired(&served, &root, name, None, now)?);
    }
    let verify = start.elapsed().as_secs_f64() / rounds as f64;

    // A report of an agent with ten packages installed and ten job states:
    // signed once per change by the agent, verified by the controller.
    let report = agent_report(name, assignments);
    let agent_key = SigningKey::from_bytes(&[5; 32]);
    let start = Instant::now();
    for _ in 0..rounds {
        black_box(caravan_api::trust::sign_report(&report, &agent_key));
    }
    let sign_report = start.elapsed().as_secs_f64() / rounds as f64;
    let signed_report = caravan_api::trust::sign_report(&report, &agent_key);
    let public = agent_key.verifying_key();
    let start = Instant::now();
    for _ in 0..rounds {
        black_box(caravan_api::trust::verify_report(
            &signed_report,
            &public,
            name,
            0,
        )?);
    }
    let verify_report = start.elapsed().as_secs_f64() / rounds as f64;

    println!("{agents} agents in {SITES} sites, {assignments} assignments each");
    println!(
        "document: {} bytes unsigned with its assignments (peer), {signed_bytes} bytes signed (DSSE envelope naming its lists), {served_bytes} bytes served to the agent with its lists",
        unsigned_bytes / agents
    );
    println!("{:<42} {:>10} {:>12}", "controller", "docs/s", "µs per doc");
    for (what, secs) in [
        ("serialize unsigned (peer, before signing)", unsigned),
        ("sign: every document changed", cold),
        ("sign: nothing changed (signatures reused)", warm),
    ] {
        println!(
            "{what:<42} {:>10.0} {:>12.1}",
            agents as f64 / secs,
            secs * 1e6 / agents as f64
        );
    }
    println!(
        "relay answer, whole site ({} agents): {:.1} ms, {} bytes",
        agents / SITES,
        whole_answer * 1e3,
        whole.len()
    );
    println!(
        "one agent changed: recompute every site + its relay's answer {:.1} ms, {} bytes",
        one_change * 1e3,
        delta.len()
    );
    println!("agent: verify one document {:.1} µs", verify * 1e6);
    println!(
        "report: {} bytes signed; agent signs one in {:.1} µs, controller verifies one in {:.1} µs ({:.0}/s)",
        serde_json::to_vec(&signed_report)?.len(),
        sign_report * 1e6,
        verify_report * 1e6,
        1.0 / verify_report
    );
    Ok(())
}

/// A report of `agent` with `n` packages installed and `n` job states.
fn agent_report(agent: &str, n: usize) -> caravan_api::wire::AgentReport {
    let digest = format!("sha256:{}", "ab".repeat(32));
    serde_json::from_value(serde_json::json!({
        "agent": agent, "sequence": 1_700_000_000_000u64, "version": "0.1.0", "os": "linux", "arch": "x86_64",
        "installed": (0..n).map(|i| serde_json::json!({"name": format!("package-{i}"), "version": "1.0.0", "digest": digest})).collect::<Vec<_>>(),
        "jobs": (0..n).map(|i| serde_json::json!({"job": format!("fleet/job-{i}"), "package": format!("package-{i}"), "digest": digest, "action": "install", "phase": "Succeeded", "time": "2026-12-06T00:00:00Z"})).collect::<Vec<_>>(),
        "desiredVersion": 1_700_000_000_000u64
    }))
    .expect("a report")
}
