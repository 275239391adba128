//! Git hosts' push webhooks: `POST /v1/hooks/git/<namespace>/<name>` has
//! GitSource `<namespace>/<name>` synced now instead of at its next
//! interval. The call must be signed with the secret of the GitSource's
//! `spec.webhook.secretRef` — HMAC-SHA256 of the body in
//! `X-Hub-Signature-256` (GitHub, Gitea, Forgejo), or the secret itself in
//! `X-Gitlab-Token` (GitLab) — and that Secret must carry the label
//! `caravan.dev/webhook-secret: "true"` to be used.
//!
//! Nothing is read before the GitSource and its Secret are known, and the
//! body is hashed as it streams in, never held; a few calls at a time are
//! served. Every refusal before the signature check is the same `404` (the
//! reason goes to the log), so the endpoint tells an outsider nothing about
//! what exists. Only push events sync (a `ping` is answered), at most one
//! per [`MIN_GAP`] per GitSource: a replayed or repeated call brings a sync
//! forward, nothing more — the sync fetches from Git as always.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use caravan_api::{labels, names, v1alpha1::GitSource};
use caravan_net::server::ApiError;
use futures::StreamExt as _;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

use super::AppState;

/// Largest push event body hashed (GitHub caps theirs at 25 MB).
pub const HOOK_BODY_LIMIT: usize = 25 << 20;
/// Most webhook calls served at once; more get `429`.
pub const HOOK_CALLS: usize = 8;
/// Least time between two webhook-triggered syncs of one GitSource.
pub const MIN_GAP: Duration = Duration::from_secs(10);

/// What the webhook endpoint keeps between calls.
pub struct Hooks {
    calls: tokio::sync::Semaphore,
    last: Mutex<HashMap<(String, String), Instant>>,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            calls: tokio::sync::Semaphore::new(HOOK_CALLS),
            last: Mutex::default(),
        }
    }
}

/// Checks a push webhook and has its GitSource synced.
pub async fn git(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let Ok(_slot) = s.hooks.calls.try_acquire() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many webhook calls at once; retry",
        ));
    };
    let key = webhook_key(&s, &ns, &name).await.map_err(|why| {
        tracing::warn!(gitsource = %format!("{ns}/{name}"), %why, "webhook refused");
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no GitSource {ns}/{name} takes webhooks here"),
        )
    })?;
    verify(&headers, body, &key).await.map_err(|why| {
        tracing::warn!(gitsource = %format!("{ns}/{name}"), %why, "webhook refused");
        ApiError::new(StatusCode::UNAUTHORIZED, why)
    })?;
    if !is_push(&headers) {
        return Ok(StatusCode::OK);
    }
    let now = Instant::now();
    {
        let mut last = s.hooks.last.lock().expect("lock poisoned");
        let key = (ns.clone(), name.clone());
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < MIN_GAP)
        {
            return Ok(StatusCode::ACCEPTED);
        }
        last.retain(|_, t| now.duration_since(*t) < MIN_GAP);
        last.insert(key, now);
    }
    tracing::info!(gitsource = %format!("{ns}/{name}"), "webhook: syncing now");
    // Dropped when many are waiting already: a sync is coming anyway.
    let _ = s.git_syncs.try_send((ns, name));
    Ok(StatusCode::ACCEPTED)
}

/// The webhook secret of GitSource `ns/name`, or why there is none.
async fn webhook_key(s: &AppState, ns: &str, name: &str) -> Result<Vec<u8>, String> {
    // Checked names only reach the API server's URLs (kube does not escape
    // them), and only in the namespace the controller serves.
    names::object_name(ns).map_err(|e| format!("namespace {e}"))?;
    names::object_name(name).map_err(|e| format!("name {e}"))?;
    if s.ctx
        .config
        .namespace
        .as_deref()
        .is_some_and(|only| only != ns)
    {
        return Err(format!(
            "namespace {ns} is not the one the controller serves"
        ));
    }
    let gs = s
        .ctx
        .namespaced::<GitSource>(ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("reading the GitSource: {e}"))?
        .ok_or("no such GitSource")?;
    let secret_name = gs
        .spec
        .webhook
        .as_ref()
        .map(|w| w.secret_ref.clone())
        .ok_or("the GitSource has no spec.webhook")?;
    let data = crate::context::labelled_secret(
        &s.ctx.client,
        ns,
        &secret_name,
        labels::WEBHOOK_SECRET,
        "webhook",
    )
    .await?;
    data.get("token")
        .map(|t| t.0.clone())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| format!("Secret {secret_name} has no key token"))
}

/// Whether the call is a push event (GitHub, Gitea, Forgejo, GitLab; a
/// host that names no event is taken as pushing).
fn is_push(headers: &HeaderMap) -> bool {
    let event = [
        "x-github-event",
        "x-gitea-event",
        "x-forgejo-event",
        "x-gitlab-event",
    ]
    .iter()
    .find_map(|h| headers.get(*h))
    .and_then(|v| v.to_str().ok());
    match event {
        None => true,
        Some(e) => e.eq_ignore_ascii_case("push") || e.eq_ignore_ascii_case("push hook"),
    }
}

/// Whether the call carries a signature of its body with `key`
/// (`X-Hub-Signature-256: sha256=<hex>`, the body hashed as it streams in,
/// up to [`HOOK_BODY_LIMIT`]) or `key` itself (`X-Gitlab-Token`), compared
/// in constant time.
async fn verify(headers: &HeaderMap, body: Body, key: &[u8]) -> Result<(), String> {
    if let Some(sig) = headers.get("x-hub-signature-256") {
        let hex_sig = sig
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("sha256="))
            .ok_or("X-Hub-Signature-256 is not sha256=<hex>")?;
        let sig = hex::decode(hex_sig).map_err(|_| "X-Hub-Signature-256 is not hex")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
        let mut stream = body.into_data_stream();
        let mut read = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("reading the body: {e}"))?;
            read += chunk.len();
            if read > HOOK_BODY_LIMIT {
                return Err(format!("the body is larger than {HOOK_BODY_LIMIT} bytes"));
            }
            mac.update(&chunk);
        }
        return mac.verify_slice(&sig).map_err(|_| {
            "X-Hub-Signature-256 does not match the body and the webhook secret".into()
        });
    }
    if let Some(token) = headers.get("x-gitlab-token") {
        // Both hashed, so compared whole and in constant time.
        return if Sha256::digest(token.as_bytes()) == Sha256::digest(key) {
            Ok(())
        } else {
            Err("X-Gitlab-Token is not the webhook secret".into())
        };
    }
    Err("unsigned: X-Hub-Signature-256 or X-Gitlab-Token is needed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn only_a_call_signed_with_the_secret_is_taken() {
        let body: &'static [u8] = br#"{"ref":"refs/heads/main"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let check = |h: HeaderMap, b: &'static [u8], key: &'static [u8]| async move {
            verify(&h, Body::from(b), key).await
        };
        let sig = |v: &str| headers("x-hub-signature-256", v);
        assert_eq!(check(sig(&good), body, b"s3cret").await, Ok(()));
        assert!(
            check(sig(&good), b"{}", b"s3cret").await.is_err(),
            "another body"
        );
        assert!(
            check(sig(&good), body, b"other").await.is_err(),
            "another secret"
        );
        assert!(check(sig("sha1=00"), body, b"s3cret").await.is_err());
        assert!(check(sig("sha256=zz"), body, b"s3cret").await.is_err());
        let token = |v: &str| headers("x-gitlab-token", v);
        assert_eq!(check(token("s3cret"), body, b"s3cret").await, Ok(()));
        assert!(check(token("s3cre"), body, b"s3cret").await.is_err());
        assert!(check(HeaderMap::new(), body, b"s3cret")
            .await
            .unwrap_err()
            .contains("unsigned"));
    }

    #[test]
    fn only_push_events_sync() {
        assert!(is_push(&HeaderMap::new()));
        assert!(is_push(&headers("x-github-event", "push")));
        assert!(is_push(&headers("x-gitlab-event", "Push Hook")));
        assert!(!is_push(&headers("x-github-event", "ping")));
        assert!(!is_push(&headers("x-github-event", "issue_comment")));
    }
}
