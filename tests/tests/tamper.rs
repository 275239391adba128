//! Attacks on the desired state by whoever stands between the controller
//! and an agent (a compromised relay, someone on the branch LAN): a real
//! tampering proxy in front of the real relay, against real agents. Each
//! test checks that the attack fails, that nothing is installed or removed,
//! and that the agent's refusal shows on its Agent (`DesiredStateAccepted`).

use std::{path::Path, time::Duration};

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use caravan_api::{
    trust::Envelope,
    v1alpha1::Agent,
    wire::{AgentDocument, AgentReport, AgentServed, Assignment, AssignmentList},
    Digest,
};
use caravan_tests::{
    caravan::{Options, RelayInfo},
    fixtures::{copy_dir, desired_of},
    git::GitRepo,
    repo_root,
    tamper::{Tamper, TamperProxy},
    wait_for, Caravan,
};

const T: Duration = Duration::from_secs(120);

/// The example fleet, with agents `hosts` talking to hq's relay through a
/// tampering proxy (honest for now), once they have installed hello.
async fn behind_a_proxy(
    c: &mut Caravan,
    hosts: &[&str],
) -> anyhow::Result<(GitRepo, RelayInfo, TamperProxy)> {
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    let proxy = TamperProxy::start(&relay.url).await?;
    // The proxy stands where a compromised relay (which holds the relay's
    // TLS key) or, with TLS off, the LAN would: it serves plaintext.
    c.agent_args.push("--insecure".into());
    for host in hosts {
        let through = RelayInfo {
            url: proxy.url.clone(),
            ..relay.clone()
        };
        c.start_agent(host, &through)?;
    }
    let all = format!("{}/{}", hosts.len(), hosts.len());
    c.wait_job("hello-everywhere", "Succeeded", &all, T).await?;
    c.wait_desired_state(hosts[0], "Verified").await?;
    Ok((repo, relay, proxy))
}

/// What the relay itself serves agent `i` now, asked directly.
async fn relay_document(c: &Caravan, relay: &RelayInfo, i: usize) -> anyhow::Result<Vec<u8>> {
    let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(
        c.agents[i].state_dir.join("credentials.json"),
    )?)?;
    let token = creds["token"].as_str().unwrap_or_default();
    let res = caravan_tests::http()
        .get(format!("{}/v1/desired", relay.url))
        .bearer_auth(token)
        .send()
        .await?;
    Ok(res.bytes().await?.to_vec())
}

/// The last document (and lists) the proxy passed to `host`'s agent.
async fn last_document(
    c: &Caravan,
    proxy: &TamperProxy,
    host: &str,
) -> anyhow::Result<AgentServed> {
    let name = c.agent_of(host).await?.metadata.name.unwrap_or_default();
    let body = proxy.seen(&name).pop().expect("the agent has polled");
    Ok(serde_json::from_slice(&body)?)
}

/// `served` with its signed document's payload changed by `edit`, its
/// signatures kept.
fn rewritten(
    served: &AgentServed,
    edit: impl FnOnce(&mut AgentDocument),
) -> anyhow::Result<Vec<u8>> {
    let mut document: AgentDocument =
        serde_json::from_slice(&served.document.unverified_payload()?)?;
    edit(&mut document);
    let forged = AgentServed {
        document: Envelope {
            payload: B64.encode(serde_json::to_vec(&document)?),
            ..served.document.clone()
        },
        ..served.clone()
    };
    Ok(serde_json::to_vec(&forged)?)
}

/// The first assignment list `served`'s document names: its digest, and
/// the list.
fn first_list(served: &AgentServed) -> anyhow::Result<(Digest, Vec<Assignment>)> {
    let document: AgentDocument = serde_json::from_slice(&served.document.unverified_payload()?)?;
    let digest = document.lists[0];
    Ok((digest, served.lists[&digest].open(&digest)?))
}

/// `served` with the first assignment list its document names changed by
/// `edit`, under the same digest; and that digest.
fn list_rewritten(
    served: &AgentServed,
    edit: impl FnOnce(&mut Vec<Assignment>),
) -> anyhow::Result<(Vec<u8>, Digest)> {
    let (digest, mut list) = first_list(served)?;
    edit(&mut list);
    let mut forged = served.clone();
    forged.lists.insert(digest, AssignmentList::new(&list).1);
    Ok((serde_json::to_vec(&forged)?, digest))
}

/// Pushes hello at `version` (its VERSION file says so) and commits it.
fn release_hello(c: &Caravan, repo: &GitRepo, version: &str) -> anyhow::Result<()> {
    let dir = c.dir.join(format!("src/hello-{version}"));
    copy_dir(&repo_root().join("examples/packages/hello"), &dir)?;
    std::fs::write(dir.join("VERSION"), format!("{version}\n"))?;
    c.push_package(&dir, "hello", version, &repo.work.join("fleet/packages"))?;
    repo.commit(&format!("hello {version}"))?;
    Ok(())
}

fn hello_version(root: &Path) -> String {
    std::fs::read_to_string(root.join("hello/VERSION")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_cannot_make_an_agent_install_software_git_did_not_declare() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (_repo, _relay, proxy) = behind_a_proxy(&mut c, &["desk"]).await?;
    let real = last_document(&c, &proxy, "desk").await?;
    // Another package, installed by a script the relay chose, no signature
    // asked: in a list of the relay's own, named in the signed document...
    let implant = |list: &mut Vec<Assignment>| {
        let mut implant = list[0].clone();
        implant.package = "implant".into();
        implant.job = "fleet/implant".into();
        implant.require_signature = false;
        implant.install = serde_json::from_value(serde_json::json!({
            "method": "script", "script": {"install": "bin/hello"}
        }))
        .unwrap();
        list.push(implant);
    };
    let (_, mut own) = first_list(&real)?;
    implant(&mut own);
    let (digest, list) = AssignmentList::new(&own);
    let forged = rewritten(&real, |d| {
        d.lists.push(digest);
        d.version += 1;
    })?;
    let mut forged: AgentServed = serde_json::from_slice(&forged)?;
    forged.lists.insert(digest, list);
    proxy.set(Tamper::Serve(serde_json::to_vec(&forged)?));
    let message = c.wait_desired_state("desk", "NotSigned").await?;
    assert!(
        message.contains("signed by 0 of the 1 trusted keys"),
        "{message}"
    );
    // ...or added to the list the signed document names, under its digest.
    let (forged, digest) = list_rewritten(&real, implant)?;
    proxy.set(Tamper::Serve(forged));
    let message = c.wait_desired_state("desk", "ListRefused").await?;
    assert!(
        message.contains(&format!(
            "assignment list {digest} of desired state version"
        )) && message.contains("its bytes do not hash to its digest"),
        "{message}"
    );
    // ...or the list withheld, so that the agent might act on less.
    let mut withheld = real.clone();
    withheld.lists.clear();
    proxy.set(Tamper::Serve(serde_json::to_vec(&withheld)?));
    let message = c.wait_desired_state("desk", "ListWithheld").await?;
    assert!(message.contains(&digest.to_string()), "{message}");
    let root = &c.agents[0].install_root;
    assert!(!root.join("implant").exists(), "nothing installed");
    assert_eq!(hello_version(root), "1.0.0\n", "nothing lost");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewritten_install_spec_is_refused() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, relay, proxy) = behind_a_proxy(&mut c, &["desk"]).await?;
    // hello 1.1.0 is released; the relay withholds it while it rewrites it.
    proxy.set(Tamper::Freeze);
    release_hello(&c, &repo, "1.1.0")?;
    let real = wait_for("the relay to have hello 1.1.0 for desk", T, || async {
        let body = relay_document(&c, &relay, 0).await?;
        let fresh = desired_of(&body)?
            .assignments
            .iter()
            .any(|a| a.version == "1.1.0");
        Ok(fresh
            .then(|| serde_json::from_slice::<AgentServed>(&body))
            .transpose()?)
    })
    .await?;
    // The same package and version, now installed by a script with a
    // health check of the relay's choosing.
    let (forged, _) = list_rewritten(&real, |list| {
        list[0].install = serde_json::from_value(serde_json::json!({
            "method": "script", "script": {"install": "bin/hello"}, "healthCheck": "etc/anything"
        }))
        .unwrap();
    })?;
    proxy.set(Tamper::Serve(forged));
    let message = c.wait_desired_state("desk", "ListRefused").await?;
    assert!(
        message.contains("its bytes do not hash to its digest"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        hello_version(&c.agents[0].install_root),
        "1.0.0\n",
        "the rewritten release is not installed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_desired_state_is_refused_as_a_rollback() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay, proxy) = behind_a_proxy(&mut c, &["desk"]).await?;
    let old = serde_json::to_vec(&last_document(&c, &proxy, "desk").await?)?;
    release_hello(&c, &repo, "1.1.0")?;
    let root = c.agents[0].install_root.clone();
    wait_for("hello 1.1.0 on desk", T, || async {
        Ok((hello_version(&root) == "1.1.0\n").then_some(()))
    })
    .await?;
    // The genuine, signed document of hello 1.0.0, replayed.
    assert!(desired_of(&old)?.assignments[0].version == "1.0.0");
    proxy.set(Tamper::Serve(old));
    let message = c.wait_desired_state("desk", "Rollback").await?;
    assert!(
        message.contains("accepted already (a rollback)"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hello_version(&root), "1.1.0\n", "not downgraded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn withheld_updates_are_found_out_when_the_document_expires() -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            desired_state_ttl_seconds: Some(8),
            ..Default::default()
        },
    )
    .await?;
    let (repo, _relay, proxy) = behind_a_proxy(&mut c, &["desk"]).await?;
    // The relay answers "unchanged" from now on, while Git moves on.
    proxy.set(Tamper::Freeze);
    release_hello(&c, &repo, "1.1.0")?;
    let message = c.wait_desired_state("desk", "Expired").await?;
    assert!(message.contains("updates are being withheld"), "{message}");
    let root = c.agents[0].install_root.clone();
    assert_eq!(hello_version(&root), "1.0.0\n", "nothing acted on");
    // Once the relay passes documents again, the agent catches up.
    proxy.set(Tamper::Honest);
    wait_for("hello 1.1.0 on desk", T, || async {
        Ok((hello_version(&root) == "1.1.0\n").then_some(()))
    })
    .await?;
    c.wait_desired_state("desk", "Verified").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_cannot_be_mixed_and_matched_between_agents() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay, proxy) = behind_a_proxy(&mut c, &["desk", "lab"]).await?;
    // A tool for lab only.
    let lab = c.agent_of("lab").await?.metadata.name.unwrap_or_default();
    let dir = c.dir.join("src/tools");
    copy_dir(&repo_root().join("examples/packages/hello"), &dir)?;
    c.push_package(&dir, "tools", "1.0.0", &repo.work.join("fleet/packages"))?;
    repo.write(
        "fleet/tools-job.yaml",
        &format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: tools}}\nspec:\n  packages: [{{name: tools}}]\n  destinations: {{agents: [{lab}]}}\n"),
    )?;
    repo.commit("tools for lab")?;
    c.wait_job("tools", "Succeeded", "1/1", T).await?;
    let labs = last_document(&c, &proxy, "lab").await?;
    let desks = last_document(&c, &proxy, "desk").await?;
    // desk is handed lab's genuine document.
    proxy.set(Tamper::Serve(serde_json::to_vec(&labs)?));
    let message = c.wait_desired_state("desk", "OtherAgent").await?;
    assert!(
        message.contains(&format!("signed for agent {lab}")),
        "{message}"
    );
    // Then lab's content under desk's signature.
    let spliced = AgentServed {
        document: Envelope {
            signatures: desks.document.signatures.clone(),
            ..labs.document.clone()
        },
        ..labs.clone()
    };
    proxy.set(Tamper::Serve(serde_json::to_vec(&spliced)?));
    c.wait_desired_state("desk", "NotSigned").await?;
    let desk_root = &c.agents[0].install_root;
    assert!(!desk_root.join("tools").exists(), "nothing installed");
    assert_eq!(hello_version(desk_root), "1.0.0\n", "nothing lost");
    assert!(c.agents[1].install_root.join("tools").exists());
    Ok(())
}

/// Agent `host`'s status as its Agent shows it: (installed packages, report sequence).
async fn reported(c: &Caravan, host: &str) -> anyhow::Result<(u32, u64)> {
    let status = c.agent_of(host).await?.status.unwrap_or_default();
    Ok((status.installed_count, status.report_sequence.unwrap_or(0)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_or_forged_report_is_refused_and_the_agents_status_stands() -> anyhow::Result<()>
{
    let mut c = Caravan::start("fleet").await?;
    let (_repo, relay, proxy) = behind_a_proxy(&mut c, &["desk"]).await?;
    let agent: Agent = c.agent_of("desk").await?;
    let name = agent.metadata.name.clone().unwrap_or_default();
    let captured: Vec<Envelope> = proxy
        .reports(&name)
        .iter()
        .map(|b| serde_json::from_slice(b))
        .collect::<Result<_, _>>()?;
    let payload = |e: &Envelope| -> anyhow::Result<AgentReport> {
        Ok(serde_json::from_slice(&e.unverified_payload()?)?)
    };
    // The first report the agent sent, from before hello was installed.
    let old = captured
        .iter()
        .find(|e| payload(e).is_ok_and(|r| r.installed.is_empty()))
        .expect("a report from before the install went through the proxy")
        .clone();
    wait_for("desk's install reported", T, || async {
        Ok((reported(&c, "desk").await?.0 == 1).then_some(()))
    })
    .await?;
    let (_, before) = reported(&c, "desk").await?;
    let latest = captured.last().expect("reports").clone();
    // The latest report, made to say nothing is installed, signatures kept.
    let mut forged = payload(&latest)?;
    forged.installed.clear();
    forged.sequence += 1_000_000;
    let rewritten = Envelope {
        payload: B64.encode(serde_json::to_vec(&forged)?),
        ..latest.clone()
    };
    // The same, signed by a key of the attacker's.
    let own_key =
        caravan_api::trust::sign_report(&forged, &ed25519_dalek::SigningKey::from_bytes(&[9; 32]));

    // The site's relay, compromised, holds the site's relay credential.
    let secret = c
        .api::<k8s_openapi::api::core::v1::Secret>()
        .get("hq-relay")
        .await?;
    let relay_token = String::from_utf8(secret.data.unwrap_or_default()["token"].0.clone())?;
    let res = caravan_tests::http()
        .post(format!(
            "{}{}",
            c.api_url,
            caravan_api::wire::paths::SITE_REPORTS
        ))
        .bearer_auth(&relay_token)
        .json(&[&old, &rewritten, &own_key])
        .send()
        .await?;
    assert!(res.status().is_success(), "{}", res.status());

    // Each is refused and told on the Agent, and the status stands.
    c.wait_warning(&name, "ReportReplayed", "a replay").await?;
    c.wait_warning(&name, "ReportNotSigned", "signed by 0 of the 1")
        .await?;
    let (installed, after) = reported(&c, "desk").await?;
    assert_eq!(installed, 1, "hello still shows as installed");
    assert!(
        after >= before && after < forged.sequence,
        "{before} → {after}"
    );
    let api = c.api_url.clone();
    let refused = |reason: &str| {
        let (api, name) = (
            api.clone(),
            format!("caravan_agent_reports_refused_total{{reason=\"{reason}\"}}"),
        );
        async move { caravan_tests::metric(&api, &name).await }
    };
    assert!(refused("Replayed").await? >= 1.0);
    assert!(
        refused("NotSigned").await? >= 2.0,
        "the rewritten one and the attacker's"
    );
    assert!(c.agents[0].install_root.join("hello/bin/hello").exists());

    // An agent reporting as another is turned away by its relay.
    let (_, token) = c.agents[0].credentials()?;
    let res = caravan_tests::http()
        .post(format!("{}{}", relay.url, caravan_api::wire::paths::REPORT))
        .bearer_auth(token)
        .json(&caravan_tests::report_as("lab-1234"))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 403);
    assert!(res.text().await?.contains("reports for itself only"));
    Ok(())
}
