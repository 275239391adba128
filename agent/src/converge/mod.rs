//! Convergence: carrying out the [`plan`] for the desired state. Each pass
//! finds drift, plans, and then, in the desired state's order, downloads,
//! verifies and installs (or removes) what the plan says, through the
//! install [`transaction`] (`install`). Every transition is reported to the
//! relay, and a heartbeat report keeps `lastSeen` fresh (`report`).
//!
//! A failed install is tried again after a pause that doubles, as many
//! times as its job allows, then given up until the job re-runs it (see
//! [`crate::attempts`]). A download that fails is not counted: it is tried
//! again after `retry_after` until it arrives (the relay may not have the
//! blob yet).

mod install;
mod report;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Instant,
};

use caravan_api::{
    v1alpha1::JobAction,
    wire::{AgentDesired, Assignment, AssignmentPhase, Drift, JobState, Refusal},
    Digest,
};

use crate::{
    attempts::Attempts,
    choices::{self, Choices},
    client::{Client, ClientError},
    config::Config,
    drift::Baseline,
    plan::{self, key, Decision, Key, Why},
    policy, selfupdate,
    state::{Installed, StateDir},
    transaction,
};

pub struct Converger {
    pub client: Client,
    pub state: StateDir,
    config: Config,
    desired: AgentDesired,
    /// Current state of each assignment.
    jobs: HashMap<Key, JobState>,
    /// When each failed assignment may be tried again.
    retry_at: HashMap<Key, Instant>,
    /// The failed installs of each assignment, as kept in the state directory.
    attempts: Attempts,
    /// When the last report reached the relay; `None` until one has, or after one failed.
    last_delivered: Option<Instant>,
    /// When a report was last taken by the relay, for the metrics (kept
    /// when one fails, unlike `last_delivered`).
    delivered_at: Option<std::time::SystemTime>,
    /// Files of installed packages no longer as installed, as last found.
    drift: Vec<Drift>,
    /// The baselines of installed versions, read once from the state directory.
    baselines: HashMap<Digest, Baseline>,
    /// This process is a new agent binary whose update awaits its first report.
    on_probation: bool,
    /// Why the desired state last served is refused (or the accepted one
    /// expired), if it is: reported until a good one comes.
    refused: Option<Refusal>,
}

/// A download that did not complete: tried again, not counted as an attempt.
#[derive(Debug)]
struct DownloadFailed;

impl std::fmt::Display for DownloadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("download failed")
    }
}

/// What the relay said while asking the agent to wait, and for how long.
fn waiting(e: &anyhow::Error) -> Option<(String, std::time::Duration)> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<ClientError>()? {
            ClientError::Waiting {
                message,
                retry_after,
            } => Some((message.clone(), *retry_after)),
            _ => None,
        })
}

/// The job's schedule does not let an install start once its package is
/// downloaded (a long download ended after the deadline, or outside the
/// maintenance windows).
#[derive(Debug)]
enum Held {
    DeadlinePassed,
    /// It installs from then.
    Until(Time),
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::DeadlinePassed => {
                f.write_str("the job's deadline passed while the package downloaded")
            }
            Held::Until(t) => write!(
                f,
                "no maintenance window is open: installs from {}",
                rfc3339(*t)
            ),
        }
    }
}

type Time = chrono::DateTime<chrono::Utc>;

/// What a package waiting for its job's start says.
fn starts_message(a: &Assignment, t: Time) -> String {
    let verb = match a.action {
        JobAction::Install => "installs",
        JobAction::Uninstall => "removed",
    };
    match (t == Time::MAX_UTC, a.schedule.windows.is_empty()) {
        (true, _) => "no maintenance window of the job opens again".into(),
        (false, true) => format!("{verb} from {}", rfc3339(t)),
        (false, false) => format!("{verb} in the maintenance window from {}", rfc3339(t)),
    }
}

/// Why an assignment is Expired.
fn expired_message(a: &Assignment) -> String {
    format!(
        "not started by the job's deadline {}",
        a.schedule.deadline.map(rfc3339).unwrap_or_default()
    )
}

/// What the agent found on the endpoint, for the plan.
struct Facts {
    live: BTreeSet<String>,
    drifted: BTreeSet<String>,
    waiting: HashSet<Key>,
    not_applicable: HashSet<Key>,
}

/// An install or removal the plan asks for.
enum Act {
    /// Download (and verify) ahead of the job's start (at the time given).
    Prefetch(Assignment, Time),
    Install(Assignment, Why),
    Uninstall(Assignment),
}

impl Converger {
    pub fn new(config: Config, state: StateDir, client: Client) -> anyhow::Result<Self> {
        Ok(Self {
            attempts: Attempts::load(&state),
            on_probation: selfupdate::on_probation(&state)?,
            client,
            config,
            state,
            // Nothing is changed until a signed desired state is accepted.
            desired: AgentDesired::frozen(""),
            refused: None,
            jobs: HashMap::new(),
            retry_at: HashMap::new(),
            last_delivered: None,
            delivered_at: None,
            drift: Vec::new(),
            baselines: HashMap::new(),
        })
    }

    pub fn set_desired(&mut self, desired: AgentDesired) {
        let current: HashSet<Key> = desired.assignments.iter().map(key).collect();
        self.jobs.retain(|k, _| current.contains(k));
        self.retry_at.retain(|k, _| current.contains(k));
        // Forget the failures of assignments gone, and count afresh those
        // a new retry generation re-runs (tried again at once).
        let (rerun, changed) = self.attempts.follow(&desired.assignments);
        for a in rerun {
            tracing::info!(job = %a.job, package = %a.package, generation = a.retry_generation, "re-running a failed install");
            self.retry_at.remove(&key(a));
            self.jobs.remove(&key(a));
        }
        if changed {
            self.attempts.save(&self.state);
        }
        // For `caravan-agent available|install|defer`, which check the
        // user's choices against it.
        if let Err(e) = self.state.set_json(choices::DESIRED, Some(&desired)) {
            tracing::warn!(
                error = format!("{e:#}"),
                "the accepted desired state was not kept"
            );
        }
        self.desired = desired;
        self.refused = None;
    }

    /// Records why the desired state served is refused; the agent goes on
    /// with the one it accepted before (until that expires).
    pub fn refuse(&mut self, refusal: Refusal) {
        if self.refused.as_ref() != Some(&refusal) {
            tracing::error!(reason = %refusal.reason, message = %refusal.message, "desired state refused");
            // Reported at the next pass.
            self.last_delivered = None;
        }
        self.refused = Some(refusal);
    }

    /// The seconds until the accepted desired state expires, at most `max`.
    pub fn until_expiry(&self, max: u64) -> u64 {
        chrono::DateTime::parse_from_rfc3339(&self.desired.expires)
            .ok()
            .and_then(|t| {
                (t.with_timezone(&chrono::Utc) - chrono::Utc::now())
                    .to_std()
                    .ok()
            })
            .map_or(max, |d| (d.as_secs() + 1).min(max))
    }

    /// How long the next poll may wait: no longer than the next retry is due.
    pub fn next_wait(&self, max: u64) -> u64 {
        let now = Instant::now();
        let wall = chrono::Utc::now();
        // A job's start or deadline, when it comes.
        let zone = jiff::tz::TimeZone::system();
        let choices = Choices::load(&self.state);
        let schedules = self
            .desired
            .assignments
            .iter()
            .flat_map(|a| {
                [
                    a.schedule.starts(wall, &zone).ok().flatten(),
                    a.schedule.deadline,
                    choices.deferred_until(a, wall),
                ]
            })
            .flatten()
            .filter_map(|t| (t - wall).to_std().ok())
            .map(|d| d.as_secs() + 1);
        self.retry_at
            .values()
            .filter(|t| **t > now)
            .map(|t| t.saturating_duration_since(now).as_secs() + 1)
            .chain(self.attempts.next_due(unix_now()).map(|s| s + 1))
            .chain(schedules)
            .min()
            .unwrap_or(max)
            .min(max)
    }

    fn facts(&self, installed: &Installed) -> Facts {
        let now = Instant::now();
        let root = &self.config.install_root;
        Facts {
            live: installed
                .values()
                // (A version found present has no files of Caravan's.)
                .filter(|r| r.detected || transaction::is_live(root, &r.name, &r.digest))
                .map(|r| r.name.clone())
                .collect(),
            drifted: self.drift.iter().map(|d| d.package.clone()).collect(),
            waiting: self
                .retry_at
                .iter()
                .filter(|(_, t)| now < **t)
                .map(|(k, _)| k.clone())
                .chain(
                    self.desired
                        .assignments
                        .iter()
                        .filter(|a| self.attempts.waiting(a, unix_now()))
                        .map(key),
                )
                .collect(),
            not_applicable: self
                .jobs
                .iter()
                .filter(|(_, s)| s.phase == AssignmentPhase::NotApplicable)
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }

    /// One pass over the desired state. Returns whether nothing failed.
    pub async fn converge(&mut self) -> bool {
        let mut installed = match self.state.installed() {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the installed-package record");
                return false;
            }
        };
        // Withheld updates, or a controller away: act on nothing stale,
        // and say so (unless something more telling was refused).
        let expired = match self.desired.frozen {
            true => None,
            false => crate::trust::expired(&self.desired, chrono::Utc::now()),
        };
        if let (Some(e), None) = (&expired, &self.refused) {
            self.refuse(e.refusal());
        }
        if self.desired.frozen || expired.is_some() {
            // Not approved, not known to the controller yet, or expired: change nothing.
            if self.report_due() {
                self.report(&installed).await;
            }
            return true;
        }
        let drift = self.find_drift(&installed);
        let mut touched = drift != self.drift;
        self.drift = drift;
        let desired = self.desired.clone();
        let mut ok = true;
        // The assignments are taken in order; after each install or removal
        // the plan is made again from what is installed now.
        let mut next = 0;
        let zone = jiff::tz::TimeZone::system();
        let choices = Choices::load(&self.state);
        let removals: Vec<String> = loop {
            let facts = self.facts(&installed);
            let plan = plan::plan(&plan::Situation {
                desired: &desired,
                installed: &installed,
                live: &facts.live,
                drifted: &facts.drifted,
                waiting: &facts.waiting,
                not_applicable: &facts.not_applicable,
                now: chrono::Utc::now(),
                zone: &zone,
                choices: &choices,
            });
            let mut act = None;
            while act.is_none() && next < plan.decisions.len() {
                match &plan.decisions[next] {
                    Decision::Wait(a) => {
                        ok = false;
                        // Given up before a restart, or while it lost to
                        // another job: said again.
                        let said = self.jobs.get(&key(a)).map(|s| s.phase);
                        if said != Some(AssignmentPhase::Failed) {
                            if let Some(f) = self.attempts.given_up(a).cloned() {
                                self.fail(a, &f.message, f.count, None);
                                touched = true;
                            }
                        }
                    }
                    Decision::Queued(a) => {
                        self.retry_at.remove(&key(a));
                    }
                    Decision::Done(a) => touched |= self.settle(a, AssignmentPhase::Succeeded, ""),
                    Decision::Conflict { assignment, winner } => {
                        let msg = format!(
                            "job {winner} takes precedence for package {}",
                            assignment.package
                        );
                        touched |= self.settle(assignment, AssignmentPhase::Conflict, &msg);
                    }
                    Decision::Expired(a) => {
                        // Not for this endpoint is not expired.
                        let phase = self.jobs.get(&key(a)).map(|s| s.phase);
                        if phase != Some(AssignmentPhase::NotApplicable) {
                            touched |=
                                self.settle(a, AssignmentPhase::Expired, &expired_message(a));
                        }
                    }
                    Decision::Early(a, t) => {
                        let phase = self.jobs.get(&key(a)).map(|s| s.phase);
                        let msg = starts_message(a, *t);
                        match a.action {
                            // Downloaded ahead once; then it waits.
                            JobAction::Install if phase != Some(AssignmentPhase::Downloaded) => {
                                act = Some(Act::Prefetch((*a).clone(), *t))
                            }
                            JobAction::Install => {
                                touched |= self.settle(a, AssignmentPhase::Downloaded, &msg)
                            }
                            JobAction::Uninstall => {
                                touched |= self.settle(a, AssignmentPhase::Pending, &msg)
                            }
                        }
                    }
                    Decision::Available(a) => {
                        let msg =
                            format!("offered: `caravan-agent install {}` installs it", a.package);
                        touched |= self.settle(a, AssignmentPhase::Available, &msg);
                    }
                    Decision::Blocked(a, why) => {
                        touched |= self.settle(a, AssignmentPhase::Pending, why);
                    }
                    Decision::NotApplicable(a, why) => {
                        touched |= self.settle(a, AssignmentPhase::NotApplicable, why);
                    }
                    Decision::Deferred(a, until) => {
                        let msg =
                            format!("put off by the endpoint's user until {}", rfc3339(*until));
                        touched |= self.settle(a, AssignmentPhase::Deferred, &msg);
                    }
                    Decision::Unreadable(a, why) => {
                        ok = false;
                        if self.settle(a, AssignmentPhase::Failed, why) {
                            tracing::warn!(job = %a.job, package = %a.package, error = %why, "schedule unreadable");
                            touched = true;
                        }
                    }
                    Decision::Install(a, why) => act = Some(Act::Install((*a).clone(), *why)),
                    Decision::Uninstall(a) => act = Some(Act::Uninstall((*a).clone())),
                }
                next += 1;
            }
            match act {
                None => break plan.removals.iter().map(|p| p.to_string()).collect(),
                Some(act) => {
                    touched = true;
                    ok &= self.act(act, &mut installed).await;
                }
            }
        };
        // Downloads no assignment needs any more (a job changed or gone
        // after its package was downloaded ahead) are deleted.
        let needed: HashSet<Digest> = desired.assignments.iter().map(|a| a.digest).collect();
        self.state.prune_downloads(&needed);
        // Remove what no job wants any more (held packages stay as they
        // are), dependents first: what one that failed to go requires stays.
        let mut failed: Vec<String> = Vec::new();
        for package in removals {
            let needed = failed.iter().any(|f| {
                installed
                    .get(f)
                    .is_some_and(|r| r.install.requires.iter().any(|d| d.name == package))
            });
            if needed {
                // Stays, and so does what it requires.
                failed.push(package);
                continue;
            }
            touched = true;
            tracing::info!(%package, "removing package no longer desired");
            if let Err(e) = self.remove(&package, &mut installed).await {
                ok = false;
                tracing::warn!(%package, error = %format!("{e:#}"), "removal failed");
                failed.push(package);
            }
        }
        if touched || self.report_due() {
            self.report(&installed).await;
        }
        ok
    }

    /// Records `phase` for `a` unless it is there already; returns whether it changed.
    fn settle(&mut self, a: &Assignment, phase: AssignmentPhase, message: &str) -> bool {
        // Settled: no retry of it is due.
        self.retry_at.remove(&key(a));
        let changed = self
            .jobs
            .get(&key(a))
            .is_none_or(|s| s.phase != phase || s.message != message);
        if changed {
            self.set_phase(a, phase, message);
        }
        changed
    }

    /// Installs or removes for one assignment, records how it went and
    /// reports it. Returns whether it succeeded.
    async fn act(&mut self, act: Act, installed: &mut Installed) -> bool {
        let (a, result) = match act {
            Act::Install(a, why) => {
                match why {
                    Why::Missing => {
                        tracing::warn!(package = %a.package, "installed package missing from the install root; installing it again")
                    }
                    Why::Repair => {
                        tracing::warn!(package = %a.package, "installed files changed; repairing")
                    }
                    Why::New => {}
                }
                let result = self.install(&a, why, installed).await;
                (a, result)
            }
            Act::Prefetch(a, t) => {
                let result = self.prefetch(&a, installed).await;
                (a, result.and(Err(anyhow::Error::msg(Held::Until(t)))))
            }
            Act::Uninstall(a) => {
                let found = installed.get(&a.package).is_some_and(|r| r.detected);
                let result = self
                    .remove(&a.package, installed)
                    .await
                    .map(|()| match found {
                        true => "forgotten: it was found present, not installed by Caravan, \
                             and is left as it is"
                            .to_string(),
                        false => String::new(),
                    });
                (a, result)
            }
        };
        let ok = match result {
            Ok(output) => {
                self.retry_at.remove(&key(&a));
                if self.attempts.succeeded(&a) {
                    self.attempts.save(&self.state);
                }
                self.set_phase(&a, AssignmentPhase::Succeeded, &output);
                true
            }
            Err(e) if e.is::<Held>() => {
                self.retry_at.remove(&key(&a));
                match e.downcast_ref::<Held>() {
                    // Downloaded ahead: it installs from the job's start.
                    Some(Held::Until(t)) => {
                        self.set_phase(&a, AssignmentPhase::Downloaded, &starts_message(&a, *t))
                    }
                    _ => {
                        tracing::info!(job = %a.job, package = %a.package, "deadline passed during the download; not installed");
                        self.set_phase(&a, AssignmentPhase::Expired, &expired_message(&a));
                    }
                }
                true
            }
            Err(e) if e.downcast_ref::<policy::NotApplicable>().is_some() => {
                let msg = format!("{e:#}");
                // Checked again after a pause (nothing is downloaded for
                // it): an endpoint does not often change its OS.
                self.retry_at
                    .insert(key(&a), Instant::now() + self.config.retry_after);
                tracing::info!(job = %a.job, package = %a.package, reason = %msg, "not applicable here");
                self.set_phase(&a, AssignmentPhase::NotApplicable, &msg);
                true
            }
            Err(e) if waiting(&e).is_some() => {
                // The relay asks to wait (its transfer window): still
                // downloading, not failed; asked again when it says, at
                // least every `retry_after`.
                let (msg, after) = waiting(&e).unwrap_or_default();
                let pause = after
                    .min(self.config.retry_after)
                    .max(std::time::Duration::from_secs(1));
                tracing::info!(job = %a.job, package = %a.package, reason = %msg, retry_in = ?pause, "download waits");
                self.set_phase(&a, AssignmentPhase::Downloading, &msg);
                self.retry_at.insert(key(&a), Instant::now() + pause);
                false
            }
            Err(e) if e.downcast_ref::<DownloadFailed>().is_some() => {
                let msg = format!("{e:#}");
                let pause = self.config.retry_after;
                tracing::warn!(job = %a.job, package = %a.package, error = %msg, retry_in = ?pause, "download failed");
                self.fail(&a, &msg, 0, Some(pause));
                self.retry_at.insert(key(&a), Instant::now() + pause);
                false
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let (count, pause) =
                    self.attempts
                        .failed(&a, &msg, self.config.retry_after, unix_now());
                self.attempts.save(&self.state);
                tracing::warn!(job = %a.job, package = %a.package, error = %msg, attempts = count, retry_in = ?pause, "install failed");
                self.fail(&a, &msg, count, pause);
                false
            }
        };
        self.report(installed).await;
        ok
    }

    /// Compares every installed package with its baseline.
    fn find_drift(&mut self, installed: &Installed) -> Vec<Drift> {
        self.baselines
            .retain(|digest, _| installed.values().any(|r| r.digest == *digest));
        let mut drift = Vec::new();
        let root = &self.config.install_root;
        for r in installed.values() {
            if !transaction::is_live(root, &r.name, &r.digest) {
                continue;
            }
            if !self.baselines.contains_key(&r.digest) {
                match Baseline::load(&self.state, &r.digest) {
                    Ok(Some(b)) => {
                        self.baselines.insert(r.digest, b);
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(package = %r.name, error = %format!("{e:#}"), "baseline unreadable");
                        continue;
                    }
                }
            }
            match self.baselines[&r.digest].drift(&r.name, &root.join(&r.name)) {
                Ok(d) => drift.extend(d),
                Err(e) => tracing::warn!(package = %r.name, error = %e, "drift check failed"),
            }
        }
        drift
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A time as reports show it.
fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
