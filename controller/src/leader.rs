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
//!
//! The leader renews the Lease every third of its duration and reads it
//! back (it leads from the first read that shows the Lease as its own, so
//! that its hold is the renewal's, not a guess): a renewal that fails (a
//! dropped connection, an API server too busy to answer in time) does not
//! end leadership by itself; the leader stops leading when the Lease names
//! another, or when no renewal landed before the Lease it last saw runs
//! out, less a sixth of it. Restarting the leader over one lost request
//! would throw away its caches of every object — at 100,000 Agents, a
//! reload that loads the API server when it is busiest. The election runs
//! on a thread of its own (see [`elect`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
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

type Timestamp = k8s_openapi::jiff::Timestamp;

/// How often a leader reads the Lease back while the renewal it expects
/// has not landed.
const POLL: Duration = Duration::from_millis(250);

/// Until when `lease` is held by `identity` (its last renewal plus its
/// duration), if it names `identity` as holder.
fn held_until(lease: &Lease, identity: &str) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let seconds = i64::from(spec.lease_duration_seconds?);
    renewed
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
        .ok()
}

/// A leader's hold on the Lease as it last read it back: it leads while
/// the Lease names it with more than `margin` left (a sixth of the Lease:
/// room for the clocks of replicas to differ), whatever became of its
/// renewal requests.
#[derive(Debug)]
struct Hold {
    /// `None` until a read shows the Lease as this replica's: only then
    /// does it lead (the acquisition's own renewTime, stamped before its
    /// requests, is all the Lease is good for).
    until: Option<Timestamp>,
    margin: Duration,
    /// How often the Lease is renewed.
    every: Duration,
}

impl Hold {
    /// Takes what a read of the Lease found (`Err`: the read failed):
    /// whether it shows a renewal not seen before (the first that names
    /// this replica included), or `None` if a Lease seen as this replica's
    /// is gone or names another. (Before that, a cache that still shows the
    /// Lease as it was before the acquisition is only not caught up.)
    fn seen(&mut self, read: Result<Option<&Lease>, ()>, identity: &str) -> Option<bool> {
        let Ok(lease) = read else {
            return Some(false);
        };
        let Some(until) = lease.and_then(|l| held_until(l, identity)) else {
            return match self.until {
                Some(_) => None,
                None => Some(false),
            };
        };
        let renewed = self.until.is_none_or(|u| until > u);
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        Some(renewed)
    }

    /// How long this replica may lead on from `now` unless it sees a
    /// renewal (`None` while no read has shown the Lease as its own).
    fn left(&self, now: Timestamp) -> Option<Duration> {
        let until = self.until?;
        Some(
            Duration::try_from(until.duration_since(now))
                .unwrap_or_default()
                .saturating_sub(self.margin),
        )
    }

    /// How long after a read to read again: half the renewal interval
    /// after one that showed a renewal, [`POLL`] after one that did not.
    fn next_read(&self, renewed: bool) -> Duration {
        match renewed {
            true => self.every / 2,
            false => POLL,
        }
    }
}

/// The Lease as the API server's cache has it (resourceVersion 0), if it
/// answers `within`. Under load a quorum read took seconds; a Lease seen a
/// little late shows an earlier renewal, which only makes the leader stop
/// sooner.
async fn read(leases: &kube::Api<Lease>, within: Duration) -> Result<Option<Lease>, ()> {
    let cached = kube::api::GetParams::any();
    match tokio::time::timeout(within, leases.get_with(LEASE, &cached)).await {
        Ok(Ok(lease)) => Ok(Some(lease)),
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => Ok(None),
        _ => Err(()),
    }
}

/// Contends for the Lease in `namespace` as `identity`. Returns whether
/// this replica leads, and the election to run until `shutdown` (then it
/// releases the Lease if held, so another replica takes over at once). A
/// leader reads the Lease back before each renewal is due and stops
/// leading if it no longer names it or no renewal landed in time.
///
/// The election runs on a thread of its own, with its own runtime and API
/// client: however busy the controller's workers are (computing and signing
/// for 100,000 agents, verifying a relay's batch of reports), its renewals
/// are not held up behind them.
pub async fn elect(
    namespace: &str,
    identity: &str,
    lease_seconds: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    Leading,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let (tx, rx) = watch::channel(false);
    let (started, on_start) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let (done, on_done) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let (namespace, identity) = (namespace.to_string(), identity.to_string());
    std::thread::Builder::new()
        .name("leader-election".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = started.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let contender = match Contender::new(&namespace, &identity, lease_seconds).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                let _ = done.send(contender.run(tx, shutdown).await);
            });
        })?;
    on_start
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the election's thread ended")))?;
    let election = async move {
        on_done
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the election's thread ended")))
    };
    Ok((Leading(Some(rx)), election))
}

/// One replica's side of the election, on the election's own runtime.
struct Contender {
    manager: kube_lease_manager::LeaseManager,
    leases: kube::Api<Lease>,
    identity: String,
    /// See [`Hold`].
    margin: Duration,
    /// How often the manager renews the Lease.
    every: Duration,
}

impl Contender {
    async fn new(namespace: &str, identity: &str, lease_seconds: u64) -> anyhow::Result<Self> {
        let client = kube::Client::try_default().await?;
        // Renewed every third of the Lease (as client-go's leaders retry
        // well within theirs): a renewal the API server is slow to take has
        // two thirds of the Lease to land, less the margin.
        let grace = (lease_seconds * 2 / 3).max(1);
        let manager = LeaseManagerBuilder::new(client.clone(), LEASE)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(lease_seconds)
            .with_grace(grace)
            .with_field_manager(format!("caravan-leader-{identity}"))
            .build()
            .await?;
        Ok(Self {
            manager,
            leases: kube::Api::namespaced(client, namespace),
            identity: identity.to_string(),
            margin: Duration::from_secs(lease_seconds) / 6,
            every: Duration::from_secs(lease_seconds - grace),
        })
    }

    /// Contends, and leads while it may, until `shutdown`; then releases
    /// the Lease if held.
    async fn run(self, tx: watch::Sender<bool>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            manager,
            leases,
            identity,
            margin,
            every,
        } = self;
        let mut hold: Option<Hold> = None;
        // The next read of the Lease, and the one under way: reads run
        // beside the renewals and may take as long as the API server
        // takes; only the margin decides.
        let mut read_at = tokio::time::Instant::now();
        let mut reading: Option<futures::future::BoxFuture<'_, Result<Option<Lease>, ()>>> = None;
        // Kept across the loop, so that nothing cuts a renewal short.
        let mut changes: futures::future::BoxFuture<'_, kube_lease_manager::Result<bool>> =
            Box::pin(manager.changed());
        loop {
            let stop_at = hold
                .as_ref()
                .and_then(|h| h.left(Timestamp::now()))
                .map(|left| tokio::time::Instant::now() + left);
            tokio::select! {
                // The margin first: nothing read late extends a hold that
                // ran out.
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(stop_at.unwrap_or_else(tokio::time::Instant::now)), if stop_at.is_some() => {
                    tracing::error!(lease = LEASE, until = ?hold.as_ref().and_then(|h| h.until), "no renewal of the Lease seen before its margin: no longer leading");
                    hold = None;
                    reading = None;
                    tx.send_replace(false);
                }
                changed = &mut changes => match changed {
                    Ok(leads) => {
                        tracing::info!(leading = leads, lease = LEASE, "the Lease changed hands");
                        changes = Box::pin(manager.changed());
                        // Taken: leading once a read shows it so.
                        hold = leads.then_some(Hold {
                            until: None,
                            margin,
                            every,
                        });
                        read_at = tokio::time::Instant::now();
                        if !leads {
                            tx.send_replace(false);
                        }
                    }
                    Err(e) => {
                        // A renewal failed: the manager tries again in a
                        // second; the Lease read back decides whether this
                        // replica leads meanwhile.
                        tracing::warn!(error = %e, lease = LEASE, leading = *tx.borrow(), "leader election");
                        changes = Box::pin(async {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            manager.changed().await
                        });
                    }
                },
                lease = async { reading.as_mut().expect("reading").await }, if reading.is_some() => {
                    reading = None;
                    let Some(h) = hold.as_mut() else { continue };
                    let confirmed = h.until.is_some();
                    match h.seen(lease.as_ref().map(Option::as_ref).map_err(|_| ()), &identity) {
                        Some(renewed) => {
                            tracing::debug!(until = ?h.until, renewed, "the Lease read back");
                            read_at = tokio::time::Instant::now() + h.next_read(renewed);
                            if !confirmed && h.until.is_some() {
                                tracing::info!(lease = LEASE, "leading");
                                tx.send_replace(true);
                            }
                        }
                        None => {
                            tracing::error!(lease = LEASE, "the Lease names another replica or is gone: no longer leading");
                            hold = None;
                            tx.send_replace(false);
                        }
                    }
                }
                () = tokio::time::sleep_until(read_at), if hold.is_some() && reading.is_none() => {
                    reading = Some(Box::pin(read(&leases, every)));
                }
            }
        }
        // Nothing more is written as leader from here on.
        tx.send_replace(false);
        drop(changes);
        match tokio::time::timeout(Duration::from_secs(5), manager.release()).await {
            Ok(Ok(())) => tracing::info!(lease = LEASE, "Lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease failed"),
            Err(_) => tracing::warn!("releasing the Lease took too long"),
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
        jiff::Timestamp,
    };

    use super::*;

    fn lease(holder: &str, renewed: Timestamp, seconds: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(seconds),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_holds_for_its_holder_until_its_renewal_plus_its_duration() {
        let renewed = Timestamp::from_second(1_000_000).unwrap();
        let l = lease("a", renewed, 15);
        assert_eq!(
            held_until(&l, "a"),
            Some(Timestamp::from_second(1_000_015).unwrap())
        );
        // Another replica's Lease, or one never renewed, holds nothing for us.
        assert_eq!(held_until(&l, "b"), None);
        let mut never = l.clone();
        never.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(held_until(&never, "a"), None);
    }

    #[test]
    fn a_leader_leads_while_the_lease_read_back_names_it_and_stops_a_margin_before_it_ends() {
        let at = |s: i64| Timestamp::from_second(s).unwrap();
        // A 15 s Lease renewed every 5 s, a margin of 2.5 s, just taken.
        let mut hold = Hold {
            until: None,
            margin: Duration::from_millis(2500),
            every: Duration::from_secs(5),
        };
        // It leads only once a read shows the Lease as its own; before,
        // a cache still showing the previous holder, or none, is only
        // behind, and a failed read is no answer.
        assert_eq!(hold.left(at(0)), None);
        let before = lease("other", at(-20), 15);
        assert_eq!(hold.seen(Ok(Some(&before)), "me"), Some(false));
        assert_eq!(hold.seen(Ok(None), "me"), Some(false));
        assert_eq!(hold.seen(Err(()), "me"), Some(false));
        assert_eq!(hold.left(at(0)), None);
        // The acquisition's renewal (at 0) read back: held until 15, led
        // until the margin.
        assert_eq!(
            hold.seen(Ok(Some(&lease("me", at(0), 15))), "me"),
            Some(true)
        );
        assert_eq!(hold.left(at(1)), Some(Duration::from_millis(11_500)));
        // A read showing a renewal extends the hold; read again half a
        // renewal later.
        let renewed = lease("me", at(5), 15);
        assert_eq!(hold.seen(Ok(Some(&renewed)), "me"), Some(true));
        assert_eq!(hold.until, Some(at(20)));
        assert_eq!(hold.next_read(true), Duration::from_millis(2500));
        // Reads that fail, or show no later renewal (or an earlier one,
        // from a lagging cache), leave it as it is: poll; the hold runs out
        // at the margin whatever they say.
        assert_eq!(hold.seen(Err(()), "me"), Some(false));
        assert_eq!(hold.seen(Ok(Some(&renewed)), "me"), Some(false));
        assert_eq!(
            hold.seen(Ok(Some(&lease("me", at(1), 15))), "me"),
            Some(false)
        );
        assert_eq!(hold.until, Some(at(20)));
        assert_eq!(hold.next_read(false), POLL);
        assert_eq!(hold.left(at(17)), Some(Duration::from_millis(500)));
        assert_eq!(hold.left(at(18)), Some(Duration::ZERO));
        assert_eq!(hold.left(at(30)), Some(Duration::ZERO));
        // Once its own, the Lease held by another, or gone: stop at once.
        let taken = lease("other", at(30), 15);
        assert_eq!(hold.seen(Ok(Some(&taken)), "me"), None);
        assert_eq!(hold.seen(Ok(None), "me"), None);
    }
}
