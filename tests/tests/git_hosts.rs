//! GitSources on real Git hosts on loopback: `git http-backend` behind
//! nginx (TLS from a private CA, basic auth) and `sshd` (a key, the host
//! key in `known_hosts`). The right credentials sync, new commits are
//! fetched again (shallow), and a commit pinned behind the shallow history
//! is fetched by deepening it; a wrong password, an untrusted certificate, a
//! host key that is not the listed one and an unsigned commit where
//! signatures are required are each refused with a condition that says so;
//! the same commit is not applied again unless the cluster drifted.

use std::time::Duration;

use caravan_api::v1alpha1::{GitSource, Site};
use caravan_tests::{
    git::GitRepo,
    githost::{GitHttps, GitSsh},
    metric, wait_for, Caravan,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};

const T: Duration = Duration::from_secs(120);

fn site(name: &str) -> String {
    format!("apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {{name: {name}}}\nspec:\n  relay:\n    replicas: 1\n")
}

async fn secret(c: &Caravan, name: &str, data: serde_json::Value) -> anyhow::Result<()> {
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": {"caravan.dev/git-credentials": "true"}},
        "stringData": data,
    }))?;
    c.api::<Secret>().create(&PostParams::default(), &s).await?;
    Ok(())
}

/// The GitSource's `Ready` condition once it is `status` (reason, message).
async fn ready(c: &Caravan, name: &str, status: &str) -> anyhow::Result<(String, String)> {
    wait_for(&format!("GitSource {name} Ready={status}"), T, || async {
        let gs = c.api::<GitSource>().get(name).await?;
        Ok(gs.status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == status)
                .map(|c| (c.reason, c.message))
        }))
    })
    .await
}

async fn site_exists(c: &Caravan, name: &str) -> anyhow::Result<()> {
    wait_for(&format!("Site {name}"), T, || async {
        Ok(c.api::<Site>().get_opt(name).await?.map(|_| ()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn gitsources_sync_from_https_and_ssh_hosts_with_credentials_and_refuse_what_is_not_trusted(
) -> anyhow::Result<()> {
    let c = Caravan::start("git-hosts").await?;
    let repos = c.dir.join("repos");
    let repo = GitRepo::create(&repos)?;
    repo.write("fleet/https/hq.yaml", &site("https-hq"))?;
    repo.write("fleet/ssh/hq.yaml", &site("ssh-hq"))?;
    repo.commit("Headquarters")?;
    let https = GitHttps::start(&c.dir.join("https"), &repos).await?;
    let ssh = GitSsh::start(&c.dir.join("ssh")).await?;
    let ca = std::fs::read_to_string(&https.ca_file)?;
    let https_url = format!("{}/fleet.git", https.base);
    let ssh_url = format!("{}{}", ssh.base, repo.bare.display());

    secret(
        &c,
        "https-creds",
        serde_json::json!({"username": https.username, "password": https.password, "ca.crt": ca,
            "host": https.base.trim_start_matches("https://")}),
    )
    .await?;
    secret(
        &c,
        "ssh-creds",
        serde_json::json!({"identity": ssh.identity, "known_hosts": ssh.known_hosts}),
    )
    .await?;
    c.apply_git_source("over-https", serde_json::json!({"url": https_url, "path": "fleet/https", "intervalSeconds": 1, "secretRef": "https-creds"})).await?;
    c.apply_git_source("over-ssh", serde_json::json!({"url": ssh_url, "path": "fleet/ssh", "intervalSeconds": 1, "secretRef": "ssh-creds"})).await?;
    let (_, msg) = ready(&c, "over-https", "True").await?;
    assert!(msg.contains("(branch main): 1 objects"), "{msg}");
    ready(&c, "over-ssh", "True").await?;
    site_exists(&c, "https-hq").await?;
    site_exists(&c, "ssh-hq").await?;

    // A new commit reaches both (the fetches are shallow and fetch again).
    repo.write("fleet/https/branch.yaml", &site("https-branch"))?;
    repo.write("fleet/ssh/branch.yaml", &site("ssh-branch"))?;
    let second = repo.commit("A branch office")?;
    site_exists(&c, "https-branch").await?;
    site_exists(&c, "ssh-branch").await?;
    for name in ["over-https", "over-ssh"] {
        // The status follows the objects it applied.
        wait_for(&format!("{name} at the second commit"), T, || async {
            let rev = c
                .api::<GitSource>()
                .get(name)
                .await?
                .status
                .and_then(|s| s.last_applied_revision);
            Ok((rev.as_deref() == Some(second.as_str())).then_some(()))
        })
        .await?;
        let checkout = c.dir.join(format!("controller/git/{}/{name}", c.namespace));
        assert!(checkout.join("shallow").exists(), "{name}: fetched shallow");
    }
    // Two more commits pushed at once: the shallow fetch gets only the
    // last. Pinned to the one before it, which the checkout never held:
    // deepened, applied, and the later Site pruned.
    repo.write("fleet/ssh/third.yaml", &site("ssh-third"))?;
    let third = repo.commit_unpushed("A third site")?;
    repo.write("fleet/ssh/fourth.yaml", &site("ssh-fourth"))?;
    let fourth = repo.commit("A fourth site")?;
    wait_for("over-ssh at the fourth commit", T, || async {
        let gs = c.api::<GitSource>().get("over-ssh").await?;
        let at = gs.status.and_then(|s| s.last_applied_revision);
        Ok((at.as_deref() == Some(fourth.as_str())).then_some(()))
    })
    .await?;
    let checkout = c
        .dir
        .join(format!("controller/git/{}/over-ssh", c.namespace));
    let held = git2::Repository::open_bare(&checkout)?
        .find_commit(git2::Oid::from_str(&third)?)
        .is_ok();
    assert!(!held, "the shallow checkout does not hold the third commit");
    c.apply_git_source(
        "over-ssh",
        serde_json::json!({"url": ssh_url, "path": "fleet/ssh", "intervalSeconds": 1, "secretRef": "ssh-creds", "ref": {"commit": third}}),
    )
    .await?;
    wait_for("the pinned commit applied", T, || async {
        let gs = c.api::<GitSource>().get("over-ssh").await?;
        let at = gs.status.and_then(|s| s.last_applied_revision);
        let gone = c.api::<Site>().get_opt("ssh-fourth").await?.is_none();
        Ok((at.as_deref() == Some(third.as_str()) && gone).then_some(()))
    })
    .await?;

    // The same commit again with nothing changed in the cluster is not
    // applied again; a Site edited by hand is (and put back as in Git).
    let unchanged = r#"caravan_gitsource_syncs_total{result="unchanged"}"#;
    wait_for("syncs that find nothing to apply", T, || async {
        Ok((metric(&c.api_url, unchanged).await.unwrap_or(0.0) >= 4.0).then_some(()))
    })
    .await?;
    c.api::<Site>()
        .patch(
            "https-hq",
            &PatchParams::apply("someone").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "caravan.dev/v1alpha1", "kind": "Site",
                "spec": {"relay": {"replicas": 3}},
            })),
        )
        .await?;
    wait_for("the hand edit undone from Git", T, || async {
        let s = c.api::<Site>().get("https-hq").await?;
        Ok((s.spec.relay.replicas == 1).then_some(()))
    })
    .await?;

    // The same host under another name: the Secret is bound to its host,
    // so its password goes nowhere else.
    let elsewhere = https_url.replace("127.0.0.1", "localhost");
    c.apply_git_source(
        "elsewhere",
        serde_json::json!({"url": elsewhere, "path": "fleet/https", "secretRef": "https-creds"}),
    )
    .await?;
    let (reason, msg) = ready(&c, "elsewhere", "False").await?;
    assert_eq!(reason, "AuthenticationFailed", "{msg}");
    assert!(msg.contains("is for host 127.0.0.1:"), "{msg}");

    // A wrong password: refused, and the condition says so (never the password).
    secret(
        &c,
        "https-wrong",
        serde_json::json!({"username": https.username, "password": "not-the-password", "ca.crt": ca}),
    )
    .await?;
    c.apply_git_source(
        "wrong-password",
        serde_json::json!({"url": https_url, "path": "fleet/https", "secretRef": "https-wrong"}),
    )
    .await?;
    let (reason, msg) = ready(&c, "wrong-password", "False").await?;
    assert_eq!(reason, "AuthenticationFailed", "{msg}");
    assert!(msg.contains("refused the credentials"), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");

    // No private CA: the system's roots do not know the host's certificate.
    secret(
        &c,
        "https-no-ca",
        serde_json::json!({"username": https.username, "password": https.password}),
    )
    .await?;
    c.apply_git_source(
        "no-ca",
        serde_json::json!({"url": https_url, "path": "fleet/https", "secretRef": "https-no-ca"}),
    )
    .await?;
    let (reason, msg) = ready(&c, "no-ca", "False").await?;
    assert_eq!(reason, "HostNotTrusted", "{msg}");
    assert!(
        msg.contains("certificate is invalid") && msg.contains("`ca.crt`"),
        "{msg}"
    );

    // An SSH host whose key is not the one in known_hosts.
    let stranger = std::fs::read_to_string(c.dir.join("ssh/user_key.pub"))?;
    let stranger: Vec<&str> = stranger.split_whitespace().collect();
    let port = ssh.base.rsplit(':').next().unwrap_or_default();
    secret(
        &c,
        "ssh-stranger",
        serde_json::json!({"identity": ssh.identity, "known_hosts": format!("[127.0.0.1]:{port} {} {}\n", stranger[0], stranger[1])}),
    )
    .await?;
    c.apply_git_source(
        "stranger",
        serde_json::json!({"url": ssh_url, "path": "fleet/ssh", "secretRef": "ssh-stranger"}),
    )
    .await?;
    let (reason, msg) = ready(&c, "stranger", "False").await?;
    assert_eq!(reason, "HostNotTrusted", "{msg}");
    assert!(msg.contains("not the one in known_hosts"), "{msg}");

    // Signatures required: the commit is unsigned, so nothing is applied.
    secret(
        &c,
        "signers",
        serde_json::json!({"ops": stranger.join(" ")}),
    )
    .await?;
    c.apply_git_source("signed-only", serde_json::json!({"url": ssh_url, "path": "fleet/ssh", "secretRef": "ssh-creds", "verify": {"secretRef": "signers"}})).await?;
    let (reason, msg) = ready(&c, "signed-only", "False").await?;
    assert_eq!(reason, "SignatureInvalid", "{msg}");
    assert!(msg.ends_with("is not signed"), "{msg}");
    let applied = c
        .api::<GitSource>()
        .get("signed-only")
        .await?
        .status
        .and_then(|s| s.last_applied_revision);
    assert_eq!(applied, None, "nothing applied");
    Ok(())
}
