//! HTTPS on every hop: the CLI uploads to the controller, the relay fetches
//! from it, and the agents talk to the relay, each verifying the other side's
//! certificate against a CA it was given (the relay gets the controller's CA
//! through its Secret, mounted by the Deployment the controller writes).

use std::time::Duration;

use caravan_tests::{Caravan, Install, Options};

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_verified_https_end_to_end() -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            install: Install::Direct,
            tls: true,
        },
    )
    .await?;
    assert!(c.api_url.starts_with("https://"));
    let _repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    assert!(
        relay.url.starts_with("https://"),
        "the relay serves HTTPS from the Site's tlsSecret"
    );
    c.start_agent("agent-1", &relay)?;
    c.wait_job(
        "hello-everywhere",
        "Succeeded",
        "1/1",
        Duration::from_secs(120),
    )
    .await?;
    assert!(c.agents[0].install_root.join("hello/bin/hello").exists());

    // A client that does not trust the CA is refused at the TLS handshake.
    let err = reqwest::get(format!("{}/healthz", relay.url))
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    Ok(())
}
