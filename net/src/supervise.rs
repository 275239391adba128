//! Running a server's components together: every component runs until
//! shutdown is asked for (SIGTERM or SIGINT) and then drains; a component
//! that stops on its own (an error, or a loop that ended) stops the others
//! and makes the process exit non-zero, so a supervisor restarts it instead
//! of a half-working server carrying on.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// How long components have to drain after shutdown is asked for.
pub const DRAIN: Duration = Duration::from_secs(10);

/// A named part of a server: a future that runs until `shutdown` is cancelled.
pub struct Component {
    name: &'static str,
    run: BoxFuture<'static, anyhow::Result<()>>,
}

impl Component {
    pub fn new(
        name: &'static str,
        run: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> Self {
        Self {
            name,
            run: Box::pin(run),
        }
    }
}

/// Waits for SIGTERM (what Kubernetes and systemd send) or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `components` until `stop` resolves (normally [`shutdown_signal`])
/// or one of them stops. Either way `shutdown` is cancelled and the others
/// get [`DRAIN`] to finish. `Ok` only after a requested shutdown.
pub async fn run(
    components: Vec<Component>,
    shutdown: CancellationToken,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for c in components {
        let name = c.name;
        let run = c.run;
        set.spawn(async move { (name, run.await) });
    }
    let outcome = tokio::select! {
        () = stop => {
            tracing::info!("shutting down");
            Ok(())
        }
        Some(joined) = set.join_next() => Err(match joined {
            Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok((name, Err(e))) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("a component panicked: {e}"),
        }),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %format!("{e:#}"), "a component stopped; shutting down");
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(DRAIN, async {
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((name, Err(e))) => {
                    tracing::warn!(component = name, error = %format!("{e:#}"), "failed while draining")
                }
                Ok((name, Ok(()))) => tracing::debug!(component = name, "drained"),
                Err(e) => tracing::warn!(error = %e, "a component panicked while draining"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = set.len(),
            "components did not drain in time; stopping them"
        );
        set.abort_all();
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component that runs until shutdown, then says it drained.
    fn patient(
        shutdown: &CancellationToken,
        drained: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Component {
        let shutdown = shutdown.clone();
        Component::new("patient", async move {
            shutdown.cancelled().await;
            drained.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }

    #[tokio::test]
    async fn a_component_that_stops_on_its_own_is_an_error_and_the_others_drain() {
        let shutdown = CancellationToken::new();
        let drained = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let components = vec![
            patient(&shutdown, drained.clone()),
            Component::new("engine", async { Ok(()) }),
        ];
        let e = run(components, shutdown.clone(), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "engine stopped unexpectedly");
        assert!(drained.load(std::sync::atomic::Ordering::SeqCst));

        let shutdown = CancellationToken::new();
        let components = vec![Component::new("api", async { anyhow::bail!("port taken") })];
        let e = run(components, shutdown, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(format!("{e:#}"), "api failed: port taken");
    }

    #[tokio::test]
    async fn a_requested_shutdown_drains_every_component_and_is_ok() {
        let shutdown = CancellationToken::new();
        let drained = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let components = vec![patient(&shutdown, drained.clone())];
        run(components, shutdown.clone(), async {}).await.unwrap();
        assert!(shutdown.is_cancelled());
        assert!(drained.load(std::sync::atomic::Ordering::SeqCst));
    }
}
