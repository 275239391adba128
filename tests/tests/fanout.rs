//! Many agents asking a relay for the same blob cause one upstream fetch,
//! which they all get while it arrives; the relays of one site sharing a
//! cache claim fetch each blob once between them; and a relay outside its
//! transfer window fetches nothing while its agents wait, told when it opens.

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

/// Enrolls `n` endpoints `kiosk-<i>` at site hq, as the controller would have.
async fn enroll_kiosks(c: &Caravan, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        let agent: Agent = serde_json::from_value(serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "Agent",
            "metadata": { "name": format!("kiosk-{i}"), "namespace": "fleet" },
            "spec": { "site": "hq", "hostId": format!("kiosk-host-{i:04}") },
        }))?;
        c.api::<Agent>()
            .create(&PostParams::default(), &agent)
            .await?;
    }
    Ok(())
}

/// Kiosk `i` downloads `pkg`'s blob from the relay at `relay_url`, once it
/// is assigned there: the blob's sha256, and whether the first bytes came
/// before the blob was in `cache_dir`.
async fn download(
    c: &Caravan,
    relay_url: &str,
    cache_dir: &std::path::Path,
    pkg: &Package,
    i: usize,
) -> anyhow::Result<(String, bool)> {
    let secret = c.api::<Secret>().get("hq-relay").await?;
    let relay_token = String::from_utf8(secret.data.unwrap_or_default()["token"].0.clone())?;
    let token = caravan_net::agent_tokens::issue(&relay_token, &format!("kiosk-{i}"), None);
    let http = caravan_tests::http();
    let url = format!("{relay_url}/v1/blobs/{}", pkg.spec.artifact.digest);
    let cached = cache_dir
        .join("sha256")
        .join(pkg.spec.artifact.digest.hex());
    // Until the relay has the new desired state, the blob is not assigned yet.
    let mut res = wait_for(
        "the blob to be assigned",
        Duration::from_secs(60),
        || async {
            let res = http.get(&url).bearer_auth(&token).send().await?;
            Ok((res.status() != reqwest::StatusCode::FORBIDDEN).then_some(res))
        },
    )
    .await?;
    anyhow::ensure!(res.status().is_success(), "{}", res.status());
    let mut hasher = Sha256::new();
    let mut before_cached = None;
    while let Some(chunk) = res.chunk().await? {
        before_cached.get_or_insert_with(|| !cached.exists());
        hasher.update(&chunk);
    }
    Ok((hex::encode(hasher.finalize()), before_cached == Some(true)))
}

/// The size of the example package `hello`, which relays of hq prestage.
async fn hello_size(c: &Caravan) -> anyhow::Result<f64> {
    let hello = c.api::<Package>().get("hello-1.0.0").await?;
    Ok(hello.spec.artifact.size as f64)
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_agents_asking_for_one_cold_blob_cause_one_upstream_fetch_streamed_to_all(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    enroll_kiosks(&c, 50).await?;
    // A slow upstream (1 MB/s), so the requests arrive while the fetch runs.
    c.relay_args = vec!["--upstream-rate-limit".into(), "1000000".into()];
    // Plain HTTP, where a cached blob is sent from its file (`sendfile`).
    c.relay_plaintext = true;
    let relay = c.start_relay("hq").await?;
    let pkg = package_for_hq(&c, &repo, 4_000_000).await?;
    let downloads = (0..50).map(|i| download(&c, &relay.url, &relay.cache_dir, &pkg, i));
    let got = futures::future::try_join_all(downloads).await?;
    let expected = pkg.spec.artifact.digest.hex();
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
    assert_eq!(
        metric(&relay.url, "caravan_relay_upstream_bytes_total").await?,
        size + hello_size(&c).await?,
        "one upstream fetch each"
    );
    assert_eq!(
        metric(&relay.url, "caravan_relay_served_bytes_total").await?,
        50.0 * size
    );
    // Once cached, the blob goes from its file to the socket: whole, and a
    // range of it, the same bytes as streamed.
    let zero_copy = "caravan_relay_zero_copy_responses_total";
    assert_eq!(metric(&relay.url, zero_copy).await?, 0.0, "all streamed");
    let (digest, early) = download(&c, &relay.url, &relay.cache_dir, &pkg, 7).await?;
    assert_eq!((digest.as_str(), early), (expected.as_str(), false));
    let secret = c.api::<Secret>().get("hq-relay").await?;
    let relay_token = String::from_utf8(secret.data.unwrap_or_default()["token"].0.clone())?;
    let res = caravan_tests::http()
        .get(format!(
            "{}/v1/blobs/{}",
            relay.url, pkg.spec.artifact.digest
        ))
        .bearer_auth(caravan_net::agent_tokens::issue(
            &relay_token,
            "kiosk-3",
            None,
        ))
        .header("Range", "bytes=1000-1999")
        .send()
        .await?;
    assert_eq!(res.status(), 206);
    let cached = std::fs::read(relay.cache_dir.join("sha256").join(&expected))?;
    assert_eq!(&res.bytes().await?[..], &cached[1000..2000]);
    assert_eq!(metric(&relay.url, zero_copy).await?, 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relay_replicas_sharing_a_cache_claim_fetch_each_blob_once_between_them(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    enroll_kiosks(&c, 20).await?;
    let site = std::fs::read_to_string(repo.work.join("fleet/site.yaml"))?;
    repo.write(
        "fleet/site.yaml",
        &site.replace(
            "    replicas: 1\n",
            "    replicas: 2\n    cache: {size: 1Gi, persistent: true}\n",
        ),
    )?;
    repo.commit("hq: two relays on one cache")?;
    let deployments = c.api::<k8s_openapi::api::apps::v1::Deployment>();
    wait_for(
        "hq-relay with two replicas",
        Duration::from_secs(60),
        || async {
            let d = deployments.get_opt("hq-relay").await?;
            Ok(d.filter(|d| d.spec.as_ref().and_then(|s| s.replicas) == Some(2)))
        },
    )
    .await?;
    // Both fetch slowly (1 MB/s), so both have agents asking while the blob arrives.
    c.relay_args = vec!["--upstream-rate-limit".into(), "1000000".into()];
    let relays = [
        c.start_relay("hq").await?,
        c.start_relay_replica("hq", 1).await?,
    ];
    assert_eq!(
        relays[0].cache_dir, relays[1].cache_dir,
        "the pods mount the same claim"
    );
    let pkg = package_for_hq(&c, &repo, 3_000_000).await?;
    let downloads = (0..20).map(|i| {
        let relay = &relays[i % 2];
        download(&c, &relay.url, &relay.cache_dir, &pkg, i)
    });
    let got = futures::future::try_join_all(downloads).await?;
    let expected = pkg.spec.artifact.digest.hex();
    assert!(
        got.iter().all(|(d, _)| *d == expected),
        "every agent got the right bytes from either relay"
    );
    for (r, relay) in relays.iter().enumerate() {
        let early = got.iter().skip(r).step_by(2).filter(|(_, early)| *early);
        assert!(
            early.count() > 0,
            "agents of {} got bytes while the blob arrived",
            relay.url
        );
    }
    let size = pkg.spec.artifact.size as f64;
    let mut upstream = 0.0;
    for relay in &relays {
        upstream += metric(&relay.url, "caravan_relay_upstream_bytes_total").await?;
        assert_eq!(
            metric(&relay.url, "caravan_relay_served_bytes_total").await?,
            10.0 * size,
            "each relay served its ten agents"
        );
    }
    assert_eq!(
        upstream,
        size + hello_size(&c).await?,
        "both relays prestage both blobs, yet each crossed the upstream link once"
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
