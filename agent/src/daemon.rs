//! `caravan-agent run`: take the state directory for this process, finish
//! any change a crash interrupted, enroll if needed, then long-poll the
//! relay for the desired state and converge to it, forever (or once). The
//! first pass runs at start-up without waiting, so an endpoint that was off
//! gets its jobs as soon as it comes back.

use std::time::Duration;

use anyhow::Context as _;
use caravan_net::Backoff;

use crate::{
    client::{Client, ClientError},
    config::Config,
    converge::Converger,
    enroll, selfupdate,
    state::StateDir,
    transaction,
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)
        .with_context(|| format!("opening state directory {}", config.state_dir.display()))?;
    let _lock = state.lock()?;
    // Where this binary is, before a self-update replaces it.
    selfupdate::pin_binary(config.binary.clone())?;
    transaction::recover(&state, &config.install_root)
        .context("finishing an interrupted change")?;
    let mut client = Client::new(&config.server, config.ca_file.as_deref())?;
    enroll::ensure_enrolled(&config, &state, &mut client).await?;
    let mut agent = Converger::new(config.clone(), state, client)?;
    let mut etag: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    // First pass at start-up: converge to the current state without waiting.
    let mut wait = 0;
    loop {
        match agent.client.desired(etag.as_deref(), wait).await {
            Ok(Some((new_etag, desired))) => {
                etag = Some(new_etag);
                agent.set_desired(desired);
                let ok = agent.converge().await;
                if config.once {
                    anyhow::ensure!(ok, "some assignments failed; see `caravan-agent status`");
                    return Ok(());
                }
                backoff.reset();
            }
            Ok(None) => {
                agent.converge().await;
            }
            Err(ClientError::Unauthorized(msg)) => {
                tracing::warn!(%msg, "credentials refused; enrolling again");
                enroll::forget(&agent.state, &mut agent.client)?;
                enroll::ensure_enrolled(&config, &agent.state, &mut agent.client).await?;
                continue;
            }
            Err(e) => {
                if config.once {
                    return Err(e.into());
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "polling the relay failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        wait = agent.next_wait(config.poll_wait);
    }
}
