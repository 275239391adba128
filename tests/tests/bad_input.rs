//! Bad input gets a clear error that names the problem, and nothing already
//! working is lost: a malformed manifest, unknown references, a tampered blob.

use std::time::Duration;

use caravan_api::{
    conditions,
    v1alpha1::{DistributionJob, GitSource, Package},
};
use caravan_tests::{wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_a_reason_and_breaks_nothing() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    let sources = c.api::<GitSource>();
    let good = sources
        .get("fleet")
        .await?
        .status
        .unwrap()
        .last_applied_revision
        .unwrap();

    // 1. A malformed manifest: the whole revision is refused, the file named,
    //    the last good revision stays applied.
    repo.write("fleet/broken.yaml", "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: broken}\nspec:\n  packages: [\n")?;
    repo.write(
        "fleet/also-new.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {name: second}\nspec: {}\n",
    )?;
    let bad = repo.commit("A broken job")?;
    let status = wait_for("GitSource to refuse the broken revision", T, || async {
        let st = sources.get("fleet").await?.status.unwrap_or_default();
        Ok((st.last_attempted_revision.as_deref() == Some(bad.as_str())).then_some(st))
    })
    .await?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "InvalidManifest");
    assert!(
        ready.message.contains("fleet/broken.yaml") && ready.message.contains("invalid YAML"),
        "{}",
        ready.message
    );
    assert_eq!(
        status.last_applied_revision.as_deref(),
        Some(good.as_str()),
        "last good revision kept"
    );
    assert_eq!(status.errors[0].file, "fleet/broken.yaml");
    // Nothing of the bad revision was applied, nothing of the good one lost.
    assert!(c
        .api::<caravan_api::v1alpha1::Cabinet>()
        .get_opt("second")
        .await?
        .is_none());
    assert!(c
        .api::<DistributionJob>()
        .get_opt("hello-everywhere")
        .await?
        .is_some());
    assert!(c.agents[0].install_root.join("hello/VERSION").exists());
    // A schema problem is named with its field.
    repo.write("fleet/broken.yaml", "apiVersion: caravan.dev/v1alpha1\nkind: Package\nmetadata: {name: nameless}\nspec: {cabinet: main, version: '1', artifact: {digest: 'sha256:00', size: 1}}\n")?;
    let bad = repo.commit("A package without a name")?;
    let status = wait_for("GitSource to refuse the invalid package", T, || async {
        let st = sources.get("fleet").await?.status.unwrap_or_default();
        Ok((st.last_attempted_revision.as_deref() == Some(bad.as_str())).then_some(st))
    })
    .await?;
    assert!(
        status.errors[0].message.contains("spec") && status.errors[0].message.contains("name"),
        "{:?}",
        status.errors
    );

    // 2. Unknown references: a condition on the job, not a crash.
    repo.remove("fleet/broken.yaml")?;
    repo.write("fleet/ghost.yaml", "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: ghost}\nspec:\n  packages: [{name: nope}]\n  destinations: {sites: [{name: atlantis}]}\n")?;
    repo.commit("A job with unknown references")?;
    let ghost = wait_for(
        "job ghost to report its unresolved references",
        T,
        || async {
            let job = c.api::<DistributionJob>().get_opt("ghost").await?;
            Ok(job.and_then(|j| j.status).and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == conditions::RESOLVED_REFS && c.status == "False")
            }))
        },
    )
    .await?;
    assert!(
        ghost.message.contains("package nope not found")
            && ghost.message.contains("site atlantis not found"),
        "{}",
        ghost.message
    );
    let st = sources.get("fleet").await?.status.unwrap();
    assert!(
        conditions::is_true(&st.conditions, conditions::READY),
        "a dangling reference is not a manifest error"
    );
    // A Site whose relay the API server refuses says why and waits for a fix.
    repo.write("fleet/bad-site.yaml", "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: lagos}\nspec:\n  relay: {replicas: -1}\n")?;
    repo.commit("A site with an impossible relay")?;
    let stalled = wait_for("site lagos to stall", T, || async {
        let site = c
            .api::<caravan_api::v1alpha1::Site>()
            .get_opt("lagos")
            .await?;
        Ok(site.and_then(|s| s.status).and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == conditions::STALLED && c.status == "True")
        }))
    })
    .await?;
    assert_eq!(stalled.reason, "WorkloadRefused");
    assert!(stalled.message.contains("replicas"), "{}", stalled.message);
    repo.remove("fleet/bad-site.yaml")?;
    repo.commit("No lagos after all")?;

    // 3. A tampered blob: the relay's cached copy is replaced by other bytes of
    //    the same size; the agent refuses it and the job names the reason.
    let dir = c.dir.join("tampered-src");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("payload"), "genuine content")?;
    c.push_package(&dir, "tampered", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.commit("tampered 1.0.0")?;
    let pkg = wait_for("package tampered-1.0.0", T, || async {
        Ok(c.api::<Package>().get_opt("tampered-1.0.0").await?)
    })
    .await?;
    let hex = pkg.spec.artifact.digest.hex();
    std::fs::create_dir_all(relay.cache_dir.join("sha256"))?;
    std::fs::write(
        relay.cache_dir.join("sha256").join(&hex),
        vec![b'x'; pkg.spec.artifact.size as usize],
    )?;
    repo.write("fleet/tampered-job.yaml", "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: tampered}\nspec:\n  packages: [{name: tampered}]\n  destinations: {sites: [{name: hq}]}\n")?;
    repo.commit("Send the tampered package")?;
    let job = c.wait_job("tampered", "Failed", "0/1", T).await?;
    let st = job.status.unwrap();
    assert_eq!(st.failed, 1);
    assert_eq!(st.failures[0].package, "tampered");
    assert!(
        st.failures[0].reason.contains("digest mismatch"),
        "{}",
        st.failures[0].reason
    );
    assert!(
        !c.agents[0].install_root.join("tampered").exists(),
        "nothing installed from a tampered blob"
    );
    let table = c
        .cluster
        .kubectl(&["get", "distributionjobs", "-n", "fleet"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("tampered"))
        .unwrap_or_default();
    assert!(row.contains("Failed") && row.contains("0/1"), "{table}");
    // The working package is untouched.
    assert!(c.agents[0].install_root.join("hello/VERSION").exists());
    // Once the relay holds the genuine blob again, the destination recovers
    // and its failure leaves the job's status (with the Git sync applying the
    // job every 2 seconds meanwhile).
    std::fs::remove_file(relay.cache_dir.join("sha256").join(&hex))?;
    let job = c.wait_job("tampered", "Succeeded", "1/1", T).await?;
    let st = job.status.unwrap();
    assert_eq!(st.failed, 0);
    assert!(st.failures.is_empty(), "a stale failure: {:?}", st.failures);
    let failed = st
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::FAILED)
        .unwrap();
    assert_eq!(failed.status, "False", "{}", failed.message);

    // 4. Enrolling with another machine's host ID, without its secret, is
    //    refused: nobody can take over an enrolled identity.
    let host_id = std::fs::read_to_string(c.agents[0].state_dir.join("host-id"))?;
    let enroll = |token: &str| {
        caravan_tests::http()
            .post(format!("{}/v1/enroll", relay.url))
            .bearer_auth(token)
            .json(&serde_json::json!({
                "hostId": host_id.trim(), "hostname": "intruder", "os": "linux", "arch": "x86_64",
                "version": "0", "secret": "f".repeat(64),
            }))
    };
    let res = enroll(&relay.bootstrap_token).send().await?;
    assert_eq!(res.status(), 409);
    assert!(res.text().await?.contains("enrolled already"));
    assert_eq!(
        enroll("not-the-bootstrap-token").send().await?.status(),
        401
    );

    // 5. A suspended job hands out nothing new and takes nothing away.
    let job = std::fs::read_to_string(repo.work.join("fleet/job.yaml"))?;
    repo.write(
        "fleet/job.yaml",
        &job.replace("spec:\n", "spec:\n  suspend: true\n"),
    )?;
    repo.commit("Pause hello")?;
    wait_for("job hello-everywhere to be suspended", T, || async {
        let j = c.api::<DistributionJob>().get("hello-everywhere").await?;
        Ok(j.status
            .filter(|s| s.phase == caravan_api::v1alpha1::JobPhase::Suspended))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        c.agents[0].install_root.join("hello/VERSION").exists(),
        "suspending a job removes nothing"
    );
    Ok(())
}
