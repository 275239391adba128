use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A piece of software and how to install it. Its artifact lives in a cabinet.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Package",
    namespaced,
    status = "PackageStatus",
    shortname = "pkg",
    category = "caravan",
    printcolumn = r#"{"name":"Package","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
    printcolumn = r#"{"name":"Cabinet","type":"string","jsonPath":".spec.cabinet"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.artifact.size"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PackageSpec {
    /// Cabinet holding the artifact. A package cannot move to another cabinet.
    pub cabinet: String,
    /// Package name, as jobs refer to it.
    pub name: String,
    /// Package version.
    pub version: String,
    /// The packed artifact.
    pub artifact: Artifact,
    /// How agents install it.
    #[serde(default)]
    pub install: InstallSpec,
    /// Signatures over name, version and digest (`caravan package sign`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<crate::signing::PackageSignature>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// `sha256:<64 hex digits>` of the artifact.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallSpec {
    /// `archive`: extract into `<install root>/<package name>`.
    #[serde(default)]
    pub method: InstallMethod,
}

impl Default for InstallSpec {
    fn default() -> Self {
        Self {
            method: InstallMethod::Archive,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum InstallMethod {
    #[default]
    Archive,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The artifact is present in its cabinet with the declared digest and size.
    #[serde(default)]
    pub artifact_available: bool,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Whether `digest` has the form `sha256:<64 lowercase hex>`; returns the hex part.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}
