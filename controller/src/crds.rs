//! The controller's own CustomResourceDefinitions, applied at start
//! (`--apply-crds`, which the chart sets): Helm installs a chart's CRDs
//! only with the release and never upgrades them, so without this a
//! `helm upgrade` would leave the schema of the release before, and the
//! API server would drop every field the new release adds.
//!
//! CRDs only move forward: each carries the release that wrote it
//! ([`caravan_api::labels::CRD_RELEASE`]), and a controller never applies
//! its CRDs over those of a newer release (an old replica still running
//! during an upgrade, or a `helm rollback`, keeps the newer schema, which
//! holds every field the older one has). A stored version a CRD would drop
//! is refused by the API server, and the controller does not start.

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{Patch, PatchParams},
    Api, ResourceExt,
};
use semver::Version;

/// Field manager of the CRDs the controller applies.
const MANAGER: &str = "caravan-crds";

/// Whether a controller of release `ours` applies its CRD over one that
/// release `theirs` wrote (none: written before CRDs said, or by hand).
pub fn applies_over(ours: &str, theirs: Option<&str>) -> bool {
    match (Version::parse(ours), theirs.map(Version::parse)) {
        (Ok(ours), Some(Ok(theirs))) => ours >= theirs,
        _ => true,
    }
}

/// Applies every CRD of this release that no newer release wrote.
pub async fn apply(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    for crd in caravan_api::v1alpha1::crds() {
        let name = crd.name_any();
        let current = api
            .get_opt(&name)
            .await
            .with_context(|| format!("reading CustomResourceDefinition {name}"))?;
        let theirs = current.as_ref().and_then(|c| {
            c.annotations()
                .get(caravan_api::labels::CRD_RELEASE)
                .cloned()
        });
        if current.is_some() && !applies_over(caravan_api::RELEASE, theirs.as_deref()) {
            tracing::info!(crd = %name, release = ?theirs, "CRD of a newer release kept");
            continue;
        }
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| {
                format!(
                    "applying CustomResourceDefinition {name} of release {} (over {}): the controller needs get and patch on it (the chart's ClusterRole), and one that does not exist yet (a new kind: Helm installs a chart's CRDs only with the release) must be applied first: kubectl apply --server-side -f crds/",
                    caravan_api::RELEASE,
                    theirs.as_deref().unwrap_or("one that names no release")
                )
            })?;
    }
    tracing::info!(release = caravan_api::RELEASE, "CRDs applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::applies_over;

    #[test]
    fn crds_only_move_forward() {
        assert!(applies_over("0.3.0", Some("0.2.0")));
        assert!(applies_over("0.3.0", Some("0.3.0")), "the same again");
        assert!(applies_over("0.3.0", None), "one that names no release");
        assert!(applies_over("0.3.0", Some("garbage")));
        assert!(!applies_over("0.2.0", Some("0.3.0")), "a rollback keeps it");
        assert!(!applies_over("0.2.5", Some("1.0.0")));
    }
}
