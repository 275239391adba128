//! Enrollment, as a relay passes it on. The agent's bootstrap token is
//! checked here — relays hold none — and its use counted (see
//! [`caravan_api::v1alpha1::BootstrapToken`]); enrollments are rate-limited
//! per site. Then the Agent for the host ID at the relay's site is found or
//! created. A host ID enrolled already takes the secret it first enrolled
//! with and, once it has a key, a signature with that key over this very
//! enrollment (so a relay that saw the secret cannot take the identity, move
//! it to another site or change its key); an Agent declared in Git ahead of
//! time is claimed by the first to enroll at its own site. An agent that
//! moves to a site that requires approval awaits it there, and a revoked
//! agent stays revoked wherever it moves.

use std::num::NonZeroU32;

use axum::{extract::State, http::StatusCode, Json};
use caravan_api::{
    labels, names,
    v1alpha1::{Agent, BootstrapToken, Replacement, Site, TokenRefusal, TokenString},
    wire::{EnrollForward, EnrollRequest, SiteEnroll},
    API_VERSION,
};
use caravan_net::{agent_tokens, server::ApiError};
use governor::{clock::Clock as _, Quota};
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
    ResourceExt,
};
use sha2::{Digest as _, Sha256};

use super::{kube_error, AppState, RelaySite};
use crate::index::SiteKey;

/// Enrollments allowed per site.
pub type EnrollmentLimiter = governor::DefaultKeyedRateLimiter<SiteKey>;

/// `per_second` enrollments per site, in bursts of up to ten seconds' worth.
pub fn limiter(per_second: u32) -> EnrollmentLimiter {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    governor::RateLimiter::keyed(
        Quota::per_second(rate)
            .allow_burst(rate.saturating_mul(NonZeroU32::new(10).expect("ten is not zero"))),
    )
}

/// Attempts to use a bootstrap token at once before an enrollment gives up.
const USE_ATTEMPTS: usize = 8;

/// Checks the bootstrap token an agent presented at `site` and, if `count`,
/// counts its use (else a used-up token will do); returns its id. A refusal is also a Warning Event on the
/// Site (reason `BootstrapToken…`, one per kind of refusal).
async fn admit(
    s: &AppState,
    ns: &str,
    site: &str,
    site_obj: Option<&Site>,
    presented: &str,
    count: bool,
) -> Result<String, ApiError> {
    let tokens = s.ctx.namespaced::<BootstrapToken>(ns);
    let refuse = |r: TokenRefusal| async move {
        tracing::warn!(%ns, %site, reason = %r, "enrollment refused");
        if let Some(site) = site_obj {
            let event = Event {
                type_: EventType::Warning,
                reason: r.reason().into(),
                note: Some(r.to_string()),
                action: "Enroll".into(),
                secondary: None,
            };
            s.ctx.publish(&event, site).await;
        }
        ApiError::new(StatusCode::UNAUTHORIZED, r.to_string())
    };
    let token = match TokenString::parse(presented) {
        Ok(t) => t,
        Err(r) => return Err(refuse(r).await),
    };
    let uid = site_obj.map(|s| caravan_api::original_uid(&s.metadata));
    for _ in 0..USE_ATTEMPTS {
        let Some(mut record) = tokens.get_opt(&token.id).await.map_err(kube_error)? else {
            return Err(refuse(TokenRefusal::Unknown(token.id.clone())).await);
        };
        let now = chrono::Utc::now();
        match record.admits(&token, site, uid, now) {
            // A machine known already takes no use, and needs none left.
            Err(TokenRefusal::UsedUp { .. }) | Ok(()) if !count => return Ok(token.id),
            Err(r) => return Err(refuse(r).await),
            Ok(()) => {}
        }
        // Counted with the object's resourceVersion: two enrollments racing
        // for the last use cannot both have it.
        let mut status = record.status.take().unwrap_or_default();
        status.uses += 1;
        status.last_used = Some(now);
        record.status = Some(status);
        match tokens
            .replace_status(&token.id, &PostParams::default(), &record)
            .await
        {
            Ok(_) => return Ok(token.id),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return Err(refuse(TokenRefusal::Unknown(token.id.clone())).await)
            }
            Err(e) => return Err(kube_error(e)),
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "bootstrap token {} is being used by many enrollments at once; retry",
            token.id
        ),
    ))
}

/// Checks the bootstrap token, then finds or creates the Agent for a host
/// ID at the relay's site.
pub async fn enroll(
    State(s): State<AppState>,
    RelaySite((ns, site)): RelaySite,
    Json(forwarded): Json<SiteEnroll>,
) -> Result<Json<EnrollForward>, ApiError> {
    let key = (ns.clone(), site.clone());
    if let Err(not_until) = s.enrollments.check_key(&key) {
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many enrollments at site {site}; retry in {} ms",
                wait.as_millis().max(1)
            ),
        ));
    }
    let req = forwarded.request;
    names::host_id(&req.host_id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let host_id = req.host_id.as_str();
    if req.secret.len() < 32 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "secret must be at least 32 characters",
        ));
    }
    caravan_api::facts::check(&req.facts).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    // What the agent says about its endpoint, as the Agent's labels.
    let facts = caravan_api::facts::labels(&req.os, &req.arch, &req.hostname, &req.facts);
    if !req.public_key.is_empty() && caravan_api::signing::parse_public(&req.public_key).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "publicKey must be an ed25519 public key (ed25519:<base64 of 32 bytes>)",
        ));
    }
    let site_obj = s
        .ctx
        .namespaced::<Site>(&ns)
        .get_opt(&site)
        .await
        .map_err(kube_error)?;
    let secret_hash = hex::encode(Sha256::digest(req.secret.as_bytes()));
    let api = s.ctx.namespaced::<Agent>(&ns);
    let existing = find_agent(&s, &api, &ns, &req.hostname, host_id)
        .await
        .map_err(kube_error)?;
    let other_machine = existing
        .as_ref()
        .filter(|a| !a.spec.secret_hash.is_empty() && a.spec.secret_hash != secret_hash);
    // Uses of a bootstrap token count machines joining: a machine the
    // Agent knows (enrolling again: a lost credential, a move, a restore, a
    // handover approved) or one asking again to take it over, as it asked
    // before, takes none (its token is still checked).
    // (Known: its secret, and a key it proves below. An identity without a
    // key proves nothing beyond the secret, which relays see.)
    let known = existing
        .as_ref()
        .is_some_and(|a| a.spec.secret_hash == secret_hash && !a.spec.public_key.is_empty());
    let asked_already = other_machine.is_some_and(|a| {
        a.spec
            .replacement
            .as_ref()
            .is_some_and(|r| r.secret_hash == secret_hash && r.public_key == req.public_key)
    });
    let token_id = admit(
        &s,
        &ns,
        &site,
        site_obj.as_ref(),
        &forwarded.bootstrap_token,
        !(known || asked_already),
    )
    .await?;
    // New agents of a site that requires approval wait for it, and so do
    // agents that move there.
    let approval_required = site_obj
        .as_ref()
        .is_some_and(|s| s.spec.enrollment.require_approval);
    let (name, approved) = match &existing {
        // Another machine under an enrolled host ID (the same one
        // reinstalled, with a host ID from its hardware): it takes the
        // Agent over once approved.
        Some(agent) if other_machine.is_some() => {
            return Err(replacement(
                &s,
                agent,
                &req,
                &forwarded.bootstrap_token,
                &site,
                secret_hash,
            )
            .await)
        }
        // The same machine again (a restart, a restored backup, a move to
        // another site): it must prove it holds the secret it enrolled with.
        Some(agent) => {
            // Everything is checked before anything is written: a refused
            // enrollment changes nothing.
            if !agent.spec.public_key.is_empty() {
                prove_key(
                    agent,
                    &agent.spec.public_key,
                    &req,
                    &forwarded.bootstrap_token,
                )?;
            }
            // Declared ahead of enrollment (in Git): the first to enroll at
            // its site claims it.
            if agent.spec.secret_hash.is_empty() && agent.spec.site != site {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "host ID {host_id} is declared as Agent {} of site {}: enroll it there",
                        agent.name_any(),
                        agent.spec.site
                    ),
                ));
            }
            // Then one patch, guarded by the resourceVersion read: a
            // concurrent change fails it instead of being mixed with it.
            let mut spec = serde_json::Map::new();
            let mut metadata = serde_json::json!({ "resourceVersion": agent.resource_version() });
            if agent.spec.secret_hash.is_empty() {
                spec.insert("secretHash".into(), secret_hash.into());
            }
            if !req.public_key.is_empty() && agent.spec.public_key != req.public_key {
                spec.insert("publicKey".into(), req.public_key.clone().into());
            }
            let mut approved = agent.spec.approved;
            if agent.spec.site != site {
                // A revoked (or unapproved) agent stays so wherever it goes;
                // an approved one awaits approval again where that is asked.
                approved = agent.spec.approved && !approval_required;
                tracing::info!(agent = %agent.name_any(), from = %agent.spec.site, to = %site, approved, "agent moved site");
                spec.insert("site".into(), site.clone().into());
                spec.insert("approved".into(), approved.into());
                metadata["labels"] = serde_json::json!({ labels::SITE: site });
            }
            // Renamed machines keep their Agent, under the new host name.
            if !req.hostname.is_empty() && agent.spec.hostname != req.hostname {
                spec.insert("hostname".into(), req.hostname.clone().into());
            }
            let relabel = caravan_api::facts::patch(agent.labels(), &facts);
            if let Some(relabel) = &relabel {
                let labels = metadata["labels"].as_object_mut();
                match labels {
                    Some(l) => l.extend(relabel.clone()),
                    None => metadata["labels"] = relabel.clone().into(),
                }
            }
            let new_key = spec.contains_key("publicKey");
            if !spec.is_empty() || relabel.is_some() {
                let patch = serde_json::json!({ "metadata": metadata, "spec": spec });
                api.patch(
                    &agent.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(kube_error)?;
            }
            // Reports signed with the new key count from their own sequence
            // on (a restored machine's clock may be behind the old one's).
            if new_key
                && agent
                    .status
                    .as_ref()
                    .is_some_and(|s| s.report_sequence.is_some())
            {
                let patch = serde_json::json!({ "status": { "reportSequence": null } });
                api.patch_status(
                    &agent.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(kube_error)?;
            }
            (agent.name_any(), approved)
        }
        None => {
            let approved = !approval_required;
            let mut name = agent_name(&req.hostname, host_id, 8);
            let mut agent_labels = facts.clone();
            agent_labels.insert(labels::HOST_ID.into(), host_id.into());
            agent_labels.insert(labels::SITE.into(), site.clone());
            let new_agent = |name: &str| -> Result<Agent, ApiError> {
                serde_json::from_value(serde_json::json!({
                    "apiVersion": API_VERSION,
                    "kind": "Agent",
                    "metadata": { "name": name, "namespace": ns, "labels": agent_labels },
                    "spec": { "site": site, "hostId": host_id, "hostname": req.hostname, "approved": approved, "secretHash": secret_hash, "publicKey": req.public_key },
                }))
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
            };
            let created = match api.create(&PostParams::default(), &new_agent(&name)?).await {
                Ok(a) => a,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    // This machine's other enrollment, at the same moment:
                    // the next try finds its Agent.
                    let taken = api.get_opt(&name).await.map_err(kube_error)?;
                    if taken.is_some_and(|a| of_host(&a, host_id)) {
                        return Err(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "host ID {host_id} is being enrolled by another request; retry"
                            ),
                        ));
                    }
                    // Another machine with a similar name and host ID
                    // prefix: use the whole host ID.
                    name = agent_name(&req.hostname, host_id, host_id.len());
                    api.create(&PostParams::default(), &new_agent(&name)?)
                        .await
                        .map_err(kube_error)?
                }
                Err(e) => return Err(kube_error(e)),
            };
            tracing::info!(agent = %name, %site, bootstrap_token = %token_id, approved, "agent enrolled");
            let event = Event {
                type_: EventType::Normal,
                reason: "Enrolled".into(),
                note: Some(format!(
                    "host {} enrolled at site {site} with bootstrap token {token_id}{}",
                    req.hostname,
                    if approved {
                        ""
                    } else {
                        "; it awaits approval (caravan agent approve)"
                    }
                )),
                action: "Enroll".into(),
                secondary: None,
            };
            s.ctx.publish(&event, &created).await;
            (name, approved)
        }
    };
    s.relays.poke(&(ns, site));
    Ok(Json(EnrollForward {
        agent: name,
        approved,
    }))
}

/// Checks that an enrollment for `agent`, which has a key, is signed with
/// that key, for this request's key and bootstrap token, and recently.
fn prove_key(
    agent: &Agent,
    key: &str,
    req: &EnrollRequest,
    bootstrap_token: &str,
) -> Result<(), ApiError> {
    let refuse = |why: String| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("Agent {} has a key: {why}", agent.name_any()),
        )
    };
    let proof = req.proof.as_ref().ok_or_else(|| {
        refuse("enrolling it again needs a signature with that key (restore the machine's state directory, or delete the Agent to enroll anew)".into())
    })?;
    let now = agent_tokens::unix_now();
    if now.abs_diff(proof.time) > agent_tokens::PROOF_SKEW_SECONDS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "enrollment time is {} s from the controller's clock (at most {}): check the endpoint's clock",
                now.abs_diff(proof.time),
                agent_tokens::PROOF_SKEW_SECONDS
            ),
        ));
    }
    let message = agent_tokens::enrollment_message(
        &req.host_id,
        &req.public_key,
        bootstrap_token,
        proof.time,
    );
    caravan_api::signing::verify_bytes(key, &message, &proof.signature)
        .map_err(|_| refuse("the enrollment is not signed with it".into()))
}

/// Records that another machine (proving it holds the key it offers)
/// enrolled under `agent`'s host ID with another secret, to take the
/// Agent over once an administrator approves; the answer to give it. The
/// Agent's own machine goes on as before meanwhile.
async fn replacement(
    s: &AppState,
    agent: &Agent,
    req: &EnrollRequest,
    bootstrap_token: &str,
    site: &str,
    secret_hash: String,
) -> ApiError {
    let name = agent.name_any();
    let host_id = &agent.spec.host_id;
    let conflict = |why: String| ApiError::new(StatusCode::CONFLICT, why);
    if req.public_key.is_empty() {
        return conflict(format!(
            "host ID {host_id} is enrolled already as Agent {name} with another secret; \
             restore that machine's state directory, or delete the Agent to enroll anew"
        ));
    }
    if agent.spec.site != site {
        return conflict(format!(
            "host ID {host_id} is enrolled as Agent {name} of site {}: enroll it there to take it over",
            agent.spec.site
        ));
    }
    // It holds the key it offers, for this enrollment.
    if let Err(e) = prove_key(agent, &req.public_key, req, bootstrap_token) {
        return e;
    }
    let asked = Replacement {
        secret_hash,
        public_key: req.public_key.clone(),
        hostname: req.hostname.clone(),
        requested: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let key_id = |key: &str| {
        caravan_api::signing::parse_public(key)
            .map_or_else(|_| "?".into(), |k| caravan_api::signing::key_id(&k))
    };
    match &agent.spec.replacement {
        // Asked again: nothing new to record.
        Some(r) if (&r.secret_hash, &r.public_key) == (&asked.secret_hash, &asked.public_key) => {}
        // Another machine's request is pending: it is not replaced unseen
        // (a relay, or anyone with a token, could otherwise put its own key
        // in the place of the one the administrator checked).
        Some(r) => {
            return conflict(format!(
                    "another machine's request to take Agent {name} over is pending (host {}, key {}, {}): it must be approved or discarded first",
                r.hostname,
                key_id(&r.public_key),
                r.requested
            ))
        }
        None => {
            // Guarded by the resourceVersion read: an approval meanwhile is
            // not undone.
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": agent.resource_version() },
                "spec": { "replacement": asked },
            });
            let api = s
                .ctx
                .namespaced::<Agent>(&agent.namespace().unwrap_or_default());
            if let Err(e) = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                return kube_error(e);
            }
            let key = key_id(&asked.public_key);
            tracing::warn!(agent = %name, host = %req.hostname, %site, %key, "another machine asks to take the agent over");
            let event = Event {
                type_: EventType::Warning,
                reason: "ReplacementRequested".into(),
                note: Some(format!(
                    "a machine (host {}, key {key}) enrolled under host ID {host_id} with another secret: it takes this Agent over once approved (check the key against that machine's log, then caravan agent approve {name} --replacement {key}); this Agent's machine goes on as before until then",
                    req.hostname
                )),
                action: "Enroll".into(),
                secondary: None,
            };
            s.ctx.publish(&event, agent).await;
        }
    }
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "host ID {host_id} is enrolled already as Agent {name} with another secret: this machine (key {}) takes it over once approved (caravan agent approve {name} --replacement {}), and asks again until then; or restore the machine's state directory",
            key_id(&asked.public_key),
            key_id(&asked.public_key)
        ),
    )
}

/// Whether `agent` is that of host ID `host_id` (its `caravan.dev/host-id` label).
fn of_host(agent: &Agent, host_id: &str) -> bool {
    agent.labels().get(labels::HOST_ID).map(String::as_str) == Some(host_id)
}

/// The Agent of `host_id` in namespace `ns`, if there is one (the oldest,
/// should there be two). Not a list by label, which reads every Agent from
/// etcd to filter them in the API server — seconds at 100,000 Agents, for
/// each enrollment. First the names an enrollment gives it (a read each,
/// current: a restart, a restored backup), then the controller's cache (an
/// Agent declared in Git under another name, a machine renamed since),
/// read again to be current. The cache trails the API server by its watch
/// (THREAT_MODEL.md says what that allows).
async fn find_agent(
    s: &AppState,
    api: &kube::Api<Agent>,
    ns: &str,
    hostname: &str,
    host_id: &str,
) -> Result<Option<Agent>, kube::Error> {
    let mut names = vec![agent_name(hostname, host_id, 8)];
    names.push(agent_name(hostname, host_id, host_id.len()));
    names.dedup();
    for name in &names {
        if let Some(a) = api.get_opt(name).await?.filter(|a| of_host(a, host_id)) {
            return Ok(Some(a));
        }
    }
    if !s.stores.ready() {
        // (Only while the controller starts.)
        let selector = format!("{}={host_id}", labels::HOST_ID);
        let found = api.list(&ListParams::default().labels(&selector)).await?;
        return Ok(found.items.into_iter().next());
    }
    let cached = s
        .stores
        .agents
        .state()
        .into_iter()
        .filter(|a| a.metadata.namespace.as_deref() == Some(ns) && of_host(a, host_id))
        .min_by_key(|a| (a.metadata.creation_timestamp.clone(), a.name_any()));
    match cached {
        Some(a) => Ok(api
            .get_opt(&a.name_any())
            .await?
            .filter(|a| of_host(a, host_id))),
        None => Ok(None),
    }
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
