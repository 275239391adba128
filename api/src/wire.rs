//! Wire types of the distribution API (JSON over HTTP).
//!
//! Controller ⇄ relay:
//! - `GET  /v1/site/desired` (relay token): [`SiteDesired`], long-poll with `If-None-Match`.
//! - `POST /v1/site/enroll` (relay token): [`EnrollRequest`] → [`EnrollForward`].
//! - `POST /v1/site/reports` (relay token): `Vec<AgentReport>`.
//! - `POST /v1/site/stats` (relay token): [`RelayStats`].
//! - `GET  /v1/blobs/sha256:<hex>` (relay token): blob bytes, `Range` supported.
//! - `GET  /v1/uploads/sha256:<hex>` (upload token): [`UploadState`].
//! - `PUT  /v1/blobs/sha256:<hex>` (upload token): store a blob; the digest is
//!   verified; `Content-Range` continues an interrupted upload.
//!
//! Relay ⇄ agent:
//! - `POST /v1/enroll` (site bootstrap token): [`EnrollRequest`] → [`EnrollResponse`].
//! - `GET  /v1/desired` (agent token): [`AgentDesired`], long-poll with `If-None-Match`.
//! - `GET  /v1/blobs/sha256:<hex>` (agent token): only blobs assigned to the agent.
//! - `POST /v1/report` (agent token): [`AgentReport`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::v1alpha1::{InstallSpec, JobAction};

/// Query parameter: how long a long-poll may wait, in seconds.
pub const WAIT_PARAM: &str = "wait";
/// Longest wait a server grants.
pub const MAX_WAIT_SECONDS: u64 = 300;

/// One package an agent must have installed (or removed) for one job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// `<namespace>/<job name>`.
    pub job: String,
    pub action: JobAction,
    pub package: String,
    pub version: String,
    /// `sha256:<hex>` of the artifact.
    pub digest: String,
    pub size: u64,
    pub install: InstallSpec,
    /// The package's signatures, checked by the agent against its own keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<crate::signing::PackageSignature>,
    /// The package's cabinet requires a valid signature.
    #[serde(default)]
    pub require_signature: bool,
    /// Put the package's files back when they drift (see [`Drift`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
}

/// Everything assigned to one agent.
///
/// An agent removes a package it installed only when no assignment installs
/// it and it is not held: a suspended job, or a job whose package reference
/// does not resolve (a typo in Git), holds its packages instead of removing
/// them from the fleet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentDesired {
    pub agent: String,
    pub assignments: Vec<Assignment>,
    /// Package names to leave as they are: neither installed nor removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold: Vec<String>,
    /// Change nothing at all (the agent is not approved, or not known yet).
    #[serde(default)]
    pub frozen: bool,
}

impl AgentDesired {
    /// The state of an agent the controller has not described (yet).
    pub fn frozen(agent: &str) -> Self {
        Self {
            agent: agent.to_string(),
            frozen: true,
            ..Default::default()
        }
    }
}

/// What every agent of one site must have, keyed by agent name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SiteDesired {
    pub site: String,
    pub agents: BTreeMap<String, AgentDesired>,
    /// Blobs of the jobs aimed at this site, enrolled agents or not: the
    /// relay fetches them ahead of time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prestage: Vec<String>,
    /// Blobs the sites below this one need: their relays fetch them from
    /// this site's relay, so each blob crosses each link once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower: Vec<String>,
}

impl SiteDesired {
    /// Every blob digest the site's agents need.
    pub fn digests(&self) -> impl Iterator<Item = &str> {
        self.agents
            .values()
            .flat_map(|a| &a.assignments)
            .map(|a| a.digest.as_str())
    }

    /// Every blob the site's relay keeps: its agents', its jobs' and its lower sites'.
    pub fn all_digests(&self) -> impl Iterator<Item = &str> {
        self.digests()
            .chain(self.prestage.iter().map(String::as_str))
            .chain(self.lower.iter().map(String::as_str))
    }
}

/// What an agent says about itself when it enrolls.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub host_id: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub version: String,
    /// A random secret the agent generated at its first enrollment and keeps
    /// (with its host ID) in its state directory; re-enrolling the same host
    /// ID requires it, so nobody else can take over an enrolled identity.
    pub secret: String,
}

/// The controller's answer to an enrollment the relay passed on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollForward {
    /// Name of the Agent object (new or existing for this host ID).
    pub agent: String,
}

/// The relay's answer to an agent's enrollment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub agent: String,
    /// Credential for every later request (`Authorization: Bearer`).
    pub token: String,
}

/// A package the agent has installed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstalledPackage {
    pub name: String,
    pub version: String,
    pub digest: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AssignmentPhase {
    Pending,
    Downloading,
    Installing,
    Removing,
    Succeeded,
    Failed,
}

/// Where one assignment stands on one agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobState {
    /// `<namespace>/<job name>`.
    pub job: String,
    pub package: String,
    /// Digest of the artifact this state is about; state for another digest
    /// (an older version) does not count for the job.
    pub digest: String,
    pub action: JobAction,
    pub phase: AssignmentPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time of the last transition.
    pub time: String,
}

/// An agent's full state, sent at every transition. The latest one wins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// Filled in by the relay from the agent's credential.
    #[serde(default)]
    pub agent: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub installed: Vec<InstalledPackage>,
    pub jobs: Vec<JobState>,
    /// Files of installed packages changed, deleted or added on the
    /// endpoint since they were installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<Drift>,
}

/// Most drifted files an agent reports (the count says how many there are).
pub const MAX_DRIFT_REPORTED: usize = 50;

/// A file of an installed package that is no longer as installed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    pub package: String,
    /// Path inside the package.
    pub path: String,
    pub change: DriftChange,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum DriftChange {
    Modified,
    Deleted,
    Added,
}

/// What a relay tells the controller about its cache (`POST /v1/site/stats`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayStats {
    /// Bytes of blobs in the cache now.
    pub cache_bytes: u64,
    /// Bytes fetched from upstream since the relay started.
    pub upstream_bytes: u64,
    /// Bytes served to agents and child relays since the relay started.
    pub served_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// Where the upload of a blob stands (`GET /v1/uploads/sha256:<hex>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadState {
    /// The blob is in the store.
    pub complete: bool,
    /// Bytes stored: the whole blob, or the part of an interrupted upload.
    pub offset: u64,
}

/// Error body of every Caravan HTTP API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}
