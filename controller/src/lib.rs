//! The Caravan controller: syncs GitSources into the cluster, reconciles Sites
//! into relay Deployments, keeps the cabinet blob store, computes every
//! agent's desired state and every job's status, and serves the distribution
//! API that relays talk to. It is the only component with Kubernetes access.

pub mod context;
pub mod engine;
pub mod error;
pub mod gitsource;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod reconcile;
pub mod store;
pub mod tokens;
pub mod webhook;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Parser;

pub use error::Error;

/// Command-line and environment configuration of the controller.
#[derive(Parser, Debug, Clone)]
#[command(name = "caravan-controller", version, about)]
pub struct Config {
    /// Address of the distribution API (relays, uploads).
    #[arg(long, env = "CARAVAN_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Data directory: cabinet blobs, Git checkouts, the token key.
    #[arg(long, env = "CARAVAN_DATA_DIR", default_value = "/var/lib/caravan")]
    pub data_dir: PathBuf,
    /// URL relays use to reach this controller's distribution API.
    #[arg(
        long,
        env = "CARAVAN_RELAY_UPSTREAM_URL",
        default_value = "http://caravan-controller.caravan-system.svc:8443"
    )]
    pub relay_upstream_url: String,
    /// Image of the relay Deployments when a Site does not name one.
    #[arg(
        long,
        env = "CARAVAN_RELAY_IMAGE",
        default_value = "ghcr.io/caravan-dev/caravan-relay:0.1.0"
    )]
    pub relay_image: String,
    /// Bearer token that allows blob uploads (`caravan package push`). Uploads are refused when unset.
    #[arg(long, env = "CARAVAN_UPLOAD_TOKEN", hide_env_values = true)]
    pub upload_token: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CARAVAN_NAMESPACE")]
    pub namespace: Option<String>,
    /// Serve the distribution API over HTTPS with this certificate (PEM chain)...
    #[arg(long, env = "CARAVAN_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, env = "CARAVAN_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// CA certificate (PEM) relays use to verify this controller; handed to
    /// every relay through its Secret.
    #[arg(long, env = "CARAVAN_RELAY_UPSTREAM_CA_FILE")]
    pub relay_upstream_ca_file: Option<PathBuf>,
    /// How often unreferenced blobs are removed from the cabinet store.
    #[arg(long, env = "CARAVAN_BLOB_GC_INTERVAL_SECONDS", default_value_t = 300)]
    pub blob_gc_interval_seconds: u64,
    /// A blob no Package references is kept this long after its upload, so a
    /// push can be followed by its commit at leisure.
    #[arg(long, env = "CARAVAN_BLOB_GRACE_SECONDS", default_value_t = 86400)]
    pub blob_grace_seconds: u64,
    /// Log as JSON lines.
    #[arg(long, env = "CARAVAN_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    fn tls(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
        ))
    }
}

/// Runs every part of the controller until one of them stops.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let ctx = Arc::new(context::Context::new(client, config.clone())?);
    let app = http::router(ctx.clone());
    tokio::select! {
        r = caravan_net::server::serve(config.listen, app, config.tls()) => r.context("distribution API server")?,
        r = engine::run(ctx.clone()) => r.context("distribution engine")?,
        () = gitsource::run(ctx.clone()) => {},
        () = reconcile::site::run(ctx.clone()) => {},
        () = store::collect_garbage(ctx.clone()) => {},
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}
