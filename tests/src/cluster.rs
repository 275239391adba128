//! A Kubernetes API server for one test (etcd and kube-apiserver started
//! here, or an existing cluster's kubeconfig), and playing the node: the
//! container command of a Deployment, with its Secrets resolved.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Secret},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};

use crate::{cache_dir, free_port, procs::Proc, wait_for};

/// A Kubernetes API server for one test: started here, or an existing cluster.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub client: Client,
    /// etcd's database file, where this cluster started its own etcd.
    pub etcd_db: Option<PathBuf>,
    procs: Vec<Proc>,
}

impl Cluster {
    /// The process id of `name` (`etcd`, `kube-apiserver`), where this
    /// cluster started its own.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|p| p.name == name).map(Proc::pid)
    }

    /// Starts etcd and kube-apiserver under `dir`, or uses `CARAVAN_TEST_KUBECONFIG`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        if let Ok(path) = std::env::var("CARAVAN_TEST_KUBECONFIG") {
            let kubeconfig = PathBuf::from(path);
            let client = client_for(&kubeconfig).await?;
            return Ok(Self {
                kubeconfig,
                client,
                etcd_db: None,
                procs: vec![],
            });
        }
        let k8s_bin = std::env::var("CARAVAN_K8S_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| cache_dir().join("k8s-v1.20.2/bin"));
        let apiserver = k8s_bin.join("kube-apiserver");
        if !apiserver.exists() {
            bail!(
                "{} not found: run scripts/setup.sh (or set CARAVAN_TEST_KUBECONFIG)",
                apiserver.display()
            );
        }
        // Ports are picked free and then bound by etcd and the API server: on
        // a busy machine another process can take one in between. A second
        // attempt, with new ports, from scratch, rides that out.
        let dir = dir.join("cluster");
        match Self::start_local(&apiserver, &dir).await {
            Ok(cluster) => Ok(cluster),
            Err(e) => {
                eprintln!("cluster did not start, trying again with other ports: {e:#}");
                let _ = std::fs::remove_dir_all(&dir);
                Self::start_local(&apiserver, &dir).await
            }
        }
    }

    /// Starts etcd and `apiserver` in `dir`.
    async fn start_local(apiserver: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd = Proc::spawn(
            "etcd",
            Path::new("/usr/bin/etcd"),
            &[
                "--data-dir",
                &dir.join("etcd").display().to_string(),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
                "--log-level",
                "warn",
            ],
            &[],
            dir,
        )?;
        let key = dir.join("sa.key");
        let status = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(std::process::Stdio::null())
            .status()
            .context("running openssl to make the service-account key")?;
        anyhow::ensure!(status.success(), "openssl genrsa failed");
        let token = "caravan-test-admin-token";
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )?;
        let key_s = key.display().to_string();
        let api = Proc::spawn(
            "kube-apiserver",
            apiserver,
            &[
                "--etcd-servers",
                &etcd_url,
                "--secure-port",
                &api_port.to_string(),
                "--insecure-port",
                "0",
                "--bind-address",
                "127.0.0.1",
                "--cert-dir",
                &dir.join("certs").display().to_string(),
                "--service-account-key-file",
                &key_s,
                "--service-account-signing-key-file",
                &key_s,
                "--service-account-issuer",
                "https://kubernetes.default.svc",
                "--token-auth-file",
                &dir.join("tokens.csv").display().to_string(),
                "--authorization-mode",
                "RBAC",
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--enable-priority-and-fairness=false",
                "--v",
                "0",
            ],
            &[],
            dir,
        )?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: admin}}\ncurrent-context: local\n"
            ),
        )?;
        let procs = vec![api, etcd];
        let client = client_for(&kubeconfig).await?;
        wait_for(
            "kube-apiserver to be ready",
            Duration::from_secs(90),
            || {
                let client = client.clone();
                async move {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    Ok(client
                        .request_text(req)
                        .await
                        .ok()
                        .filter(|t| t.trim() == "ok"))
                }
            },
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "{}{}",
                procs[0].log_tail(30),
                procs[1].log_tail(15)
            ))
        })?;
        Ok(Self {
            kubeconfig,
            client,
            etcd_db: Some(dir.join("etcd/member/snap/db")),
            procs,
        })
    }

    /// Installs the generated CRDs from `crds/` and waits until they are served.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for crd in caravan_api::v1alpha1::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply("caravan-tests").force(),
                &Patch::Apply(&crd),
            )
            .await?;
        }
        self.wait_crds().await
    }

    /// Waits until every Caravan CRD is established.
    pub async fn wait_crds(&self) -> anyhow::Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for crd in caravan_api::v1alpha1::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let api = api.clone();
            wait_for(
                &format!("CRD {name} to be established"),
                Duration::from_secs(30),
                || {
                    let (api, name) = (api.clone(), name.clone());
                    async move {
                        let crd = api.get(&name).await?;
                        let ok = crd
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        Ok(ok.then_some(()))
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<()> {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(self.client.clone())
            .patch(
                name,
                &PatchParams::apply("caravan-tests"),
                &Patch::Apply(&ns),
            )
            .await?;
        Ok(())
    }

    /// Writes a kubeconfig that impersonates `user` (e.g. a ServiceAccount), so
    /// a process run with it gets exactly that user's RBAC.
    pub fn impersonating(&self, user: &str) -> anyhow::Result<PathBuf> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        let path = self
            .kubeconfig
            .with_file_name(format!("kubeconfig-{}", user.replace(':', "-")));
        std::fs::write(
            &path,
            text.replace("    token: ", &format!("    as: {user}\n    token: ")),
        )?;
        Ok(path)
    }

    /// Plays the node for a Deployment: waits for it and returns its first
    /// container's arguments and environment, Secret references resolved.
    /// Secret volumes are written under `node_dir`; a PersistentVolumeClaim
    /// is the directory `claims_dir/<claim>`, shared by every pod mounting it.
    pub async fn container_command(
        &self,
        namespace: &str,
        deployment: &str,
        node_dir: &Path,
        claims_dir: &Path,
    ) -> anyhow::Result<(Vec<String>, Vec<(String, String)>)> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let d = wait_for(
            &format!("Deployment {namespace}/{deployment}"),
            Duration::from_secs(60),
            || {
                let api = deployments.clone();
                async move { Ok(api.get_opt(deployment).await?) }
            },
        )
        .await?;
        let pod = d
            .spec
            .and_then(|s| s.template.spec)
            .context("Deployment has no pod spec")?;
        let container = pod
            .containers
            .first()
            .cloned()
            .context("Deployment has no container")?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let mut env = vec![];
        for e in container.env.unwrap_or_default() {
            let value = match (e.value, e.value_from.and_then(|v| v.secret_key_ref)) {
                (Some(v), _) => v,
                (None, Some(r)) => {
                    let secret = secrets.get(&r.name).await?;
                    let bytes = secret
                        .data
                        .and_then(|d| d.get(&r.key).cloned())
                        .with_context(|| format!("secret {} has no key {}", r.name, r.key))?;
                    String::from_utf8(bytes.0)?
                }
                _ => continue,
            };
            env.push((e.name, value));
        }
        // The release the image holds, when its tag names one: the process
        // says it is of that release, as the image's binary would.
        let tag = container.image.as_deref().and_then(|i| i.rsplit_once(':'));
        if let Some((_, tag)) = tag.filter(|(_, t)| semver::Version::parse(t).is_ok()) {
            env.push(("CARAVAN_CLAIM_RELEASE".to_string(), tag.to_string()));
        }
        // Secret volumes: written under `node_dir`, and the arguments that
        // point into their mount paths rewritten to match.
        let mut args = container.args.unwrap_or_default();
        let mut rewrite = |mount_path: &str, local: &Path| {
            for a in &mut args {
                if let Some(rest) = a.strip_prefix(mount_path) {
                    *a = format!("{}{rest}", local.display());
                }
            }
        };
        for m in container.volume_mounts.unwrap_or_default() {
            let volume = pod.volumes.iter().flatten().find(|v| v.name == m.name);
            if let Some(claim) = volume.and_then(|v| v.persistent_volume_claim.as_ref()) {
                let local = claims_dir.join(&claim.claim_name);
                std::fs::create_dir_all(&local)?;
                rewrite(&m.mount_path, &local);
                continue;
            }
            let Some(sv) = volume.and_then(|v| v.secret.as_ref()) else {
                continue;
            };
            let secret = secrets
                .get(sv.secret_name.as_deref().unwrap_or_default())
                .await?;
            let data = secret.data.unwrap_or_default();
            let local = node_dir.join(m.mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&local)?;
            let files: Vec<(String, String)> = match &sv.items {
                Some(items) => items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in files {
                let bytes = data
                    .get(&key)
                    .with_context(|| format!("secret has no key {key}"))?;
                std::fs::write(local.join(path), &bytes.0)?;
            }
            rewrite(&m.mount_path, &local);
        }
        Ok((args, env))
    }

    /// Says in Deployment `deployment`'s status that its pods run its
    /// current spec and are available, as the Deployment controller would
    /// once the kubelet (which the harness plays) started them.
    pub async fn mark_rolled_out(&self, namespace: &str, deployment: &str) -> anyhow::Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let d = api.get(deployment).await?;
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = serde_json::json!({ "status": {
            "observedGeneration": d.metadata.generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }});
        api.patch_status(
            deployment,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await?;
        Ok(())
    }

    /// Runs kubectl against this cluster and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl (install it: scripts/setup.sh)")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// Replaces the values of `flags` in a container's arguments (node-local
/// addresses and paths), appending flags that are not there.
pub fn override_args(mut args: Vec<String>, flags: &[(&str, String)]) -> Vec<String> {
    for (flag, value) in flags {
        match args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < args.len() => args[i + 1] = value.clone(),
            _ => args.extend([flag.to_string(), value.clone()]),
        }
    }
    args
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}
