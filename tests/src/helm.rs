//! Helm, through `scripts/helm.py` (the Helm v4 SDK from PyPI).

use crate::{cache_dir, repo_root};

/// Values of the release the Helm test installs. No PVC (nothing binds it
/// here), and neither the chart's certificate nor the webhook: the harness
/// runs the controller on a loopback port, where neither the Service DNS name
/// the chart's certificate is for nor the Service the webhook points at
/// exist; the controller serves a certificate from its own CA instead. (The
/// chart-certificate and webhook paths are tested with the harness's own
/// certificate.)
/// The controller manages the harness's namespace.
pub const HELM_TEST_VALUES: &str = r#"{"persistence":{"enabled":false},"tls":{"enabled":false},"webhook":{"enabled":false},"watchNamespace":"fleet"}"#;

/// Namespace the Helm release goes into.
pub const HELM_NAMESPACE: &str = "caravan-system";

/// Runs `scripts/helm.py` (the Helm v4 SDK) with the virtualenv `scripts/setup.sh` made.
pub fn helm(args: &[&str]) -> anyhow::Result<String> {
    let python = cache_dir().join("helm-venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} not found: run scripts/setup.sh",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(repo_root().join("scripts/helm.py"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm {}: {}{}",
        args[0],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
