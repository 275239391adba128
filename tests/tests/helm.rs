//! The Helm chart installs Caravan for real: CRDs, RBAC, the controller
//! Deployment. The controller is then run the way a kubelet would run that
//! Deployment, as the chart's ServiceAccount, so the pipeline only works if
//! the chart's RBAC grants everything the controller needs. The relay chart
//! installs a branch's relay the same way, and the branch's agents converge
//! through it.

use caravan_tests::{helm, repo_root, Caravan, Install, Options, HELM_NAMESPACE, HELM_TEST_VALUES};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        rbac::v1::{ClusterRole, Role},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::Api;

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_installs_a_controller_whose_rbac_runs_the_whole_pipeline() -> anyhow::Result<()>
{
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            install: Install::Helm,
            tls: false,
            ..Default::default()
        },
    )
    .await?;
    // A Role in the namespace it manages, nothing cluster-wide.
    let role = Api::<Role>::namespaced(c.client(), "fleet")
        .get("caravan")
        .await?;
    assert!(
        !role
            .rules
            .unwrap_or_default()
            .iter()
            .any(|r| r.verbs.contains(&"*".to_string())),
        "no wildcard verbs"
    );
    assert!(Api::<ClusterRole>::all(c.client())
        .get_opt("caravan")
        .await?
        .is_none());

    c.hello_installed("agent-1").await?;
    assert!(c.agents[0].install_root.join("hello/bin/hello").exists());

    // An upgrade of the release goes through too.
    let mut values: serde_json::Value = serde_json::from_str(HELM_TEST_VALUES)?;
    values["relay"] = serde_json::json!({"image": {"repository": "registry.example/caravan-relay", "tag": "test"}});
    upgrade(&c, &values)?;
    let d = Api::<Deployment>::namespaced(c.client(), HELM_NAMESPACE)
        .get("caravan")
        .await?;
    let args = d.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.contains(&"registry.example/caravan-relay:test".to_string()),
        "{args:?}"
    );

    // The controller applies its CRDs at start, as the chart's
    // ServiceAccount: a CRD a release before left (here: one without the
    // Stale column, written by 0.1.0) is brought to this release's; one a
    // newer release wrote is kept.
    assert_eq!(
        agents_crd(&c).await?,
        (caravan_api::RELEASE.to_string(), true)
    );
    without_stale_column(&c, "0.1.0")?;
    assert_eq!(agents_crd(&c).await?, ("0.1.0".to_string(), false));
    c.restart_controller().await?;
    assert_eq!(
        agents_crd(&c).await?,
        (caravan_api::RELEASE.to_string(), true)
    );
    without_stale_column(&c, "9.0.0")?;
    c.restart_controller().await?;
    assert_eq!(
        agents_crd(&c).await?,
        ("9.0.0".to_string(), false),
        "a newer release's CRD is not rolled back"
    );
    Ok(())
}

/// `helm upgrade` of the test's release of `charts/caravan` to `values`.
fn upgrade(c: &Caravan, values: &serde_json::Value) -> anyhow::Result<String> {
    let chart = repo_root().join("charts/caravan").display().to_string();
    helm(&[
        "upgrade",
        "caravan",
        &chart,
        "--namespace",
        HELM_NAMESPACE,
        "--kubeconfig",
        &c.cluster.kubeconfig.display().to_string(),
        "--set-json",
        &values.to_string(),
    ])
}

/// A broken upgrade undone: `helm upgrade` to values the controller refuses
/// at start (Agents deleted before they turn stale), so the new controller
/// does not come up; `helm rollback` brings the release back, the
/// controller starts as before and everything goes on, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_upgrade_is_undone_by_helm_rollback() -> anyhow::Result<()> {
    let mut c = Caravan::start_with(
        "fleet",
        Options {
            install: Install::Helm,
            ..Default::default()
        },
    )
    .await?;
    let (repo, _) = c.hello_installed("agent-1").await?;
    let before = c.agent_of("agent-1").await?;
    let kubeconfig = c.cluster.kubeconfig.display().to_string();
    let mut broken: serde_json::Value = serde_json::from_str(HELM_TEST_VALUES)?;
    broken["agents"] = serde_json::json!({"deleteAfterSeconds": 60});
    let out = upgrade(&c, &broken)?;
    assert!(out.contains("revision 2"), "{out}");
    let e = c.restart_controller_from_deployment().await.unwrap_err();
    assert!(
        format!("{e:#}").contains("--agent-delete-after-seconds 60 is not longer"),
        "{e:#}"
    );
    let out = helm(&[
        "rollback",
        "caravan",
        "--namespace",
        HELM_NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ])?;
    assert!(out.contains("revision 3"), "{out}");
    c.restart_controller_from_deployment().await?;
    // As before: the same Agent, its job still succeeded, and the next
    // commit goes through (hello leaves the fleet, and the endpoint).
    let after = c.agent_of("agent-1").await?;
    assert_eq!(after.metadata.uid, before.metadata.uid);
    c.wait_job(
        "hello-everywhere",
        "Succeeded",
        "1/1",
        std::time::Duration::from_secs(60),
    )
    .await?;
    repo.remove("fleet/job.yaml")?;
    repo.commit("hello leaves the fleet")?;
    let hello = c.agents[0].install_root.join("hello");
    caravan_tests::wait_for(
        "hello to be removed",
        std::time::Duration::from_secs(60),
        || async { Ok((!hello.exists()).then_some(())) },
    )
    .await?;
    Ok(())
}

/// Makes the Agent CRD what release `release` would have written: without
/// its Stale column.
fn without_stale_column(c: &Caravan, release: &str) -> anyhow::Result<()> {
    let patch = serde_json::json!([
        {"op": "replace", "path": "/metadata/annotations/caravan.dev~1release", "value": release},
        {"op": "test", "path": "/spec/versions/0/additionalPrinterColumns/7/name", "value": "Stale"},
        {"op": "remove", "path": "/spec/versions/0/additionalPrinterColumns/7"},
    ]);
    c.cluster.kubectl(&[
        "patch",
        "crd",
        "agents.caravan.dev",
        "--type=json",
        "-p",
        &patch.to_string(),
    ])?;
    Ok(())
}

/// The release the Agent CRD says wrote it, and whether it has the Stale column.
async fn agents_crd(c: &Caravan) -> anyhow::Result<(String, bool)> {
    let crd = Api::<CustomResourceDefinition>::all(c.client())
        .get("agents.caravan.dev")
        .await?;
    let release =
        crd.metadata.annotations.unwrap_or_default()[caravan_api::labels::CRD_RELEASE].clone();
    let stale = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .any(|col| col.name == "Stale");
    Ok((release, stale))
}

/// By default the chart serves HTTPS with a certificate it generates and
/// registers the package webhook with that CA.
#[test]
fn the_default_chart_serves_https_and_registers_the_package_webhook() -> anyhow::Result<()> {
    let rendered = rendered("{}")?;
    let tls = &rendered["caravan/templates/tls.yaml"];
    assert!(
        tls.contains("kind: ValidatingWebhookConfiguration")
            && tls.contains("path: /validate/packages"),
        "{tls}"
    );
    assert!(
        tls.contains("caBundle: \"LS0t"),
        "the webhook trusts the generated CA:\n{tls}"
    );
    let deployment = &rendered["caravan/templates/deployment.yaml"];
    for arg in [
        "--tls-cert-file",
        "--relay-upstream-ca-file",
        "https://caravan.caravan-system.svc:8443",
    ] {
        assert!(deployment.contains(arg), "{arg} missing:\n{deployment}");
    }
    Ok(())
}

/// `charts/caravan` rendered with `values` (JSON) into the release
/// namespace: each template's output by its path.
fn rendered(values: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let chart = repo_root().join("charts/caravan").display().to_string();
    Ok(serde_json::from_str(&helm(&[
        "template",
        "caravan",
        &chart,
        "--namespace",
        HELM_NAMESPACE,
        "--set-json",
        values,
    ])?)?)
}

/// The chart's RBAC, rendered with `values` (JSON): every document's kind,
/// namespace (if any) and whether it grants anything on Secrets.
fn rendered_rbac(values: &str) -> anyhow::Result<Vec<(String, String, bool)>> {
    let rendered = rendered(values)?;
    let rbac = &rendered["caravan/templates/rbac.yaml"];
    let mut out = vec![];
    for doc in rbac.split("\n---") {
        let v: serde_json::Value = serde_yaml_ng::from_str(doc)?;
        let secrets = v["rules"].as_array().is_some_and(|rules| {
            rules.iter().any(|r| {
                r["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|x| x == "secrets"))
            })
        });
        out.push((
            v["kind"].as_str().unwrap_or_default().to_string(),
            v["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            secrets,
        ));
    }
    Ok(out)
}

/// By default the controller gets a Role in the one namespace it manages
/// (Secrets there only), and cluster-wide only get and patch on its own
/// CRDs, by name; a ClusterRole for its objects only when asked for.
#[test]
fn by_default_the_controller_has_rights_in_one_namespace_only() -> anyhow::Result<()> {
    let by_default = rendered_rbac("{}")?;
    assert_eq!(
        by_default,
        [
            ("Role".to_string(), HELM_NAMESPACE.to_string(), true),
            ("RoleBinding".to_string(), HELM_NAMESPACE.to_string(), false),
            ("ClusterRole".to_string(), String::new(), false),
            ("ClusterRoleBinding".to_string(), String::new(), false),
        ]
    );
    let rbac = &rendered("{}")?["caravan/templates/rbac.yaml"];
    let crd_role: serde_json::Value = serde_yaml_ng::from_str(
        rbac.split("\n---")
            .find(|d| d.contains("kind: ClusterRole\n"))
            .expect("a ClusterRole"),
    )?;
    let names: Vec<String> = caravan_api::v1alpha1::crds()
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(
        crd_role["rules"],
        serde_json::json!([{
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "patch"],
            "resourceNames": names.iter().collect::<std::collections::BTreeSet<_>>(),
        }]),
        "exactly its own CRDs"
    );
    assert_eq!(rendered_rbac(r#"{"applyCRDs":false}"#)?.len(), 2);
    let elsewhere = rendered_rbac(r#"{"watchNamespace":"branch-offices"}"#)?;
    assert!(
        elsewhere
            .iter()
            .filter(|(kind, _, _)| kind.starts_with("Role"))
            .all(|(_, ns, _)| ns == "branch-offices"),
        "{elsewhere:?}"
    );
    let wide = rendered_rbac(r#"{"clusterWide":true}"#)?;
    assert_eq!(wide[0].0, "ClusterRole", "{wide:?}");
    Ok(())
}

#[test]
fn the_charts_lint_clean_and_their_schemas_refuse_wrong_values_by_name() -> anyhow::Result<()> {
    let chart = repo_root().join("charts/caravan").display().to_string();
    let lint = helm(&["lint", &chart])?;
    assert!(!lint.contains("[2]") && !lint.contains("[3]"), "{lint}");
    for (values, says) in [
        (
            r#"{"replicaCount":"two"}"#,
            "/replicaCount': got string, want integer",
        ),
        (
            r#"{"replicas":2}"#,
            "additional properties 'replicas' not allowed",
        ),
        (r#"{"service":{"port":70000}}"#, "/service/port"),
        (
            r#"{"relay":{"upstreamURL":"http://controller:8443"}}"#,
            "/relay/upstreamURL",
        ),
        (
            r#"{"replicaCount":2,"persistence":{"enabled":false}}"#,
            "replicaCount > 1 needs persistence.enabled",
        ),
        (
            r#"{"replicaCount":2}"#,
            "replicaCount > 1 needs persistence.enabled with persistence.accessMode: ReadWriteMany",
        ),
    ] {
        let e = rendered(values).unwrap_err().to_string();
        assert!(e.contains(says), "{values}: {e}");
    }
    // Several replicas: rolling updates, a disruption budget, the pod's
    // name in the election; a ServiceMonitor when asked for.
    let r = rendered(
        r#"{"replicaCount":3,"persistence":{"accessMode":"ReadWriteMany"},"serviceMonitor":{"enabled":true,"interval":"1m30s"}}"#,
    )?;
    let deployment = &r["caravan/templates/deployment.yaml"];
    for part in [
        "replicas: 3",
        "type: RollingUpdate",
        "CARAVAN_POD_NAME",
        "fieldPath: metadata.name",
    ] {
        assert!(deployment.contains(part), "{part}:\n{deployment}");
    }
    assert!(r["caravan/templates/pdb.yaml"].contains("kind: PodDisruptionBudget"));
    let monitor = &r["caravan/templates/servicemonitor.yaml"];
    assert!(
        monitor.contains("kind: ServiceMonitor") && monitor.contains("path: /metrics"),
        "{monitor}"
    );
    let notes = &r["caravan/templates/NOTES.txt"];
    for command in [
        "kubectl -n caravan-system rollout status deployment/caravan",
        "examples/gitsource.yaml",
        "kubectl get -n caravan-system caravan",
    ] {
        assert!(notes.contains(command), "{command}:\n{notes}");
    }
    // The relay chart, for a branch.
    let relay = repo_root()
        .join("charts/caravan-relay")
        .display()
        .to_string();
    let base = r#"{"upstreamURL":"https://controller:8443","relayToken":"t""#;
    let lint = helm(&["lint", &relay, "--set-json", &format!("{base}}}")])?;
    assert!(!lint.contains("[2]") && !lint.contains("[3]"), "{lint}");
    for (extra, says) in [
        (r#","transferWindow":"10pm"}"#, "/transferWindow"),
        (r#","bandwidth":"2 MB/s"}"#, "/bandwidth"),
        (
            r#","contentUpstream":{"url":"https://hq:8080"}}"#,
            "needs contentUpstream.token",
        ),
        (
            r#","contentUpstream":{"url":"http://hq:8080","token":"c"}}"#,
            "contentUpstream.url is plaintext",
        ),
        (
            r#","replicaCount":2}"#,
            "replicaCount > 1 needs cache.persistent with cache.accessMode: ReadWriteMany",
        ),
        (
            r#","cache":{"accessMode":"ReadOnlyMany"}}"#,
            "/cache/accessMode",
        ),
    ] {
        let values = format!("{base}{extra}");
        let e = helm(&["template", "berlin", &relay, "--set-json", &values])
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{values}: {e}");
    }
    // Several relays on one ReadWriteMany cache claim.
    let values = format!(r#"{base},"replicaCount":2,"cache":{{"accessMode":"ReadWriteMany"}}}}"#);
    let two = helm(&["template", "berlin", &relay, "--set-json", &values])?;
    for part in [
        "replicas: 2",
        "type: RollingUpdate",
        r#"accessModes: [\"ReadWriteMany\"]"#,
    ] {
        assert!(two.contains(part), "{part}:\n{two}");
    }
    let single = rendered("{}")?;
    assert!(
        single["caravan/templates/pdb.yaml"].trim().is_empty(),
        "no budget for one replica"
    );
    assert!(single["caravan/templates/deployment.yaml"].contains("type: Recreate"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_relay_from_the_relay_chart_serves_its_agents_from_the_parent_relay(
) -> anyhow::Result<()> {
    use caravan_api::v1alpha1::Site;
    use caravan_tests::wait_for;
    use chrono::Timelike as _;
    use k8s_openapi::api::core::v1::Secret;
    const T: std::time::Duration = std::time::Duration::from_secs(120);

    let mut c = Caravan::start("branch").await?;
    let repo = c.seed_example_fleet().await?;
    // Berlin, below hq, runs its relay outside the cluster: none in it.
    repo.write(
        "fleet/berlin.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: berlin}\nspec:\n  parent: hq\n  relay: {replicas: 0}\n",
    )?;
    repo.commit("Berlin, below hq")?;
    let hq = c.start_relay("hq").await?;
    // What the branch's administrator is handed: the Site's relay Secret
    // (its credentials, and the CA of hq relay's certificate) and the CA
    // of the controller's.
    let secret = wait_for("berlin's relay credentials", T, || async {
        let s = c.api::<Secret>().get_opt("berlin-relay").await?;
        Ok(s.and_then(|s| s.data)
            .filter(|d| d.contains_key("content-token")))
    })
    .await?;
    let relay_ca = String::from_utf8(secret["ca.crt"].0.clone())?;
    let controller_ca = std::fs::read_to_string(&c.controller_ca_file)?;
    // Berlin serves its agents with a certificate of its own CA, which they pin.
    let tls = caravan_tests::TestTls::generate(&c.dir.join("berlin-tls"))?;
    c.create_tls_secret("berlin-tls", &tls).await?;
    caravan_tests::trust(&std::fs::read(&tls.ca)?);
    let mut bundle = std::fs::read(&c.ca_file)?;
    bundle.extend(std::fs::read(&tls.ca)?);
    std::fs::write(&c.ca_file, bundle)?;
    let now = chrono::Utc::now();
    let hm = |minutes: i64| {
        let t = now + chrono::Duration::minutes(minutes);
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    let window = format!("{}-{} UTC", hm(-30), hm(90));
    let values = serde_json::json!({
        "upstreamURL": c.api_url, "upstreamCA": controller_ca, "existingSecret": "berlin-relay",
        "contentUpstream": {"url": hq.url, "ca": relay_ca},
        "tls": {"existingSecret": "berlin-tls"},
        "cache": {"persistent": false, "size": "1Gi", "limit": "900Mi"},
        "bandwidth": "50Mi", "transferWindow": window,
    });
    let out = helm(&[
        "install",
        "berlin",
        &repo_root()
            .join("charts/caravan-relay")
            .display()
            .to_string(),
        "--namespace",
        &c.namespace,
        "--kubeconfig",
        &c.cluster.kubeconfig.display().to_string(),
        "--set-json",
        &values.to_string(),
    ])?;
    assert!(out.contains("install: release berlin"), "{out}");
    let berlin = c
        .start_relay_deployed("berlin", "berlin-caravan-relay")
        .await?;
    assert!(berlin.url.starts_with("https://"), "served over TLS");
    c.start_agent("desk-berlin", &berlin)?;
    let (_, root) = c.agent_dirs("desk-berlin");
    wait_for("hello installed in Berlin", T, || async {
        Ok(root.join("hello/bin/hello").exists().then_some(()))
    })
    .await?;
    // The blob crossed the link from hq's relay, which fetched it once.
    let served = caravan_tests::metric(&hq.url, "caravan_relay_served_bytes_total").await?;
    assert!(served > 0.0, "hq's relay served berlin's relay");
    wait_for("Berlin's Site to see its relay", T, || async {
        let s = c.api::<Site>().get("berlin").await?;
        Ok(s.status
            .unwrap_or_default()
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(()))
    })
    .await?;
    Ok(())
}
