//! Leader election: the controller runs as several replicas, and only the
//! one holding the `caravan-controller` Lease (`coordination.k8s.io`,
//! through `kube-lease-manager`) reconciles GitSources and Sites and writes
//! the status of jobs, packages and cabinets. Every replica serves the
//! distribution API (relays, enrollments, reports, uploads), keeps the
//! caches and computes and signs desired state.
//!
//! A replica that stops leading exits (and is restarted as a follower)
//! rather than trying to stop its reconcilers halfway; one shutting down
//! releases the Lease, so another takes over at once. A leader that dies
//! without releasing it is replaced once the Lease expires
//! (`--leader-election-lease-seconds`).

use std::time::Duration;

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Name of the Lease the replicas contend for.
pub const LEASE: &str = "caravan-controller";

/// Whether this replica leads.
#[derive(Clone)]
pub struct Leading(Option<watch::Receiver<bool>>);

impl Leading {
    /// A replica that leads without an election (`--leader-election=false`:
    /// one replica only).
    pub fn always() -> Self {
        Self(None)
    }

    /// Whether this replica leads now.
    pub fn now(&self) -> bool {
        self.0.as_ref().is_none_or(|rx| *rx.borrow())
    }

    /// Waits until this replica leads.
    pub async fn acquired(&mut self) -> anyhow::Result<()> {
        if let Some(rx) = &mut self.0 {
            rx.wait_for(|l| *l).await?;
        }
        Ok(())
    }

    /// Waits until this replica stops leading (or the election ends).
    async fn lost(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                let _ = rx.wait_for(|l| !*l).await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Contends for the Lease in `namespace` as `identity`. Returns whether
/// this replica leads, and the election to run until `shutdown` (then it
/// releases the Lease if held, so another replica takes over at once). A
/// leader that cannot renew the Lease stops leading.
pub async fn elect(
    client: kube::Client,
    namespace: &str,
    identity: &str,
    lease_seconds: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    Leading,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    // Its own client, whose requests time out: a renewal that hangs must
    // fail (and this replica stop leading) before another may take over.
    let mut config = kube::Config::infer().await?;
    config.read_timeout = Some(Duration::from_secs((lease_seconds / 3).max(1)));
    config.write_timeout = config.read_timeout;
    let client = kube::Client::try_from(config).unwrap_or(client);
    let manager = LeaseManagerBuilder::new(client, LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(lease_seconds)
        .with_grace((lease_seconds / 3).max(1))
        .with_field_manager(format!("caravan-leader-{identity}"))
        .build()
        .await?;
    let (tx, rx) = watch::channel(false);
    let election = async move {
        loop {
            tokio::select! {
                changed = manager.changed() => match changed {
                    Ok(leads) => {
                        tracing::info!(leading = leads, lease = LEASE, "leadership changed");
                        tx.send_replace(leads);
                    }
                    Err(e) => {
                        if tx.send_replace(false) {
                            tracing::error!(error = %e, lease = LEASE, "the Lease cannot be renewed: no longer leading");
                        } else {
                            tracing::warn!(error = %e, lease = LEASE, "leader election");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                () = shutdown.cancelled() => break,
            }
        }
        // Nothing more is written as leader from here on.
        tx.send_replace(false);
        match tokio::time::timeout(Duration::from_secs(5), manager.release()).await {
            Ok(Ok(())) => tracing::info!(lease = LEASE, "Lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease failed"),
            Err(_) => tracing::warn!("releasing the Lease took too long"),
        }
        Ok(())
    };
    Ok((Leading(Some(rx)), election))
}

/// Runs `work` once this replica leads, and fails when it stops leading
/// (the process then exits; its supervisor restarts it as a follower).
pub async fn lead<F>(
    mut leading: Leading,
    shutdown: CancellationToken,
    work: F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::select! {
        r = leading.acquired() => r?,
        () = shutdown.cancelled() => return Ok(()),
    }
    tracing::info!(lease = LEASE, "leading: reconciling");
    let mut watch = leading.clone();
    tokio::select! {
        r = work => r,
        () = watch.lost() => {
            if shutdown.is_cancelled() {
                Ok(())
            } else {
                anyhow::bail!("lost the {LEASE} Lease to another replica: exiting to restart as a follower")
            }
        }
    }
}
