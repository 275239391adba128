//! Enrollment: once per state directory (and relay), the agent presents
//! its site's bootstrap token, its stable host ID and the secret that
//! proves it, and gets its own token, kept in the state directory. An
//! agent whose token is refused later forgets it and enrolls again.

use std::time::Duration;

use anyhow::Context as _;
use caravan_api::wire::EnrollRequest;
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

/// Drops the agent's token (the relay refused it).
pub fn forget(state: &StateDir, client: &mut Client) -> anyhow::Result<()> {
    client.set_token(None);
    state.set_credentials(None)
}
