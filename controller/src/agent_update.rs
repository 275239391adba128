//! `--agent-update auto`: the controller rolls its own agent build out to
//! every endpoint, with the job machinery, once the relays run its release.
//!
//! - **Its own package.** At start the agent binary of this release
//!   (`--agent-binary`, in the controller's image) is packed as a package
//!   of `method: agent` and put in the built-in store; the same binary
//!   always packs to the same digest.
//! - **Gated behind the relays.** In each namespace, nothing moves until
//!   every Site's relay says this release (`status.relayVersion`, which the
//!   relay image rollout brings them to one site at a time). A Site added
//!   later joins the job as it is (the new agent still tries itself out
//!   against that relay before it stays).
//! - **Optional, and it says why it waits.** What fails (packing, an apply
//!   refused: an object of the same name that somebody else declared, the
//!   identity ledger refusing other bytes under this release) is logged
//!   once and tried again; it never stops the controller.
//! - **A gated rollout.** Then a Cabinet (`caravan-agents`, built-in), the
//!   Package (`caravan-agent-<release>`, for this OS and architecture) and a
//!   DistributionJob (`caravan-agent-update`, every agent of the namespace,
//!   the default gated rollout: one endpoint, then 10%, then the rest,
//!   pausing when 10% of a batch fail) are applied under their own field
//!   manager, and the job's Event says the bytes each endpoint is sent.
//!   Agents update themselves as with any agent package (tried out first,
//!   kept only if the new binary reports); one already of this release
//!   records it and downloads nothing; one that is off gets it when it next
//!   starts.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use caravan_api::{
    v1alpha1::{
        Artifact, Cabinet, CabinetSpec, Destinations, DistributionJob, DistributionJobSpec,
        InstallMethod, InstallSpec, Package, PackageRef, PackageSpec, Requirements,
        SiteDestination, AGENT_BINARY,
    },
    RELEASE,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType},
    ResourceExt as _,
};
use tokio_util::sync::CancellationToken;

use crate::{cabinet::BlobStore, context::Context, stores::Stores};

/// The objects' names.
pub const CABINET: &str = "caravan-agents";
pub const JOB: &str = "caravan-agent-update";

/// How often the namespaces are looked at.
const EVERY: Duration = Duration::from_secs(5);

/// What `--agent-update` does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Agents are updated by hand (an agent package and a job of yours).
    #[default]
    Off,
    /// The controller rolls its own agent out (see the module's docs).
    Auto,
}

/// This release's agent, packed: its artifact and where the archive is.
pub struct Packed {
    pub artifact: Artifact,
    path: PathBuf,
}

/// Packs `binary` as an agent package into `dir` (kept there, to be put in
/// the store again should the collector have removed it before any Package
/// named it).
pub fn pack(binary: &Path, dir: &Path) -> anyhow::Result<Packed> {
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let target = src.join(AGENT_BINARY);
    std::fs::copy(binary, &target).with_context(|| {
        format!(
            "reading the agent binary {} (--agent-binary)",
            binary.display()
        )
    })?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    }
    let path = dir.join("caravan-agent.pkg");
    let artifact = caravan_archive::pack(&src, &path)?;
    std::fs::remove_dir_all(&src)?;
    Ok(Packed { artifact, path })
}

/// The objects of the update in a namespace whose top-level Sites are
/// `tops`, labelled as the controller's.
pub fn objects(packed: &Artifact, tops: &[String]) -> (Cabinet, Package, DistributionJob) {
    let labels: BTreeMap<String, String> = [(
        caravan_api::labels::MANAGED_BY.to_string(),
        "caravan-controller".to_string(),
    )]
    .into();
    // (Through serde: every other field its default.)
    let cabinet_spec: CabinetSpec = serde_json::from_value(serde_json::json!({
        "store": { "type": "builtin" },
        "description": "The agent builds of the Caravan controller (--agent-update auto)",
    }))
    .expect("a builtin cabinet");
    let mut cabinet = Cabinet::new(CABINET, cabinet_spec);
    let mut package = Package::new(
        &format!("caravan-agent-{RELEASE}"),
        PackageSpec {
            cabinet: CABINET.into(),
            name: AGENT_BINARY.into(),
            version: RELEASE.into(),
            artifact: packed.clone(),
            install: InstallSpec {
                method: InstallMethod::Agent,
                requirements: Some(Requirements {
                    os: vec![std::env::consts::OS.into()],
                    arch: vec![std::env::consts::ARCH.into()],
                    min_free_disk_bytes: None,
                }),
                ..Default::default()
            },
            description: Some(format!(
                "The agent of Caravan {RELEASE}: {} per endpoint",
                bytes(packed.size)
            )),
            signatures: vec![],
        },
    );
    // Every agent of the namespace: each top-level site and every site
    // below it. No `rollout`: the default one, gated.
    let sites: Vec<SiteDestination> = tops
        .iter()
        .map(|name| SiteDestination {
            name: name.clone(),
            include_lower: true,
        })
        .collect();
    let job_spec: DistributionJobSpec = serde_json::from_value(serde_json::json!({
        "packages": [PackageRef { name: AGENT_BINARY.into(), version: Some(RELEASE.into()) }],
        "destinations": Destinations { sites, ..Default::default() },
    }))
    .expect("a job of one package");
    let mut job = DistributionJob::new(JOB, job_spec);
    for meta in [
        &mut cabinet.metadata,
        &mut package.metadata,
        &mut job.metadata,
    ] {
        meta.labels = Some(labels.clone());
    }
    (cabinet, package, job)
}

/// `n` bytes for a person.
fn bytes(n: u64) -> String {
    format!("{:.1} MiB ({n} bytes)", n as f64 / (1 << 20) as f64)
}

/// The top-level Sites of `ns` (a Site whose parent is not there counts as
/// one), by name, sorted.
fn tops(stores: &Stores, ns: &str) -> Vec<String> {
    let sites: Vec<_> = stores
        .sites
        .state()
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(ns))
        .collect();
    let names: std::collections::BTreeSet<String> = sites.iter().map(|s| s.name_any()).collect();
    let mut tops: Vec<String> = sites
        .iter()
        .filter(|s| s.spec.parent.as_ref().is_none_or(|p| !names.contains(p)))
        .map(|s| s.name_any())
        .collect();
    tops.sort();
    tops
}

/// The Sites of `ns` whose relay does not say this release yet (by name).
fn relays_behind(stores: &Stores, ns: &str) -> Vec<String> {
    stores
        .sites
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns))
        .filter(|s| {
            // Of this release: a patch release of it counts.
            let said = s.status.as_ref().and_then(|st| st.relay_version.as_deref());
            said.is_none_or(|v| {
                caravan_api::skew::later_release(RELEASE, v)
                    || caravan_api::skew::later_release(v, RELEASE)
            })
        })
        .map(|s| s.name_any())
        .collect()
}

/// Runs the update (on the leader) until shutdown.
pub async fn run(
    ctx: Arc<Context>,
    stores: Stores,
    blobs: Arc<BlobStore>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if ctx.config.agent_update == Mode::Off {
        shutdown.cancelled().await;
        return Ok(());
    }
    // One directory per release: replicas of two releases (a rolling
    // upgrade on a shared volume) do not write over each other's.
    let dir = ctx.config.data_dir.join("agent-update").join(RELEASE);
    let mut packed: Option<Packed> = None;
    // Namespaces whose objects are applied, those waiting (with what they
    // last waited for) and those whose apply failed (with why): each said
    // once, not every round.
    let mut applied = std::collections::HashSet::new();
    let mut waiting: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(EVERY);
    while stores.next_round(&mut tick, &shutdown).await {
        // An optional part: what fails here is said and tried again, and
        // never stops the controller.
        let packed = match &packed {
            Some(p) => p,
            None => {
                let (binary, d) = (ctx.config.agent_binary.clone(), dir.clone());
                match tokio::task::spawn_blocking(move || pack(&binary, &d)).await? {
                    Ok(p) => {
                        tracing::info!(release = RELEASE, digest = %p.artifact.digest, size = p.artifact.size, "agent update packed; it starts in each namespace once its relays run this release");
                        packed.insert(p)
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "agent update: packing the agent failed; trying again");
                        continue;
                    }
                }
            }
        };
        let namespaces: std::collections::BTreeSet<String> = stores
            .sites
            .state()
            .iter()
            .filter_map(|s| s.namespace())
            .collect();
        for ns in namespaces {
            let behind = relays_behind(&stores, &ns);
            if !behind.is_empty() {
                if waiting.get(&ns) != Some(&behind) {
                    tracing::info!(namespace = %ns, sites = ?behind, "agent update waits for these sites' relays to run {RELEASE}");
                    waiting.insert(ns.clone(), behind);
                }
                continue;
            }
            waiting.remove(&ns);
            let tops = tops(&stores, &ns);
            if in_place(&stores, &ns, &packed.artifact, &tops)
                && blobs.size(&packed.artifact.digest).await.is_some()
            {
                continue;
            }
            let first = !applied.contains(&ns);
            match apply(&ctx, &blobs, packed, &ns, &tops).await {
                Ok(_) if !first => {}
                Ok(job) => {
                    applied.insert(ns.clone());
                    failing.remove(&ns);
                    let note = format!(
                        "Every agent of the namespace is updated to caravan-agent {RELEASE} as a gated rollout: {} per endpoint",
                        bytes(packed.artifact.size)
                    );
                    tracing::info!(namespace = %ns, "{note}");
                    ctx.publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "AgentUpdateStarted".into(),
                            note: Some(note),
                            action: "Update".into(),
                            secondary: None,
                        },
                        &job,
                    )
                    .await;
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    if failing.get(&ns) != Some(&why) {
                        tracing::warn!(namespace = %ns, error = %why, "agent update not applied; trying again");
                        failing.insert(ns.clone(), why);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether the controller's objects in `ns` are as it would apply them
/// (only the fields it sets: a user's `exclude` on the job stays theirs).
fn in_place(stores: &Stores, ns: &str, artifact: &Artifact, tops: &[String]) -> bool {
    use kube::runtime::reflector::ObjectRef;
    let (_, package, job) = objects(artifact, tops);
    let package_there = stores
        .packages
        .get(&ObjectRef::new(&package.name_any()).within(ns))
        .is_some_and(|p| p.spec.artifact == package.spec.artifact);
    let job_there = stores
        .jobs
        .get(&ObjectRef::new(JOB).within(ns))
        .is_some_and(|j| {
            j.spec.packages == job.spec.packages
                && j.spec.destinations.sites == job.spec.destinations.sites
        });
    package_there && job_there
}

/// Puts the package in the store (again, if the collector took it) and
/// applies the objects in `ns`.
async fn apply(
    ctx: &Context,
    blobs: &BlobStore,
    packed: &Packed,
    ns: &str,
    tops: &[String],
) -> anyhow::Result<DistributionJob> {
    let digest = packed.artifact.digest;
    if blobs.present(&digest).await?.is_none() {
        let file = tokio::fs::File::open(&packed.path).await?;
        let stream = tokio_util::io::ReaderStream::new(file);
        blobs
            .put(&digest, 0, packed.artifact.size, stream)
            .await
            .context("putting the agent package in the store")?;
    }
    let (cabinet, package, job) = objects(&packed.artifact, tops);
    // Not forced: an object of the same name that Git (or anybody) declared
    // stays theirs, and the apply is refused, saying so.
    let params = PatchParams::apply(crate::field_managers::AGENT_UPDATE);
    ctx.namespaced::<Cabinet>(ns)
        .patch(&cabinet.name_any(), &params, &Patch::Apply(&cabinet))
        .await
        .context("applying the Cabinet")?;
    ctx.namespaced::<Package>(ns)
        .patch(&package.name_any(), &params, &Patch::Apply(&package))
        .await
        .context("applying the Package")?;
    let job = ctx
        .namespaced::<DistributionJob>(ns)
        .patch(&job.name_any(), &params, &Patch::Apply(&job))
        .await
        .context("applying the DistributionJob")?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_binary_packs_to_the_same_package_for_every_agent_of_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("agent");
        std::fs::write(&binary, b"#!/bin/sh\necho agent\n").unwrap();
        let a = pack(&binary, &dir.path().join("a")).unwrap();
        let b = pack(&binary, &dir.path().join("b")).unwrap();
        assert_eq!(a.artifact, b.artifact, "reproducible");
        let (cabinet, package, job) = objects(&a.artifact, &["hq".into(), "lab".into()]);
        assert_eq!(package.spec.cabinet, cabinet.name_any());
        assert_eq!(package.spec.version, RELEASE);
        assert_eq!(package.spec.install.method, InstallMethod::Agent);
        assert_eq!(job.spec.packages[0].version.as_deref(), Some(RELEASE));
        // Every agent: each top-level site and all below; the default
        // rollout is gated.
        let sites = &job.spec.destinations.sites;
        assert_eq!(
            sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["hq", "lab"]
        );
        assert!(sites.iter().all(|s| s.include_lower));
        assert!(job.spec.rollout.is_none());
        assert!(package
            .spec
            .description
            .unwrap()
            .contains(&format!("({} bytes)", a.artifact.size)));
    }
}
