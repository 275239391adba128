//! Git hosts' push webhooks: `POST /v1/hooks/git/<namespace>/<name>` has
//! GitSource `<namespace>/<name>` synced now instead of at its next
//! interval. The call must be signed with the secret of the GitSource's
//! `spec.webhook.secretRef` — HMAC-SHA256 of the body in
//! `X-Hub-Signature-256` (GitHub, Gitea, Forgejo), or the secret itself in
//! `X-Gitlab-Token` (GitLab) — and that Secret must carry the label
//! `caravan.dev/webhook-secret: "true"`: the controller reads no other. The
//! body is not otherwise used (the sync fetches from Git as always), so a
//! forged or replayed call can at most cause one early sync.

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use caravan_api::{labels, v1alpha1::GitSource};
use caravan_net::server::ApiError;
use hmac::{Hmac, Mac as _};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use sha2::Sha256;

use super::{kube_error, AppState};

/// Largest push event body read (GitHub caps theirs at 25 MB; the body is
/// only hashed).
pub const HOOK_BODY_LIMIT: usize = 25 << 20;

/// Checks a push webhook and has its GitSource synced.
pub async fn git(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("GitSource {ns}/{name} does not exist or takes no webhook"),
        )
    };
    let gs = s
        .ctx
        .namespaced::<GitSource>(&ns)
        .get_opt(&name)
        .await
        .map_err(kube_error)?
        .ok_or_else(not_found)?;
    let secret_name = gs
        .spec
        .webhook
        .as_ref()
        .map(|w| w.secret_ref.clone())
        .ok_or_else(not_found)?;
    let secret = s
        .ctx
        .namespaced::<Secret>(&ns)
        .get_opt(&secret_name)
        .await
        .map_err(kube_error)?;
    let refuse = |why: String| {
        tracing::warn!(gitsource = %format!("{ns}/{name}"), %why, "webhook refused");
        ApiError::new(StatusCode::FORBIDDEN, why)
    };
    let Some(secret) = secret else {
        return Err(refuse(format!(
            "GitSource {ns}/{name}'s webhook Secret {secret_name} does not exist"
        )));
    };
    if secret
        .labels()
        .get(labels::WEBHOOK_SECRET)
        .map(String::as_str)
        != Some("true")
    {
        return Err(refuse(format!(
            "Secret {ns}/{secret_name} is not labelled {}: \"true\", so the controller does not read it",
            labels::WEBHOOK_SECRET
        )));
    }
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .map(|t| t.0.clone())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| refuse(format!("Secret {ns}/{secret_name} has no key token")))?;
    verify(&headers, &body, &key).map_err(|why| {
        tracing::warn!(gitsource = %format!("{ns}/{name}"), %why, "webhook refused");
        ApiError::new(StatusCode::UNAUTHORIZED, why)
    })?;
    tracing::info!(gitsource = %format!("{ns}/{name}"), uid = ?gs.uid(), "webhook: syncing now");
    // Dropped when many are waiting already: a sync is coming anyway.
    let _ = s.git_syncs.try_send((ns, name));
    Ok(StatusCode::ACCEPTED)
}

/// Whether the call carries a signature of `body` with `key`
/// (`X-Hub-Signature-256: sha256=<hex>`) or `key` itself
/// (`X-Gitlab-Token`), compared in constant time.
fn verify(headers: &HeaderMap, body: &[u8], key: &[u8]) -> Result<(), String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    if let Some(sig) = headers.get("x-hub-signature-256") {
        let hex_sig = sig
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("sha256="))
            .ok_or("X-Hub-Signature-256 is not sha256=<hex>")?;
        let sig = hex::decode(hex_sig).map_err(|_| "X-Hub-Signature-256 is not hex")?;
        mac.update(body);
        return mac.verify_slice(&sig).map_err(|_| {
            "X-Hub-Signature-256 does not match the body and the webhook secret".into()
        });
    }
    if let Some(token) = headers.get("x-gitlab-token") {
        // Equal lengths compared in constant time: both hashed first.
        let same = caravan_net::agent_tokens::same_secret(
            &String::from_utf8_lossy(token.as_bytes()),
            &String::from_utf8_lossy(key),
        );
        return if same {
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

    #[test]
    fn only_a_call_signed_with_the_secret_is_taken() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let sig = |v: &str| headers("x-hub-signature-256", v);
        assert_eq!(verify(&sig(&good), body, b"s3cret"), Ok(()));
        assert!(
            verify(&sig(&good), b"{}", b"s3cret").is_err(),
            "another body"
        );
        assert!(
            verify(&sig(&good), body, b"other").is_err(),
            "another secret"
        );
        assert!(verify(&sig("sha1=00"), body, b"s3cret").is_err());
        assert!(verify(&sig("sha256=zz"), body, b"s3cret").is_err());
        let token = |v: &str| headers("x-gitlab-token", v);
        assert_eq!(verify(&token("s3cret"), body, b"s3cret"), Ok(()));
        assert!(verify(&token("s3cre"), body, b"s3cret").is_err());
        assert!(verify(&HeaderMap::new(), body, b"s3cret")
            .unwrap_err()
            .contains("unsigned"));
    }
}
