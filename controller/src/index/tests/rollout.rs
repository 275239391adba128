//! Rollouts: batches, the failure gate, resume, waits, site partitions.

use std::{collections::BTreeSet, sync::Arc};

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::*,
    wire::AssignmentPhase,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::super::{fixtures::*, status::*, *};
use super::condition;

/// A job's world, computed again and again as the engine would: each
/// round's status is the next round's starting point.
struct World {
    sites: Vec<Arc<Site>>,
    agents: Vec<Agent>,
    packages: Vec<Arc<Package>>,
    job: DistributionJob,
    now: Now,
}

struct Round {
    plan: Plan,
    status: DistributionJobStatus,
    events: Vec<kube::runtime::events::Event>,
}

impl World {
    fn new(sites: Vec<Arc<Site>>, agents: Vec<Agent>, rollout: Option<Rollout>) -> Self {
        let mut job = job("j", &["hello"]).to_site_and_lower("hq");
        job.spec.rollout = rollout;
        World {
            sites,
            agents,
            packages: all([package("hello", "1.0.0")]),
            job,
            now: at("12:00"),
        }
    }

    fn round(&mut self) -> Round {
        let agents: Vec<Arc<Agent>> = self.agents.iter().cloned().map(Arc::new).collect();
        let jobs = all([self.job.clone()]);
        let plan = Plan::compute(&self.sites, &agents, &jobs, &self.packages, &[], self.now);
        let status = job_status(
            &jobs[0],
            plan.jobs.get(&key("j")),
            &agent_index(&agents),
            self.now,
        );
        let events = job_events(self.job.status.as_ref(), &status);
        self.job.status = Some(status.clone());
        Round {
            plan,
            status,
            events,
        }
    }

    /// Agent `name` reports `phase` for the job's package (`retry`: it
    /// tries again).
    fn report(&mut self, name: &str, phase: AssignmentPhase, retry: bool) {
        let digest = digest_of("hello", "1.0.0");
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.metadata.name.as_deref() == Some(name))
            .unwrap();
        a.status = None;
        *a = a.clone().reporting("j", "hello", digest, phase, "");
        if retry {
            a.status.as_mut().unwrap().jobs[0].retry_at = Some("2026-12-01T12:05:00Z".into());
        }
    }
}

impl Round {
    /// The agents given the job, in the desired states the relays serve.
    fn released(&self) -> BTreeSet<String> {
        self.plan
            .by_site
            .values()
            .flat_map(|m| m.iter())
            .filter(|(_, d)| d.assignments().next().is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn rollout(&self) -> &RolloutStatus {
        self.status.rollout.as_ref().expect("a rollout status")
    }

    fn reasons(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.reason.as_str()).collect()
    }
}

fn agents(n: usize, site: &str) -> Vec<Agent> {
    (0..n).map(|i| agent(&format!("a{i:02}"), site)).collect()
}

fn size(s: &str) -> Option<IntOrString> {
    Some(IntOrString::String(s.into()))
}

fn rollout(sizes: &[&str]) -> Rollout {
    Rollout {
        batches: sizes
            .iter()
            .map(|s| Batch {
                size: size(s),
                sites: vec![],
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn a_job_without_a_rollout_reaches_one_destination_then_ten_percent_then_the_rest() {
    let mut w = World::new(all([site("hq")]), agents(20, "hq"), None);
    let r = w.round();
    let first = r.released();
    assert_eq!(first.len(), 1);
    assert_eq!(
        (r.rollout().batch, r.rollout().batches, r.rollout().released),
        (1, 3, 1)
    );
    assert_eq!((r.status.phase, r.status.pending), (JobPhase::Pending, 20));
    let progressing = condition(&r.status.conditions, conditions::PROGRESSING);
    assert_eq!(progressing.status, "True");
    assert_eq!(
        progressing.message,
        "batch 1 of 3: 1 of 20 destinations have the job"
    );
    // The others hold the package (nothing of it is removed there).
    let hq = &r.plan.by_site[&key("hq")];
    let waiting = hq.keys().find(|n| !first.contains(*n)).unwrap();
    assert_eq!(hq[waiting].hold, ["hello"]);
    // The same destination is first however the agents are listed.
    w.agents.reverse();
    assert_eq!(w.round().released(), first);

    // It started: it keeps the job; once it succeeded, 10% (2) have it.
    let a = first.first().unwrap().clone();
    w.report(&a, AssignmentPhase::Installing, false);
    assert_eq!(w.round().released(), first);
    w.report(&a, AssignmentPhase::Succeeded, false);
    let r = w.round();
    assert_eq!((r.rollout().batch, r.released().len()), (2, 2));
    assert!(r.released().is_superset(&first));
    assert_eq!(r.reasons(), ["BatchStarted"]);
    let second: Vec<String> = r.released().difference(&first).cloned().collect();
    w.report(&second[0], AssignmentPhase::Succeeded, false);
    let r = w.round();
    assert_eq!((r.rollout().batch, r.released().len()), (3, 20));
    assert_eq!(w.round().reasons(), Vec::<&str>::new(), "told once");
}

#[test]
fn a_rollout_pauses_at_its_failure_threshold_and_resume_goes_on_with_the_next_batch() {
    let mut gate = rollout(&["2", "50%", "100%"]);
    gate.failure_threshold = Some(IntOrString::Int(1));
    gate.min_completed = Some(2);
    let mut w = World::new(all([site("hq")]), agents(10, "hq"), Some(gate));
    let first: Vec<String> = w.round().released().into_iter().collect();
    assert_eq!(first.len(), 2);
    // A failure tried again does not count; one given up does, once
    // enough of the batch finished.
    w.report(&first[0], AssignmentPhase::Failed, true);
    w.report(&first[1], AssignmentPhase::Succeeded, false);
    assert!(w.round().rollout().paused.is_none());
    w.report(&first[0], AssignmentPhase::Failed, false);
    let r = w.round();
    let why = "1 of the 2 finished destinations of batch 1 failed (threshold 1)";
    assert_eq!(r.rollout().paused.as_deref(), Some(why));
    assert_eq!((r.status.phase, r.released().len()), (JobPhase::Paused, 2));
    let paused = condition(&r.status.conditions, conditions::PAUSED);
    assert_eq!(
        (paused.status.as_str(), paused.reason.as_str()),
        ("True", reasons::FAILURE_THRESHOLD)
    );
    assert!(paused.message.starts_with(why), "{}", paused.message);
    assert_eq!(
        condition(&r.status.conditions, conditions::PROGRESSING).status,
        "False"
    );
    assert_eq!(r.reasons(), ["RolloutPaused"]);
    assert_eq!(r.events[0].action, "Batch1");
    // Paused it stays, however long.
    w.now = at("15:00");
    assert_eq!(w.round().released().len(), 2);

    // Resumed: the next batch (half of ten) gets the job.
    w.job.spec.rollout.as_mut().unwrap().resume = 1;
    let r = w.round();
    assert_eq!(
        (
            r.rollout().batch,
            r.rollout().paused.clone(),
            r.released().len()
        ),
        (2, None, 5)
    );
    assert_eq!(r.reasons(), ["RolloutResumed", "BatchStarted"]);
    assert_eq!(r.status.phase, JobPhase::Progressing);
    // The gate counts each batch afresh: two successes of batch 2 do not
    // pause it for batch 1's failure.
    let first: BTreeSet<String> = first.into_iter().collect();
    let second: Vec<String> = r.released().difference(&first).cloned().collect();
    w.report(&second[0], AssignmentPhase::Succeeded, false);
    w.report(&second[1], AssignmentPhase::Succeeded, false);
    assert!(w.round().rollout().paused.is_none());
    // Lowered (a revert in Git): noted, nothing moves.
    w.job.spec.rollout.as_mut().unwrap().resume = 0;
    let r = w.round();
    assert_eq!((r.rollout().batch, r.rollout().resumed), (2, 0));
    // A resume while a batch is under way does not wait for it.
    w.job.spec.rollout.as_mut().unwrap().resume = 1;
    assert_eq!(w.round().released().len(), 10);
}

#[test]
fn a_destination_with_nothing_to_do_does_not_fill_a_batch_and_a_started_one_keeps_its_place() {
    let mut w = World::new(all([site("hq")]), agents(10, "hq"), None);
    let first: Vec<String> = w.round().released().into_iter().collect();
    // The first is not applicable: the first batch takes the next one, so
    // the package is tried somewhere before 10% get it.
    w.report(&first[0], AssignmentPhase::NotApplicable, false);
    let r = w.round();
    assert_eq!((r.rollout().batch, r.released().len()), (1, 2));
    let second: Vec<String> = r
        .released()
        .into_iter()
        .filter(|a| *a != first[0])
        .collect();
    w.report(&second[0], AssignmentPhase::Installing, false);
    // Agents that enroll later, whatever their place in the order, do not
    // take the place of the one that started.
    w.agents
        .extend((0..40).map(|i| agent(&format!("late-{i:02}"), "hq")));
    let r = w.round();
    assert!(r.released().contains(&second[0]));
    assert_eq!((r.rollout().batch, r.released().len()), (1, 2));
}

#[test]
fn a_rollout_made_unreadable_stands_still_and_takes_nothing_back() {
    let mut w = World::new(
        all([site("hq")]),
        agents(4, "hq"),
        Some(rollout(&["1", "100%"])),
    );
    let first = w.round().released();
    let a = first.first().unwrap().clone();
    w.report(&a, AssignmentPhase::Installing, false);
    w.round();
    // An unknown site in a batch, then a size that is not one.
    let mut bad = rollout(&["1", "100%"]);
    bad.batches[0].sites = vec!["atlantis".into()];
    w.job.spec.rollout = Some(bad);
    let r = w.round();
    let refs = condition(&r.status.conditions, conditions::RESOLVED_REFS);
    assert_eq!(refs.reason, reasons::INVALID_ROLLOUT);
    assert!(
        refs.message
            .starts_with("rollout.batches[0].sites: site atlantis not found"),
        "{}",
        refs.message
    );
    assert_eq!(r.released(), first, "the one that started keeps the job");
    assert_eq!(r.rollout().batch, 1, "where it stood");
    w.report(&a, AssignmentPhase::Succeeded, false);
    assert_eq!(w.round().released(), first, "and nothing moves");
    w.job.spec.rollout = Some(rollout(&["1", "100%"]));
    assert_eq!(w.round().released().len(), 4);
}

#[test]
fn a_wait_between_batches_holds_the_next_and_the_engine_wakes_for_it() {
    let mut slow = rollout(&["1", "100%"]);
    slow.wait = Some("10m".into());
    let mut w = World::new(all([site("hq")]), agents(3, "hq"), Some(slow));
    let first = w.round().released();
    w.report(first.first().unwrap(), AssignmentPhase::Succeeded, false);
    let r = w.round();
    assert_eq!(r.released(), first, "waits");
    assert_eq!(r.rollout().finished_at, Some(at("12:00")));
    let jobs = all([w.job.clone()]);
    assert_eq!(next_boundary(&jobs, at("12:00")), Some(at("12:10")));
    w.now = at("12:09");
    assert_eq!(w.round().released().len(), 1);
    w.now = at("12:10");
    assert_eq!(w.round().released().len(), 3);
}

#[test]
fn site_partitions_come_first_and_a_new_version_starts_the_rollout_again() {
    let sites = all([
        site("hq"),
        site("pilot").below("hq"),
        site("pilot-2").below("pilot"),
    ]);
    let mut list = agents(4, "hq");
    list.push(agent("p1", "pilot"));
    list.push(agent("p2", "pilot-2"));
    let partitioned = Rollout {
        batches: vec![
            Batch {
                size: size("100%"),
                sites: vec!["pilot".into()],
            },
            Batch {
                size: size("100%"),
                sites: vec![],
            },
        ],
        ..Default::default()
    };
    let mut w = World::new(sites, list, Some(partitioned));
    let pilot = BTreeSet::from(["p1".to_string(), "p2".to_string()]);
    assert_eq!(
        w.round().released(),
        pilot,
        "the pilot site and below first"
    );
    w.report("p1", AssignmentPhase::Succeeded, false);
    w.report("p2", AssignmentPhase::Succeeded, false);
    assert_eq!(w.round().released().len(), 6);
    assert_eq!(
        w.job
            .status
            .as_ref()
            .unwrap()
            .rollout
            .as_ref()
            .unwrap()
            .batch,
        2
    );

    // Version 2: the pilot site first again (the reports are for 1).
    w.packages = all([package("hello", "1.0.0"), package("hello", "2.0.0")]);
    let r = w.round();
    assert_eq!((r.rollout().batch, r.released()), (1, pilot));
    assert!(r.reasons().is_empty(), "{:?}", r.reasons());
}

#[test]
fn a_rollout_that_cannot_be_read_gives_the_job_to_nobody_and_says_why() {
    let mut w = World::new(
        all([site("hq")]),
        agents(3, "hq"),
        Some(rollout(&["0", "100%"])),
    );
    let r = w.round();
    assert!(r.released().is_empty());
    let refs = condition(&r.status.conditions, conditions::RESOLVED_REFS);
    assert_eq!(refs.reason, reasons::INVALID_ROLLOUT);
    assert!(
        refs.message.starts_with("rollout.batches[0].size \"0\": "),
        "{}",
        refs.message
    );
    assert!(r.plan.by_site[&key("hq")]["a00"]
        .hold
        .contains(&"hello".to_string()));
}
