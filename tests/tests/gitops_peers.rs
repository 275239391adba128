//! Living next to Flux and Argo CD: the fleet's manifests applied by
//! another GitOps tool (here `kubectl apply --server-side` under that
//! tool's field manager, which is what Flux's kustomize-controller and Argo
//! CD's server-side sync do) work as if Caravan's GitSource had applied
//! them, and Caravan neither fights over them (it owns only their status)
//! nor prunes them (a GitSource prunes only what it applied itself).

use std::time::Duration;

use caravan_api::v1alpha1::{Cabinet, DistributionJob, Package, Site};
use caravan_tests::{wait_for, Caravan};
use kube::{api::ListParams, Resource, ResourceExt};

const T: Duration = Duration::from_secs(120);
const PEER: &str = "kustomize-controller";

/// A field manager and the top-level fields it owns.
type Managed = (String, Vec<String>);

/// Who manages what in `obj`: each manager and the top-level fields it
/// owns (`f:spec`, `f:status`, …; API servers before 1.22 do not name the
/// subresource).
fn managers<K: Resource>(obj: &K) -> Vec<Managed> {
    obj.meta()
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            let fields = m
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.as_object().map(|o| o.keys().cloned().collect()))
                .unwrap_or_default();
            (m.manager.clone().unwrap_or_default(), fields)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_applied_by_another_gitops_tool_are_served_and_neither_fought_over_nor_pruned(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("peers").await?;
    let repo = c.example_fleet().await?;
    let fleet = repo.work.join("fleet").display().to_string();
    let apply = |c: &Caravan| {
        c.cluster.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            PEER,
            "-n",
            &c.namespace,
            "-R",
            "-f",
            &fleet,
        ])
    };
    apply(&c)?;
    // A Caravan GitSource in the same namespace, with prune, for other things.
    repo.write(
        "other/branch.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec: {}\n",
    )?;
    repo.commit("a site of Caravan's own")?;
    c.add_git_source("other", &repo.url(), "other", 1).await?;

    let relay = c.start_relay("hq").await?;
    c.start_agent("desk", &relay)?;
    let (_, root) = c.agent_dirs("desk");
    wait_for("hello installed from the peer's manifests", T, || async {
        Ok(root.join("hello/bin/hello").exists().then_some(()))
    })
    .await?;
    wait_for("Caravan's own site", T, || async {
        Ok(c.api::<Site>().get_opt("branch").await?.map(|_| ()))
    })
    .await?;
    // Several prune passes of the GitSource later, the peer's objects stay,
    // and the peer applying again meets no conflict.
    tokio::time::sleep(Duration::from_secs(4)).await;
    apply(&c)?;
    let job = c.api::<DistributionJob>().get("hello-everywhere").await?;
    let site = c.api::<Site>().get("hq").await?;
    let cabinet = c.api::<Cabinet>().get("main").await?;
    let packages = c.api::<Package>().list(&ListParams::default()).await?;
    assert!(!packages.items.is_empty());
    let mut all: Vec<(String, Vec<Managed>, bool)> = vec![
        (
            job.name_any(),
            managers(&job),
            job.labels().contains_key("caravan.dev/source"),
        ),
        (
            site.name_any(),
            managers(&site),
            site.labels().contains_key("caravan.dev/source"),
        ),
        (
            cabinet.name_any(),
            managers(&cabinet),
            cabinet.labels().contains_key("caravan.dev/source"),
        ),
    ];
    for p in &packages.items {
        all.push((
            p.name_any(),
            managers(p),
            p.labels().contains_key("caravan.dev/source"),
        ));
    }
    for (name, managers, labelled) in all {
        assert!(!labelled, "{name}: not marked as a GitSource's");
        assert!(
            managers
                .iter()
                .any(|(m, f)| m == PEER && f.iter().any(|f| f == "f:spec")),
            "{name}: the peer manages its spec: {managers:?}"
        );
        for (m, fields) in &managers {
            if m.starts_with("caravan") {
                assert_eq!(
                    fields,
                    &["f:status"],
                    "{name}: Caravan ({m}) owns only status: {managers:?}"
                );
            }
        }
    }
    // Caravan did its part on them: statuses written.
    let st = job.status.unwrap_or_default();
    assert_eq!(st.progress, "1/1", "{st:?}");
    Ok(())
}
