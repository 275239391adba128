//! Errors of the controller, named after the operation that failed, and
//! how a reconciler retries them: a *stalled* error waits for the object to
//! change (retrying cannot help), a *transient* one backs off, per object.

use std::{collections::HashMap, hash::Hash, sync::Mutex, time::Duration};

use caravan_net::Backoff;
use kube::{
    runtime::{controller::Action, reflector::ObjectRef},
    Resource,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("git fetch of {url}: {source}")]
    GitFetch {
        url: String,
        #[source]
        source: git2::Error,
    },
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// A certificate could not be made (a Site's relay hostnames that are
    /// neither DNS names nor IP addresses, say).
    #[error("certificate: {0}")]
    Certificate(String),
}

/// What retrying an error can achieve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Only a change can help: wait for one to the object (and look again
    /// now and then, in case what refused it, an admission policy say, changed).
    Stalled,
    /// The cluster, the network or a server may recover: back off and retry.
    Transient,
}

impl Error {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            // The API server refused what the object asks for (an invalid
            // Deployment from its spec): the same spec fails the same way.
            Self::Kube(kube::Error::Api(s)) if matches!(s.code, 400 | 422) => ErrorClass::Stalled,
            Self::MissingField(_) | Self::Certificate(_) => ErrorClass::Stalled,
            _ => ErrorClass::Transient,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a stalled object waits for a look without a change.
pub const STALLED_RECHECK: Duration = Duration::from_secs(300);

/// Per-object retry state of one controller: each object that keeps failing
/// transiently waits longer (1 s doubling up to 5 min), independently of
/// the others; a success starts it over.
pub struct Retries<K: Resource> {
    backoff: Backoff,
    failures: Mutex<HashMap<ObjectRef<K>, u32>>,
}

impl<K> Default for Retries<K>
where
    K: Resource,
    K::DynamicType: Eq + Hash + Clone,
{
    fn default() -> Self {
        Self {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl<K> Retries<K>
where
    K: Resource<DynamicType = ()>,
{
    /// The requeue after `error` from reconciling `obj`.
    pub fn policy(&self, obj: &K, error: &Error) -> Action {
        match error.class() {
            ErrorClass::Stalled => Action::requeue(STALLED_RECHECK),
            ErrorClass::Transient => Action::requeue(self.failed(obj)),
        }
    }

    /// Counts a transient failure of `obj`; returns how long to wait.
    pub fn failed(&self, obj: &K) -> Duration {
        let mut failures = self.failures.lock().expect("lock poisoned");
        let n = failures.entry(ObjectRef::from_obj(obj)).or_default();
        *n += 1;
        self.backoff.delay(*n)
    }

    /// `obj` was reconciled: its next failure starts the backoff over.
    pub fn succeeded(&self, obj: &K) {
        self.failures
            .lock()
            .expect("lock poisoned")
            .remove(&ObjectRef::from_obj(obj));
    }
}

/// Logs what a controller's reconcile stream yields: failures at warn, with
/// the object they are about.
pub fn log_outcome<K: Resource, E: std::error::Error>(
    outcome: Result<
        (ObjectRef<K>, Action),
        kube::runtime::controller::Error<E, kube::runtime::watcher::Error>,
    >,
) where
    K::DynamicType: std::fmt::Debug,
{
    use kube::runtime::controller::Error as E2;
    match outcome {
        Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
        Err(E2::ReconcilerFailed(error, obj)) => {
            tracing::warn!(object = %obj, error = %error, "reconcile failed")
        }
        // Deleted between the trigger and the reconcile: nothing to do.
        Err(E2::ObjectNotFound(obj)) => tracing::debug!(object = %obj, "object gone"),
        Err(e) => tracing::warn!(error = %e, "controller error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::v1alpha1::Site;

    fn site(name: &str) -> Site {
        let mut s = Site::new(name, Default::default());
        s.metadata.namespace = Some("ns".into());
        s
    }

    fn api_error(code: u16) -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure("refused", "Invalid")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn transient_failures_back_off_per_object_and_stalled_ones_wait_for_a_change() {
        let retries = Retries::<Site>::default();
        let (a, b) = (site("a"), site("b"));
        let transient = api_error(503);
        assert_eq!(
            retries.policy(&a, &transient),
            Action::requeue(Duration::from_secs(1))
        );
        assert_eq!(
            retries.policy(&a, &transient),
            Action::requeue(Duration::from_secs(2))
        );
        assert_eq!(
            retries.policy(&b, &transient),
            Action::requeue(Duration::from_secs(1)),
            "another object's failures do not count"
        );
        retries.succeeded(&a);
        assert_eq!(
            retries.policy(&a, &transient),
            Action::requeue(Duration::from_secs(1))
        );
        let stalled = Action::requeue(STALLED_RECHECK);
        assert_eq!(retries.policy(&a, &api_error(422)), stalled);
        assert_eq!(
            retries.policy(&a, &Error::MissingField("metadata.namespace")),
            stalled
        );
    }
}
