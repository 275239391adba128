use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Git repository whose Caravan manifests the controller applies to the cluster.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "GitSource",
    namespaced,
    status = "GitSourceStatus",
    shortname = "gs",
    category = "caravan",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.lastAppliedRevision"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GitSourceSpec {
    /// Repository URL (`https://`, `ssh://`, `file://` or a local path).
    pub url: String,
    /// Branch to follow. Ignored when `commit` is set.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Pin to one commit instead of following a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Directory inside the repository holding the manifests.
    #[serde(default = "default_path")]
    pub path: String,
    /// How often to fetch, in seconds.
    #[serde(default = "default_interval")]
    pub interval_seconds: u32,
    /// Delete objects this source applied earlier that are no longer in Git.
    #[serde(default = "default_true")]
    pub prune: bool,
    /// Stop syncing without deleting anything.
    #[serde(default)]
    pub suspend: bool,
    /// Sync as soon as the Git host says it was pushed to, not only every
    /// interval: the host calls `POST /v1/hooks/git/<namespace>/<name>` on
    /// the controller, signed with the secret of this Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// A Secret in the GitSource's namespace whose key `token` is the
    /// webhook's secret (GitHub, Gitea and Forgejo sign the body with it:
    /// `X-Hub-Signature-256`; GitLab sends it: `X-Gitlab-Token`). The
    /// controller uses it only if it carries the label
    /// `caravan.dev/webhook-secret: "true"`.
    pub secret_ref: String,
}

fn default_branch() -> String {
    "main".into()
}
fn default_path() -> String {
    ".".into()
}
fn default_interval() -> u32 {
    60
}
fn default_true() -> bool {
    true
}

/// What was last fetched and applied from the repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSourceStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Commit whose manifests are applied now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_revision: Option<String>,
    /// Last commit fetched, applied or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_revision: Option<String>,
    /// Number of objects applied from the last good revision.
    #[serde(default)]
    pub applied_objects: u32,
    /// Problems found in the last attempted revision, one per file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ManifestError>,
    /// The latest observations of the object's state (`Ready`, and the kind's own).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A manifest problem that kept a revision from being applied.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ManifestError {
    /// Path of the file relative to the repository root.
    pub file: String,
    /// What is wrong, with line and column when known.
    pub message: String,
}
