//! The Caravan relay: a site's cache and the API its agents talk to. It holds
//! no Kubernetes credentials; it only ever connects upward (to the controller,
//! or a parent relay for content), so it works behind NAT.

pub mod cache;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod upstream;
pub mod window;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use caravan_api::{
    v1alpha1::sha256_hex,
    wire::{AgentDesired, SiteDesired},
};
use clap::Parser;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

#[derive(Parser, Debug, Clone)]
#[command(name = "caravan-relay", version, about)]
pub struct Config {
    /// Address agents connect to.
    #[arg(long, env = "CARAVAN_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The controller's distribution API.
    #[arg(long, env = "CARAVAN_UPSTREAM")]
    pub upstream: String,
    /// This site's relay token (from the `<site>-relay` Secret).
    #[arg(long, env = "CARAVAN_RELAY_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Token agents present to enroll at this site.
    #[arg(long, env = "CARAVAN_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: String,
    /// Directory of the blob cache.
    #[arg(long, env = "CARAVAN_CACHE_DIR", default_value = "/var/cache/caravan")]
    pub cache_dir: PathBuf,
    /// Where blobs come from, if not the controller: the relay of the parent
    /// site, so that each blob crosses each link once. Control traffic
    /// (desired state, enrollment, reports) still goes to `--upstream`.
    #[arg(long, env = "CARAVAN_CONTENT_UPSTREAM", requires = "content_token")]
    pub content_upstream: Option<String>,
    /// Most bytes per second all upstream fetches take together (default: no limit).
    #[arg(long, env = "CARAVAN_UPSTREAM_RATE_LIMIT")]
    pub upstream_rate_limit: Option<u64>,
    /// Start upstream fetches only inside this daily window, `HH:MM-HH:MM`
    /// in UTC (it may cross midnight). Default: any time.
    #[arg(long, env = "CARAVAN_TRANSFER_WINDOW")]
    pub transfer_window: Option<window::Window>,
    /// Largest total size of the cache: least recently used blobs are evicted
    /// beyond it, never one being served (default: no limit).
    #[arg(long, env = "CARAVAN_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// How often the relay reports its cache figures to the controller (Site status).
    #[arg(long, env = "CARAVAN_STATS_INTERVAL_SECONDS", default_value_t = 30)]
    pub stats_interval_seconds: u64,
    /// This relay's credential at the parent site's relay.
    #[arg(long, env = "CARAVAN_CONTENT_TOKEN", hide_env_values = true)]
    pub content_token: Option<String>,
    /// CA certificate (PEM) to verify the upstream's HTTPS certificate with
    /// (default: the system's web PKI roots).
    #[arg(long, env = "CARAVAN_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Serve agents over HTTPS with this certificate (PEM chain)...
    #[arg(long, env = "CARAVAN_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, env = "CARAVAN_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "CARAVAN_LOG_JSON")]
    pub log_json: bool,
}

/// The site's desired state as last received, sliced per agent.
#[derive(Debug, Default)]
pub struct SiteState {
    /// The site's desired state without its agents (in `agents`).
    pub desired: SiteDesired,
    /// Per agent: ETag and serialized [`AgentDesired`].
    pub agents: HashMap<String, Arc<AgentEntry>>,
}

#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub desired: AgentDesired,
    pub etag: String,
    pub body: bytes::Bytes,
}

impl AgentEntry {
    pub fn new(desired: AgentDesired) -> Self {
        let body = bytes::Bytes::from(serde_json::to_vec(&desired).expect("wire types serialize"));
        let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&body))[..32]);
        Self {
            desired,
            etag,
            body,
        }
    }
}

impl SiteState {
    /// Moves each agent's part of `desired` into its entry.
    pub fn new(mut desired: SiteDesired) -> Self {
        let agents = std::mem::take(&mut desired.agents)
            .into_iter()
            .map(|(name, d)| (name, Arc::new(AgentEntry::new(d))))
            .collect();
        Self { desired, agents }
    }

    /// What `agent` must have. An agent the controller has not described
    /// (enrolled a moment ago, or its Agent object deleted) changes nothing.
    pub fn agent(&self, agent: &str) -> Arc<AgentEntry> {
        self.agents
            .get(agent)
            .cloned()
            .unwrap_or_else(|| Arc::new(AgentEntry::new(AgentDesired::frozen(agent))))
    }
}

pub struct Relay {
    pub config: Config,
    pub upstream: upstream::Upstream,
    pub cache: Arc<cache::Cache>,
    /// `None` until the first desired state arrives from upstream.
    pub state: watch::Sender<Option<Arc<SiteState>>>,
    pub reports: tokio::sync::mpsc::UnboundedSender<caravan_api::wire::AgentReport>,
    pub metrics: Arc<metrics::Metrics>,
}

/// Runs the relay until interrupted.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let upstream = upstream::Upstream::new(
        &config.upstream,
        &config.token,
        config.upstream_ca_file.as_deref(),
    )?;
    let metrics = Arc::new(metrics::Metrics::default());
    let content = match (&config.content_upstream, &config.content_token) {
        (Some(url), Some(token)) => {
            upstream::Upstream::new(url, token, config.upstream_ca_file.as_deref())?
        }
        _ => upstream.clone(),
    };
    let cache = cache::Cache::open(
        config.cache_dir.clone(),
        content,
        metrics.upstream_bytes.clone(),
        config.upstream_rate_limit.map(ratelimit::RateLimit::new),
        config.cache_max_bytes,
        config.transfer_window,
    )
    .await
    .with_context(|| format!("opening cache {}", config.cache_dir.display()))?;
    let cache = Arc::new(cache);
    let (reports, reports_rx) = tokio::sync::mpsc::unbounded_channel();
    let relay = Arc::new(Relay {
        config: config.clone(),
        upstream,
        cache,
        state: watch::channel(None).0,
        reports,
        metrics,
    });
    tracing::info!(upstream = %config.upstream, "relay starting");
    let tls = config
        .tls_cert_file
        .as_deref()
        .zip(config.tls_key_file.as_deref());
    tokio::select! {
        r = caravan_net::server::serve(config.listen, server::router(relay.clone()), tls) => r.context("relay server")?,
        () = sync_desired(relay.clone()) => {},
        () = report_stats(relay.clone()) => {},
        () = upstream::forward_reports(relay.upstream.clone(), reports_rx) => {},
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}

/// Long-polls the controller for the site's desired state, forever.
async fn sync_desired(relay: Arc<Relay>) {
    let mut etag: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        match relay.upstream.desired(etag.as_deref(), 30).await {
            Ok(Some((new_etag, desired))) => {
                tracing::info!(site = %desired.site, agents = desired.agents.len(), etag = %new_etag, "desired state updated");
                etag = Some(new_etag);
                // What no agent of the site is assigned any more leaves the cache.
                let keep = desired.all_digests().collect();
                match relay.cache.retain(&keep).await {
                    Ok(removed) => removed
                        .iter()
                        .for_each(|hex| tracing::info!(blob = %hex, "dropped from the cache")),
                    Err(e) => tracing::warn!(error = %e, "cache cleanup failed"),
                }
                // Prestage: fetch what the site (and the sites below) will
                // need before anyone asks, one blob at a time.
                let wanted: Vec<String> = desired
                    .all_digests()
                    .filter_map(sha256_hex)
                    .map(str::to_owned)
                    .collect();
                let cache = relay.cache.clone();
                tokio::spawn(async move {
                    for hex in wanted {
                        if let Some(minutes) = cache.window().and_then(|w| w.opens_in_now()) {
                            tracing::info!(blob = %hex, minutes, "prestaging waits for the transfer window");
                            tokio::time::sleep(Duration::from_secs(u64::from(minutes) * 60)).await;
                        }
                        if let Err(e) = cache.ensure(&hex).await {
                            tracing::warn!(blob = %hex, error = %e, "prestaging failed; agents will ask again");
                        }
                    }
                });
                relay
                    .state
                    .send_replace(Some(Arc::new(SiteState::new(desired))));
                backoff = Duration::from_millis(500);
            }
            Ok(None) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "fetching desired state from upstream failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Tells the controller, every `--stats-interval-seconds`, what is in the
/// cache and what crossed the links, for the Site's status.
async fn report_stats(relay: Arc<Relay>) {
    let interval = Duration::from_secs(relay.config.stats_interval_seconds.max(1));
    loop {
        tokio::time::sleep(interval).await;
        let m = &relay.metrics;
        let stats = caravan_api::wire::RelayStats {
            cache_bytes: relay.cache.bytes().await.unwrap_or(0),
            upstream_bytes: m.upstream_bytes.get(),
            served_bytes: m.served_bytes.get(),
            cache_hits: m.cache_hits.get(),
            cache_misses: m.cache_misses.get(),
        };
        if let Err(e) = relay.upstream.stats(&stats).await {
            tracing::debug!(error = %e, "stats not delivered");
        }
    }
}
