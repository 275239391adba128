//! What a site's relay asks for and tells: its desired state (long-poll),
//! its cache figures, and its agents' reports, written into their Agents'
//! status.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
    Json,
};
use std::collections::{BTreeMap, HashMap};

use futures::StreamExt as _;

use caravan_api::{
    conditions::{self, reasons},
    signing,
    trust::{self, TrustError},
    v1alpha1::{Agent, AgentStatus},
    wire::{AgentReport, Envelope, RelayStats, DELTAS_PARAM, MAX_DRIFT_REPORTED},
};
use caravan_net::server::{long_poll, ApiError, Wait};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType},
        reflector::ObjectRef,
    },
    Resource as _, ResourceExt as _,
};

use super::{AppState, RelaySite};
use crate::{field_managers, status_patch};

/// Largest report batch accepted (a relay sends at most `MAX_REPORT_BATCH` reports).
pub const REPORTS_BODY_LIMIT: usize = 32 << 20;

/// Long-poll: answers at once when the site's state differs from the
/// `If-None-Match` revision, else when it changes, else 304 after `wait`
/// seconds; with changes since that revision when the relay takes them.
pub async fn desired(
    State(s): State<AppState>,
    RelaySite(site): RelaySite,
    wait: Wait,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Only a poll that waits holds a connection open.
    let _slot = match wait.0.is_zero() {
        true => None,
        false => Some(s.polls.take(&format!("site {}/{}", site.0, site.1))?),
    };
    // A relay that applies changes gets them rather than the whole state.
    let deltas = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == format!("{DELTAS_PARAM}=true")));
    long_poll(s.desired.clone(), &headers, wait, |index, known| {
        let feed = index.sites.get(&site).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("site {}/{} does not exist", site.0, site.1),
            )
        })?;
        feed.answer(known, deltas, || s.whole_answers.try_acquire().ok())
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "other relays' whole desired states are being made: ask again shortly",
                )
            })
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

/// The sequence of the last report taken from each agent (by its UID and
/// key, so an Agent made anew or a new key starts afresh), beside the one in
/// its status, which the store may not show yet.
#[derive(Default)]
pub struct ReportSequences(std::sync::Mutex<HashMap<(String, String), u64>>);

type AgentKey = (String, String);

impl ReportSequences {
    fn last(&self, key: &AgentKey) -> u64 {
        let map = self.0.lock().expect("not poisoned");
        map.get(key).copied().unwrap_or(0)
    }

    /// Takes `sequence` for the agent if it is above the last one taken
    /// (checked and set at once, so two deliveries racing cannot both pass),
    /// until the reservation is kept; given back otherwise.
    fn reserve(&self, key: &AgentKey, sequence: u64) -> Option<Reservation<'_>> {
        let mut map = self.0.lock().expect("not poisoned");
        let last = map.entry(key.clone()).or_default();
        (*last < sequence).then(|| Reservation {
            sequences: self,
            key: key.clone(),
            sequence,
            previous: std::mem::replace(last, sequence),
            kept: false,
        })
    }

    /// Gives back a sequence whose status was not written.
    fn release(&self, key: &AgentKey, sequence: u64, previous: u64) {
        let mut map = self.0.lock().expect("not poisoned");
        if let Some(last) = map.get_mut(key).filter(|l| **l == sequence) {
            *last = previous;
        }
    }
}

/// A report's sequence, taken for its agent while its status is written:
/// given back unless kept — the write failed, or never finished because the
/// relay's request was dropped (else the relay's retry would be taken for a
/// duplicate and the status lost).
struct Reservation<'a> {
    sequences: &'a ReportSequences,
    key: AgentKey,
    sequence: u64,
    previous: u64,
    kept: bool,
}

impl Reservation<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.sequences
                .release(&self.key, self.sequence, self.previous);
        }
    }
}

/// What became of one report of a batch.
enum Outcome {
    Taken,
    /// The last report taken, delivered again (a relay retrying): nothing to do.
    Duplicate,
    Refused,
    /// The status could not be written now: the relay should send it again.
    Retry,
}

/// Writes each reporting agent's status, from reports its agent signed.
/// A report that is not signed by the Agent's key, is for an agent of
/// another site, or is older than the last one taken (a replay) is dropped,
/// logged, counted and told on the Agent as a Warning Event
/// (`ReportReplayed`, `ReportNotSigned`, …); the rest of the batch still
/// counts. If a status could not be written, the answer is `503` and the
/// relay sends the batch again (what was taken is then a duplicate).
pub async fn reports(
    State(s): State<AppState>,
    RelaySite((ns, site)): RelaySite,
    Json(reports): Json<Vec<Envelope>>,
) -> Result<StatusCode, ApiError> {
    s.ctx.metrics.reports.inc_by(reports.len() as u64);
    // Different agents' status writes go to the API server side by side;
    // one agent's reports (a relay sends only its latest), in their order.
    let mut by_agent: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    for envelope in reports {
        match trust::report_agent(&envelope) {
            Ok(name) => by_agent.entry(name).or_default().push(envelope),
            Err(e) => {
                s.ctx.metrics.report_refused(e.reason());
                tracing::warn!(error = %e, %site, "malformed report dropped");
            }
        }
    }
    let (s, ns, site) = (&s, &ns, &site);
    let retry: usize = futures::stream::iter(by_agent)
        .map(|(name, envelopes)| async move {
            let mut retry = 0;
            for envelope in &envelopes {
                if let Outcome::Retry = report(s, ns, site, &name, envelope).await {
                    retry += 1;
                }
            }
            retry
        })
        .buffer_unordered(super::STATUS_WRITES)
        .fold(0, |sum, n| std::future::ready(sum + n))
        .await;
    match retry {
        0 => Ok(StatusCode::NO_CONTENT),
        n => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{n} agent status(es) could not be written now; send them again"),
        )),
    }
}

/// Writes the status of agent `name` (as its report says, unverified yet)
/// from `envelope`.
async fn report(s: &AppState, ns: &str, site: &str, name: &str, envelope: &Envelope) -> Outcome {
    let Some(agent) = s.stores.agents.get(&ObjectRef::new(name).within(ns)) else {
        s.ctx.metrics.report_refused("UnknownAgent");
        tracing::warn!(agent = %name, %site, "report for unknown agent dropped");
        return Outcome::Refused;
    };
    // A relay speaks only for its own site's agents (one that moved
    // reports through its new relay).
    if agent.spec.site != site {
        s.ctx.metrics.report_refused("OtherSite");
        tracing::warn!(agent = %name, %site, "report from another site's agent dropped");
        return Outcome::Refused;
    }
    let key = (
        agent.uid().unwrap_or_default(),
        agent.spec.public_key.clone(),
    );
    let accepted = s.reports.last(&key).max(
        agent
            .status
            .as_ref()
            .and_then(|st| st.report_sequence)
            .unwrap_or(0),
    );
    let verified = match agent.spec.public_key.as_str() {
        "" => Err(TrustError::Malformed(
            "the Agent has no publicKey: it has not enrolled with a key (enroll it again)".into(),
        )),
        k => signing::parse_public(k)
            .map_err(|e| TrustError::Malformed(format!("the Agent's publicKey: {e}")))
            .and_then(|k| trust::verify_report(envelope, &k, name, accepted)),
    };
    let report = match verified {
        Ok(report) => report,
        Err(TrustError::Replayed { accepted, found }) if found == accepted => {
            return Outcome::Duplicate
        }
        Err(e) => {
            refuse(s, &agent, site, &e).await;
            return Outcome::Refused;
        }
    };
    let sequence = report.sequence;
    let Some(reservation) = s.reports.reserve(&key, sequence) else {
        // Another delivery of a newer report won the race.
        return Outcome::Duplicate;
    };
    let generation = agent.meta().generation;
    let conditions = vec![
        desired_state_condition(&report, generation),
        conditions::version_supported(
            caravan_api::RELEASE,
            caravan_api::skew::Component::Agent,
            Some(report.version.as_str()).filter(|v| v.len() <= caravan_api::skew::MAX_VERSION_LEN),
            generation,
        ),
    ];
    let facts = caravan_api::facts::check(&report.facts).map(|()| {
        caravan_api::facts::labels(
            &report.os,
            &report.arch,
            &agent.spec.hostname,
            &report.facts,
        )
    });
    // Bounded as a release said in a header is.
    let version: String = report
        .version
        .chars()
        .take(caravan_api::skew::MAX_VERSION_LEN)
        .collect();
    let status = AgentStatus {
        version: Some(version),
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
        conditions,
    };
    // A slot among every relay's status writes (`STATUS_WRITES`), taken
    // only now: a refused report's Event does not hold one.
    let Ok(_slot) = s.status_writes.acquire().await else {
        return Outcome::Retry;
    };
    match status_patch::apply(
        &s.ctx.client,
        agent.as_ref(),
        status,
        field_managers::REPORTS,
    )
    .await
    {
        Ok(_) => {
            reservation.keep();
            relabel(s, &agent, facts).await;
            Outcome::Taken
        }
        // The API server refuses this status for good (a value out of range):
        // sending it again cannot help.
        Err(kube::Error::Api(e))
            if (400..500).contains(&e.code) && e.code != 409 && e.code != 429 =>
        {
            drop(reservation);
            s.ctx.metrics.report_refused("Invalid");
            tracing::warn!(agent = %name, %site, error = %e, "report refused by the API server");
            Outcome::Refused
        }
        Err(e) => {
            drop(reservation);
            tracing::warn!(agent = %name, %site, error = %e, "agent status not written; the relay will send it again");
            Outcome::Retry
        }
    }
}

/// Keeps the Agent's fact labels as its report says (an extra write only
/// when they changed: an upgraded OS, a new label in the agent's
/// configuration). A failure is logged: the next report tries again.
async fn relabel(s: &AppState, agent: &Agent, facts: Result<BTreeMap<String, String>, String>) {
    let wanted = match facts {
        Ok(wanted) => wanted,
        Err(e) => {
            tracing::warn!(agent = %agent.name_any(), error = %e, "labels the agent declares refused");
            return;
        }
    };
    let Some(patch) = caravan_api::facts::patch(agent.labels(), &wanted) else {
        return;
    };
    let patch = serde_json::json!({ "metadata": { "labels": patch } });
    if let Err(e) = s
        .ctx
        .namespaced::<Agent>(&agent.namespace().unwrap_or_default())
        .patch(
            &agent.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        tracing::warn!(agent = %agent.name_any(), error = %e, "agent labels not written");
    }
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
    s.ctx.publish(&event, agent).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_sequence_is_taken_once_and_given_back_if_its_status_was_not_written() {
        let seqs = ReportSequences::default();
        let desk = ("uid-1".to_string(), "ed25519:k".to_string());
        let taken = |r: Option<Reservation<'_>>| r.map(|r| r.previous);
        seqs.reserve(&desk, 10).unwrap().keep();
        assert_eq!(seqs.last(&desk), 10);
        // The same or an older one again (racing deliveries): not taken.
        assert!(seqs.reserve(&desk, 10).is_none());
        assert!(seqs.reserve(&desk, 9).is_none());
        // 12's status could not be written (or its request was dropped
        // midway): given back, 12 can be taken again.
        let twelve = seqs.reserve(&desk, 12).unwrap();
        assert_eq!(seqs.last(&desk), 12);
        drop(twelve);
        assert_eq!(seqs.last(&desk), 10);
        let twelve = seqs.reserve(&desk, 12).unwrap();
        // A release that comes after a newer one was taken changes nothing.
        assert_eq!(taken(seqs.reserve(&desk, 13)), Some(12));
        drop(twelve);
        assert_eq!(seqs.last(&desk), 10, "13 was not kept either");
        seqs.reserve(&desk, 13).unwrap().keep();
        let twelve_late = Reservation {
            sequences: &seqs,
            key: desk.clone(),
            sequence: 12,
            previous: 10,
            kept: false,
        };
        drop(twelve_late);
        assert_eq!(seqs.last(&desk), 13);
        // Another key (the Agent enrolled again with one) starts afresh.
        let rekeyed = ("uid-1".to_string(), "ed25519:other".to_string());
        assert_eq!(taken(seqs.reserve(&rekeyed, 1)), Some(0));
    }
}
