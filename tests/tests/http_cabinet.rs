//! A cabinet on a plain HTTP server (here Python's http.server): the
//! controller fetches each artifact once, verifies its size and digest,
//! reports the outcome in the Package status, and serves it to relays.

use std::time::Duration;

use caravan_api::{conditions, v1alpha1::Package};
use caravan_tests::{free_port, wait_for, Caravan, Proc};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_on_an_http_server_are_verified_before_they_are_served() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let web = c.dir.join("web");
    std::fs::create_dir_all(web.join("sha256"))?;
    let port = free_port();
    let port_s = port.to_string();
    let web_s = web.display().to_string();
    let _server = Proc::spawn(
        "http-server",
        std::path::Path::new("python3"),
        &[
            "-m",
            "http.server",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--directory",
            &web_s,
        ],
        &[],
        &c.dir,
    )?;
    wait_for("the web server", T, || async {
        Ok(reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    repo.write(
        "fleet/web-cabinet.yaml",
        &format!("apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {{name: web}}\nspec:\n  store: {{type: http, url: 'http://127.0.0.1:{port}'}}\n"),
    )?;
    let manifests = repo.work.join("fleet/packages");
    // Builds a package for the web cabinet; returns its archive and digest.
    let build = |name: &str| -> anyhow::Result<(Vec<u8>, String)> {
        let src = c.dir.join("src").join(name);
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("index.html"), format!("<h1>{name}</h1>"))?;
        let out = c.dir.join(format!("{name}.tar.zst"));
        c.cli(&[
            "package",
            "build",
            &src.display().to_string(),
            "--name",
            name,
            "--version",
            "1.0.0",
            "--cabinet",
            "web",
            "--manifest-dir",
            &manifests.display().to_string(),
            "--out",
            &out.display().to_string(),
        ])?;
        let manifest = std::fs::read_to_string(manifests.join(format!("{name}-1.0.0.yaml")))?;
        let digest = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("digest: "))
            .unwrap()
            .to_string();
        Ok((
            std::fs::read(out)?,
            digest.trim_start_matches("sha256:").to_string(),
        ))
    };
    let (site, hex) = build("website")?;
    std::fs::write(web.join("sha256").join(&hex), &site)?;
    let (bad, bad_hex) = build("tampered")?;
    std::fs::write(web.join("sha256").join(&bad_hex), vec![b'!'; bad.len()])?;
    build("absent")?;
    repo.write(
        "fleet/website-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: website}\nspec:\n  packages: [{name: website}]\n  destinations: {sites: [{name: hq}]}\n",
    )?;
    repo.commit("A cabinet on a web server")?;

    let ready = |name: &'static str| {
        let api = c.api::<Package>();
        async move {
            wait_for(&format!("{name}'s artifact check"), T, || async {
                let p = api.get_opt(name).await?;
                let ready = p.and_then(|p| p.status).and_then(|s| {
                    s.conditions
                        .into_iter()
                        .find(|c| c.type_ == conditions::READY)
                });
                Ok(ready.filter(|r| r.reason != "ArtifactFetching"))
            })
            .await
        }
    };
    let ok = ready("website-1.0.0").await?;
    assert_eq!(ok.status, "True", "{}", ok.message);
    assert!(ok.message.contains("verified"), "{}", ok.message);
    let tampered = ready("tampered-1.0.0").await?;
    assert_eq!(
        (tampered.status.as_str(), tampered.reason.as_str()),
        ("False", "ArtifactUnavailable")
    );
    assert!(
        tampered.message.contains("digest mismatch"),
        "{}",
        tampered.message
    );
    let absent = ready("absent-1.0.0").await?;
    assert!(absent.message.contains("404"), "{}", absent.message);

    let relay = c.start_relay("hq").await?;
    c.start_agent("agent-1", &relay)?;
    c.wait_job("website", "Succeeded", "1/1", T).await?;
    assert_eq!(
        std::fs::read_to_string(c.agents[0].install_root.join("website/index.html"))?,
        "<h1>website</h1>"
    );
    Ok(())
}
