//! Prometheus metrics of the controller, served at `/metrics`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// GitSource syncs by result (`applied`, `invalid`, `fetch_failed`).
    pub git_syncs: Family<ResultLabel, Counter>,
    /// Bytes accepted into the cabinet store.
    pub blob_upload_bytes: Counter,
    /// Bytes of blobs served to relays.
    pub blob_served_bytes: Counter,
    /// Agent reports received from relays.
    pub reports: Counter,
    /// Recomputations of desired state and status.
    pub recomputes: Counter,
    /// Agents known to the engine.
    pub agents: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("caravan");
        let m = Self {
            git_syncs: Family::default(),
            blob_upload_bytes: Counter::default(),
            blob_served_bytes: Counter::default(),
            reports: Counter::default(),
            recomputes: Counter::default(),
            agents: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "gitsource_syncs",
            "GitSource syncs by result",
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
            "engine_recomputes",
            "Recomputations of desired state and status",
            m.recomputes.clone(),
        );
        registry.register("agents", "Agents known to the controller", m.agents.clone());
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
