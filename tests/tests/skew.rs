//! The release window (`caravan_api::skew`), enforced: a relay or an agent
//! outside it is refused with a message naming both releases and what to
//! upgrade, and its Site or Agent says so, in a condition and a column.

use std::time::Duration;

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::{Agent, AgentStatus},
    wire::paths,
    RELEASE,
};
use caravan_tests::{http_as, wait_for, Caravan};
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Condition};

const T: Duration = Duration::from_secs(60);

/// `VersionSupported`'s status and reason, if there is one.
fn supported(conditions: &[Condition]) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == conditions::VERSION_SUPPORTED)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The status of Agent `name`.
async fn status_of(c: &Caravan, name: &str) -> anyhow::Result<AgentStatus> {
    Ok(c.api::<Agent>().get(name).await?.status.unwrap_or_default())
}

/// What `url` answers a request that says `release` (none: says nothing)
/// with `token`: its status and body.
async fn ask(
    url: &str,
    token: &str,
    release: Option<&str>,
    etag: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut req = http_as(release).get(url).bearer_auth(token);
    if let Some(etag) = etag {
        req = req.header("if-none-match", etag);
    }
    let res = req.send().await?;
    Ok((res.status().as_u16(), res.text().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn relays_and_agents_outside_the_release_window_are_refused_by_name() -> anyhow::Result<()> {
    let mut c = Caravan::start("skew").await?;
    let (_repo, relay) = c.hello_installed("desk").await?;
    let (agent, token) = c.agents[0].credentials()?;

    // Within the window: the Site and the Agent say so, with their releases.
    let ok = Some(("True".to_string(), reasons::WITHIN_WINDOW.to_string()));
    wait_for("the Site to name its relay's release", T, || async {
        let s = c.site("hq").await?.status.unwrap_or_default();
        Ok(
            (s.relay_version.as_deref() == Some(RELEASE) && supported(&s.conditions) == ok)
                .then_some(()),
        )
    })
    .await?;
    let a = status_of(&c, &agent).await?;
    assert_eq!(a.version.as_deref(), Some(RELEASE));
    assert_eq!(supported(&a.conditions), ok);
    let sites = c.cluster.kubectl(&["get", "sites", "-n", &c.namespace])?;
    let header = sites.lines().next().unwrap_or_default();
    assert!(header.contains("VERSION"), "{sites}");
    assert!(sites.contains(RELEASE), "{sites}");

    // An agent of another release, at the relay: refused what it would
    // act on, its desired state and blobs, by name. (Raw requests with the
    // agent's credential: what an agent of that release would send.) Agents
    // may be two releases behind: with controller 0.2 only one that says no
    // release (older than the wire protocol of 0.2) is too old.
    assert!(RELEASE.starts_with("0.2."), "pick the releases below anew");
    let desired = format!("{}{}", relay.url, paths::DESIRED);
    let (status, body) = ask(&desired, &token, Some("0.0.1"), None).await?;
    assert_eq!(status, 200, "0.0 is two releases behind: {body}");
    for (release, says) in [
        (
            None,
            format!("agent of a release that does not say its version is outside what controller {RELEASE} works with (agents up to 2 releases behind it): upgrade the agent to {RELEASE}"),
        ),
        (
            Some("0.3.0"),
            format!("agent 0.3.0 is outside what controller {RELEASE} works with (agents up to 2 releases behind it): upgrade the controller to 0.3.0 first"),
        ),
    ] {
        let (status, body) = ask(&desired, &token, release, None).await?;
        assert_eq!(status, 426, "{release:?}: {body}");
        assert!(body.contains(&says), "{release:?}: {body}");
    }
    // Even where the relay answers outside its routes: a long-poll it would
    // park, a blob in its cache it would send from the file.
    let (status, body) = ask(&desired, &token, Some(RELEASE), None).await?;
    assert_eq!(status, 200, "{body}");
    let etag = http_as(Some(RELEASE))
        .get(&desired)
        .bearer_auth(&token)
        .send()
        .await?
        .headers()
        .get("etag")
        .and_then(|e| e.to_str().ok())
        .map(String::from)
        .expect("a desired state has an etag");
    let started = std::time::Instant::now();
    let parked = format!("{desired}?wait=20");
    let (status, body) = ask(&parked, &token, Some("0.3.0"), Some(&etag)).await?;
    assert_eq!(status, 426, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused at once, not parked"
    );
    let (status, _) = ask(
        &parked.replace("20", "1"),
        &token,
        Some(RELEASE),
        Some(&etag),
    )
    .await?;
    assert_eq!(status, 304, "within the window, the same poll waits");
    let digest = &a.installed.first().expect("hello is installed").digest;
    let blob = format!("{}{}", relay.url, paths::blob(digest));
    let (status, body) = ask(&blob, &token, Some("0.3.0"), None).await?;
    assert_eq!(status, 426, "{body}");
    let (status, _) = ask(&blob, &token, Some(RELEASE), None).await?;
    assert_eq!(status, 200);

    // A real agent that says it is of 0.3.0 (as one updated by hand ahead
    // of its controller): it acts on nothing, says why in its log, and its
    // Agent says so (it still reports).
    let installed = a.installed_count;
    c.agents[0].proc.kill();
    c.agents.clear();
    c.agent_env.insert(
        "desk".into(),
        vec![("CARAVAN_CLAIM_RELEASE".into(), "0.3.0".into())],
    );
    c.start_agent("desk", &relay)?;
    wait_for(
        "the Agent to be flagged as ahead of its controller",
        T,
        || async {
            let a = status_of(&c, &agent).await?;
            Ok((a.version.as_deref() == Some("0.3.0")
                && supported(&a.conditions).is_some_and(|s| s.1 == reasons::NEWER_THAN_CONTROLLER))
            .then_some(a))
        },
    )
    .await
    .map(|a| assert_eq!(a.installed_count, installed, "nothing was removed"))?;
    let agents = c.cluster.kubectl(&["get", "agents", "-n", &c.namespace])?;
    assert!(agents.contains("0.3.0"), "{agents}");
    let log = std::fs::read_to_string(c.dir.join("logs/agent-desk.log"))?;
    assert!(
        log.contains("release refused") && log.contains("upgrade the controller to 0.3.0 first"),
        "{log}"
    );

    // A relay of another release, at the controller: refused by name, and
    // its Site says so (not Ready, VersionSupported False). The site's
    // relay is stopped first: it would say its own release again.
    c.relays[0].kill();
    let secret = c.api::<Secret>().get("hq-relay").await?;
    let relay_token = String::from_utf8(secret.data.unwrap_or_default()["token"].0.clone())?;
    let site_desired = format!("{}{}", c.api_url, paths::SITE_DESIRED);
    let (status, body) = ask(&site_desired, &relay_token, Some("0.0.1"), None).await?;
    assert_eq!(status, 426, "{body}");
    assert!(
        body.contains(&format!(
            "relay 0.0.1 is outside what controller {RELEASE} works with (relays up to 1 releases behind it): upgrade the relay to {RELEASE}"
        )),
        "{body}"
    );
    let site = wait_for("the Site to flag its relay", T, || async {
        let s = c.site("hq").await?.status.unwrap_or_default();
        Ok((s.relay_version.as_deref() == Some("0.0.1")).then_some(s))
    })
    .await?;
    assert_eq!(
        supported(&site.conditions),
        Some(("False".into(), reasons::TOO_OLD.into()))
    );
    let ready = site
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .expect("a Ready condition");
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("upgrade the relay to"),
        "{}",
        ready.message
    );

    // The relay of this release again: Ready, within the window.
    c.restart_relay("hq").await?;
    wait_for("the Site to take its relay back", T, || async {
        let s = c.site("hq").await?.status.unwrap_or_default();
        Ok((s.relay_version.as_deref() == Some(RELEASE)
            && supported(&s.conditions) == ok
            && conditions::is_true(&s.conditions, conditions::READY))
        .then_some(()))
    })
    .await?;
    Ok(())
}
