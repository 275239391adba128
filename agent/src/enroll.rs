//! Enrollment: once per state directory (and relay), the agent presents
//! a bootstrap token of its site, its stable host ID, the secret that
//! proves it, the public half of its key pair and a signature with that
//! key, and gets its own short-lived credential, kept in the state
//! directory. Before it runs out (or once the relay refuses it) the agent
//! renews it by signing with its key; only if that is refused too does it
//! enroll again — and it keeps the old credential until a new one is in
//! hand, so no refusal can leave it with none.

use std::time::Duration;

use anyhow::Context as _;
use caravan_api::{
    signing,
    wire::{EnrollRequest, KeyProof, RenewRequest},
};
use caravan_net::{agent_tokens, Backoff};

use crate::{
    client::{Client, ClientError},
    config::Config,
    state::{Credentials, StateDir},
};

/// Enrolls with the relay unless `state` already holds credentials for it;
/// either way `client` then carries the agent's token.
pub async fn ensure_enrolled(
    config: &Config,
    state: &StateDir,
    client: &mut Client,
) -> anyhow::Result<()> {
    if let Some(c) = state.credentials()? {
        if same_relay(&c.server, &config.server) {
            client.set_token(Some(c.token));
            return Ok(());
        }
    }
    enroll(config, state, client).await
}

/// Whether two relay URLs name the same relay: the scheme aside, so an
/// agent moved from `http://` to `https://` keeps its credential.
fn same_relay(a: &str, b: &str) -> bool {
    let strip = |url: &str| {
        let url = url.trim_end_matches('/');
        url.split_once("://")
            .map_or(url, |(_, rest)| rest)
            .to_string()
    };
    strip(a) == strip(b)
}

/// Enrolls with the relay (again): on success the new credential replaces
/// any old one in `state` and `client`; on failure both are left as they
/// were. Transient failures are retried unless `config.once`.
pub async fn enroll(config: &Config, state: &StateDir, client: &mut Client) -> anyhow::Result<()> {
    let token = config.bootstrap_token.clone().context(
        "not enrolled: a bootstrap token is needed (--bootstrap-token or CARAVAN_BOOTSTRAP_TOKEN)",
    )?;
    let key = state.agent_key()?;
    let host_id = state.host_id()?;
    let public_key = signing::encode_public(&key.verifying_key());
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let res = loop {
        // Signed afresh on every attempt: the proof names the time.
        let time = agent_tokens::unix_now();
        let message = agent_tokens::enrollment_message(&host_id, &public_key, &token, time);
        let req = EnrollRequest {
            host_id: host_id.clone(),
            secret: state.host_secret()?,
            public_key: public_key.clone(),
            proof: Some(KeyProof {
                time,
                signature: signing::sign_bytes(&key, &message),
            }),
            hostname: config.hostname.clone(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            version: config.release.clone(),
            facts: config.facts.clone(),
        };
        match client.enroll(&token, &req).await {
            Ok(r) => break r,
            Err(e @ ClientError::Unauthorized(_)) => return Err(e).context("enrollment refused"),
            Err(e) if config.once => return Err(e).context("enrolling"),
            Err(e) => {
                let delay = backoff.next_delay();
                // The key ID, for an administrator to check a request to
                // take an Agent over against (`caravan agent approve
                // --replacement`): the relay's word is not to be trusted.
                let key = signing::key_id(&key.verifying_key());
                tracing::warn!(error = %e, %key, retry_in = ?delay, "enrollment failed");
                tokio::time::sleep(delay).await;
            }
        }
    };
    tracing::info!(agent = %res.agent, "enrolled");
    state.set_credentials(Some(&Credentials {
        server: config.server.clone(),
        agent: res.agent,
        token: res.token.clone(),
    }))?;
    client.set_token(Some(res.token));
    Ok(())
}

/// Renews the agent's credential at its relay with proof of its key; the
/// new one replaces the old in `state` and `client`.
pub async fn renew(state: &StateDir, client: &mut Client) -> anyhow::Result<()> {
    let creds = state
        .credentials()?
        .context("not enrolled: nothing to renew")?;
    let time = agent_tokens::unix_now();
    let message = agent_tokens::renewal_message(&creds.agent, time);
    let req = RenewRequest {
        agent: creds.agent.clone(),
        time,
        signature: signing::sign_bytes(&state.agent_key()?, &message),
    };
    let res = client
        .renew(&req)
        .await
        .context("renewing the credential")?;
    anyhow::ensure!(
        res.agent == creds.agent,
        "the relay renewed agent {} for agent {}",
        res.agent,
        creds.agent
    );
    state.set_credentials(Some(&Credentials {
        token: res.token.clone(),
        ..creds
    }))?;
    client.set_token(Some(res.token));
    tracing::debug!(agent = %res.agent, "credential renewed");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_relay_is_the_same_over_http_and_https() {
        assert!(super::same_relay(
            "http://hq-relay:8080",
            "https://hq-relay:8080/"
        ));
        assert!(!super::same_relay(
            "https://hq-relay:8080",
            "https://berlin-relay:8080"
        ));
    }
}
