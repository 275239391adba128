//! The test harness: a real kube-apiserver and etcd (or an existing cluster's
//! kubeconfig), and real controller, relay and agent processes, with real Git
//! repositories. Used by the end-to-end tests and by the demo.
//!
//! - [`cluster`]: the API server, and playing the node for Deployments;
//! - [`caravan`]: one installation (controller, CLI, API, waits for jobs);
//! - [`caravan::nodes`]: its relays and agents as local processes; [`procs`]: processes;
//! - [`git`]: Git repositories; [`helm`]: the chart; [`waits`]: deadlines;
//! - [`fixtures`]: the example fleet, certificates, data.
//!
//! Environment:
//! - `CARAVAN_TEST_KUBECONFIG`: use this cluster instead of starting one.
//! - `CARAVAN_K8S_BIN`: directory holding `kube-apiserver` (default: the
//!   cache `scripts/setup.sh` fills, `~/.cache/caravan/k8s-v1.20.2/bin`).
//! - `CARAVAN_BIN_DIR`: directory of the Caravan binaries (default: next to
//!   the running test, i.e. `target/debug`).
//! - `CARAVAN_KEEP=1`: keep the temporary directory (logs, state) after the run.

pub mod caravan;
pub mod cluster;
pub mod fixtures;
pub mod git;
pub mod githost;
pub mod helm;
pub mod procs;
pub mod registry;
pub mod service;
pub mod tamper;
pub mod waits;

use std::path::{Path, PathBuf};

use anyhow::bail;

pub use caravan::nodes::{AgentProc, RelayInfo};
pub use caravan::{Caravan, Install, Options};
pub use cluster::{override_args, Cluster};
pub use fixtures::{
    copy_dir, http, http_as, http_builder, noise, report_as, trust, write_noise, TestTls,
};
pub use helm::{helm, HELM_NAMESPACE, HELM_TEST_VALUES};
pub use procs::{free_port, Proc};
pub use waits::{metric, wait_for};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// Directory of the Caravan binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CARAVAN_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe has a directory");
    // Test binaries live in target/<profile>/deps, the demo in target/<profile>.
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} not found; build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Where `scripts/setup.sh` caches slow builds.
pub fn cache_dir() -> PathBuf {
    std::env::var("CARAVAN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(&std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/caravan")
        })
}
