//! Enrollment, as a relay passes it on: the Agent for a host ID at the
//! relay's site, found or created. A host ID enrolled already takes the
//! secret it first enrolled with (nobody else can take over an identity);
//! an Agent declared in Git ahead of time is claimed by the first to enroll.

use axum::{extract::State, http::StatusCode, Json};
use caravan_api::{
    labels, names,
    v1alpha1::Agent,
    wire::{EnrollForward, EnrollRequest},
    API_VERSION,
};
use caravan_net::server::ApiError;
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    ResourceExt,
};
use sha2::{Digest as _, Sha256};

use super::{kube_error, AppState, RelaySite};

/// Finds or creates the Agent for a host ID at the relay's site.
pub async fn enroll(
    State(s): State<AppState>,
    RelaySite((ns, site)): RelaySite,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollForward>, ApiError> {
    names::host_id(&req.host_id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let host_id = req.host_id.as_str();
    if req.secret.len() < 32 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "secret must be at least 32 characters",
        ));
    }
    let secret_hash = hex::encode(Sha256::digest(req.secret.as_bytes()));
    let api = s.ctx.namespaced::<Agent>(&ns);
    let existing = api
        .list(&ListParams::default().labels(&format!("{}={host_id}", labels::HOST_ID)))
        .await
        .map_err(kube_error)?;
    let name = match existing.items.first() {
        // The same machine again (a restart, a restored backup, a move to
        // another site): it must prove it holds the secret it enrolled with.
        Some(agent) => {
            let merge = |patch: serde_json::Value| {
                let (api, name) = (api.clone(), agent.name_any());
                async move {
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(kube_error)
                }
            };
            if agent.spec.secret_hash.is_empty() {
                // Declared ahead of enrollment (in Git): the first to enroll claims it.
                merge(serde_json::json!({ "spec": { "secretHash": secret_hash } })).await?;
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
                merge(serde_json::json!({ "metadata": { "labels": { labels::SITE: site } }, "spec": { "site": site } })).await?;
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
    s.relays.poke(&(ns, site));
    Ok(Json(EnrollForward { agent: name }))
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
        assert!(
            names::object_name(&agent_name("Kiosk_07.example.com", "3f2a9c1e-0000", 8)).is_ok()
        );
    }
}
