//! `caravan.dev/v1alpha1`: every Caravan custom resource.

mod agent;
mod bootstrap;
mod cabinet;
mod gitsource;
mod job;
mod package;
mod rollout;
mod schedule;
mod site;

pub use agent::*;
pub use bootstrap::*;
pub use cabinet::*;
pub use gitsource::*;
pub use job::*;
pub use package::*;
pub use rollout::*;
pub use schedule::*;
pub use site::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The CRDs of every kind, in the order they are documented, each
/// annotated with the release that defines it.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [
        GitSource::crd(),
        Cabinet::crd(),
        Package::crd(),
        DistributionJob::crd(),
        Site::crd(),
        Agent::crd(),
        BootstrapToken::crd(),
    ]
    .into_iter()
    .map(compatible)
    .map(|mut crd| {
        crd.metadata.annotations = Some(
            [(
                crate::labels::CRD_RELEASE.to_string(),
                crate::RELEASE.to_string(),
            )]
            .into(),
        );
        crd
    })
    .collect()
}

/// Makes a generated CRD acceptable to the oldest supported API server
/// (v1.20), which rejects an empty string as a schema default ("Invalid value:
/// null"). Dropping those defaults changes nothing: the Rust types default
/// missing strings to empty anyway.
fn compatible(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("default").is_some_and(|d| d.as_str() == Some("")) {
                    m.remove("default");
                }
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(&crd).expect("a CRD serializes");
    strip(&mut v);
    serde_json::from_value(v).expect("a CRD stays a CRD")
}

/// A reference to a key of a Secret in the object's namespace.
#[derive(
    serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema,
)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}
