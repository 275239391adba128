//! A Git host's push webhook: a call signed with the GitSource's webhook
//! secret has it synced at once; an unsigned or wrongly signed call, a
//! ping, one for a Secret not labelled for the controller to use, another
//! namespace or a name that is no name is refused (or answered) and syncs
//! nothing.

use std::time::Duration;

use caravan_api::v1alpha1::GitSource;
use caravan_tests::{wait_for, Caravan};
use hmac::{Hmac, Mac as _};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};

const T: Duration = Duration::from_secs(120);

async fn revision(c: &Caravan) -> anyhow::Result<Option<String>> {
    Ok(c.api::<GitSource>()
        .get("fleet")
        .await?
        .status
        .and_then(|s| s.last_applied_revision))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_push_webhook_syncs_at_once_and_nothing_else_does() -> anyhow::Result<()> {
    let c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let first = wait_for("the first sync", T, || async { revision(&c).await }).await?;
    // From now on the source syncs hourly, or when its webhook is called.
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "fleet-hook", "namespace": c.namespace},
        "stringData": {"token": "s3cret"},
    }))?;
    let secrets = c.api::<Secret>();
    secrets.create(&Default::default(), &secret).await?;
    c.api::<GitSource>()
        .patch(
            "fleet",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": {"intervalSeconds": 3600, "webhook": {"secretRef": "fleet-hook"}}
            })),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    repo.write(
        "fleet/branch.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec: {}\n",
    )?;
    let pushed = repo.commit("A branch office")?;

    let url = format!("{}/v1/hooks/git/{}/fleet", c.api_url, c.namespace);
    let body = br#"{"ref":"refs/heads/main"}"#.to_vec();
    let signed = |key: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key");
        mac.update(&body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let call = |sig: Option<String>| {
        let req = caravan_tests::http().post(&url).body(body.clone());
        match sig {
            Some(sig) => req.header("X-Hub-Signature-256", sig),
            None => req,
        }
        .send()
    };
    // The Secret is not labelled for the controller: it is not used. The
    // caller learns no more than "not here"; the log says why.
    let res = call(Some(signed(b"s3cret"))).await?;
    assert_eq!(res.status(), 404);
    let text = res.text().await?;
    assert!(!text.contains("fleet-hook"), "{text}");
    wait_for("the reason in the controller's log", T, || async {
        Ok(c.logs()
            .contains("is not labelled caravan.dev/webhook-secret")
            .then_some(()))
    })
    .await?;
    secrets
        .patch(
            "fleet-hook",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"labels": {"caravan.dev/webhook-secret": "true"}}
            })),
        )
        .await?;
    // Unsigned, signed with another secret, or another GitLab token:
    // refused.
    for (sig, words) in [
        (None, "unsigned"),
        (Some(signed(b"guess")), "does not match"),
    ] {
        let res = call(sig).await?;
        assert_eq!(res.status(), 401);
        let text = res.text().await?;
        assert!(text.contains(words), "{text}");
    }
    let res = caravan_tests::http()
        .post(&url)
        .header("X-Gitlab-Token", "guess")
        .send()
        .await?;
    assert_eq!(res.status(), 401);
    // A signed ping is answered, and syncs nothing either.
    let res = caravan_tests::http()
        .post(&url)
        .header("X-GitHub-Event", "ping")
        .header("X-Hub-Signature-256", signed(b"s3cret"))
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        revision(&c).await?,
        Some(first.clone()),
        "nothing synced the push yet"
    );
    // Signed with the secret: synced at once.
    assert_eq!(call(Some(signed(b"s3cret"))).await?.status(), 202);
    wait_for("the pushed commit to be applied", T, || async {
        Ok(revision(&c)
            .await?
            .filter(|r| r.contains(&pushed[..12]))
            .map(|_| ()))
    })
    .await?;
    // Nothing else takes webhooks: no such GitSource, a namespace the
    // controller does not serve, a name that is no name (it would reach
    // the API server's URL).
    for path in [
        format!("{}/nope", c.namespace),
        "kube-system/fleet".to_string(),
        format!("{}/fleet%3Fwatch%3Dtrue", c.namespace),
    ] {
        let res = caravan_tests::http()
            .post(format!("{}/v1/hooks/git/{path}", c.api_url))
            .header("X-Hub-Signature-256", signed(b"s3cret"))
            .body(body.clone())
            .send()
            .await?;
        assert_eq!(res.status(), 404, "{path}");
    }
    Ok(())
}
