use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which packages go to which destinations, and what to do with them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "DistributionJob",
    namespaced,
    status = "DistributionJobStatus",
    shortname = "dj",
    category = "caravan",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Succeeded","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Batch","type":"integer","jsonPath":".status.rollout.batch"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DistributionJobSpec {
    /// Packages the job acts on.
    pub packages: Vec<PackageRef>,
    /// `install` (default) or `uninstall`.
    #[serde(default)]
    pub action: JobAction,
    /// Where the packages go.
    pub destinations: Destinations,
    /// Stop handing the job to agents (what is installed stays).
    #[serde(default)]
    pub suspend: bool,
    /// Put installed files back when they are changed or deleted on an
    /// endpoint (drift is reported either way).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
    /// Allow agents to install a lower version of a package than they have
    /// (a rollback on purpose). Without it an agent refuses a downgrade,
    /// so nobody can push an old, vulnerable version by replaying a job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
    /// Decides between jobs that disagree about a package on one agent
    /// (another version, or install against uninstall): the highest
    /// priority wins, then the newest job (by creation time), then the
    /// first by name. The losing job's destinations are `Conflict`, naming
    /// the winner, on the job and on the Agent.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
    /// How many times an endpoint tries a failed install again (with a
    /// backoff that doubles from the agent's `--retry-after`) before the
    /// destination stays Failed until it is re-run (`retry`). A download
    /// that fails is not counted: it is tried again until it arrives.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Re-run the destinations that failed: raise `generation` (what
    /// `caravan job retry` does) and every destination in scope whose
    /// install failed tries again, with its attempts counted afresh.
    /// Destinations that succeeded are not touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// When the job may act.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<super::Schedule>,
    /// Offer the packages instead of pushing them: an endpoint installs one
    /// when its user asks (`caravan-agent install NAME`, listed by
    /// `caravan-agent available`), and the job counts it; the others are
    /// `Available`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// Let the endpoint's user put a required install off a few times
    /// (`caravan-agent defer JOB`), never past the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferral: Option<Deferral>,
    /// How the job reaches its destinations: in batches, pausing when too
    /// many fail. Without it: gated (one destination, then 10%, then the
    /// rest, pausing when 10% of a batch failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::Rollout>,
}

/// How an endpoint's user may put a required install off.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deferral {
    /// How many times, on each endpoint.
    #[schemars(range(max = 100))]
    pub limit: u32,
    /// How long each time (`4h`, `30m`): a deferral that would end after
    /// the job's deadline is refused, so the deadline still holds.
    #[schemars(length(min = 1, max = 32))]
    pub delay: String,
}

impl Deferral {
    /// The delay, read (positive, at most a week).
    pub fn delay(&self) -> Result<chrono::Duration, String> {
        let bad = |why: String| format!("deferral.delay {:?}: {why}", self.delay);
        let d: jiff::SignedDuration = self
            .delay
            .parse()
            .map_err(|e: jiff::Error| bad(e.to_string()))?;
        if !d.is_positive() || d > jiff::SignedDuration::from_hours(24 * 7) {
            return Err(bad("more than nothing and at most a week".into()));
        }
        chrono::Duration::from_std(d.unsigned_abs()).map_err(|e| bad(e.to_string()))
    }
}

/// The default of `spec.retries`: two more tries after the first.
pub const DEFAULT_RETRIES: u32 = 2;

/// `spec.retries` when a job does not say.
pub fn default_retries() -> u32 {
    DEFAULT_RETRIES
}

fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}

/// A request to re-run a job's failed destinations.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Raise it to re-run: each agent in scope re-runs its failed installs
    /// once for every new value it sees.
    pub generation: u32,
    /// Only the agents of these sites (and of the sites below them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// Only these agents (with `sites`: the agents of either).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
}

/// A package by name, at one version or (without `version`) the highest one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PackageRef {
    /// The package's name (`spec.name` of its Packages).
    pub name: String,
    /// The version to install; without it, the highest the cluster has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl PackageRef {
    /// The package this reference picks from `packages` (those of the
    /// job's namespace): its version, or the highest one.
    pub fn choose<'a, P>(
        &self,
        packages: impl IntoIterator<Item = &'a P>,
        spec: impl Fn(&P) -> &super::PackageSpec,
    ) -> Option<&'a P> {
        packages
            .into_iter()
            .filter(|p| {
                let s = spec(p);
                s.name == self.name && self.version.as_ref().is_none_or(|v| &s.version == v)
            })
            .max_by(|a, b| crate::version::cmp(&spec(a).version, &spec(b).version))
    }
}

#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum JobAction {
    #[default]
    Install,
    Uninstall,
}

/// Destinations are the union of the agents of the listed sites (optionally
/// with every site below them: an "all lower clients" job), the agents
/// matching `agentSelector`, and the agents named in `agents`, less the
/// agents `exclude` names or selects. An agent that enrolls or starts
/// matching later joins the job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destinations {
    /// Sites whose agents get the job (with `includeLower`, the sites below too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteDestination>,
    /// Agents whose labels match this label selector (`matchLabels`, and
    /// `matchExpressions` with `In`, `NotIn`, `Exists`, `DoesNotExist`, as
    /// Kubernetes has them). An empty selector is refused, not "every
    /// agent": name the sites for that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<crate::selector::LabelSelector>,
    /// Agents by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Agents left out, whatever above picks them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<Exclusions>,
}

/// Agents a job leaves out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exclusions {
    /// Agents whose labels match this label selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<crate::selector::LabelSelector>,
    /// Agents by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteDestination {
    /// The Site's name.
    pub name: String,
    /// Also every site below this one, recursively.
    #[serde(default)]
    pub include_lower: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    #[default]
    Pending,
    Progressing,
    Succeeded,
    Failed,
    /// Every destination is settled, and on some another job that takes
    /// precedence has the package (see `spec.priority`).
    Conflict,
    /// Every destination is settled, and some were not done by the deadline.
    Expired,
    /// Every destination is settled, and some have the optional packages on
    /// offer, not chosen (`status.available`).
    Available,
    Suspended,
    /// The rollout paused at its failure threshold (`status.rollout.paused`
    /// says why): the next batch waits for `spec.rollout.resume`.
    Paused,
}

/// Where the job stands at every destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistributionJobStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the job stands as a whole: Pending, Progressing, Paused, Succeeded, Failed, Conflict, Expired…
    #[serde(default)]
    pub phase: JobPhase,
    /// `succeeded/applicable`, for `kubectl get` (destinations NotApplicable
    /// left out).
    #[serde(default)]
    pub progress: String,
    /// Destinations: agents the job is aimed at.
    #[serde(default)]
    pub total: u32,
    /// Destinations with every package of the job as it asks.
    #[serde(default)]
    pub succeeded: u32,
    /// Destinations whose install failed, whether or not it is tried again.
    #[serde(default)]
    pub failed: u32,
    /// Of those, the ones an agent tries again (with backoff, up to
    /// `spec.retries`; a failed download is always tried again): the rest
    /// stay failed until the job is re-run (`spec.retry`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retrying: u32,
    /// Destinations not done yet (waiting, downloading, installing, deferred).
    #[serde(default)]
    pub pending: u32,
    /// Destinations the job's packages are not for (their `os`/`arch`
    /// requirements): the job is complete without them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_applicable: u32,
    /// Destinations where another job that takes precedence has the
    /// package (`spec.priority`): the first is named in the `Ready`
    /// condition, each one on its Agent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conflict: u32,
    /// Destinations not done by `spec.schedule.deadline`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expired: u32,
    /// Of the pending destinations, those with the packages downloaded,
    /// waiting for `spec.schedule.notBefore`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub downloaded: u32,
    /// Of the pending destinations, those downloading a package.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub downloading: u32,
    /// Of the pending destinations, those installing (or removing) a
    /// package.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub installing: u32,
    /// Of the pending destinations, those whose user put the install off
    /// (`spec.deferral`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deferred: u32,
    /// Destinations where an optional job's packages are offered and not
    /// chosen (`spec.optional`): settled, not failed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub available: u32,
    /// Where the rollout stands: the batch under way, whether it paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::RolloutStatus>,
    /// Per-site rollup, by site name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteRollup>,
    /// The first destinations that failed (at most 20, by agent name) and
    /// why, each reason cut at 512 bytes: `failed` counts them all, and each
    /// Agent's status has the whole story, so the job stays small however
    /// many fail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<DestinationFailure>,
    /// The latest observations of the object's state (`Ready`, and the kind's own).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteRollup {
    /// The site's name.
    pub site: String,
    /// Destinations at this site.
    pub total: u32,
    /// Of them, those done.
    pub succeeded: u32,
    /// Of them, those that failed.
    pub failed: u32,
    /// Of them, those not done yet.
    pub pending: u32,
    /// Of them, those the packages are not for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_applicable: u32,
    /// Of them, those another job takes precedence at.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conflict: u32,
    /// Of them, those not done by the deadline.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expired: u32,
    /// Of them, those offered an optional package not chosen.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub available: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most destinations a job's status lists under `failures`.
pub const MAX_FAILURES_LISTED: usize = 20;
/// Longest failure reason a job's status keeps, in bytes.
pub const MAX_FAILURE_REASON_BYTES: usize = 512;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationFailure {
    /// The Agent's name.
    pub agent: String,
    /// Its site.
    pub site: String,
    /// The package that failed there.
    pub package: String,
    /// Why, as the agent reported it (cut at 512 bytes).
    pub reason: String,
    /// When the agent tries again (RFC 3339); none: it gave up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}
