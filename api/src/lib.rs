//! Caravan's shared vocabulary: the custom resource types (group `caravan.dev`),
//! condition types and reasons, label keys, and the wire types of the
//! distribution API spoken between controller, relays and agents.

pub mod backup;
pub mod conditions;
pub mod digest;
pub mod facts;
pub mod names;
pub mod selector;
pub mod signing;
pub mod skew;
pub mod trust;
pub mod v1alpha1;
pub mod version;
pub mod wire;

pub use digest::Digest;

/// API group of every Caravan custom resource.
pub const GROUP: &str = "caravan.dev";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` string of every Caravan manifest.
pub const API_VERSION: &str = "caravan.dev/v1alpha1";

/// Caravan's release (the workspace's version): images and charts follow it.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Where Caravan's images are published (tagged with [`RELEASE`]).
pub mod images {
    pub const CONTROLLER: &str = "ghcr.io/caravan-dev/caravan-controller";
    pub const RELAY: &str = "ghcr.io/caravan-dev/caravan-relay";

    /// The relay image of this release.
    pub fn relay() -> String {
        format!("{RELAY}:{}", super::RELEASE)
    }
}

/// Field managers of everything the controller writes with server-side
/// apply.
pub mod field_managers {
    /// Objects applied from Git, and the relay workloads of Sites.
    pub const APPLY: &str = "caravan";
    /// Status the controller computes. A manager of its own: what it owns is
    /// exactly the last status it wrote, so a list the computed status no
    /// longer holds (a job's failures) is removed, not left behind.
    pub const STATUS: &str = "caravan-status";
    /// Agent status written from the agents' reports.
    pub const REPORTS: &str = "caravan-reports";
    /// An Agent's `Stale` condition (`crate::stale`); its next report takes
    /// the conditions back.
    pub const STALE: &str = "caravan-stale";
    /// The controller's own agent update (`--agent-update auto`): its
    /// Cabinet, Package and DistributionJob.
    pub const AGENT_UPDATE: &str = "caravan-agent-update";
}

/// Label keys and annotations Caravan sets.
pub mod labels {
    /// Set on every object applied from a GitSource: `<gitsource name>`.
    pub const SOURCE: &str = "caravan.dev/source";
    /// Set on the relay objects of a Site: `<site name>`.
    pub const SITE: &str = "caravan.dev/site";
    /// Standard component label on relay objects.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Agents are found by host ID with this label (value: the host ID).
    pub const HOST_ID: &str = "caravan.dev/host-id";
    /// Annotation on a Site: each new value rotates the site's relay
    /// credential (`caravan site rotate-relay-credential`).
    pub const RELAY_CREDENTIAL_ROTATION: &str = "caravan.dev/relay-credential-rotation";
    /// Label (value `"true"`) a Secret must carry for the controller to read
    /// it as a GitSource's webhook secret.
    pub const WEBHOOK_SECRET: &str = "caravan.dev/webhook-secret";
    /// Label (value `"true"`) a Secret must carry for the controller to read
    /// it as an `oci` cabinet's registry credentials.
    pub const REGISTRY_CREDENTIALS: &str = "caravan.dev/registry-credentials";
    /// Label (value `"true"`) a Secret must carry for the controller to read
    /// it as a GitSource's credentials or signing keys.
    pub const GIT_CREDENTIALS: &str = "caravan.dev/git-credentials";
    /// Annotation on a Site restored from a backup (`caravan restore`): the
    /// UID it had when it was first created, which its relay's credential
    /// and its bootstrap tokens are bound to ([`crate::original_uid`]).
    pub const ORIGINAL_UID: &str = "caravan.dev/original-uid";
    /// Annotation on each CRD: the release that wrote it. A controller
    /// never applies its CRDs over those of a newer release.
    pub const CRD_RELEASE: &str = "caravan.dev/release";
}

/// The UID an object was first created with: its
/// [`labels::ORIGINAL_UID`] when a restore recreated it, else its own. What
/// is bound to a Site (its relay's credential, its bootstrap tokens) is
/// bound to this, so that it outlives a restore but not the Site's deletion.
pub fn original_uid(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(labels::ORIGINAL_UID))
        .or(meta.uid.as_ref())
        .map_or("", String::as_str)
}

/// Directories (relative to the repository root) holding the generated CRDs.
pub const CRD_DIRS: [&str; 2] = ["crds", "charts/caravan/crds"];

/// Renders a CRD as the YAML committed under `crds/`.
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_yaml_ng::Error> {
    Ok(format!(
        "# Generated by `cargo run -p caravan-api --bin crdgen` (make crds); do not edit.\n{}",
        serde_yaml_ng::to_string(crd)?
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// `crds/*.yaml` and the chart's copy must be exactly what the types produce.
    #[test]
    fn committed_crds_match_the_rust_types() {
        for dir in crate::CRD_DIRS {
            check_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir));
        }
    }

    fn check_dir(dir: &Path) {
        let crds = crate::v1alpha1::crds();
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap();
            let path = dir.join(format!("{name}.yaml"));
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run `cargo run -p caravan-api --bin crdgen`",
                    path.display()
                )
            });
            assert_eq!(
                committed,
                crate::crd_yaml(crd).unwrap(),
                "{} drifted from the Rust types; run `cargo run -p caravan-api --bin crdgen`",
                path.display()
            );
        }
        let files = std::fs::read_dir(dir).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml")
        });
        assert_eq!(
            files.count(),
            crds.len(),
            "crds/ holds a file no type produces"
        );
    }

    /// `kubectl explain` has something to say of every field: each has a
    /// type and a description.
    #[test]
    fn every_crd_field_has_a_type_and_a_description() {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
            JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
        };
        fn walk(schema: &JSONSchemaProps, path: &str, missing: &mut Vec<String>) {
            for (name, field) in schema.properties.iter().flatten() {
                let here = format!("{path}.{name}");
                if field.description.as_deref().is_none_or(str::is_empty) {
                    missing.push(format!("{here}: no description"));
                }
                let typed = field.type_.is_some()
                    || field.x_kubernetes_int_or_string == Some(true)
                    || field.x_kubernetes_preserve_unknown_fields == Some(true)
                    || field.any_of.is_some()
                    || field.one_of.is_some();
                if !typed {
                    missing.push(format!("{here}: no type"));
                }
                walk(field, &here, missing);
            }
            match &schema.items {
                Some(JSONSchemaPropsOrArray::Schema(items)) => {
                    walk(items, &format!("{path}[]"), missing)
                }
                Some(JSONSchemaPropsOrArray::Schemas(all)) => all
                    .iter()
                    .for_each(|s| walk(s, &format!("{path}[]"), missing)),
                None => {}
            }
            if let Some(JSONSchemaPropsOrBool::Schema(values)) = &schema.additional_properties {
                walk(values, &format!("{path}{{}}"), missing);
            }
            for sub in schema.any_of.iter().chain(&schema.one_of).flatten() {
                walk(sub, path, missing);
            }
        }
        let mut missing = Vec::new();
        for crd in crate::v1alpha1::crds() {
            for version in &crd.spec.versions {
                let schema = version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref());
                walk(schema.unwrap(), &crd.spec.names.kind, &mut missing);
            }
        }
        assert!(
            missing.is_empty(),
            "{} fields:\n{}",
            missing.len(),
            missing.join("\n")
        );
    }
}
