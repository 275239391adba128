//! `caravan.dev/v1alpha1`: every Caravan custom resource.

mod agent;
mod cabinet;
mod gitsource;
mod job;
mod package;
mod site;

pub use agent::*;
pub use cabinet::*;
pub use gitsource::*;
pub use job::*;
pub use package::*;
pub use site::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The CRDs of every kind, in the order they are documented.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        GitSource::crd(),
        Cabinet::crd(),
        Package::crd(),
        DistributionJob::crd(),
        Site::crd(),
        Agent::crd(),
    ]
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
