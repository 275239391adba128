//! The walking skeleton end to end: a commit in Git → controller → relay →
//! three agents → files installed, job Succeeded 3/3 in the API and kubectl;
//! then an upgrade (an agent that was off during it catches up when it
//! starts), then the job removed from Git and the files with it.

use std::time::Duration;

use caravan_api::{
    conditions,
    v1alpha1::{Agent, DistributionJob},
};
use caravan_tests::{copy_dir, metric, repo_root, wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_reaches_three_agents_then_upgrades_then_is_removed() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    wait_for("site hq to report its relay ready", T, || async {
        let site = c.site("hq").await?;
        Ok(site
            .status
            .filter(|s| conditions::is_true(&s.conditions, conditions::READY)))
    })
    .await?;
    for i in 1..=3 {
        c.start_agent(&format!("agent-{i}"), &relay)?;
    }

    let job = c
        .wait_job("hello-everywhere", "Succeeded", "3/3", T)
        .await?;
    let status = job.status.unwrap();
    assert_eq!((status.total, status.succeeded, status.failed), (3, 3, 0));
    assert_eq!(status.sites[0].site, "hq");
    assert!(conditions::is_true(
        &status.conditions,
        conditions::COMPLETE
    ));
    for a in &c.agents {
        let root = a.install_root.join("hello");
        assert_eq!(
            std::fs::read_to_string(root.join("VERSION"))?,
            "1.0.0\n",
            "{}",
            a.name
        );
        assert!(root.join("bin/hello").exists());
    }
    let agents = c.api::<Agent>().list(&Default::default()).await?;
    assert_eq!(agents.items.len(), 3, "one Agent per endpoint");
    for a in &agents.items {
        let st = a.status.clone().unwrap_or_default();
        assert_eq!(a.spec.site, "hq");
        assert_eq!(
            st.installed
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_str()))
                .collect::<Vec<_>>(),
            [("hello", "1.0.0")]
        );
        assert!(st.last_seen.is_some());
    }
    let table = c
        .cluster
        .kubectl(&["get", "distributionjobs", "-n", "fleet"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("hello-everywhere"))
        .unwrap_or_default();
    assert!(
        row.contains("Succeeded") && row.contains("3/3"),
        "kubectl shows the job's state:\n{table}"
    );

    // The relay fetched the blob from the controller once and served it three times.
    let size = c
        .api::<caravan_api::v1alpha1::Package>()
        .get("hello-1.0.0")
        .await?
        .spec
        .artifact
        .size as f64;
    assert_eq!(
        metric(&relay.url, "caravan_relay_upstream_bytes_total").await?,
        size
    );
    assert_eq!(
        metric(&relay.url, "caravan_relay_served_bytes_total").await?,
        3.0 * size
    );
    assert_eq!(
        metric(&c.api_url, "caravan_store_served_bytes_total").await?,
        size
    );

    // The relay serves byte ranges (resumable downloads) of an agent's own
    // blobs, and nothing else.
    let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(
        c.agents[0].state_dir.join("credentials.json"),
    )?)?;
    let token = creds["token"].as_str().unwrap();
    let digest = c
        .api::<caravan_api::v1alpha1::Package>()
        .get("hello-1.0.0")
        .await?
        .spec
        .artifact
        .digest;
    let stored = std::fs::read(c.dir.join("controller/blobs/sha256").join(digest.hex()))?;
    let http = caravan_tests::http();
    let blob_url = |d: &caravan_api::Digest| format!("{}/v1/blobs/{d}", relay.url);
    let res = http
        .get(blob_url(&digest))
        .bearer_auth(token)
        .header("Range", "bytes=10-19")
        .send()
        .await?;
    assert_eq!(res.status(), 206);
    assert_eq!(&res.bytes().await?[..], &stored[10..20]);
    let other: caravan_api::Digest = format!("sha256:{}", "0".repeat(64)).parse()?;
    assert_eq!(
        http.get(blob_url(&other))
            .bearer_auth(token)
            .send()
            .await?
            .status(),
        403
    );
    assert_eq!(http.get(blob_url(&digest)).send().await?.status(), 401);
    assert_eq!(
        http.get(blob_url(&digest))
            .bearer_auth("agent-1/00")
            .send()
            .await?
            .status(),
        401
    );

    // A new version committed to Git while agent-3 is switched off: the
    // running agents upgrade; agent-3 gets the job when it starts again, as
    // the same Agent (its host ID is kept in its state directory).
    c.agents[2].proc.kill();
    let v2 = c.dir.join("hello-1.1.0");
    copy_dir(&repo_root().join("examples/packages/hello"), &v2)?;
    std::fs::write(v2.join("VERSION"), "1.1.0\n")?;
    c.push_package(&v2, "hello", "1.1.0", &repo.work.join("fleet/packages"))?;
    repo.commit("hello 1.1.0")?;
    let version = |a: &caravan_tests::AgentProc| {
        std::fs::read_to_string(a.install_root.join("hello/VERSION")).unwrap_or_default()
    };
    c.wait_job("hello-everywhere", "Progressing", "2/3", T)
        .await?;
    assert_eq!(version(&c.agents[0]), "1.1.0\n");
    assert_eq!(version(&c.agents[1]), "1.1.0\n");
    assert_eq!(
        version(&c.agents[2]),
        "1.0.0\n",
        "a stopped agent changes nothing"
    );
    let relay_info = caravan_tests::RelayInfo {
        bootstrap_token: String::new(),
        ..relay.clone()
    };
    let a3 = &c.agents[2];
    let restarted = c.spawn_agent("agent-3", &relay_info, &a3.state_dir, &a3.install_root)?;
    c.agents[2].proc = restarted;
    c.wait_job("hello-everywhere", "Succeeded", "3/3", T)
        .await?;
    assert_eq!(version(&c.agents[2]), "1.1.0\n");
    assert_eq!(
        c.api::<Agent>()
            .list(&Default::default())
            .await?
            .items
            .len(),
        3,
        "no duplicate Agent after a restart"
    );

    // The job removed from Git: the object is pruned and the files go away.
    repo.remove("fleet/job.yaml")?;
    repo.commit("Retire hello")?;
    wait_for("hello to be removed from every agent", T, || async {
        Ok(c.agents
            .iter()
            .all(|a| !a.install_root.join("hello").exists())
            .then_some(()))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    assert!(
        c.api::<DistributionJob>()
            .get_opt("hello-everywhere")
            .await?
            .is_none(),
        "job pruned"
    );
    // Nothing half-installed is left behind in the install roots.
    for a in &c.agents {
        let left: Vec<_> = std::fs::read_dir(&a.install_root)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n != ".caravan")
            .collect();
        assert!(left.is_empty(), "{}: {left:?}", a.name);
    }
    // The relay dropped the blobs no agent of its site needs any more.
    let cached = |dir: &std::path::Path| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    wait_for("the relay to drop unneeded blobs", T, || async {
        Ok((cached(&relay.cache_dir.join("sha256")) == 0).then_some(()))
    })
    .await?;

    // The packages deleted from Git: their blobs leave the cabinet store.
    let store = c.dir.join("controller/blobs/sha256");
    assert_eq!(
        cached(&store),
        2,
        "both versions stored while their Packages exist"
    );
    for v in ["1.0.0", "1.1.0"] {
        repo.remove(&format!("fleet/packages/hello-{v}.yaml"))?;
    }
    repo.commit("Delete hello from the cabinet")?;
    wait_for("the store to remove the unreferenced blobs", T, || async {
        Ok((cached(&store) == 0).then_some(()))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    Ok(())
}
