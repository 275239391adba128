//! Prometheus metrics of the controller, served at `/metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// How a GitSource sync ended: the `result` label of `caravan_gitsource_syncs_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SyncResult {
    /// The revision was applied.
    Applied,
    /// Neither the revision nor the objects in the cluster changed: nothing
    /// was applied.
    Unchanged,
    /// The revision was refused (invalid manifests, or the API server refused them).
    Refused,
    /// The repository could not be fetched.
    FetchFailed,
}

impl SyncResult {
    pub const ALL: [Self; 4] = [
        Self::Applied,
        Self::Unchanged,
        Self::Refused,
        Self::FetchFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Refused => "refused",
            Self::FetchFailed => "fetch_failed",
        }
    }
}

impl EncodeLabelValue for SyncResult {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: SyncResult,
}

pub struct Metrics {
    registry: Registry,
    /// GitSource syncs by [`SyncResult`].
    pub git_syncs: Family<ResultLabel, Counter>,
    /// Bytes accepted into the cabinet store.
    pub blob_upload_bytes: Counter,
    /// Bytes of blobs served to relays.
    pub blob_served_bytes: Counter,
    /// Agent reports received from relays.
    pub reports: Counter,
    /// Agent reports refused, by reason (`Replayed`, `NotSigned`, …).
    pub reports_refused: Family<ReasonLabel, Counter>,
    /// Recomputations of desired state and status.
    pub recomputes: Counter,
    /// Agents known to the engine.
    pub agents: Gauge,
    /// Destinations of each job by where they stand.
    pub job_destinations: Family<JobPhaseLabels, Gauge>,
    /// When the commit each GitSource last fetched was made (Unix
    /// seconds): `time() - ` it is how old the revision in Git is.
    pub git_revision_time: Family<SourceLabels, Gauge>,
    /// 1 while this replica leads (reconciles and writes status).
    pub leading: Gauge,
    /// Agents by when they last reported (`5m`, `1h`, `1d`, `older`, `never`).
    pub agents_last_seen: Family<AgeLabel, Gauge>,
    /// Reconciles by kind and result (`ok`, `error`).
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// How long reconciles take, by kind (`Engine`: one recomputation of
    /// every job's, package's and cabinet's status and desired state).
    pub reconcile_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgeLabel {
    /// Seen within: `5m`, `1h`, `1d`; else `older`, or `never`.
    pub within: &'static str,
}

impl AgeLabel {
    /// The label for an agent last seen `age` ago (none: never).
    pub fn of(age: Option<chrono::Duration>) -> Self {
        let within = match age.map(|a| a.num_seconds()) {
            None => "never",
            Some(s) if s <= 300 => "5m",
            Some(s) if s <= 3600 => "1h",
            Some(s) if s <= 86400 => "1d",
            Some(_) => "older",
        };
        Self { within }
    }

    pub const ALL: [&'static str; 5] = ["5m", "1h", "1d", "older", "never"];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

fn reconcile_histogram() -> Histogram {
    // 5 ms to ~40 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobPhaseLabels {
    pub namespace: String,
    pub job: String,
    /// `succeeded`, `failed`, `pending`, `not_applicable`, `conflict`, `expired`.
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

impl Metrics {
    /// Counts one refused agent report.
    pub fn report_refused(&self, reason: &str) {
        self.reports_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    fn report_refused_init(&self, reason: &str) {
        let _ = self.reports_refused.get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        });
    }

    /// Counts one reconcile of a `kind` that took `took`.
    pub fn reconciled(&self, kind: &'static str, took: std::time::Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ReconcileLabels { kind, result })
            .inc();
        self.reconcile_seconds
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
    }

    /// Counts one GitSource sync.
    pub fn git_sync(&self, result: SyncResult) {
        self.git_syncs.get_or_create(&ResultLabel { result }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("caravan");
        let m = Self {
            git_syncs: Family::default(),
            blob_upload_bytes: Counter::default(),
            blob_served_bytes: Counter::default(),
            reports: Counter::default(),
            reports_refused: Family::default(),
            recomputes: Counter::default(),
            agents: Gauge::default(),
            job_destinations: Family::default(),
            git_revision_time: Family::default(),
            leading: Gauge::default(),
            agents_last_seen: Family::default(),
            reconciles: Family::default(),
            reconcile_seconds: Family::new_with_constructor(reconcile_histogram),
            registry: Registry::default(),
        };
        // Series that exist from the start (at 0), so dashboards and alerts
        // see them before the first refusal.
        for reason in ["UnknownAgent", "OtherSite", "Invalid"] {
            m.report_refused_init(reason);
        }
        let results: Vec<&str> = SyncResult::ALL.map(SyncResult::as_str).to_vec();
        registry.register(
            "gitsource_syncs",
            format!("GitSource syncs by result ({})", results.join(", ")),
            m.git_syncs.clone(),
        );
        registry.register(
            "store_upload_bytes",
            "Bytes accepted into the cabinet store",
            m.blob_upload_bytes.clone(),
        );
        registry.register(
            "store_served_bytes",
            "Bytes of blobs served to relays",
            m.blob_served_bytes.clone(),
        );
        registry.register("agent_reports", "Agent reports received", m.reports.clone());
        registry.register(
            "agent_reports_refused",
            "Agent reports refused (not signed by the agent, replayed, another site's), by reason",
            m.reports_refused.clone(),
        );
        registry.register(
            "engine_recomputes",
            "Recomputations of desired state and status",
            m.recomputes.clone(),
        );
        registry.register("agents", "Agents known to the controller", m.agents.clone());
        registry.register(
            "job_destinations",
            "Destinations of each job by phase",
            m.job_destinations.clone(),
        );
        registry.register(
            "gitsource_revision_timestamp_seconds",
            "When the commit each GitSource last fetched was made",
            m.git_revision_time.clone(),
        );
        registry.register(
            "agents_last_seen",
            "Agents by when they last reported",
            m.agents_last_seen.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles by kind and result",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take, by kind",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "leading",
            "1 while this replica leads (reconciles and writes status)",
            m.leading.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_counted_by_how_long_ago_they_reported() {
        let of = |s: Option<i64>| AgeLabel::of(s.map(chrono::Duration::seconds)).within;
        assert_eq!(
            [
                of(Some(10)),
                of(Some(301)),
                of(Some(7200)),
                of(Some(90000)),
                of(None)
            ],
            AgeLabel::ALL
        );
    }

    #[test]
    fn the_sync_help_names_exactly_the_results_the_counter_is_labelled_with() {
        let m = Metrics::default();
        for result in SyncResult::ALL {
            m.git_sync(result);
        }
        let text = m.encode();
        let help = text
            .lines()
            .find(|l| l.starts_with("# HELP caravan_gitsource_syncs"))
            .unwrap();
        let labelled: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("caravan_gitsource_syncs_total{result=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(labelled.len(), SyncResult::ALL.len(), "{text}");
        for result in labelled {
            assert!(help.contains(result), "{help} does not name {result}");
        }
        assert!(!help.contains("invalid"), "{help}");
    }
}
