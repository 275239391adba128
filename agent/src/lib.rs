//! The Caravan agent: enrolls once with its site's relay, long-polls for its
//! desired state, and converges the endpoint to it: download (resumable),
//! verify the sha256, install into the install root, remove what is no longer
//! desired, and report every transition. It converges at start-up, so an
//! endpoint that was off gets its jobs when it comes back.
//!
//! - [`daemon`]: `caravan-agent run`, the loop: [`enroll`], poll, converge.
//! - [`plan`] decides what to do for each assignment (pure);
//!   [`converge`] does it: [`policy`] checks, download, [`transaction`].
//! - [`transaction`]: one package change, crash-safe (journal, atomic
//!   switch, scripts, rollback, recovery at start-up).
//! - [`trust`]: every desired state is verified as the controller's,
//!   current and for this agent before anything is done about it.
//! - [`drift`], [`selfupdate`], [`backup`], [`status`]: the rest of what an
//!   endpoint needs; [`state`] is the state directory they all keep files in.

pub mod attempts;
pub mod backup;
pub mod choices;
pub mod client;
pub mod config;
pub mod converge;
pub mod daemon;
pub mod detect;
pub mod drift;
pub mod enroll;
pub mod failpoint;
pub mod host_id;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod selfupdate;
pub mod state;
pub mod status;
pub mod transaction;
pub mod trust;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "caravan-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: caravan_net::args::LogArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: enroll if needed, then converge forever.
    Run(Box<RunArgs>),
    /// Show what is installed and where each assignment stands.
    Status {
        #[command(flatten)]
        state: StateDirArg,
    },
    /// List the optional packages jobs offer this endpoint.
    Available {
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Install an optional package a job offers (the running agent does it
    /// at once, and its job counts it).
    Install {
        /// The package's name, as `available` lists it.
        name: String,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Put a job's required installs off, as often and as long as the job
    /// allows (`spec.deferral`), never past its deadline.
    Defer {
        /// The job's name (or `namespace/name`).
        job: String,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Save the host identity, credentials and installed-package records
    /// (secrets: the file is readable by its owner only). Stop the agent first.
    Backup {
        #[command(flatten)]
        state: StateDirArg,
        /// File to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check that this binary can serve as the agent of a state directory
    /// (run by the agent on a new binary before it updates itself).
    #[command(hide = true)]
    SelfTest {
        #[arg(long)]
        server: String,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Accept a plaintext relay (as the running agent does).
        #[arg(long)]
        insecure: bool,
    },
    /// Put the agent binary back as it was before a self-update whose new
    /// binary never reported (run by systemd's `OnFailure=`, from
    /// `caravan-agent.previous`).
    RollbackUpdate {
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Put a backup back, e.g. after an OS reinstall: the endpoint stays the
    /// same Agent and keeps what is still installed. Stop the agent first.
    Restore {
        #[command(flatten)]
        state: StateDirArg,
        /// Backup file to read.
        #[arg(long)]
        from: PathBuf,
        /// Replace another identity this state directory holds.
        #[arg(long)]
        force: bool,
    },
}

/// The agent's state directory, for the commands that only read or restore it.
#[derive(clap::Args, Debug, Clone)]
pub struct StateDirArg {
    /// Where the agent keeps its identity, records and downloads.
    #[arg(
        long,
        env = "CARAVAN_STATE_DIR",
        default_value = "/var/lib/caravan-agent"
    )]
    pub state_dir: PathBuf,
}

impl StateDirArg {
    fn open(&self) -> anyhow::Result<state::StateDir> {
        state::StateDir::open(&self.state_dir)
            .with_context(|| format!("opening {}", self.state_dir.display()))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// URL of the site's relay: `https://` (plaintext only with `--insecure`).
    #[arg(long, env = "CARAVAN_SERVER")]
    pub server: String,
    /// CA certificate(s) (PEM) to verify the relay's HTTPS certificate with,
    /// pinned: the controller's CA (`caravan-controller ca`). Default: the
    /// system's web PKI roots.
    #[arg(long, env = "CARAVAN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Allow a plaintext `http://` relay: anyone on the LAN could then read
    /// the agent's credentials and delay its updates (what it installs is
    /// still only what the controller signed).
    #[arg(long, env = "CARAVAN_INSECURE")]
    pub insecure: bool,
    /// Files with public keys (`ed25519:…`, one per line) whose signatures
    /// this agent accepts. With any key configured, every package must carry
    /// a valid signature by one of them, whatever the relay says.
    #[arg(
        long = "trusted-key",
        env = "CARAVAN_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<PathBuf>,
    /// The site's bootstrap token, needed only to enroll.
    #[arg(long, env = "CARAVAN_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: Option<String>,
    /// The sha256 of the controller's root of trust
    /// (`caravan-controller trust-root` prints it). The agent pins the root
    /// it is first offered; with this set, only that root (or one it
    /// rotated to). Without it, the first root offered is trusted.
    #[arg(long, env = "CARAVAN_TRUST_ROOT_SHA256")]
    pub trust_root_sha256: Option<String>,
    /// An enrollment bundle (`caravan token create --bundle`): the bootstrap
    /// token, the root of trust and the CA in one file, for whichever of
    /// `--bootstrap-token`, `--trust-root-sha256` and `--ca-file` is not given.
    #[arg(long, env = "CARAVAN_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// Where the agent keeps its identity, records and downloads.
    #[arg(
        long,
        env = "CARAVAN_STATE_DIR",
        default_value = "/var/lib/caravan-agent"
    )]
    pub state_dir: PathBuf,
    /// Where packages are installed (`<root>/<package>`).
    #[arg(long, env = "CARAVAN_INSTALL_ROOT", default_value = "/opt/caravan")]
    pub install_root: PathBuf,
    /// Derive the host ID from this file's machine identity instead of
    /// making a random one: `/sys/class/dmi/id/product_uuid` (the SMBIOS
    /// product UUID, readable by root) survives an OS reinstall, so a
    /// reimaged endpoint enrolls as the same Agent, taking it over once
    /// approved (`caravan agent approve`). Used only when the state
    /// directory has no host ID yet.
    #[arg(long, env = "CARAVAN_HOST_ID_FROM")]
    pub host_id_from: Option<PathBuf>,
    /// Host name to enroll with (default: the system's).
    #[arg(long, env = "CARAVAN_HOSTNAME")]
    pub hostname: Option<String>,
    /// A label for jobs to select this endpoint by (`role=kiosk`,
    /// repeatable; comma-separated in the variable): it lands on the Agent
    /// as `agent.caravan.dev/role: kiosk`. The OS, architecture,
    /// distribution, its version and the host name are labels already.
    #[arg(long = "label", env = "CARAVAN_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Longest a poll waits for a change, in seconds.
    #[arg(long, env = "CARAVAN_POLL_WAIT", default_value_t = 30)]
    pub poll_wait: u64,
    /// Seconds before a failed assignment is tried again.
    #[arg(long, env = "CARAVAN_RETRY_AFTER", default_value_t = 60)]
    pub retry_after: u64,
    /// The file self-updates replace and restart into (default: this
    /// executable; set it when a wrapper script starts the agent).
    #[arg(long, env = "CARAVAN_AGENT_BINARY")]
    pub binary: Option<PathBuf>,
    /// Most bytes one package may unpack to; an archive that would unpack
    /// to more (or to more than nine tenths of the free space) is refused.
    #[arg(long, env = "CARAVAN_MAX_UNPACKED_BYTES", default_value_t = 32 << 30)]
    pub max_unpacked_bytes: u64,
    /// Run package scripts (install, uninstall, health check) as this user,
    /// with its primary group and no other, instead of as the agent (root).
    /// Files are still installed by the agent.
    #[arg(long, env = "CARAVAN_SCRIPT_USER")]
    pub script_user: Option<String>,
    /// Slowest a download may be, in bytes per second over each window of
    /// `--download-window-seconds`: a relay that trickles (or stalls) is
    /// given up on, and the download resumes at the next attempt.
    #[arg(long, env = "CARAVAN_MIN_DOWNLOAD_RATE", default_value_t = client::MinRate::DEFAULT.bytes_per_second)]
    pub min_download_rate: u64,
    /// The window `--min-download-rate` is measured over, in seconds.
    #[arg(long, env = "CARAVAN_DOWNLOAD_WINDOW_SECONDS", default_value_t = client::MinRate::DEFAULT.window.as_secs())]
    pub download_window_seconds: u64,
    /// Write the agent's figures (assignments by phase, installed packages,
    /// drift, desired state, last report taken) to this file in
    /// Prometheus's text format after every report, for node_exporter's
    /// textfile collector (`<dir>/caravan.prom`); the agent opens no port.
    #[arg(long, env = "CARAVAN_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Converge once and exit (non-zero if anything failed).
    #[arg(long)]
    pub once: bool,
    /// The release the agent says it is of (default: its own). Only for
    /// trying the controller's release window (`caravan_api::skew`) with
    /// the agent one has; hidden from `--help`.
    #[arg(long, env = "CARAVAN_CLAIM_RELEASE", hide = true, default_value = caravan_api::RELEASE)]
    pub claim_release: String,
}

/// The agent stops and must not be restarted as it is: only an
/// administrator can help (the service manager is told by the exit code,
/// [`Stop::EXIT_CODE`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stop(pub String);

impl Stop {
    /// `EX_CONFIG`: systemd's unit neither restarts on it nor counts it a
    /// failure (`RestartPreventExitStatus=`, `SuccessExitStatus=`).
    pub const EXIT_CODE: u8 = 78;
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => daemon::run(config::Config::from_args(*args)?).await,
        Command::Status { state } => status::show(&state.open()?).await,
        Command::Available { state } => {
            let state = state.open()?;
            let desired = accepted(&state)?;
            print!(
                "{}",
                choices::render_available(&desired, &choices::Choices::load(&state))
            );
            Ok(())
        }
        Command::Install { name, state } => {
            let state = state.open()?;
            let desired = accepted(&state)?;
            let mut c = choices::Choices::load(&state);
            c.choose(&name, &desired).map_err(anyhow::Error::msg)?;
            c.save(&state)?;
            println!("{name} is chosen: the running agent installs it");
            Ok(())
        }
        Command::Defer { job, state } => {
            let state = state.open()?;
            let desired = accepted(&state)?;
            let mut c = choices::Choices::load(&state);
            let (job, until) = c
                .defer(&job, &desired, chrono::Utc::now())
                .map_err(anyhow::Error::msg)?;
            c.save(&state)?;
            println!(
                "job {job} is put off until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            Ok(())
        }
        Command::SelfTest {
            server,
            state_dir,
            ca_file,
            insecure,
        } => {
            // A binary that would refuse the agent's relay must not replace it.
            caravan_net::require_https(&server, insecure, "--server")?;
            selfupdate::self_test(&server, &state_dir, ca_file.as_deref()).await
        }
        Command::RollbackUpdate { state } => {
            println!("{}", selfupdate::roll_back(&state.open()?)?);
            Ok(())
        }
        Command::Backup { state, out } => {
            backup::backup(&state.open()?, &out)?;
            println!(
                "backed up {} to {} (it holds secrets: keep it safe)",
                state.state_dir.display(),
                out.display()
            );
            Ok(())
        }
        Command::Restore { state, from, force } => {
            backup::restore(&state.open()?, &from, force)?;
            println!(
                "restored {} into {}",
                from.display(),
                state.state_dir.display()
            );
            Ok(())
        }
    }
}

/// The desired state the running agent last accepted.
fn accepted(state: &state::StateDir) -> anyhow::Result<caravan_api::wire::AgentDesired> {
    state.json(choices::DESIRED)?.ok_or_else(|| {
        anyhow::anyhow!("the agent has accepted no desired state yet: is it enrolled and running?")
    })
}

/// `name=value` (or `name`, with an empty value), checked as a label.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once('=').unwrap_or((text, ""));
    caravan_api::facts::check_declared(name, value)?;
    Ok((name.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_unit_neither_restarts_nor_fails_on_a_stop() {
        let unit = include_str!("../dist/caravan-agent.service");
        for line in ["RestartPreventExitStatus", "SuccessExitStatus"] {
            let said = format!("{line}={}\n", super::Stop::EXIT_CODE);
            assert!(unit.contains(&said), "the unit lacks {said}");
        }
    }

    /// The documented config file names only variables the agent reads.
    #[test]
    fn the_example_config_file_names_only_variables_the_agent_reads() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run subcommand");
        let known: Vec<String> = run
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        let example = include_str!("../dist/agent.env.example");
        let named: Vec<&str> = example
            .lines()
            .map(|l| l.trim_start_matches('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| k.starts_with("CARAVAN_"))
            .collect();
        assert!(named.len() >= 8, "{named:?}");
        for name in named {
            assert!(
                known.iter().any(|k| k == name),
                "{name} is not read by the agent"
            );
        }
    }
}
