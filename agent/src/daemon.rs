//! `caravan-agent run`: take the state directory for this process, finish
//! any change a crash interrupted, enroll if needed, pin the controller's
//! root of trust if not yet, then long-poll the relay for the desired state,
//! verify it ([`crate::trust`]) and converge to it, forever (or once). The
//! first pass runs at start-up without waiting, so an endpoint that was off
//! gets its jobs as soon as it comes back.

use std::time::Duration;

use anyhow::Context as _;
use caravan_api::{trust::TrustError, wire::AgentServed};
use caravan_net::Backoff;

use crate::{
    choices,
    client::{Client, ClientError},
    config::Config,
    converge::Converger,
    enroll, selfupdate,
    state::StateDir,
    transaction,
    trust::Trust,
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)
        .with_context(|| format!("opening state directory {}", config.state_dir.display()))?;
    let _lock = state.lock()?;
    if let Some(path) = &config.host_id_from {
        crate::host_id::adopt(&state, path)?;
    }
    // Where this binary is, before a self-update replaces it.
    selfupdate::pin_binary(config.binary.clone())?;
    transaction::recover(&state, &config.install_root)
        .context("finishing an interrupted change")?;
    let mut client = Client::new(&config.server, config.ca_file.as_deref())?
        .with_min_rate(config.min_download_rate)
        .with_release(config.release.clone());
    enroll::ensure_enrolled(&config, &state, &mut client).await?;
    let mut trust = ensure_trust(&config, &state, &client).await?;
    let mut agent = Converger::new(config.clone(), state, client)?;
    let mut etag: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    // First pass at start-up: converge to the current state without waiting.
    let mut wait = 0;
    loop {
        if agent.client.renewal_due() {
            // Early, so the relay never has to refuse it; if this fails the
            // refusal below renews (or enrolls) again.
            if let Err(e) = enroll::renew(&agent.state, &mut agent.client).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "renewing the credential before it expires failed"
                );
            }
        }
        // A choice of the endpoint's user (`caravan-agent install|defer`)
        // is acted on at once, not at the end of the long poll.
        let polled = tokio::select! {
            r = agent.client.desired(etag.as_deref(), wait) => Some(r),
            () = changed(agent.state.path().join(choices::FILE)) => None,
        };
        let Some(polled) = polled else {
            tracing::info!("the endpoint's user made a choice");
            agent.converge().await;
            wait = agent.next_wait(agent.until_expiry(config.poll_wait));
            continue;
        };
        match polled {
            Ok(Some((new_etag, served))) => {
                etag = Some(new_etag);
                let refused = judge(&mut trust, &mut agent, &served).await?;
                let ok = agent.converge().await;
                if config.once {
                    if let Some(e) = refused {
                        anyhow::bail!("desired state refused: {e}");
                    }
                    anyhow::ensure!(ok, "some assignments failed; see `caravan-agent status`");
                    return Ok(());
                }
                backoff.reset();
            }
            Ok(None) => {
                agent.converge().await;
            }
            // Not approved yet, revoked or deleted: act on nothing, keep what
            // is installed, and ask again later (an approval lets it in).
            Err(e @ ClientError::Forbidden(_)) => {
                if config.once {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, retry_in = ?config.retry_after, "not served");
                tokio::time::sleep(config.retry_after).await;
                continue;
            }
            // Of a release the controller does not work with: nothing it
            // is served can be trusted to mean what it reads, so it acts on
            // nothing and keeps what is installed until it is upgraded.
            Err(e @ ClientError::Skew(_)) => {
                if config.once {
                    return Err(e.into());
                }
                tracing::error!(error = %e, retry_in = ?config.retry_after, "release refused");
                agent.report_only().await;
                tokio::time::sleep(config.retry_after).await;
                continue;
            }
            // Its Agent was deleted (by an administrator, or as stale): it
            // enrolls again, as a new Agent. Without a bootstrap token it
            // cannot, and stops, saying why, rather than wait for nothing;
            // with one that is refused, it asks again, slowly (a relay's
            // word alone never stops an agent for good).
            Err(ClientError::Gone(msg)) => {
                tracing::error!(%msg, "this endpoint's Agent was deleted; enrolling again");
                if config.bootstrap_token.is_none() {
                    return Err(anyhow::Error::new(crate::Stop(format!(
                        "this endpoint's Agent was deleted and it has no bootstrap token to enroll again with ({msg}); \
                         give it one (CARAVAN_BOOTSTRAP_TOKEN or --bundle) and start it again"
                    ))));
                }
                match enroll::enroll(&config, &agent.state, &mut agent.client).await {
                    // (A pause all the same: a relay that keeps saying 410
                    // does not get a loop of enrollments.)
                    Ok(()) => {
                        etag = None;
                        tokio::time::sleep(config.retry_after.max(Duration::from_secs(1))).await;
                    }
                    Err(e) if config.once => return Err(e),
                    Err(e) => {
                        let pause = (config.retry_after * 10).max(Duration::from_secs(60));
                        tracing::error!(error = format!("{e:#}"), retry_in = ?pause, "this endpoint's Agent was deleted and enrolling again failed; give it a new bootstrap token");
                        tokio::time::sleep(pause).await;
                    }
                }
                continue;
            }
            Err(ClientError::Unauthorized(msg)) => {
                // Expired (or the relay's key changed): renew with the key;
                // enroll again only if that is refused too. The credential
                // is kept until a new one is in hand, whatever fails.
                let renewed = match enroll::renew(&agent.state, &mut agent.client).await {
                    Err(e)
                        if matches!(
                            e.downcast_ref::<ClientError>(),
                            Some(ClientError::Unauthorized(_))
                        ) =>
                    {
                        tracing::warn!(%msg, error = format!("{e:#}"), "credential refused and not renewed; enrolling again");
                        enroll::enroll(&config, &agent.state, &mut agent.client)
                            .await
                            .context("enrolling again")
                    }
                    other => other,
                };
                if let Err(e) = renewed {
                    // Not reached, turned away, a wrong clock, or no
                    // bootstrap token to enroll again with: try again later.
                    if config.once {
                        return Err(e);
                    }
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?config.retry_after, "no new credential");
                    tokio::time::sleep(config.retry_after).await;
                }
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
        // Wake when the accepted state expires, to stop acting on it.
        wait = agent.next_wait(agent.until_expiry(config.poll_wait));
    }
}

/// Resolves once the file at `path` changes (checked every second).
async fn changed(path: std::path::PathBuf) {
    let stamp = || std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let before = stamp();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if stamp() != before {
            return;
        }
    }
}

/// The agent's trust, pinned from the roots its relay offers the first
/// time (checked against `--trust-root-sha256` when given).
async fn ensure_trust(config: &Config, state: &StateDir, client: &Client) -> anyhow::Result<Trust> {
    if let Some(trust) = Trust::load(state)? {
        return Ok(trust);
    }
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let chain = loop {
        match client.roots().await {
            Ok(chain) => break chain,
            Err(e) if config.once => return Err(e).context("fetching the controller's roots"),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "fetching the controller's roots failed");
                tokio::time::sleep(delay).await;
            }
        }
    };
    let trust = Trust::pin(&chain, config.trust_root_sha256.as_deref())
        .context("pinning the controller's root of trust")?;
    trust.save(state)?;
    tracing::info!(root = %caravan_api::trust::fingerprint(&trust.root)?, pinned = config.trust_root_sha256.is_some(), "trusting the controller's root");
    Ok(trust)
}

/// Verifies a document the relay served and hands it to the converger if
/// it is good; otherwise records why not (returned) and the agent goes on
/// with what it accepted before.
async fn judge(
    trust: &mut Trust,
    agent: &mut Converger,
    served: &AgentServed,
) -> anyhow::Result<Option<TrustError>> {
    let me = agent
        .state
        .credentials()?
        .map(|c| c.agent)
        .context("enrolled, but the credentials are gone")?;
    let now = chrono::Utc::now();
    let mut verdict = trust.judge(served, &me, now);
    if matches!(verdict, Err(TrustError::NotSigned { .. }))
        && !served.document.signatures.is_empty()
    {
        // Signed by a key this agent does not know: perhaps the controller
        // rotated its root. Follow the chain the relay offers, if it holds.
        match agent
            .client
            .roots()
            .await
            .map_err(anyhow::Error::from)
            .and_then(|chain| Ok(trust.follow(&chain)?))
        {
            Ok(true) => {
                trust.save(&agent.state)?;
                tracing::info!(root = %caravan_api::trust::fingerprint(&trust.root)?, "followed the controller's root rotation");
                verdict = trust.judge(served, &me, now);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot follow the controller's roots")
            }
        }
    }
    match verdict {
        Ok(desired) => {
            trust.save(&agent.state)?;
            agent.set_desired(desired);
            Ok(None)
        }
        Err(e) => {
            agent.refuse(e.refusal());
            Ok(Some(e))
        }
    }
}
