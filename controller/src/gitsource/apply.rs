//! Applying a revision: every object is dry-run first, then all are
//! applied with server-side apply (field manager `caravan`); then what this
//! source applied earlier and Git no longer holds is pruned. A refusal in
//! the dry run applies nothing and names the file.

use std::collections::{BTreeMap, BTreeSet};

use caravan_api::{labels, v1alpha1::ManifestError};
use kube::{
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions},
    Api, ResourceExt,
};

use super::parse::{Declared, Kind};
use crate::{context::Context, error::ErrorClass, field_managers};

/// Why a revision was not (wholly) applied: one error per file, and whether
/// trying again may help (the API server was away) or not (it refused).
#[derive(Debug)]
pub struct Refusal {
    pub errors: Vec<ManifestError>,
    pub class: ErrorClass,
}

impl Refusal {
    fn add(&mut self, file: &str, message: String, e: &kube::Error) {
        self.errors.push(ManifestError {
            file: file.to_string(),
            message,
        });
        // The API server refused the object: the same revision is refused again.
        let refused =
            matches!(e, kube::Error::Api(s) if s.code < 500 && s.code != 409 && s.code != 429);
        if !refused {
            self.class = ErrorClass::Transient;
        }
    }

    fn into_result(self) -> Result<(), Self> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl Default for Refusal {
    fn default() -> Self {
        Self {
            errors: vec![],
            class: ErrorClass::Stalled,
        }
    }
}

fn api(ctx: &Context, ns: &str, kind: Kind) -> Api<DynamicObject> {
    Api::namespaced_with(ctx.client.clone(), ns, &kind.resource())
}

/// An object as applied: what tells whether someone changed it since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub kind: Kind,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    /// The labels and annotations Git declares for it (edits to them do
    /// not change the generation).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The string map at `metadata.<field>` of a declared object.
fn declared_map(object: &serde_json::Value, field: &str) -> BTreeMap<String, String> {
    object["metadata"][field]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// `declared` in the order of [`Kind::ALL`] (each kind in file order): the
/// objects a commit adds appear before the kinds that name them, so a
/// computation between two applies (the engine waits for the rest of a
/// commit, up to its debounce) does not find a job naming a Package not
/// there yet, which would hold that package on every agent the job reaches
/// and wake each of them twice.
fn in_dependency_order(declared: &[Declared]) -> Vec<&Declared> {
    let mut ordered: Vec<&Declared> = declared.iter().collect();
    ordered.sort_by_key(|m| m.kind);
    ordered
}

/// Dry-runs every object, then applies them all (in dependency order);
/// returns them as applied.
pub async fn apply(ctx: &Context, ns: &str, declared: &[Declared]) -> Result<Vec<Stamp>, Refusal> {
    let params = PatchParams::apply(field_managers::APPLY).force();
    let mut stamps = vec![];
    let declared = in_dependency_order(declared);
    for dry_run in [true, false] {
        let params = if dry_run {
            params.clone().dry_run()
        } else {
            params.clone()
        };
        let mut refusal = Refusal::default();
        for m in &declared {
            match api(ctx, ns, m.kind)
                .patch(&m.name, &params, &Patch::Apply(&m.object))
                .await
            {
                Ok(applied) if !dry_run => stamps.push(Stamp {
                    kind: m.kind,
                    name: m.name.clone(),
                    uid: applied.metadata.uid.unwrap_or_default(),
                    generation: applied.metadata.generation.unwrap_or_default(),
                    labels: declared_map(&m.object, "labels"),
                    annotations: declared_map(&m.object, "annotations"),
                }),
                Ok(_) => {}
                Err(e) => {
                    let message =
                        format!("{} {:?}: {}", m.kind.name(), m.name, api_error_message(&e));
                    refusal.add(&m.file, message, &e);
                }
            }
        }
        refusal.into_result()?;
    }
    Ok(stamps)
}

/// Deletes what source `source` applied earlier and `declared` no longer holds.
pub async fn prune(
    ctx: &Context,
    ns: &str,
    source: &str,
    declared: &[Declared],
) -> Result<(), Refusal> {
    let wanted: BTreeSet<_> = declared.iter().map(|m| (m.kind, m.name.as_str())).collect();
    // From the API server's watch cache: a consistent list would read every
    // object of the kind from etcd to filter by label (at 100,000 Agents,
    // minutes per sync under load). A stale list defers a prune to the next
    // sync; each delete is conditional on the object being as listed (one
    // another source took over since is not deleted).
    let selector = ListParams::default()
        .labels(&format!("{}={source}", labels::SOURCE))
        .match_any();
    let mut refusal = Refusal::default();
    // Those that name others first: a job before its Packages.
    for kind in Kind::ALL.into_iter().rev() {
        let list = match api(ctx, ns, kind).list_metadata(&selector).await {
            Ok(l) => l,
            Err(e) => {
                let message = format!(
                    "listing {}s to prune: {}",
                    kind.name(),
                    api_error_message(&e)
                );
                refusal.add("-", message, &e);
                continue;
            }
        };
        for obj in list {
            let name = obj.name_any();
            if !wanted.contains(&(kind, name.as_str())) {
                tracing::info!(kind = kind.name(), %name, "pruning object removed from Git");
                let as_listed = Preconditions {
                    resource_version: obj.resource_version(),
                    uid: obj.uid(),
                };
                match api(ctx, ns, kind)
                    .delete(&name, &DeleteParams::background().preconditions(as_listed))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                        tracing::info!(kind = kind.name(), %name, "changed or gone since listed; not pruned now");
                    }
                    Err(e) => tracing::warn!(kind = kind.name(), %name, error = %e, "prune failed"),
                }
            }
        }
    }
    refusal.into_result()
}

fn api_error_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_applied_after_those_they_name() {
        let declared: Vec<Declared> = [
            ("a-job.yaml", Kind::DistributionJob, "roll"),
            ("b-agent.yaml", Kind::Agent, "pc-1"),
            ("c-site.yaml", Kind::Site, "hq"),
            ("d-package.yaml", Kind::Package, "hello"),
            ("e-package.yaml", Kind::Package, "tools"),
            ("f-cabinet.yaml", Kind::Cabinet, "main"),
        ]
        .into_iter()
        .map(|(file, kind, name)| Declared {
            file: file.into(),
            kind,
            name: name.into(),
            object: serde_json::Value::Null,
        })
        .collect();
        let order: Vec<&str> = in_dependency_order(&declared)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(order, ["main", "hello", "tools", "hq", "roll", "pc-1"]);
    }
}
