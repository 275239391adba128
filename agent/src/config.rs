//! The agent's configuration as the rest of it uses it: read from the
//! command line and environment ([`crate::RunArgs`]) once, trusted keys
//! loaded, the hostname resolved.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use caravan_api::signing;
use ed25519_dalek::VerifyingKey;

use crate::RunArgs;

#[derive(Clone, Debug)]
pub struct Config {
    /// URL of the site's relay.
    pub server: String,
    /// CA the relay's certificate is verified with (default: web PKI roots).
    pub ca_file: Option<PathBuf>,
    /// A plaintext relay is accepted.
    pub insecure: bool,
    /// Keys whose package signatures this agent accepts (its own, never the relay's).
    pub trusted_keys: Vec<VerifyingKey>,
    /// The site's bootstrap token, needed only to enroll.
    pub bootstrap_token: Option<String>,
    /// The sha256 of the root of trust to pin at enrollment.
    pub trust_root_sha256: Option<String>,
    pub state_dir: PathBuf,
    pub install_root: PathBuf,
    /// Where a new state directory's host ID is derived from, if not made
    /// at random.
    pub host_id_from: Option<PathBuf>,
    pub hostname: String,
    /// What the agent says about the endpoint (read once at start).
    pub facts: caravan_api::facts::Facts,
    /// Longest a poll waits for a change, in seconds.
    pub poll_wait: u64,
    /// How long a failed assignment waits before it is tried again.
    pub retry_after: Duration,
    /// The file self-updates replace (default: this executable).
    pub binary: Option<PathBuf>,
    /// Most bytes one package may unpack to (and never more than nine
    /// tenths of the free space in the install root).
    pub max_unpacked_bytes: u64,
    /// Whom package scripts run as (`None`: the agent's own user).
    pub script_user: Option<crate::transaction::scripts::RunAs>,
    /// Slowest a download may be before it is given up (slow retrieval).
    pub min_download_rate: crate::client::MinRate,
    /// Where the agent's figures go (Prometheus text format), if anywhere.
    pub metrics_file: Option<PathBuf>,
    /// Converge once and exit.
    pub once: bool,
    /// The release the agent says it is of (its own, unless told otherwise
    /// to try the release window).
    pub release: String,
}

impl Config {
    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        caravan_net::require_https(&args.server, args.insecure, "--server")?;
        let mut trusted_keys = Vec::new();
        for path in &args.trusted_keys {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading trusted key {}", path.display()))?;
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                trusted_keys.push(
                    signing::parse_public(line)
                        .with_context(|| format!("trusted key file {}", path.display()))?,
                );
            }
        }
        let (mut bootstrap_token, mut trust_root_sha256, mut ca_file) =
            (args.bootstrap_token, args.trust_root_sha256, args.ca_file);
        // The bundle's CA, kept with the agent's state from its first use:
        // pinned from then on, even once the bundle (which holds a token) is
        // gone or `--bundle` dropped.
        let kept_ca = args.state_dir.join("bundle-ca.crt");
        match &args.bundle {
            Some(path) if path.exists() || !kept_ca.exists() => {
                let bundle = read_bundle(path)?;
                bootstrap_token.get_or_insert(bundle.bootstrap_token);
                trust_root_sha256.get_or_insert(bundle.trust_root_sha256);
                if ca_file.is_none() {
                    if !kept_ca.exists() {
                        std::fs::create_dir_all(&args.state_dir)?;
                        crate::state::write_atomic(&kept_ca, bundle.ca.as_bytes())?;
                    }
                    ca_file = Some(kept_ca);
                }
            }
            _ => {
                if ca_file.is_none() && kept_ca.exists() {
                    ca_file = Some(kept_ca);
                }
            }
        }
        // (An empty entry, as `CARAVAN_LABELS=` or a trailing comma gives, is none.)
        let labels = args
            .labels
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .map(crate::parse_label)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--label: {e}"))?;
        let facts = caravan_api::facts::Facts::of_this_machine(labels);
        caravan_api::facts::check(&facts).map_err(|e| anyhow::anyhow!("--label: {e}"))?;
        Ok(Self {
            server: args.server,
            ca_file,
            insecure: args.insecure,
            trusted_keys,
            // (`CARAVAN_BOOTSTRAP_TOKEN=`, as the example file has it, is none.)
            bootstrap_token: bootstrap_token.filter(|t| !t.is_empty()),
            trust_root_sha256,
            state_dir: args.state_dir,
            install_root: args.install_root,
            host_id_from: args.host_id_from,
            hostname: args.hostname.unwrap_or_else(system_hostname),
            facts,
            poll_wait: args.poll_wait,
            retry_after: Duration::from_secs(args.retry_after),
            binary: args.binary,
            max_unpacked_bytes: args.max_unpacked_bytes,
            script_user: args
                .script_user
                .as_deref()
                .map(crate::transaction::scripts::RunAs::user)
                .transpose()?,
            min_download_rate: crate::client::MinRate {
                bytes_per_second: args.min_download_rate,
                window: Duration::from_secs(args.download_window_seconds.max(1)),
            },
            metrics_file: args.metrics_file,
            once: args.once,
            release: args.claim_release,
        })
    }
}

/// Reads an enrollment bundle (a small JSON file), if it is the agent's
/// own: nobody else may have written what it pins.
fn read_bundle(path: &std::path::Path) -> anyhow::Result<caravan_api::trust::EnrollmentBundle> {
    use std::{io::Read as _, os::unix::fs::MetadataExt as _};
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("reading enrollment bundle {}", path.display()))?;
    anyhow::ensure!(
        meta.is_file()
            && meta.uid() == rustix::process::geteuid().as_raw()
            && meta.mode() & 0o022 == 0,
        "enrollment bundle {} must be a file of the agent's own user that nobody else can write",
        path.display()
    );
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut text))
        .with_context(|| format!("reading enrollment bundle {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not an enrollment bundle (from `caravan token create --bundle`)",
            path.display()
        )
    })
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
