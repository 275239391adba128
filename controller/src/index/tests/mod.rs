use std::collections::HashMap;

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::*,
};

use caravan_api::selector;

use super::{fixtures::*, status::*, *};

mod artifacts;
mod job_status;
mod rollout;

fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conds:?}"))
}

#[test]
fn an_all_lower_clients_job_reaches_every_site_below_and_the_highest_version() {
    let sites = all([
        site("hq"),
        site("berlin").below("hq"),
        site("kreuzberg").below("berlin"),
        site("paris"),
    ]);
    let agents = all([
        agent("a1", "hq"),
        agent("a2", "kreuzberg"),
        agent("a3", "paris"),
    ]);
    let packages = all([package("hello", "1.9.0"), package("hello", "1.10.0")]);
    let jobs = all([job("j", &["hello"]).to_site_and_lower("hq")]);
    let plan = Plan::compute(&sites, &agents, &jobs, &packages, &[], at("12:00"));
    let jp = &plan.jobs[&key("j")];
    assert!(jp.problems.is_empty());
    assert_eq!(jp.targets.keys().collect::<Vec<_>>(), ["a1", "a2"]);
    assert_eq!(jp.targets["a2"][0].version, "1.10.0");
    assert_eq!(
        plan.by_site[&key("kreuzberg")]["a2"].assigned[0][0].job,
        "ns/j"
    );
    assert!(plan.by_site[&key("paris")]["a3"].assigned.is_empty());
}

#[test]
fn unknown_references_become_problems_not_panics() {
    let jobs = all([job("j", &["nope"]).to_site("atlantis").to_agent("ghost")]);
    let plan = Plan::compute(
        &all([site("hq")]),
        &all([agent("a1", "hq")]),
        &jobs,
        &[],
        &[],
        at("12:00"),
    );
    let jp = &plan.jobs[&key("j")];
    let reasons: Vec<_> = jp.problems.iter().map(|p| p.0).collect();
    assert_eq!(
        reasons,
        [
            reasons::UNKNOWN_PACKAGE,
            reasons::UNKNOWN_SITE,
            reasons::UNKNOWN_AGENT
        ]
    );
    let status = job_status(&jobs[0], Some(jp), &agent_index(&[]), now());
    let resolved = condition(&status.conditions, conditions::RESOLVED_REFS);
    assert_eq!(resolved.status, "False");
    assert!(
        resolved.message.contains("package nope not found"),
        "{}",
        resolved.message
    );
}

#[test]
fn a_job_installs_what_its_packages_require_first_and_holds_a_package_it_cannot_resolve() {
    let mut app = package("app", "2.0.0");
    app.spec.install.requires = vec![Dependency {
        name: "libfoo".into(),
        version: Some("^1.2".into()),
    }];
    let mut web = package("web", "1.0.0");
    web.spec.install.requires = vec![Dependency {
        name: "libbar".into(),
        version: None,
    }];
    let packages = all([
        app,
        web,
        package("libfoo", "1.3.0"),
        package("libfoo", "2.0.0"),
    ]);
    let jobs = all([job("j", &["web", "app"]).to_site("hq")]);
    let plan = Plan::compute(
        &all([site("hq")]),
        &all([agent("a1", "hq")]),
        &jobs,
        &packages,
        &[],
        at("12:00"),
    );
    let jp = &plan.jobs[&key("j")];
    let got: Vec<_> = jp.targets["a1"]
        .iter()
        .map(|a| {
            (
                a.package.as_str(),
                a.version.as_str(),
                a.required_by.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("libfoo", "1.3.0", vec!["app".to_string()]),
            ("app", "2.0.0", vec![])
        ]
    );
    assert_eq!(
        jp.digests,
        [digest_of("libfoo", "1.3.0"), digest_of("app", "2.0.0")]
    );
    assert_eq!(jp.unresolved, ["web"]);
    assert_eq!(
        jp.problems,
        [(
            reasons::UNRESOLVED_DEPENDENCY,
            "package web 1.0.0 requires libbar: no package libbar in the namespace".to_string()
        )]
    );
    let status = job_status(&jobs[0], Some(jp), &agent_index(&[]), now());
    let resolved = condition(&status.conditions, conditions::RESOLVED_REFS);
    assert_eq!(
        (resolved.status.as_str(), resolved.reason.as_str()),
        ("False", reasons::UNRESOLVED_DEPENDENCY)
    );
}

#[test]
fn a_dependency_is_left_to_a_job_that_wins_it_with_a_version_in_range_and_conflicts_when_not() {
    let needing = |range: &str| {
        let mut app = package("app", "1.0.0");
        app.spec.install.requires = vec![Dependency {
            name: "libfoo".into(),
            version: Some(range.into()),
        }];
        app
    };
    let plan_with = |range: &str| {
        let packages = all([
            needing(range),
            package("libfoo", "1.3.0"),
            package("libfoo", "1.5.0"),
        ]);
        // base pins libfoo 1.3.0 and takes precedence; apps needs a libfoo.
        let jobs = all([
            job("base", &["libfoo"])
                .at_version("libfoo", "1.3.0")
                .to_site("hq")
                .with_priority(10),
            job("apps", &["app"]).to_site("hq"),
        ]);
        let plan = Plan::compute(
            &all([site("hq")]),
            &all([agent("a1", "hq")]),
            &jobs,
            &packages,
            &[],
            at("12:00"),
        );
        let jp = &plan.jobs[&key("apps")];
        let targets = jp.targets["a1"]
            .iter()
            .map(|a| {
                (
                    a.package.clone(),
                    a.version.clone(),
                    a.superseded_by.clone(),
                )
            })
            .collect::<Vec<_>>();
        (targets, jp.problems.clone())
    };
    // 1.3.0 will do: apps leaves libfoo to base (its rollout, its
    // suspension); app waits on the endpoint until base installed it.
    let (targets, problems) = plan_with("^1.2");
    assert_eq!(targets, [("app".into(), "1.0.0".into(), None)]);
    assert!(problems.is_empty(), "{problems:?}");
    // It will not: the dependency conflicts, and the job says why.
    let (targets, problems) = plan_with(">=1.4");
    assert_eq!(
        targets,
        [
            ("libfoo".into(), "1.5.0".into(), Some("ns/base".into())),
            ("app".into(), "1.0.0".into(), None)
        ]
    );
    assert_eq!(
        problems,
        [(
            reasons::CONFLICT,
            "package app requires libfoo >=1.4, but job ns/base takes precedence with libfoo 1.3.0"
                .to_string()
        )]
    );
}

#[test]
fn suspended_jobs_typos_and_unapproved_agents_hold_software_instead_of_removing_it() {
    let agents = all([agent("a1", "hq"), agent("a2", "hq").unapproved()]);
    let jobs = all([
        job("paused", &["hello"]).to_site("hq").suspended(),
        job("typo", &["helo"]).to_site("hq"),
    ]);
    let packages = all([package("hello", "1.0.0")]);
    let plan = Plan::compute(
        &all([site("hq")]),
        &agents,
        &jobs,
        &packages,
        &[],
        at("12:00"),
    );
    let hq = &plan.by_site[&key("hq")];
    assert!(hq["a1"].assigned.is_empty(), "nothing new is handed out");
    assert_eq!(
        hq["a1"].hold,
        ["hello", "helo"],
        "but nothing is taken away"
    );
    assert!(!hq["a1"].document().frozen);
    assert!(
        !hq.contains_key("a2"),
        "an unapproved agent is not served: its relay turns it away"
    );
}

#[test]
fn relays_prestage_their_jobs_blobs_and_serve_those_of_the_sites_below() {
    let sites = all([
        site("hq"),
        site("berlin").below("hq"),
        site("kreuzberg").below("berlin"),
    ]);
    let packages = all([package("hello", "1.0.0"), package("tools", "2.0")]);
    // No agent has enrolled at kreuzberg yet.
    let jobs = all([
        job("k", &["tools"]).to_site("kreuzberg"),
        job("h", &["hello"]).to_site("hq"),
        job("off", &["hello"]).to_site("berlin").suspended(),
    ]);
    let mut plan = Plan::compute(&sites, &[], &jobs, &packages, &[], at("12:00"));
    // tools comes from a registry, fetched by the relays that reach it first.
    let tools = digest_of("tools", "2.0");
    let source = caravan_api::wire::BlobSource {
        repository: "https://registry.example.com/caravan/tools".into(),
        size: 10,
        ca_bundle: None,
    };
    let sources = HashMap::from([(tools, source.clone())]);
    let index = desired::desired(&sites, &jobs, &mut plan, &sources);
    let doc = |s: &str| &index[&key(s)];
    let hello = digest_of("hello", "1.0.0");
    assert_eq!(
        doc("hq").sources,
        [(tools, source)].into(),
        "the top-level site fetches it from the registry"
    );
    assert!(
        doc("berlin").sources.is_empty() && doc("kreuzberg").sources.is_empty(),
        "the sites below fetch it from their parent's relay"
    );
    assert_eq!(doc("kreuzberg").prestage, [tools]);
    assert!(
        doc("berlin").prestage.is_empty(),
        "a suspended job prestages nothing"
    );
    assert_eq!(doc("berlin").lower, [tools]);
    assert_eq!(doc("hq").prestage, [hello]);
    assert_eq!(
        doc("hq").lower,
        [tools],
        "what the sites below need crosses hq once"
    );
    assert!(doc("kreuzberg").lower.is_empty());
    // The same inputs give the same documents, byte for byte.
    let mut again = Plan::compute(&sites, &[], &jobs, &packages, &[], at("12:00"));
    assert_eq!(index, desired::desired(&sites, &jobs, &mut again, &sources));
}

#[test]
fn a_site_whose_parent_chain_loops_does_not_hang_the_index() {
    let sites = all([site("a").below("b"), site("b").below("a")]);
    let jobs = all([job("j", &["hello"]).to_site("a")]);
    let packages = all([package("hello", "1")]);
    let mut plan = Plan::compute(&sites, &[], &jobs, &packages, &[], at("12:00"));
    let index = desired::desired(&sites, &jobs, &mut plan, &HashMap::new());
    assert_eq!(index[&key("b")].lower, [digest_of("hello", "1")]);
}

#[test]
fn the_index_gives_every_site_a_document_and_every_object_a_status() {
    let sites = all([site("hq"), site("empty")]);
    let agents = all([agent("a1", "hq")]);
    let jobs = all([job("j", &["hello"]).to_site("hq")]);
    let packages = all([package("hello", "1.0.0")]);
    let cabinets = all([cabinet("main")]);
    let artifacts = HashMap::new();
    let out = compute(&Inputs {
        now: now(),
        sites: &sites,
        agents: &agents,
        jobs: &jobs,
        packages: &packages,
        cabinets: &cabinets,
        artifacts: &artifacts,
        unreachable: &HashMap::new(),
    });
    assert_eq!(out.desired.len(), 2);
    let empty = &out.desired[&key("empty")];
    assert!(empty.agents.is_empty() && empty.blobs.is_empty());
    let hq = &out.desired[&key("hq")];
    let a1 = &hq.agents["a1"].assigned[0];
    assert_eq!(a1[0].package, "hello");
    assert_eq!(hq.blobs, [a1[0].digest]);
    assert_eq!(hq.lists.keys().collect::<Vec<_>>(), [&a1.digest()]);
    assert_eq!(
        (out.jobs.len(), out.packages.len(), out.cabinets.len()),
        (1, 1, 1)
    );
    assert_eq!(out.jobs[0].1.total, 1);
    assert!(!out.packages[0].1.artifact_available);
}

#[test]
fn selectors_with_expressions_and_exclusions_pick_the_destinations() {
    let agents = all([
        agent("kiosk-1", "hq")
            .labelled("os", "linux")
            .labelled("role", "kiosk"),
        agent("kiosk-2", "branch")
            .labelled("os", "linux")
            .labelled("role", "kiosk"),
        agent("desk-1", "hq").labelled("os", "windows"),
        agent("lab-1", "hq").labelled("os", "freebsd"),
        // Enrolled later: it matches, so the job reaches it too.
        agent("kiosk-3", "hq")
            .labelled("os", "linux")
            .labelled("role", "kiosk"),
    ]);
    let mut j = job("j", &["hello"]).to_site("hq");
    let requirement = |key: &str, op: &str, values: &[&str]| selector::LabelSelectorRequirement {
        key: key.into(),
        operator: op.into(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
    };
    // Every agent of hq, and Linux or FreeBSD agents anywhere, but no
    // Windows machine and not kiosk-3.
    j.spec.destinations.agent_selector = Some(selector::LabelSelector {
        match_expressions: Some(vec![requirement("os", "In", &["linux", "freebsd"])]),
        ..Default::default()
    });
    j.spec.destinations.exclude = Some(Exclusions {
        agent_selector: Some(selector::LabelSelector {
            match_expressions: Some(vec![requirement("os", "In", &["windows"])]),
            ..Default::default()
        }),
        agents: vec!["kiosk-3".into()],
    });
    let sites = all([site("hq"), site("branch")]);
    let packages = all([package("hello", "1.0.0")]);
    let plan = Plan::compute(
        &sites,
        &agents,
        &all([j.clone()]),
        &packages,
        &[],
        at("12:00"),
    );
    let jp = &plan.jobs[&key("j")];
    assert!(jp.problems.is_empty(), "{:?}", jp.problems);
    assert_eq!(
        jp.targets.keys().collect::<Vec<_>>(),
        ["kiosk-1", "kiosk-2", "lab-1"]
    );

    // A selector that is not one: a problem, and it selects nobody; an
    // exclusion that is not one leaves everyone out.
    j.spec.destinations.agent_selector = Some(selector::LabelSelector {
        match_expressions: Some(vec![requirement("os", "Like", &["lin*"])]),
        ..Default::default()
    });
    let plan = Plan::compute(
        &sites,
        &agents,
        &all([j.clone()]),
        &packages,
        &[],
        at("12:00"),
    );
    let jp = &plan.jobs[&key("j")];
    assert_eq!(jp.problems[0].0, reasons::INVALID_SELECTOR);
    assert!(
        jp.problems[0]
            .1
            .contains("agentSelector: key os: unknown operator"),
        "{:?}",
        jp.problems
    );
    assert_eq!(
        jp.targets.keys().collect::<Vec<_>>(),
        ["kiosk-1", "lab-1"],
        "hq's, less the Windows machine and kiosk-3"
    );
    j.spec.destinations.exclude.as_mut().unwrap().agent_selector =
        j.spec.destinations.agent_selector.clone();
    let plan = Plan::compute(&sites, &agents, &all([j]), &packages, &[], at("12:00"));
    assert!(plan.jobs[&key("j")].targets.is_empty());
}
