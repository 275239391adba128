//! GitSource sync: a revision is applied whole or not at all. A reconcile
//! is a list of steps, then one summary:
//! 1. [`fetch`]: fetch the revision `ref` names with git2 (with the
//!    credentials and trust of [`access`]), check its [`signature`] when
//!    asked, read its manifest files (a network failure is retried with a
//!    backoff); the same commit, with nothing in the cluster changed since
//!    it was applied, stops here;
//! 2. [`parse`]: validate every object and the package identity rules (a
//!    problem stalls the source until a new commit);
//! 3. [`apply`]: dry-run, then apply every object with server-side apply;
//! 4. prune what this source applied earlier and Git no longer holds;
//! 5. `summarize`: the status (`Ready`, plus `Reconciling` or `Stalled`
//!    while something is wrong), an Event when the applied revision changes
//!    or a new problem appears, and the sync metric.
//!
//! A revision with any problem applies nothing: the last good revision stays
//! in place and `Ready=False` names the file and the problem.

pub mod access;
pub mod apply;
pub mod fetch;
pub mod parse;
mod revision;
pub mod signature;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::{GitSource, GitSourceStatus, ManifestError},
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    runtime::{
        controller::Action,
        events::{Event, EventType},
        watcher, Controller,
    },
    Resource, ResourceExt,
};
use tokio_util::sync::CancellationToken;
use tracing::instrument;

pub use parse::{parse_file, parse_revision, Declared, Kind};

use crate::{
    context::Context,
    error::{Error, ErrorClass, Retries},
    field_managers,
    metrics::SyncResult,
    status_patch,
    stores::Stores,
};

pub struct GitSources {
    ctx: Arc<Context>,
    stores: Stores,
    retries: Retries<GitSource>,
    /// What each GitSource (namespace, name) last applied.
    applied: Mutex<HashMap<(String, String), Applied>>,
}

/// A revision as applied, to tell whether it needs applying again.
#[derive(Clone, Debug)]
struct Applied {
    commit: String,
    /// The GitSource's generation it was applied for.
    generation: Option<i64>,
    objects: Vec<apply::Stamp>,
}

/// What one sync came to.
enum Synced {
    Suspended,
    Applied {
        commit: String,
        /// The ref the commit was found at.
        found_at: String,
        objects: usize,
        /// Nothing was applied: neither the commit nor the cluster changed.
        unchanged: bool,
    },
    Failed(Failure),
}

/// A sync that did not apply its revision.
struct Failure {
    /// The commit fetched, if the fetch got that far.
    commit: Option<String>,
    /// How the sync is counted.
    result: SyncResult,
    reason: &'static str,
    /// One error per file (none for a failed fetch).
    errors: Vec<ManifestError>,
    /// What went wrong, when it was not a file's fault.
    message: Option<String>,
    class: ErrorClass,
}

impl GitSources {
    pub fn new(ctx: Arc<Context>, stores: Stores) -> Self {
        Self {
            ctx,
            stores,
            retries: Retries::default(),
            applied: Mutex::default(),
        }
    }

    /// Runs the GitSource controller until shutdown; `triggers` names
    /// GitSources (namespace, name) to sync now (a push webhook).
    pub async fn run(
        self,
        triggers: tokio::sync::mpsc::Receiver<(String, String)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let api = self.ctx.all::<GitSource>();
        let triggers = futures::stream::unfold(triggers, |mut rx| async move {
            rx.recv().await.map(|(ns, name)| {
                (
                    kube::runtime::reflector::ObjectRef::<GitSource>::new(&name).within(&ns),
                    rx,
                )
            })
        });
        Controller::new(api, watcher::Config::default())
            .reconcile_on(triggers)
            .graceful_shutdown_on(shutdown.cancelled_owned())
            .run(reconcile, error_policy, Arc::new(self))
            .for_each(|outcome| async move { crate::error::log_outcome(outcome) })
            .await;
        Ok(())
    }

    /// Steps 1 to 4.
    async fn sync(&self, gs: &GitSource) -> Synced {
        if gs.spec.suspend {
            return Synced::Suspended;
        }
        let ns = gs.namespace().unwrap_or_default();
        let name = gs.name_any();
        if let Err(message) = fetch::check_url(&gs.spec.url, &self.ctx.config.allow_local_git_under)
        {
            return Synced::Failed(Failure {
                commit: None,
                result: SyncResult::Refused,
                reason: reasons::URL_NOT_ALLOWED,
                errors: vec![],
                message: Some(message),
                class: ErrorClass::Stalled,
            });
        }
        let fetched = match self.fetch(gs, &ns, &name).await {
            Ok(f) => f,
            Err(refused) => {
                return Synced::Failed(Failure {
                    commit: None,
                    result: SyncResult::FetchFailed,
                    reason: refused.reason,
                    errors: vec![],
                    message: Some(refused.message),
                    class: refused.class,
                })
            }
        };
        let fetch::Fetched {
            commit,
            found_at,
            committed_at,
            files,
        } = fetched;
        self.ctx
            .metrics
            .git_revision_time
            .get_or_create(&crate::metrics::SourceLabels {
                namespace: ns.clone(),
                name: name.clone(),
            })
            .set(committed_at);
        let key = (ns.clone(), name.clone());
        let last = self.applied.lock().unwrap().get(&key).cloned();
        if let Some(last) =
            last.filter(|l| l.commit == commit && l.generation == gs.metadata.generation)
        {
            if self.unchanged(&ns, &name, &last.objects) {
                return Synced::Applied {
                    commit,
                    found_at,
                    objects: last.objects.len(),
                    unchanged: true,
                };
            }
        }
        let failed = |reason, errors, class| {
            Synced::Failed(Failure {
                commit: Some(commit.clone()),
                result: SyncResult::Refused,
                reason,
                errors,
                message: None,
                class,
            })
        };
        let declared = match self.read(&ns, &name, &files) {
            Ok(d) => d,
            Err(errors) => return failed(reasons::INVALID_MANIFEST, errors, ErrorClass::Stalled),
        };
        self.applied.lock().unwrap().remove(&key);
        let stamps = match apply::apply(&self.ctx, &ns, &declared).await {
            Ok(s) => s,
            Err(r) => return failed(reasons::APPLY_FAILED, r.errors, r.class),
        };
        if gs.spec.prune {
            if let Err(r) = apply::prune(&self.ctx, &ns, &name, &declared).await {
                return failed(reasons::APPLY_FAILED, r.errors, r.class);
            }
        }
        self.applied.lock().unwrap().insert(
            key,
            Applied {
                commit: commit.clone(),
                generation: gs.metadata.generation,
                objects: stamps,
            },
        );
        Synced::Applied {
            commit,
            found_at,
            objects: declared.len(),
            unchanged: false,
        }
    }

    /// Step 1: the Secrets the GitSource names, then the fetch (on a
    /// blocking thread: libgit2 blocks).
    async fn fetch(
        &self,
        gs: &GitSource,
        ns: &str,
        name: &str,
    ) -> Result<fetch::Fetched, revision::Refused> {
        let secret_refused = |message: String| revision::Refused {
            reason: reasons::AUTHENTICATION_FAILED,
            message,
            class: ErrorClass::Stalled,
        };
        let access = access::Access::read(&self.ctx.client, ns, gs.spec.secret_ref.as_deref())
            .await
            .map_err(|e| secret_refused(format!("spec.secretRef: {e}")))?;
        let signers = match &gs.spec.verify {
            Some(v) => access::signers(&self.ctx.client, ns, &v.secret_ref)
                .await
                .map_err(|e| revision::Refused {
                    reason: reasons::SIGNATURE_INVALID,
                    message: format!("spec.verify.secretRef: {e}"),
                    class: ErrorClass::Stalled,
                })?,
            None => vec![],
        };
        let dir = self.ctx.config.data_dir.join("git").join(ns).join(name);
        let spec = gs.spec.clone();
        let limits = fetch::Limits {
            timeout: Duration::from_secs(gs.spec.timeout_seconds.max(1).into()),
            max_bytes: self.ctx.config.git_fetch_limit_bytes,
        };
        let fetching = tokio::task::spawn_blocking(move || {
            fetch::fetch(&dir, &spec, &access, &signers, limits)
        });
        // The fetch checks its deadline as data arrives; a host that
        // trickles nothing else is given up on here (the fetch's thread
        // ends at its next socket timeout).
        let failed = |message: String| revision::Refused {
            reason: reasons::FETCH_FAILED,
            message,
            class: ErrorClass::Transient,
        };
        match tokio::time::timeout(limits.timeout + Duration::from_secs(30), fetching).await {
            Ok(Ok(fetched)) => fetched,
            Ok(Err(e)) => Err(failed(format!("the fetch stopped: {e}"))),
            Err(_) => Err(failed(format!(
                "fetching {}: no answer within {} s (spec.timeoutSeconds)",
                fetch::redact(&gs.spec.url),
                limits.timeout.as_secs()
            ))),
        }
    }

    /// The metadata of an object of a kind a GitSource applies, as cached.
    fn meta(&self, kind: Kind, ns: &str, name: &str) -> Option<kube::api::ObjectMeta> {
        fn get<K>(
            store: &kube::runtime::reflector::Store<K>,
            ns: &str,
            name: &str,
        ) -> Option<kube::api::ObjectMeta>
        where
            K: kube::Resource<DynamicType = ()> + Clone + 'static,
        {
            let key = kube::runtime::reflector::ObjectRef::<K>::new(name).within(ns);
            store.get(&key).map(|o| o.meta().clone())
        }
        let s = &self.stores;
        match kind {
            Kind::Cabinet => get(&s.cabinets, ns, name),
            Kind::Package => get(&s.packages, ns, name),
            Kind::Site => get(&s.sites, ns, name),
            Kind::DistributionJob => get(&s.jobs, ns, name),
            Kind::Agent => get(&s.agents, ns, name),
        }
    }

    /// Whether every object a GitSource applied is still as it left it:
    /// there, the same object (uid), its spec not changed (generation),
    /// still marked as the source's, with the labels and annotations Git
    /// gives it.
    fn unchanged(&self, ns: &str, source: &str, objects: &[apply::Stamp]) -> bool {
        objects.iter().all(|o| {
            let now = self.meta(o.kind, ns, &o.name);
            let holds =
                |declared: &std::collections::BTreeMap<String, String>,
                 now: Option<&std::collections::BTreeMap<String, String>>| {
                    declared
                        .iter()
                        .all(|(k, v)| now.and_then(|n| n.get(k)) == Some(v))
                };
            now.is_some_and(|m| {
                m.uid.as_deref() == Some(o.uid.as_str())
                    && m.generation == Some(o.generation)
                    && m.labels
                        .as_ref()
                        .and_then(|l| l.get(caravan_api::labels::SOURCE))
                        .map(String::as_str)
                        == Some(source)
                    && holds(&o.labels, m.labels.as_ref())
                    && holds(&o.annotations, m.annotations.as_ref())
            })
        })
    }

    /// Step 2: every object of the revision, valid, and its Packages true to
    /// the packages already in the namespace.
    fn read(
        &self,
        ns: &str,
        source: &str,
        files: &revision::Files,
    ) -> Result<Vec<Declared>, Vec<ManifestError>> {
        let declared = parse_revision(files, ns, source)?;
        let existing: Vec<_> = self
            .stores
            .packages
            .state()
            .into_iter()
            .filter(|p| p.namespace().as_deref() == Some(ns))
            .collect();
        parse::check_identity(
            &declared,
            existing
                .iter()
                .map(|p| (p.meta().name.as_deref().unwrap_or_default(), &p.spec)),
            &self.ctx.published,
            ns,
        )?;
        Ok(declared)
    }

    /// Step 5: status, Events and the metric; returns when to look again.
    async fn summarize(&self, gs: &GitSource, synced: Synced) -> Result<Action, Error> {
        let interval = Duration::from_secs(gs.spec.interval_seconds.max(1).into());
        let s = summary(gs, synced);
        if let Some(result) = s.result {
            self.ctx.metrics.git_sync(result);
        }
        let requeue = match s.retry {
            Some(ErrorClass::Transient) => self.retries.failed(gs).min(interval),
            Some(ErrorClass::Stalled) => interval,
            None => {
                self.retries.succeeded(gs);
                interval
            }
        };
        if let Some(event) = s.event {
            self.ctx.publish(&event, gs).await;
        }
        status_patch::apply(&self.ctx.client, gs, s.status, field_managers::STATUS).await?;
        Ok(Action::requeue(requeue))
    }
}

/// What a sync comes to, written down.
struct Summary {
    status: GitSourceStatus,
    /// An Event when the applied revision changes or a new problem appears.
    event: Option<Event>,
    /// The metric's label (none while suspended).
    result: Option<SyncResult>,
    /// Whether and how the sync failed.
    retry: Option<ErrorClass>,
}

fn summary(gs: &GitSource, synced: Synced) -> Summary {
    let generation = gs.meta().generation;
    let previous = gs.status.clone().unwrap_or_default();
    let mut status = GitSourceStatus {
        observed_generation: generation,
        ..previous.clone()
    };
    let ready = |ok, reason: &str, msg: &str| {
        conditions::new(conditions::READY, ok, reason, msg, generation)
    };
    let event = |type_, reason: &str, action: &str, note: String| Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: action.into(),
        secondary: None,
    };
    match synced {
        Synced::Suspended => {
            status.conditions = vec![ready(false, reasons::SUSPENDED, "sync suspended")];
            Summary {
                status,
                event: None,
                result: None,
                retry: None,
            }
        }
        Synced::Applied {
            commit,
            found_at,
            objects,
            unchanged,
        } => {
            let msg = format!(
                "applied revision {} ({found_at}): {objects} objects",
                short(&commit)
            );
            let changed = status.last_applied_revision.as_deref() != Some(commit.as_str());
            let event = changed.then(|| event(EventType::Normal, "Applied", "Apply", msg.clone()));
            status.last_attempted_revision = Some(commit.clone());
            status.last_applied_revision = Some(commit);
            status.last_applied_ref = Some(found_at);
            status.applied_objects = objects as u32;
            status.errors.clear();
            status.conditions = vec![ready(true, reasons::SUCCEEDED, &msg)];
            Summary {
                status,
                event,
                result: Some(if unchanged {
                    SyncResult::Unchanged
                } else {
                    SyncResult::Applied
                }),
                retry: None,
            }
        }
        Synced::Failed(f) => {
            let msg = match &f.message {
                Some(m) => m.clone(),
                None => {
                    let detail = f
                        .errors
                        .iter()
                        .map(|e| format!("{}: {}", e.file, e.message))
                        .collect::<Vec<_>>()
                        .join("; ");
                    let kept = match &status.last_applied_revision {
                        Some(r) => format!("keeping revision {}", short(r)),
                        None => "nothing applied yet".into(),
                    };
                    let commit = f.commit.as_deref().unwrap_or_default();
                    format!("revision {} not applied ({kept}): {detail}", short(commit))
                }
            };
            // A new problem gets an Event; the same one again does not.
            let new = f.commit.is_none()
                || previous.last_attempted_revision != f.commit
                || previous.errors.is_empty();
            let event = new.then(|| event(EventType::Warning, f.reason, "Sync", msg.clone()));
            let result = f.result;
            if f.commit.is_some() {
                status.last_attempted_revision = f.commit;
                status.errors = f.errors;
            }
            status.conditions = vec![
                ready(false, f.reason, &msg),
                retry_condition(f.class, f.reason, &msg, generation),
            ];
            Summary {
                status,
                event,
                result: Some(result),
                retry: Some(f.class),
            }
        }
    }
}

#[instrument(skip_all, fields(namespace = gs.namespace(), gitsource = %gs.name_any()))]
async fn reconcile(gs: Arc<GitSource>, this: Arc<GitSources>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let done = async {
        gs.namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let synced = this.sync(&gs).await;
        this.summarize(&gs, synced).await
    }
    .await;
    this.ctx
        .metrics
        .reconciled("GitSource", started.elapsed(), done.is_ok());
    done
}

/// A GitSource is looked at again at least every interval whatever failed:
/// new commits are no watch events.
fn error_policy(gs: Arc<GitSource>, error: &Error, this: Arc<GitSources>) -> Action {
    let interval = Duration::from_secs(gs.spec.interval_seconds.max(1).into());
    match error.class() {
        ErrorClass::Stalled => Action::requeue(interval),
        ErrorClass::Transient => Action::requeue(this.retries.failed(&gs).min(interval)),
    }
}

/// `Reconciling` while a transient failure is retried, `Stalled` while only
/// a new commit (or spec) can help.
fn retry_condition(
    class: ErrorClass,
    reason: &str,
    msg: &str,
    generation: Option<i64>,
) -> Condition {
    match class {
        ErrorClass::Transient => conditions::new(
            conditions::RECONCILING,
            true,
            reasons::RETRYING,
            format!("retrying: {msg}"),
            generation,
        ),
        ErrorClass::Stalled => conditions::new(conditions::STALLED, true, reason, msg, generation),
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(status: Option<GitSourceStatus>) -> GitSource {
        let spec = serde_json::from_value(serde_json::json!({"url": "file:///fleet.git"})).unwrap();
        let mut gs = GitSource::new("fleet", spec);
        gs.metadata.generation = Some(3);
        gs.status = status;
        gs
    }

    fn condition<'a>(st: &'a GitSourceStatus, type_: &str) -> Option<&'a Condition> {
        st.conditions.iter().find(|c| c.type_ == type_)
    }

    fn applied(commit: &str) -> GitSourceStatus {
        summary(
            &source(None),
            Synced::Applied {
                commit: commit.into(),
                found_at: "branch main".into(),
                objects: 4,
                unchanged: false,
            },
        )
        .status
    }

    #[test]
    fn an_applied_revision_is_ready_and_announced_once() {
        let s = summary(
            &source(None),
            Synced::Applied {
                commit: "a".repeat(40),
                found_at: "branch main".into(),
                objects: 4,
                unchanged: false,
            },
        );
        let ready = condition(&s.status, conditions::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            (
                "True",
                "applied revision aaaaaaaaaaaa (branch main): 4 objects"
            )
        );
        assert_eq!(s.status.observed_generation, Some(3));
        assert!(s.event.is_some() && s.retry.is_none());
        assert!(condition(&s.status, conditions::STALLED).is_none());
        let again = summary(
            &source(Some(s.status)),
            Synced::Applied {
                commit: "a".repeat(40),
                found_at: "branch main".into(),
                objects: 4,
                unchanged: false,
            },
        );
        assert!(again.event.is_none(), "the same revision again is no news");
    }

    #[test]
    fn a_refused_revision_keeps_the_last_good_one_and_stalls_until_a_new_commit() {
        let good = applied(&"a".repeat(40));
        let refused = || {
            Synced::Failed(Failure {
                commit: Some("b".repeat(40)),
                result: SyncResult::Refused,
                reason: reasons::INVALID_MANIFEST,
                errors: vec![ManifestError {
                    file: "fleet/broken.yaml".into(),
                    message: "invalid YAML".into(),
                }],
                message: None,
                class: ErrorClass::Stalled,
            })
        };
        let s = summary(&source(Some(good)), refused());
        assert_eq!(s.status.last_applied_revision, Some("a".repeat(40)));
        assert_eq!(s.status.last_attempted_revision, Some("b".repeat(40)));
        let ready = condition(&s.status, conditions::READY).unwrap();
        assert_eq!(ready.reason, reasons::INVALID_MANIFEST);
        assert_eq!(
            ready.message,
            "revision bbbbbbbbbbbb not applied (keeping revision aaaaaaaaaaaa): fleet/broken.yaml: invalid YAML"
        );
        assert_eq!(
            condition(&s.status, conditions::STALLED).unwrap().status,
            "True"
        );
        assert!(condition(&s.status, conditions::RECONCILING).is_none());
        assert_eq!(
            (s.result, s.retry),
            (Some(SyncResult::Refused), Some(ErrorClass::Stalled))
        );
        assert!(s.event.is_some());
        let again = summary(&source(Some(s.status)), refused());
        assert!(
            again.event.is_none(),
            "the same problem is not announced twice"
        );
    }

    #[test]
    fn a_failed_fetch_is_retried_and_says_so() {
        let s = summary(
            &source(Some(applied(&"a".repeat(40)))),
            Synced::Failed(Failure {
                commit: None,
                result: SyncResult::FetchFailed,
                reason: reasons::FETCH_FAILED,
                errors: vec![],
                message: Some(
                    "fetching https://***@git.example.com/fleet.git (main): timed out".into(),
                ),
                class: ErrorClass::Transient,
            }),
        );
        assert_eq!(
            condition(&s.status, conditions::READY).unwrap().reason,
            reasons::FETCH_FAILED
        );
        let reconciling = condition(&s.status, conditions::RECONCILING).unwrap();
        assert!(
            reconciling.message.starts_with("retrying: fetching"),
            "{}",
            reconciling.message
        );
        assert!(condition(&s.status, conditions::STALLED).is_none());
        assert_eq!(
            s.status.last_applied_revision,
            Some("a".repeat(40)),
            "nothing lost"
        );
        assert_eq!(
            (s.result, s.retry),
            (Some(SyncResult::FetchFailed), Some(ErrorClass::Transient))
        );
    }
}
