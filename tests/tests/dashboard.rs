//! What an operator watches. The Grafana dashboard in the chart: its JSON
//! loads, the chart ships it as a ConfigMap for Grafana's sidecar, and every
//! metric its queries name is one the controller, a relay or an agent
//! exports (read from their `/metrics`, and the agent's `--metrics-file`,
//! after a job ran). And the Events the same run leaves on its objects: the
//! relay connected, the artifact verified, the agent enrolled, the job
//! complete.

use std::{collections::BTreeSet, time::Duration};

use caravan_tests::{helm, repo_root, wait_for, Caravan, HELM_NAMESPACE};

/// The `caravan_…` metric names in every query of the dashboard.
fn queried() -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(repo_root().join("charts/caravan/dashboards/caravan.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let mut exprs = vec![];
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap_or_default().to_string());
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(q) = v["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut names = BTreeSet::new();
    for e in exprs {
        for (i, _) in e.match_indices("caravan_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    Ok(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_queries_is_exported() -> anyhow::Result<()> {
    let names = queried()?;
    assert!(names.len() >= 10, "{names:?}");
    let mut c = Caravan::start("dashboard").await?;
    let (_, relay) = c.hello_installed("desk").await?;
    let mut exported = String::new();
    for base in [&c.api_url, &relay.url] {
        exported += &caravan_tests::http()
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
    }
    // The agent's, as node_exporter's textfile collector would serve them:
    // the install it reported, and the relay took the report.
    let agent = wait_for("the agent's figures", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(c.agent_metrics_file("desk")).unwrap_or_default();
        Ok(text
            .contains(r#"caravan_agent_assignments{phase="Succeeded"} 1"#)
            .then_some(text))
    })
    .await?;
    let delivered = agent
        .lines()
        .find_map(|l| l.strip_prefix("caravan_agent_report_delivered_timestamp_seconds "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_default();
    assert!(delivered > 1_700_000_000, "{agent}");
    assert!(
        agent.contains("caravan_agent_installed_packages 1"),
        "{agent}"
    );
    exported += &agent;
    // Every family the binaries declare (one with no sample yet, like
    // refused reports, is still exported), under the names Prometheus
    // stores its samples by.
    let mut samples = BTreeSet::new();
    for l in exported.lines() {
        let mut words = l.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            match kind {
                "counter" => {
                    samples.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        samples.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    samples.insert(name.to_string());
                }
            }
        }
    }
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !samples.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{exported}"
    );

    // The transitions, as Events on their objects.
    let events = c
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&Default::default())
        .await?;
    let seen: BTreeSet<(String, String)> = events
        .items
        .iter()
        .map(|e| {
            (
                e.regarding
                    .as_ref()
                    .and_then(|r| r.kind.clone())
                    .unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
            )
        })
        .collect();
    for (kind, reason) in [
        ("Site", "RelayConnected"),
        ("Package", "ArtifactVerified"),
        ("Cabinet", "CabinetReady"),
        ("Agent", "Enrolled"),
        ("DistributionJob", "Complete"),
        ("GitSource", "Applied"),
    ] {
        assert!(
            seen.contains(&(kind.to_string(), reason.to_string())),
            "no {reason} Event on a {kind}: {seen:?}"
        );
    }

    // The chart ships it for Grafana's sidecar.
    let chart = repo_root().join("charts/caravan").display().to_string();
    let rendered: std::collections::BTreeMap<String, String> = serde_json::from_str(&helm(&[
        "template",
        "caravan",
        &chart,
        "--namespace",
        HELM_NAMESPACE,
        "--set-json",
        r#"{"dashboard":{"enabled":true}}"#,
    ])?)?;
    let cm = &rendered["caravan/templates/dashboard.yaml"];
    assert!(
        cm.contains("grafana_dashboard: \"1\"") && cm.contains("\"uid\": \"caravan-overview\""),
        "{cm}"
    );
    Ok(())
}
