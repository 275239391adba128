//! Attacks on enrollment and credentials, each mounted against running
//! processes: a stolen bootstrap token used after it expired or was
//! revoked, a single-use token used twice, the token of a deleted Site, an
//! enrollment flood, a stolen agent credential, a relay that saw an agent's
//! host secret; and an agent that must not lock itself out when its
//! renewal is refused.

use std::time::Duration;

use caravan_api::v1alpha1::{Agent, BootstrapToken, Site};
use caravan_tests::{wait_for, Caravan, Options, RelayInfo};

const T: Duration = Duration::from_secs(120);

/// Runs an agent for host `host` once with bootstrap token `token`; returns
/// whether it succeeded and what it wrote.
fn try_enroll(
    c: &Caravan,
    relay: &RelayInfo,
    host: &str,
    token: &str,
) -> anyhow::Result<(bool, String)> {
    let status = c.run_agent_once(host, relay, &[("CARAVAN_BOOTSTRAP_TOKEN", token)])?;
    let log = std::fs::read_to_string(c.dir.join(format!("logs/agent-{host}.log")))?;
    Ok((status.success(), log))
}

/// Whether an Agent object exists for `host`.
async fn enrolled(c: &Caravan, host: &str) -> anyhow::Result<bool> {
    let agents = c.api::<Agent>().list(&Default::default()).await?;
    Ok(agents.items.iter().any(|a| a.spec.hostname == host))
}

/// Waits for a Warning Event `BootstrapToken…` on Site `site` whose note
/// contains `words`.
async fn refusal_event(c: &Caravan, site: &str, words: &str) -> anyhow::Result<String> {
    c.wait_warning(site, "BootstrapToken", words).await
}

/// Asserts that `host` could not enroll with `token`, for the reason `words`.
async fn assert_refused(
    c: &Caravan,
    relay: &RelayInfo,
    host: &str,
    token: &str,
    site: &str,
    words: &str,
) -> anyhow::Result<()> {
    let (ok, log) = try_enroll(c, relay, host, token)?;
    assert!(
        !ok,
        "{host} enrolled with a token it should not have: {log}"
    );
    assert!(
        log.contains(words),
        "{host} is not told why ({words}): {log}"
    );
    let secret = token.split_once('.').map_or(token, |(_, s)| s);
    assert!(
        !log.contains(secret),
        "the token's secret is not written out: {log}"
    );
    assert!(!enrolled(c, host).await?, "no Agent for {host}");
    refusal_event(c, site, words).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stolen_bootstrap_token_is_refused_after_it_expires_or_is_revoked() -> anyhow::Result<()>
{
    let mut c = Caravan::start("fleet").await?;
    let (_repo, relay) = c.hello_installed("desk").await?;

    // Expiry: a token good for two seconds, stolen and used later.
    let short = c.bootstrap_token("hq", &["--ttl", "2s"])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_refused(&c, &relay, "thief-1", &short, "hq", "expired at").await?;

    // Revocation: a token that worked is revoked; the next use is refused,
    // and what enrolled with it before stays enrolled.
    let token = c.bootstrap_token("hq", &["--description", "kiosks"])?;
    let (ok, log) = try_enroll(&c, &relay, "kiosk-1", &token)?;
    assert!(ok, "{log}");
    assert!(enrolled(&c, "kiosk-1").await?);
    let id = token.split('.').next().unwrap_or_default();
    c.cli(&["token", "revoke", id, "-n", &c.namespace])?;
    assert_refused(
        &c,
        &relay,
        "thief-2",
        &token,
        "hq",
        "does not exist or was revoked",
    )
    .await?;
    assert!(enrolled(&c, "kiosk-1").await?, "enrolled agents stay");

    // A made-up token of the right shape, and garbage.
    let forged = format!("{id}.{}", "0".repeat(64));
    let other = c.bootstrap_token("hq", &[])?;
    let forged_other = format!(
        "{}.{}",
        other.split('.').next().unwrap_or_default(),
        "0".repeat(64)
    );
    assert_refused(
        &c,
        &relay,
        "thief-3",
        &forged_other,
        "hq",
        "does not match its record",
    )
    .await?;
    assert_refused(
        &c,
        &relay,
        "thief-4",
        &forged,
        "hq",
        "does not exist or was revoked",
    )
    .await?;
    assert_refused(
        &c,
        &relay,
        "thief-5",
        "letmein",
        "hq",
        "not a bootstrap token",
    )
    .await?;
    // The agent enrolled at the start never noticed.
    assert!(c.agents[0].install_root.join("hello").exists());
    assert!(enrolled(&c, "desk").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_use_token_enrolls_one_machine_only() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let _repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    let once = c.bootstrap_token("hq", &["--max-uses", "1"])?;
    let (ok, log) = try_enroll(&c, &relay, "laptop-1", &once)?;
    assert!(ok, "{log}");
    assert_refused(&c, &relay, "laptop-2", &once, "hq", "used up (1 of 1").await?;
    let id = once.split('.').next().unwrap_or_default();
    let record = c.api::<BootstrapToken>().get(id).await?;
    let status = record.status.unwrap_or_default();
    assert_eq!(status.uses, 1, "one use counted");
    assert!(status.last_used.is_some());
    // The machine it enrolled comes back without needing it again, and
    // enrolling again (its credential lost) takes no use.
    let (ok, log) = try_enroll(&c, &relay, "laptop-1", &once)?;
    assert!(ok, "a restart needs no bootstrap token: {log}");
    let (state_dir, _) = c.agent_dirs("laptop-1");
    std::fs::remove_file(state_dir.join("credentials.json"))?;
    let (ok, log) = try_enroll(&c, &relay, "laptop-1", &once)?;
    assert!(ok, "the same machine again, its token used up: {log}");
    let record = c.api::<BootstrapToken>().get(id).await?;
    assert_eq!(record.status.unwrap_or_default().uses, 1, "not counted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_sites_tokens_die_with_it() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let branch =
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec: {}\n";
    repo.write("fleet/branch.yaml", branch)?;
    repo.commit("A branch office")?;
    let uid = |s: Option<Site>| s.and_then(|s| s.metadata.uid);
    let first = wait_for("site branch", T, || async {
        Ok(uid(c.api::<Site>().get_opt("branch").await?))
    })
    .await?;
    c.start_relay("branch").await?;
    let old = c.bootstrap_token("branch", &["--ttl", "720h"])?;
    let relay_secret = |s: k8s_openapi::api::core::v1::Secret| {
        s.data
            .and_then(|d| {
                d.get("token")
                    .map(|t| String::from_utf8_lossy(&t.0).into_owned())
            })
            .unwrap_or_default()
    };
    let old_relay_token = relay_secret(
        c.api::<k8s_openapi::api::core::v1::Secret>()
            .get("branch-relay")
            .await?,
    );

    // The branch closes; later a branch of the same name opens again. No
    // garbage collector runs here, so the old token's object is still there:
    // only its binding to the first Site's UID stops it.
    repo.remove("fleet/branch.yaml")?;
    repo.commit("Close the branch")?;
    wait_for("site branch to go", T, || async {
        Ok(c.api::<Site>()
            .get_opt("branch")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    // What the garbage collector would do: the relay's objects go with
    // their Site.
    c.cluster.kubectl(&[
        "-n",
        &c.namespace,
        "delete",
        "secret,deployment,service",
        "branch-relay",
    ])?;
    repo.write("fleet/branch.yaml", branch)?;
    repo.commit("Open the branch again")?;
    let second = wait_for("site branch again", T, || async {
        Ok(uid(c.api::<Site>().get_opt("branch").await?))
    })
    .await?;
    assert_ne!(first, second);
    // The new Site's relay gets a new credential; the old one's is refused.
    let relay = c.restart_relay("branch").await?;
    let res = caravan_tests::http()
        .get(format!("{}/v1/site/desired", c.api_url))
        .bearer_auth(&old_relay_token)
        .send()
        .await?;
    assert_eq!(res.status(), 401, "the old Site's relay credential");
    let id = old.split('.').next().unwrap_or_default();
    assert!(c.api::<BootstrapToken>().get_opt(id).await?.is_some());
    assert_refused(
        &c,
        &relay,
        "old-laptop",
        &old,
        "branch",
        "since been deleted",
    )
    .await?;
    let new = c.bootstrap_token("branch", &[])?;
    let (ok, log) = try_enroll(&c, &relay, "new-laptop", &new)?;
    assert!(ok, "a token of the new Site works: {log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_enrollment_flood_is_held_to_the_sites_rate() -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            enrollments_per_second: Some(1),
            ..Default::default()
        },
    )
    .await?;
    let _repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    // 30 enrollments at once with a valid token: a burst of 10 (ten seconds'
    // worth) goes through, the rest are told to come back later.
    let http = caravan_tests::http();
    let attempts = (0..30).map(|n| {
        http.post(format!("{}/v1/enroll", relay.url))
            .bearer_auth(&relay.bootstrap_token)
            .json(&serde_json::json!({
                "hostId": format!("00000000-0000-4000-8000-{n:012}"), "hostname": format!("flood-{n}"),
                "os": "linux", "arch": "x86_64", "version": "0", "secret": "f".repeat(64),
            }))
            .send()
    });
    let mut accepted = 0;
    let mut limited = 0;
    for res in futures::future::join_all(attempts).await {
        let res = res?;
        match res.status().as_u16() {
            200 => accepted += 1,
            429 => {
                limited += 1;
                let body = res.text().await?;
                assert!(body.contains("too many enrollments at site hq"), "{body}");
            }
            other => anyhow::bail!("unexpected answer {other}: {}", res.text().await?),
        }
    }
    assert!((10..=12).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + limited, 30);
    let agents = c.api::<Agent>().list(&Default::default()).await?;
    assert_eq!(
        agents.items.len(),
        accepted,
        "only accepted enrollments made Agents"
    );
    Ok(())
}

/// What the relay answers agent `host` (with its own credentials) for its
/// desired state and for a report.
async fn relay_answers(c: &Caravan, relay: &RelayInfo, host: &str) -> anyhow::Result<(u16, u16)> {
    let (state_dir, _) = c.agent_dirs(host);
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("credentials.json"))?)?;
    let token = creds["token"].as_str().unwrap_or_default();
    let http = caravan_tests::http();
    let desired = http
        .get(format!("{}/v1/desired", relay.url))
        .bearer_auth(token)
        .send()
        .await?;
    let report = http
        .post(format!("{}/v1/report", relay.url))
        .bearer_auth(token)
        .json(&caravan_tests::report_as(
            creds["agent"].as_str().unwrap_or_default(),
        ))
        .send()
        .await?;
    Ok((desired.status().as_u16(), report.status().as_u16()))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_waits_for_approval_is_cut_off_when_revoked_and_enrolls_again_when_deleted(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    repo.write(
        "fleet/site.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: hq}\nspec:\n  enrollment: {requireApproval: true}\n",
    )?;
    repo.commit("Agents at hq need approval")?;
    wait_for("hq to require approval", T, || async {
        let site = c.api::<Site>().get_opt("hq").await?;
        Ok(site
            .filter(|s| s.spec.enrollment.require_approval)
            .map(|_| ()))
    })
    .await?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("kiosk", &relay)?;
    let hello = c.agents[0].install_root.join("hello");
    let log = c.dir.join("logs/agent-kiosk.log");

    // Enrolled, but waiting: its relay turns it away and it installs nothing.
    let agent = wait_for("kiosk to enroll", T, || async {
        Ok(c.api::<Agent>()
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .next())
    })
    .await?;
    let name = agent.metadata.name.clone().unwrap_or_default();
    assert!(!agent.spec.approved, "new agents at hq await approval");
    wait_for("kiosk to be turned away", T, || async {
        Ok(std::fs::read_to_string(&log)?
            .contains("awaits approval")
            .then_some(()))
    })
    .await?;
    assert_eq!(relay_answers(&c, &relay, "kiosk").await?, (403, 403));
    assert!(!hello.exists(), "nothing installed before approval");

    // Approved: served from its next request on.
    c.cli(&["agent", "approve", &name, "-n", &c.namespace])?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    assert!(hello.exists());

    // Revoked: turned away at once, and it keeps what it has even when Git
    // says to remove it.
    c.cli(&["agent", "revoke", &name, "-n", &c.namespace])?;
    wait_for("the relay to turn kiosk away", T, || async {
        Ok((relay_answers(&c, &relay, "kiosk").await? == (403, 403)).then_some(()))
    })
    .await?;
    c.wait_warning(&name, "Revoked", "keeps what it has installed")
        .await?;
    repo.remove("fleet/job.yaml")?;
    repo.commit("hello leaves the fleet")?;
    wait_for("the job to go", T, || async {
        let jobs = c.api::<caravan_api::v1alpha1::DistributionJob>();
        Ok(jobs
            .list(&Default::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        hello.exists(),
        "a revoked agent is told nothing, so it removes nothing"
    );

    // Approved again, it catches up (and removes hello); then its Agent is
    // deleted: its relay does not know it any more (410, not the 403 of an
    // agent it knows), and it enrolls again with its bootstrap token, as a
    // new Agent that awaits approval like any other here.
    c.cli(&["agent", "approve", &name, "-n", &c.namespace])?;
    wait_for("hello to be removed", T, || async {
        Ok((!hello.exists()).then_some(()))
    })
    .await?;
    let old_uid = c.api::<Agent>().get(&name).await?.metadata.uid;
    c.agents[0].proc.kill();
    c.api::<Agent>().delete(&name, &Default::default()).await?;
    wait_for("the relay to forget the deleted agent", T, || async {
        Ok((relay_answers(&c, &relay, "kiosk").await? == (410, 410)).then_some(()))
    })
    .await?;
    c.agents.clear();
    c.start_agent("kiosk", &relay)?;
    let again = wait_for("kiosk to enroll again", T, || async {
        Ok(c.api::<Agent>()
            .get_opt(&name)
            .await?
            .filter(|a| a.metadata.uid != old_uid))
    })
    .await?;
    assert!(!again.spec.approved, "a new Agent at hq awaits approval");
    wait_for("kiosk to wait for approval again", T, || async {
        Ok((relay_answers(&c, &relay, "kiosk").await? == (403, 403)).then_some(()))
    })
    .await?;
    let log = std::fs::read_to_string(&log)?;
    assert!(log.contains("Agent was deleted; enrolling again"), "{log}");
    Ok(())
}

/// The credential agent `host` holds now.
fn credential_of(c: &Caravan, host: &str) -> anyhow::Result<String> {
    let (state_dir, _) = c.agent_dirs(host);
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("credentials.json"))?)?;
    Ok(creds["token"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stolen_agent_credential_expires_and_only_the_agents_key_renews_it() -> anyhow::Result<()>
{
    use caravan_api::{signing, wire::RenewRequest};
    use caravan_net::agent_tokens::{renewal_message, unix_now};
    let mut c = Caravan::start("fleet").await?;
    c.relay_args = vec!["--agent-credential-ttl-seconds".into(), "3".into()];
    let (repo, relay) = c.hello_installed("desk").await?;
    let http = caravan_tests::http();
    let desired = |token: String| {
        http.get(format!("{}/v1/desired", relay.url))
            .bearer_auth(token)
            .send()
    };

    // A credential stolen from the endpoint works for three seconds only.
    let stolen = credential_of(&c, "desk")?;
    let res = wait_for("the stolen credential to expire", T, || async {
        let res = desired(stolen.clone()).await?;
        Ok((res.status() == 401).then_some(res))
    })
    .await?;
    assert!(res.text().await?.contains("expired"));

    // The agent renews its own with its key and carries on: Git removes
    // hello, and the agent (served) removes it.
    repo.remove("fleet/job.yaml")?;
    repo.commit("hello leaves the fleet")?;
    let hello = c.agents[0].install_root.join("hello");
    wait_for("hello to be removed", T, || async {
        Ok((!hello.exists()).then_some(()))
    })
    .await?;
    // (A long poll opened before the credential expired may bring the
    // change; the renewal comes with the agent's next request.)
    wait_for("the agent to renew its credential", T, || async {
        Ok((credential_of(&c, "desk")? != stolen).then_some(()))
    })
    .await?;
    let renewals = caravan_tests::metric(&relay.url, "caravan_relay_renewals_total").await?;
    assert!(renewals >= 1.0, "{renewals} renewals");

    // Whoever lacks the agent's key cannot renew it: another key, an old
    // proof replayed, or garbage.
    let name = stolen.split('/').next().unwrap_or_default().to_string();
    let renew = |req: RenewRequest| {
        http.post(format!("{}/v1/renew", relay.url))
            .json(&req)
            .send()
    };
    let thief = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let now = unix_now();
    for (req, words) in [
        (
            RenewRequest {
                agent: name.clone(),
                time: now,
                signature: signing::sign_bytes(&thief, &renewal_message(&name, now)),
            },
            "does not verify",
        ),
        (
            RenewRequest {
                agent: name.clone(),
                time: now,
                signature: "AAAA".into(),
            },
            "does not verify",
        ),
    ] {
        let res = renew(req).await?;
        assert_eq!(res.status(), 401);
        let body = res.text().await?;
        assert!(body.contains(words), "{body}");
    }
    // A proof from another time is a wrong clock, not a wrong key: the
    // agent is told so and keeps its credential.
    let res = renew(RenewRequest {
        agent: name.clone(),
        time: now - 3600,
        signature: signing::sign_bytes(&thief, &renewal_message(&name, now - 3600)),
    })
    .await?;
    assert_eq!(res.status(), 400);
    let body = res.text().await?;
    assert!(body.contains("from the relay's clock"), "{body}");
    let res = renew(RenewRequest {
        agent: "someone-else".into(),
        time: now,
        signature: signing::sign_bytes(&thief, &renewal_message("someone-else", now)),
    })
    .await?;
    assert_eq!(res.status(), 410, "an agent the site does not know");
    let body = res.text().await?;
    assert!(body.contains("not known at this site"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_relay_credential_stops_working_and_agents_need_not_enroll_again(
) -> anyhow::Result<()> {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    let token_of = |s: Secret| {
        s.data
            .and_then(|d| {
                d.get("token")
                    .map(|t| String::from_utf8_lossy(&t.0).into_owned())
            })
            .unwrap_or_default()
    };
    let old = token_of(c.api::<Secret>().get("hq-relay").await?);
    // A branch below hq: its relay's credential at hq's relay is keyed by
    // hq's token.
    repo.write(
        "fleet/branch.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec: {parent: hq}\n",
    )?;
    repo.commit("A branch below hq")?;
    let credential_id = |d: Deployment| {
        d.spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("caravan.dev/relay-credential-id").cloned())
            .unwrap_or_default()
    };
    let content_token = |s: Secret| {
        s.data
            .and_then(|d| d.get("content-token").map(|t| t.0.clone()))
            .unwrap_or_default()
    };
    let (branch_id, branch_content) = wait_for("branch's relay", T, || async {
        let d = c.api::<Deployment>().get_opt("branch-relay").await?;
        let s = c.api::<Secret>().get_opt("branch-relay").await?;
        Ok(d.zip(s).map(|(d, s)| (credential_id(d), content_token(s))))
    })
    .await?;

    c.cli(&["site", "rotate-relay-credential", "hq", "-n", &c.namespace])?;
    // The old credential is refused at once...
    let http = caravan_tests::http();
    let refused = wait_for("the old relay credential to be refused", T, || async {
        let res = http
            .get(format!("{}/v1/site/desired", c.api_url))
            .bearer_auth(&old)
            .send()
            .await?;
        Ok(if res.status() == 401 {
            Some(res.text().await?)
        } else {
            None
        })
    })
    .await?;
    assert!(refused.contains("was rotated"), "{refused}");
    // ...the relay's Secret holds the new one, and its pods roll.
    let new = wait_for(
        "the relay's Secret to hold the new credential",
        T,
        || async {
            let token = token_of(c.api::<Secret>().get("hq-relay").await?);
            Ok((token != old).then_some(token))
        },
    )
    .await?;
    let kid = new.split('/').nth(2).unwrap_or_default().to_string();
    let rolled = wait_for("the pod template to name the new key", T, || async {
        let d = c.api::<Deployment>().get("hq-relay").await?;
        let annotations = d
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .unwrap_or_default();
        Ok(annotations
            .get("caravan.dev/relay-credential-id")
            .is_some_and(|id| id.starts_with(&format!("{kid}-")))
            .then_some(()))
    })
    .await;
    rolled?;
    // The branch's credential at hq follows, and its pods roll too.
    wait_for("branch's relay to follow hq's rotation", T, || async {
        let id = credential_id(c.api::<Deployment>().get("branch-relay").await?);
        let content = content_token(c.api::<Secret>().get("branch-relay").await?);
        Ok(
            (id != branch_id && id.ends_with(&format!(".{kid}")) && content != branch_content)
                .then_some(()),
        )
    })
    .await?;
    let relay = c.restart_relay("hq").await?;

    // The agent's credential was keyed by the old one: it renews with its
    // key, without a new enrollment, and goes on converging.
    repo.remove("fleet/job.yaml")?;
    repo.commit("hello leaves the fleet")?;
    let hello = c.agents[0].install_root.join("hello");
    wait_for("hello to be removed", T, || async {
        Ok((!hello.exists()).then_some(()))
    })
    .await
    .map_err(|e| e.context(c.logs()))?;
    assert_eq!(
        caravan_tests::metric(&relay.url, "caravan_relay_enrollments_total").await?,
        0.0,
        "nobody enrolled at the new relay"
    );
    assert!(caravan_tests::metric(&relay.url, "caravan_relay_renewals_total").await? >= 1.0);
    Ok(())
}

/// A file of agent `host`'s state directory.
fn state_file(c: &Caravan, host: &str, file: &str) -> anyhow::Result<String> {
    let (state_dir, _) = c.agent_dirs(host);
    Ok(std::fs::read_to_string(state_dir.join(file))?
        .trim()
        .to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_that_saw_the_host_secret_cannot_take_the_identity() -> anyhow::Result<()> {
    use caravan_api::{
        signing,
        wire::{EnrollRequest, KeyProof},
    };
    use caravan_net::agent_tokens::{enrollment_message, unix_now};
    let mut c = Caravan::start("fleet").await?;
    let (repo, hq) = c.hello_installed("desk").await?;
    // A branch that requires approval, and a machine declared in Git ahead
    // of its enrollment, at hq.
    repo.write(
        "fleet/branch.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec:\n  enrollment: {requireApproval: true}\n",
    )?;
    repo.write(
        "fleet/kiosk.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata:\n  name: kiosk\n  labels: {caravan.dev/host-id: kiosk-0000-0001}\nspec: {site: hq, hostId: kiosk-0000-0001, hostname: kiosk, approved: true}\n",
    )?;
    repo.commit("A branch, and a kiosk to come at hq")?;
    wait_for("site branch and Agent kiosk", T, || async {
        let site = c.api::<Site>().get_opt("branch").await?;
        let kiosk = c.api::<Agent>().get_opt("kiosk").await?;
        Ok(site.zip(kiosk))
    })
    .await?;
    let branch = c.start_relay("branch").await?;
    let branch_token = c.bootstrap_token("branch", &[])?;
    let hq_token = c.bootstrap_token("hq", &[])?;

    // What a relay sees of desk's enrollment: its host ID, its secret and
    // its public key. With them, a thief tries to move desk to the branch
    // under its own key, without a proof or with one of its own.
    let host_id = state_file(&c, "desk", "host-id")?;
    let secret = state_file(&c, "desk", "host-secret")?;
    let desk_before = c.agent_of("desk").await?;
    // desk's own process is stopped: the enrollments below play it (one
    // running at hq would enroll there again once its Agent moves away).
    c.agents[0].proc.kill();
    let real_key = ed25519_dalek::SigningKey::from_bytes(
        &hex::decode(state_file(&c, "desk", "agent-key")?)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("agent-key is 32 bytes"))?,
    );
    let thief = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let request = |key: &ed25519_dalek::SigningKey,
                   signer: Option<(&ed25519_dalek::SigningKey, &str)>| {
        let public_key = signing::encode_public(&key.verifying_key());
        let time = unix_now();
        EnrollRequest {
            host_id: host_id.clone(),
            hostname: "desk".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            version: "0".into(),
            secret: secret.clone(),
            proof: signer.map(|(signer, token)| KeyProof {
                time,
                signature: signing::sign_bytes(
                    signer,
                    &enrollment_message(&host_id, &public_key, token, time),
                ),
            }),
            public_key,
            facts: Default::default(),
        }
    };
    let http = caravan_tests::http();
    let enroll = |relay: &RelayInfo, token: &str, req: &EnrollRequest| {
        http.post(format!("{}/v1/enroll", relay.url))
            .bearer_auth(token)
            .json(req)
            .send()
    };
    for (req, words) in [
        (request(&thief, None), "needs a signature with that key"),
        (
            request(&thief, Some((&thief, &branch_token))),
            "not signed with it",
        ),
        // desk's own proof, as a relay at hq saw it, replayed at the branch.
        (
            request(&real_key, Some((&real_key, &hq_token))),
            "not signed with it",
        ),
    ] {
        let res = enroll(&branch, &branch_token, &req).await?;
        let status = res.status();
        let body = res.text().await?;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains(words), "{words}: {body}");
    }
    let desk = c.agent_of("desk").await?;
    assert_eq!(desk.spec.site, "hq", "desk did not move");
    assert_eq!(desk.spec.public_key, desk_before.spec.public_key);

    // The machine declared for hq cannot be claimed at the branch.
    let mut kiosk = request(&thief, None);
    kiosk.host_id = "kiosk-0000-0001".into();
    let res = enroll(&branch, &branch_token, &kiosk).await?;
    let status = res.status();
    let body = res.text().await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("declared as Agent kiosk of site hq"),
        "{body}"
    );
    let declared = c.api::<Agent>().get("kiosk").await?;
    assert!(declared.spec.secret_hash.is_empty(), "kiosk is unclaimed");

    // desk itself moves with its key, and awaits approval at the branch.
    let res = enroll(
        &branch,
        &branch_token,
        &request(&real_key, Some((&real_key, &branch_token))),
    )
    .await?;
    assert_eq!(res.status(), 200, "{}", res.text().await?);
    let desk = c.agent_of("desk").await?;
    assert_eq!(desk.spec.site, "branch");
    assert!(
        !desk.spec.approved,
        "a move to a site that requires approval awaits it"
    );
    // Unapproved (as a revoked agent would be), it does not become approved
    // by moving back to a site that asks for no approval.
    let res = enroll(
        &hq,
        &hq_token,
        &request(&real_key, Some((&real_key, &hq_token))),
    )
    .await?;
    assert_eq!(res.status(), 200, "{}", res.text().await?);
    let desk = c.agent_of("desk").await?;
    assert_eq!(desk.spec.site, "hq");
    assert!(!desk.spec.approved, "a move does not approve an agent");
    // A proof from another time is a wrong clock, named as such.
    let mut stale = request(&real_key, None);
    let then = unix_now() - 3600;
    stale.proof = Some(KeyProof {
        time: then,
        signature: signing::sign_bytes(
            &real_key,
            &enrollment_message(&host_id, &stale.public_key, &hq_token, then),
        ),
    });
    let res = enroll(&hq, &hq_token, &stale).await?;
    assert_eq!(res.status(), 400);
    let body = res.text().await?;
    assert!(body.contains("check the endpoint's clock"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_renewal_is_refused_keeps_its_credential_until_it_has_a_new_one(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    c.relay_args = vec!["--agent-credential-ttl-seconds".into(), "3".into()];
    let repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    // Enrolled with a single-use token (which its own enrollments again
    // would not need: they are not counted).
    let relay = RelayInfo {
        bootstrap_token: c.bootstrap_token("hq", &["--max-uses", "1"])?,
        ..relay
    };
    c.start_agent("desk", &relay)?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    let name = c.agent_of("desk").await?.metadata.name.unwrap_or_default();

    // desk's key on its Agent is replaced (say, by a hand edit): the relay
    // refuses every renewal, and enrolling again is refused too.
    let agents = c.api::<Agent>();
    let key = c.agent_of("desk").await?.spec.public_key;
    let set_key = |key: String| {
        let agents = agents.clone();
        let name = name.clone();
        async move {
            agents
                .patch(
                    &name,
                    &Default::default(),
                    &kube::api::Patch::Merge(serde_json::json!({"spec": {"publicKey": key}})),
                )
                .await
        }
    };
    set_key(caravan_api::signing::encode_public(
        &ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key(),
    ))
    .await?;
    let log = c.dir.join("logs/agent-desk.log");
    wait_for("desk's enrollment to be refused", T, || async {
        Ok(std::fs::read_to_string(&log)?
            .contains("the enrollment is not signed with it")
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(c.agents[0].proc.running(), "the agent keeps running");
    assert!(
        !credential_of(&c, "desk")?.is_empty(),
        "and keeps its credential"
    );

    // Once its key is back, it renews and is served again: Git removes
    // hello, and desk removes it.
    set_key(key).await?;
    repo.remove("fleet/job.yaml")?;
    repo.commit("hello leaves the fleet")?;
    let hello = c.agents[0].install_root.join("hello");
    wait_for("hello to be removed", T, || async {
        Ok((!hello.exists()).then_some(()))
    })
    .await?;
    assert!(enrolled(&c, "desk").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_set_up_with_a_bundle_pins_the_root_and_the_ca_it_names() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = Caravan::start("fleet").await?;
    let _repo = c.seed_example_fleet().await?;
    let relay = c.start_relay("hq").await?;
    wait_for("hq's status to name what its agents pin", T, || async {
        let status = c.site("hq").await?.status.unwrap_or_default();
        Ok(status.ca.zip(status.trust_root_sha256))
    })
    .await?;
    let bundle = c.dir.join("hq.bundle.json");
    c.cli(&[
        "token",
        "create",
        "--site",
        "hq",
        "--bundle",
        &bundle.display().to_string(),
        "-n",
        &c.namespace,
    ])?;
    let mode = std::fs::metadata(&bundle)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the bundle holds a secret");

    // An agent given nothing but its relay's address and the bundle.
    let run = |host: &str, bundle: &std::path::Path| -> anyhow::Result<(bool, String)> {
        let dir = c.dir.join("bundled").join(host);
        let out = std::process::Command::new(caravan_tests::bin("caravan-agent")?)
            .args(["run", "--once", "--server", &relay.url, "--hostname", host])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--install-root")
            .arg(dir.join("root"))
            .arg("--bundle")
            .arg(bundle)
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        Ok((out.status.success(), log))
    };
    let (ok, log) = run("kiosk", &bundle)?;
    assert!(ok, "{log}");
    assert!(
        log.contains("pinned=true"),
        "the root is pinned, not taken on first use: {log}"
    );
    assert!(c.dir.join("bundled/kiosk/root/hello").exists());
    // The bundle holds a token: once the agent has enrolled it may go, and
    // the agent keeps its pins.
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&bundle)?)?;
    std::fs::remove_file(&bundle)?;
    let (ok, log) = run("kiosk", &bundle)?;
    assert!(ok, "{log}");

    // A bundle naming another root, or another CA, is held to it.
    let write = |name: &str, key: &str, value: String| -> anyhow::Result<std::path::PathBuf> {
        let mut b = original.clone();
        b[key] = value.into();
        let path = c.dir.join(name);
        std::fs::write(&path, serde_json::to_vec(&b)?)?;
        Ok(path)
    };
    let other_root = write("root.json", "trustRootSha256", "0".repeat(64))?;
    let (ok, log) = run("desk", &other_root)?;
    assert!(!ok, "{log}");
    assert!(log.contains("has the pinned sha256"), "{log}");
    let other = caravan_tests::TestTls::generate(&c.dir.join("other-ca"))?;
    let other_ca = write("ca.json", "ca", std::fs::read_to_string(&other.ca)?)?;
    let (ok, log) = run("laptop", &other_ca)?;
    assert!(!ok, "{log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    assert!(!enrolled(&c, "laptop").await?, "nothing reached the relay");
    Ok(())
}

/// An endpoint that goes quiet: its Agent turns Stale (condition, column,
/// Warning), is deleted as the policy says (a Warning on its Site), and
/// when the machine comes back it is told, enrolls again and carries on
/// with what it has installed.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_agent_turns_stale_is_deleted_by_policy_and_enrolls_again_when_it_is_back(
) -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            agent_stale_after_seconds: Some(3),
            agent_delete_after_seconds: Some(15),
            ..Default::default()
        },
    )
    .await?;
    let (_, relay) = c.hello_installed("desk").await?;
    let before = c.agent_of("desk").await?;
    let name = before.metadata.name.clone().unwrap_or_default();
    // Switched off.
    c.agents[0].proc.kill();
    c.agents.clear();
    let note = c
        .wait_warning(&name, "Stale", "not heard from since")
        .await?;
    assert!(note.contains("deleted once silent for 15 s"), "{note}");
    let stale = c.api::<Agent>().get(&name).await?;
    let conditions = stale.status.unwrap_or_default().conditions;
    assert!(
        caravan_api::conditions::is_true(&conditions, caravan_api::conditions::STALE),
        "{conditions:?}"
    );
    let agents = c.cluster.kubectl(&["get", "agents", "-n", &c.namespace])?;
    let header = agents.lines().next().unwrap_or_default();
    assert!(header.contains("STALE"), "{agents}");
    assert!(
        agents.lines().nth(1).unwrap_or_default().contains("True"),
        "{agents}"
    );
    // Silent on: deleted, and its Site says so.
    wait_for("the stale Agent to be deleted", T, || async {
        Ok(c.api::<Agent>()
            .get_opt(&name)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    c.wait_warning("hq", "StaleAgentDeleted", &name).await?;
    // Back: told its Agent is gone, it enrolls again, and keeps what it has.
    c.start_agent("desk", &relay)?;
    let again = wait_for("desk to enroll again", T, || async {
        Ok(c.api::<Agent>()
            .get_opt(&name)
            .await?
            .filter(|a| a.metadata.uid != before.metadata.uid))
    })
    .await?;
    assert!(again.spec.approved, "hq needs no approval");
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    let log = std::fs::read_to_string(c.dir.join("logs/agent-desk.log"))?;
    assert!(log.contains("Agent was deleted; enrolling again"), "{log}");
    Ok(())
}

/// An agent whose Agent is deleted, with no bootstrap token to enroll again
/// with, stops with exit code 78 and says why, rather than wait for nothing.
/// (One whose token is refused keeps asking, slowly: a relay's `410` alone
/// must not stop an endpoint for good.)
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_agent_was_deleted_and_cannot_enroll_again_stops_saying_why(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (_, relay) = c.hello_installed("desk").await?;
    let name = c.agent_of("desk").await?.metadata.name.unwrap_or_default();
    c.agents[0].proc.kill();
    c.agents.clear();
    c.api::<Agent>().delete(&name, &Default::default()).await?;
    wait_for("the relay to forget desk", T, || async {
        Ok((relay_answers(&c, &relay, "desk").await?.0 == 410).then_some(()))
    })
    .await?;
    // Started as it would be once enrolled: without its bootstrap token.
    let status = c.run_agent_once("desk", &relay, &[("CARAVAN_BOOTSTRAP_TOKEN", "")])?;
    assert_eq!(status.code(), Some(78), "{status:?}");
    let log = std::fs::read_to_string(c.dir.join("logs/agent-desk.log"))?;
    assert!(
        log.contains("this endpoint's Agent was deleted and it has no bootstrap token")
            && log.contains("give it one"),
        "{log}"
    );
    Ok(())
}
