//! The distribution API relays and the CLI talk to (see `caravan_api::wire`).
//! Relays authenticate with their site's relay token; blob uploads with the
//! upload token. Every error is JSON `{"error": "..."}` naming the problem.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{FromRequestParts, Path, Query, Request, State},
    http::{header, request::Parts, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use caravan_api::{
    labels,
    v1alpha1::{sha256_hex, Agent, AgentStatus},
    wire::{AgentReport, EnrollForward, EnrollRequest, UploadState},
    API_VERSION,
};
use caravan_net::server::{bearer, long_poll, serve_blob, ApiError};
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::reflector::ObjectRef,
    Api, ResourceExt,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::context::{Context, SiteKey};

/// Largest report batch accepted (a relay sends at most `MAX_REPORT_BATCH` reports).
const REPORTS_BODY_LIMIT: usize = 32 << 20;

/// Field manager of Agent status written from reports.
const REPORT_MANAGER: &str = "caravan-reports";

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(ctx): State<Arc<Context>>| async move { ctx.metrics.encode() }),
        )
        .route("/v1/site/desired", get(site_desired))
        .route("/v1/site/enroll", post(enroll))
        .route("/v1/site/stats", post(relay_stats))
        .route(
            "/v1/site/reports",
            post(reports).layer(axum::extract::DefaultBodyLimit::max(REPORTS_BODY_LIMIT)),
        )
        .route("/v1/blobs/{digest}", get(get_blob).put(put_blob))
        .route("/v1/uploads/{digest}", get(upload_state))
        .route(
            crate::webhook::PACKAGES_PATH,
            post(crate::webhook::validate_packages),
        )
        .with_state(ctx)
}

/// Answers a failed Kubernetes API call as a gateway error.
fn kube_error(e: kube::Error) -> ApiError {
    tracing::warn!(error = %e, "kubernetes API call failed");
    ApiError::new(StatusCode::BAD_GATEWAY, format!("kubernetes API: {e}"))
}

/// A request authenticated by a relay token: the site it speaks for.
pub struct RelaySite(pub SiteKey);

impl FromRequestParts<Arc<Context>> for RelaySite {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, ctx: &Arc<Context>) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let site = ctx
            .keys
            .verify_relay_token(token)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid relay token"))?;
        ctx.relay_contact(&site);
        Ok(Self(site))
    }
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

/// Long-poll: answers at once when the site's state differs from the
/// `If-None-Match` revision, else when it changes, else 304 after `wait` seconds.
async fn site_desired(
    State(ctx): State<Arc<Context>>,
    RelaySite(site): RelaySite,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    long_poll(ctx.desired.subscribe(), &headers, q.wait, |index| {
        let entry = index.sites.get(&site).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("site {}/{} does not exist", site.0, site.1),
            )
        })?;
        Ok((entry.etag.clone(), entry.body.clone()))
    })
    .await
}

/// Keeps what a relay says about its cache, for the Site's status.
async fn relay_stats(
    State(ctx): State<Arc<Context>>,
    RelaySite(site): RelaySite,
    Json(stats): Json<caravan_api::wire::RelayStats>,
) -> StatusCode {
    let changed = ctx
        .relay_stats
        .lock()
        .expect("lock poisoned")
        .insert(site.clone(), stats)
        != Some(stats);
    if changed {
        let _ = ctx.site_trigger.send(site);
    }
    StatusCode::NO_CONTENT
}

/// Finds or creates the Agent for a host ID at the relay's site.
async fn enroll(
    State(ctx): State<Arc<Context>>,
    RelaySite((ns, site)): RelaySite,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollForward>, ApiError> {
    let host_id = valid_host_id(&req.host_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "hostId must be 8 to 63 characters of [a-z0-9-], starting and ending alphanumeric",
        )
    })?;
    if req.secret.len() < 32 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "secret must be at least 32 characters",
        ));
    }
    let secret_hash = hex::encode(Sha256::digest(req.secret.as_bytes()));
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = api
        .list(&ListParams::default().labels(&format!("{}={host_id}", labels::HOST_ID)))
        .await
        .map_err(kube_error)?;
    let name = match existing.items.first() {
        // The same machine again (a restart, a restored backup, a move to
        // another site): it must prove it holds the secret it enrolled with.
        Some(agent) => {
            if agent.spec.secret_hash.is_empty() {
                // Declared ahead of enrollment (in Git): the first to enroll claims it.
                let patch = serde_json::json!({ "spec": { "secretHash": secret_hash } });
                api.patch(
                    &agent.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(kube_error)?;
            } else if agent.spec.secret_hash != secret_hash {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "host ID {host_id} is enrolled already as Agent {} with another secret; \
                         restore that machine's state directory, or delete the Agent to enroll anew",
                        agent.name_any()
                    ),
                ));
            }
            if agent.spec.site != site {
                tracing::info!(agent = %agent.name_any(), from = %agent.spec.site, to = %site, "agent moved site");
                let patch = serde_json::json!({ "metadata": { "labels": { labels::SITE: site } }, "spec": { "site": site } });
                api.patch(
                    &agent.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(kube_error)?;
            }
            agent.name_any()
        }
        None => {
            let mut name = agent_name(&req.hostname, host_id, 8);
            let new_agent = |name: &str| -> Result<Agent, ApiError> {
                serde_json::from_value(serde_json::json!({
                    "apiVersion": API_VERSION,
                    "kind": "Agent",
                    "metadata": { "name": name, "namespace": ns, "labels": { labels::HOST_ID: host_id, labels::SITE: site } },
                    "spec": { "site": site, "hostId": host_id, "hostname": req.hostname, "approved": true, "secretHash": secret_hash },
                }))
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
            };
            match api.create(&PostParams::default(), &new_agent(&name)?).await {
                Ok(_) => {}
                // Another machine with a similar name and host ID prefix: use the whole host ID.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    name = agent_name(&req.hostname, host_id, host_id.len());
                    api.create(&PostParams::default(), &new_agent(&name)?)
                        .await
                        .map_err(kube_error)?;
                }
                Err(e) => return Err(kube_error(e)),
            }
            tracing::info!(agent = %name, %site, "agent enrolled");
            name
        }
    };
    let _ = ctx.site_trigger.send((ns, site));
    Ok(Json(EnrollForward { agent: name }))
}

/// A host ID is also a label value: `[a-z0-9-]`, alphanumeric at both ends.
fn valid_host_id(id: &str) -> Option<&str> {
    let ok = (8..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    ok.then_some(id)
}

/// `<sanitized hostname>-<first n of host ID>`: readable and stable.
fn agent_name(hostname: &str, host_id: &str, n: usize) -> String {
    let mut base: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(40);
    let base = base.trim_matches('-');
    let short: String = host_id.chars().filter(|c| *c != '-').take(n).collect();
    if base.is_empty() {
        format!("agent-{short}")
    } else {
        format!("{base}-{short}")
    }
}

/// Writes each reporting agent's status. Reports for agents of other sites are refused.
async fn reports(
    State(ctx): State<Arc<Context>>,
    RelaySite((ns, site)): RelaySite,
    Json(reports): Json<Vec<AgentReport>>,
) -> Result<StatusCode, ApiError> {
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.metrics.reports.inc_by(reports.len() as u64);
    for report in reports {
        let agent = ctx
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
        let status = AgentStatus {
            version: Some(report.version),
            os: Some(report.os),
            arch: Some(report.arch),
            last_seen: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            installed_count: report.installed.len() as u32,
            installed: report.installed,
            jobs: report.jobs,
            drifted_files: report.drift.len() as u32,
            drift: report
                .drift
                .into_iter()
                .take(caravan_api::wire::MAX_DRIFT_REPORTED)
                .collect(),
            conditions: vec![],
        };
        let patch =
            serde_json::json!({ "apiVersion": API_VERSION, "kind": "Agent", "status": status });
        api.patch_status(
            &report.agent,
            &PatchParams::apply(REPORT_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_error)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn digest_hex(digest: &str) -> Result<&str, ApiError> {
    sha256_hex(digest).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{digest:?} is not sha256:<64 hex digits>"),
        )
    })
}

/// Serves a blob from the store; `Range` and `If-Range` are honoured.
async fn get_blob(
    State(ctx): State<Arc<Context>>,
    RelaySite(site): RelaySite,
    Path(digest): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let hex = digest_hex(&digest)?;
    // A relay gets only the blobs its site's agents are assigned.
    let assigned = ctx
        .desired
        .borrow()
        .sites
        .get(&site)
        .is_some_and(|e| e.desired.all_digests().any(|d| d == digest));
    if !assigned {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "blob {digest} is not assigned to any agent of site {}/{}",
                site.0, site.1
            ),
        ));
    }
    let path = ctx.blobs.path(hex);
    if ctx.blobs.size(hex).await.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("blob {digest} is not in the store"),
        ));
    }
    let (res, len) = serve_blob(&path, hex, caravan_net::server::blob_chunk(1), req).await?;
    ctx.metrics.blob_served_bytes.inc_by(len);
    Ok(res)
}

/// Checks the upload token (`Authorization: Bearer`).
fn check_upload_token(ctx: &Context, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = ctx.config.upload_token.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "uploads are disabled: the controller has no upload token",
        )
    })?;
    let given = bearer(headers).unwrap_or_default();
    // Compare digests, so the comparison takes the same time wherever they differ.
    if Sha256::digest(given.as_bytes()) != Sha256::digest(expected.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid upload token",
        ));
    }
    Ok(())
}

/// Where an upload of a blob stands: stored already, or how many bytes of
/// an interrupted upload are kept (resume with `Content-Range`).
async fn upload_state(
    State(ctx): State<Arc<Context>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Json<UploadState>, ApiError> {
    check_upload_token(&ctx, &headers)?;
    let hex = digest_hex(&digest)?;
    Ok(Json(match ctx.blobs.size(hex).await {
        Some(size) => UploadState {
            complete: true,
            offset: size,
        },
        None => UploadState {
            complete: false,
            offset: ctx.blobs.upload_offset(hex).await,
        },
    }))
}

/// Stores an uploaded blob; refused unless its bytes hash to the digest in
/// the path. `Content-Range: bytes <offset>-<last>/<size>` continues an
/// interrupted upload at `offset`.
async fn put_blob(
    State(ctx): State<Arc<Context>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    use crate::store::StoreError as E;
    check_upload_token(&ctx, &headers)?;
    let hex = digest_hex(&digest)?.to_string();
    if let Some(size) = ctx.blobs.size(&hex).await {
        let existing = serde_json::json!({ "digest": digest, "size": size, "existed": true });
        return Ok((StatusCode::OK, Json(existing)).into_response());
    }
    let offset = match headers.get(header::CONTENT_RANGE) {
        None => 0,
        Some(v) => content_range_start(v.to_str().unwrap_or_default()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "Content-Range must be `bytes <first>-<last>/<size>`",
            )
        })?,
    };
    match ctx.blobs.put(&hex, offset, body.into_data_stream()).await {
        Ok(size) => {
            tracing::info!(%digest, size, resumed_at = offset, "blob stored");
            ctx.metrics.blob_upload_bytes.inc_by(size - offset);
            let stored = serde_json::json!({ "digest": digest, "size": size, "existed": false });
            Ok((StatusCode::CREATED, Json(stored)).into_response())
        }
        Err(e @ (E::DigestMismatch { .. } | E::Interrupted { .. })) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ E::Offset { .. }) => Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            e.to_string(),
        )),
        Err(e @ E::Busy) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e @ E::Io { .. }) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// The first byte of `bytes <first>-<last>/<size>`.
fn content_range_start(v: &str) -> Option<u64> {
    let (first, _) = v.strip_prefix("bytes ")?.split_once('-')?;
    first.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_are_readable_and_valid() {
        assert_eq!(
            agent_name("Kiosk_07.example.com", "3f2a9c1e-0000", 8),
            "kiosk-07-example-com-3f2a9c1e"
        );
        assert_eq!(agent_name("", "abcdef0123", 8), "agent-abcdef01");
        assert!(valid_host_id("0123456789abcdef").is_some());
        assert!(valid_host_id("../../etc").is_none());
        assert!(
            valid_host_id("-abcdefgh").is_none(),
            "not a valid label value"
        );
    }
}
