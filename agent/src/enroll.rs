//! Enrollment: once per state directory (and relay), the agent presents
//! a bootstrap token of its site, its stable host ID, the secret that
//! proves it and the public half of its key pair, and gets its own
//! short-lived credential, kept in the state directory. Before it runs out
//! (or once the relay refuses it) the agent renews it by signing with its
//! key; only if that is refused too does it forget it and enroll again.

use std::time::Duration;

use anyhow::Context as _;
use caravan_api::{
    signing,
    wire::{EnrollRequest, RenewRequest},
};
use caravan_net::Backoff;

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
        if c.server == config.server {
            client.set_token(Some(c.token));
            return Ok(());
        }
    }
    let token = config.bootstrap_token.clone().context(
        "not enrolled yet: a bootstrap token is needed (--bootstrap-token or CARAVAN_BOOTSTRAP_TOKEN)",
    )?;
    let req = EnrollRequest {
        host_id: state.host_id()?,
        secret: state.host_secret()?,
        public_key: signing::encode_public(&state.agent_key()?.verifying_key()),
        hostname: config.hostname.clone(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let res = loop {
        match client.enroll(&token, &req).await {
            Ok(r) => break r,
            Err(e @ ClientError::Unauthorized(_)) => return Err(e).context("enrollment refused"),
            Err(e) if config.once => return Err(e).context("enrolling"),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "enrollment failed");
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
    let time = caravan_net::agent_tokens::unix_now();
    let message = caravan_net::agent_tokens::renewal_message(&creds.agent, time);
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

/// Drops the agent's token (the relay refused it).
pub fn forget(state: &StateDir, client: &mut Client) -> anyhow::Result<()> {
    client.set_token(None);
    state.set_credentials(None)
}
