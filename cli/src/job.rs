//! `caravan job`: a distribution job as a tree (job → sites, following the
//! site tree → agents, each with its state), followed live with `--watch`;
//! re-running its failures; pausing and resuming it.
//!
//! `retry`, `pause` and `resume` write their one field with server-side
//! apply, each as a field manager of its own (`caravan-cli-retry`, …: one
//! command's apply never drops the field another wrote), never forcing: a
//! field Git declares belongs to the Git sync, and the command says to
//! change it in Git instead.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::Context as _;
use caravan_api::{
    v1alpha1::{Agent, DistributionJob, Package, Retry, Site},
    wire::{AssignmentPhase, JobState},
};
use clap::Subcommand;
use futures::{FutureExt as _, StreamExt as _};
use kube::{
    api::{ListParams, Patch, PatchParams},
    runtime::{reflector, watcher, WatchStreamExt as _},
    Api, Client, Resource as _, ResourceExt as _,
};

/// Whether a server-side apply conflict names no manager but
/// `caravan-cli`, which earlier releases of this command wrote as.
fn conflicts_only_with_old_cli(message: &str) -> bool {
    let mut managers = message
        .split("with \"")
        .skip(1)
        .map(|rest| rest.split('"').next());
    let first = managers.next();
    first == Some(Some(LEGACY_FIELD_MANAGER)) && managers.all(|m| m == Some(LEGACY_FIELD_MANAGER))
}

/// The field manager of every command before each had its own.
const LEGACY_FIELD_MANAGER: &str = "caravan-cli";

/// The field manager each command writes its field as.
fn field_manager(field: &str) -> String {
    let short = match field {
        "spec.retry" => "retry",
        "spec.suspend" => "suspend",
        _ => "resume",
    };
    format!("caravan-cli-{short}")
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// The job as a tree: its sites (following the site tree) and each
    /// destination agent with its state and reason.
    Status {
        name: String,
        /// Only the destinations that failed, lost to another job or expired.
        #[arg(long)]
        failed: bool,
        /// Print the tree again whenever it changes, until interrupted.
        #[arg(long, short = 'w')]
        watch: bool,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Re-run the destinations whose install failed (given up or not);
    /// those that succeeded are not touched. Raises `spec.retry.generation`.
    Retry {
        name: String,
        /// Only the agents of this site and the sites below it (repeatable).
        #[arg(long)]
        site: Vec<String>,
        /// Only this agent (repeatable).
        #[arg(long)]
        agent: Vec<String>,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Stop handing the job to agents (`spec.suspend`); what is installed stays.
    Pause {
        name: String,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Hand the job to agents again, and go on with the next batch of a
    /// rollout paused at its failure threshold (raises
    /// `spec.rollout.resume`).
    Resume {
        name: String,
        /// Start the next batch even though the rollout is not paused (the
        /// batch under way is not waited for: some of it may be offline).
        #[arg(long)]
        next_batch: bool,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

pub async fn run(command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Status {
            name,
            failed,
            watch,
            namespace,
        } => {
            let c = Cluster::connect(namespace).await?;
            match watch {
                false => print!("{}", c.snapshot(&name, failed).await?),
                true => c.watch(&name, failed).await?,
            }
            Ok(())
        }
        JobCommand::Retry {
            name,
            site,
            agent,
            namespace,
        } => {
            let c = Cluster::connect(namespace).await?;
            let job = c.job(&name).await?;
            let generation = job.spec.retry.as_ref().map_or(0, |r| r.generation) + 1;
            let retry = Retry {
                generation,
                sites: site,
                agents: agent,
            };
            c.apply(&name, serde_json::json!({ "retry": retry }), "spec.retry")
                .await?;
            eprintln!("job {name}: failed destinations re-run (retry generation {generation})");
            Ok(())
        }
        JobCommand::Pause { name, namespace } => {
            let c = Cluster::connect(namespace).await?;
            c.job(&name).await?;
            c.apply(
                &name,
                serde_json::json!({ "suspend": true }),
                "spec.suspend",
            )
            .await?;
            eprintln!("job {name} paused");
            Ok(())
        }
        JobCommand::Resume {
            name,
            next_batch,
            namespace,
        } => {
            let c = Cluster::connect(namespace).await?;
            let job = c.job(&name).await?;
            if job.spec.suspend {
                c.apply(
                    &name,
                    serde_json::json!({ "suspend": false }),
                    "spec.suspend",
                )
                .await?;
                eprintln!("job {name} resumed");
            }
            let rollout = job.status.as_ref().and_then(|s| s.rollout.as_ref());
            if let Some(why) = rollout.and_then(|r| r.paused.as_ref()) {
                eprintln!("job {name}: the rollout paused: {why}");
            }
            if next_batch || rollout.is_some_and(|r| r.paused.is_some()) {
                let resume = job.spec.rollout.as_ref().map_or(0, |r| r.resume) + 1;
                c.apply(
                    &name,
                    serde_json::json!({ "rollout": { "resume": resume } }),
                    "spec.rollout.resume",
                )
                .await?;
                eprintln!("job {name}: the rollout goes on with its next batch (resume {resume})");
            } else if !job.spec.suspend {
                eprintln!("job {name} is neither suspended nor paused: nothing to resume");
            }
            Ok(())
        }
    }
}

struct Cluster {
    client: Client,
    ns: String,
}

impl Cluster {
    async fn connect(namespace: Option<String>) -> anyhow::Result<Self> {
        let client = Client::try_default()
            .await
            .context("connecting to the cluster (kubeconfig)")?;
        let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
        Ok(Self { client, ns })
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn job(&self, name: &str) -> anyhow::Result<DistributionJob> {
        self.api::<DistributionJob>()
            .get_opt(name)
            .await
            .with_context(|| format!("reading DistributionJob {name}"))?
            .with_context(|| {
                format!(
                    "there is no DistributionJob {name} in namespace {}",
                    self.ns
                )
            })
    }

    /// Applies `spec` (one field, named `field` for the user) to job `name`.
    async fn apply(&self, name: &str, spec: serde_json::Value, field: &str) -> anyhow::Result<()> {
        let patch = serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1",
            "kind": "DistributionJob",
            "metadata": { "name": name },
            "spec": spec,
        });
        let manager = field_manager(field);
        let api = self.api::<DistributionJob>();
        let mut result = api
            .patch(name, &PatchParams::apply(&manager), &Patch::Apply(&patch))
            .await;
        // Written by an earlier release as `caravan-cli`: ours to take over.
        if let Err(kube::Error::Api(e)) = &result {
            if e.code == 409 && conflicts_only_with_old_cli(&e.message) {
                result = api
                    .patch(
                        name,
                        &PatchParams::apply(&manager).force(),
                        &Patch::Apply(&patch),
                    )
                    .await;
            }
        }
        match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => anyhow::bail!(
                "{field} of DistributionJob {name} is declared in Git (or by another manager: {}): \
                 change it there",
                e.message
            ),
            Err(e) => Err(e).with_context(|| format!("updating DistributionJob {name}")),
        }
    }

    async fn snapshot(&self, name: &str, failed_only: bool) -> anyhow::Result<String> {
        let job = self.job(name).await?;
        let lp = ListParams::default();
        let sites = self.api::<Site>().list(&lp).await?.items;
        let agents = self.api::<Agent>().list(&lp).await?.items;
        let packages = self.api::<Package>().list(&lp).await?.items;
        Ok(render(&job, &sites, &agents, &packages, failed_only))
    }

    /// The changes of one kind, filling `writer`'s store.
    fn changes<K>(
        &self,
        writer: reflector::store::Writer<K>,
    ) -> futures::stream::BoxStream<'static, Result<(), watcher::Error>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
        <K as kube::Resource>::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let stream = watcher(self.api::<K>(), watcher::Config::default()).default_backoff();
        reflector(writer, stream)
            .touched_objects()
            .map(|r| r.map(drop))
            .boxed()
    }

    /// Prints the tree, then again after every burst of changes.
    async fn watch(&self, name: &str, failed_only: bool) -> anyhow::Result<()> {
        let (jobs, jobs_w) = reflector::store::<DistributionJob>();
        let (sites, sites_w) = reflector::store::<Site>();
        let (agents, agents_w) = reflector::store::<Agent>();
        let (packages, packages_w) = reflector::store::<Package>();
        let changes = futures::stream::select_all([
            self.changes(jobs_w),
            self.changes(sites_w),
            self.changes(agents_w),
            self.changes(packages_w),
        ]);
        futures::pin_mut!(changes);
        let mut shown = String::new();
        loop {
            // The first change, then the rest of its burst.
            match changes.next().await {
                None => anyhow::bail!("the watch ended"),
                Some(Err(e)) => eprintln!("watch: {e}"),
                Some(Ok(())) => {}
            }
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(300), changes.next()).await
            {}
            let ready = jobs.wait_until_ready().now_or_never().is_some()
                && sites.wait_until_ready().now_or_never().is_some()
                && agents.wait_until_ready().now_or_never().is_some()
                && packages.wait_until_ready().now_or_never().is_some();
            if !ready {
                continue;
            }
            let Some(job) = jobs.state().into_iter().find(|j| j.name_any() == name) else {
                anyhow::bail!(
                    "there is no DistributionJob {name} in namespace {}",
                    self.ns
                );
            };
            let text = render(
                &job,
                &plain(sites.state()),
                &plain(agents.state()),
                &plain(packages.state()),
                failed_only,
            );
            if text != shown {
                println!("{}", chrono::Utc::now().format("— %H:%M:%S —"));
                print!("{text}");
                shown = text;
            }
        }
    }
}

/// The objects of a store, as plain values.
fn plain<T: Clone>(v: Vec<std::sync::Arc<T>>) -> Vec<T> {
    v.iter().map(|a| (**a).clone()).collect()
}

/// Where one destination stands, worst first (the order a tree line shows).
fn rank(phase: AssignmentPhase) -> u8 {
    match phase {
        AssignmentPhase::Failed => 0,
        AssignmentPhase::Expired => 1,
        AssignmentPhase::Conflict => 2,
        AssignmentPhase::Installing | AssignmentPhase::Removing => 3,
        AssignmentPhase::Downloading => 4,
        AssignmentPhase::Downloaded | AssignmentPhase::Deferred => 5,
        AssignmentPhase::Pending | AssignmentPhase::Unknown => 6,
        AssignmentPhase::NotApplicable | AssignmentPhase::Available => 7,
        AssignmentPhase::Succeeded => 8,
    }
}

/// The tree of `job`: the job's line, then each site of its rollup under
/// its parent, each with its destination agents (those that reported on the
/// job's current packages) and how many have not reported yet.
pub fn render(
    job: &DistributionJob,
    sites: &[Site],
    agents: &[Agent],
    packages: &[Package],
    failed_only: bool,
) -> String {
    let ns = job.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", job.name_any());
    let status = job.status.clone().unwrap_or_default();
    // The reports that count: those about the packages the job picks now.
    let digests: BTreeSet<_> = job
        .spec
        .packages
        .iter()
        .filter_map(|r| r.choose(packages, |p| &p.spec))
        .map(|p| p.spec.artifact.digest)
        .collect();
    let mut out = format!(
        "job {}: {:?} {} succeeded",
        job.name_any(),
        status.phase,
        if status.progress.is_empty() {
            "0/0"
        } else {
            &status.progress
        }
    );
    if status.failed > 0 {
        out.push_str(&format!(", {} failed", status.failed));
        if status.retrying > 0 {
            out.push_str(&format!(" ({} to be tried again)", status.retrying));
        }
    }
    for (n, what) in [
        (status.conflict, "in conflict"),
        (status.expired, "expired"),
        (status.not_applicable, "not applicable"),
        (status.pending, "pending"),
        (status.downloading, "of them downloading"),
        (status.installing, "of them installing"),
        (status.downloaded, "of them downloaded ahead"),
        (status.deferred, "of them put off by their user"),
        (status.available, "with the packages on offer"),
    ] {
        if n > 0 {
            out.push_str(&format!(", {n} {what}"));
        }
    }
    let rollout = status.rollout.as_ref().filter(|r| r.batches > 1);
    if let Some(r) = rollout {
        out.push_str(&format!(
            "; batch {}/{}, {} have the job",
            r.batch, r.batches, r.released
        ));
    }
    out.push('\n');
    if let Some(why) = rollout.and_then(|r| r.paused.as_ref()) {
        out.push_str(&format!(
            "rollout paused: {why} (go on with `caravan job resume`)\n"
        ));
    }
    // Each destination agent's worst state for the job, by site.
    let mut by_site: BTreeMap<&str, Vec<(&str, &JobState)>> = BTreeMap::new();
    for a in agents {
        let worst = a
            .status
            .iter()
            .flat_map(|s| &s.jobs)
            .filter(|s| s.job == key && digests.contains(&s.digest))
            .min_by_key(|s| rank(s.phase));
        if let Some(s) = worst {
            by_site
                .entry(a.spec.site.as_str())
                .or_default()
                .push((a.meta().name.as_deref().unwrap_or_default(), s));
        }
    }
    let rollup: BTreeMap<&str, _> = status.sites.iter().map(|r| (r.site.as_str(), r)).collect();
    // The sites to show, with the sites above them (to hang them on).
    let parent: BTreeMap<&str, Option<&str>> = sites
        .iter()
        .filter_map(|s| Some((s.meta().name.as_deref()?, s.spec.parent.as_deref())))
        .collect();
    let mut shown: BTreeSet<&str> = BTreeSet::new();
    for site in rollup.keys().chain(by_site.keys()) {
        let mut at = Some(*site);
        // A loop in the parents stops at a site seen already.
        while let Some(s) = at.filter(|s| shown.insert(s)) {
            at = parent.get(s).copied().flatten();
        }
    }
    let children = |of: Option<&str>| -> Vec<&str> {
        shown
            .iter()
            .copied()
            .filter(|s| {
                parent.get(s).copied().flatten() == of || (of.is_none() && !parent.contains_key(s))
            })
            .filter(|s| Some(*s) != of)
            .collect()
    };
    let mut stack: Vec<(&str, String)> = children(None)
        .into_iter()
        .rev()
        .map(|s| (s, String::new()))
        .collect();
    let mut visited = BTreeSet::new();
    // Sites whose parents loop reach no root: each is shown as one.
    let next_root = |visited: &BTreeSet<&str>| {
        shown
            .iter()
            .find(|s| !visited.contains(*s))
            .map(|s| (*s, String::new()))
    };
    while let Some((site, indent)) = stack.pop().or_else(|| next_root(&visited)) {
        if !visited.insert(site) {
            continue;
        }
        let r = rollup.get(site);
        let line = match r {
            Some(r) => {
                let mut l = format!("{}/{}", r.succeeded, r.total - r.not_applicable);
                for (n, what) in [
                    (r.failed, "failed"),
                    (r.conflict, "in conflict"),
                    (r.expired, "expired"),
                ] {
                    if n > 0 {
                        l.push_str(&format!(", {n} {what}"));
                    }
                }
                l
            }
            None => "no destinations".into(),
        };
        out.push_str(&format!("{indent}site {site}: {line}\n"));
        let inner = format!("{indent}  ");
        let mine = by_site.get(site).map(Vec::as_slice).unwrap_or_default();
        for (agent, s) in mine {
            let bad = matches!(
                s.phase,
                AssignmentPhase::Failed | AssignmentPhase::Conflict | AssignmentPhase::Expired
            );
            if failed_only && !bad {
                continue;
            }
            out.push_str(&format!("{inner}agent {agent}: {}\n", s.summary()));
        }
        let silent = r.map_or(0, |r| r.total as usize).saturating_sub(mine.len());
        if silent > 0 && !failed_only {
            out.push_str(&format!("{inner}{silent} agent(s) not reported yet\n"));
        }
        for child in children(Some(site)).into_iter().rev() {
            stack.push((child, inner.clone()));
        }
    }
    if status.failed as usize > status.failures.len() && failed_only {
        out.push_str(&format!(
            "({} failed in all: each Agent's status has its reason)\n",
            status.failed
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::Digest;
    use serde_json::json;

    fn site(name: &str, parent: Option<&str>) -> Site {
        serde_json::from_value(json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Site",
            "metadata": { "name": name, "namespace": "ns" },
            "spec": { "parent": parent },
        }))
        .unwrap()
    }

    fn agent(name: &str, site: &str, states: &[(&str, AssignmentPhase, &str)]) -> Agent {
        let jobs: Vec<_> = states
            .iter()
            .map(|(version, phase, message)| JobState {
                job: "ns/j".into(),
                package: "hello".into(),
                digest: Digest::of(version.as_bytes()),
                action: Default::default(),
                phase: *phase,
                message: message.to_string(),
                time: String::new(),
                attempts: u32::from(*phase == AssignmentPhase::Failed) * 3,
                retry_at: None,
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
            "metadata": { "name": name, "namespace": "ns" },
            "spec": { "site": site, "hostId": name },
            "status": { "jobs": jobs },
        }))
        .unwrap()
    }

    fn package(version: &str) -> Package {
        serde_json::from_value(json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Package",
            "metadata": { "name": format!("hello-{version}"), "namespace": "ns" },
            "spec": { "cabinet": "main", "name": "hello", "version": version,
                      "artifact": { "digest": Digest::of(version.as_bytes()), "size": 1 } },
        }))
        .unwrap()
    }

    #[test]
    fn only_a_conflict_with_the_old_cli_manager_is_taken_over() {
        assert!(conflicts_only_with_old_cli(
            "Apply failed with 1 conflict: conflict with \"caravan-cli\": .spec.suspend"
        ));
        assert!(!conflicts_only_with_old_cli(
            "Apply failed with 1 conflict: conflict with \"caravan\": .spec.suspend"
        ));
        assert!(!conflicts_only_with_old_cli(
            "Apply failed with 2 conflicts: conflicts with \"caravan-cli\":\n- .spec.suspend\n\
             conflicts with \"kubectl-edit\":\n- .spec.retry"
        ));
        assert!(!conflicts_only_with_old_cli(
            "Operation cannot be fulfilled"
        ));
    }

    #[test]
    fn the_tree_follows_the_sites_and_shows_each_destination_with_its_reason() {
        let rollup = |site: &str, total, succeeded, failed| json!({ "site": site, "total": total, "succeeded": succeeded, "failed": failed, "pending": total - succeeded - failed });
        let job: DistributionJob = serde_json::from_value(json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "DistributionJob",
            "metadata": { "name": "j", "namespace": "ns" },
            "spec": { "packages": [{ "name": "hello" }], "destinations": { "sites": [{ "name": "hq", "includeLower": true }] } },
            "status": { "phase": "Progressing", "progress": "2/4", "total": 4, "succeeded": 2, "failed": 1, "pending": 1,
                        "sites": [rollup("hq", 1, 1, 0), rollup("east-1", 3, 1, 1)] },
        }))
        .unwrap();
        let sites = [
            site("hq", None),
            site("east", Some("hq")),
            site("east-1", Some("east")),
            site("west", Some("hq")),
        ];
        let agents = [
            agent("h1", "hq", &[("2", AssignmentPhase::Succeeded, "")]),
            agent("e1", "east-1", &[("2", AssignmentPhase::Succeeded, "")]),
            agent(
                "e2",
                "east-1",
                &[("2", AssignmentPhase::Failed, "step 1\nexit status 3")],
            ),
            // A report on the version before counts for nothing.
            agent("e3", "east-1", &[("1", AssignmentPhase::Failed, "old")]),
        ];
        let packages = [package("1"), package("2")];
        let text = render(&job, &sites, &agents, &packages, false);
        assert_eq!(
            text,
            "job j: Progressing 2/4 succeeded, 1 failed, 1 pending\n\
             site hq: 1/1\n\
             \x20 agent h1: Succeeded\n\
             \x20 site east: no destinations\n\
             \x20   site east-1: 1/3, 1 failed\n\
             \x20     agent e1: Succeeded\n\
             \x20     agent e2: Failed 3 time(s) (re-run it with `caravan job retry`): exit status 3\n\
             \x20     1 agent(s) not reported yet\n"
        );
        // Sites whose parents loop are still shown, each once.
        let looped = [
            site("hq", Some("east-1")),
            site("east", Some("hq")),
            site("east-1", Some("east")),
        ];
        let text = render(&job, &looped, &agents, &packages, false);
        for s in ["site hq:", "site east:", "site east-1:"] {
            assert_eq!(text.matches(s).count(), 1, "{text}");
        }
        let failed = render(&job, &sites, &agents, &packages, true);
        assert!(failed.contains("agent e2: Failed"), "{failed}");
        assert!(!failed.contains("agent h1"), "{failed}");
        assert!(!failed.contains("not reported"), "{failed}");
        // A paused rollout says where it stands, and why.
        let mut paused = job.clone();
        paused.status.as_mut().unwrap().rollout = Some(caravan_api::v1alpha1::RolloutStatus {
            batch: 2,
            batches: 3,
            released: 3,
            paused: Some("1 of the 2 finished destinations of batch 2 failed (threshold 1)".into()),
            ..Default::default()
        });
        let text = render(&paused, &sites, &agents, &packages, false);
        assert!(
            text.starts_with(
                "job j: Progressing 2/4 succeeded, 1 failed, 1 pending; batch 2/3, 3 have the job\n\
                 rollout paused: 1 of the 2 finished destinations of batch 2 failed (threshold 1) \
                 (go on with `caravan job resume`)\nsite hq: 1/1\n"
            ),
            "{text}"
        );
    }
}
