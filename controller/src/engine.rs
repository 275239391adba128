//! The distribution engine: the one task that owns the [`index`]. It runs
//! the reflectors that fill the caches ([`crate::stores`]) in a task of
//! their own (read however long a computation takes), and after every
//! burst of changes
//! 1. surveys where each package's artifact stands in the store, asking
//!    for the fetch of those an `http` cabinet holds that the store lacks;
//! 2. computes the index from the caches (pure);
//! 3. signs each agent's part ([`crate::trust::Signer`]) and publishes
//!    every site's desired state on a watch channel, which the
//!    distribution API serves to relays (only when a document changed);
//!    it wakes, changes or not, when a document is due to be signed anew
//!    and when a job's schedule starts or ends (`notBefore`, `deadline`);
//! 4. writes the status of every job, package and cabinet that changed
//!    ([`status_patch`], with the Events the change is worth; agents
//!    approved or revoked get theirs), at most once per debounce interval, so status
//!    writes stay bounded however many agents report. Writes that fail
//!    are retried with a backoff, without waiting for another change; a
//!    status written once is not written again while the object stays as
//!    that write left it (so a field someone else holds cannot make the
//!    engine write forever).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use caravan_api::{
    v1alpha1::{Agent, Cabinet, Package, StoreType},
    Digest,
};
use caravan_net::Backoff;
use futures::{stream, StreamExt};
use kube::{runtime::events::Event, Resource, ResourceExt};
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    cabinet::{
        pull::{Pulls, Source},
        registry::OciSource,
        BlobStore,
    },
    context::Context,
    field_managers,
    index::{self, ArtifactState, Artifacts, DesiredIndex},
    leader::Leading,
    status_patch::{self, HasStatus, Written},
    stores::{Change, Stores, Writers},
    trust::Signer,
};

/// How long the engine waits for more changes before recomputing.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// A change after this long without one (and without a computation) is
/// computed at once, not debounced — an agent's report or enrollment, an
/// approval, a command's write: it is not the start of a burst worth
/// waiting for, and its latency is what a user sees. Not a change to an
/// object from Git ([`Change::Declared`]): a commit is applied one object
/// after another, and each of its parts waits for the rest. The changes
/// that follow (the status a computation writes, the rest of a burst) are
/// debounced as before.
const QUIET: Duration = Duration::from_secs(1);
/// Longest a change waits for the engine while changes keep coming.
const MAX_DELAY: Duration = Duration::from_secs(2);

pub struct Engine {
    ctx: Arc<Context>,
    stores: Stores,
    blobs: Arc<BlobStore>,
    pulls: Pulls,
    desired: watch::Sender<Arc<DesiredIndex>>,
    signer: std::sync::Mutex<Signer>,
    /// Per object: the status last written and the status that write left.
    written: std::sync::Mutex<HashMap<(String, index::ObjectKey), (u64, u64)>>,
    /// Only the leader writes status and fetches artifacts into the store;
    /// every replica computes and signs desired state.
    leading: Leading,
    /// Whether each agent was approved when last seen (for its Events).
    approvals: std::sync::Mutex<index::ByName<bool>>,
}

/// A fingerprint of a status, to remember what was written.
fn fingerprint<S: serde::Serialize>(status: Option<&S>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&status)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

impl Engine {
    pub fn new(
        ctx: Arc<Context>,
        stores: Stores,
        blobs: Arc<BlobStore>,
        leading: Leading,
    ) -> anyhow::Result<Self> {
        let http = caravan_net::client(None, Duration::from_secs(60))?;
        let ttl = Duration::from_secs(ctx.config.desired_state_ttl_seconds);
        let (kube, recorder) = (ctx.client.clone(), ctx.recorder.clone());
        Ok(Self {
            signer: std::sync::Mutex::new(Signer::new(&ctx.trust, ttl)),
            ctx,
            stores,
            pulls: Pulls::new(blobs.clone(), http, kube, recorder),
            blobs,
            desired: watch::channel(Arc::new(DesiredIndex::default())).0,
            written: Default::default(),
            approvals: Default::default(),
            leading,
        })
    }

    /// Every site's desired state, as last computed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<DesiredIndex>> {
        self.desired.subscribe()
    }

    /// Watches the five kinds and recomputes after every burst of changes,
    /// until shutdown.
    pub async fn run(self, writers: Writers, shutdown: CancellationToken) -> anyhow::Result<()> {
        // A finished artifact fetch is a change too.
        let fetched = stream::unfold(&self.pulls, |pulls| async move {
            pulls.finished().await;
            Some(((), pulls))
        })
        .boxed();
        // The registries of oci cabinets are probed again now and then.
        let probes = stream::unfold((), |()| async {
            tokio::time::sleep(crate::cabinet::pull::PROBE_EVERY).await;
            Some(((), ()))
        })
        .boxed();
        // Leading from now on: write what the followers' view left unwritten.
        let mut leading = self.leading.clone();
        let gained = stream::once(async move { leading.acquired().await.unwrap_or(()) }).boxed();
        // The caches are filled by a task of their own, which reads every
        // watch as fast as events come, computation or not: a watch left
        // unread while the index is computed (a second or more at 100,000
        // Agents) falls behind the API server's window of events, expires,
        // and everything is listed again. The engine hears that something
        // changed (once, however much did).
        // It also notes whether any of them was part of a Git commit.
        let (changed, cache_changes) = tokio::sync::mpsc::channel(1);
        let declared = Arc::new(AtomicBool::new(false));
        let noted = declared.clone();
        let mut reflectors = AbortOnDropHandle::new(tokio::spawn(
            stream::select_all(writers.watch(&self.ctx)).for_each(move |change| {
                if change == Change::Declared {
                    noted.store(true, Ordering::Relaxed);
                }
                let _ = changed.try_send(());
                async {}
            }),
        ));
        let cache_changes = stream::unfold(cache_changes, |mut rx| async move {
            rx.recv().await.map(|()| ((), rx))
        })
        .boxed();
        let mut streams: Vec<stream::BoxStream<'_, ()>> = vec![cache_changes, fetched];
        streams.push(probes);
        streams.push(gained);
        let mut changes = stream::select_all(streams);
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut retry_at: Option<Instant> = None;
        let mut boundary_at: Option<Instant> = None;
        // Whether to wait for the rest of a burst before computing.
        let mut settle = true;
        loop {
            // Take the whole burst of changes before recomputing, but recompute
            // at least every MAX_DELAY however busy the cluster is.
            let deadline = Instant::now() + MAX_DELAY;
            while settle && Instant::now() < deadline {
                match tokio::time::timeout(DEBOUNCE, changes.next()).await {
                    Ok(Some(())) => {}
                    _ => break,
                }
            }
            if self.stores.ready() {
                // What Git applies from here on is in the next computation.
                declared.store(false, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let (failed, boundary) = self.recompute().await;
                self.ctx
                    .metrics
                    .reconciled("Engine", started.elapsed(), failed == 0);
                boundary_at = boundary.map(|t| {
                    Instant::now() + (t - chrono::Utc::now()).to_std().unwrap_or_default()
                });
                retry_at = if failed == 0 {
                    backoff.reset();
                    None
                } else {
                    let delay = backoff.next_delay();
                    tracing::warn!(failed, retry_in = ?delay, "status writes failed; retrying");
                    Some(Instant::now() + delay)
                };
            }
            // Wake for a retry, or to sign a document anew before it expires.
            let refresh_at = self
                .signer
                .lock()
                .expect("lock poisoned")
                .next_refresh()
                .map(|t| Instant::now() + (t - chrono::Utc::now()).to_std().unwrap_or_default());
            let wake_at = retry_at
                .into_iter()
                .chain(refresh_at)
                .chain(boundary_at)
                .min();
            let idle_since = Instant::now();
            settle = tokio::select! {
                change = changes.next() => {
                    if change.is_none() {
                        anyhow::bail!("watch streams ended");
                    }
                    idle_since.elapsed() < QUIET || declared.load(Ordering::Relaxed)
                },
                ended = &mut reflectors => anyhow::bail!("the caches' watches ended: {ended:?}"),
                () = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => true,
                () = shutdown.cancelled() => return Ok(()),
            };
        }
    }

    /// Computes desired states and statuses from the caches and publishes
    /// them. Returns how many status writes failed, and when a job's
    /// schedule next starts or ends (to compute again then).
    async fn recompute(&self) -> (usize, Option<chrono::DateTime<chrono::Utc>>) {
        let s = &self.stores;
        let (sites, agents, jobs, packages, cabinets) = (
            s.sites.state(),
            s.agents.state(),
            s.jobs.state(),
            s.packages.state(),
            s.cabinets.state(),
        );
        let published = packages
            .iter()
            .filter_map(|p| Some((p.metadata.namespace.as_deref()?, &p.spec)));
        let signed_cabinets = cabinets
            .iter()
            .filter(|c| c.spec.require_signatures)
            .filter_map(|c| {
                Some((
                    c.metadata.namespace.as_deref()?,
                    c.metadata.name.as_deref()?,
                ))
            });
        if let Err(e) = self.ctx.published.record(published, signed_cabinets) {
            tracing::warn!(error = %e, "the ledger of published packages was not written");
        }
        let artifacts = self.survey(&packages, &cabinets).await;
        let unreachable = self.probe(&cabinets);
        let now = chrono::Utc::now();
        // Computing and signing take seconds at 100,000 agents: off the
        // async workers, so that relays' requests, reports, watches and the
        // Lease's renewals go on meanwhile (a leader whose renewals starved
        // behind the computation stopped leading).
        let (out, next) = tokio::task::block_in_place(|| {
            let mut out = index::compute(&index::Inputs {
                now,
                sites: &sites,
                agents: &agents,
                jobs: &jobs,
                packages: &packages,
                cabinets: &cabinets,
                artifacts: &artifacts,
                unreachable: &unreachable,
            });
            let signed = self
                .signer
                .lock()
                .expect("lock poisoned")
                .sign_sites(std::mem::take(&mut out.desired), chrono::Utc::now());
            // Compared outside the channel's lock (the engine is its only
            // writer), so long-polls are not held up meanwhile.
            let next = self.desired.borrow().next(signed);
            (out, next)
        });
        if let Some(next) = next {
            self.desired.send_replace(Arc::new(next));
        }
        let m = &self.ctx.metrics;
        m.recomputes.inc();
        m.agents.set(agents.len() as i64);
        m.leading.set(i64::from(self.leading.now()));
        let mut seen: HashMap<&str, i64> = crate::metrics::AgeLabel::ALL
            .iter()
            .map(|w| (*w, 0))
            .collect();
        for a in &agents {
            let last = a
                .status
                .as_ref()
                .and_then(|s| s.last_seen.as_deref())
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            let label =
                crate::metrics::AgeLabel::of(last.map(|t| now - t.with_timezone(&chrono::Utc)));
            *seen.entry(label.within).or_default() += 1;
        }
        for (within, n) in seen {
            m.agents_last_seen
                .get_or_create(&crate::metrics::AgeLabel { within })
                .set(n);
        }
        m.job_destinations.clear();
        for (job, st) in &out.jobs {
            for (phase, n) in [
                ("succeeded", st.succeeded),
                ("failed", st.failed),
                ("pending", st.pending),
                ("not_applicable", st.not_applicable),
                ("conflict", st.conflict),
                ("expired", st.expired),
            ] {
                let labels = crate::metrics::JobPhaseLabels {
                    namespace: job.namespace().unwrap_or_default(),
                    job: job.name_any(),
                    phase,
                };
                m.job_destinations.get_or_create(&labels).set(i64::from(n));
            }
        }
        let approvals = self.approval_events(&agents);
        let failed = if self.leading.now() {
            let failed = self.write(out.jobs).await
                + self.write(out.packages).await
                + self.write(out.cabinets).await;
            // After the status writes, a few at a time (a mass approval
            // delays nothing else).
            stream::iter(approvals)
                .for_each_concurrent(16, |(agent, event)| async move {
                    self.ctx.publish(&event, agent.as_ref()).await;
                })
                .await;
            failed
        } else {
            0
        };
        (failed, index::next_boundary(&jobs, now))
    }

    /// The agents approved or revoked since the last computation, with
    /// their Events; remembers what each is now.
    fn approval_events(&self, agents: &[Arc<Agent>]) -> Vec<(Arc<Agent>, Event)> {
        let mut approvals = self.approvals.lock().expect("lock poisoned");
        let mut last = std::mem::take(&mut *approvals);
        let mut events = Vec::new();
        for a in agents {
            let (ns, name) = (index::namespace(a.as_ref()), index::name(a.as_ref()));
            let was = last.take(ns, name);
            let event = index::status::approval_event(was.as_ref().map(|w| w.1), a.spec.approved);
            if let Some(event) = event {
                events.push((a.clone(), event));
            }
            let name = was.map_or_else(|| name.to_string(), |w| w.0);
            approvals.insert(ns, name, a.spec.approved);
        }
        events
    }

    /// Writes each status that changed; returns how many writes failed.
    async fn write<K: HasStatus>(&self, statuses: Vec<(Arc<K>, K::Status)>) -> usize {
        let kind = K::kind(&()).into_owned();
        let present: std::collections::HashSet<_> = statuses
            .iter()
            .map(|(o, _)| index::key_of(o.as_ref()))
            .collect();
        self.written
            .lock()
            .expect("lock poisoned")
            .retain(|(k, key), _| *k != kind || present.contains(key));
        let mut failed = 0;
        for (obj, st) in statuses {
            let Some(next) = status_patch::updated(obj.as_ref(), st) else {
                continue;
            };
            let key = (kind.clone(), index::key_of(obj.as_ref()));
            let wrote = (fingerprint(Some(&next)), fingerprint(obj.status()));
            if self.written.lock().expect("lock poisoned").get(&key) == Some(&wrote) {
                // Written already, and the object is as that write left it.
                continue;
            }
            match status_patch::write(
                &self.ctx.client,
                obj.as_ref(),
                &next,
                field_managers::STATUS,
            )
            .await
            {
                Ok(Written::Written(after)) => {
                    for event in K::events(obj.status(), &next) {
                        self.ctx.publish(&event, obj.as_ref()).await;
                    }
                    let left = (wrote.0, fingerprint(after.as_ref()));
                    self.written
                        .lock()
                        .expect("lock poisoned")
                        .insert(key, left);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), namespace = ?obj.namespace(), name = %obj.name_any(), error = %e, "status write failed");
                    failed += 1;
                }
            }
        }
        failed
    }

    /// Why the registries of `oci` cabinets cannot be used, as their last
    /// probes found (probing those due).
    fn probe(&self, cabinets: &[Arc<Cabinet>]) -> index::status::Unreachable {
        cabinets
            .iter()
            .filter(|c| c.spec.store.type_ == StoreType::Oci)
            .filter_map(|c| {
                let source = OciSource {
                    namespace: c.namespace().unwrap_or_default(),
                    store: c.spec.store.clone(),
                    package: String::new(),
                    version: String::new(),
                    manifest: None,
                };
                let why = self.pulls.unreachable(&c.name_any(), source)?;
                Some((index::key_of(c.as_ref()), why))
            })
            .collect()
    }

    /// Where each package's artifact stands in the store; asks for the
    /// fetch of those an `http` cabinet holds that the store lacks.
    async fn survey(&self, packages: &[Arc<Package>], cabinets: &[Arc<Cabinet>]) -> Artifacts {
        let mut sizes: HashMap<Digest, Option<u64>> = HashMap::new();
        let mut artifacts = HashMap::new();
        for p in packages {
            let digest = p.spec.artifact.digest;
            let size = match sizes.get(&digest) {
                Some(size) => *size,
                None => *sizes
                    .entry(digest)
                    .or_insert(self.blobs.size(&digest).await),
            };
            let cabinet = cabinets
                .iter()
                .find(|c| c.namespace() == p.namespace() && c.name_any() == p.spec.cabinet);
            // Where the cabinet keeps it, for what the store lacks — and for
            // every artifact of a cabinet whose layers relays fetch (even
            // one the store holds from before: relays are sent to the registry).
            let source = cabinet.and_then(|c| match c.spec.store.type_ {
                StoreType::Builtin => None,
                StoreType::Http => c
                    .spec
                    .store
                    .artifact_url(&p.spec.name, &digest)
                    .map(Source::Http),
                StoreType::Oci => Some(Source::Oci(Box::new((
                    OciSource {
                        namespace: c.namespace().unwrap_or_default(),
                        store: c.spec.store.clone(),
                        package: p.spec.name.clone(),
                        version: p.spec.version.clone(),
                        manifest: p.spec.artifact.manifest,
                    },
                    p.object_ref(&()),
                )))),
            });
            let relays_fetch =
                matches!(&source, Some(Source::Oci(oci)) if oci.0.layers_from_relays());
            let state = match (size, source) {
                (Some(size), _) if !relays_fetch => ArtifactState::Stored(size),
                // The leader fetches into the shared store; a follower sees
                // the blob there once the leader's status says so.
                (None, Some(_)) if !relays_fetch && !self.leading.now() => ArtifactState::Fetching,
                (_, Some(source)) => self.pulls.ensure(digest, source, p.spec.artifact.size),
                (_, None) => ArtifactState::Missing,
            };
            artifacts.insert(index::key_of(p.as_ref()), state);
        }
        artifacts
    }
}
