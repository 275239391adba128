//! The distribution API relays and the CLI talk to (paths and types in
//! `caravan_api::wire`), and the admission webhook:
//! - [`sites`]: a site's desired state (long-poll), its relay's figures and
//!   its agents' reports;
//! - [`enroll`]: enrollments its relay passes on;
//! - [`blobs`]: blobs for relays, uploads from `caravan package push`;
//! - [`hooks`]: Git hosts' push webhooks (HMAC), for an immediate sync.
//!
//! Relays authenticate with their site's relay token ([`RelaySite`]), and
//! one outside the release window is refused (`caravan_api::skew`); blob
//! uploads with the upload token. Every error is JSON `{"error": "..."}`
//! naming the problem.

pub mod backup;
mod blobs;
pub mod enroll;
pub mod hooks;
mod sites;

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, State},
    http::{request::Parts, StatusCode},
    routing::{get, post},
    Router,
};
use caravan_api::{skew::Component, wire::paths, Digest};
use caravan_net::{
    said_release,
    server::{bearer, within_window, ApiError},
};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;

use crate::{
    cabinet::BlobStore,
    context::Context,
    index::{DesiredIndex, SiteKey},
    site::RelayContacts,
    stores::Stores,
};

/// What the distribution API serves from.
pub struct ServerState {
    pub ctx: Arc<Context>,
    /// Every site's desired state, as the engine last published it.
    pub desired: watch::Receiver<Arc<DesiredIndex>>,
    pub blobs: Arc<BlobStore>,
    pub relays: Arc<RelayContacts>,
    pub stores: Stores,
    /// The long-polls each site's relays hold open (at most [`POLLS_PER_SITE`]).
    pub polls: Arc<caravan_net::server::PollSlots>,
    /// Enrollments per site.
    pub enrollments: enroll::EnrollmentLimiter,
    /// GitSources (namespace, name) a webhook asks to sync now.
    pub git_syncs: tokio::sync::mpsc::Sender<(String, String)>,
    /// The webhook endpoint's call slots and last triggers.
    pub hooks: hooks::Hooks,
    /// The last report taken from each agent, against replays.
    pub reports: sites::ReportSequences,
    /// Whole site desired states being serialized at once (at most
    /// [`WHOLE_ANSWERS`]): each is every agent's document of a site, made
    /// for the request (nothing is kept serialized).
    pub whole_answers: tokio::sync::Semaphore,
    /// Agent status writes in flight, from every relay's report batches
    /// together (at most [`STATUS_WRITES`]).
    pub status_writes: tokio::sync::Semaphore,
}

/// Most Agent status writes from reports in flight at once in this
/// process, whatever the number of relays reporting. Each waits for etcd's
/// commit: beyond what etcd commits at once, more in flight only lengthens
/// the queue in which everything else (the leader's Lease renewals among
/// them) waits.
pub const STATUS_WRITES: usize = 16;

/// Most whole site desired states serialized at once; a relay asking for
/// one beyond that is told to ask again (503).
pub const WHOLE_ANSWERS: usize = 2;

/// Most long-polls the relays of one site may hold open (one per replica).
pub const POLLS_PER_SITE: usize = 32;

type AppState = Arc<ServerState>;

pub fn router(state: AppState) -> Router {
    let packages = state.stores.packages.clone();
    let ctx = state.ctx.clone();
    let validate = {
        let ctx = ctx.clone();
        move |review: axum::Json<_>| {
            crate::webhook::validate_packages(packages.clone(), ctx.clone(), review)
        }
    };
    let validate_cabinets =
        move |review: axum::Json<_>| crate::webhook::validate_cabinets(ctx.clone(), review);
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .route(paths::READYZ, get(|| async { "ok" }))
        .route(
            paths::METRICS,
            get(|State(s): State<AppState>| async move { s.ctx.metrics.encode() }),
        )
        .route(paths::SITE_DESIRED, get(sites::desired))
        .route(paths::SITE_ENROLL, post(enroll::enroll))
        .route(
            paths::GIT_HOOK,
            post(hooks::git).layer(axum::extract::DefaultBodyLimit::max(hooks::HOOK_BODY_LIMIT)),
        )
        .route(paths::SITE_STATS, post(sites::stats))
        .route(
            paths::SITE_REPORTS,
            post(sites::reports).layer(axum::extract::DefaultBodyLimit::max(
                sites::REPORTS_BODY_LIMIT,
            )),
        )
        .route(paths::BLOB, get(blobs::get).put(blobs::put))
        .route(paths::UPLOAD, get(blobs::upload_state))
        .route(paths::VALIDATE_PACKAGES, post(validate))
        .route(paths::VALIDATE_CABINETS, post(validate_cabinets))
        .with_state(state)
}

/// What a controller awaiting a restore serves besides the restore: health,
/// and `503` naming why for everything else.
pub fn awaiting_router() -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .route(paths::READYZ, get(|| async { "ok" }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this controller awaits a restore (`caravan restore`) and serves nothing else until then",
            )
        })
}

/// Checks the bearer token (`Authorization: Bearer`) of a `what` ("upload",
/// "backup"): `configured` is the controller's; none configured, every
/// request is refused.
pub fn check_token(
    configured: Option<&str>,
    what: &str,
    headers: &axum::http::HeaderMap,
) -> Result<(), ApiError> {
    let expected = configured.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{what}s are disabled: the controller has no {what} token"),
        )
    })?;
    if !caravan_net::agent_tokens::same_secret(bearer(headers).unwrap_or_default(), expected) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("invalid {what} token"),
        ));
    }
    Ok(())
}

/// Answers a failed Kubernetes API call as a gateway error.
fn kube_error(e: kube::Error) -> ApiError {
    tracing::warn!(error = %e, "kubernetes API call failed");
    ApiError::new(StatusCode::BAD_GATEWAY, format!("kubernetes API: {e}"))
}

/// Parses the `{digest}` of a path.
fn parse_digest(digest: &str) -> Result<Digest, ApiError> {
    digest
        .parse()
        .map_err(|e: caravan_api::digest::DigestError| {
            ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
        })
}

/// A request authenticated by a relay token, from a relay of a release the
/// controller works with: the site it speaks for.
pub struct RelaySite(pub SiteKey);

impl FromRequestParts<AppState> for RelaySite {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let (ns, name, kid) = state
            .ctx
            .credentials
            .verify_relay_token(token)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid relay token"))?;
        // Only the Site's current credential: a rotated one, or one of a
        // deleted Site, is refused.
        let current = state
            .stores
            .sites
            .get(&ObjectRef::new(&name).within(&ns))
            .map(|s| s.relay_key_id());
        match current {
            Some(current) if current == kid => {}
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("relay credential {kid} of site {ns}/{name} is not the current one (it was rotated, or the Site was deleted and created again); restart the relay with the token its Secret holds now"),
                ))
            }
            None if !state.stores.ready() => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the controller is starting; try again shortly",
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("there is no Site {ns}/{name}"),
                ))
            }
        }
        let site = (ns, name);
        // Recorded before it is judged: the Site's status names the release
        // of a relay it refuses.
        state.relays.contact(&site, said_release(&parts.headers));
        within_window(caravan_api::RELEASE, Component::Relay, &parts.headers)?;
        Ok(Self(site))
    }
}
