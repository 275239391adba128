//! The objects a Site's relay runs as, built as typed `k8s-openapi` values by
//! pure functions: a Secret with the relay's credentials, a Deployment and a
//! Service, all named `<site>-relay` and owned by the Site (garbage-collected
//! with it).

use std::collections::BTreeMap;

use caravan_api::{labels, v1alpha1::Site, wire::paths};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy},
        core::v1::{
            Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
            HTTPGetAction, KeyToPath, PersistentVolumeClaimVolumeSource, PodSecurityContext,
            PodSpec, PodTemplateSpec, Probe, Secret, SecretKeySelector, SecretVolumeSource,
            SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::ResourceExt;

/// Key of the relay Secret holding the CA that verifies the controller.
pub const UPSTREAM_CA_KEY: &str = "upstream-ca.crt";
/// Key of the relay Secret holding the controller's CA (which a child
/// site's relay pins for its parent's relay).
pub const CA_KEY: &str = "ca.crt";
/// Keys of the relay Secret holding the certificate the controller's CA
/// issued the relay, and its key.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
/// Port the relay container listens on.
pub const RELAY_PORT: u16 = 8080;
/// Where the relay keeps its cache in the container.
const CACHE_DIR: &str = "/var/cache/caravan";
/// Where the CA of the upstream is mounted.
const UPSTREAM_DIR: &str = "/etc/caravan/upstream";
/// Where the relay's own serving certificate is mounted.
const TLS_DIR: &str = "/etc/caravan/tls";
/// Where the controller's CA is mounted (child sites' relays).
const CA_DIR: &str = "/etc/caravan/ca";
/// Where the relay's registry credentials are mounted (top-level sites).
const REGISTRY_AUTH_DIR: &str = "/etc/caravan/registry";
/// The non-root user the relay runs as.
const RELAY_UID: i64 = 65532;

/// Name shared by a site's relay Deployment, Service and Secret.
pub fn relay_name(site: &str) -> String {
    format!("{site}-relay")
}

/// What the relay needs besides its Site.
pub struct RelayParams<'a> {
    /// The image when the Site names none.
    pub default_image: &'a str,
    /// URL the relay reaches the controller's distribution API at.
    pub upstream_url: &'a str,
    /// PEM of the CA the relay verifies the controller with, if any.
    pub upstream_ca: Option<&'a str>,
    /// Where the parent site's relay says it is (`spec.relay.url`), if it does.
    pub parent_url: Option<&'a str>,
    /// The key IDs of the relay's credentials and its certificate's period
    /// (and, for a child site, its parent's key ID): when one changes, the
    /// pods roll.
    pub credential_id: &'a str,
    /// PEM of the controller's CA.
    pub ca: &'a str,
}

/// Pod template annotation: the key IDs of the relay's credentials.
pub const CREDENTIAL_ID: &str = "caravan.dev/relay-credential-id";

/// The credentials in the relay's Secret.
pub struct RelayCredentials {
    /// The relay's own token at the controller.
    pub token: String,
    /// The relay's credential at its parent site's relay (a child site only).
    pub content_token: Option<String>,
    /// The serving certificate the controller's CA issued the relay, and its
    /// key (PEM).
    pub tls: (String, String),
}

/// The metadata of every object of `site`'s relay.
pub(super) fn meta(site: &Site, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(relay_name(&site.name_any())),
        namespace: site.namespace(),
        labels: Some(object_labels(site)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

fn object_labels(site: &Site) -> BTreeMap<String, String> {
    let relay = relay_name(&site.name_any());
    [
        (labels::NAME, "caravan-relay".to_string()),
        ("app.kubernetes.io/instance", relay),
        (labels::COMPONENT, "relay".into()),
        (labels::MANAGED_BY, "caravan".into()),
        (labels::SITE, site.name_any()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn selector(site: &Site) -> BTreeMap<String, String> {
    object_labels(site)
        .into_iter()
        .filter(|(k, _)| k == labels::NAME || k == "app.kubernetes.io/instance")
        .collect()
}

/// The Secret with the relay's credentials (and the upstream's CA).
pub fn secret(
    site: &Site,
    owner: &OwnerReference,
    creds: &RelayCredentials,
    params: &RelayParams,
) -> Secret {
    let mut data = BTreeMap::from([
        ("token".to_string(), creds.token.clone()),
        (TLS_CERT_KEY.to_string(), creds.tls.0.clone()),
        (TLS_KEY_KEY.to_string(), creds.tls.1.clone()),
        (CA_KEY.to_string(), params.ca.to_string()),
    ]);
    let optional = [
        ("content-token", creds.content_token.as_deref()),
        (UPSTREAM_CA_KEY, params.upstream_ca),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            data.insert(key.to_string(), v.to_string());
        }
    }
    Secret {
        metadata: meta(site, owner),
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: None,
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// Secret keys, each mounted as the file named beside it.
fn items(keys: &[(&str, &str)]) -> Vec<KeyToPath> {
    keys.iter()
        .map(|(key, path)| KeyToPath {
            key: (*key).into(),
            path: (*path).into(),
            mode: None,
        })
        .collect()
}

fn secret_volume(name: &str, secret: &str, items: Option<Vec<KeyToPath>>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn probe(path: &str, scheme: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            scheme: Some(scheme.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The relay Deployment: the relay's arguments, its credentials from the
/// Secret, the files it reads mounted read-only, locked down (non-root,
/// read-only root filesystem, no capabilities, no service account token).
pub fn deployment(site: &Site, owner: &OwnerReference, params: &RelayParams) -> Deployment {
    let relay = relay_name(&site.name_any());
    let ns = site.namespace().unwrap_or_default();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("0.0.0.0:{RELAY_PORT}"),
        "--cache-dir".into(),
        CACHE_DIR.into(),
    ];
    let spec = &site.spec.relay;
    // The cache volume is limited to the Site's cache size; the relay
    // evicts beyond nine tenths of it, before the kubelet would evict the pod.
    let cache_bytes = spec
        .cache
        .as_ref()
        .and_then(|c| caravan_api::v1alpha1::quantity_bytes(&c.size).ok());
    if let Some(bytes) = cache_bytes {
        args.extend(["--cache-max-bytes".into(), (bytes / 10 * 9).to_string()]);
    }
    if let Some(rate) = spec
        .bandwidth
        .as_deref()
        .and_then(|b| caravan_api::v1alpha1::quantity_bytes(b).ok())
    {
        args.extend(["--upstream-rate-limit".into(), rate.to_string()]);
    }
    if let Some(w) = &spec.transfer_window {
        args.extend(["--transfer-window".into(), w.to_arg()]);
    }
    // On the Site's claim, shared by the replicas (they fetch each blob once
    // between them), else an emptyDir of each pod. The two volumes have
    // different names: server-side apply replaces a volume by name, but
    // does not drop an `emptyDir: {}` it applied before from a volume that
    // becomes a claim (the API server then refuses two volume types).
    let persistent = spec.cache.as_ref().is_some_and(|c| c.persistent);
    let cache = match persistent.then(|| caravan_api::v1alpha1::relay_cache_claim(&site.name_any()))
    {
        Some(claim_name) => Volume {
            name: "cache-claim".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name,
                read_only: None,
            }),
            ..Default::default()
        },
        None => Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: cache_bytes.map(|b| Quantity(b.to_string())),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let mut mounts = vec![mount(&cache.name, CACHE_DIR, false)];
    let mut volumes = vec![cache];
    if params.upstream_ca.is_some() {
        args.extend([
            "--upstream-ca-file".into(),
            format!("{UPSTREAM_DIR}/{UPSTREAM_CA_KEY}"),
        ]);
        mounts.push(mount("upstream", UPSTREAM_DIR, true));
        volumes.push(secret_volume(
            "upstream",
            &relay,
            Some(items(&[(UPSTREAM_CA_KEY, UPSTREAM_CA_KEY)])),
        ));
    }
    // HTTPS always: with the Site's own certificate, or the one the
    // controller's CA issued the relay (in its Secret).
    args.extend([
        "--tls-cert-file".into(),
        format!("{TLS_DIR}/tls.crt"),
        "--tls-key-file".into(),
        format!("{TLS_DIR}/tls.key"),
    ]);
    mounts.push(mount("tls", TLS_DIR, true));
    volumes.push(match &site.spec.relay.tls_secret {
        Some(tls) => secret_volume("tls", tls, None),
        None => secret_volume(
            "tls",
            &relay,
            Some(items(&[
                (TLS_CERT_KEY, "tls.crt"),
                (TLS_KEY_KEY, "tls.key"),
            ])),
        ),
    });
    let mut envs = vec![
        env("CARAVAN_UPSTREAM", params.upstream_url),
        env_from_secret("CARAVAN_RELAY_TOKEN", &relay, "token"),
    ];
    // A child site's relay takes content from its parent's relay, over
    // HTTPS verified with the controller's CA alone.
    if let Some(parent) = &site.spec.parent {
        let url = match params.parent_url {
            Some(url) => url.to_string(),
            None => format!("https://{}.{ns}.svc:{RELAY_PORT}", relay_name(parent)),
        };
        envs.push(env("CARAVAN_CONTENT_UPSTREAM", url));
        envs.push(env_from_secret(
            "CARAVAN_CONTENT_TOKEN",
            &relay,
            "content-token",
        ));
        args.extend([
            "--content-upstream-ca-file".into(),
            format!("{CA_DIR}/{CA_KEY}"),
        ]);
        mounts.push(mount("ca", CA_DIR, true));
        volumes.push(secret_volume(
            "ca",
            &relay,
            Some(items(&[(CA_KEY, CA_KEY)])),
        ));
    }
    if let (None, Some(auth)) = (&site.spec.parent, &site.spec.relay.registry_auth_secret) {
        args.extend([
            "--registry-auth-file".into(),
            format!("{REGISTRY_AUTH_DIR}/config.json"),
        ]);
        mounts.push(mount("registry-auth", REGISTRY_AUTH_DIR, true));
        volumes.push(secret_volume(
            "registry-auth",
            auth,
            Some(items(&[(".dockerconfigjson", "config.json")])),
        ));
    }
    let scheme = "HTTPS";
    let container = Container {
        name: "relay".into(),
        image: Some(
            site.spec
                .relay
                .image
                .clone()
                .unwrap_or_else(|| params.default_image.to_string()),
        ),
        args: Some(args),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: RELAY_PORT.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(probe(paths::READYZ, scheme)),
        liveness_probe: Some(probe(paths::HEALTHZ, scheme)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    Deployment {
        metadata: meta(site, owner),
        spec: Some(DeploymentSpec {
            replicas: Some(site.spec.relay.replicas),
            // One pod on a claim: the old one lets go of it before the new
            // one mounts it (a ReadWriteOnce claim attaches to one node).
            strategy: (persistent && site.spec.relay.replicas <= 1).then(|| DeploymentStrategy {
                type_: Some("Recreate".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(selector(site)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(object_labels(site)),
                    // The token reaches the relay through its environment:
                    // a new credential must roll the pods.
                    annotations: Some(BTreeMap::from([(
                        CREDENTIAL_ID.to_string(),
                        params.credential_id.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RELAY_UID),
                        fs_group: Some(RELAY_UID),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service agents (and the relays of the sites below) reach the relay at.
pub fn service(site: &Site, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(site, owner),
        spec: Some(ServiceSpec {
            selector: Some(selector(site)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: RELAY_PORT.into(),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::v1alpha1::SiteSpec;

    fn site(name: &str, spec: SiteSpec) -> (Site, OwnerReference) {
        let mut s = Site::new(name, spec);
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some("uid-1".into());
        let owner = kube::Resource::controller_owner_ref(&s, &()).unwrap();
        (s, owner)
    }

    const PARAMS: RelayParams = RelayParams {
        default_image: "relay:1",
        upstream_url: "https://controller:8443",
        upstream_ca: None,
        parent_url: None,
        credential_id: "0a1b2c",
        ca: "CA PEM",
    };

    fn container(d: &Deployment) -> &Container {
        &d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    fn env_of(c: &Container) -> BTreeMap<String, String> {
        c.env
            .iter()
            .flatten()
            .map(|e| {
                let v = match (&e.value, &e.value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(f)) => {
                        let r = f.secret_key_ref.as_ref().unwrap();
                        format!("secret:{}/{}", r.name, r.key)
                    }
                    _ => String::new(),
                };
                (e.name.clone(), v)
            })
            .collect()
    }

    #[test]
    fn a_top_level_relay_gets_its_registry_credentials_and_a_child_none() {
        let mut spec = SiteSpec::default();
        spec.relay.registry_auth_secret = Some("relay-pull".into());
        let (s, owner) = site("hq", spec.clone());
        let d = deployment(&s, &owner, &PARAMS);
        let args = container(&d).args.clone().unwrap().join(" ");
        assert!(
            args.contains("--registry-auth-file /etc/caravan/registry/config.json"),
            "{args}"
        );
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let auth = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "registry-auth")
            .and_then(|v| v.secret.as_ref())
            .unwrap();
        assert_eq!(auth.secret_name.as_deref(), Some("relay-pull"));
        let items: Vec<_> = auth
            .items
            .iter()
            .flatten()
            .map(|i| (i.key.as_str(), i.path.as_str()))
            .collect();
        assert_eq!(items, [(".dockerconfigjson", "config.json")]);
        // A child site's relay fetches from its parent's: no credentials.
        spec.parent = Some("hq".into());
        let (s, owner) = site("branch", spec);
        let d = deployment(&s, &owner, &PARAMS);
        let args = container(&d).args.clone().unwrap().join(" ");
        assert!(!args.contains("--registry-auth-file"), "{args}");
    }

    #[test]
    fn a_top_level_relay_reaches_the_controller_with_its_own_token_and_is_locked_down() {
        let (s, owner) = site("hq", SiteSpec::default());
        let d = deployment(&s, &owner, &PARAMS);
        assert_eq!(d.metadata.name.as_deref(), Some("hq-relay"));
        assert_eq!(
            d.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let c = container(&d);
        assert_eq!(c.image.as_deref(), Some("relay:1"));
        let env = env_of(c);
        assert_eq!(env["CARAVAN_UPSTREAM"], "https://controller:8443");
        assert_eq!(env["CARAVAN_RELAY_TOKEN"], "secret:hq-relay/token");
        assert!(!env.contains_key("CARAVAN_CONTENT_UPSTREAM"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            (probe.path.as_deref(), probe.scheme.as_deref()),
            (Some("/readyz"), Some("HTTPS"))
        );
        // Served over HTTPS by default, with the certificate the
        // controller's CA issued, from the relay's own Secret.
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.contains(
                "--tls-cert-file /etc/caravan/tls/tls.crt --tls-key-file /etc/caravan/tls/tls.key"
            ),
            "{args}"
        );
        let tls = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tls")
            .and_then(|v| v.secret.as_ref())
            .unwrap();
        assert_eq!(tls.secret_name.as_deref(), Some("hq-relay"));
        let keys: Vec<_> = tls.items.iter().flatten().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, [TLS_CERT_KEY, TLS_KEY_KEY]);
        // The pods are selected by labels the pod template carries.
        let selector = d
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
            .clone()
            .unwrap();
        let pod_labels = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(service(&s, &owner).spec.unwrap().selector, Some(selector));
    }

    #[test]
    fn a_child_relay_takes_content_from_its_parents_relay() {
        let (s, owner) = site(
            "kreuzberg",
            SiteSpec {
                parent: Some("berlin".into()),
                ..Default::default()
            },
        );
        let d = deployment(&s, &owner, &PARAMS);
        let env = env_of(container(&d));
        assert_eq!(
            env["CARAVAN_CONTENT_UPSTREAM"],
            "https://berlin-relay.ns.svc:8080"
        );
        assert_eq!(
            env["CARAVAN_CONTENT_TOKEN"],
            "secret:kreuzberg-relay/content-token"
        );
        // ...and pins the controller's CA for it.
        let args = container(&d).args.clone().unwrap().join(" ");
        assert!(
            args.contains("--content-upstream-ca-file /etc/caravan/ca/ca.crt"),
            "{args}"
        );
        let creds = RelayCredentials {
            token: "t".into(),
            content_token: Some("c".into()),
            tls: ("CERT".into(), "KEY".into()),
        };
        let data = secret(&s, &owner, &creds, &PARAMS).string_data.unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["ca.crt", "content-token", "tls.crt", "tls.key", "token"]
        );
        assert_eq!(data[CA_KEY], "CA PEM");
    }

    #[test]
    fn the_sites_cache_bandwidth_window_and_parent_address_reach_the_relay() {
        let mut spec: SiteSpec = serde_json::from_value(serde_json::json!({
            "parent": "hq",
            "relay": {
                "cache": {"size": "10Gi"}, "bandwidth": "2Mi",
                "transferWindow": {"start": "22:00", "end": "06:00", "timeZone": "Europe/Berlin"},
            },
        }))
        .unwrap();
        let (s, owner) = site("berlin", spec.clone());
        let params = RelayParams {
            parent_url: Some("https://relay.hq.example.com:8443"),
            ..PARAMS
        };
        let d = deployment(&s, &owner, &params);
        let c = container(&d);
        let args = c.args.clone().unwrap().join(" ");
        for part in [
            "--cache-max-bytes 9663676416",
            "--upstream-rate-limit 2097152",
            "--transfer-window 22:00-06:00 Europe/Berlin",
        ] {
            assert!(args.contains(part), "{part}: {args}");
        }
        let content = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "CARAVAN_CONTENT_UPSTREAM");
        assert_eq!(
            content.and_then(|e| e.value.as_deref()),
            Some("https://relay.hq.example.com:8443"),
            "the parent's declared address"
        );
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let cache = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "cache")
            .unwrap();
        assert_eq!(
            cache.empty_dir.as_ref().unwrap().size_limit,
            Some(Quantity((10u64 << 30).to_string()))
        );
        // On a claim, shared by the replicas.
        let mut shared = spec.clone();
        shared.relay.replicas = 2;
        shared.relay.cache.as_mut().unwrap().persistent = true;
        let (s2, owner2) = site("berlin", shared);
        let d2 = deployment(&s2, &owner2, &params);
        let pod2 = d2.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let cache2 = &pod2.volumes.as_ref().unwrap()[0];
        assert_eq!(cache2.name, "cache-claim");
        let mount2 = &pod2.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount2.name.as_str(), mount2.mount_path.as_str()),
            ("cache-claim", CACHE_DIR)
        );
        assert_eq!(
            cache2.persistent_volume_claim.as_ref().unwrap().claim_name,
            "berlin-relay-cache",
            "the Site's own claim, never another"
        );
        assert!(cache2.empty_dir.is_none());
        assert_eq!(d2.spec.as_ref().unwrap().replicas, Some(2));
        assert!(
            d2.spec.as_ref().unwrap().strategy.is_none(),
            "replicas on a shared claim roll"
        );
        let mut one = s2.spec.clone();
        one.relay.replicas = 1;
        let (s1, owner1) = site("berlin", one);
        let d1 = deployment(&s1, &owner1, &params);
        assert_eq!(
            d1.spec.unwrap().strategy.unwrap().type_.as_deref(),
            Some("Recreate"),
            "one pod lets go of its claim before the next mounts it"
        );
        // Without an address, the parent's Service in the cluster.
        let d = deployment(&s, &owner, &PARAMS);
        let content = container(&d)
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|e| e.name == "CARAVAN_CONTENT_UPSTREAM");
        assert_eq!(
            content.and_then(|e| e.value).as_deref(),
            Some("https://hq-relay.ns.svc:8080")
        );
        spec.relay = Default::default();
        let (s, owner) = site("plain", spec);
        let d = deployment(&s, &owner, &PARAMS);
        let args = container(&d).args.clone().unwrap().join(" ");
        assert!(
            !args.contains("--cache-max-bytes") && !args.contains("--transfer-window"),
            "{args}"
        );
    }

    #[test]
    fn tls_and_a_ca_are_mounted_and_referenced() {
        let mut spec = SiteSpec::default();
        spec.relay.tls_secret = Some("hq-tls".into());
        spec.relay.image = Some("mirror/relay:2".into());
        let (s, owner) = site("hq", spec);
        let params = RelayParams {
            upstream_ca: Some("PEM"),
            ..PARAMS
        };
        let d = deployment(&s, &owner, &params);
        let c = container(&d);
        assert_eq!(c.image.as_deref(), Some("mirror/relay:2"));
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.contains("--tls-cert-file /etc/caravan/tls/tls.crt"),
            "{args}"
        );
        assert!(
            args.contains("--upstream-ca-file /etc/caravan/upstream/upstream-ca.crt"),
            "{args}"
        );
        let probe = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.scheme.as_deref(), Some("HTTPS"));
        let mounts: Vec<_> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.read_only))
            .collect();
        assert_eq!(
            mounts,
            [
                ("cache", None),
                ("upstream", Some(true)),
                ("tls", Some(true))
            ]
        );
        let tls = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == "tls"))
            .and_then(|v| v.secret.as_ref())
            .unwrap();
        assert_eq!(
            (tls.secret_name.as_deref(), tls.items.as_ref()),
            (Some("hq-tls"), None),
            "the Site's own certificate"
        );
        let creds = RelayCredentials {
            token: "t".into(),
            content_token: None,
            tls: ("CERT".into(), "KEY".into()),
        };
        let data = secret(&s, &owner, &creds, &params).string_data.unwrap();
        assert_eq!(data.get(UPSTREAM_CA_KEY).map(String::as_str), Some("PEM"));
        assert!(
            !env_of(c).keys().any(|k| k.contains("BOOTSTRAP")),
            "relays hold no bootstrap tokens"
        );
    }
}
