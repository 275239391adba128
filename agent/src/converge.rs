//! Convergence: compare the desired assignments with what is installed, then
//! download, verify, install or remove, reporting every transition.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use caravan_api::{
    signing,
    v1alpha1::{sha256_hex, InstallMethod, JobAction},
    wire::{
        AgentDesired, AgentReport, Assignment, AssignmentPhase, Drift, EnrollRequest, JobState,
    },
};
use ed25519_dalek::VerifyingKey;

use crate::{
    client::Client,
    failpoint, install,
    journal::{Entry, Step},
    manifest::Manifest,
    selfupdate,
    state::{Credentials, InstalledRecord, Progress, StateDir},
    RunArgs,
};

/// Key of one assignment's state: job, package and digest.
type Key = (String, String, String);

fn key(a: &Assignment) -> Key {
    (a.job.clone(), a.package.clone(), a.digest.clone())
}

pub struct Agent {
    pub client: Client,
    args: RunArgs,
    state: StateDir,
    desired: AgentDesired,
    /// Current state of each assignment.
    jobs: HashMap<Key, JobState>,
    /// When each failed assignment may be tried again.
    retry_at: HashMap<Key, Instant>,
    /// When the last report reached the relay; `None` until one has, or after one failed.
    last_delivered: Option<Instant>,
    /// Keys whose package signatures this agent accepts (its own, never the relay's).
    trusted: Vec<VerifyingKey>,
    /// Files of installed packages no longer as installed, as last found.
    drift: Vec<Drift>,
    /// The manifests of installed versions, read once from the state directory.
    manifests: HashMap<String, Manifest>,
    /// This process is a new agent binary whose update awaits its first report.
    on_probation: bool,
}

/// Longest time between two reports, so `lastSeen` stays fresh.
const HEARTBEAT: Duration = Duration::from_secs(300);

impl Agent {
    pub fn new(args: RunArgs, state: StateDir) -> anyhow::Result<Self> {
        let on_probation = selfupdate::on_probation(&state)?;
        let client = Client::new(&args.server, args.ca_file.as_deref())?;
        let mut trusted = Vec::new();
        for path in &args.trusted_keys {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading trusted key {}", path.display()))?;
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                trusted.push(
                    signing::parse_public(line)
                        .with_context(|| format!("trusted key file {}", path.display()))?,
                );
            }
        }
        Ok(Self {
            client,
            args,
            state,
            desired: AgentDesired::default(),
            jobs: HashMap::new(),
            retry_at: HashMap::new(),
            last_delivered: None,
            trusted,
            drift: Vec::new(),
            manifests: HashMap::new(),
            on_probation,
        })
    }

    /// Enrolls with the relay unless this state directory already holds credentials for it.
    pub async fn ensure_enrolled(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.state.credentials()? {
            if c.server == self.args.server {
                self.client.set_token(Some(c.token));
                return Ok(());
            }
        }
        let token = self
            .args
            .bootstrap_token
            .clone()
            .context("not enrolled yet: a bootstrap token is needed (--bootstrap-token or CARAVAN_BOOTSTRAP_TOKEN)")?;
        let req = EnrollRequest {
            host_id: self.state.host_id()?,
            secret: self.state.host_secret()?,
            hostname: self.args.hostname.clone().unwrap_or_else(system_hostname),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut backoff = Duration::from_secs(1);
        let res = loop {
            match self.client.enroll(&token, &req).await {
                Ok(r) => break r,
                Err(e @ crate::client::ClientError::Unauthorized(_)) => {
                    return Err(e).context("enrollment refused")
                }
                Err(e) if self.args.once => return Err(e).context("enrolling"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "enrollment failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        };
        tracing::info!(agent = %res.agent, "enrolled");
        self.state.set_credentials(Some(&Credentials {
            server: self.args.server.clone(),
            agent: res.agent,
            token: res.token.clone(),
        }))?;
        self.client.set_token(Some(res.token));
        Ok(())
    }

    pub fn forget_credentials(&mut self) -> anyhow::Result<()> {
        self.client.set_token(None);
        self.state.set_credentials(None)
    }

    pub fn set_desired(&mut self, desired: AgentDesired) {
        let current: std::collections::HashSet<Key> = desired.assignments.iter().map(key).collect();
        self.jobs.retain(|k, _| current.contains(k));
        self.retry_at.retain(|k, _| current.contains(k));
        self.desired = desired;
    }

    /// How long the next poll may wait: no longer than the next retry is due.
    pub fn next_wait(&self, max: u64) -> u64 {
        let now = Instant::now();
        self.retry_at
            .values()
            .map(|t| t.saturating_duration_since(now).as_secs() + 1)
            .min()
            .unwrap_or(max)
            .min(max)
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
        if self.desired.frozen {
            // Not approved, or not known to the controller yet: change nothing.
            if self.report_due() {
                self.report(&installed).await;
            }
            return true;
        }
        let assignments = self.desired.assignments.clone();
        let mut ok = true;
        let drift = self.find_drift(&installed);
        let mut touched = drift != self.drift;
        self.drift = drift;
        // One install per package: the first job (in job order) wins.
        let mut wanted: BTreeMap<&str, &Assignment> = BTreeMap::new();
        for a in assignments
            .iter()
            .filter(|a| a.action == JobAction::Install)
        {
            wanted.entry(a.package.as_str()).or_insert(a);
        }
        for a in &assignments {
            let k = key(a);
            if self.retry_at.get(&k).is_some_and(|t| Instant::now() < *t) {
                ok = false;
                continue;
            }
            let done = match a.action {
                JobAction::Install => match installed.get(&a.package) {
                    Some(r) if r.digest == a.digest => {
                        let live = a.install.method == InstallMethod::Agent
                            || install::is_live(&self.args.install_root, &a.package, &a.digest);
                        if !live {
                            tracing::warn!(package = %a.package, "installed package missing from the install root; installing it again");
                        }
                        let drifted = self.drift.iter().any(|d| d.package == a.package);
                        if live && drifted && a.repair {
                            tracing::warn!(package = %a.package, "installed files changed; repairing");
                        }
                        live && !(drifted && a.repair)
                    }
                    _ => false,
                },
                JobAction::Uninstall => {
                    !installed.contains_key(&a.package) && !wanted.contains_key(a.package.as_str())
                }
            };
            if done {
                if self.jobs.get(&k).map(|s| s.phase) != Some(AssignmentPhase::Succeeded) {
                    self.set_phase(a, AssignmentPhase::Succeeded, "");
                    touched = true;
                }
                continue;
            }
            if let Some(w) = wanted.get(a.package.as_str()).filter(|w| w.job != a.job) {
                // Another job installs this package: an install waits its turn,
                // an uninstall cannot win.
                if a.action == JobAction::Uninstall
                    && self.jobs.get(&k).map(|s| s.phase) != Some(AssignmentPhase::Failed)
                {
                    let msg = format!("package {} is installed by job {}", a.package, w.job);
                    self.set_phase(a, AssignmentPhase::Failed, &msg);
                    touched = true;
                }
                continue;
            }
            touched = true;
            let result = match a.action {
                JobAction::Install => self.install(a, &mut installed).await,
                JobAction::Uninstall => self
                    .uninstall(&a.package, &mut installed)
                    .await
                    .map(|()| String::new()),
            };
            match result {
                Ok(output) => {
                    self.retry_at.remove(&k);
                    self.set_phase(a, AssignmentPhase::Succeeded, &output);
                }
                Err(e) => {
                    ok = false;
                    let msg = format!("{e:#}");
                    tracing::warn!(job = %a.job, package = %a.package, error = %msg, "assignment failed");
                    self.retry_at.insert(
                        k,
                        Instant::now() + Duration::from_secs(self.args.retry_after),
                    );
                    self.set_phase(a, AssignmentPhase::Failed, &msg);
                }
            }
            self.report(&installed).await;
        }
        // Remove what no job wants any more (held packages stay as they are).
        let hold = &self.desired.hold;
        let stale: Vec<String> = installed
            .keys()
            .filter(|p| !wanted.contains_key(p.as_str()) && !hold.contains(p))
            .cloned()
            .collect();
        for package in stale {
            touched = true;
            tracing::info!(%package, "removing package no longer desired");
            if let Err(e) = self.uninstall(&package, &mut installed).await {
                ok = false;
                tracing::warn!(%package, error = %format!("{e:#}"), "removal failed");
            }
        }
        if touched || self.report_due() {
            self.report(&installed).await;
        }
        ok
    }

    /// Compares every installed package with its manifest.
    fn find_drift(&mut self, installed: &BTreeMap<String, InstalledRecord>) -> Vec<Drift> {
        self.manifests
            .retain(|digest, _| installed.values().any(|r| r.digest == *digest));
        let mut drift = Vec::new();
        for r in installed.values() {
            let root = &self.args.install_root;
            if !install::is_live(root, &r.name, &r.digest) {
                continue;
            }
            if !self.manifests.contains_key(&r.digest) {
                match self.state.manifest(&r.digest) {
                    Ok(Some(m)) => {
                        self.manifests.insert(r.digest.clone(), m);
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(package = %r.name, error = %format!("{e:#}"), "manifest unreadable");
                        continue;
                    }
                }
            }
            let found = self.manifests[&r.digest].drift(&r.name, &root.join(&r.name));
            match found {
                Ok(d) => drift.extend(d),
                Err(e) => tracing::warn!(package = %r.name, error = %e, "drift check failed"),
            }
        }
        drift
    }

    /// A report failed to arrive, or the heartbeat interval passed.
    fn report_due(&self) -> bool {
        self.last_delivered.is_none_or(|t| t.elapsed() > HEARTBEAT)
    }

    fn set_phase(&mut self, a: &Assignment, phase: AssignmentPhase, message: &str) {
        self.jobs.insert(
            key(a),
            JobState {
                job: a.job.clone(),
                package: a.package.clone(),
                digest: a.digest.clone(),
                action: a.action,
                phase,
                message: message.to_string(),
                time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            },
        );
    }

    async fn transition(
        &mut self,
        a: &Assignment,
        phase: AssignmentPhase,
        installed: &BTreeMap<String, InstalledRecord>,
    ) {
        self.set_phase(a, phase, "");
        self.report(installed).await;
    }

    /// Downloads, verifies and installs one package; returns what to report
    /// (a script's output tail).
    async fn install(
        &mut self,
        a: &Assignment,
        installed: &mut BTreeMap<String, InstalledRecord>,
    ) -> anyhow::Result<String> {
        check_package_name(&a.package)?;
        self.check_signature(a)?;
        let root = self.args.install_root.clone();
        install::check_requirements(a, &root)?;
        let hex = sha256_hex(&a.digest)
            .with_context(|| format!("package {}: invalid digest {:?}", a.package, a.digest))?;
        self.transition(a, AssignmentPhase::Downloading, installed)
            .await;
        let partial = self.state.downloads().join(format!("{hex}.part"));
        // Progress for `caravan-agent status`, a few times a second at most.
        let mut shown = Progress {
            package: a.package.clone(),
            version: a.version.clone(),
            digest: a.digest.clone(),
            received: 0,
            total: a.size,
        };
        let mut last = Instant::now();
        let state = &self.state;
        let downloaded = self
            .client
            .download(hex, a.size, &partial, |received| {
                if last.elapsed() >= Duration::from_millis(250) || received == a.size {
                    shown.received = received;
                    state.set_progress(Some(&shown));
                    last = Instant::now();
                }
            })
            .await;
        self.state.set_progress(None);
        downloaded
            .with_context(|| format!("package {} {} ({})", a.package, a.version, a.digest))?;
        self.transition(a, AssignmentPhase::Installing, installed)
            .await;
        let record = InstalledRecord {
            name: a.package.clone(),
            version: a.version.clone(),
            digest: a.digest.clone(),
            job: a.job.clone(),
            install: a.install.clone(),
        };
        if a.install.method == InstallMethod::Agent {
            if let Some(reason) = selfupdate::refusal(&self.state, &a.digest)? {
                anyhow::bail!("{reason}");
            }
            // Tried out, switched in, recorded, then restarted into.
            let next = selfupdate::prepare(&partial, &self.state, &self.args).await?;
            let previous = installed.get(&a.package).cloned();
            selfupdate::switch(&next, &self.state, &a.package, &a.digest, previous)?;
            installed.insert(a.package.clone(), record);
            self.state.set_installed(installed)?;
            let _ = std::fs::remove_file(&partial);
            self.set_phase(
                a,
                AssignmentPhase::Succeeded,
                "restarted into the new agent",
            );
            self.report(installed).await;
            return Err(selfupdate::restart());
        }
        let previous = installed.get(&a.package).map(|r| r.digest.clone());
        let journal = |step| {
            self.state.set_journal(Some(&Entry {
                package: a.package.clone(),
                step,
                to: Some(record.clone()),
            }))
        };
        journal(Step::Staging)?;
        let (blob, r, package, digest, prev) = (
            partial.clone(),
            root.clone(),
            a.package.clone(),
            a.digest.clone(),
            previous.clone(),
        );
        let staged = tokio::task::spawn_blocking(move || {
            install::stage_and_swap(&blob, &r, &package, &digest, prev.as_deref())
        })
        .await
        .context("install task")?;
        let roll_back = || {
            let (root, package, previous) = (root.clone(), a.package.clone(), previous.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    install::roll_back(&root, &package, previous.as_deref())
                })
                .await
                .context("rollback task")?
            }
        };
        if let Err(e) = staged {
            roll_back().await?;
            self.state.set_journal(None)?;
            return Err(e.context(format!("installing package {} {}", a.package, a.version)));
        }
        journal(Step::Swapped)?;
        failpoint::hit("swapped");
        let mut output = String::new();
        // The install script, then the health check: either failing puts
        // the previous version (or nothing) back.
        for action in ["install", "health"] {
            let Some(script) = install::script_for(&a.install, action) else {
                continue;
            };
            let dir = root.join(&a.package);
            match install::run_script(
                &dir, &root, script, action, &a.package, &a.version, &a.install,
            )
            .await
            {
                Ok(tail) if action == "install" => output = tail,
                Ok(_) => {}
                Err(e) => {
                    roll_back().await?;
                    self.state.set_journal(None)?;
                    return Err(
                        e.context(format!("package {} {} rolled back", a.package, a.version))
                    );
                }
            }
        }
        // What the version consists of once its script has run: the baseline for drift.
        let dir = root.join(&a.package);
        let manifest = tokio::task::spawn_blocking(move || Manifest::build(&dir))
            .await
            .context("manifest task")?
            .with_context(|| format!("recording the files of package {}", a.package))?;
        self.state.set_manifest(&a.digest, &manifest)?;
        self.manifests.insert(a.digest.clone(), manifest);
        journal(Step::Configured)?;
        failpoint::hit("configured");
        let (r, package, digest) = (root.clone(), a.package.clone(), a.digest.clone());
        tokio::task::spawn_blocking(move || install::drop_old(&r, &package, &digest))
            .await
            .context("install task")??;
        failpoint::hit("old-dropped");
        installed.insert(a.package.clone(), record);
        self.state.set_installed(installed)?;
        self.state.set_journal(None)?;
        self.state.prune_manifests(installed)?;
        self.drift.retain(|d| d.package != a.package);
        let _ = std::fs::remove_file(&partial);
        tracing::info!(package = %a.package, version = %a.version, "installed");
        Ok(output)
    }

    /// Refuses a package that is not signed as this agent's policy (or its
    /// cabinet) requires; checked before anything is downloaded.
    fn check_signature(&self, a: &Assignment) -> anyhow::Result<()> {
        if self.trusted.is_empty() {
            anyhow::ensure!(
                !a.require_signature,
                "package {} {} must be signed, but this agent trusts no signing keys (--trusted-key)",
                a.package,
                a.version
            );
            return Ok(());
        }
        signing::verify(
            &self.trusted,
            &a.signatures,
            &a.package,
            &a.version,
            &a.digest,
        )
        .with_context(|| format!("package {} {} refused", a.package, a.version))?;
        Ok(())
    }

    async fn uninstall(
        &mut self,
        package: &str,
        installed: &mut BTreeMap<String, InstalledRecord>,
    ) -> anyhow::Result<()> {
        check_package_name(package)?;
        if let Some(record) = installed.get(package) {
            let root = self.args.install_root.clone();
            let journal = |step| {
                self.state.set_journal(Some(&Entry {
                    package: package.to_string(),
                    step,
                    to: None,
                }))
            };
            if let Some(script) = install::script_for(&record.install, "uninstall") {
                journal(Step::Unconfiguring)?;
                failpoint::hit("unconfiguring");
                let dir = root.join(package);
                let done = install::run_script(
                    &dir,
                    &root,
                    script,
                    "uninstall",
                    package,
                    &record.version,
                    &record.install,
                )
                .await;
                if let Err(e) = done {
                    self.state.set_journal(None)?;
                    return Err(e.context(format!("package {package} kept")));
                }
            }
            journal(Step::Removing)?;
            failpoint::hit("removing");
            let p = package.to_string();
            tokio::task::spawn_blocking(move || install::remove_package(&root, &p))
                .await
                .context("remove task")??;
            failpoint::hit("removed");
            installed.remove(package);
            self.state.set_installed(installed)?;
            self.state.set_journal(None)?;
            self.state.prune_manifests(installed)?;
            self.drift.retain(|d| d.package != package);
            tracing::info!(%package, "removed");
        }
        Ok(())
    }

    async fn report(&mut self, installed: &BTreeMap<String, InstalledRecord>) {
        let mut jobs: Vec<JobState> = self.jobs.values().cloned().collect();
        jobs.sort_by(|a, b| (&a.job, &a.package).cmp(&(&b.job, &b.package)));
        let report = AgentReport {
            agent: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            installed: installed.values().map(Into::into).collect(),
            jobs,
            drift: self.drift.clone(),
        };
        if let Err(e) = self.state.set_last_report(&report) {
            tracing::warn!(error = %e, "cannot save the last report");
        }
        match self.client.report(&report).await {
            Ok(()) => {
                self.last_delivered = Some(Instant::now());
                // A new agent binary that reports has proved itself.
                if self.on_probation {
                    match selfupdate::confirm(&self.state) {
                        Ok(()) => self.on_probation = false,
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "confirming the self-update")
                        }
                    }
                }
            }
            Err(e) => {
                // The next poll sends the full state again.
                self.last_delivered = None;
                tracing::warn!(error = %e, "report not delivered; will resend");
            }
        }
    }
}

/// Package names become directory names: one plain path component.
fn check_package_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    anyhow::ensure!(ok, "package name {name:?} is not a safe directory name");
    Ok(())
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
