//! What a site's relay asks for and tells: its desired state (long-poll),
//! its cache figures, and its agents' reports, written into their Agents'
//! status.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
    Json,
};
use std::collections::HashMap;

use caravan_api::{
    conditions::{self, reasons},
    signing,
    trust::{self, TrustError},
    v1alpha1::{Agent, AgentStatus},
    wire::{AgentReport, Envelope, RelayStats, MAX_DRIFT_REPORTED},
};
use caravan_net::server::{long_poll, ApiError, Wait};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    runtime::{
        events::{Event, EventType},
        reflector::ObjectRef,
    },
    Resource as _, ResourceExt as _,
};

use super::{kube_error, AppState, RelaySite};
use crate::{field_managers, status_patch};

/// Largest report batch accepted (a relay sends at most `MAX_REPORT_BATCH` reports).
pub const REPORTS_BODY_LIMIT: usize = 32 << 20;

/// Long-poll: answers at once when the site's state differs from the
/// `If-None-Match` revision, else when it changes, else 304 after `wait` seconds.
pub async fn desired(
    State(s): State<AppState>,
    RelaySite(site): RelaySite,
    wait: Wait,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Only a poll that waits holds a connection open.
    let _slot = match wait.0.is_zero() {
        true => None,
        false => Some(s.polls.take(&format!("site {}/{}", site.0, site.1))?),
    };
    long_poll(s.desired.clone(), &headers, wait, |index| {
        let doc = index.sites.get(&site).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("site {}/{} does not exist", site.0, site.1),
            )
        })?;
        Ok((doc.etag.clone(), doc.body.clone()))
    })
    .await
}

/// Keeps what a relay says about its cache, for the Site's status.
pub async fn stats(
    State(s): State<AppState>,
    RelaySite(site): RelaySite,
    Json(stats): Json<RelayStats>,
) -> StatusCode {
    s.relays.set_stats(&site, stats);
    StatusCode::NO_CONTENT
}

/// The sequence of the last report taken from each agent (namespace, name),
/// beside the one in its status, which the store may not show yet.
#[derive(Default)]
pub struct ReportSequences(std::sync::Mutex<HashMap<(String, String), u64>>);

impl ReportSequences {
    fn last(&self, key: &(String, String)) -> u64 {
        self.0
            .lock()
            .expect("not poisoned")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    fn taken(&self, key: (String, String), sequence: u64) {
        let mut map = self.0.lock().expect("not poisoned");
        let last = map.entry(key).or_default();
        *last = (*last).max(sequence);
    }
}

/// Writes each reporting agent's status, from reports its agent signed.
/// A report that is not signed by the Agent's key, is for an agent of
/// another site, or is not newer than the last one taken (a replay) is
/// dropped, logged, counted and told on the Agent as a Warning Event
/// (`ReportReplayed`, `ReportNotSigned`, …); the rest of the batch still counts.
pub async fn reports(
    State(s): State<AppState>,
    RelaySite((ns, site)): RelaySite,
    Json(reports): Json<Vec<Envelope>>,
) -> Result<StatusCode, ApiError> {
    s.ctx.metrics.reports.inc_by(reports.len() as u64);
    for envelope in reports {
        let name = match trust::report_agent(&envelope) {
            Ok(name) => name,
            Err(e) => {
                s.ctx.metrics.report_refused(e.reason());
                tracing::warn!(error = %e, %site, "malformed report dropped");
                continue;
            }
        };
        let Some(agent) = s.stores.agents.get(&ObjectRef::new(&name).within(&ns)) else {
            s.ctx.metrics.report_refused("UnknownAgent");
            tracing::warn!(agent = %name, %site, "report for unknown agent dropped");
            continue;
        };
        // A relay speaks only for its own site's agents (one that moved
        // reports through its new relay).
        if agent.spec.site != site {
            s.ctx.metrics.report_refused("OtherSite");
            tracing::warn!(agent = %name, %site, "report from another site's agent dropped");
            continue;
        }
        let key = (ns.clone(), name.clone());
        let accepted = s.reports.last(&key).max(
            agent
                .status
                .as_ref()
                .and_then(|st| st.report_sequence)
                .unwrap_or(0),
        );
        let report = signing::parse_public(&agent.spec.public_key)
            .map_err(|e| TrustError::Malformed(format!("the Agent's publicKey: {e}")))
            .and_then(|k| trust::verify_report(&envelope, &k, &name, accepted));
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                refuse(&s, &agent, &site, &e).await;
                continue;
            }
        };
        let sequence = report.sequence;
        let condition = desired_state_condition(&report, agent.meta().generation);
        let status = AgentStatus {
            version: Some(report.version),
            os: Some(report.os),
            arch: Some(report.arch),
            last_seen: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            installed_count: report.installed.len() as u32,
            installed: report.installed,
            jobs: report.jobs,
            drifted_files: report.drift.len() as u32,
            drift: report.drift.into_iter().take(MAX_DRIFT_REPORTED).collect(),
            desired_version: (report.desired_version > 0).then_some(report.desired_version),
            report_sequence: Some(sequence),
            conditions: vec![condition],
        };
        status_patch::apply(
            &s.ctx.client,
            agent.as_ref(),
            status,
            field_managers::REPORTS,
        )
        .await
        .map_err(kube_error)?;
        s.reports.taken(key, sequence);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A refused report: a log line, a count by reason and a Warning Event on the Agent.
async fn refuse(s: &AppState, agent: &Agent, site: &str, e: &TrustError) {
    s.ctx.metrics.report_refused(e.reason());
    tracing::warn!(agent = %agent.name_any(), %site, error = %e, "report refused");
    let event = Event {
        type_: EventType::Warning,
        // One reason per kind of refusal: Events of one reason are folded
        // into the first one's note.
        reason: format!("Report{}", e.reason()),
        note: Some(format!(
            "a report relayed by site {site}'s relay was refused: {e}"
        )),
        action: "Report".into(),
        secondary: None,
    };
    if let Err(e) = s.ctx.recorder.publish(&event, &agent.object_ref(&())).await {
        tracing::debug!(error = %e, "event not recorded");
    }
}

/// Whether the agent acts on a signed desired state, as it reports.
fn desired_state_condition(report: &AgentReport, generation: Option<i64>) -> Condition {
    let (ok, reason, message) = match (&report.desired_refused, report.desired_version) {
        (Some(r), _) => (false, r.reason.as_str(), r.message.clone()),
        (None, 0) => (
            false,
            reasons::NOT_YET_ACCEPTED,
            "the agent has not accepted a signed desired state yet".to_string(),
        ),
        (None, v) => (
            true,
            reasons::VERIFIED,
            format!("acting on signed desired state version {v}"),
        ),
    };
    conditions::new(
        conditions::DESIRED_STATE_ACCEPTED,
        ok,
        reason,
        message,
        generation,
    )
}
