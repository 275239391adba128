//! Prometheus metrics of the relay, served at `/metrics`.

use prometheus_client::{metrics::counter::Counter, registry::Registry};

#[derive(Default)]
pub struct Metrics {
    /// Bytes fetched from upstream into the cache.
    pub upstream_bytes: Counter,
    /// Bytes of blobs served to agents.
    pub served_bytes: Counter,
    /// Blob requests answered from the cache.
    pub cache_hits: Counter,
    /// Blob requests that needed (or waited for) an upstream fetch.
    pub cache_misses: Counter,
    /// Blob responses sent from the cache file with `sendfile(2)`.
    pub zero_copy_responses: Counter,
    pub enrollments: Counter,
    /// Agent credentials renewed for proof of the agent's key.
    pub renewals: Counter,
    pub reports: Counter,
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut r = Registry::with_prefix("caravan_relay");
        r.register(
            "upstream_bytes",
            "Bytes fetched from upstream",
            self.upstream_bytes.clone(),
        );
        r.register(
            "served_bytes",
            "Bytes of blobs served to agents",
            self.served_bytes.clone(),
        );
        r.register(
            "cache_hits",
            "Blob requests answered from the cache",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Blob requests that needed an upstream fetch",
            self.cache_misses.clone(),
        );
        r.register(
            "zero_copy_responses",
            "Blob responses sent from the cache file with sendfile(2)",
            self.zero_copy_responses.clone(),
        );
        r.register("enrollments", "Agents enrolled", self.enrollments.clone());
        r.register(
            "renewals",
            "Agent credentials renewed",
            self.renewals.clone(),
        );
        r.register("reports", "Agent reports received", self.reports.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)
            .expect("writing to a String cannot fail");
        out
    }
}
