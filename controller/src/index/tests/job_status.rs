//! A job's status: what counts, failures, conflicts, retries, schedules.

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::*,
    wire::AssignmentPhase,
};
use kube::ResourceExt as _;

use super::super::{fixtures::*, status::*, *};
use super::condition;

#[test]
fn job_status_counts_only_reports_for_the_current_digest() {
    let jobs = all([job("j", &["hello"]).to_site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let older = digest_of("hello", "0.9.0");
    let agents = all([
        agent("a1", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, ""),
        agent("a2", "hq").reporting(
            "j",
            "hello",
            digest,
            AssignmentPhase::Failed,
            "digest mismatch",
        ),
        // An older version's success does not count.
        agent("a3", "hq").reporting("j", "hello", older, AssignmentPhase::Succeeded, ""),
    ]);
    let plan = Plan::compute(
        &all([site("hq")]),
        &agents,
        &jobs,
        &packages,
        &[],
        at("12:00"),
    );
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        now(),
    );
    assert_eq!(
        (st.total, st.succeeded, st.failed, st.pending),
        (3, 1, 1, 1)
    );
    assert_eq!(st.progress, "1/3");
    assert_eq!(st.phase, JobPhase::Progressing);
    assert_eq!(st.failures[0].reason, "digest mismatch");
    assert_eq!(st.sites[0].site, "hq");
}

#[test]
fn a_destination_that_recovered_leaves_no_failure_in_the_status() {
    let jobs = all([job("j", &["hello"]).to_site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let status_with = |phase, message: &str| {
        let agents = all([agent("a1", "hq").reporting("j", "hello", digest, phase, message)]);
        let plan = Plan::compute(
            &all([site("hq")]),
            &agents,
            &jobs,
            &packages,
            &[],
            at("12:00"),
        );
        job_status(
            &jobs[0],
            plan.jobs.get(&key("j")),
            &agent_index(&agents),
            now(),
        )
    };
    let failed = status_with(AssignmentPhase::Failed, "digest mismatch");
    assert_eq!((failed.phase, failed.failures.len()), (JobPhase::Failed, 1));
    assert_eq!(
        condition(&failed.conditions, conditions::FAILED).status,
        "True"
    );
    let recovered = status_with(AssignmentPhase::Succeeded, "");
    assert_eq!(recovered.phase, JobPhase::Succeeded);
    assert!(recovered.failures.is_empty(), "{:?}", recovered.failures);
    assert_eq!(
        condition(&recovered.conditions, conditions::FAILED).status,
        "False"
    );
    assert_eq!(
        condition(&recovered.conditions, conditions::COMPLETE).status,
        "True"
    );
}

#[test]
fn a_job_whose_package_does_not_exist_never_shows_succeeded() {
    // hello resolves and is installed everywhere; nope does not exist.
    let jobs = all([job("j", &["hello", "nope"]).to_site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let agents =
        all([agent("a1", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, "")]);
    let plan = Plan::compute(
        &all([site("hq")]),
        &agents,
        &jobs,
        &packages,
        &[],
        at("12:00"),
    );
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        now(),
    );
    assert_eq!(
        (st.succeeded, st.pending, st.progress.as_str()),
        (0, 1, "0/1")
    );
    assert_ne!(st.phase, JobPhase::Succeeded);
    assert_eq!(
        condition(&st.conditions, conditions::COMPLETE).status,
        "False"
    );
    assert_eq!(condition(&st.conditions, conditions::READY).status, "False");
    assert_eq!(
        condition(&st.conditions, conditions::RESOLVED_REFS).status,
        "False"
    );
}

#[test]
fn three_thousand_failures_keep_the_job_status_small() {
    let jobs = all([job("j", &["hello"]).to_site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let tail = "x".repeat(2048);
    let agents = all((0..3000).map(|i| {
        agent(&format!("a{i:04}"), "hq").reporting(
            "j",
            "hello",
            digest,
            AssignmentPhase::Failed,
            &tail,
        )
    }));
    let plan = Plan::compute(
        &all([site("hq")]),
        &agents,
        &jobs,
        &packages,
        &[],
        at("12:00"),
    );
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        now(),
    );
    assert_eq!((st.failed, st.phase), (3000, JobPhase::Failed));
    assert_eq!(st.failures.len(), MAX_FAILURES_LISTED);
    assert_eq!(st.failures[0].agent, "a0000", "the first by agent name");
    assert!(st
        .failures
        .iter()
        .all(|f| f.reason.len() <= MAX_FAILURE_REASON_BYTES + '…'.len_utf8()));
    let bytes = serde_json::to_vec(&st).unwrap().len();
    assert!(bytes < 100 << 10, "{bytes} bytes");
    assert!(condition(&st.conditions, conditions::FAILED)
        .message
        .contains("3000 destination(s) failed"));
}

#[test]
fn a_destination_the_package_is_not_for_is_not_applicable_and_the_job_completes() {
    let jobs = all([job("j", &["hello"]).to_site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let agents = all([
        agent("linux", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, ""),
        agent("plan9", "hq").reporting(
            "j",
            "hello",
            digest,
            AssignmentPhase::NotApplicable,
            "requirement not met: package hello needs os linux (this endpoint runs plan9)",
        ),
    ]);
    let plan = Plan::compute(
        &all([site("hq")]),
        &agents,
        &jobs,
        &packages,
        &[],
        at("12:00"),
    );
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        now(),
    );
    assert_eq!(
        (st.total, st.succeeded, st.failed, st.not_applicable),
        (2, 1, 0, 1)
    );
    assert_eq!(
        (st.phase, st.progress.as_str()),
        (JobPhase::Succeeded, "1/1")
    );
    assert!(st.failures.is_empty());
    assert_eq!(st.sites[0].not_applicable, 1);
    assert_eq!(
        condition(&st.conditions, conditions::COMPLETE).status,
        "True"
    );
}

#[test]
fn jobs_that_disagree_about_a_package_settle_it_by_priority_then_age_and_the_loser_shows_conflict()
{
    let sites = all([site("hq")]);
    let agents = all([agent("a1", "hq"), agent("a2", "hq")]);
    let packages = all([package("hello", "1.0.0"), package("hello", "2.0.0")]);
    let old = job("old", &["hello"])
        .at_version("hello", "1.0.0")
        .to_site("hq")
        .created_at("09:00");
    let new = job("new", &["hello"])
        .at_version("hello", "2.0.0")
        .to_agent("a1")
        .created_at("10:00");
    let status_of = |jobs: &[Arc<DistributionJob>], name: &str| {
        let plan = Plan::compute(&sites, &agents, jobs, &packages, &[], at("12:00"));
        let job = jobs.iter().find(|j| j.name_any() == name).unwrap();
        (
            job_status(job, plan.jobs.get(&key(name)), &agent_index(&agents), now()),
            plan,
        )
    };

    // The newest job wins on a1, where both reach; a2 is old's alone.
    let jobs = all([old.clone(), new.clone()]);
    let (st, plan) = status_of(&jobs, "old");
    let a1 = &plan.by_site[&key("hq")]["a1"];
    assert_eq!(
        a1.assignments()
            .map(|a| (a.job.as_str(), a.superseded_by.as_deref()))
            .collect::<Vec<_>>(),
        [("ns/new", None), ("ns/old", Some("ns/new"))]
    );
    assert!(plan.by_site[&key("hq")]["a2"].assigned[0][0]
        .superseded_by
        .is_none());
    assert_eq!((st.total, st.conflict, st.pending), (2, 1, 1));
    assert_eq!(st.sites[0].conflict, 1);
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(ready.reason, reasons::CONFLICT);
    assert!(
        ready
            .message
            .contains("agent a1 has package hello from job ns/new"),
        "{}",
        ready.message
    );
    let (st, _) = status_of(&jobs, "new");
    assert_eq!(st.conflict, 0, "the winner has no conflict");

    // An explicit priority beats age.
    let jobs = all([old.clone().with_priority(10), new.clone()]);
    let (st, _) = status_of(&jobs, "new");
    assert_eq!(st.conflict, 1);
    let (st, _) = status_of(&jobs, "old");
    assert_eq!(st.conflict, 0);

    // Settled with a conflict and nothing else left: the job says so.
    let agents_done = all([agent("a1", "hq")]);
    let jobs = all([old.clone(), new.clone()]);
    let plan = Plan::compute(&sites, &agents_done, &jobs, &packages, &[], at("12:00"));
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("old")),
        &agent_index(&agents_done),
        now(),
    );
    assert_eq!(
        (st.phase, st.progress.as_str()),
        (JobPhase::Conflict, "0/1")
    );

    // Jobs that agree (the same version) do not conflict; an uninstall
    // against an install does, and a suspended winner keeps winning (pausing
    // it changes nothing installed).
    let superseded = |plan: &Plan, job: &str| -> Vec<(String, String)> {
        plan.jobs[&key(job)]
            .targets
            .iter()
            .flat_map(|(agent, asg)| {
                asg.iter()
                    .filter_map(|a| Some((agent.clone(), a.superseded_by.clone()?)))
            })
            .collect()
    };
    let same = job("same", &["hello"])
        .at_version("hello", "2.0.0")
        .to_agent("a1")
        .created_at("11:00");
    let jobs = all([new.clone(), same]);
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
    assert!(superseded(&plan, "new").is_empty() && superseded(&plan, "same").is_empty());
    let remove = job("remove", &["hello"])
        .uninstalling()
        .to_agent("a1")
        .created_at("11:00");
    let jobs = all([new.clone(), remove.clone()]);
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
    let lost = [("a1".to_string(), "ns/remove".to_string())];
    assert_eq!(superseded(&plan, "new"), lost);
    let jobs = all([new, remove.suspended()]);
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
    assert_eq!(superseded(&plan, "new"), lost);
}

#[test]
fn a_package_lost_to_another_job_does_not_hide_the_other_packages_of_the_job() {
    let sites = all([site("hq")]);
    let packages = all([
        package("hello", "1.0.0"),
        package("hello", "2.0.0"),
        package("tools", "1.0.0"),
    ]);
    let jobs = all([
        job("pinned", &["hello"])
            .at_version("hello", "1.0.0")
            .to_site("hq")
            .with_priority(5),
        job("both", &["hello", "tools"]).to_site("hq"),
    ]);
    let tools = digest_of("tools", "1.0.0");
    let status_with = |agent: Agent| {
        let agents = all([agent]);
        let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
        job_status(
            &jobs[1],
            plan.jobs.get(&key("both")),
            &agent_index(&agents),
            now(),
        )
    };
    // tools still installing: the destination is not settled yet.
    let st = status_with(agent("a1", "hq"));
    assert_eq!(
        (st.phase, st.pending, st.conflict),
        (JobPhase::Pending, 1, 0)
    );
    // tools failed: a failure, counted and listed, not hidden by the conflict.
    let st = status_with(agent("a1", "hq").reporting(
        "both",
        "tools",
        tools,
        AssignmentPhase::Failed,
        "exit 3",
    ));
    assert_eq!((st.phase, st.failed, st.conflict), (JobPhase::Failed, 1, 0));
    assert_eq!(st.failures[0].package, "tools");
    // tools done: settled, with hello lost to the pin.
    let st = status_with(agent("a1", "hq").reporting(
        "both",
        "tools",
        tools,
        AssignmentPhase::Succeeded,
        "",
    ));
    assert_eq!((st.phase, st.conflict), (JobPhase::Conflict, 1));
}

#[test]
fn a_retry_reaches_the_agents_of_its_scope_and_a_failure_says_whether_it_is_tried_again() {
    let sites = all([
        site("hq"),
        site("east").below("hq"),
        site("east-1").below("east"),
        site("west").below("hq"),
    ]);
    let digest = digest_of("hello", "1.0.0");
    let failed = |name: &str, site: &str| {
        agent(name, site).reporting("j", "hello", digest, AssignmentPhase::Failed, "exit 1")
    };
    let mut retrying = failed("w1", "west");
    retrying.status.as_mut().unwrap().jobs[0].retry_at = Some("2026-12-06T10:00:00Z".into());
    let agents = all([
        failed("h1", "hq"),
        failed("e1", "east-1"),
        retrying,
        failed("w2", "west"),
    ]);
    let packages = all([package("hello", "1.0.0")]);
    let mut j = job("j", &["hello"]).to_site_and_lower("hq");
    // (agent, generation, excluded from the retry)
    let generations = |j: &DistributionJob| {
        let plan = Plan::compute(
            &sites,
            &agents,
            &all([j.clone()]),
            &packages,
            &[],
            at("12:00"),
        );
        plan.jobs[&key("j")]
            .targets
            .iter()
            .map(|(a, asg)| (a.clone(), asg[0].retry_generation, asg[0].retry_excluded))
            .collect::<Vec<_>>()
    };
    let gens = |g: u32, excluded: [bool; 4]| {
        ["e1", "h1", "w1", "w2"]
            .into_iter()
            .zip(excluded)
            .map(|(a, x)| (a.to_string(), g, x))
            .collect::<Vec<_>>()
    };
    assert_eq!(generations(&j), gens(0, [false; 4]));
    j.spec.retry = Some(Retry {
        generation: 3,
        ..Default::default()
    });
    assert_eq!(generations(&j), gens(3, [false; 4]), "no scope: everyone");
    j.spec.retry = Some(Retry {
        generation: 4,
        sites: vec!["east".into()],
        agents: vec!["w2".into()],
    });
    assert_eq!(
        generations(&j),
        gens(4, [false, true, true, false]),
        "east and below, and w2 by name"
    );

    let plan = Plan::compute(
        &sites,
        &agents,
        &all([j.clone()]),
        &packages,
        &[],
        at("12:00"),
    );
    let st = job_status(&j, plan.jobs.get(&key("j")), &agent_index(&agents), now());
    assert_eq!((st.failed, st.retrying, st.pending), (4, 1, 0));
    let w1 = st.failures.iter().find(|f| f.agent == "w1").unwrap();
    assert_eq!(w1.retry_at.as_deref(), Some("2026-12-06T10:00:00Z"));
    assert!(condition(&st.conditions, conditions::READY)
        .message
        .contains("4 failed (1 to be tried again)"));
}

#[test]
fn a_schedule_holds_installs_until_its_start_and_expires_what_is_not_done_by_its_deadline() {
    let sites = all([site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let j = job("j", &["hello"])
        .to_site("hq")
        .scheduled(Some("13:00"), Some("14:00"));
    let jobs = all([j]);
    let agents = all([
        agent("done", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, ""),
        agent("ready", "hq").reporting("j", "hello", digest, AssignmentPhase::Downloaded, ""),
        agent("busy", "hq").reporting("j", "hello", digest, AssignmentPhase::Installing, ""),
        agent("away", "hq"),
    ]);
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
    let a = &plan.jobs[&key("j")].targets["away"][0];
    assert_eq!(
        (a.schedule.not_before, a.schedule.deadline),
        (Some(at("13:00")), Some(at("14:00")))
    );
    let status_at = |t: &str| {
        job_status(
            &jobs[0],
            plan.jobs.get(&key("j")),
            &agent_index(&agents),
            at(t),
        )
    };

    // Before the start: pending, one downloaded ahead, and the start told.
    let st = status_at("12:00");
    assert_eq!(
        (st.phase, st.pending, st.downloaded, st.expired),
        (JobPhase::Progressing, 3, 1, 0)
    );
    assert!(condition(&st.conditions, conditions::READY)
        .message
        .contains("installs start at 2026-12-01T13:00:00Z (1 downloaded ahead)"));
    // After the deadline: what had not started expired; the install under way finishes.
    let st = status_at("14:00");
    assert_eq!((st.succeeded, st.expired, st.pending), (1, 2, 1));
    assert_eq!(st.sites[0].expired, 2);
    let agents = all([
        agent("done", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, ""),
        agent("ready", "hq").reporting("j", "hello", digest, AssignmentPhase::Expired, ""),
        agent("busy", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, ""),
        agent("away", "hq"),
    ]);
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        at("15:00"),
    );
    assert_eq!(
        (st.phase, st.progress.as_str(), st.expired),
        (JobPhase::Expired, "2/4", 2)
    );

    // A deadline that is not after the start is a problem, named.
    let bad = job("bad", &["hello"])
        .to_site("hq")
        .scheduled(Some("13:00"), Some("13:00"));
    let plan = Plan::compute(&sites, &agents, &all([bad]), &packages, &[], at("12:00"));
    assert_eq!(
        plan.jobs[&key("bad")].problems[0].0,
        reasons::INVALID_SCHEDULE
    );
    // So is a maintenance window that cannot be read, and the job says the
    // installs wait for the windows.
    let mut windowed = job("win", &["hello"]).to_site("hq");
    windowed.spec.schedule = Some(Schedule {
        windows: vec![Window {
            cron: "0 2 * * *".into(),
            duration: "forever".into(),
            time_zone: None,
        }],
        ..Default::default()
    });
    let windowed = all([windowed]);
    let plan = Plan::compute(&sites, &agents, &windowed, &packages, &[], at("12:00"));
    let (reason, message) = &plan.jobs[&key("win")].problems[0];
    assert_eq!(*reason, reasons::INVALID_SCHEDULE);
    assert!(
        message.starts_with("schedule.windows[0].duration \"forever\": "),
        "{message}"
    );
    let mut windowed = (*windowed[0]).clone();
    windowed.spec.schedule.as_mut().unwrap().windows[0].duration = "2h".into();
    let windowed = all([windowed]);
    let plan = Plan::compute(&sites, &agents, &windowed, &packages, &[], at("12:00"));
    assert!(plan.jobs[&key("win")].problems.is_empty());
    let st = job_status(
        &windowed[0],
        plan.jobs.get(&key("win")),
        &agent_index(&agents),
        at("12:00"),
    );
    assert!(
        condition(&st.conditions, conditions::READY)
            .message
            .contains("installs run in maintenance windows (0 downloaded, waiting for one)"),
        "{:?}",
        st.conditions
    );
    // A report of Expired made before the deadline moved later does not count.
    let later = job("j", &["hello"])
        .to_site("hq")
        .scheduled(None, Some("16:00"));
    let agents =
        all([agent("ready", "hq").reporting("j", "hello", digest, AssignmentPhase::Expired, "")]);
    let jobs_later = all([later]);
    let plan = Plan::compute(&sites, &agents, &jobs_later, &packages, &[], at("12:00"));
    let st = job_status(
        &jobs_later[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        at("15:00"),
    );
    assert_eq!((st.expired, st.pending), (0, 1));
    // The engine computes again when a schedule starts or ends.
    assert_eq!(next_boundary(&jobs, at("12:00")), Some(at("13:00")));
    assert_eq!(next_boundary(&jobs, at("13:00")), Some(at("14:00")));
    assert_eq!(next_boundary(&jobs, at("14:00")), None);
}

#[test]
fn pending_destinations_are_counted_by_what_they_are_doing() {
    let sites = all([site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let digest = digest_of("hello", "1.0.0");
    let jobs = all([job("j", &["hello"]).to_site("hq")]);
    let agents = all([
        agent("a1", "hq").reporting("j", "hello", digest, AssignmentPhase::Downloading, ""),
        agent("a2", "hq").reporting("j", "hello", digest, AssignmentPhase::Installing, ""),
        agent("a3", "hq").reporting("j", "hello", digest, AssignmentPhase::Deferred, ""),
        agent("a4", "hq").reporting("j", "hello", digest, AssignmentPhase::Succeeded, ""),
        agent("a5", "hq"),
    ]);
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&key("j")),
        &agent_index(&agents),
        at("12:00"),
    );
    assert_eq!(
        (
            st.pending,
            st.downloading,
            st.installing,
            st.deferred,
            st.succeeded
        ),
        (4, 1, 1, 1, 1)
    );
}
