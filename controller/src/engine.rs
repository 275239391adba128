//! The distribution engine: from the cached Sites, Agents, DistributionJobs,
//! Packages and Cabinets it computes, in memory,
//! - every site's desired state (what each of its agents must have), published
//!   to relays through a watch channel, and
//! - the status of every job, package and cabinet, patched only when it
//!   changed, at most once per debounce interval (status writes stay bounded
//!   however many agents report).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use caravan_api::{
    conditions::{self, reasons},
    signing,
    v1alpha1::*,
    wire::{AgentDesired, Assignment, AssignmentPhase, SiteDesired},
};
use futures::{stream, FutureExt, StreamExt};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Resource, ResourceExt,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::context::{Context, Pull, SiteKey};

/// How long the engine waits for more changes before recomputing.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// Longest a change waits for the engine while changes keep coming.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Desired state of every site, as served to relays.
#[derive(Default, Debug)]
pub struct DesiredIndex {
    pub sites: HashMap<SiteKey, Arc<SiteEntry>>,
}

#[derive(Debug)]
pub struct SiteEntry {
    pub desired: SiteDesired,
    /// Serialized `desired`, served as is.
    pub body: bytes::Bytes,
    /// Strong validator of `body`.
    pub etag: String,
}

impl SiteEntry {
    fn new(desired: SiteDesired) -> Self {
        let body = bytes::Bytes::from(serde_json::to_vec(&desired).expect("wire types serialize"));
        let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&body))[..32]);
        Self {
            desired,
            body,
            etag,
        }
    }
}

/// Writers of the engine's reflectors; taken by [`run`].
pub struct Writers {
    sites: Writer<Site>,
    agents: Writer<Agent>,
    jobs: Writer<DistributionJob>,
    packages: Writer<Package>,
    cabinets: Writer<Cabinet>,
}

/// Read handles of the engine's caches.
pub struct Readers {
    pub sites: Store<Site>,
    pub agents: Store<Agent>,
    pub jobs: Store<DistributionJob>,
    pub packages: Store<Package>,
    pub cabinets: Store<Cabinet>,
}

pub fn stores() -> (Writers, Readers) {
    let (sites_r, sites) = reflector::store();
    let (agents_r, agents) = reflector::store();
    let (jobs_r, jobs) = reflector::store();
    let (packages_r, packages) = reflector::store();
    let (cabinets_r, cabinets) = reflector::store();
    (
        Writers {
            sites,
            agents,
            jobs,
            packages,
            cabinets,
        },
        Readers {
            sites: sites_r,
            agents: agents_r,
            jobs: jobs_r,
            packages: packages_r,
            cabinets: cabinets_r,
        },
    )
}

/// Watches the five kinds and recomputes after every burst of changes.
pub async fn run(ctx: Arc<Context>) -> anyhow::Result<()> {
    let w = ctx
        .writers
        .lock()
        .expect("lock poisoned")
        .take()
        .expect("engine runs once");
    fn watch<K>(ctx: &Context, writer: Writer<K>) -> stream::BoxStream<'static, ()>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        watcher(ctx.all::<K>(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .filter_map(|event| async move {
                match event {
                    Ok(_) => Some(()),
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
                        None
                    }
                }
            })
            .boxed()
    }
    // A finished artifact fetch is a change too.
    let pokes = stream::unfold(ctx.clone(), |ctx| async move {
        ctx.poke.notified().await;
        Some(((), ctx))
    })
    .boxed();
    let mut changes = stream::select_all([
        pokes,
        watch(&ctx, w.sites),
        watch(&ctx, w.agents),
        watch(&ctx, w.jobs),
        watch(&ctx, w.packages),
        watch(&ctx, w.cabinets),
    ]);
    let r = &ctx.stores;
    loop {
        // Take the whole burst of changes before recomputing, but recompute
        // at least every MAX_DELAY however busy the cluster is.
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(DEBOUNCE, changes.next()).await {
                Ok(Some(())) => {}
                _ => break,
            }
        }
        // Never publish a desired state computed from half-filled caches: an
        // agent missing from it would remove its software.
        let ready = r.sites.wait_until_ready().now_or_never().is_some()
            && r.agents.wait_until_ready().now_or_never().is_some()
            && r.jobs.wait_until_ready().now_or_never().is_some()
            && r.packages.wait_until_ready().now_or_never().is_some()
            && r.cabinets.wait_until_ready().now_or_never().is_some();
        if ready {
            recompute(&ctx).await;
        }
        if changes.next().await.is_none() {
            anyhow::bail!("watch streams ended");
        }
    }
}

/// Computes desired states and statuses from the caches and publishes them.
pub async fn recompute(ctx: &Arc<Context>) {
    let r = &ctx.stores;
    let (sites, agents, jobs, packages, cabinets) = (
        r.sites.state(),
        r.agents.state(),
        r.jobs.state(),
        r.packages.state(),
        r.cabinets.state(),
    );
    let mut plan = Plan::compute(&sites, &agents, &jobs, &packages, &cabinets);
    ctx.metrics.recomputes.inc();
    ctx.metrics.agents.set(agents.len() as i64);

    let mut desired: HashMap<SiteKey, SiteDesired> = sites
        .iter()
        .map(|s| {
            let key = key_of(s.as_ref());
            let agents = plan.by_site.remove(&key).unwrap_or_default();
            (
                key,
                SiteDesired {
                    site: s.name_any(),
                    agents,
                    prestage: vec![],
                    lower: vec![],
                },
            )
        })
        .collect();
    // The blobs of jobs aimed at a site are prestaged there, agents or not.
    for job in jobs.iter().filter(|j| !j.spec.suspend) {
        let key = key_of(job.as_ref());
        let Some(jp) = plan.jobs.get(&key) else {
            continue;
        };
        for site in &jp.sites {
            if let Some(d) = desired.get_mut(&(key.0.clone(), site.clone())) {
                d.prestage.extend(jp.digests.iter().cloned());
            }
        }
    }
    for d in desired.values_mut() {
        d.prestage.sort();
        d.prestage.dedup();
    }
    // Each site's relay also serves the blobs of every site below it.
    let parents: HashMap<SiteKey, SiteKey> = sites
        .iter()
        .filter_map(|s| Some((key_of(s.as_ref()), (s.namespace()?, s.spec.parent.clone()?))))
        .collect();
    let mut lower: HashMap<SiteKey, BTreeSet<String>> = HashMap::new();
    for (key, d) in &desired {
        let mut seen = BTreeSet::from([key.clone()]);
        let mut at = key;
        // Up the chain of parents (a cycle stops where it closes).
        while let Some(parent) = parents.get(at).filter(|p| seen.insert((*p).clone())) {
            let own = d.digests().chain(d.prestage.iter().map(String::as_str));
            lower
                .entry(parent.clone())
                .or_default()
                .extend(own.map(str::to_owned));
            at = parent;
        }
    }
    for (key, digests) in lower {
        if let Some(d) = desired.get_mut(&key) {
            d.lower = digests.into_iter().collect();
        }
    }
    let index = DesiredIndex {
        sites: desired
            .into_iter()
            .map(|(k, d)| (k, Arc::new(SiteEntry::new(d))))
            .collect(),
    };
    ctx.desired.send_if_modified(|current| {
        let changed = current.sites.len() != index.sites.len()
            || index
                .sites
                .iter()
                .any(|(k, v)| current.sites.get(k).is_none_or(|c| c.etag != v.etag));
        if changed {
            *current = Arc::new(index);
        }
        changed
    });

    let agent_index = agent_index(&agents);
    for job in &jobs {
        let status = job_status(job, plan.jobs.get(&key_of(job.as_ref())), &agent_index);
        patch_status_if_changed(ctx, job.as_ref(), job.status.as_ref(), status, |s| {
            &mut s.conditions
        })
        .await;
    }
    for package in &packages {
        let status = package_status(ctx, package, &cabinets).await;
        patch_status_if_changed(
            ctx,
            package.as_ref(),
            package.status.as_ref(),
            status,
            |s| &mut s.conditions,
        )
        .await;
    }
    for cabinet in &cabinets {
        let status = cabinet_status(cabinet, &packages);
        patch_status_if_changed(
            ctx,
            cabinet.as_ref(),
            cabinet.status.as_ref(),
            status,
            |s| &mut s.conditions,
        )
        .await;
    }
}

fn key_of<K: Resource>(o: &K) -> (String, String) {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

/// Writes `next` as the status of `obj` with server-side apply, unless it equals
/// the current status (condition transition times carried over first).
async fn patch_status_if_changed<K, S>(
    ctx: &Context,
    obj: &K,
    current: Option<&S>,
    mut next: S,
    conditions_of: impl Fn(
        &mut S,
    ) -> &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
) where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: Serialize + PartialEq + Clone,
{
    if let Some(current) = current {
        let mut cur = current.clone();
        let previous = std::mem::take(conditions_of(&mut cur));
        let merged = conditions::merge(&previous, std::mem::take(conditions_of(&mut next)));
        *conditions_of(&mut next) = merged;
        if current == &next {
            return;
        }
    }
    let (ns, name) = key_of(obj);
    let api: kube::Api<K> = kube::Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": next,
    });
    match api
        .patch_status(
            &name,
            &PatchParams::apply(caravan_api::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {}
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        // The next change retries.
        Err(e) => {
            tracing::warn!(kind = %K::kind(&()), %ns, %name, error = %e, "status patch failed")
        }
    }
}

/// What every job resolves to, and every agent's desired state.
#[derive(Default, Debug)]
pub struct Plan {
    /// Per site, per agent name: what the agent must have. Every known agent
    /// has an entry, so an agent no job targets gets an explicit empty state.
    pub by_site: HashMap<SiteKey, BTreeMap<String, AgentDesired>>,
    /// Per job: targets and problems.
    pub jobs: HashMap<(String, String), JobPlan>,
}

#[derive(Default, Debug)]
pub struct JobPlan {
    /// Agent name → the assignments this job gives it.
    pub targets: BTreeMap<String, Vec<Assignment>>,
    /// Names of the packages whose reference did not resolve.
    pub unresolved: Vec<String>,
    /// Sites the job is aimed at (with those below, where it says so).
    pub sites: BTreeSet<String>,
    /// Blobs the job installs.
    pub digests: Vec<String>,
    /// `(reason, message)` of each reference that did not resolve.
    pub problems: Vec<(&'static str, String)>,
}

impl Plan {
    pub fn compute(
        sites: &[Arc<Site>],
        agents: &[Arc<Agent>],
        jobs: &[Arc<DistributionJob>],
        packages: &[Arc<Package>],
        cabinets: &[Arc<Cabinet>],
    ) -> Self {
        let mut plan = Plan::default();
        // Every agent's entry, and where to find it by (namespace, name).
        let mut site_of = HashMap::new();
        for a in agents {
            let (ns, name) = key_of(a.as_ref());
            let entry = AgentDesired {
                agent: name.clone(),
                frozen: !a.spec.approved,
                ..Default::default()
            };
            plan.by_site
                .entry((ns.clone(), a.spec.site.clone()))
                .or_default()
                .insert(name.clone(), entry);
            site_of.insert((ns, name), a.spec.site.clone());
        }
        let mut jobs: Vec<_> = jobs.iter().collect();
        // A fixed order, so that the same inputs always give the same desired state.
        jobs.sort_by_key(|j| key_of(j.as_ref()));
        for job in jobs {
            let (ns, name) = key_of(job.as_ref());
            let job_plan = resolve_job(job, &ns, sites, agents, packages, cabinets);
            for (agent, assignments) in &job_plan.targets {
                let Some(site) = site_of.get(&(ns.clone(), agent.clone())) else {
                    continue;
                };
                let Some(entry) = plan
                    .by_site
                    .get_mut(&(ns.clone(), site.clone()))
                    .and_then(|m| m.get_mut(agent))
                else {
                    continue;
                };
                if job.spec.suspend {
                    // A suspended job keeps what it installed where it is.
                    entry
                        .hold
                        .extend(job.spec.packages.iter().map(|p| p.name.clone()));
                } else {
                    entry.assignments.extend(assignments.iter().cloned());
                    entry.hold.extend(job_plan.unresolved.iter().cloned());
                }
            }
            plan.jobs.insert((ns, name), job_plan);
        }
        for entry in plan.by_site.values_mut().flat_map(|m| m.values_mut()) {
            entry.hold.sort();
            entry.hold.dedup();
        }
        plan
    }
}

fn resolve_job(
    job: &DistributionJob,
    ns: &str,
    sites: &[Arc<Site>],
    agents: &[Arc<Agent>],
    packages: &[Arc<Package>],
    cabinets: &[Arc<Cabinet>],
) -> JobPlan {
    let mut plan = JobPlan::default();
    let job_key = format!("{ns}/{}", job.name_any());
    let in_ns = |o: &dyn Fn() -> Option<String>| o().as_deref() == Some(ns);

    let mut chosen = Vec::new();
    for r in &job.spec.packages {
        let candidates = packages
            .iter()
            .filter(|p| in_ns(&|| p.namespace()) && p.spec.name == r.name)
            .filter(|p| r.version.as_ref().is_none_or(|v| &p.spec.version == v));
        match candidates.max_by(|a, b| version_cmp(&a.spec.version, &b.spec.version)) {
            Some(p) => chosen.push(p.clone()),
            None => {
                plan.unresolved.push(r.name.clone());
                plan.problems.push((
                    reasons::UNKNOWN_PACKAGE,
                    match &r.version {
                        Some(v) => {
                            format!("package {} version {v} not found in namespace {ns}", r.name)
                        }
                        None => format!("package {} not found in namespace {ns}", r.name),
                    },
                ))
            }
        }
    }

    let site_names: BTreeSet<String> = sites
        .iter()
        .filter(|s| in_ns(&|| s.namespace()))
        .map(|s| s.name_any())
        .collect();
    let mut target_sites = BTreeSet::new();
    for d in &job.spec.destinations.sites {
        if !site_names.contains(&d.name) {
            plan.problems.push((
                reasons::UNKNOWN_SITE,
                format!("site {} not found in namespace {ns}", d.name),
            ));
            continue;
        }
        target_sites.insert(d.name.clone());
        if d.include_lower {
            // Every site whose chain of parents reaches d.name.
            let mut frontier = vec![d.name.clone()];
            while let Some(parent) = frontier.pop() {
                for s in sites.iter().filter(|s| in_ns(&|| s.namespace())) {
                    if s.spec.parent.as_deref() == Some(&parent)
                        && target_sites.insert(s.name_any())
                    {
                        frontier.push(s.name_any());
                    }
                }
            }
        }
    }
    let dest = &job.spec.destinations;
    let agent_names: BTreeSet<String> = agents
        .iter()
        .filter(|a| in_ns(&|| a.namespace()))
        .map(|a| a.name_any())
        .collect();
    for name in dest.agents.iter().filter(|n| !agent_names.contains(*n)) {
        plan.problems.push((
            reasons::UNKNOWN_AGENT,
            format!("agent {name} not found in namespace {ns}"),
        ));
    }
    let selected = |a: &Agent| {
        target_sites.contains(&a.spec.site)
            || dest
                .agents
                .iter()
                .any(|n| a.meta().name.as_ref() == Some(n))
            || dest.agent_selector.as_ref().is_some_and(|sel| {
                let labels = a.labels();
                sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
    };
    let assignments: Vec<Assignment> = chosen
        .iter()
        .map(|p| Assignment {
            job: job_key.clone(),
            action: job.spec.action,
            package: p.spec.name.clone(),
            version: p.spec.version.clone(),
            digest: p.spec.artifact.digest.clone(),
            size: p.spec.artifact.size,
            install: p.spec.install.clone(),
            signatures: p.spec.signatures.clone(),
            repair: job.spec.repair,
            require_signature: cabinets.iter().any(|c| {
                in_ns(&|| c.namespace())
                    && c.name_any() == p.spec.cabinet
                    && c.spec.require_signatures
            }),
        })
        .collect();
    if job.spec.action == JobAction::Install {
        plan.digests = assignments.iter().map(|a| a.digest.clone()).collect();
    }
    plan.sites = target_sites.clone();
    for a in agents
        .iter()
        .filter(|a| in_ns(&|| a.namespace()) && a.spec.approved && selected(a))
    {
        plan.targets.insert(a.name_any(), assignments.clone());
    }
    plan
}

/// Orders versions numerically where both parts are numbers (`1.10` > `1.9`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |v: &str| {
        v.split(['.', '-', '+'])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Where one target agent stands for one job.
enum Outcome {
    Succeeded,
    Failed(String, String),
    Pending,
}

fn outcome(agent: Option<&Agent>, assignments: &[Assignment]) -> Outcome {
    let reported = agent
        .and_then(|a| a.status.as_ref())
        .map(|s| s.jobs.as_slice())
        .unwrap_or_default();
    let mut done = 0;
    for a in assignments {
        let state = reported.iter().find(|s| {
            s.job == a.job && s.package == a.package && s.digest == a.digest && s.action == a.action
        });
        match state.map(|s| (s.phase, &s.message)) {
            Some((AssignmentPhase::Succeeded, _)) => done += 1,
            Some((AssignmentPhase::Failed, msg)) => {
                return Outcome::Failed(a.package.clone(), msg.clone())
            }
            _ => {}
        }
    }
    if done == assignments.len() {
        Outcome::Succeeded
    } else {
        Outcome::Pending
    }
}

/// Agents by `(namespace, name)`.
type AgentIndex<'a> = HashMap<(String, String), &'a Agent>;

fn agent_index(agents: &[Arc<Agent>]) -> AgentIndex<'_> {
    agents
        .iter()
        .map(|a| (key_of(a.as_ref()), a.as_ref()))
        .collect()
}

fn job_status(
    job: &DistributionJob,
    plan: Option<&JobPlan>,
    agents: &AgentIndex,
) -> DistributionJobStatus {
    let generation = job.meta().generation;
    let empty = JobPlan::default();
    let plan = plan.unwrap_or(&empty);
    let ns = job.namespace();
    let mut st = DistributionJobStatus {
        observed_generation: generation,
        ..Default::default()
    };
    let mut rollup: BTreeMap<String, SiteRollup> = BTreeMap::new();
    for (name, assignments) in &plan.targets {
        let agent = agents
            .get(&(ns.clone().unwrap_or_default(), name.clone()))
            .copied();
        let site = agent.map(|a| a.spec.site.clone()).unwrap_or_default();
        let r = rollup.entry(site.clone()).or_insert_with(|| SiteRollup {
            site: site.clone(),
            ..Default::default()
        });
        r.total += 1;
        st.total += 1;
        match outcome(agent, assignments) {
            Outcome::Succeeded => {
                r.succeeded += 1;
                st.succeeded += 1;
            }
            Outcome::Failed(package, reason) => {
                r.failed += 1;
                st.failed += 1;
                st.failures.push(DestinationFailure {
                    agent: name.clone(),
                    site,
                    package,
                    reason,
                });
            }
            Outcome::Pending => {
                r.pending += 1;
                st.pending += 1;
            }
        }
    }
    st.sites = rollup.into_values().collect();
    st.progress = format!("{}/{}", st.succeeded, st.total);
    st.phase = if job.spec.suspend {
        JobPhase::Suspended
    } else if st.total > 0 && st.succeeded == st.total {
        JobPhase::Succeeded
    } else if st.total > 0 && st.succeeded + st.failed == st.total {
        JobPhase::Failed
    } else if st.succeeded + st.failed > 0 {
        JobPhase::Progressing
    } else {
        JobPhase::Pending
    };

    let mut conds = Vec::new();
    conds.push(match plan.problems.first() {
        None => conditions::new(
            conditions::RESOLVED_REFS,
            true,
            reasons::RESOLVED,
            "all references resolved",
            generation,
        ),
        Some((reason, _)) => conditions::new(
            conditions::RESOLVED_REFS,
            false,
            reason,
            plan.problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            generation,
        ),
    });
    if st.total == 0 && plan.problems.is_empty() {
        conds.push(conditions::new(
            conditions::READY,
            false,
            reasons::NO_DESTINATIONS,
            "no enrolled agent matches the destinations",
            generation,
        ));
    } else {
        let ok = st.phase == JobPhase::Succeeded;
        conds.push(conditions::new(
            conditions::READY,
            ok,
            if ok {
                reasons::SUCCEEDED
            } else {
                reasons::PROGRESSING
            },
            format!(
                "{} of {} destinations succeeded, {} failed",
                st.succeeded, st.total, st.failed
            ),
            generation,
        ));
    }
    conds.push(conditions::new(
        conditions::COMPLETE,
        st.phase == JobPhase::Succeeded,
        if st.phase == JobPhase::Succeeded {
            reasons::SUCCEEDED
        } else {
            reasons::PROGRESSING
        },
        format!("{}/{} destinations succeeded", st.succeeded, st.total),
        generation,
    ));
    conds.push(match st.failures.first() {
        None => conditions::new(
            conditions::FAILED,
            false,
            reasons::SUCCEEDED,
            "no destination failed",
            generation,
        ),
        Some(f) => conditions::new(
            conditions::FAILED,
            true,
            reasons::DESTINATIONS_FAILED,
            format!(
                "{} destination(s) failed; first: agent {} package {}: {}",
                st.failed, f.agent, f.package, f.reason
            ),
            generation,
        ),
    });
    st.conditions = conds;
    st
}

async fn package_status(
    ctx: &Arc<Context>,
    p: &Package,
    cabinets: &[Arc<Cabinet>],
) -> PackageStatus {
    let generation = p.meta().generation;
    let cabinet = cabinets
        .iter()
        .find(|c| c.namespace() == p.namespace() && c.name_any() == p.spec.cabinet);
    let artifact = match (cabinet, sha256_hex(&p.spec.artifact.digest)) {
        (None, _) => Err((
            reasons::UNKNOWN_CABINET,
            format!("cabinet {} not found", p.spec.cabinet),
        )),
        (_, None) => Err((
            reasons::ARTIFACT_MISSING,
            format!("invalid digest {:?}", p.spec.artifact.digest),
        )),
        (Some(c), Some(hex)) => match (ctx.blobs.size(hex).await, c.spec.store.artifact_url(hex)) {
            (Some(size), url) if size == p.spec.artifact.size => Ok(match url {
                Some(url) => format!("artifact fetched from {url}, size and digest verified"),
                None => format!("artifact {} stored", p.spec.artifact.digest),
            }),
            (Some(size), _) => Err((
                reasons::ARTIFACT_MISSING,
                format!(
                    "stored artifact is {size} bytes, manifest says {}",
                    p.spec.artifact.size
                ),
            )),
            // An http cabinet: fetched into the store once, verified.
            (None, Some(url)) => match ctx.pull(hex, &url, p.spec.artifact.size) {
                Some(Pull::Failed { message, .. }) => Err((reasons::ARTIFACT_UNAVAILABLE, message)),
                _ => Err((reasons::ARTIFACT_FETCHING, format!("fetching {url}"))),
            },
            (None, None) => Err((
                reasons::ARTIFACT_MISSING,
                format!(
                    "artifact {} is not in cabinet {}; push it with `caravan package push`",
                    p.spec.artifact.digest, p.spec.cabinet
                ),
            )),
        },
    };
    let mut conds = Vec::new();
    // Signatures are checked against the keys the cabinet trusts.
    let signed = cabinet
        .filter(|c| !c.spec.trusted_keys.is_empty() || c.spec.require_signatures)
        .map(|c| {
            let keys: Vec<_> = c
                .spec
                .trusted_keys
                .iter()
                .filter_map(|k| signing::parse_public(&k.public_key).ok())
                .collect();
            signing::verify(
                &keys,
                &p.spec.signatures,
                &p.spec.name,
                &p.spec.version,
                &p.spec.artifact.digest,
            )
        });
    if let Some(result) = &signed {
        conds.push(match result {
            Ok(key) => conditions::new(
                conditions::SIGNED,
                true,
                reasons::SIGNATURE_VERIFIED,
                format!("signed by trusted key {key}"),
                generation,
            ),
            Err(e) => conditions::new(
                conditions::SIGNED,
                false,
                reasons::SIGNATURE_INVALID,
                e.to_string(),
                generation,
            ),
        });
    }
    let require = cabinet.is_some_and(|c| c.spec.require_signatures);
    let ready = match (&artifact, &signed) {
        (Err((reason, msg)), _) => {
            conditions::new(conditions::READY, false, reason, msg.clone(), generation)
        }
        (Ok(_), Some(Err(e))) if require => conditions::new(
            conditions::READY,
            false,
            reasons::SIGNATURE_INVALID,
            format!(
                "cabinet {} requires a trusted signature: {e}",
                p.spec.cabinet
            ),
            generation,
        ),
        (Ok(msg), _) => conditions::new(
            conditions::READY,
            true,
            reasons::ARTIFACT_AVAILABLE,
            msg.clone(),
            generation,
        ),
    };
    conds.insert(0, ready);
    PackageStatus {
        observed_generation: generation,
        artifact_available: artifact.is_ok(),
        conditions: conds,
    }
}

fn cabinet_status(c: &Cabinet, packages: &[Arc<Package>]) -> CabinetStatus {
    let generation = c.meta().generation;
    let mine: Vec<_> = packages
        .iter()
        .filter(|p| p.namespace() == c.namespace() && p.spec.cabinet == c.name_any())
        .collect();
    CabinetStatus {
        observed_generation: generation,
        packages: mine.len() as u32,
        bytes: mine.iter().map(|p| p.spec.artifact.size).sum(),
        conditions: vec![conditions::new(
            conditions::READY,
            true,
            reasons::SUCCEEDED,
            "built-in store available",
            generation,
        )],
    }
}

#[cfg(test)]
mod tests;
