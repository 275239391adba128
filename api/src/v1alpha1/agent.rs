use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::{InstalledPackage, JobState};

/// One enrolled endpoint. Created by the controller when an agent enrolls.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    status = "AgentStatus",
    shortname = "ag",
    category = "caravan",
    printcolumn = r#"{"name":"Site","type":"string","jsonPath":".spec.site"}"#,
    printcolumn = r#"{"name":"Hostname","type":"string","jsonPath":".spec.hostname"}"#,
    printcolumn = r#"{"name":"Approved","type":"boolean","jsonPath":".spec.approved"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Installed","type":"integer","jsonPath":".status.installedCount"}"#,
    printcolumn = r#"{"name":"Desired","type":"string","jsonPath":".status.conditions[?(@.type==\"DesiredStateAccepted\")].reason"}"#,
    printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
    printcolumn = r#"{"name":"Stale","type":"string","jsonPath":".status.conditions[?(@.type==\"Stale\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Site the agent enrolled at.
    pub site: String,
    /// Stable host identity, kept in the agent's state directory.
    pub host_id: String,
    /// The endpoint's host name, as it enrolled.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// Only approved agents are served: one that is not (a new agent of a
    /// Site with `enrollment.requireApproval`, or one revoked with `caravan
    /// agent revoke`) is turned away by its relay at its next request and
    /// keeps what it has installed. Set with `caravan agent approve`.
    #[serde(default = "yes")]
    pub approved: bool,
    /// sha256 of the secret the agent enrolled with (empty for an Agent
    /// declared ahead of its enrollment: the first to enroll claims it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_hash: String,
    /// Public key (`ed25519:<base64>`) the agent made at enrollment. Its
    /// relay renews the agent's short-lived credential for proof that the
    /// agent holds the private half, which never leaves the endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
    /// A machine that enrolled under this host ID with another secret: the
    /// same machine reinstalled (its host ID derived from its hardware,
    /// its secret gone with the old disk), or another claiming the
    /// identity. It takes the Agent over only once approved (`caravan agent
    /// approve`); until then the Agent's machine goes on as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<Replacement>,
}

/// A machine asking to take an Agent over (`spec.replacement`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replacement {
    /// sha256 of the secret it enrolled with.
    pub secret_hash: String,
    /// Its public key (`ed25519:<base64>`).
    pub public_key: String,
    /// The host name it enrolled with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// When it asked (RFC 3339).
    pub requested: String,
}

fn yes() -> bool {
    true
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What the agent last reported, and what the controller found of it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Agent software version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Operating system (`linux`, `windows`, `macos`), as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// CPU architecture (`x86_64`, `aarch64`), as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Last report received (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// How many packages are installed (or found present).
    #[serde(default)]
    pub installed_count: u32,
    /// The packages installed (or found present), as last reported.
    #[serde(default)]
    pub installed: Vec<InstalledPackage>,
    /// State of each job assignment, as last reported.
    #[serde(default)]
    pub jobs: Vec<JobState>,
    /// Files of installed packages changed on the endpoint (first 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<crate::wire::Drift>,
    /// How many files have drifted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drifted_files: u32,
    /// Version of the signed desired state the agent acts on (the
    /// controller's signing clock, in milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<u64>,
    /// Sequence of the last report taken from the agent (signed by it); an
    /// older or equal one is refused as a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_sequence: Option<u64>,
    /// The latest observations of the object's state (`Ready`, and the kind's own).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
