//! The plan: what every job resolves to (its packages, sites and target
//! agents, or the references that did not resolve) and what every agent
//! must have as a result.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use caravan_api::{conditions::reasons, selector, v1alpha1::*, wire::Assignment, Digest};
use kube::{Resource, ResourceExt};

use super::{
    desired::{AgentPlan, Assigned},
    key_of, name, namespace, requires,
    rollout::{self, Destination, Gate},
    Now, ObjectKey, SiteKey,
};

/// What every job resolves to, and every agent's desired state.
#[derive(Default, Debug)]
pub struct Plan {
    /// Per site, per agent name: what the agent must have. Every known agent
    /// has an entry, so an agent no job targets gets an explicit empty state.
    pub by_site: HashMap<SiteKey, BTreeMap<String, AgentPlan>>,
    /// Per site, per agent name: the public key of each served agent that
    /// enrolled with one.
    pub agent_keys: HashMap<SiteKey, BTreeMap<String, String>>,
    /// Per site: the agents enrolled there that are not served, in name order.
    pub unserved: HashMap<SiteKey, Vec<String>>,
    /// Per job: targets and problems.
    pub jobs: HashMap<ObjectKey, JobPlan>,
}

#[derive(Default, Debug)]
pub struct JobPlan {
    /// Agent name → the assignments this job gives it (shared by the
    /// agents that have them as they are).
    pub targets: BTreeMap<String, Arc<Assigned>>,
    /// Names of the packages whose reference did not resolve.
    pub unresolved: Vec<String>,
    /// Sites the job is aimed at (with those below, where it says so).
    pub sites: BTreeSet<String>,
    /// Blobs the job installs.
    pub digests: Vec<Digest>,
    /// `(reason, message)` of each reference that did not resolve.
    pub problems: Vec<(&'static str, String)>,
    /// The packages (by digest) the job has: another set starts its
    /// rollout again.
    pub revision: String,
    /// Who has the job so far and where its rollout stands (`None`: the
    /// rollout cannot be read, and nobody new gets the job).
    pub rollout: Option<Gate>,
}

impl Plan {
    pub fn compute(
        sites: &[Arc<Site>],
        agents: &[Arc<Agent>],
        jobs: &[Arc<DistributionJob>],
        packages: &[Arc<Package>],
        cabinets: &[Arc<Cabinet>],
        now: Now,
    ) -> Self {
        // Agents by (namespace, name), borrowed: nothing is copied per agent
        // to find one.
        let by_name: HashMap<(&str, &str), &Agent> = agents
            .iter()
            .map(|a| ((namespace(a.as_ref()), name(a.as_ref())), a.as_ref()))
            .collect();
        // Every served agent's entry, by (namespace, site). An agent not
        // approved (awaiting approval, or revoked) has none: its relay turns
        // it away, and it keeps what it has.
        let mut served: HashMap<(&str, &str), BTreeMap<String, AgentPlan>> = HashMap::new();
        let mut agent_keys: HashMap<(&str, &str), BTreeMap<String, String>> = HashMap::new();
        let mut unserved: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        for a in agents.iter() {
            let (ns, agent) = (namespace(a.as_ref()), name(a.as_ref()));
            if !a.spec.approved {
                unserved
                    .entry((ns, a.spec.site.as_str()))
                    .or_default()
                    .push(agent.to_string());
                continue;
            }
            let entry = AgentPlan {
                agent: agent.to_string(),
                ..Default::default()
            };
            served
                .entry((ns, a.spec.site.as_str()))
                .or_default()
                .insert(agent.to_string(), entry);
            if !a.spec.public_key.is_empty() {
                agent_keys
                    .entry((ns, a.spec.site.as_str()))
                    .or_default()
                    .insert(agent.to_string(), a.spec.public_key.clone());
            }
        }
        let mut jobs: Vec<_> = jobs.iter().collect();
        // A fixed order, so that the same inputs always give the same desired state.
        jobs.sort_by_key(|j| key_of(j.as_ref()));
        let mut resolved: Vec<_> = jobs
            .iter()
            .map(|job| {
                resolve_job(
                    job,
                    namespace(job.as_ref()),
                    sites,
                    agents,
                    packages,
                    cabinets,
                )
            })
            .collect();
        settle_conflicts(&jobs, &mut resolved);
        for (job, job_plan) in jobs.iter().zip(resolved.iter_mut()) {
            let ns = namespace(job.as_ref());
            let destinations: Vec<Destination> = job_plan
                .targets
                .iter()
                .map(|(name, assignments)| {
                    let agent = by_name.get(&(ns, name.as_str())).copied();
                    Destination {
                        agent: name,
                        site: agent.map_or("", |a| &a.spec.site),
                        progress: rollout::progress(agent, assignments, now),
                    }
                })
                .collect();
            let rollout = Rollout::plan(job.spec.rollout.as_ref()).and_then(|r| {
                let known = |s: &String| {
                    sites
                        .iter()
                        .any(|x| namespace(x.as_ref()) == ns && name(x.as_ref()) == s)
                };
                match r
                    .batches
                    .iter()
                    .enumerate()
                    .find_map(|(i, b)| b.sites.iter().find(|s| !known(s)).map(|s| (i, s)))
                {
                    Some((i, s)) => Err(format!(
                        "rollout.batches[{i}].sites: site {s} not found in namespace {ns}"
                    )),
                    None => Ok(r),
                }
            });
            let gate = match rollout {
                Ok(rollout) => rollout::gate(
                    job,
                    &rollout,
                    &destinations,
                    |s| with_lower(sites, ns, s),
                    &job_plan.revision,
                    now,
                ),
                Err(e) => {
                    job_plan.problems.push((
                        reasons::INVALID_ROLLOUT,
                        format!("{e}: the rollout stands still"),
                    ));
                    rollout::frozen(job, &destinations)
                }
            };
            job_plan.rollout = Some(gate);
        }
        let mut plan = Plan::default();
        for (job, job_plan) in jobs.into_iter().zip(resolved) {
            let (ns, job_name) = (namespace(job.as_ref()), name(job.as_ref()));
            let job_key = format!("{ns}/{job_name}");
            for (agent, assignments) in &job_plan.targets {
                let Some(a) = by_name
                    .get(&(ns, agent.as_str()))
                    .filter(|a| a.spec.approved)
                else {
                    continue;
                };
                let Some(entry) = served
                    .get_mut(&(ns, a.spec.site.as_str()))
                    .and_then(|m| m.get_mut(agent.as_str()))
                else {
                    continue;
                };
                let released = job_plan
                    .rollout
                    .as_ref()
                    .is_some_and(|g| g.released.contains(agent));
                if job.spec.suspend || !released {
                    // A suspended job keeps what it installed where it is
                    // (and one that did not reach the agent yet holds what
                    // is there, so another job losing it removes nothing).
                    // (What the agent reports the job installed, too: a
                    // package the job dropped is not removed before the
                    // rollout reaches the agent.)
                    let reported = a
                        .status
                        .as_ref()
                        .into_iter()
                        .flat_map(|s| s.jobs.iter())
                        .filter(|j| j.job == job_key)
                        .map(|j| j.package.clone());
                    entry
                        .hold
                        .extend(job.spec.packages.iter().map(|p| p.name.clone()));
                    entry.hold.extend(reported);
                } else {
                    if !assignments.is_empty() {
                        entry.assigned.push(assignments.clone());
                    }
                    entry.hold.extend(job_plan.unresolved.iter().cloned());
                }
            }
            plan.jobs
                .insert((ns.to_string(), job_name.to_string()), job_plan);
        }
        let owned = |(ns, site): (&str, &str)| (ns.to_string(), site.to_string());
        plan.by_site = served.into_iter().map(|(k, v)| (owned(k), v)).collect();
        plan.agent_keys = agent_keys.into_iter().map(|(k, v)| (owned(k), v)).collect();
        plan.unserved = unserved
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_unstable();
                (owned(k), v)
            })
            .collect();
        for entry in plan.by_site.values_mut().flat_map(|m| m.values_mut()) {
            entry.hold.sort();
            entry.hold.dedup();
        }
        plan
    }
}

/// Where jobs disagree about a package on one agent (another version, or
/// install against uninstall), the one that takes precedence keeps it —
/// the highest `priority`, then the newest, then the first by name — and
/// the others' assignments of it there are marked superseded by it; but a
/// job that only needs it as a dependency leaves it to the winner when the
/// winner's version is in range (and says so when it is not).
/// A suspended job takes part as it is: pausing the winner changes
/// nothing installed (its packages are held), it does not hand them over.
fn settle_conflicts(jobs: &[&Arc<DistributionJob>], plans: &mut [JobPlan]) {
    // Only an agent two jobs or more target can be claimed twice.
    let mut jobs_of: HashMap<(&str, &str), u32> = HashMap::new();
    for (job, plan) in jobs.iter().zip(plans.iter()) {
        for agent in plan.targets.keys() {
            *jobs_of.entry((namespace(job.as_ref()), agent)).or_default() += 1;
        }
    }
    // (namespace, agent, package) → every job's claim on it.
    let mut claims: BTreeMap<(&str, &str, &str), Vec<Claim>> = BTreeMap::new();
    for (j, (job, plan)) in jobs.iter().zip(plans.iter()).enumerate() {
        let ns = namespace(job.as_ref());
        for (agent, assignments) in &plan.targets {
            if jobs_of[&(ns, agent.as_str())] < 2 {
                continue;
            }
            for (i, a) in assignments.iter().enumerate() {
                claims
                    .entry((ns, agent, &a.package))
                    .or_default()
                    .push((j, i));
            }
        }
    }
    let precedence = |j: usize| {
        let job = jobs[j];
        (
            job.spec.priority,
            job.meta().creation_timestamp.clone(),
            std::cmp::Reverse(job.name_any()),
        )
    };
    let mut superseded = Vec::new();
    let mut met = Vec::new();
    let mut problems = Vec::new();
    for ((_, agent, _), claims) in claims.iter().filter(|(_, c)| c.len() > 1) {
        let &(w, wi) = claims
            .iter()
            .max_by_key(|(j, _)| precedence(*j))
            .expect("two claims or more");
        let winner = &plans[w].targets[*agent][wi];
        for &(j, i) in claims.iter().filter(|(j, _)| *j != w) {
            let mine = &plans[j].targets[*agent];
            let a = &mine[i];
            let agrees = a.action == winner.action
                && (a.action == JobAction::Uninstall || a.digest == winner.digest);
            if agrees {
                continue;
            }
            // A dependency the winner's version meets (in range for every
            // package of the job that requires it) is left to the winner,
            // its rollout and its suspension: the job's packages wait for it.
            let ranges = || {
                mine.iter()
                    .filter(|d| a.required_by.contains(&d.package))
                    .flat_map(|d| &d.install.requires)
                    .filter(|r| r.name == a.package)
            };
            if a.required_by.is_empty() {
                superseded.push((j, agent.to_string(), i, winner.job.clone()));
            } else if winner.action == JobAction::Install
                && ranges().all(|r| r.admits(&winner.version).unwrap_or(false))
            {
                met.push((j, agent.to_string(), i));
            } else {
                let problem = format!(
                    "package {} requires {}, but job {} takes precedence with {} {}",
                    a.required_by.join(", "),
                    ranges()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(" and "),
                    winner.job,
                    a.package,
                    match winner.action {
                        JobAction::Install => winner.version.as_str(),
                        JobAction::Uninstall => "uninstalled",
                    }
                );
                problems.push((j, problem));
                superseded.push((j, agent.to_string(), i, winner.job.clone()));
            }
        }
    }
    for (j, agent, i, winner) in superseded {
        Assigned::edit(plans[j].targets.get_mut(&agent).expect("claimed"))[i].superseded_by =
            Some(winner);
    }
    for (j, problem) in problems {
        if !plans[j].problems.iter().any(|(_, p)| *p == problem) {
            plans[j].problems.push((reasons::CONFLICT, problem));
        }
    }
    // Dropped last, from the end, so the positions above hold.
    met.sort();
    for (j, agent, i) in met.into_iter().rev() {
        Assigned::edit(plans[j].targets.get_mut(&agent).expect("claimed")).remove(i);
    }
}

/// A job's claim on a package: the job's index, the assignment's position.
type Claim = (usize, usize);

/// `name` and every site below it, recursively, in namespace `ns`.
fn with_lower(sites: &[Arc<Site>], ns: &str, name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::from([name.to_string()]);
    let mut frontier = vec![name.to_string()];
    while let Some(parent) = frontier.pop() {
        for s in sites
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(ns))
        {
            if s.spec.parent.as_deref() == Some(&parent) && found.insert(s.name_any()) {
                frontier.push(s.name_any());
            }
        }
    }
    found
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

    let mut chosen = Vec::new();
    for r in &job.spec.packages {
        let in_namespace = packages.iter().filter(|p| namespace(p.as_ref()) == ns);
        match r.choose(in_namespace, |p| &p.spec) {
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

    if let Some(schedule) = &job.spec.schedule {
        if let (Some(start), Some(end)) = (schedule.not_before, schedule.deadline) {
            if end <= start {
                plan.problems.push((
                    reasons::INVALID_SCHEDULE,
                    format!("schedule.deadline {end} is not after schedule.notBefore {start}: every destination expires"),
                ));
            }
        }
        if let Err(e) = schedule.check() {
            plan.problems
                .push((reasons::INVALID_SCHEDULE, format!("{e}: nothing installs")));
        }
    }
    if let Some(Err(e)) = job.spec.deferral.as_ref().map(|d| d.delay()) {
        plan.problems.push((
            reasons::INVALID_SCHEDULE,
            format!("{e}: nothing is deferred"),
        ));
    }
    let site_names: BTreeSet<String> = sites
        .iter()
        .filter(|s| namespace(s.as_ref()) == ns)
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
        if d.include_lower {
            target_sites.extend(with_lower(sites, ns, &d.name));
        } else {
            target_sites.insert(d.name.clone());
        }
    }
    let dest = &job.spec.destinations;
    let agent_names: HashSet<&str> = match dest.agents.is_empty() {
        true => HashSet::new(),
        false => agents
            .iter()
            .filter(|a| namespace(a.as_ref()) == ns)
            .map(|a| name(a.as_ref()))
            .collect(),
    };
    for name in dest
        .agents
        .iter()
        .filter(|n| !agent_names.contains(n.as_str()))
    {
        plan.problems.push((
            reasons::UNKNOWN_AGENT,
            format!("agent {name} not found in namespace {ns}"),
        ));
    }
    // A selector that is not one is a problem, and selects nobody (an
    // exclusion that is not one leaves every agent out: nothing is
    // installed where the administrator meant to hold it back).
    let exclude = dest.exclude.clone().unwrap_or_default();
    for (what, sel) in [
        ("agentSelector", &dest.agent_selector),
        ("exclude.agentSelector", &exclude.agent_selector),
    ] {
        if let Some(Err(e)) = sel.as_ref().map(selector::validate) {
            plan.problems
                .push((reasons::INVALID_SELECTOR, format!("{what}: {e}")));
        }
    }
    let matches = |sel: &Option<selector::LabelSelector>, a: &Agent, invalid: bool| {
        sel.as_ref()
            .is_some_and(|s| selector::matches(s, a.labels()).unwrap_or(invalid))
    };
    let named =
        |names: &[String], a: &Agent| names.iter().any(|n| a.meta().name.as_ref() == Some(n));
    let selected = |a: &Agent| {
        (target_sites.contains(&a.spec.site)
            || named(&dest.agents, a)
            || matches(&dest.agent_selector, a, false))
            && !named(&exclude.agents, a)
            && !matches(&exclude.agent_selector, a, true)
    };
    // An install brings the packages its packages require, first.
    let chosen: Vec<(&Package, Vec<String>)> = match job.spec.action {
        JobAction::Install => {
            let named: Vec<&Package> = chosen.iter().map(|p| p.as_ref()).collect();
            let pool: Vec<&Package> = packages
                .iter()
                .filter(|p| namespace(p.as_ref()) == ns)
                .map(|p| p.as_ref())
                .collect();
            let (order, failed) = requires::resolve(&named, &pool);
            for (p, why) in failed {
                plan.unresolved.push(p.spec.name.clone());
                plan.problems.push((reasons::UNRESOLVED_DEPENDENCY, why));
            }
            order
                .into_iter()
                .map(|r| (r.package, r.required_by))
                .collect()
        }
        JobAction::Uninstall => {
            requires::dependents_first(chosen.iter().map(|p| p.as_ref()).collect())
                .into_iter()
                .map(|p| (p, vec![]))
                .collect()
        }
    };
    let assignments: Vec<Assignment> = chosen
        .into_iter()
        .map(|(p, required_by)| Assignment {
            job: job_key.clone(),
            action: job.spec.action,
            package: p.spec.name.clone(),
            version: p.spec.version.clone(),
            digest: p.spec.artifact.digest,
            size: p.spec.artifact.size,
            install: p.spec.install.clone(),
            signatures: p.spec.signatures.clone(),
            repair: job.spec.repair,
            allow_downgrade: job.spec.allow_downgrade,
            retries: job.spec.retries,
            retry_generation: job.spec.retry.as_ref().map_or(0, |r| r.generation),
            retry_excluded: false,
            superseded_by: None,
            schedule: job.spec.schedule.clone().unwrap_or_default(),
            optional: job.spec.optional,
            deferral: job.spec.deferral.clone(),
            required_by,
            require_signature: cabinets.iter().any(|c| {
                namespace(c.as_ref()) == ns
                    && c.name_any() == p.spec.cabinet
                    && c.spec.require_signatures
            }),
        })
        .collect();
    if job.spec.action == JobAction::Install {
        plan.digests = assignments.iter().map(|a| a.digest).collect();
    }
    let packages: String = assignments
        .iter()
        .map(|a| format!("{:?} {} {}\n", a.action, a.package, a.digest))
        .collect();
    plan.revision = Digest::of(packages.as_bytes()).hex()[..16].to_string();
    plan.sites = target_sites.clone();
    // A retry reaches the agents it names and those of its sites (and
    // below); one that names neither reaches every destination.
    let retry = job.spec.retry.as_ref().map(|r| {
        let sites: BTreeSet<String> = r
            .sites
            .iter()
            .flat_map(|s| with_lower(sites, ns, s))
            .collect();
        let everyone = r.sites.is_empty() && r.agents.is_empty();
        move |a: &Agent| everyone || sites.contains(&a.spec.site) || named(&r.agents, a)
    });
    // Shared by every target: one list for those a retry reaches (or
    // every one), another for those it does not.
    let excluded = retry.as_ref().map(|_| {
        let excluded = assignments.iter().cloned().map(|a| Assignment {
            retry_excluded: true,
            ..a
        });
        Assigned::new(excluded.collect())
    });
    let assignments = Assigned::new(assignments);
    for a in agents
        .iter()
        .filter(|a| namespace(a.as_ref()) == ns && a.spec.approved && selected(a))
    {
        let mine = match (&retry, &excluded) {
            (Some(reaches), Some(excluded)) if !reaches(a) => excluded,
            _ => &assignments,
        };
        plan.targets
            .insert(name(a.as_ref()).to_string(), mine.clone());
    }
    plan
}
