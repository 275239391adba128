//! Site reconciler: each Site gets a relay Deployment, a Service and a Secret
//! with the relay's credentials, all owned by the Site (garbage-collected
//! with it). The Site's `Ready` condition reports whether its relay has
//! connected to the controller recently.

use std::{sync::Arc, time::Duration};

use caravan_api::{
    conditions::{self, reasons},
    labels,
    v1alpha1::{Site, SiteStatus},
    API_VERSION, FIELD_MANAGER,
};
use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Secret, Service},
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef, watcher, Controller},
    Api, Resource, ResourceExt,
};
use serde_json::json;

use crate::{context::Context, error::Error};

/// A relay silent for longer than this is reported not ready.
pub const RELAY_STALE_SECONDS: i64 = 90;
/// Key of the relay Secret holding the CA that verifies the controller.
pub const UPSTREAM_CA_KEY: &str = "upstream-ca.crt";
/// Port the relay container listens on.
pub const RELAY_PORT: u16 = 8080;

/// Name shared by a site's relay Deployment, Service and Secret.
pub fn relay_name(site: &str) -> String {
    format!("{site}-relay")
}

pub async fn run(ctx: Arc<Context>) {
    let rx = ctx
        .site_trigger_rx
        .lock()
        .expect("lock poisoned")
        .take()
        .expect("site controller runs once");
    let triggers = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|(ns, name)| (ObjectRef::<Site>::new(&name).within(&ns), rx))
    });
    let relay_objects = watcher::Config::default().labels(&format!("{}=relay", labels::COMPONENT));
    Controller::new(ctx.all::<Site>(), watcher::Config::default())
        .owns(ctx.all::<Deployment>(), relay_objects.clone())
        .owns(ctx.all::<Service>(), relay_objects)
        .reconcile_on(triggers)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "site reconcile");
            }
        })
        .await;
}

fn error_policy(_: Arc<Site>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(%error, "site reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn reconcile(site: Arc<Site>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = site
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = site.name_any();
    let owner = site
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let relay = relay_name(&name);
    // The relay's Service name must be a DNS-1035 label.
    let valid = relay.len() <= 63
        && relay.starts_with(|c: char| c.is_ascii_lowercase())
        && relay
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        let generation = site.meta().generation;
        let msg = format!(
            "site name {name:?} cannot name a relay Service ({relay:?}): use at most 57 lowercase letters, digits and '-', starting with a letter"
        );
        let status = SiteStatus {
            observed_generation: generation,
            conditions: vec![conditions::new(
                conditions::READY,
                false,
                "InvalidName",
                msg,
                generation,
            )],
            ..Default::default()
        };
        let patch = json!({ "apiVersion": API_VERSION, "kind": "Site", "status": status });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        Api::<Site>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await?;
        return Ok(Action::await_change());
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let meta = |extra: serde_json::Value| {
        let mut m = json!({
            "name": relay,
            "namespace": ns,
            "labels": {
                labels::NAME: "caravan-relay",
                "app.kubernetes.io/instance": relay,
                labels::COMPONENT: "relay",
                labels::MANAGED_BY: "caravan",
                labels::SITE: name,
            },
            "ownerReferences": [owner],
        });
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            m.extend(extra.clone());
        }
        m
    };

    let mut secret_data = json!({ "token": ctx.keys.relay_token(&ns, &name) });
    let bootstrap = match &site.spec.enrollment.bootstrap_token_secret {
        Some(r) => json!({ "name": r.name, "key": r.key }),
        None => {
            secret_data["bootstrap-token"] = ctx.keys.bootstrap_token(&ns, &name).into();
            json!({ "name": relay, "key": "bootstrap-token" })
        }
    };
    // The credential a child site's relay presents to its parent's relay.
    if let Some(parent) = &site.spec.parent {
        let token = caravan_net::tokens::issue(
            &ctx.keys.relay_token(&ns, parent),
            &caravan_net::tokens::child_relay_name(&name),
        );
        secret_data["content-token"] = token.into();
    }
    if let Some(ca) = &ctx.relay_upstream_ca {
        secret_data[UPSTREAM_CA_KEY] = ca.clone().into();
    }
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": meta(json!({})),
        "type": "Opaque", "stringData": secret_data,
    });
    Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .patch(&relay, &params, &Patch::Apply(&secret))
        .await?;

    let selector =
        json!({ "app.kubernetes.io/name": "caravan-relay", "app.kubernetes.io/instance": relay });
    let image = site
        .spec
        .relay
        .image
        .clone()
        .unwrap_or_else(|| ctx.config.relay_image.clone());
    // Files the relay reads: the CA of its upstream and its own serving certificate.
    let mut args = vec![
        "--listen".to_string(),
        format!("0.0.0.0:{RELAY_PORT}"),
        "--cache-dir".into(),
        "/var/cache/caravan".into(),
    ];
    let mut mounts = vec![json!({ "name": "cache", "mountPath": "/var/cache/caravan" })];
    let mut volumes = vec![json!({ "name": "cache", "emptyDir": {} })];
    if ctx.relay_upstream_ca.is_some() {
        args.extend([
            "--upstream-ca-file".into(),
            format!("/etc/caravan/upstream/{UPSTREAM_CA_KEY}"),
        ]);
        mounts.push(
            json!({ "name": "upstream", "mountPath": "/etc/caravan/upstream", "readOnly": true }),
        );
        volumes.push(json!({ "name": "upstream", "secret": { "secretName": relay, "items": [{ "key": UPSTREAM_CA_KEY, "path": UPSTREAM_CA_KEY }] } }));
    }
    let scheme = match &site.spec.relay.tls_secret {
        Some(tls) => {
            args.extend(
                [
                    "--tls-cert-file",
                    "/etc/caravan/tls/tls.crt",
                    "--tls-key-file",
                    "/etc/caravan/tls/tls.key",
                ]
                .map(String::from),
            );
            mounts
                .push(json!({ "name": "tls", "mountPath": "/etc/caravan/tls", "readOnly": true }));
            volumes.push(json!({ "name": "tls", "secret": { "secretName": tls } }));
            "HTTPS"
        }
        None => "HTTP",
    };
    let mut env = vec![
        json!({ "name": "CARAVAN_UPSTREAM", "value": ctx.config.relay_upstream_url }),
        json!({ "name": "CARAVAN_RELAY_TOKEN", "valueFrom": { "secretKeyRef": { "name": relay, "key": "token" } } }),
        json!({ "name": "CARAVAN_BOOTSTRAP_TOKEN", "valueFrom": { "secretKeyRef": bootstrap } }),
    ];
    // A child site's relay takes content from its parent's relay.
    if let Some(parent) = &site.spec.parent {
        let url = format!("http://{}.{ns}.svc:{RELAY_PORT}", relay_name(parent));
        env.push(json!({ "name": "CARAVAN_CONTENT_UPSTREAM", "value": url }));
        env.push(json!({ "name": "CARAVAN_CONTENT_TOKEN", "valueFrom": { "secretKeyRef": { "name": relay, "key": "content-token" } } }));
    }
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(json!({})),
        "spec": {
            "replicas": site.spec.relay.replicas,
            "selector": { "matchLabels": selector },
            "template": {
                "metadata": { "labels": meta(json!({}))["labels"] },
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532 },
                    "containers": [{
                        "name": "relay",
                        "image": image,
                        "args": args,
                        "env": env,
                        "ports": [{ "name": "http", "containerPort": RELAY_PORT, "protocol": "TCP" }],
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http", "scheme": scheme } },
                        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http", "scheme": scheme } },
                        "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } },
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    });
    Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
        .patch(&relay, &params, &Patch::Apply(&deployment))
        .await?;

    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta(json!({})),
        "spec": { "selector": selector, "ports": [{ "name": "http", "port": RELAY_PORT, "targetPort": "http", "protocol": "TCP" }] },
    });
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&relay, &params, &Patch::Apply(&service))
        .await?;

    // Status: agents enrolled here and whether the relay is connected.
    let agents = ctx
        .stores
        .agents
        .state()
        .iter()
        .filter(|a| a.namespace().as_deref() == Some(ns.as_str()) && a.spec.site == name)
        .count() as u32;
    let generation = site.meta().generation;
    let seen = ctx.relay_last_seen(&(ns.clone(), name.clone()));
    let connected = seen
        .is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::seconds(RELAY_STALE_SECONDS));
    let ready = if connected {
        conditions::new(
            conditions::READY,
            true,
            reasons::RELAY_CONNECTED,
            "relay is connected to the controller",
            generation,
        )
    } else {
        conditions::new(
            conditions::READY,
            false,
            reasons::RELAY_NOT_CONNECTED,
            format!("waiting for relay {relay} to connect to the controller"),
            generation,
        )
    };
    let previous = site.status.clone().unwrap_or_default();
    let status = SiteStatus {
        observed_generation: generation,
        agents,
        relay: ctx
            .relay_stats
            .lock()
            .expect("lock poisoned")
            .get(&(ns.clone(), name.clone()))
            .copied(),
        relay_last_seen: seen
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .or(previous.relay_last_seen.clone()),
        conditions: conditions::merge(&previous.conditions, vec![ready]),
    };
    if status != previous {
        let patch = json!({ "apiVersion": API_VERSION, "kind": "Site", "status": status });
        Api::<Site>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await?;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}
