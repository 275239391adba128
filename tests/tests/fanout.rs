//! Many agents asking a relay for the same blob cause one upstream fetch,
//! which they all get while it arrives, and a relay outside its transfer
//! window fetches nothing while its agents wait, told when it opens.

use std::time::Duration;

use caravan_api::v1alpha1::{Agent, Package};
use caravan_tests::{metric, wait_for, Caravan};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use sha2::{Digest, Sha256};

/// Commits a package of `len` random bytes and a job sending it to hq.
async fn package_for_hq(
    c: &Caravan,
    repo: &caravan_tests::git::GitRepo,
    len: usize,
) -> anyhow::Result<Package> {
    let src = c.dir.join("shared");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("data.bin"), caravan_tests::noise(len, 3))?;
    c.push_package(&src, "shared", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.write(
        "fleet/shared-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: shared}\nspec:\n  packages: [{name: shared}]\n  destinations: {sites: [{name: hq}]}\n  \
         rollout: {batches: [{size: 100%}]}\n",
    )?;
    repo.commit("shared for hq")?;
    wait_for("package shared", Duration::from_secs(60), || async {
        Ok(c.api::<Package>().get_opt("shared-1.0.0").await?)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_agents_asking_for_one_cold_blob_cause_one_upstream_fetch_streamed_to_all(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    // Fifty endpoints of site hq, as the controller would have enrolled them.
    for i in 0..50 {
        let agent: Agent = serde_json::from_value(serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
            "metadata": { "name": format!("kiosk-{i}"), "namespace": "fleet" },
            "spec": { "site": "hq", "hostId": format!("kiosk-host-{i:04}") },
        }))?;
        c.api::<Agent>()
            .create(&PostParams::default(), &agent)
            .await?;
    }
    // A slow upstream (1 MB/s), so the requests arrive while the fetch runs.
    c.relay_args = vec!["--upstream-rate-limit".into(), "1000000".into()];
    let relay = c.start_relay("hq").await?;
    let pkg = package_for_hq(&c, &repo, 4_000_000).await?;
    let secret = c.api::<Secret>().get("hq-relay").await?;
    let relay_token = String::from_utf8(secret.data.unwrap()["token"].0.clone())?;

    let http = caravan_tests::http();
    let url = format!("{}/v1/blobs/{}", relay.url, pkg.spec.artifact.digest);
    let expected = pkg.spec.artifact.digest.hex();
    let cached = relay.cache_dir.join("sha256").join(&expected);
    let downloads = (0..50).map(|i| {
        let (http, url, cached) = (http.clone(), url.clone(), cached.clone());
        let token = caravan_net::agent_tokens::issue(&relay_token, &format!("kiosk-{i}"), None);
        async move {
            // Until the relay has the new desired state, the blob is not assigned yet.
            let res = wait_for(
                "the blob to be assigned",
                Duration::from_secs(60),
                || async {
                    let res = http.get(&url).bearer_auth(&token).send().await?;
                    Ok((res.status() != reqwest::StatusCode::FORBIDDEN).then_some(res))
                },
            )
            .await?;
            anyhow::ensure!(res.status().is_success(), "{}", res.status());
            let mut res = res;
            let mut hasher = Sha256::new();
            let mut before_cached = None;
            while let Some(chunk) = res.chunk().await? {
                before_cached.get_or_insert_with(|| !cached.exists());
                hasher.update(&chunk);
            }
            Ok::<_, anyhow::Error>((hex::encode(hasher.finalize()), before_cached == Some(true)))
        }
    });
    let got = futures::future::try_join_all(downloads).await?;
    assert!(
        got.iter().all(|(d, _)| *d == expected),
        "every agent got the right bytes"
    );
    let streamed = got.iter().filter(|(_, early)| *early).count();
    assert_eq!(
        streamed, 50,
        "every agent got its first bytes while the blob was still arriving (4 s at 1 MB/s)"
    );
    let size = pkg.spec.artifact.size as f64;
    // The relay also prestaged the example package its site's job sends.
    let hello = c
        .api::<Package>()
        .get("hello-1.0.0")
        .await?
        .spec
        .artifact
        .size as f64;
    assert_eq!(
        metric(&relay.url, "caravan_relay_upstream_bytes_total").await?,
        size + hello,
        "one upstream fetch each"
    );
    assert_eq!(
        metric(&relay.url, "caravan_relay_served_bytes_total").await?,
        50.0 * size
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_its_transfer_window_a_relay_fetches_nothing_and_its_agents_wait_told_when_it_opens(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    // A window that opens in an hour and lasts an hour.
    let now = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 60
        % 1440) as u32;
    let hhmm = |m: u32| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    c.relay_args = vec![
        "--transfer-window".into(),
        format!("{}-{}", hhmm(now + 60), hhmm(now + 120)),
    ];
    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;
    package_for_hq(&c, &repo, 1000).await?;
    // The agent waits, saying when the window opens; nothing failed.
    let says = format!(
        "waiting for the transfer window, opens {} UTC",
        hhmm(now + 60)
    );
    let state = caravan_tests::wait_for(
        "the agent to wait for the window",
        Duration::from_secs(120),
        || async {
            let agents = c
                .api::<caravan_api::v1alpha1::Agent>()
                .list(&Default::default())
                .await?;
            Ok(agents.items.into_iter().find_map(|a| {
                a.status?
                    .jobs
                    .into_iter()
                    .find(|j| j.package == "shared" && j.message.contains(&says))
            }))
        },
    )
    .await?;
    assert_eq!(
        state.phase,
        caravan_api::wire::AssignmentPhase::Downloading,
        "{state:?}"
    );
    let jobs = c
        .api::<caravan_api::v1alpha1::DistributionJob>()
        .list(&Default::default())
        .await?;
    for j in jobs.items {
        let st = j.status.unwrap_or_default();
        assert!(st.failures.is_empty() && st.failed == 0, "{st:?}");
    }
    assert_eq!(
        metric(&relay.url, "caravan_relay_upstream_bytes_total").await?,
        0.0
    );
    Ok(())
}
