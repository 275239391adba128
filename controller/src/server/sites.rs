//! What a site's relay asks for and tells: its desired state (long-poll),
//! its cache figures, and its agents' reports, written into their Agents'
//! status.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
    Json,
};
use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::AgentStatus,
    wire::{AgentReport, RelayStats, MAX_DRIFT_REPORTED},
};
use caravan_net::server::{long_poll, ApiError, Wait};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{runtime::reflector::ObjectRef, Resource as _};

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

/// Writes each reporting agent's status. Reports for agents of other sites are refused.
pub async fn reports(
    State(s): State<AppState>,
    RelaySite((ns, site)): RelaySite,
    Json(reports): Json<Vec<AgentReport>>,
) -> Result<StatusCode, ApiError> {
    s.ctx.metrics.reports.inc_by(reports.len() as u64);
    for report in reports {
        let agent = s
            .stores
            .agents
            .get(&ObjectRef::new(&report.agent).within(&ns));
        let Some(agent) = agent else {
            tracing::warn!(agent = %report.agent, %site, "report for unknown agent dropped");
            continue;
        };
        // A relay speaks only for its own site's agents (one that moved
        // reports through its new relay); the rest of the batch still counts.
        if agent.spec.site != site {
            tracing::warn!(agent = %report.agent, %site, "report from another site's agent dropped");
            continue;
        }
        let accepted = desired_state_condition(&report, agent.meta().generation);
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
            conditions: vec![accepted],
        };
        status_patch::apply(
            &s.ctx.client,
            agent.as_ref(),
            status,
            field_managers::REPORTS,
        )
        .await
        .map_err(kube_error)?;
    }
    Ok(StatusCode::NO_CONTENT)
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
