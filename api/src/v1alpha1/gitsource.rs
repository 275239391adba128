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
    /// Repository URL: `https://…`, `ssh://…` or `user@host:path`; `file://`
    /// or a local path only beneath a directory the controller allows.
    pub url: String,
    /// Which revision to apply: a branch (the default, `main`), a tag, the
    /// highest tag in a semver range, or one commit.
    #[serde(default, rename = "ref")]
    pub reference: GitRef,
    /// Directory inside the repository holding the manifests.
    #[serde(default = "default_path")]
    pub path: String,
    /// How often to fetch, in seconds.
    #[serde(default = "default_interval")]
    pub interval_seconds: u32,
    /// Longest a fetch may take, in seconds; a slower one fails (and is
    /// retried).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    /// Delete objects this source applied earlier that are no longer in Git.
    #[serde(default = "default_true")]
    pub prune: bool,
    /// Stop syncing without deleting anything.
    #[serde(default)]
    pub suspend: bool,
    /// A Secret in the GitSource's namespace with what the Git host asks
    /// for: `username` and `password` (a token goes in `password`) for
    /// HTTPS, `identity` (an OpenSSH private key) and `known_hosts` for SSH,
    /// and `ca.crt` for an HTTPS host whose certificate a private CA signed;
    /// `host` (`host[:port]`) binds it to that host whatever `url` says.
    /// The controller uses it only if it carries the label
    /// `caravan.dev/git-credentials: "true"`, and sends the password only to
    /// the host in `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// Apply only commits signed by one of these keys; an unsigned commit,
    /// or one signed by another key, is refused and the last good revision
    /// stays applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
    /// Sync as soon as the Git host says it was pushed to, not only every
    /// interval: the host calls `POST /v1/hooks/git/<namespace>/<name>` on
    /// the controller, signed with the secret of this Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

/// A revision of the repository. The first of `commit`, `semver`, `tag`
/// that is set wins; otherwise the tip of `branch`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitRef {
    /// Branch to follow (and, with `commit`, the branch the commit is on).
    #[serde(default = "default_branch")]
    pub branch: String,
    /// A tag; a tag that moves is followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// A semver range (e.g. `>=1.2, <2`): the highest tag in it (a leading
    /// `v` is ignored) is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semver: Option<String>,
    /// One commit (its full id) on `branch`: nothing else is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

impl Default for GitRef {
    fn default() -> Self {
        Self {
            branch: default_branch(),
            tag: None,
            semver: None,
            commit: None,
        }
    }
}

/// Where a Git host's push webhook is checked.
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

/// Which signatures a revision must carry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// A Secret in the GitSource's namespace whose every value holds SSH
    /// public keys, one per line (`ssh-ed25519 AAAA… comment`, as in
    /// `allowed_signers` without the principal): the commit applied must be
    /// signed by one of them (`git config gpg.format ssh`). Used only if it
    /// carries the label `caravan.dev/git-credentials: "true"`.
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
fn default_timeout() -> u32 {
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
    /// The ref the applied revision was found at (`branch main`, `tag
    /// v1.4.0`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_ref: Option<String>,
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
