//! Writing status, one way for every kind: server-side apply of the whole
//! computed status to the status subresource, under a field manager that
//! writes nothing else ([`crate::field_managers::STATUS`], or `REPORTS` for
//! what agents report). The manager then owns exactly the last status it
//! wrote, so a field or list the new status leaves out is removed from the
//! object. Conditions keep their `lastTransitionTime` where their status did
//! not change, and nothing is written when the status is already current,
//! so status writes stay bounded however often it is recomputed.
//!
//! A failed write is returned to the caller, which retries it: a reconciler
//! through its error policy, the engine with a backoff of its own.

use caravan_api::{conditions, v1alpha1::*};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    api::{Patch, PatchParams},
    Resource, ResourceExt,
};
use serde::Serialize;

/// A kind whose status the controller writes.
pub trait HasStatus:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    type Status: Serialize + PartialEq + Clone;
    fn status(&self) -> Option<&Self::Status>;
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition>;
}

macro_rules! has_status {
    ($($kind:ty => $status:ty),* $(,)?) => {$(
        impl HasStatus for $kind {
            type Status = $status;
            fn status(&self) -> Option<&$status> {
                self.status.as_ref()
            }
            fn conditions(status: &mut $status) -> &mut Vec<Condition> {
                &mut status.conditions
            }
        }
    )*};
}

has_status!(
    GitSource => GitSourceStatus,
    Cabinet => CabinetStatus,
    Package => PackageStatus,
    DistributionJob => DistributionJobStatus,
    Site => SiteStatus,
    Agent => AgentStatus,
);

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The status was current already.
    Unchanged,
    Written,
    /// The object was deleted meanwhile: nothing to report on.
    Gone,
}

/// `next`, with each condition's transition time carried over from
/// `current` where its status did not change; `None` when that equals
/// `current` (nothing to write).
pub fn updated<K: HasStatus>(
    current: Option<&K::Status>,
    mut next: K::Status,
) -> Option<K::Status> {
    if let Some(current) = current {
        let previous = std::mem::take(K::conditions(&mut current.clone()));
        let merged = conditions::merge(&previous, std::mem::take(K::conditions(&mut next)));
        *K::conditions(&mut next) = merged;
        if current == &next {
            return None;
        }
    }
    Some(next)
}

/// Makes `next` the status of `obj` (see the module docs), as `manager`.
pub async fn apply<K: HasStatus>(
    client: &kube::Client,
    obj: &K,
    next: K::Status,
    manager: &str,
) -> Result<Written, kube::Error> {
    let Some(next) = updated::<K>(obj.status(), next) else {
        return Ok(Written::Unchanged);
    };
    let ns = obj.namespace().unwrap_or_default();
    let api: kube::Api<K> = kube::Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": next,
    });
    let params = PatchParams::apply(manager).force();
    match api
        .patch_status(&obj.name_any(), &params, &Patch::Apply(&patch))
        .await
    {
        Ok(_) => Ok(Written::Written),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Written::Gone),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ready(ok: bool, at: i64) -> Condition {
        let mut c = conditions::new(conditions::READY, ok, "Reason", "message", Some(1));
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::from_second(at).unwrap());
        c
    }

    fn status(failures: &[&str], condition: Condition) -> DistributionJobStatus {
        DistributionJobStatus {
            failures: failures
                .iter()
                .map(|a| DestinationFailure {
                    agent: a.to_string(),
                    site: "hq".into(),
                    package: "p".into(),
                    reason: "r".into(),
                })
                .collect(),
            conditions: vec![condition],
            ..Default::default()
        }
    }

    #[test]
    fn an_unchanged_status_is_not_written_and_transition_times_survive() {
        let current = status(&["a1"], ready(false, 100));
        assert_eq!(
            updated::<DistributionJob>(Some(&current), status(&["a1"], ready(false, 200))),
            None,
            "recomputing the same status writes nothing"
        );
        let next = updated::<DistributionJob>(Some(&current), status(&[], ready(false, 200)))
            .expect("a failure went away");
        assert!(next.failures.is_empty());
        assert_eq!(
            next.conditions[0].last_transition_time, current.conditions[0].last_transition_time,
            "Ready stayed False: its transition time stays"
        );
        let next =
            updated::<DistributionJob>(Some(&current), status(&[], ready(true, 200))).unwrap();
        assert_eq!(
            next.conditions[0].last_transition_time,
            ready(true, 200).last_transition_time
        );
        assert!(updated::<DistributionJob>(None, status(&[], ready(true, 1))).is_some());
    }
}
