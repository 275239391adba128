//! The agent-facing API of a relay (see `caravan_api::wire`).

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, Path, Request, State},
    http::{header, request::Parts, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use caravan_api::{
    skew::Component,
    wire::{paths, EnrollRequest, EnrollResponse, Envelope, RenewRequest, SiteEnroll},
    Digest,
};
use caravan_net::{
    agent_tokens as tokens,
    server::{
        bearer, blob_head, changed, long_poll, serve_stream, within_window, ApiError, FileAnswer,
        Shortcuts, Wait,
    },
};
use futures::future::BoxFuture;

use crate::{cache::CacheError, Relay, SiteState};

pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .route(paths::READYZ, get(readyz))
        .route(
            paths::METRICS,
            get(|State(relay): State<Arc<Relay>>| async move { relay.metrics.encode() }),
        )
        .route(paths::ENROLL, post(enroll))
        .route(paths::RENEW, post(renew))
        .route(paths::DESIRED, get(desired))
        .route(paths::REPORT, post(report))
        .route(paths::ROOTS, get(roots))
        .route(paths::BLOB, get(blob))
        .with_state(relay)
}

fn err(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

/// An agent authenticated by its token, and one the controller serves at
/// this site: an agent that awaits approval, was revoked or whose Agent was
/// deleted is turned away at its next request.
pub struct AgentName(pub String);

/// Why a relay turns away agent `name`, by what `state` says of it: it
/// awaits approval or was revoked (`403`: it waits), or this site does not
/// know it at all, its Agent deleted or moved (`410`: it enrolls again).
fn not_served(state: &SiteState, name: &str) -> ApiError {
    if state.unserved(name) {
        err(
            StatusCode::FORBIDDEN,
            format!("agent {name} is not served at this site: it awaits approval, or was revoked"),
        )
    } else {
        err(
            StatusCode::GONE,
            format!("agent {name} is not known at this site: its Agent was deleted (or moved to another site); enroll again"),
        )
    }
}

/// `Ok` if an agent of the release `headers` say is one the controller
/// works with (judged by the controller's release, as its last desired
/// state said, or this relay's own before then); else `426`, naming both.
/// An agent outside the window still reports (its Agent says why it is
/// refused), fetches roots and renews its credential: it is refused only
/// what it would act on.
fn agent_within_window(relay: &Relay, headers: &HeaderMap) -> Result<(), ApiError> {
    let controller = relay.upstream.controller_release();
    within_window(
        controller.as_deref().unwrap_or(caravan_api::RELEASE),
        Component::Agent,
        headers,
    )
}

/// The site's desired state, once the controller has sent it.
fn current(relay: &Relay) -> Result<Arc<SiteState>, ApiError> {
    relay.state.borrow().clone().ok_or_else(current_missing)
}

fn current_missing() -> ApiError {
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        "relay has no desired state from the controller yet",
    )
}

impl FromRequestParts<Arc<Relay>> for AgentName {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, relay: &Arc<Relay>) -> Result<Self, ApiError> {
        match Downstream::from_request_parts(parts, relay).await? {
            Downstream::Agent(name) => {
                let state = current(relay)?;
                match state.agent(&name) {
                    Some(_) => Ok(Self(name)),
                    None => Err(not_served(&state, &name)),
                }
            }
            Downstream::ChildRelay(site) => Err(err(
                StatusCode::FORBIDDEN,
                format!("the relay of site {site} may only fetch blobs here"),
            )),
        }
    }
}

/// Who is asking, by token: one of this site's agents, or the relay of a
/// site below this one (which fetches its blobs here).
pub enum Downstream {
    Agent(String),
    ChildRelay(String),
}

impl FromRequestParts<Arc<Relay>> for Downstream {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, relay: &Arc<Relay>) -> Result<Self, ApiError> {
        Self::of(relay, &parts.headers)
    }
}

impl Downstream {
    /// Who sent `headers`, by its bearer token.
    fn of(relay: &Relay, headers: &HeaderMap) -> Result<Self, ApiError> {
        let token =
            bearer(headers).ok_or_else(|| err(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let name = tokens::verify(&relay.token, token, tokens::unix_now())
            .map_err(|e| err(StatusCode::UNAUTHORIZED, e.to_string()))?;
        Ok(match name.strip_prefix(tokens::CHILD_RELAY) {
            Some(site) => Self::ChildRelay(site.to_string()),
            None => Self::Agent(name.to_string()),
        })
    }

    /// `Ok` if blob `digest` is theirs: an agent's own, or one of the
    /// sites below for a child site's relay.
    fn may_have(&self, relay: &Relay, digest: &Digest) -> Result<(), ApiError> {
        let state = relay.state.borrow();
        let state = state.as_ref();
        let (assigned, whom) = match self {
            Self::Agent(agent) => (
                state
                    .and_then(|s| s.agent(agent))
                    .is_some_and(|a| a.blobs.contains(digest)),
                format!("agent {agent}"),
            ),
            Self::ChildRelay(site) => (
                state.is_some_and(|s| s.desired.lower.contains(digest)),
                format!("the sites below (relay of {site})"),
            ),
        };
        match assigned {
            true => Ok(()),
            false => Err(err(
                StatusCode::FORBIDDEN,
                format!("blob {digest} is not assigned to {whom}"),
            )),
        }
    }
}

/// The requests a relay answers outside hyper: blobs in its cache, sent
/// from the file, and long-polls with nothing new yet, waiting in little
/// memory. Anything else about them (errors, blobs still arriving) is left
/// to the routes above.
impl Shortcuts for Relay {
    fn file(&self, req: &Parts) -> Option<FileAnswer> {
        let (before, after) = paths::BLOB.split_once("{digest}")?;
        let digest: Digest = req
            .uri
            .path()
            .strip_prefix(before)?
            .strip_suffix(after)?
            .parse()
            .ok()?;
        let who = Downstream::of(self, &req.headers).ok()?;
        who.may_have(self, &digest).ok()?;
        if let Downstream::Agent(_) = who {
            agent_within_window(self, &req.headers).ok()?;
        }
        // Taken before the file is opened: the blob is not evicted meanwhile.
        let lease = self.cache.lease(&digest);
        let file = self.cache.cached(&digest)?;
        let len = file.metadata().ok()?.len();
        let (head, range) = blob_head(&digest, len, &req.headers);
        self.metrics.cache_hits.inc();
        self.metrics.zero_copy_responses.inc();
        self.metrics.served_bytes.inc_by(range.end - range.start);
        Some(FileAnswer {
            head,
            file,
            range,
            hold: Box::new(lease),
        })
    }

    fn park(&self, req: &Parts) -> Option<BoxFuture<'static, ()>> {
        if req.method != http::Method::GET || req.uri.path() != paths::DESIRED {
            return None;
        }
        let Wait(wait) = Wait::of(req).ok()?;
        let Downstream::Agent(agent) = Downstream::of(self, &req.headers).ok()? else {
            return None;
        };
        agent_within_window(self, &req.headers).ok()?;
        let known = req
            .headers
            .get(header::IF_NONE_MATCH)?
            .to_str()
            .ok()?
            .to_owned();
        // Parked only while the agent holds its current document (a revoked
        // agent's poll is answered, and refused, at once).
        let up_to_date = {
            let agent = agent.clone();
            move |state: &Option<Arc<SiteState>>| {
                state
                    .as_ref()
                    .and_then(|s| s.agent(&agent))
                    .is_some_and(|doc| doc.etag == known)
            }
        };
        let mut state = self.state.clone();
        if wait.is_zero() || !up_to_date(&state.borrow_and_update()) {
            return None;
        }
        let slot = self.polls.take(&agent).ok()?;
        Some(Box::pin(async move {
            let _slot = slot;
            let changed = state.wait_for(|s| !up_to_date(s));
            let _ = tokio::time::timeout(wait, changed).await;
        }))
    }
}

/// Ready once the first desired state came from upstream.
async fn readyz(State(relay): State<Arc<Relay>>) -> Response {
    if relay.state.borrow().is_some() {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the controller",
        )
            .into_response()
    }
}

async fn enroll(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    agent_within_window(&relay, &headers)?;
    // Only the controller can tell a good bootstrap token: the relay holds none.
    let bootstrap_token = bearer(&headers)
        .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "missing bootstrap token"))?
        .to_string();
    let hostname = req.hostname.clone();
    let forward = relay
        .upstream
        .enroll(&SiteEnroll {
            bootstrap_token,
            request: req,
        })
        .await
        .map_err(|e| err(e.status(), e.to_string()))?;
    tracing::info!(agent = %forward.agent, host = %hostname, "agent enrolled");
    // Answer once the controller serves the new agent here (or, if it
    // awaits approval, knows it), so that its first poll is not turned away
    // (or told to enroll again).
    let mut state = relay.state.clone();
    let known = state.wait_for(|s| {
        s.as_ref().is_some_and(|s| match forward.approved {
            true => s.agent(&forward.agent).is_some(),
            false => s.unserved(&forward.agent),
        })
    });
    if tokio::time::timeout(ENROLL_SETTLE, known).await.is_err() {
        tracing::warn!(agent = %forward.agent, "enrolled, not yet in the site's desired state");
    }
    let token = relay.credential(&forward.agent);
    relay.metrics.enrollments.inc();
    Ok(Json(EnrollResponse {
        agent: forward.agent,
        token,
    }))
}

impl Relay {
    /// A credential for agent `name`, good for the configured time.
    fn credential(&self, name: &str) -> String {
        tokens::issue(
            &self.token,
            name,
            Some(tokens::unix_now().saturating_add(self.credential_ttl)),
        )
    }
}

/// A new credential for an agent the controller serves here, for proof that
/// it holds the key it enrolled with.
async fn renew(
    State(relay): State<Arc<Relay>>,
    Json(req): Json<RenewRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let state = current(&relay)?;
    if state.agent(&req.agent).is_none() {
        return Err(not_served(&state, &req.agent));
    }
    let refuse = |why: String| err(StatusCode::UNAUTHORIZED, why);
    let key = state.desired.agent_keys.get(&req.agent).ok_or_else(|| {
        refuse(format!(
            "agent {} enrolled without a key; enroll again",
            req.agent
        ))
    })?;
    let now = tokens::unix_now();
    // Not a refusal of the agent: its credential stays good to renew once
    // the clock is right.
    if now.abs_diff(req.time) > tokens::PROOF_SKEW_SECONDS {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "renewal time is {} s from the relay's clock (at most {}): check the endpoint's clock",
                now.abs_diff(req.time),
                tokens::PROOF_SKEW_SECONDS
            ),
        ));
    }
    let message = tokens::renewal_message(&req.agent, req.time);
    caravan_api::signing::verify_bytes(key, &message, &req.signature).map_err(|_| {
        refuse(format!(
            "renewal signature does not verify with agent {}'s key",
            req.agent
        ))
    })?;
    relay.metrics.renewals.inc();
    Ok(Json(EnrollResponse {
        token: relay.credential(&req.agent),
        agent: req.agent,
    }))
}

/// How long an enrollment waits for the controller to serve the new agent.
const ENROLL_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Long-poll for the agent's own desired state.
async fn desired(
    State(relay): State<Arc<Relay>>,
    AgentName(agent): AgentName,
    wait: Wait,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    agent_within_window(&relay, &headers)?;
    // Only a poll that waits holds a connection open.
    let _slot = if wait.0.is_zero() {
        None
    } else {
        Some(relay.polls.take(&agent)?)
    };
    long_poll(relay.state.clone(), &headers, wait, |state, known| {
        // Revoked (or deleted) while it waits: turned away at once.
        let state = state.as_ref().ok_or_else(current_missing)?;
        let doc = state
            .agent(&agent)
            .ok_or_else(|| not_served(state, &agent))?;
        Ok(changed(&doc.etag, || doc.body(), known))
    })
    .await
}

/// The controller's roots of trust, for an agent to pin (or follow). They
/// are public: any agent token will do, served or not.
async fn roots(State(relay): State<Arc<Relay>>, _who: Downstream) -> Result<Response, ApiError> {
    let state = current(&relay)?;
    let roots = &state.roots;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        roots.body.clone(),
    )
        .into_response())
}

async fn report(
    State(relay): State<Arc<Relay>>,
    AgentName(agent): AgentName,
    Json(report): Json<Envelope>,
) -> Result<StatusCode, ApiError> {
    // An agent reports for itself only. (The signature is the controller's
    // to check: it holds the agent's key.)
    let named = caravan_api::trust::report_agent(&report)
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("report: {e}")))?;
    if named != agent {
        return Err(err(
            StatusCode::FORBIDDEN,
            format!("a report for agent {named}: agent {agent} reports for itself only"),
        ));
    }
    relay.metrics.reports.inc();
    relay
        .reports
        .try_send((agent, report))
        .map_err(|e| match e {
            // The agent reports again at its next change or heartbeat.
            tokio::sync::mpsc::error::TrySendError::Full(_) => err(
                StatusCode::SERVICE_UNAVAILABLE,
                "relay is busy passing reports up; report again later",
            ),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                err(StatusCode::SERVICE_UNAVAILABLE, "relay is shutting down")
            }
        })?;
    Ok(StatusCode::ACCEPTED)
}

/// Serves a blob assigned to the agent, from the cache (fetched once if needed).
async fn blob(
    State(relay): State<Arc<Relay>>,
    who: Downstream,
    Path(digest): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let digest: Digest = digest
        .parse()
        .map_err(|e: caravan_api::digest::DigestError| {
            err(StatusCode::BAD_REQUEST, e.to_string())
        })?;
    // An agent gets only its own blobs; a child site's relay only those of
    // the sites below (the controller judges that relay's release).
    who.may_have(&relay, &digest)?;
    if let Downstream::Agent(_) = who {
        agent_within_window(&relay, req.headers())?;
    }
    let blob = match relay.cache.get(&digest).await {
        Ok(blob) => blob,
        Err(e) => {
            let code = match e.as_ref() {
                // Not a failure: the agent waits, told when the window opens.
                CacheError::OutsideWindow { minutes, .. } => {
                    let mut res =
                        err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
                    let retry = (u64::from(*minutes) * 60).max(1);
                    res.headers_mut()
                        .insert(http::header::RETRY_AFTER, retry.into());
                    return Ok(res);
                }
                CacheError::Upstream(u) => u.status(),
                _ => StatusCode::BAD_GATEWAY,
            };
            tracing::warn!(blob = %digest, error = %caravan_net::Chain(&e), "blob unavailable");
            return Err(err(code, e.to_string()));
        }
    };
    if blob.hit {
        &relay.metrics.cache_hits
    } else {
        &relay.metrics.cache_misses
    }
    .inc();
    // The blob stays in the cache as long as this response reads it.
    let lease = relay.cache.lease(&digest);
    let (res, len) = serve_stream(&digest, blob.len, req.headers(), |range| {
        axum::body::Body::from_stream(blob.stream(range, lease))
    });
    relay.metrics.served_bytes.inc_by(len);
    Ok(res)
}
