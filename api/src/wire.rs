//! Wire types of the distribution API (JSON over HTTP), and its URL paths
//! ([`paths`]), used by servers and clients alike.
//!
//! | call | who | body → answer |
//! |---|---|---|
//! | `GET  /v1/site/desired` | relay token | long-poll (`If-None-Match`, `?wait=`) → [`SiteDesired`] |
//! | `POST /v1/site/enroll` | relay token | [`SiteEnroll`] → [`EnrollForward`] |
//! | `POST /v1/site/reports` | relay token | `Vec<`[`Envelope`]`>` of [`AgentReport`] (each signed by its agent) |
//! | `POST /v1/site/stats` | relay token | [`RelayStats`] |
//! | `GET  /v1/blobs/sha256:<hex>` | relay token | blob bytes, `Range` + `If-Range` |
//! | `GET  /v1/uploads/sha256:<hex>` | upload token | → [`UploadState`] |
//! | `PUT  /v1/blobs/sha256:<hex>` | upload token | blob bytes (digest verified; `Content-Range` resumes) |
//! | `GET  /v1/backup` | backup token | → the data of a backup, a tar ([`crate::backup`]) |
//! | `GET  /v1/restore` | backup token | → [`RestoreState`] |
//! | `PUT  /v1/restore` | backup token | the data of a backup, a tar → [`RestoreState`]; then the controller restarts |
//!
//! Relay ⇄ agent (and child relay):
//!
//! | call | who | body → answer |
//! |---|---|---|
//! | `POST /v1/enroll` | a BootstrapToken of the site (checked by the controller) | [`EnrollRequest`] → [`EnrollResponse`] |
//! | `POST /v1/renew` | proof of the agent's key | [`RenewRequest`] → [`EnrollResponse`] |
//! | `GET  /v1/desired` | agent token | long-poll → [`AgentServed`]: an [`Envelope`] of [`AgentDocument`] (signed by the controller) and the lists it names |
//! | `GET  /v1/roots` | agent token | → `Vec<`[`Envelope`]`>` of `trust::Root`, oldest first |
//! | `GET  /v1/blobs/sha256:<hex>` | agent token (its own blobs), child relay token (the lower sites' blobs) | blob bytes, `Range` + `If-Range` |
//! | `POST /v1/report` | agent token | [`Envelope`] of [`AgentReport`] (signed with the agent's key) |
//!
//! Every error answer is [`ErrorBody`]: `{"error": "..."}` naming the problem.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    v1alpha1::{InstallSpec, JobAction},
    Digest,
};

/// Query parameter: how long a long-poll may wait, in seconds.
pub const WAIT_PARAM: &str = "wait";
/// Longest wait a server grants.
pub const MAX_WAIT_SECONDS: u64 = 300;

/// Largest agent desired-state document a client reads.
pub const MAX_AGENT_DESIRED_BYTES: u64 = 16 << 20;
/// Largest site desired-state document a relay reads (about 100,000 agents).
pub const MAX_SITE_DESIRED_BYTES: u64 = 512 << 20;
/// Largest small answer a client reads: enrollment, upload state, errors.
pub const MAX_SMALL_ANSWER_BYTES: u64 = 64 << 10;

/// URL paths of the distribution API: route patterns (axum syntax) for the
/// servers and the functions clients build URLs with, so the two cannot drift.
pub mod paths {
    use crate::Digest;

    /// Liveness of every server.
    pub const HEALTHZ: &str = "/healthz";
    /// Readiness of every server.
    pub const READYZ: &str = "/readyz";
    /// Prometheus metrics of every server.
    pub const METRICS: &str = "/metrics";

    /// Controller: a site's desired state (relay token).
    pub const SITE_DESIRED: &str = "/v1/site/desired";
    /// Controller: an agent's enrollment, passed on by its relay.
    pub const SITE_ENROLL: &str = "/v1/site/enroll";
    /// Controller: agent reports, batched by a relay.
    pub const SITE_REPORTS: &str = "/v1/site/reports";
    /// Controller: a relay's cache figures.
    pub const SITE_STATS: &str = "/v1/site/stats";
    /// Controller: where a blob upload stands (upload token).
    pub const UPLOAD: &str = "/v1/uploads/{digest}";
    /// Controller: the admission webhook for Packages.
    pub const VALIDATE_PACKAGES: &str = "/validate/packages";
    /// Controller: the admission webhook for Cabinets.
    pub const VALIDATE_CABINETS: &str = "/validate/cabinets";
    /// Controller: a Git host's push webhook for one GitSource, authenticated
    /// by HMAC (`X-Hub-Signature-256`) or token (`X-Gitlab-Token`).
    pub const GIT_HOOK: &str = "/v1/hooks/git/{namespace}/{name}";

    /// Relay: enrollment (site bootstrap token).
    pub const ENROLL: &str = "/v1/enroll";
    /// Relay: a new agent credential for proof of the agent's key.
    pub const RENEW: &str = "/v1/renew";
    /// Relay: the agent's own desired state (agent token).
    pub const DESIRED: &str = "/v1/desired";
    /// Controller: the data of a backup (backup token).
    pub const BACKUP: &str = "/v1/backup";
    /// Controller: whether a backup's data may be restored, and the root
    /// the controller signs with (`GET`); the restore itself (`PUT`).
    pub const RESTORE: &str = "/v1/restore";

    /// Relay: the agent's report (agent token).
    pub const REPORT: &str = "/v1/report";
    /// Relay: the controller's roots of trust, oldest first (agent token).
    pub const ROOTS: &str = "/v1/roots";

    /// Controller and relay: a blob by digest (`GET`; `PUT` uploads to the controller).
    pub const BLOB: &str = "/v1/blobs/{digest}";

    /// The path of one blob.
    pub fn blob(digest: &Digest) -> String {
        BLOB.replace("{digest}", &digest.to_string())
    }

    /// The path of one upload's state.
    pub fn upload(digest: &Digest) -> String {
        UPLOAD.replace("{digest}", &digest.to_string())
    }

    /// A long-poll of `path` that may wait `wait` seconds.
    pub fn poll(path: &str, wait: u64) -> String {
        format!("{path}?{}={wait}", super::WAIT_PARAM)
    }

    /// A relay's long-poll of its site's desired state that takes answers
    /// as changes since the revision it holds ([`super::SiteDesired::since`]).
    pub fn site_desired_poll(wait: u64) -> String {
        format!("{}&{}=true", poll(SITE_DESIRED, wait), super::DELTAS_PARAM)
    }
}

/// Query parameter: the relay applies answers that hold only what changed
/// since the revision it names in `If-None-Match` (a relay that does not ask
/// always gets the whole desired state).
pub const DELTAS_PARAM: &str = "deltas";
/// Most removed agents a site's feed remembers for answers of changes: a
/// relay further behind gets the whole desired state.
pub const MAX_REMOVALS_KEPT: usize = 4096;

/// One package an agent must have installed (or removed) for one job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// `<namespace>/<job name>`.
    pub job: String,
    pub action: JobAction,
    pub package: String,
    pub version: String,
    /// The artifact.
    pub digest: Digest,
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
    /// The job allows installing a lower version than the one installed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
    /// How many times a failed install is tried again before it stays
    /// Failed (the job's `spec.retries`).
    #[serde(default = "crate::v1alpha1::default_retries")]
    pub retries: u32,
    /// The job's retry generation (`spec.retry.generation`): a value other
    /// than the one an install's failures were counted under re-runs it,
    /// with its attempts counted afresh…
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_generation: u32,
    /// …unless the job's retry does not reach this agent (its `sites` and
    /// `agents`): then the new generation is only recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry_excluded: bool,
    /// Another job that takes precedence has this package on the agent
    /// (`<namespace>/<job name>`): nothing is done for this assignment, and
    /// the agent reports it as `Conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
    /// The job's schedule (`notBefore`, `deadline`): the agent downloads
    /// before its start, installs (or removes) only from it on, and starts
    /// nothing after its deadline (reporting `Expired`).
    #[serde(default, flatten)]
    pub schedule: crate::v1alpha1::Schedule,
    /// Offered, not pushed: installed only once the endpoint's user chose
    /// it (`caravan-agent install NAME`); until then `Available`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// How the endpoint's user may put this install off
    /// (`caravan-agent defer JOB`), if at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferral: Option<crate::v1alpha1::Deferral>,
    /// Installed for these packages of the job, which require it
    /// (`install.requires`), rather than named by the job; an optional
    /// job's dependency installs once one of them is chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_by: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Assignment {
    /// The package metadata a release signature of this assignment covers.
    pub fn signed(&self) -> crate::signing::Signed<'_> {
        crate::signing::Signed {
            name: &self.package,
            version: &self.version,
            digest: &self.digest,
            size: self.size,
            install: &self.install,
        }
    }
}

/// Everything assigned to one agent, as the agent acts on it: its signed
/// [`AgentDocument`] with the assignment lists it names put in, each
/// verified against its digest (`trust::verify_desired`).
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
    /// Increases with every change (the controller's clock, in
    /// milliseconds): an agent refuses a document older than one it accepted.
    #[serde(default)]
    pub version: u64,
    /// RFC 3339 time after which the document is not acted on; the
    /// controller signs it anew well before (see the `trust` module).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expires: String,
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

/// What the controller signs for one agent: its [`AgentDesired`] with the
/// assignments named by the digests of their lists rather than carried. A
/// job's list is the same for most of its agents: it is made once, kept
/// once by each relay, and a change that reaches every agent of a site
/// re-signs a few hundred bytes per agent, not every assignment. A field
/// the agent does not know is refused, not skipped: it could mean
/// something the agent would ignore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentDocument {
    pub agent: String,
    /// The agent's assignments: the lists ([`AssignmentList`]) with these
    /// digests, in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lists: Vec<Digest>,
    /// As in [`AgentDesired`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold: Vec<String>,
    /// As in [`AgentDesired`].
    #[serde(default)]
    pub frozen: bool,
    /// As in [`AgentDesired`].
    #[serde(default)]
    pub version: u64,
    /// As in [`AgentDesired`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expires: String,
}

/// A list of assignments (`[Assignment]` in JSON) as sent: the exact bytes
/// whose sha256 is the digest that names it, passed on by relays untouched.
#[derive(Clone, Debug)]
pub struct AssignmentList(std::sync::Arc<serde_json::value::RawValue>);

impl AssignmentList {
    /// The list as sent, and its digest.
    pub fn new(list: &[Assignment]) -> (Digest, Self) {
        let json = serde_json::to_string(list).expect("wire types serialize");
        let digest = Digest::of(json.as_bytes());
        let raw = serde_json::value::RawValue::from_string(json).expect("serialized as JSON");
        (digest, Self(raw.into()))
    }

    /// The bytes the digest is of.
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// The list, if these bytes are the list named `digest`.
    pub fn open(&self, digest: &Digest) -> Result<Vec<Assignment>, ListError> {
        if Digest::of(self.json().as_bytes()) != *digest {
            return Err(ListError::Tampered);
        }
        serde_json::from_str(self.json()).map_err(|e| ListError::Malformed(e.to_string()))
    }
}

/// Why an [`AssignmentList`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("its bytes do not hash to its digest")]
    Tampered,
    #[error("not a list of assignments: {0}")]
    Malformed(String),
}

impl PartialEq for AssignmentList {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Eq for AssignmentList {}

impl Serialize for AssignmentList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for AssignmentList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(|raw| Self(raw.into()))
    }
}

/// An agent's desired state as its relay serves it (`GET /v1/desired`):
/// the document the controller signed for the agent, and the assignment
/// lists it names, which the agent checks against their digests. (A relay
/// writes it from the parts it keeps: `D` and `L` as borrowed there.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentServed<D = Envelope, L = BTreeMap<Digest, AssignmentList>> {
    /// An [`Envelope`] of the agent's [`AgentDocument`].
    pub document: D,
    /// The lists by digest.
    #[serde(default)]
    pub lists: L,
}

/// What every agent of one site must have, keyed by agent name: each
/// agent's [`AgentDocument`] signed by the controller (`A` = [`Envelope`]),
/// as served, and the assignment lists they name; the controller's index
/// computes it unsigned first.
///
/// To a relay that asks for them ([`DELTAS_PARAM`]) and holds an earlier
/// revision, the controller answers with changes: `since` names the revision
/// they apply to, `agents` and `agent_keys` hold only the agents whose
/// document or key changed (an agent's entry is replaced whole), `lists`
/// the lists their documents name, `removed` the agents no longer served;
/// every other field is whole. A relay keeps the lists its agents'
/// documents name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SiteDesired<A = Envelope> {
    pub site: String,
    pub agents: BTreeMap<String, A>,
    /// The assignment lists the agents' documents name, each once (in an
    /// answer of changes: those the changed agents' documents name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lists: BTreeMap<Digest, AssignmentList>,
    /// Every blob assigned to the site's agents (the relay need not open
    /// the signed documents to know what to keep).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<Digest>,
    /// Blobs of the jobs aimed at this site, enrolled agents or not: the
    /// relay fetches them ahead of time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prestage: Vec<Digest>,
    /// Blobs the sites below this one need: their relays fetch them from
    /// this site's relay, so each blob crosses each link once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower: Vec<Digest>,
    /// The controller's roots of trust, oldest first, which the relay hands
    /// to its agents (`GET /v1/roots`): each signed by the one before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<Envelope>,
    /// The public key (`ed25519:<base64>`) of each served agent that has
    /// one: the relay renews an agent's credential for proof it holds it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_keys: BTreeMap<String, String>,
    /// The agents enrolled at this site that are not served (awaiting
    /// approval, or revoked), in name order and whole in every answer: the
    /// relay tells them apart from agents it does not know, whose Agent was
    /// deleted (those are told to enroll again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unserved: Vec<String>,
    /// Blobs the relay fetches from an OCI registry rather than from its
    /// upstream (those of `oci` cabinets whose layers come from relays;
    /// only in the documents of top-level sites).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<Digest, BlobSource>,
    /// An answer of changes: the revision (ETag) they apply to. None: the
    /// whole desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// In an answer of changes: the agents no longer served since `since`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// Where in an OCI registry a relay fetches a blob.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BlobSource {
    /// The package's repository (`https://host[:port]/name`); the blob is
    /// its layer, fetched by digest (and verified against it).
    pub repository: String,
    /// The blob's size: the registry's answer must be this long.
    pub size: u64,
    /// PEM certificates of the CAs trusted alone for the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

impl<A> Default for SiteDesired<A> {
    fn default() -> Self {
        Self {
            site: String::new(),
            agents: BTreeMap::new(),
            lists: BTreeMap::new(),
            blobs: vec![],
            prestage: vec![],
            lower: vec![],
            agent_keys: BTreeMap::new(),
            unserved: vec![],
            roots: vec![],
            sources: BTreeMap::new(),
            since: None,
            removed: vec![],
        }
    }
}

impl<A> SiteDesired<A> {
    /// Every blob the site's relay keeps: its agents', its jobs' and its lower sites'.
    pub fn all_digests(&self) -> impl Iterator<Item = &Digest> {
        self.blobs.iter().chain(&self.prestage).chain(&self.lower)
    }

    /// The same desired state with each agent's part made by `f` from its
    /// name, its part and its key (if it has one).
    pub fn map_agents<B>(self, mut f: impl FnMut(&str, A, Option<&String>) -> B) -> SiteDesired<B> {
        let agents = self
            .agents
            .into_iter()
            .map(|(name, a)| {
                let b = f(&name, a, self.agent_keys.get(&name));
                (name, b)
            })
            .collect();
        SiteDesired {
            site: self.site,
            agents,
            lists: self.lists,
            blobs: self.blobs,
            prestage: self.prestage,
            lower: self.lower,
            roots: self.roots,
            agent_keys: self.agent_keys,
            unserved: self.unserved,
            sources: self.sources,
            since: self.since,
            removed: self.removed,
        }
    }
}

/// What an agent says about itself when it enrolls.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
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
    /// The public half (`ed25519:<base64>`) of a key pair the agent made at
    /// enrollment; the private half never leaves the endpoint. The agent
    /// renews its short-lived credential by signing with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
    /// Proof that the agent holds the key its identity enrolled with before
    /// (`caravan_net::agent_tokens::enrollment_message`, signed with that
    /// key): an identity that has a key changes site or key only with it,
    /// so the host secret alone (which a relay sees) is not enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<KeyProof>,
    /// What the agent says about its endpoint (the Agent's labels).
    #[serde(default)]
    pub facts: crate::facts::Facts,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("host_id", &self.host_id)
            .field("hostname", &self.hostname)
            .field("os", &self.os)
            .field("arch", &self.arch)
            .field("version", &self.version)
            .field("secret", &"<redacted>")
            .field("public_key", &self.public_key)
            .field("proof", &self.proof)
            .field("facts", &self.facts)
            .finish()
    }
}

/// A signature with an agent's key over a message that names the time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyProof {
    /// Seconds since the Unix epoch when the agent signed.
    pub time: u64,
    /// base64 of the ed25519 signature.
    pub signature: String,
}

/// An agent renewing its credential: its name, the time (seconds since the
/// Unix epoch) and its signature over both with the key it enrolled
/// (`caravan_net::agent_tokens::renewal_message`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    pub agent: String,
    pub time: u64,
    /// base64 of the ed25519 signature.
    pub signature: String,
}

/// An enrollment as a relay passes it on: the agent's request and the
/// bootstrap token it presented, which only the controller checks.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SiteEnroll {
    pub bootstrap_token: String,
    pub request: EnrollRequest,
}

impl std::fmt::Debug for SiteEnroll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteEnroll")
            .field("bootstrap_token", &"<redacted>")
            .field("request", &self.request)
            .finish()
    }
}

/// The controller's answer to an enrollment the relay passed on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollForward {
    /// Name of the Agent object (new or existing for this host ID).
    pub agent: String,
    /// Whether the Agent is approved (else it awaits `caravan agent approve`).
    #[serde(default = "approved")]
    pub approved: bool,
}

fn approved() -> bool {
    true
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
    /// The package's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The digest of the artifact installed.
    pub digest: Digest,
    /// Found present by the package's detection rules, not installed by
    /// Caravan (which will not remove it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detected: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AssignmentPhase {
    Pending,
    Downloading,
    Installing,
    Removing,
    Succeeded,
    Failed,
    /// The endpoint does not meet the package's `os`/`arch` requirements:
    /// nothing to do here, and the job is complete without it.
    NotApplicable,
    /// Another job that takes precedence has the package on this agent.
    Conflict,
    /// Downloaded and verified, waiting for the job's `notBefore`.
    Downloaded,
    /// Not done by the job's deadline: nothing more is started for it.
    Expired,
    /// Offered by an optional job, not chosen on the endpoint.
    Available,
    /// Put off by the endpoint's user (`caravan-agent defer`), until a time.
    Deferred,
    /// A phase a newer agent reports that this version does not know:
    /// taken as not done yet, so its report still counts.
    #[serde(other)]
    Unknown,
}

/// Where one assignment stands on one agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobState {
    /// `<namespace>/<job name>`.
    pub job: String,
    /// The package the assignment is about.
    pub package: String,
    /// Digest of the artifact this state is about; state for another digest
    /// (an older version) does not count for the job.
    pub digest: Digest,
    /// What the job asks: install or uninstall.
    pub action: JobAction,
    /// Where it stands on the endpoint.
    pub phase: AssignmentPhase,
    /// What happened last, in words (an error names its cause).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time of the last transition.
    pub time: String,
    /// Installs tried and failed (counted afresh on a retry generation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// A failed install is tried again at this RFC 3339 time; a Failed
    /// state without it is final until the job is re-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

impl JobState {
    /// The phase, and for a failure how often it was tried and whether it
    /// will be again, then the message: how the agent's `status` and
    /// `caravan job status` show it.
    pub fn summary(&self) -> String {
        let phase = match (self.phase, &self.retry_at) {
            (AssignmentPhase::Failed, Some(at)) if self.attempts == 0 => {
                format!("Failed (tried again at {at})")
            }
            (AssignmentPhase::Failed, Some(at)) => {
                format!("Failed {} time(s) (tried again at {at})", self.attempts)
            }
            (AssignmentPhase::Failed, None) => format!(
                "Failed {} time(s) (re-run it with `caravan job retry`)",
                self.attempts
            ),
            (phase, _) => format!("{phase:?}"),
        };
        match self.message.lines().last() {
            Some(last) => format!("{phase}: {last}"),
            None => phase,
        }
    }
}

/// An agent's full state, sent at every transition, signed with the
/// agent's key (`trust::sign_report`). The latest one wins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// The agent's name (its credential's); relays refuse a report whose
    /// name is not that of the agent sending it.
    pub agent: String,
    /// Grows with every report the agent sends (milliseconds since the Unix
    /// epoch, or one more than the last): the controller takes a report
    /// only if it is above the last one taken, so none can be replayed.
    #[serde(default)]
    pub sequence: u64,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub installed: Vec<InstalledPackage>,
    pub jobs: Vec<JobState>,
    /// Files of installed packages changed, deleted or added on the
    /// endpoint since they were installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<Drift>,
    /// Version of the signed desired state the agent acts on (none yet: 0).
    #[serde(default)]
    pub desired_version: u64,
    /// Why the agent refuses the desired state it was last served, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_refused: Option<Refusal>,
    /// What the agent says about its endpoint (kept on the Agent as labels).
    #[serde(default)]
    pub facts: crate::facts::Facts,
}

/// Why an agent refuses its desired state (see `trust::TrustError`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// One word: `NotSigned`, `Rollback`, `Expired`, …
    pub reason: String,
    pub message: String,
}

/// Most drifted files an agent reports (the count says how many there are).
pub const MAX_DRIFT_REPORTED: usize = 50;

/// A file of an installed package that is no longer as installed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    /// The package whose files changed.
    pub package: String,
    /// Path inside the package.
    pub path: String,
    /// How the file changed: modified, missing, or its mode.
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
    /// Requests the cache answered since the relay started.
    pub cache_hits: u64,
    /// Requests that had to be fetched upstream since the relay started.
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

/// A signed document (DSSE v1); signing and verifying are in the `trust`
/// module.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Base64 of the payload bytes.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeSignature {
    /// [`crate::signing::key_id`] of the key.
    pub keyid: String,
    /// Base64 ed25519 signature of the pre-authentication encoding.
    pub sig: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_from_a_newer_agent_does_not_make_its_report_unreadable() {
        let phase: AssignmentPhase = serde_json::from_str("\"Hibernating\"").unwrap();
        assert_eq!(phase, AssignmentPhase::Unknown);
    }

    #[test]
    fn client_paths_match_the_server_routes() {
        let d = Digest::of(b"x");
        let route = |pattern: &str, path: &str| {
            let (head, tail) = pattern.split_once("{digest}").unwrap();
            path.strip_prefix(head)
                .and_then(|p| p.strip_suffix(tail))
                .map(str::to_owned)
        };
        assert_eq!(route(paths::BLOB, &paths::blob(&d)), Some(d.to_string()));
        assert_eq!(
            route(paths::UPLOAD, &paths::upload(&d)),
            Some(d.to_string())
        );
        assert_eq!(
            paths::poll(paths::DESIRED, 30),
            format!("/v1/desired?{WAIT_PARAM}=30")
        );
    }
}
