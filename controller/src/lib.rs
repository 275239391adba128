//! The Caravan controller: syncs GitSources into the cluster, reconciles Sites
//! into relay Deployments, keeps the cabinet blob store, computes every
//! agent's desired state and every job's status, and serves the distribution
//! API that relays talk to. It is the only component with Kubernetes access.
//!
//! [`run`] wires the parts together; each owns what it needs and is handed
//! the rest explicitly:
//!
//! ```text
//!  stores (reflector caches: Site, Agent, DistributionJob, Package, Cabinet)
//!     │ filled by                         read by
//!     ▼                                      ▼
//!  engine ── index::compute (pure) ──▶ desired (watch) ──▶ server: GET /v1/site/desired
//!     │            └──────────────▶ job / package / cabinet status (status_patch)
//!     └── cabinet::Pulls (http cabinets → BlobStore)   server: blobs, uploads, enroll, reports
//!  gitsource: Git → parse → apply/prune                  site: Secret, Deployment, Service
//!  cabinet::gc: unreferenced blobs go                    site::RelayContacts ◀── server
//!  stale: Agents not heard from turn Stale, then (by policy) are deleted
//! ```

pub mod agent_update;
pub mod backup;
pub mod ca;
pub mod cabinet;
pub mod context;
pub mod crds;
pub mod credentials;
pub mod engine;
pub mod error;
pub mod gitsource;
pub mod identity;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod site;
pub mod stale;
pub mod status_patch;
pub mod stores;
pub mod trust;
pub mod webhook;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use caravan_net::supervise::{self, Component};
use clap::Parser;

pub use error::Error;

pub use caravan_api::field_managers;

/// Command-line and environment configuration of the controller.
#[derive(Parser, Debug, Clone)]
#[command(name = "caravan-controller", version, about)]
pub struct Config {
    /// The distribution API (relays, uploads, the admission webhook).
    #[command(flatten)]
    pub serve: caravan_net::args::ServeArgs<8443>,
    /// Data directory: cabinet blobs, Git checkouts, the token key.
    #[arg(long, env = "CARAVAN_DATA_DIR", default_value = "/var/lib/caravan")]
    pub data_dir: PathBuf,
    /// URL relays use to reach this controller's distribution API
    /// (`https://`). Given no `--tls-cert-file`, the controller serves a
    /// certificate from its own CA for this URL's host (and
    /// `--tls-hostname`s), and relays pin that CA.
    #[arg(
        long,
        env = "CARAVAN_RELAY_UPSTREAM_URL",
        default_value = "https://caravan-controller.caravan-system.svc:8443"
    )]
    pub relay_upstream_url: String,
    /// More names for the certificate the controller issues itself (when
    /// it is given none), besides the host of `--relay-upstream-url`,
    /// `localhost` and `127.0.0.1`.
    #[arg(
        long = "tls-hostname",
        env = "CARAVAN_TLS_HOSTNAMES",
        value_delimiter = ','
    )]
    pub tls_hostnames: Vec<String>,
    /// Image of the relay Deployments when a Site does not name one.
    #[arg(
        long,
        env = "CARAVAN_RELAY_IMAGE",
        default_value_t = caravan_api::images::relay()
    )]
    pub relay_image: String,
    /// Image repositories a Site may run its relay from besides that of
    /// `--relay-image` (an entry ending in `/` allows everything beneath it).
    #[arg(
        long = "allowed-relay-image",
        env = "CARAVAN_ALLOWED_RELAY_IMAGES",
        value_delimiter = ','
    )]
    pub allowed_relay_images: Vec<String>,
    /// Bearer token that allows blob uploads (`caravan package push`). Uploads are refused when unset.
    #[arg(long, env = "CARAVAN_UPLOAD_TOKEN", hide_env_values = true)]
    pub upload_token: Option<String>,
    /// Bearer token that allows taking backups (`caravan backup`) and
    /// restoring one (`caravan restore`). Both are refused when unset.
    #[arg(long, env = "CARAVAN_BACKUP_TOKEN", hide_env_values = true)]
    pub backup_token: Option<String>,
    /// On an empty data directory, make no keys and run nothing: wait for
    /// `caravan restore` to bring a backup's, then start with them. With
    /// keys already made (or restored), this changes nothing.
    #[arg(long, env = "CARAVAN_AWAIT_RESTORE")]
    pub await_restore: bool,
    /// `auto`: once every Site's relay of a namespace runs this release,
    /// roll this release's agent (`--agent-binary`) out to every agent of
    /// the namespace as a gated job (`caravan-agent-update`); `off`: agents
    /// are updated by hand, with an agent package and a job.
    #[arg(long, env = "CARAVAN_AGENT_UPDATE", value_enum, default_value_t = agent_update::Mode::Off)]
    pub agent_update: agent_update::Mode,
    /// The agent binary of this release (the controller's image has it
    /// there), for `--agent-update auto`.
    #[arg(
        long,
        env = "CARAVAN_AGENT_BINARY",
        default_value = "/usr/local/bin/caravan-agent"
    )]
    pub agent_binary: PathBuf,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CARAVAN_NAMESPACE")]
    pub namespace: Option<String>,
    /// Directories local Git repositories (`file://` URLs, absolute paths)
    /// may be fetched from; none by default, so a GitSource cannot read the
    /// controller's own files.
    #[arg(
        long = "allow-local-git-under",
        env = "CARAVAN_ALLOW_LOCAL_GIT_UNDER",
        value_delimiter = ','
    )]
    pub allow_local_git_under: Vec<PathBuf>,
    /// Most bytes one Git fetch may receive; a larger repository fails to
    /// sync with a message saying so.
    #[arg(long, env = "CARAVAN_GIT_FETCH_LIMIT_BYTES", default_value_t = 256 << 20)]
    pub git_fetch_limit_bytes: u64,
    /// CA certificate (PEM) relays use to verify the certificate of
    /// `--tls-cert-file`; handed to every relay through its Secret. Without a
    /// certificate file, relays are given the controller's own CA.
    #[arg(
        long,
        env = "CARAVAN_RELAY_UPSTREAM_CA_FILE",
        requires = "tls_cert_file"
    )]
    pub relay_upstream_ca_file: Option<PathBuf>,
    /// Largest blob `caravan package push` may upload; a larger upload is
    /// refused as it arrives.
    #[arg(long, env = "CARAVAN_MAX_UPLOAD_BYTES", default_value_t = 64 << 30)]
    pub max_upload_bytes: u64,
    /// How often unreferenced blobs (and uploads nobody resumed within the
    /// grace below) are removed from the cabinet store.
    #[arg(long, env = "CARAVAN_BLOB_GC_INTERVAL_SECONDS", default_value_t = 300)]
    pub blob_gc_interval_seconds: u64,
    /// A blob no Package references is kept this long after its upload, so a
    /// push can be followed by its commit at leisure; an interrupted upload
    /// is kept this long to be resumed.
    #[arg(long, env = "CARAVAN_BLOB_GRACE_SECONDS", default_value_t = 86400)]
    pub blob_grace_seconds: u64,
    /// An Agent not heard from for this long is marked `Stale` (a
    /// condition, a column and a Warning).
    #[arg(
        long,
        env = "CARAVAN_AGENT_STALE_AFTER_SECONDS",
        default_value_t = 7 * 86400,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub agent_stale_after_seconds: u64,
    /// An enrolled Agent not heard from for this long is deleted (its
    /// endpoint, should it come back, is told and enrolls again). 0: never.
    #[arg(long, env = "CARAVAN_AGENT_DELETE_AFTER_SECONDS", default_value_t = 0)]
    pub agent_delete_after_seconds: u64,
    /// Apply this release's CustomResourceDefinitions at start (unless a
    /// newer release wrote them): Helm installs a chart's CRDs but never
    /// upgrades them. Needs get and patch on them (the chart grants it).
    #[arg(long, env = "CARAVAN_APPLY_CRDS")]
    pub apply_crds: bool,
    /// How long a signed desired-state document is good for. Agents act on
    /// nothing older, so a relay withholding updates is found out within
    /// this time; documents are signed anew when half of it is left.
    #[arg(
        long,
        env = "CARAVAN_DESIRED_STATE_TTL_SECONDS",
        default_value_t = 7 * 86400,
        value_parser = clap::value_parser!(u64).range(2..)
    )]
    pub desired_state_ttl_seconds: u64,
    /// Enrollments each site may make per second (bursts of up to ten
    /// seconds' worth); more are answered `429` and the agents retry.
    #[arg(
        long,
        env = "CARAVAN_ENROLLMENTS_PER_SECOND",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub enrollments_per_second: u32,
    /// Contend for leadership with other replicas on a Lease: only the
    /// leader reconciles and writes status, every replica serves relays.
    /// `false` only where one replica runs.
    #[arg(long, env = "CARAVAN_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// This replica's name in the election (in a pod: the pod's name).
    #[arg(long, env = "CARAVAN_POD_NAME")]
    pub leader_election_identity: Option<String>,
    /// Namespace of the election's Lease (default: `--namespace`, else
    /// `default`).
    #[arg(long, env = "CARAVAN_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// How long a leader that stopped renewing the Lease (a crashed
    /// replica) keeps it before another replica takes over.
    #[arg(
        long,
        env = "CARAVAN_LEADER_ELECTION_LEASE_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(3..)
    )]
    pub leader_election_lease_seconds: u64,
    #[command(flatten)]
    pub log: caravan_net::args::LogArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One-off commands instead of running the controller.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Print the fingerprint of the root agents trust (for their
    /// `--trust-root-sha256`), creating the signing key on first use.
    TrustRoot,
    /// Make a new signing key and root, signed by the current key and the
    /// new one; the controller signs with it from its next start, and
    /// agents follow the rotation. Keep the old key offline afterwards.
    RotateTrustRoot,
    /// Print the certificate (PEM) of the CA that issues relays their TLS
    /// certificates, for agents' `--ca-file`.
    Ca {
        /// Print instead the CA that issues the controller its own
        /// certificate (when it is given none): for clients of the
        /// controller (`caravan package push --ca-file`, a standalone
        /// relay's `--upstream-ca-file`).
        #[arg(long)]
        controller: bool,
    },
}

/// This machine's name: a pod's name in Kubernetes.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("caravan-controller-{}", std::process::id()))
}

/// The file in the data directory holding the controller's secret key.
pub use caravan_api::backup::TOKEN_KEY;

impl Config {
    /// Where the signing keys and roots are kept.
    pub fn trust_dir(&self) -> PathBuf {
        self.data_dir.join(caravan_api::backup::TRUST_DIR)
    }
}

/// Runs a one-off [`Command`].
pub fn run_command(config: &Config, command: &Command) -> anyhow::Result<()> {
    let dir = config.trust_dir();
    match command {
        Command::Ca { controller } => {
            // Never a new key here: that would print a CA nobody uses.
            let path = config.data_dir.join(TOKEN_KEY);
            anyhow::ensure!(
                path.exists(),
                "{} does not exist: point --data-dir at the controller's data directory (the controller makes its key at its first start)",
                path.display()
            );
            let key = credentials::CredentialKey::load_or_create(&path)?;
            let ca = match controller {
                true => ca::Ca::controller(&key)?,
                false => ca::Ca::new(&key)?,
            };
            print!("{}", ca.cert_pem());
            return Ok(());
        }
        Command::TrustRoot => {}
        Command::RotateTrustRoot => {
            let version = trust::TrustKeys::rotate(&dir)?;
            eprintln!("root version {version} made; restart the controller to sign with it");
        }
    }
    println!("{}", trust::TrustKeys::load_or_create(&dir)?.fingerprint());
    Ok(())
}

/// How [`run`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was asked for.
    Shutdown,
    /// A backup was restored: start again (the same command) with its keys.
    Restart,
}

/// The controller's own certificate (when it is given none) and the CA
/// relays pin to reach it (`None`: the web PKI's roots).
async fn serving_tls(
    config: &Config,
    credentials: &credentials::CredentialKey,
) -> anyhow::Result<(Option<ca::OwnCertificate>, Option<String>)> {
    ca::upstream_host(&config.relay_upstream_url)?;
    Ok(match (config.serve.tls(), &config.relay_upstream_ca_file) {
        (Some(_), Some(path)) => (
            None,
            Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            ),
        ),
        // A certificate from a CA relays find among the web PKI roots.
        (Some(_), None) => (None, None),
        (None, _) => {
            let ca = ca::Ca::controller(credentials)?;
            let pem = ca.cert_pem().to_string();
            let own =
                ca::OwnCertificate::new(ca, &config.relay_upstream_url, &config.tls_hostnames)
                    .await?;
            (Some(own), Some(pem))
        }
    })
}

/// Runs every part of the controller until shutdown is asked for (then they
/// drain), or until one of them stops, which is an error; or, started with
/// `--await-restore` on an empty data directory, only what a restore needs
/// until one is in.
pub async fn run(config: Config) -> anyhow::Result<Stopped> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    // Flags that cannot work together stop the controller before it
    // changes anything.
    let stale_policy = stale::Policy::new(
        config.agent_stale_after_seconds,
        config.agent_delete_after_seconds,
    )?;
    anyhow::ensure!(
        config.agent_update == agent_update::Mode::Off || config.agent_binary.is_file(),
        "--agent-update auto needs this release's agent binary: {} is not a file (--agent-binary)",
        config.agent_binary.display()
    );
    if config.apply_crds {
        crds::apply(&client).await?;
    }
    if config.await_restore
        && backup::awaiting(&config.data_dir).with_context(|| {
            format!(
                "marking {} as awaiting a restore",
                config.data_dir.display()
            )
        })?
    {
        return await_restore(config).await;
    }
    backup::refuse_awaiting(&config.data_dir)?;
    let ctx = Arc::new(context::Context::new(client, config.clone())?);
    // HTTPS always: with the certificate given, or one from the
    // controller's own CA, which relays are then given to pin.
    let (own_certificate, relay_upstream_ca) = serving_tls(&config, &ctx.credentials).await?;
    let backups = server::backup::BackupState::new(
        &config,
        &ctx.credentials,
        Some(ctx.trust.fingerprint()),
        None,
    )?;
    let blobs = Arc::new(cabinet::BlobStore::new(
        config.data_dir.join(caravan_api::backup::BLOBS_DIR),
    ));
    let (writers, stores) = stores::Stores::new();
    let replica = config
        .leader_election_identity
        .clone()
        .unwrap_or_else(hostname);
    let presence = config
        .leader_election
        .then(|| site::Presence::new(ctx.client.clone(), replica.clone(), stores.sites.clone()));
    let (relays, relay_triggers) = site::RelayContacts::new(presence);
    let (git_syncs, git_sync_triggers) = tokio::sync::mpsc::channel(64);
    let relays = Arc::new(relays);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (leading, election) = if config.leader_election {
        let ns = config
            .leader_election_namespace
            .clone()
            .or_else(|| config.namespace.clone())
            .unwrap_or_else(|| "default".into());
        let (leading, election) = leader::elect(
            &ns,
            &replica,
            config.leader_election_lease_seconds,
            shutdown.clone(),
        )
        .await
        .context("starting the leader election")?;
        (leading, Some(election))
    } else {
        (leader::Leading::always(), None)
    };
    let engine = engine::Engine::new(ctx.clone(), stores.clone(), blobs.clone(), leading.clone())?;
    let server = Arc::new(server::ServerState {
        ctx: ctx.clone(),
        desired: engine.subscribe(),
        blobs: blobs.clone(),
        relays: relays.clone(),
        stores: stores.clone(),
        polls: caravan_net::server::PollSlots::new(server::POLLS_PER_SITE),
        whole_answers: tokio::sync::Semaphore::new(server::WHOLE_ANSWERS),
        status_writes: tokio::sync::Semaphore::new(server::STATUS_WRITES),
        enrollments: server::enroll::limiter(config.enrollments_per_second),
        git_syncs,
        hooks: Default::default(),
        reports: Default::default(),
    });
    let gc = cabinet::gc::Collector {
        blobs: blobs.clone(),
        packages: stores.packages.clone(),
        interval: Duration::from_secs(config.blob_gc_interval_seconds.max(1)),
        grace: Duration::from_secs(config.blob_grace_seconds),
    };
    let stale_relays = relays.clone();
    let sites = site::SiteReconciler::new(ctx.clone(), stores.clone(), relays, relay_upstream_ca);
    let (stale_ctx, stale_stores) = (ctx.clone(), stores.clone());
    let (update_ctx, update_stores, update_blobs) = (ctx.clone(), stores.clone(), blobs.clone());

    let gitsources = gitsource::GitSources::new(ctx.clone(), stores.clone());
    let serve = config.serve.clone();
    let app = server::router(server).merge(server::backup::router(backups));
    let own_tls = own_certificate.as_ref().map(|c| c.tls.clone());
    let mut components = vec![
        Component::new("distribution API server", {
            let shutdown = shutdown.clone();
            async move { caravan_net::server::serve_with(&serve, app, shutdown, own_tls, None).await }
        }),
        Component::new("distribution engine", engine.run(writers, shutdown.clone())),
        Component::new(
            "GitSource and Site controllers, stale Agents, the agent update (on the leader)",
            leader::lead(leading, shutdown.clone(), {
                let shutdown = shutdown.clone();
                async move {
                    tokio::try_join!(
                        gitsources.run(git_sync_triggers, shutdown.clone()),
                        sites.run(relay_triggers, shutdown.clone()),
                        stale::run(
                            stale_ctx,
                            stale_stores,
                            stale_relays,
                            stale_policy,
                            shutdown.clone()
                        ),
                        agent_update::run(update_ctx, update_stores, update_blobs, shutdown),
                    )
                    .map(|_| ())
                }
            }),
        ),
        Component::new("blob garbage collection", gc.run(shutdown.clone())),
    ];
    if let Some(election) = election {
        components.push(Component::new("leader election", election));
    }
    if let Some(own) = own_certificate {
        components.push(Component::new(
            "certificate renewal",
            own.renew(shutdown.clone()),
        ));
    }
    supervise::run(components, shutdown, supervise::shutdown_signal()).await?;
    Ok(Stopped::Shutdown)
}

/// Serves only what a restore needs (and health), with a key made for
/// serving HTTPS alone, until a backup is restored or shutdown is asked for.
async fn await_restore(config: Config) -> anyhow::Result<Stopped> {
    anyhow::ensure!(
        config.backup_token.is_some(),
        "--await-restore needs a backup token (--backup-token): nothing could restore into this controller without one"
    );
    let credentials = credentials::CredentialKey::load_or_create(&config.data_dir.join(TOKEN_KEY))?;
    let (own_certificate, _) = serving_tls(&config, &credentials).await?;
    let restored = tokio_util::sync::CancellationToken::new();
    let backups =
        server::backup::BackupState::new(&config, &credentials, None, Some(restored.clone()))?;
    tracing::warn!(
        data_dir = %config.data_dir.display(),
        "awaiting a restore (`caravan restore`): nothing else runs until one is in"
    );
    let app = server::awaiting_router().merge(server::backup::router(backups));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serve = config.serve.clone();
    let own_tls = own_certificate.as_ref().map(|c| c.tls.clone());
    let mut components = vec![Component::new("restore server", {
        let shutdown = shutdown.clone();
        async move { caravan_net::server::serve_with(&serve, app, shutdown, own_tls, None).await }
    })];
    if let Some(own) = own_certificate {
        components.push(Component::new(
            "certificate renewal",
            own.renew(shutdown.clone()),
        ));
    }
    // Restored here, or by another replica on the shared volume.
    let data_dir = config.data_dir.clone();
    let stop = {
        let restored = restored.clone();
        async move {
            let elsewhere = async {
                while backup::still_awaiting(&data_dir) {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                restored.cancel();
            };
            tokio::select! {
                () = supervise::shutdown_signal() => {}
                () = restored.cancelled() => {}
                () = elsewhere => {}
            }
        }
    };
    supervise::run(components, shutdown, stop).await?;
    Ok(match restored.is_cancelled() {
        true => Stopped::Restart,
        false => Stopped::Shutdown,
    })
}
