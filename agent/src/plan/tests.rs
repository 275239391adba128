use super::*;
use crate::state::InstalledRecord;

fn assignment(job: &str, action: JobAction, package: &str, version: &str) -> Assignment {
    serde_json::from_value(serde_json::json!({
        "job": format!("ns/{job}"), "action": action, "package": package, "version": version,
        "digest": Digest::of(format!("{package}-{version}").as_bytes()), "size": 1, "install": {},
    }))
    .unwrap()
}

fn at(time: &str) -> chrono::DateTime<chrono::Utc> {
    format!("2026-12-01T{time}:00Z").parse().unwrap()
}

fn install(job: &str, package: &str, version: &str) -> Assignment {
    assignment(job, JobAction::Install, package, version)
}

fn installed(records: &[(&str, &str)]) -> Installed {
    records
        .iter()
        .map(|(p, v)| {
            let r = InstalledRecord {
                name: p.to_string(),
                version: v.to_string(),
                digest: Digest::of(format!("{p}-{v}").as_bytes()),
                job: "ns/old".into(),
                install: Default::default(),
                detected: false,
            };
            (p.to_string(), r)
        })
        .collect()
}

/// Plans `assignments` (held: `hold`) over `on` (package, version),
/// all live and none drifted unless said.
struct Case {
    desired: AgentDesired,
    installed: Installed,
    live: BTreeSet<String>,
    drifted: BTreeSet<String>,
    waiting: HashSet<Key>,
    not_applicable: HashSet<Key>,
    now: chrono::DateTime<chrono::Utc>,
    zone: jiff::tz::TimeZone,
    choices: Choices,
}

impl Case {
    fn new(assignments: Vec<Assignment>, on: &[(&str, &str)]) -> Self {
        let installed = installed(on);
        Self {
            live: installed.keys().cloned().collect(),
            desired: AgentDesired {
                agent: "a1".into(),
                assignments,
                ..Default::default()
            },
            installed,
            drifted: BTreeSet::new(),
            waiting: HashSet::new(),
            not_applicable: HashSet::new(),
            now: at("12:00"),
            zone: jiff::tz::TimeZone::UTC,
            choices: Choices::default(),
        }
    }

    fn plan(&self) -> Plan<'_> {
        plan(&Situation {
            desired: &self.desired,
            installed: &self.installed,
            live: &self.live,
            drifted: &self.drifted,
            waiting: &self.waiting,
            not_applicable: &self.not_applicable,
            now: self.now,
            zone: &self.zone,
            choices: &self.choices,
        })
    }
}

#[test]
fn what_is_installed_at_the_digest_is_done_and_the_rest_installs() {
    let c = Case::new(
        vec![install("j", "hello", "2"), install("j", "tools", "1")],
        &[("hello", "1"), ("tools", "1")],
    );
    let p = c.plan();
    let a = &c.desired.assignments;
    assert_eq!(
        p.decisions,
        [Decision::Install(&a[0], Why::New), Decision::Done(&a[1])]
    );
    assert!(p.removals.is_empty());
}

#[test]
fn the_first_job_installs_a_package_and_an_uninstall_of_it_cannot_win() {
    let c = Case::new(
        vec![
            install("a", "hello", "2"),
            install("b", "hello", "3"),
            assignment("c", JobAction::Uninstall, "hello", "2"),
        ],
        &[],
    );
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Install(&a[0], Why::New),
            Decision::Queued(&a[1]),
            Decision::Conflict {
                assignment: &a[2],
                winner: "ns/a"
            },
        ]
    );
}

#[test]
fn an_assignment_the_controller_marks_superseded_is_a_conflict_and_leaves_the_winner_alone() {
    // The uninstall job takes precedence: the install is superseded, and
    // what is installed is removed as the winner asks.
    let mut c = Case::new(
        vec![
            install("a", "hello", "2"),
            assignment("u", JobAction::Uninstall, "hello", "1"),
        ],
        &[("hello", "1")],
    );
    c.desired.assignments[0].superseded_by = Some("ns/u".into());
    let a = &c.desired.assignments;
    let p = c.plan();
    assert_eq!(
        p.decisions,
        [
            Decision::Conflict {
                assignment: &a[0],
                winner: "ns/u"
            },
            Decision::Uninstall(&a[1]),
        ]
    );
    assert_eq!(p.removals, ["hello"], "a superseded install keeps nothing");
}

#[test]
fn an_uninstall_removes_what_is_there_and_is_done_when_it_is_gone() {
    let c = Case::new(
        vec![assignment("u", JobAction::Uninstall, "hello", "1")],
        &[("hello", "1")],
    );
    let a = &c.desired.assignments;
    assert_eq!(c.plan().decisions, [Decision::Uninstall(&a[0])]);
    let c = Case::new(
        vec![assignment("u", JobAction::Uninstall, "hello", "1")],
        &[],
    );
    assert_eq!(
        c.plan().decisions,
        [Decision::Done(&c.desired.assignments[0])]
    );
}

#[test]
fn a_package_missing_from_the_root_or_drifted_under_repair_is_installed_again() {
    let mut c = Case::new(vec![install("j", "hello", "1")], &[("hello", "1")]);
    c.live.clear();
    assert_eq!(
        c.plan().decisions,
        [Decision::Install(&c.desired.assignments[0], Why::Missing)]
    );
    let mut c = Case::new(vec![install("j", "hello", "1")], &[("hello", "1")]);
    c.drifted.insert("hello".into());
    assert_eq!(
        c.plan().decisions,
        [Decision::Done(&c.desired.assignments[0])],
        "drift is reported, not repaired, unless asked"
    );
    c.desired.assignments[0].repair = true;
    assert_eq!(
        c.plan().decisions,
        [Decision::Install(&c.desired.assignments[0], Why::Repair)]
    );
}

#[test]
fn a_failed_assignment_waits_for_its_retry_unless_it_is_reached_already() {
    let mut c = Case::new(vec![install("j", "hello", "1")], &[]);
    c.waiting.insert(key(&c.desired.assignments[0]));
    assert_eq!(
        c.plan().decisions,
        [Decision::Wait(&c.desired.assignments[0])]
    );
    c.installed = installed(&[("hello", "1")]);
    c.live.insert("hello".into());
    assert_eq!(
        c.plan().decisions,
        [Decision::Done(&c.desired.assignments[0])]
    );
}

#[test]
fn a_job_installing_the_same_version_as_one_that_gave_up_installs_it_itself() {
    let mut c = Case::new(
        vec![install("a", "hello", "1"), install("b", "hello", "1")],
        &[],
    );
    c.waiting.insert(key(&c.desired.assignments[0]));
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [Decision::Wait(&a[0]), Decision::Install(&a[1], Why::New)]
    );
}

#[test]
fn what_no_job_installs_is_removed_unless_held_and_a_frozen_agent_changes_nothing() {
    let mut c = Case::new(
        vec![install("j", "hello", "1")],
        &[("hello", "1"), ("old", "1"), ("kept", "1")],
    );
    c.desired.hold = vec!["kept".into()];
    assert_eq!(c.plan().removals, ["old"]);
    c.desired.frozen = true;
    assert_eq!(c.plan(), Plan::default());
}

#[test]
fn a_schedule_holds_new_installs_and_removals_to_its_hours() {
    let mut c = Case::new(
        vec![
            install("j", "hello", "2"),
            assignment("u", JobAction::Uninstall, "old", "1"),
            install("k", "tools", "1"),
        ],
        &[("old", "1"), ("tools", "1")],
    );
    for a in &mut c.desired.assignments {
        a.schedule.not_before = Some(at("13:00"));
        a.schedule.deadline = Some(at("14:00"));
    }
    c.live.remove("tools");
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Early(&a[0], at("13:00")),
            Decision::Early(&a[1], at("13:00")),
            Decision::Install(&a[2], Why::Missing),
        ],
        "before the start; putting back what is installed is not held"
    );
    assert!(c.plan().removals.is_empty(), "the removal waits too");
    c.now = at("13:00");
    assert_eq!(
        c.plan().decisions[..2],
        [
            Decision::Install(&a[0], Why::New),
            Decision::Uninstall(&a[1])
        ]
    );
    c.now = at("14:00");
    assert_eq!(
        c.plan().decisions[..2],
        [Decision::Expired(&a[0]), Decision::Expired(&a[1])]
    );
}

#[test]
fn a_maintenance_window_holds_new_installs_until_it_opens_in_the_endpoints_time() {
    let mut c = Case::new(
        vec![
            install("j", "hello", "2"),
            assignment("u", JobAction::Uninstall, "old", "1"),
        ],
        &[("old", "1")],
    );
    for a in &mut c.desired.assignments {
        // 14:00 local time, for an hour.
        a.schedule.windows = vec![caravan_api::v1alpha1::Window {
            cron: "0 14 * * *".into(),
            duration: "1h".into(),
            time_zone: None,
        }];
    }
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Early(&a[0], at("14:00")),
            Decision::Early(&a[1], at("14:00")),
        ]
    );
    assert!(c.plan().removals.is_empty(), "the removal waits too");
    // Two hours east of UTC, the window opened at 12:00 UTC.
    c.zone = jiff::tz::TimeZone::fixed(jiff::tz::offset(2));
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Install(&a[0], Why::New),
            Decision::Uninstall(&a[1])
        ]
    );
}

#[test]
fn a_schedule_that_cannot_be_read_starts_nothing_and_says_why() {
    let mut c = Case::new(vec![install("j", "hello", "2")], &[]);
    c.desired.assignments[0].schedule.windows = vec![caravan_api::v1alpha1::Window {
        cron: "at night".into(),
        duration: "1h".into(),
        time_zone: None,
    }];
    match &c.plan().decisions[..] {
        [Decision::Unreadable(_, why)] => {
            assert!(
                why.starts_with("schedule.windows[0].cron \"at night\""),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_optional_package_installs_once_chosen_and_a_deferral_holds_an_install() {
    let mut c = Case::new(
        vec![
            install("extras", "gimp", "2"),
            install("base", "hello", "1"),
        ],
        &[],
    );
    c.desired.assignments[0].optional = true;
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Available(&a[0]),
            Decision::Install(&a[1], Why::New)
        ]
    );
    c.choices.install.insert("gimp".into());
    c.choices.deferred.insert(
        "ns/base".into(),
        crate::choices::Deferred {
            count: 1,
            until: at("13:00"),
        },
    );
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Install(&a[0], Why::New),
            Decision::Deferred(&a[1], at("13:00"))
        ]
    );
    c.now = at("13:00");
    assert_eq!(c.plan().decisions[1], Decision::Install(&a[1], Why::New));
}

fn requiring(mut a: Assignment, name: &str, range: &str) -> Assignment {
    a.install.requires.push(caravan_api::v1alpha1::Dependency {
        name: name.into(),
        version: Some(range.into()),
    });
    a
}

#[test]
fn a_jobs_packages_go_in_order_and_one_not_there_stops_the_rest() {
    let mut c = Case::new(
        vec![
            install("j", "libfoo", "1.2.0"),
            requiring(install("j", "app", "2"), "libfoo", "^1.2"),
            install("j", "tools", "1"),
            install("other", "hello", "1"),
        ],
        &[],
    );
    c.desired.assignments[0].required_by = vec!["app".into()];
    let a = &c.desired.assignments;
    let not_yet =
        |p: &str| format!("not started: package {p} before it in the job is not installed yet");
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Install(&a[0], Why::New),
            Decision::Blocked(&a[1], not_yet("libfoo")),
            Decision::Blocked(&a[2], not_yet("libfoo")),
            Decision::Install(&a[3], Why::New),
        ]
    );
    // libfoo failed: it stops the rest of its job, not the other job.
    c.waiting.insert(key(&a[0]));
    let d = c.plan().decisions;
    assert_eq!(d[0], Decision::Wait(&a[0]));
    assert_eq!(d[2], Decision::Blocked(&a[2], not_yet("libfoo")));
    assert_eq!(d[3], Decision::Install(&a[3], Why::New));
    // libfoo not for this endpoint: neither is app; tools goes on.
    c.not_applicable.insert(key(&a[0]));
    let d = c.plan().decisions;
    let why = "it requires libfoo ^1.2, which is not for this endpoint";
    assert_eq!(d[1], Decision::NotApplicable(&a[1], why.into()));
    c.not_applicable.insert(key(&a[1]));
    assert_eq!(c.plan().decisions[2], Decision::Install(&a[2], Why::New));
    // An old libfoo, out of range, does not do either.
    c.not_applicable.clear();
    c.installed = installed(&[("libfoo", "1.0.0")]);
    c.waiting.insert(key(&a[0]));
    let needs = "not started: it requires libfoo ^1.2, and libfoo 1.0.0 is installed";
    c.desired.assignments.swap(0, 1);
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions[0],
        Decision::Blocked(&a[0], needs.into())
    );
    c.desired.assignments.swap(0, 1);
    let a = &c.desired.assignments;
    // Installed in range (by this job or another): app goes.
    c.waiting.clear();
    c.not_applicable.clear();
    c.installed = installed(&[("libfoo", "1.2.0")]);
    c.live = c.installed.keys().cloned().collect();
    let d = c.plan().decisions;
    assert_eq!(d[0], Decision::Done(&a[0]));
    assert_eq!(d[1], Decision::Install(&a[1], Why::New));
}

#[test]
fn what_an_installed_package_requires_stays_and_dependents_go_first() {
    let mut c = Case::new(
        vec![
            install("j", "web", "1"),
            assignment("u", JobAction::Uninstall, "libbar", "1"),
        ],
        &[
            ("web", "1"),
            ("viewer", "1"),
            ("libfoo", "1.0.0"),
            ("libbar", "1"),
            ("zlib", "1"),
        ],
    );
    let require = |c: &mut Case, who: &str, what: &str| {
        let r = c.installed.get_mut(who).unwrap();
        r.install.requires.push(caravan_api::v1alpha1::Dependency {
            name: what.into(),
            version: None,
        });
    };
    // viewer (going) requires libfoo and zlib; web (staying) requires zlib and libbar.
    require(&mut c, "viewer", "libfoo");
    require(&mut c, "viewer", "zlib");
    require(&mut c, "web", "zlib");
    require(&mut c, "web", "libbar");
    let p = c.plan();
    assert_eq!(p.removals, ["viewer", "libfoo"]);
    let a = &c.desired.assignments;
    assert_eq!(
        p.decisions[1],
        Decision::Blocked(
            &a[1],
            "not removed: package web installed here requires it".into()
        )
    );
}

#[test]
fn nothing_moves_a_package_out_of_the_range_of_one_that_stays_or_removes_it_first() {
    let mut c = Case::new(
        vec![
            requiring(install("apps", "app", "1"), "libfoo", "^1"),
            install("libs", "libfoo", "2.0.0"),
            assignment("clean", JobAction::Uninstall, "libfoo", "1.4.0"),
        ],
        &[("app", "1"), ("libfoo", "1.4.0")],
    );
    c.installed.get_mut("app").unwrap().install = c.desired.assignments[0].install.clone();
    c.desired.assignments[0].digest = c.installed["app"].digest;
    let a = &c.desired.assignments;
    let d = c.plan().decisions;
    assert_eq!(d[0], Decision::Done(&a[0]));
    assert_eq!(
        d[1],
        Decision::Blocked(
            &a[1],
            "not started: package app installed here requires libfoo ^1".into()
        )
    );
    // (The uninstall loses to the install, and would wait for app too.)
    assert!(matches!(d[2], Decision::Conflict { .. }));
    c.desired.assignments.remove(1);
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions[1],
        Decision::Blocked(
            &a[1],
            "not removed: package app installed here requires it".into()
        )
    );
    // app upgraded by its job to a version that takes libfoo 2: it may go.
    let mut c2 = Case::new(
        vec![
            install("libs", "libfoo", "2.0.0"),
            requiring(install("apps", "app", "2"), "libfoo", "^2"),
        ],
        &[("app", "1"), ("libfoo", "1.4.0")],
    );
    c2.installed.get_mut("app").unwrap().install.requires =
        requiring(install("apps", "app", "1"), "libfoo", "^1")
            .install
            .requires;
    let a = &c2.desired.assignments;
    assert_eq!(c2.plan().decisions[0], Decision::Install(&a[0], Why::New));
}

#[test]
fn an_optional_jobs_dependency_comes_with_the_package_chosen() {
    let mut c = Case::new(
        vec![
            install("extras", "libgfx", "1"),
            requiring(install("extras", "gimp", "2"), "libgfx", "*"),
        ],
        &[],
    );
    for a in c.desired.assignments.iter_mut() {
        a.optional = true;
    }
    c.desired.assignments[0].required_by = vec!["gimp".into()];
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [Decision::Available(&a[0]), Decision::Available(&a[1])]
    );
    assert_eq!(
        crate::choices::offered(&c.desired)
            .map(|a| a.package.as_str())
            .collect::<Vec<_>>(),
        ["gimp"]
    );
    c.choices.install.insert("gimp".into());
    let a = &c.desired.assignments;
    assert_eq!(c.plan().decisions[0], Decision::Install(&a[0], Why::New));
}

#[test]
fn an_optional_package_nobody_chose_holds_back_no_other_job_and_is_not_kept() {
    // Another job installs another version: not queued behind the offer.
    let mut c = Case::new(
        vec![install("extras", "gimp", "2"), install("base", "gimp", "1")],
        &[("tools", "1")],
    );
    c.desired.assignments[0].optional = true;
    let a = &c.desired.assignments;
    assert_eq!(
        c.plan().decisions,
        [
            Decision::Available(&a[0]),
            Decision::Install(&a[1], Why::New)
        ]
    );
    assert_eq!(c.plan().removals, ["tools"]);
}
