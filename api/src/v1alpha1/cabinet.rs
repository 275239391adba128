use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where package blobs are stored.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Cabinet",
    namespaced,
    status = "CabinetStatus",
    shortname = "cab",
    category = "caravan",
    printcolumn = r#"{"name":"Store","type":"string","jsonPath":".spec.store.type"}"#,
    printcolumn = r#"{"name":"Packages","type":"integer","jsonPath":".status.packages"}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".status.bytes"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CabinetSpec {
    /// The storage backend.
    #[serde(default)]
    pub store: CabinetStore,
    /// Human description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Public keys whose signatures this cabinet's packages may carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<TrustedKey>,
    /// Every package of this cabinet must be signed by a trusted key; agents
    /// refuse one that is not (checked against the agents' own keys).
    #[serde(default)]
    pub require_signatures: bool,
}

/// A signing key a cabinet trusts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustedKey {
    /// A name for people (who holds the key).
    pub name: String,
    /// `ed25519:<base64>`, as `caravan key generate` writes it.
    pub public_key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CabinetStore {
    /// `builtin`: the controller's content-addressed store (`caravan package
    /// push` uploads into it). `http`: a read-only HTTP(S) server holding
    /// each artifact at `<url>/sha256/<hex digest>`; the controller fetches
    /// it once, verifies size and digest, and serves it from its store.
    /// `oci`: a repository of an OCI registry (`caravan package push`
    /// pushes each package there as an artifact tagged with its version);
    /// the controller fetches the manifest the Package pins and its layer,
    /// verified, and serves it from its store.
    #[serde(rename = "type")]
    pub type_: StoreType,
    /// Base URL of an `http` store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The repository of an `oci` store: `[https://]host[:port]/name`
    /// (`http://` only for a registry without TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// A Secret in the cabinet's namespace with the controller's (pull)
    /// credentials for an `oci` store: `registry` (the `host[:port]` they
    /// are for, which must be the repository's), and `username` and
    /// `password`, or `token`. It must carry the label
    /// `caravan.dev/registry-credentials: "true"`. Without it, the
    /// registry is read anonymously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// PEM certificates of the CAs that sign the registry's certificate,
    /// trusted alone for it (instead of the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Who fetches an `oci` store's layers. `Controller` (the default): the
    /// controller fetches each into its store and relays fetch it from
    /// there. `Relays`: the controller only checks the pinned manifest; the
    /// relay of each top-level site fetches the layer from the registry
    /// itself (signed in with its own `--registry-auth-file`, verified as it
    /// arrives), so no layer passes through the controller, and child sites
    /// fetch it from their parent's relay as always.
    #[serde(default, skip_serializing_if = "is_default")]
    pub layers_from: LayersFrom,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Who fetches an `oci` store's layers from the registry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LayersFrom {
    #[default]
    Controller,
    Relays,
}

impl Default for CabinetStore {
    fn default() -> Self {
        Self {
            type_: StoreType::Builtin,
            url: None,
            repository: None,
            credentials_secret: None,
            ca_bundle: None,
            layers_from: LayersFrom::Controller,
        }
    }
}

impl CabinetStore {
    /// Where an `http` or `oci` store keeps the artifact of package `name`
    /// with this digest (for an `oci` store, as
    /// `<repository>/<name>@<digest>`).
    pub fn artifact_url(&self, name: &str, digest: &crate::Digest) -> Option<String> {
        match self.type_ {
            StoreType::Http => self
                .url
                .as_ref()
                .map(|u| format!("{}/sha256/{}", u.trim_end_matches('/'), digest.hex())),
            StoreType::Oci => self
                .repository
                .as_ref()
                .map(|r| format!("{}/{name}@{digest}", r.trim_end_matches('/'))),
            StoreType::Builtin => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreType {
    Builtin,
    Http,
    Oci,
}

/// What the cabinet holds and whether its store works.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CabinetStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Packages stored in this cabinet.
    #[serde(default)]
    pub packages: u32,
    /// Total size of their artifacts.
    #[serde(default)]
    pub bytes: u64,
    /// The latest observations of the object's state (`Ready`, and the kind's own).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
