//! Writing status, one way for every kind: server-side apply of the whole
//! computed status to the status subresource, under a field manager that
//! writes nothing else ([`crate::field_managers::STATUS`], or `REPORTS` for
//! what agents report). The manager then owns exactly the last status it
//! wrote, so a field or list the new status leaves out is removed from the
//! object. `observedGeneration` is set here, conditions keep their
//! `lastTransitionTime` where their status did not change, and nothing is
//! written when the status is already current, so status writes stay
//! bounded however often it is recomputed.
//!
//! Status written by a release that applied it under the Git sync's manager
//! (`caravan`) is taken over: after the first write, that manager's claim on
//! the status is released, so what only it held (a stale failure) goes.
//!
//! A failed write is returned to the caller, which retries it: a reconciler
//! through its error policy, the engine with a backoff of its own.

use caravan_api::{conditions, v1alpha1::*};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    api::{Patch, PatchParams},
    runtime::events::Event,
    Resource, ResourceExt,
};
use serde::Serialize;

use crate::field_managers;

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
    /// Records the generation the status was computed from, where the kind has the field.
    fn observe(status: &mut Self::Status, generation: Option<i64>);
    /// The Events a change of status from `old` to `new` is worth.
    fn events(old: Option<&Self::Status>, new: &Self::Status) -> Vec<Event>;
}

macro_rules! has_status {
    ($($kind:ty => $status:ty $(, observed: $observed:ident)? $(, events: $events:path)?);* $(;)?) => {$(
        impl HasStatus for $kind {
            type Status = $status;
            fn status(&self) -> Option<&$status> {
                self.status.as_ref()
            }
            fn conditions(status: &mut $status) -> &mut Vec<Condition> {
                &mut status.conditions
            }
            #[allow(unused_variables)]
            fn observe(status: &mut $status, generation: Option<i64>) {
                $(status.$observed = generation;)?
            }
            #[allow(unused_variables, unreachable_code)]
            fn events(old: Option<&$status>, new: &$status) -> Vec<Event> {
                $(return $events(old, new);)?
                Vec::new()
            }
        }
    )*};
}

has_status!(
    GitSource => GitSourceStatus, observed: observed_generation;
    Cabinet => CabinetStatus, observed: observed_generation,
        events: crate::index::status::cabinet_events;
    Package => PackageStatus, observed: observed_generation,
        events: crate::index::status::package_events;
    DistributionJob => DistributionJobStatus, observed: observed_generation,
        events: crate::index::status::job_events;
    Site => SiteStatus, observed: observed_generation,
        events: crate::index::status::site_events;
    // Agent status comes from reports, not from the spec.
    Agent => AgentStatus;
);

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Written<S> {
    /// The status was current already.
    Unchanged,
    /// Written; the object's status as the API server then held it.
    Written(Option<S>),
    /// The object was deleted meanwhile: nothing to report on.
    Gone,
}

/// `next` as it is to be written for `obj`: with the object's generation
/// observed, and each condition's transition time carried over from the
/// current status where its status did not change; `None` when that equals
/// the current status (nothing to write).
pub fn updated<K: HasStatus>(obj: &K, mut next: K::Status) -> Option<K::Status> {
    K::observe(&mut next, obj.meta().generation);
    if let Some(current) = obj.status() {
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
) -> Result<Written<K::Status>, kube::Error> {
    match updated(obj, next) {
        Some(status) => write(client, obj, &status, manager).await,
        None => Ok(Written::Unchanged),
    }
}

/// Writes `status` (from [`updated`]) as the status of `obj`, as `manager`.
pub async fn write<K: HasStatus>(
    client: &kube::Client,
    obj: &K,
    status: &K::Status,
    manager: &str,
) -> Result<Written<K::Status>, kube::Error> {
    let api: kube::Api<K> =
        kube::Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let name = obj.name_any();
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(manager).force();
    let written = match api
        .patch_status(&name, &params, &Patch::Apply(&patch))
        .await
    {
        Ok(o) => o,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Written::Gone),
        Err(e) => return Err(e),
    };
    if !legacy_status_owner(&written) {
        return Ok(Written::Written(written.status().cloned()));
    }
    // Owning nothing of the status any more, the legacy manager's fields
    // that the status just written does not hold are removed.
    let release = serde_json::json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()) });
    let params = PatchParams::apply(field_managers::APPLY).force();
    tracing::info!(kind = %K::kind(&()), %name, "taking over status written by an earlier release");
    let released = api
        .patch_status(&name, &params, &Patch::Apply(&release))
        .await?;
    Ok(Written::Written(released.status().cloned()))
}

/// Whether the Git sync's field manager owns any field of `obj`'s status
/// (status an earlier release wrote under it).
fn legacy_status_owner<K: Resource>(obj: &K) -> bool {
    obj.meta().managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(field_managers::APPLY)
            && entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:status"))
                .and_then(|s| s.as_object())
                .is_some_and(|s| !s.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};

    fn ready(ok: bool, at: i64) -> Condition {
        let mut c = conditions::new(conditions::READY, ok, "Reason", "message", Some(1));
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::from_second(at).unwrap());
        c
    }

    fn status(failures: &[&str], condition: Condition) -> DistributionJobStatus {
        DistributionJobStatus {
            observed_generation: Some(4),
            failures: failures
                .iter()
                .map(|a| DestinationFailure {
                    agent: a.to_string(),
                    site: "hq".into(),
                    package: "p".into(),
                    reason: "r".into(),
                    retry_at: None,
                })
                .collect(),
            conditions: vec![condition],
            ..Default::default()
        }
    }

    fn job(current: Option<DistributionJobStatus>) -> DistributionJob {
        let spec = serde_json::from_value(serde_json::json!({"packages": [], "destinations": {}}))
            .unwrap();
        let mut j = DistributionJob::new("j", spec);
        j.metadata.generation = Some(4);
        j.status = current;
        j
    }

    #[test]
    fn an_unchanged_status_is_not_written_and_transition_times_survive() {
        let current = status(&["a1"], ready(false, 100));
        let obj = job(Some(current.clone()));
        assert_eq!(
            updated(&obj, status(&["a1"], ready(false, 200))),
            None,
            "recomputing the same status writes nothing"
        );
        let next = updated(&obj, status(&[], ready(false, 200))).expect("a failure went away");
        assert!(next.failures.is_empty());
        assert_eq!(
            next.conditions[0].last_transition_time, current.conditions[0].last_transition_time,
            "Ready stayed False: its transition time stays"
        );
        let next = updated(&obj, status(&[], ready(true, 200))).unwrap();
        assert_eq!(
            next.conditions[0].last_transition_time,
            ready(true, 200).last_transition_time
        );
        assert!(updated(&job(None), status(&[], ready(true, 1))).is_some());
    }

    #[test]
    fn the_observed_generation_is_the_objects() {
        let mut next = status(&[], ready(true, 1));
        next.observed_generation = None;
        let written = updated(&job(None), next).unwrap();
        assert_eq!(written.observed_generation, Some(4));
    }

    #[test]
    fn status_held_by_the_git_syncs_manager_is_recognised_as_legacy() {
        let entry = |manager: &str, fields: serde_json::Value| ManagedFieldsEntry {
            manager: Some(manager.into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        };
        let mut obj = job(None);
        obj.metadata.managed_fields = Some(vec![
            entry("caravan", serde_json::json!({"f:spec": {"f:packages": {}}})),
            entry(
                "caravan-status",
                serde_json::json!({"f:status": {"f:phase": {}}}),
            ),
        ]);
        assert!(!legacy_status_owner(&obj));
        obj.metadata.managed_fields.as_mut().unwrap()[0] = entry(
            "caravan",
            serde_json::json!({"f:spec": {}, "f:status": {"f:failures": {}}}),
        );
        assert!(legacy_status_owner(&obj));
        obj.metadata.managed_fields.as_mut().unwrap()[0] =
            entry("caravan", serde_json::json!({"f:status": {}}));
        assert!(!legacy_status_owner(&obj), "an empty claim holds nothing");
    }
}
