//! The Caravan agent: enrolls once with its site's relay, long-polls for its
//! desired state, and converges the endpoint to it: download (resumable),
//! verify the sha256, install into the install root, remove what is no longer
//! desired, and report every transition. It converges at start-up, so an
//! endpoint that was off gets its jobs when it comes back.

pub mod archive;
pub mod backup;
pub mod client;
pub mod converge;
pub mod failpoint;
pub mod install;
pub mod journal;
pub mod manifest;
pub mod selfupdate;
pub mod state;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "caravan-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: enroll if needed, then converge forever.
    Run(RunArgs),
    /// Show what is installed and where each assignment stands.
    Status {
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
    /// URL of the site's relay.
    #[arg(long, env = "CARAVAN_SERVER")]
    pub server: String,
    /// CA certificate (PEM) to verify the relay's HTTPS certificate with
    /// (default: the system's web PKI roots).
    #[arg(long, env = "CARAVAN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
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
    /// Host name to enroll with (default: the system's).
    #[arg(long, env = "CARAVAN_HOSTNAME")]
    pub hostname: Option<String>,
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
    /// Converge once and exit (non-zero if anything failed).
    #[arg(long)]
    pub once: bool,
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Status { state } => {
            let state = state.open()?;
            print!("{}", state.describe()?);
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                follow_download(&state).await;
            }
            Ok(())
        }
        Command::SelfTest {
            server,
            state_dir,
            ca_file,
        } => selfupdate::self_test(&server, &state_dir, ca_file.as_deref()).await,
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

/// On a terminal: a progress bar for the download in progress, until it ends.
async fn follow_download(state: &state::StateDir) {
    let Some(first) = state.progress() else {
        return;
    };
    let bar = indicatif::ProgressBar::new(first.total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {percent}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{} {}", first.package, first.version));
    let mut moved = std::time::Instant::now();
    while let Some(p) = state.progress().filter(|p| p.digest == first.digest) {
        if p.received != bar.position() {
            bar.set_position(p.received);
            moved = std::time::Instant::now();
        } else if moved.elapsed() > Duration::from_secs(30) {
            // The agent is not running, or the relay stopped sending.
            bar.abandon_with_message(format!("{} {}: stalled", first.package, first.version));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_with_message(format!("{} {} downloaded", first.package, first.version));
}

/// Enrolls if needed, then polls and converges until stopped.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let state = state::StateDir::open(&args.state_dir)
        .with_context(|| format!("opening state directory {}", args.state_dir.display()))?;
    let _lock = state.lock()?;
    // Where this binary is, before a self-update replaces it.
    selfupdate::pin_binary(args.binary.clone())?;
    journal::recover(&state, &args.install_root).context("finishing an interrupted change")?;
    let mut agent = converge::Agent::new(args.clone(), state)?;
    agent.ensure_enrolled().await?;
    let mut etag: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    // First pass at start-up: converge to the current state without waiting.
    let mut wait = 0;
    loop {
        match agent.client.desired(etag.as_deref(), wait).await {
            Ok(Some((new_etag, desired))) => {
                etag = Some(new_etag);
                agent.set_desired(desired);
                let ok = agent.converge().await;
                if args.once {
                    return if ok {
                        Ok(())
                    } else {
                        anyhow::bail!("some assignments failed; see `caravan-agent status`")
                    };
                }
                backoff = Duration::from_secs(1);
            }
            Ok(None) => {
                agent.converge().await;
            }
            Err(client::ClientError::Unauthorized(msg)) => {
                tracing::warn!(%msg, "credentials refused; enrolling again");
                agent.forget_credentials()?;
                agent.ensure_enrolled().await?;
                continue;
            }
            Err(e) => {
                if args.once {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "polling the relay failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        }
        wait = agent.next_wait(args.poll_wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
