use super::*;
use caravan_api::wire::JobState;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

fn site(name: &str, parent: Option<&str>) -> Arc<Site> {
    obj(
        serde_json::json!({"apiVersion": "caravan.dev/v1alpha1", "kind": "Site",
        "metadata": {"name": name, "namespace": "ns"}, "spec": {"parent": parent}}),
    )
}

fn agent(name: &str, site: &str) -> Arc<Agent> {
    obj(
        serde_json::json!({"apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": name, "namespace": "ns", "labels": {"ring": "canary"}},
        "spec": {"site": site, "hostId": format!("host-{name}")}}),
    )
}

fn package(name: &str, version: &str, digest_byte: char) -> Arc<Package> {
    obj(
        serde_json::json!({"apiVersion": "caravan.dev/v1alpha1", "kind": "Package",
        "metadata": {"name": format!("{name}-{version}"), "namespace": "ns"},
        "spec": {"cabinet": "main", "name": name, "version": version,
                 "artifact": {"digest": format!("sha256:{}", digest_byte.to_string().repeat(64)), "size": 10}}}),
    )
}

fn job(name: &str, spec: serde_json::Value) -> Arc<DistributionJob> {
    obj(
        serde_json::json!({"apiVersion": "caravan.dev/v1alpha1", "kind": "DistributionJob",
        "metadata": {"name": name, "namespace": "ns", "generation": 1}, "spec": spec}),
    )
}

#[test]
fn an_all_lower_clients_job_reaches_every_site_below_and_the_highest_version() {
    let sites = [
        site("hq", None),
        site("berlin", Some("hq")),
        site("kreuzberg", Some("berlin")),
        site("paris", None),
    ];
    let agents = [
        agent("a1", "hq"),
        agent("a2", "kreuzberg"),
        agent("a3", "paris"),
    ];
    let packages = [
        package("hello", "1.9.0", 'a'),
        package("hello", "1.10.0", 'b'),
    ];
    let jobs = [job(
        "j",
        serde_json::json!({"packages": [{"name": "hello"}],
        "destinations": {"sites": [{"name": "hq", "includeLower": true}]}}),
    )];
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[]);
    let jp = &plan.jobs[&("ns".into(), "j".into())];
    assert!(jp.problems.is_empty());
    assert_eq!(jp.targets.keys().collect::<Vec<_>>(), ["a1", "a2"]);
    assert_eq!(jp.targets["a2"][0].version, "1.10.0");
    assert_eq!(
        plan.by_site[&("ns".into(), "kreuzberg".into())]["a2"].assignments[0].job,
        "ns/j"
    );
    assert!(plan.by_site[&("ns".into(), "paris".into())]["a3"]
        .assignments
        .is_empty());
}

#[test]
fn unknown_references_become_problems_not_panics() {
    let jobs = [job(
        "j",
        serde_json::json!({"packages": [{"name": "nope"}],
        "destinations": {"sites": [{"name": "atlantis"}], "agents": ["ghost"]}}),
    )];
    let plan = Plan::compute(&[site("hq", None)], &[agent("a1", "hq")], &jobs, &[], &[]);
    let jp = &plan.jobs[&("ns".into(), "j".into())];
    let reasons: Vec<_> = jp.problems.iter().map(|p| p.0).collect();
    assert_eq!(
        reasons,
        [
            reasons::UNKNOWN_PACKAGE,
            reasons::UNKNOWN_SITE,
            reasons::UNKNOWN_AGENT
        ]
    );
    let status = job_status(&jobs[0], Some(jp), &agent_index(&[]));
    let resolved = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::RESOLVED_REFS)
        .unwrap();
    assert_eq!(resolved.status, "False");
    assert!(
        resolved.message.contains("package nope not found"),
        "{}",
        resolved.message
    );
}

#[test]
fn job_status_counts_only_reports_for_the_current_digest() {
    let agents_v = vec![agent("a1", "hq"), agent("a2", "hq"), agent("a3", "hq")];
    let jobs = [job(
        "j",
        serde_json::json!({"packages": [{"name": "hello"}], "destinations": {"sites": [{"name": "hq"}]}}),
    )];
    let packages = [package("hello", "1.0.0", 'a')];
    let plan = Plan::compute(&[site("hq", None)], &agents_v, &jobs, &packages, &[]);
    let digest = format!("sha256:{}", "a".repeat(64));
    let report = |phase, digest: &str, message: &str| AgentStatus {
        jobs: vec![JobState {
            job: "ns/j".into(),
            package: "hello".into(),
            digest: digest.into(),
            action: JobAction::Install,
            phase,
            message: message.into(),
            time: String::new(),
        }],
        ..Default::default()
    };
    let mut agents = agents_v.clone();
    let with = |a: &Arc<Agent>, s: AgentStatus| {
        let mut a = (**a).clone();
        a.status = Some(s);
        Arc::new(a)
    };
    agents[0] = with(&agents[0], report(AssignmentPhase::Succeeded, &digest, ""));
    agents[1] = with(
        &agents[1],
        report(AssignmentPhase::Failed, &digest, "digest mismatch"),
    );
    // An older version's success does not count.
    agents[2] = with(
        &agents[2],
        report(
            AssignmentPhase::Succeeded,
            &format!("sha256:{}", "f".repeat(64)),
            "",
        ),
    );
    let st = job_status(
        &jobs[0],
        plan.jobs.get(&("ns".into(), "j".into())),
        &agent_index(&agents),
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
fn versions_compare_numerically() {
    assert!(version_cmp("1.10.0", "1.9.9").is_gt());
    assert!(version_cmp("2.0", "2.0.1").is_lt());
    assert!(version_cmp("1.0.0", "1.0.0").is_eq());
}

#[test]
fn suspended_jobs_typos_and_unapproved_agents_hold_software_instead_of_removing_it() {
    let sites = [site("hq", None)];
    let mut unapproved = (*agent("a2", "hq")).clone();
    unapproved.spec.approved = false;
    let agents = [agent("a1", "hq"), Arc::new(unapproved)];
    let packages = [package("hello", "1.0.0", 'a')];
    let jobs = [
        job(
            "paused",
            serde_json::json!({"packages": [{"name": "hello"}], "suspend": true,
            "destinations": {"sites": [{"name": "hq"}]}}),
        ),
        job(
            "typo",
            serde_json::json!({"packages": [{"name": "helo"}], "destinations": {"sites": [{"name": "hq"}]}}),
        ),
    ];
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[]);
    let hq = &plan.by_site[&("ns".into(), "hq".into())];
    assert!(hq["a1"].assignments.is_empty(), "nothing new is handed out");
    assert_eq!(
        hq["a1"].hold,
        ["hello", "helo"],
        "but nothing is taken away"
    );
    assert!(!hq["a1"].frozen);
    assert!(hq["a2"].frozen, "an unapproved agent changes nothing");
}
