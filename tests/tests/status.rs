//! The controller writes status under a field manager of its own. Status an
//! earlier release wrote under the Git sync's manager is taken over: a
//! failure only that manager held goes once the computed status no longer
//! lists it, and an object whose status is current is left alone.

use std::time::Duration;

use caravan_api::{conditions, v1alpha1::DistributionJob};
use caravan_tests::{wait_for, Caravan};
use kube::api::{Patch, PatchParams};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn status_an_earlier_release_wrote_is_taken_over_and_a_stale_failure_goes(
) -> anyhow::Result<()> {
    let c = Caravan::start("fleet").await?;
    let jobs = c.api::<DistributionJob>();
    // A job aimed at a site that does not exist: no destination, so no failure.
    let job = json!({
        "apiVersion": "caravan.dev/v1alpha1", "kind": "DistributionJob",
        "metadata": { "name": "legacy" },
        "spec": { "packages": [{ "name": "hello" }], "destinations": { "sites": [{ "name": "atlantis" }] } },
    });
    jobs.patch(
        "legacy",
        &PatchParams::apply("caravan-tests"),
        &Patch::Apply(&job),
    )
    .await?;
    let computed = wait_for("the engine to write the job's status", T, || async {
        Ok(jobs
            .get("legacy")
            .await?
            .status
            .filter(|s| s.observed_generation.is_some()))
    })
    .await?;
    assert!(computed.failures.is_empty());

    // What the previous release did: status applied under `caravan`, here
    // with a failure the computed status does not hold.
    let mut legacy = serde_json::to_value(&computed)?;
    legacy["failed"] = json!(1);
    legacy["failures"] =
        json!([{ "agent": "ghost", "site": "hq", "package": "hello", "reason": "stale" }]);
    let patch = json!({ "apiVersion": "caravan.dev/v1alpha1", "kind": "DistributionJob", "status": legacy });
    jobs.patch_status(
        "legacy",
        &PatchParams::apply("caravan").force(),
        &Patch::Apply(&patch),
    )
    .await?;

    let status = wait_for("the stale failure to go", T, || async {
        let st = jobs.get("legacy").await?.status.unwrap_or_default();
        Ok((st.failures.is_empty() && st.failed == 0).then_some(st))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    let resolved = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::RESOLVED_REFS)
        .expect("the rest of the status stays");
    assert_eq!(resolved.status, "False");
    let obj = jobs.get("legacy").await?;
    let legacy_owner = obj.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some("caravan")
            && m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:status"))
                .and_then(|s| s.as_object())
                .is_some_and(|s| !s.is_empty())
    });
    assert!(!legacy_owner, "{:#?}", obj.metadata.managed_fields);

    // Current now: the controller leaves the object alone.
    let version = obj.metadata.resource_version.clone();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(jobs.get("legacy").await?.metadata.resource_version, version);
    Ok(())
}
