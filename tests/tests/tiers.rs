//! A three-level tree of sites (hq → region → branch): the branch relay takes
//! content from the region relay (at the address the region's Site
//! declares, over HTTPS), which takes it from hq's (at its Service), which
//! takes it from the controller, so each blob crosses each link exactly
//! once, while control traffic still goes to the controller.

use std::time::Duration;

use caravan_api::v1alpha1::Package;
use caravan_tests::{metric, wait_for, Caravan};
use k8s_openapi::api::core::v1::Secret;

#[tokio::test(flavor = "multi_thread")]
async fn each_blob_crosses_each_link_of_a_three_level_tree_once() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    // The region's relay declares the address the sites below reach it at
    // (as one run outside the cluster would); hq's is reached at its Service.
    let region_port = caravan_tests::procs::free_port();
    for (site, spec) in [
        (
            "region",
            format!("{{parent: hq, relay: {{url: \"https://localhost:{region_port}\"}}}}"),
        ),
        ("branch", "{parent: region}".to_string()),
    ] {
        repo.write(
            &format!("fleet/{site}-site.yaml"),
            &format!("apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {{name: {site}}}\nspec: {spec}\n"),
        )?;
    }
    repo.commit("Two sites below hq")?;
    c.relay_args = vec!["--stats-interval-seconds".into(), "1".into()];
    let hq = c.start_relay("hq").await?;
    let region = c.start_relay_at("region", region_port).await?;
    let branch = c.start_relay("branch").await?;
    let (args, env) = c
        .cluster
        .container_command(
            &c.namespace,
            "branch-relay",
            &c.dir.join("node/inspect"),
            &c.dir.join("claims"),
        )
        .await?;
    assert!(
        env.contains(&(
            "CARAVAN_CONTENT_UPSTREAM".into(),
            format!("https://localhost:{region_port}")
        )),
        "the branch relay reaches the region's at its declared address: {env:?}"
    );
    assert!(args.contains(&"--content-upstream-ca-file".to_string()));
    c.start_agent("at-hq", &hq)?;
    c.start_agent("at-branch", &branch)?;
    // hello-everywhere targets hq and every site below it.
    c.wait_job(
        "hello-everywhere",
        "Succeeded",
        "2/2",
        Duration::from_secs(120),
    )
    .await?;
    for a in &c.agents {
        assert!(
            a.install_root.join("hello/bin/hello").exists(),
            "{}",
            a.name
        );
    }

    let size = c
        .api::<Package>()
        .get("hello-1.0.0")
        .await?
        .spec
        .artifact
        .size as f64;
    assert_eq!(
        metric(&c.api_url, "caravan_store_served_bytes_total").await?,
        size,
        "controller → hq once"
    );
    for (name, relay) in [("hq", &hq), ("region", &region), ("branch", &branch)] {
        let up = metric(&relay.url, "caravan_relay_upstream_bytes_total").await?;
        assert_eq!(up, size, "{name} fetched the blob once");
    }
    // hq served its agent and the region relay; region served the branch relay.
    assert_eq!(
        metric(&hq.url, "caravan_relay_served_bytes_total").await?,
        2.0 * size
    );
    assert_eq!(
        metric(&region.url, "caravan_relay_served_bytes_total").await?,
        size
    );
    assert_eq!(
        metric(&branch.url, "caravan_relay_served_bytes_total").await?,
        size
    );

    // The branch relay's credential at the region relay fetches blobs, nothing else.
    let secret = c.api::<Secret>().get("branch-relay").await?;
    let token = String::from_utf8(secret.data.unwrap()["content-token"].0.clone())?;
    let res = caravan_tests::http()
        .get(format!("{}/v1/desired", region.url))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(res.status(), 403);
    let res = caravan_tests::http()
        .get(format!("{}/v1/desired", hq.url))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(res.status(), 401, "and only at its own parent");

    // Each Site's status shows its relay's cache and traffic.
    let stats = wait_for(
        "the branch Site to show its relay's figures",
        Duration::from_secs(60),
        || async {
            Ok(c.site("branch")
                .await?
                .status
                .and_then(|s| s.relay)
                .filter(|r| r.served_bytes > 0))
        },
    )
    .await?;
    assert_eq!(
        (stats.upstream_bytes, stats.cache_bytes, stats.served_bytes),
        (size as u64, size as u64, size as u64)
    );
    let table = c.cluster.kubectl(&["get", "sites", "-n", "fleet"])?;
    assert!(
        table.contains("CACHE")
            && table
                .lines()
                .any(|l| l.starts_with("branch") && l.contains(&format!("{}", size as u64))),
        "{table}"
    );
    Ok(())
}
