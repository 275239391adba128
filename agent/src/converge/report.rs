//! What the agent tells: each assignment's state as it changes, and the
//! signed report of the whole endpoint, sent at every transition and at
//! least every [`HEARTBEAT`] so `lastSeen` stays fresh.

use std::time::{Duration, Instant};

use caravan_api::wire::{AgentReport, Assignment, AssignmentPhase, JobState};

use super::Converger;
use crate::{metrics, plan::key, selfupdate, state::Installed};

/// Longest time between two reports, so `lastSeen` stays fresh.
const HEARTBEAT: Duration = Duration::from_secs(300);

impl Converger {
    /// Reports what is installed, when a report is due, and acts on
    /// nothing: the relay refuses this agent's release, and its Agent
    /// says so from the report.
    pub async fn report_only(&mut self) {
        if !self.report_due() {
            return;
        }
        match self.state.installed() {
            Ok(installed) => self.report(&installed).await,
            Err(e) => tracing::error!(error = %e, "cannot read the installed-package record"),
        }
    }

    /// A report failed to arrive, or the heartbeat interval passed.
    pub(super) fn report_due(&self) -> bool {
        self.last_delivered.is_none_or(|t| t.elapsed() > HEARTBEAT)
    }

    pub(super) fn set_phase(&mut self, a: &Assignment, phase: AssignmentPhase, message: &str) {
        self.jobs.insert(
            key(a),
            JobState {
                job: a.job.clone(),
                package: a.package.clone(),
                digest: a.digest,
                action: a.action,
                phase,
                message: message.to_string(),
                time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                attempts: 0,
                retry_at: None,
            },
        );
    }

    /// Records a failure of `a` for its report: tried again after `pause`,
    /// or (`None`) given up. (Who waits keeps the time: `attempts` for an
    /// install, `retry_at` for a download.)
    pub(super) fn fail(
        &mut self,
        a: &Assignment,
        message: &str,
        attempts: u32,
        pause: Option<Duration>,
    ) {
        self.set_phase(a, AssignmentPhase::Failed, message);
        self.retry_at.remove(&key(a));
        if let Some(s) = self.jobs.get_mut(&key(a)) {
            s.attempts = attempts;
            s.retry_at = pause
                .and_then(|p| chrono::Duration::from_std(p).ok())
                .map(|p| {
                    (chrono::Utc::now() + p).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                });
        }
    }

    pub(super) async fn transition(
        &mut self,
        a: &Assignment,
        phase: AssignmentPhase,
        installed: &Installed,
    ) {
        self.set_phase(a, phase, "");
        self.report(installed).await;
    }

    pub(super) async fn report(&mut self, installed: &Installed) {
        let mut jobs: Vec<JobState> = self.jobs.values().cloned().collect();
        jobs.sort_by(|a, b| (&a.job, &a.package).cmp(&(&b.job, &b.package)));
        let report = AgentReport {
            // Filled in when signed.
            agent: String::new(),
            sequence: 0,
            version: self.config.release.clone(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            installed: installed.values().map(Into::into).collect(),
            jobs,
            drift: self.drift.clone(),
            desired_version: self.desired.version,
            desired_refused: self.refused.clone(),
            facts: self.config.facts.clone(),
        };
        let figures = self.config.metrics_file.as_ref().map(|_| report.clone());
        let signed = match self.state.sign_report(report) {
            Ok(signed) => signed,
            Err(e) => {
                self.last_delivered = None;
                tracing::warn!(error = %format!("{e:#}"), "cannot sign the report; will retry");
                return;
            }
        };
        match self.client.report(&signed).await {
            Ok(()) => {
                self.last_delivered = Some(Instant::now());
                self.delivered_at = Some(std::time::SystemTime::now());
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
        if let (Some(path), Some(report)) = (&self.config.metrics_file, figures) {
            if let Err(e) = metrics::write(path, &metrics::encode(&report, self.delivered_at)) {
                tracing::warn!(path = %path.display(), error = %e, "the metrics file was not written");
            }
        }
    }
}
