//! Condition types, reasons and a helper that keeps `lastTransitionTime`
//! stable when a condition does not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
/// True while a failure that may pass (a fetch, an API call) is being
/// retried; absent once the object is reconciled (kstatus's "abnormal-true").
pub const RECONCILING: &str = "Reconciling";
/// True while retrying cannot help: only a change (to the object, or a new
/// commit in Git) can; absent otherwise.
pub const STALLED: &str = "Stalled";
/// DistributionJob: every package and destination it names exists.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// DistributionJob: every destination reached its desired state.
pub const COMPLETE: &str = "Complete";
/// DistributionJob: at least one destination failed.
pub const FAILED: &str = "Failed";
/// DistributionJob: destinations are still being reached (the rollout is
/// neither paused nor done).
pub const PROGRESSING: &str = "Progressing";
/// DistributionJob: no batch starts: the rollout paused at its failure
/// threshold, or the job is suspended.
pub const PAUSED: &str = "Paused";
/// Package: signed by a key its cabinet trusts.
pub const SIGNED: &str = "Signed";
/// Agent: acts on a desired state the controller signed for it, current
/// and not expired; False (with the agent's reason: `NotSigned`,
/// `Rollback`, `Expired`, …) when what it is served is refused.
pub const DESIRED_STATE_ACCEPTED: &str = "DesiredStateAccepted";
/// Site, Agent: the relay's (agent's) release is one the controller works
/// with (`caravan_api::skew`); False names both releases and what to
/// upgrade, and the component is refused until then.
pub const VERSION_SUPPORTED: &str = "VersionSupported";
/// Agent: not heard from for longer than the controller's
/// `--agent-stale-after-seconds`; absent once it reports again.
pub const STALE: &str = "Stale";

pub mod reasons {
    pub const SUCCEEDED: &str = "Succeeded";
    pub const PROGRESSING: &str = "Progressing";
    pub const INVALID_MANIFEST: &str = "InvalidManifest";
    pub const FETCH_FAILED: &str = "FetchFailed";
    /// The Git host refused the GitSource's credentials, asked for some its
    /// Secret lacks, or the Secret cannot be used.
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    /// The Git host's certificate or SSH host key is not trusted.
    pub const HOST_NOT_TRUSTED: &str = "HostNotTrusted";
    /// A GitSource's `ref` is not a valid branch, tag, range or commit.
    pub const INVALID_REF: &str = "InvalidRef";
    /// The branch, tag, range or commit is not in the repository.
    pub const REVISION_NOT_FOUND: &str = "RevisionNotFound";
    /// A GitSource names a repository it may not (see `--allow-local-git-under`).
    pub const URL_NOT_ALLOWED: &str = "URLNotAllowed";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const SUSPENDED: &str = "Suspended";
    pub const ARTIFACT_MISSING: &str = "ArtifactMissing";
    pub const ARTIFACT_AVAILABLE: &str = "ArtifactAvailable";
    pub const ARTIFACT_FETCHING: &str = "ArtifactFetching";
    pub const ARTIFACT_UNAVAILABLE: &str = "ArtifactUnavailable";
    pub const UNKNOWN_CABINET: &str = "UnknownCabinet";
    pub const UNKNOWN_PACKAGE: &str = "UnknownPackage";
    pub const UNKNOWN_SITE: &str = "UnknownSite";
    pub const UNKNOWN_AGENT: &str = "UnknownAgent";
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    /// A job's package requires packages that cannot be resolved, or
    /// declares what cannot be read: it is not installed.
    pub const UNRESOLVED_DEPENDENCY: &str = "UnresolvedDependency";
    /// A job's schedule ends before it starts, or cannot be read.
    pub const INVALID_SCHEDULE: &str = "InvalidSchedule";
    /// A job's rollout cannot be read: nobody new gets the job.
    pub const INVALID_ROLLOUT: &str = "InvalidRollout";
    /// A job's rollout paused: too many of a batch failed.
    pub const FAILURE_THRESHOLD: &str = "FailureThreshold";
    /// Every destination of a job is settled (succeeded or not).
    pub const FINISHED: &str = "Finished";
    /// A job's rollout went on with its next batch when told to.
    pub const RESUMED: &str = "Resumed";
    pub const RESOLVED: &str = "Resolved";
    pub const NO_DESTINATIONS: &str = "NoDestinations";
    pub const DESTINATIONS_FAILED: &str = "DestinationsFailed";
    /// A job that takes precedence has a package on some destinations.
    pub const CONFLICT: &str = "Conflict";
    pub const RELAY_CONNECTED: &str = "RelayConnected";
    pub const RELAY_NOT_CONNECTED: &str = "RelayNotConnected";
    pub const ENROLLED: &str = "Enrolled";
    pub const SIGNATURE_VERIFIED: &str = "SignatureVerified";
    pub const SIGNATURE_INVALID: &str = "SignatureInvalid";
    pub const INVALID_NAME: &str = "InvalidName";
    /// A Site's relay settings (url, cache, bandwidth, window) cannot be used.
    pub const INVALID_RELAY_SETTINGS: &str = "InvalidRelaySettings";
    /// The API server refused an object the controller derives from the spec.
    pub const WORKLOAD_REFUSED: &str = "WorkloadRefused";
    /// A Site asks for a relay image the controller does not allow.
    pub const IMAGE_NOT_ALLOWED: &str = "ImageNotAllowed";
    /// An object the controller would make for a Site exists and is not the Site's.
    pub const OBJECT_NOT_OWNED: &str = "ObjectNotOwned";
    /// An agent verified its desired state.
    pub const VERIFIED: &str = "Verified";
    /// An agent has not accepted a signed desired state yet.
    pub const NOT_YET_ACCEPTED: &str = "NotYetAccepted";
    /// A transient failure is being retried.
    pub const RETRYING: &str = "Retrying";
    /// An agent has not reported for longer than the controller waits.
    pub const NOT_HEARD_FROM: &str = "NotHeardFrom";
    /// A relay's or agent's release is within the controller's window.
    pub const WITHIN_WINDOW: &str = "WithinWindow";
    /// A relay's or agent's release is older than the controller's window.
    pub const TOO_OLD: &str = "TooOld";
    /// A relay's or agent's release is newer than the controller's.
    pub const NEWER_THAN_CONTROLLER: &str = "NewerThanController";
}

/// `VersionSupported` for `component` of release `version` (as it said, if
/// it did), judged by controller release `controller`.
pub fn version_supported(
    controller: &str,
    component: crate::skew::Component,
    version: Option<&str>,
    generation: Option<i64>,
) -> Condition {
    let (ok, reason, message) = match crate::skew::check(controller, component, version) {
        Ok(()) => (
            true,
            reasons::WITHIN_WINDOW,
            format!(
                "{} {} works with controller {controller}",
                component.name(),
                version.unwrap_or_default()
            ),
        ),
        Err(skew) => (
            false,
            match skew.upgrade {
                crate::skew::Upgrade::Component => reasons::TOO_OLD,
                crate::skew::Upgrade::Controller => reasons::NEWER_THAN_CONTROLLER,
            },
            skew.to_string(),
        ),
    };
    new(VERSION_SUPPORTED, ok, reason, message, generation)
}

/// Builds a condition for `generation`. Call [`merge`] to keep the previous
/// transition time when the status did not change.
pub fn new(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now()),
    }
}

/// Returns `next` with each condition's `lastTransitionTime` carried over from
/// `previous` where its status is unchanged, as Kubernetes conventions ask.
pub fn merge(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for c in &mut next {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_) {
            if p.status == c.status {
                c.last_transition_time = p.last_transition_time.clone();
            }
        }
    }
    next
}

/// Whether `conditions` hold `type_` with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skew::Component;

    #[test]
    fn a_release_outside_the_window_is_flagged_with_what_to_upgrade() {
        let within = version_supported("0.4.0", Component::Agent, Some("0.2.3"), Some(2));
        assert_eq!(
            (within.status.as_str(), within.reason.as_str()),
            ("True", reasons::WITHIN_WINDOW)
        );
        assert_eq!(within.observed_generation, Some(2));
        let old = version_supported("0.4.0", Component::Relay, Some("0.2.3"), None);
        assert_eq!(
            (old.status.as_str(), old.reason.as_str()),
            ("False", reasons::TOO_OLD)
        );
        assert!(
            old.message.ends_with("upgrade the relay to 0.4.0"),
            "{}",
            old.message
        );
        let ahead = version_supported("0.4.0", Component::Agent, Some("0.5.0"), None);
        assert_eq!(ahead.reason, reasons::NEWER_THAN_CONTROLLER);
        let silent = version_supported("0.4.0", Component::Relay, None, None);
        assert_eq!(silent.reason, reasons::TOO_OLD);
    }
}
