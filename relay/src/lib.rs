//! The Caravan relay: a site's cache and the API its agents talk to. It holds
//! no Kubernetes credentials; it only ever connects upward (to the controller,
//! or a parent relay for content), so it works behind NAT.
//!
//! - [`desired`]: the site's desired state, long-polled from the controller
//!   and sliced per agent; blobs are prestaged as soon as a job needs them.
//! - [`cache`]: the content-addressed blob cache, one upstream fetch per blob.
//! - [`server`]: the agent API (enroll, desired state, blobs, reports).
//! - [`upstream`]: the client of the controller (and of a parent relay).

pub mod cache;
pub mod desired;
pub mod metrics;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod upstream;
pub mod window;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use caravan_net::supervise::{self, Component};
use clap::Parser;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use desired::SiteState;

/// A number of bytes, plain or as a Kubernetes quantity (`10Mi`, `50Gi`).
fn bytes(s: &str) -> Result<u64, String> {
    caravan_api::v1alpha1::quantity_bytes(s)
}

#[derive(Parser, Debug, Clone)]
#[command(name = "caravan-relay", version, about)]
pub struct Config {
    /// The agent API.
    #[command(flatten)]
    pub serve: caravan_net::args::ServeArgs<8080>,
    /// The controller's distribution API.
    #[arg(long, env = "CARAVAN_UPSTREAM")]
    pub upstream: String,
    /// This site's relay token (from the `<site>-relay` Secret).
    #[arg(long, env = "CARAVAN_RELAY_TOKEN", hide_env_values = true)]
    pub token: String,
    /// How long an agent credential the relay issues is good for; agents
    /// renew theirs before then with the key they enrolled.
    #[arg(
        long,
        env = "CARAVAN_AGENT_CREDENTIAL_TTL_SECONDS",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u64).range(2..)
    )]
    pub agent_credential_ttl_seconds: u64,
    /// Directory of the blob cache.
    #[arg(long, env = "CARAVAN_CACHE_DIR", default_value = "/var/cache/caravan")]
    pub cache_dir: PathBuf,
    /// Where blobs come from, if not the controller: the relay of the parent
    /// site, so that each blob crosses each link once. Control traffic
    /// (desired state, enrollment, reports) still goes to `--upstream`.
    #[arg(long, env = "CARAVAN_CONTENT_UPSTREAM", requires = "content_token")]
    pub content_upstream: Option<String>,
    /// Most bytes per second all upstream fetches take together, in bytes
    /// or as a quantity (`2Mi`) (default: no limit).
    #[arg(long, env = "CARAVAN_UPSTREAM_RATE_LIMIT", value_parser = bytes)]
    pub upstream_rate_limit: Option<u64>,
    /// Start upstream fetches only inside this daily window, `HH:MM-HH:MM`
    /// (it may cross midnight) in UTC or in the time zone that follows
    /// (`22:00-06:00 Europe/Berlin`); agents wait for it, told when it
    /// opens. Default: any time.
    #[arg(long, env = "CARAVAN_TRANSFER_WINDOW")]
    pub transfer_window: Option<window::Window>,
    /// Largest total size of the cache, in bytes or as a quantity (`45Gi`):
    /// least recently used blobs are evicted beyond it, never one being
    /// served (default: no limit).
    #[arg(long, env = "CARAVAN_CACHE_MAX_BYTES", value_parser = bytes)]
    pub cache_max_bytes: Option<u64>,
    /// Most agent reports waiting to be passed up (while the controller is
    /// slow or away); agents beyond them are told to report again later.
    #[arg(
        long,
        env = "CARAVAN_REPORT_QUEUE",
        default_value_t = upstream::REPORT_QUEUE,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub report_queue: usize,
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
    /// CA certificate(s) (PEM) to verify the parent site's relay with, pinned
    /// (the controller's CA, from the relay's Secret).
    #[arg(long, env = "CARAVAN_CONTENT_UPSTREAM_CA_FILE")]
    pub content_upstream_ca_file: Option<PathBuf>,
    /// Allow a plaintext `http://` upstream (`--upstream`, the controller)
    /// or parent relay (`--content-upstream`): anyone on the link could then
    /// read and delay what crosses it, and take the relay's credential.
    #[arg(long, env = "CARAVAN_INSECURE")]
    pub insecure: bool,
    /// Credentials for the registries of `oci` cabinets whose layers relays
    /// fetch: a Docker `config.json` (a `kubernetes.io/dockerconfigjson`
    /// Secret's `.dockerconfigjson`). Without it, registries are read
    /// anonymously. Give it pull access only.
    #[arg(long, env = "CARAVAN_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// The release the relay says it is of (default: its own). Only for
    /// trying the controller's release window and the relays' upgrade
    /// (`caravan_api::skew`) with the relay one has; hidden from `--help`.
    #[arg(long, env = "CARAVAN_CLAIM_RELEASE", hide = true, default_value = caravan_api::RELEASE)]
    pub claim_release: String,
    #[command(flatten)]
    pub log: caravan_net::args::LogArgs,
}

/// Most long-polls one agent may hold open (one is all a healthy agent needs).
pub const POLLS_PER_AGENT: usize = 4;

/// What the agent API serves from.
pub struct Relay {
    /// This site's relay token: the key of the agent tokens it issues.
    pub token: String,
    /// How long an agent credential is good for, in seconds.
    pub credential_ttl: u64,
    pub upstream: upstream::Upstream,
    pub cache: Arc<cache::Cache>,
    /// `None` until the first desired state arrives from upstream.
    pub state: watch::Receiver<Option<Arc<SiteState>>>,
    /// The long-polls each agent holds open (at most [`POLLS_PER_AGENT`]).
    pub polls: Arc<caravan_net::server::PollSlots>,
    /// Reports on their way up (at most `--report-queue`).
    /// Signed agent reports, with the name of the agent that sent each.
    pub reports: tokio::sync::mpsc::Sender<(String, caravan_api::wire::Envelope)>,
    pub metrics: Arc<metrics::Metrics>,
}

/// Runs the relay until shutdown is asked for, or one of its parts stops
/// (an error).
pub async fn run(config: Config) -> anyhow::Result<()> {
    caravan_net::require_https(&config.upstream, config.insecure, "--upstream")?;
    let ca = config.upstream_ca_file.as_deref();
    let upstream = upstream::Upstream::new(&config.upstream, &config.token, ca)?
        .with_release(&config.claim_release);
    let metrics = Arc::new(metrics::Metrics::default());
    let content = match (&config.content_upstream, &config.content_token) {
        (Some(url), Some(token)) => {
            caravan_net::require_https(url, config.insecure, "--content-upstream")?;
            upstream::Upstream::new(url, token, config.content_upstream_ca_file.as_deref())?
                .with_release(&config.claim_release)
        }
        _ => upstream.clone(),
    };
    let limits = cache::Limits {
        rate: config.upstream_rate_limit.map(ratelimit::RateLimit::new),
        max_bytes: config.cache_max_bytes,
        window: config.transfer_window.clone(),
    };
    // A child site's relay fetches everything from its parent's.
    let registries = match &config.content_upstream {
        None => registry::Registries::new(config.registry_auth_file.as_deref())?,
        Some(_) => registry::Registries::default(),
    };
    let cache = cache::Cache::open(
        config.cache_dir.clone(),
        content,
        registries,
        metrics.upstream_bytes.clone(),
        limits,
    )
    .await
    .with_context(|| format!("opening cache {}", config.cache_dir.display()))?;
    let cache = Arc::new(cache);
    let (reports, reports_rx) = tokio::sync::mpsc::channel(config.report_queue);
    let (state, state_rx) = watch::channel(None);
    let relay = Arc::new(Relay {
        token: config.token.clone(),
        credential_ttl: config.agent_credential_ttl_seconds,
        upstream: upstream.clone(),
        cache: cache.clone(),
        state: state_rx,
        reports,
        polls: caravan_net::server::PollSlots::new(POLLS_PER_AGENT),
        metrics: metrics.clone(),
    });
    tracing::info!(upstream = %config.upstream, "relay starting");
    let shutdown = CancellationToken::new();
    let serve = config.serve.clone();
    let app = server::router(relay.clone());
    let stats_interval = Duration::from_secs(config.stats_interval_seconds.max(1));
    let components = vec![
        Component::new("agent API server", {
            let shutdown = shutdown.clone();
            async move {
                caravan_net::server::serve_with(&serve, app, shutdown, None, Some(relay)).await
            }
        }),
        Component::new(
            "desired state sync",
            desired::sync(upstream.clone(), cache.clone(), state, shutdown.clone()),
        ),
        Component::new(
            "stats reports",
            report_stats(
                upstream.clone(),
                cache,
                metrics,
                stats_interval,
                shutdown.clone(),
            ),
        ),
        Component::new(
            "agent reports",
            upstream::forward_reports(upstream, reports_rx, shutdown.clone()),
        ),
    ];
    supervise::run(components, shutdown, supervise::shutdown_signal()).await
}

/// Tells the controller, every `interval`, what is in the cache and what
/// crossed the links, for the Site's status.
async fn report_stats(
    upstream: upstream::Upstream,
    cache: Arc<cache::Cache>,
    m: Arc<metrics::Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        let stats = caravan_api::wire::RelayStats {
            cache_bytes: cache.bytes().await.unwrap_or(0),
            upstream_bytes: m.upstream_bytes.get(),
            served_bytes: m.served_bytes.get(),
            cache_hits: m.cache_hits.get(),
            cache_misses: m.cache_misses.get(),
        };
        if let Err(e) = upstream.stats(&stats).await {
            tracing::debug!(error = %e, "stats not delivered");
        }
    }
}
