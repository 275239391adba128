//! One package on the endpoint: checked against the endpoint's policy,
//! downloaded and verified (ahead of a job's start, or right before its
//! install), then installed or removed through the install [`transaction`],
//! or switched in as a new agent binary.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use caravan_api::{
    names,
    v1alpha1::{InstallMethod, AGENT_BINARY},
    wire::{Assignment, AssignmentPhase},
};

use super::{Converger, DownloadFailed, Held};
use crate::{
    detect,
    plan::Why,
    policy, selfupdate,
    state::{Installed, InstalledRecord, Progress},
    transaction::Transaction,
};

impl Converger {
    pub(super) fn transaction(&self) -> Transaction<'_> {
        Transaction {
            state: &self.state,
            root: &self.config.install_root,
            max_unpacked_bytes: self.config.max_unpacked_bytes,
            run_as: self.config.script_user.as_ref(),
        }
    }

    /// Checks one package against the endpoint's policy, then downloads and
    /// verifies it (resuming, or only checking what is there); returns where.
    pub(super) async fn fetch(
        &mut self,
        a: &Assignment,
        installed: &Installed,
    ) -> anyhow::Result<PathBuf> {
        let have = installed.get(&a.package).map(|r| r.version.as_str());
        policy::check(
            a,
            have,
            &self.config.trusted_keys,
            &self.config.install_root,
        )?;
        self.transition(a, AssignmentPhase::Downloading, installed)
            .await;
        let blob = self.state.download(&a.digest);
        self.download(a, &blob)
            .await
            .map_err(|e| e.context(DownloadFailed))?;
        Ok(blob)
    }

    /// Fetches one package ahead of its job's start; the download stays for
    /// the install.
    pub(super) async fn prefetch(
        &mut self,
        a: &Assignment,
        installed: &Installed,
    ) -> anyhow::Result<()> {
        self.fetch(a, installed).await?;
        tracing::info!(package = %a.package, version = %a.version, "downloaded ahead of the job's start");
        Ok(())
    }

    /// Fetches and installs one package; returns what to report (an
    /// install script's output tail).
    pub(super) async fn install(
        &mut self,
        a: &Assignment,
        why: Why,
        installed: &mut Installed,
    ) -> anyhow::Result<String> {
        // (Caravan has no version of it, or only one it found present.)
        if why == Why::New && installed.get(&a.package).is_none_or(|r| r.detected) {
            if let Some(found) = self.detect(a, installed).await? {
                return Ok(found);
            }
        }
        let blob = self.fetch(a, installed).await?;
        // A long download may end after the deadline, or once the window
        // closed: a new install does not start then.
        if why == Why::New {
            let now = chrono::Utc::now();
            if a.schedule.expired(now) {
                return Err(anyhow::Error::msg(Held::DeadlinePassed));
            }
            if let Ok(Some(t)) = a.schedule.starts(now, &jiff::tz::TimeZone::system()) {
                return Err(anyhow::Error::msg(Held::Until(t)));
            }
        }
        self.transition(a, AssignmentPhase::Installing, installed)
            .await;
        let record = InstalledRecord {
            name: a.package.clone(),
            version: a.version.clone(),
            digest: a.digest,
            job: a.job.clone(),
            install: a.install.clone(),
            detected: false,
        };
        if a.install.method == InstallMethod::Agent {
            return self.update_self(a, &blob, record, installed).await;
        }
        let done = self
            .transaction()
            .install(&blob, &record, installed)
            .await?;
        self.baselines.insert(a.digest, done.baseline);
        self.drift.retain(|d| d.package != a.package);
        let _ = std::fs::remove_file(&blob);
        tracing::info!(package = %a.package, version = %a.version, "installed");
        Ok(done.output)
    }

    /// Whether the package's detection rules find its version here already
    /// (checked against the endpoint's policy first, as its install would
    /// be): if so it is recorded as installed, detected, and what was
    /// found is returned.
    async fn detect(
        &mut self,
        a: &Assignment,
        installed: &mut Installed,
    ) -> anyhow::Result<Option<String>> {
        let this_agent = a.install.method == InstallMethod::Agent
            && a.package == AGENT_BINARY
            && a.version == self.config.release;
        if a.install.detect.is_empty() && !this_agent {
            return Ok(None);
        }
        policy::check(
            a,
            None,
            &self.config.trusted_keys,
            &self.config.install_root,
        )?;
        let found = if this_agent {
            // This very agent: nothing to fetch (the controller's own
            // agent update reaches agents installed at its release too).
            format!("caravan-agent {} is the agent running", a.version)
        } else {
            let run_as = self.config.script_user.as_ref();
            let Some(found) = detect::present(
                &a.install.detect,
                &a.package,
                &a.version,
                &self.config.install_root,
                run_as,
            )
            .await
            else {
                return Ok(None);
            };
            found
        };
        installed.insert(
            a.package.clone(),
            InstalledRecord {
                name: a.package.clone(),
                version: a.version.clone(),
                digest: a.digest,
                job: a.job.clone(),
                install: a.install.clone(),
                detected: true,
            },
        );
        self.state.set_installed(installed)?;
        tracing::info!(package = %a.package, version = %a.version, %found, "already present; not installed again");
        Ok(Some(format!(
            "already present, not installed by Caravan: {found}"
        )))
    }

    /// Downloads the archive of `a` to `blob` (resuming what is there),
    /// size and digest verified, with its progress for `caravan-agent status`.
    pub(super) async fn download(&self, a: &Assignment, blob: &Path) -> anyhow::Result<()> {
        let mut shown = Progress {
            package: a.package.clone(),
            version: a.version.clone(),
            digest: a.digest,
            received: 0,
            total: a.size,
        };
        let mut last = Instant::now();
        let state = &self.state;
        let downloaded = self
            .client
            .download(&a.digest, a.size, blob, |received| {
                // A few times a second at most.
                if last.elapsed() >= Duration::from_millis(250) || received == a.size {
                    shown.received = received;
                    state.set_progress(Some(&shown));
                    last = Instant::now();
                }
            })
            .await;
        self.state.set_progress(None);
        downloaded.with_context(|| format!("package {} {} ({})", a.package, a.version, a.digest))
    }

    /// A new agent binary: tried out, switched in, recorded, then restarted into.
    pub(super) async fn update_self(
        &mut self,
        a: &Assignment,
        blob: &Path,
        record: InstalledRecord,
        installed: &mut Installed,
    ) -> anyhow::Result<String> {
        if let Some(reason) = selfupdate::refusal(&self.state, &a.digest)? {
            anyhow::bail!("{reason}");
        }
        let next = selfupdate::prepare(blob, &self.state, &self.config).await?;
        let previous = installed.get(&a.package).cloned();
        selfupdate::switch(&next, &self.state, &a.package, &a.digest, previous)?;
        installed.insert(a.package.clone(), record);
        self.state.set_installed(installed)?;
        let _ = std::fs::remove_file(blob);
        self.set_phase(
            a,
            AssignmentPhase::Succeeded,
            "restarted into the new agent",
        );
        self.report(installed).await;
        Err(selfupdate::restart())
    }

    pub(super) async fn remove(
        &mut self,
        package: &str,
        installed: &mut Installed,
    ) -> anyhow::Result<()> {
        names::package_name(package).map_err(anyhow::Error::msg)?;
        if !installed.contains_key(package) {
            return Ok(());
        }
        self.transaction().uninstall(package, installed).await?;
        self.drift.retain(|d| d.package != package);
        tracing::info!(%package, "removed");
        Ok(())
    }
}
