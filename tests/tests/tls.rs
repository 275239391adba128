//! HTTPS on every hop: the CLI uploads to the controller, the relay fetches
//! from it, and the agents talk to the relay, each verifying the other side's
//! certificate against a CA it was given (the relay gets the controller's CA
//! through its Secret, mounted by the Deployment the controller writes); and
//! the default, where agents pin the CA the controller runs.

use std::time::Duration;

use caravan_tests::{wait_for, Caravan, Install, Options};

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_verified_https_end_to_end() -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            install: Install::Direct,
            tls: true,
            ..Default::default()
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

    // The admission webhook holds the package identity rules for every
    // writer, kubectl included.
    c.register_webhook().await?;
    let moved = wait_for(
        "the webhook to refuse moving a package",
        Duration::from_secs(30),
        || async {
            let patch = r#"{"spec":{"cabinet":"elsewhere"}}"#;
            match c.cluster.kubectl(&[
                "-n",
                "fleet",
                "patch",
                "package",
                "hello-1.0.0",
                "--type",
                "merge",
                "-p",
                patch,
            ]) {
                Ok(out) => anyhow::bail!("the patch went through: {out}"),
                // Until the API server has picked up the webhook, it is the
                // next Git sync that puts the cabinet back; wait for a denial.
                Err(e) if e.to_string().contains("denied the request") => Ok(Some(e.to_string())),
                Err(_) => Ok(None),
            }
        },
    )
    .await?;
    assert!(
        moved.contains("cannot move from cabinet main to cabinet elsewhere"),
        "{moved}"
    );
    let twin = serde_json::json!({
        "apiVersion": "caravan.dev/v1alpha1", "kind": "Package",
        "metadata": { "name": "hello-twin", "namespace": "fleet" },
        "spec": { "cabinet": "main", "name": "hello", "version": "1.0.0",
                  "artifact": { "digest": format!("sha256:{}", "d".repeat(64)), "size": 1 } },
    });
    let err = c
        .api::<caravan_api::v1alpha1::Package>()
        .create(&Default::default(), &serde_json::from_value(twin.clone())?)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("published already"), "{err}");
    // Deleted and created again (the sync paused, so nothing puts it back):
    // the version keeps the content it was published with.
    let sources = c.api::<caravan_api::v1alpha1::GitSource>();
    sources
        .patch(
            "fleet",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await?;
    let packages = c.api::<caravan_api::v1alpha1::Package>();
    packages.delete("hello-1.0.0", &Default::default()).await?;
    wait_for("hello-1.0.0 to go", Duration::from_secs(30), || async {
        Ok(packages
            .get_opt("hello-1.0.0")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let mut reborn = twin.clone();
    reborn["metadata"]["name"] = "hello-1.0.0".into();
    let err = packages
        .create(&Default::default(), &serde_json::from_value(reborn)?)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deleted since"), "{err}");

    // A cabinet that requires signatures keeps requiring them: switched off,
    // or deleted and created again without.
    let cabinets = c.api::<caravan_api::v1alpha1::Cabinet>();
    let merge =
        |v: bool| kube::api::Patch::Merge(serde_json::json!({"spec": {"requireSignatures": v}}));
    cabinets
        .patch("main", &kube::api::PatchParams::default(), &merge(true))
        .await?;
    let err = cabinets
        .patch("main", &kube::api::PatchParams::default(), &merge(false))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be switched off"), "{err}");
    let ledger = c.dir.join("controller/published.json");
    wait_for(
        "the controller to note that main requires signatures",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&ledger).unwrap_or_default();
            Ok(text.contains("\"main\"]").then_some(()))
        },
    )
    .await?;
    let mut main = cabinets.get("main").await?;
    cabinets.delete("main", &Default::default()).await?;
    wait_for("cabinet main to go", Duration::from_secs(30), || async {
        Ok(cabinets.get_opt("main").await?.is_none().then_some(()))
    })
    .await?;
    main.metadata = kube::api::ObjectMeta {
        name: Some("main".into()),
        namespace: Some("fleet".into()),
        ..Default::default()
    };
    main.spec.require_signatures = false;
    main.status = None;
    let err = cabinets
        .create(&Default::default(), &main)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be switched off"), "{err}");

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

#[tokio::test(flavor = "multi_thread")]
async fn agents_reach_their_relay_only_through_the_controllers_ca() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (_repo, relay) = c.hello_installed("desk").await?;
    // By default the relay serves HTTPS with the certificate the controller
    // issued it, and a client pinning the controller's CA verifies it...
    assert!(relay.url.starts_with("https://"), "{}", relay.url);
    let readyz = format!("{}/readyz", relay.url);
    let pinned = caravan_net::client(Some(&c.ca_file), Duration::from_secs(10))?;
    assert!(pinned.get(&readyz).send().await?.status().is_success());
    // ...while one that pins another CA refuses it at the handshake.
    let other = caravan_tests::TestTls::generate(&c.dir.join("other-ca"))?;
    let foreign = caravan_net::client(Some(&other.ca), Duration::from_secs(10))?;
    let err = foreign.get(&readyz).send().await.unwrap_err();
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    // So does an agent given another CA: it enrolls nowhere.
    let status = c.run_agent_once(
        "laptop",
        &relay,
        &[("CARAVAN_CA_FILE", &other.ca.display().to_string())],
    )?;
    assert!(!status.success());
    let log = std::fs::read_to_string(c.dir.join("logs/agent-laptop.log"))?;
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    let agents = c
        .api::<caravan_api::v1alpha1::Agent>()
        .list(&Default::default())
        .await?;
    assert!(
        agents.items.iter().all(|a| a.spec.hostname != "laptop"),
        "laptop did not enroll"
    );
    Ok(())
}

/// Runs `caravan-relay` with `args` for at most `secs` seconds; returns
/// whether it exited by itself, and its log.
fn run_relay(c: &Caravan, token: &str, args: &[&str], secs: u64) -> anyhow::Result<(bool, String)> {
    let log = c.dir.join(format!(
        "logs/relay-probe-{}.log",
        caravan_tests::free_port()
    ));
    let mut child = std::process::Command::new(caravan_tests::bin("caravan-relay")?)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", caravan_tests::free_port()),
        ])
        .arg("--cache-dir")
        .arg(c.dir.join("relay-probe"))
        .args(args)
        .env("CARAVAN_RELAY_TOKEN", token)
        .env_remove("CARAVAN_INSECURE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let exited = loop {
        if child.try_wait()?.is_some() {
            break true;
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok((exited, std::fs::read_to_string(log)?))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_reaches_the_controller_only_over_https_it_verifies() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (_repo, relay) = c.hello_installed("desk").await?;
    // The controller was given no certificate: it serves one from its own
    // controller CA, and the relay it deploys pins that CA (from its Secret).
    assert!(c.api_url.starts_with("https://"));
    let d = c
        .api::<k8s_openapi::api::apps::v1::Deployment>()
        .get("hq-relay")
        .await?;
    let container = d.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let args = container.args.unwrap_or_default();
    assert!(args.contains(&"--upstream-ca-file".to_string()), "{args:?}");
    let secret = c
        .api::<k8s_openapi::api::core::v1::Secret>()
        .get("hq-relay")
        .await?;
    let data = secret.data.unwrap_or_default();
    assert_eq!(
        data["upstream-ca.crt"].0,
        std::fs::read(&c.controller_ca_file)?,
        "the relay pins the CA of the controller's own certificate"
    );
    assert_ne!(
        data["upstream-ca.crt"].0, data["ca.crt"].0,
        "which is not the CA of the relays' certificates"
    );
    let token = String::from_utf8(data["token"].0.clone())?;
    // Told to reach it in plaintext, a relay refuses to start...
    let plain = c.api_url.replace("https://", "http://");
    let (exited, log) = run_relay(&c, &token, &["--upstream", &plain], 30)?;
    assert!(
        exited && log.contains("--upstream") && log.contains("is plaintext HTTP"),
        "{log}"
    );
    // ...and pinning another CA, it gets nothing from the controller.
    let other = caravan_tests::TestTls::generate(&c.dir.join("other-ca"))?;
    let other_ca = other.ca.display().to_string();
    let (_, log) = run_relay(
        &c,
        &token,
        &["--upstream", &c.api_url, "--upstream-ca-file", &other_ca],
        5,
    )?;
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    // Nor can another relay (its key, its certificate from the relays' CA)
    // pose as the controller to it.
    let controller_ca = c.controller_ca_file.display().to_string();
    let (_, log) = run_relay(
        &c,
        &token,
        &[
            "--upstream",
            &relay.url,
            "--upstream-ca-file",
            &controller_ca,
        ],
        5,
    )?;
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    Ok(())
}
