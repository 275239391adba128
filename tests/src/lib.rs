//! The test harness: a real kube-apiserver and etcd (or an existing cluster's
//! kubeconfig), and real controller, relay and agent processes, with real Git
//! repositories. Used by the end-to-end tests and by the demo.
//!
//! - `CARAVAN_TEST_KUBECONFIG`: use this cluster instead of starting one.
//! - `CARAVAN_K8S_BIN`: directory holding `kube-apiserver` (default: the
//!   cache `scripts/setup.sh` fills, `~/.cache/caravan/k8s-v1.20.2/bin`).
//! - `CARAVAN_BIN_DIR`: directory of the Caravan binaries (default: next to
//!   the running test, i.e. `target/debug`).
//! - `CARAVAN_KEEP=1`: keep the temporary directory (logs, state) after the run.

pub mod git;
pub mod procs;

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use caravan_api::v1alpha1::{DistributionJob, GitSource, Site};
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
pub use procs::Proc;

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// Directory of the Caravan binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CARAVAN_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe has a directory");
    // Test binaries live in target/<profile>/deps, the demo in target/<profile>.
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} not found; build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A Kubernetes API server for one test: started here, or an existing cluster.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub client: Client,
    _procs: Vec<Proc>,
}

impl Cluster {
    /// Starts etcd and kube-apiserver under `dir`, or uses `CARAVAN_TEST_KUBECONFIG`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        if let Ok(path) = std::env::var("CARAVAN_TEST_KUBECONFIG") {
            let kubeconfig = PathBuf::from(path);
            let client = client_for(&kubeconfig).await?;
            return Ok(Self {
                kubeconfig,
                client,
                _procs: vec![],
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
        let dir = dir.join("cluster");
        std::fs::create_dir_all(&dir)?;
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
            &dir,
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
            &apiserver,
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
            &dir,
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
        .map_err(|e| e.context(procs[0].log_tail(30)))?;
        Ok(Self {
            kubeconfig,
            client,
            _procs: procs,
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
    pub async fn container_command(
        &self,
        namespace: &str,
        deployment: &str,
        node_dir: &Path,
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
        // Secret volumes: written under `node_dir`, and the arguments that
        // point into their mount paths rewritten to match.
        let mut args = container.args.unwrap_or_default();
        for m in container.volume_mounts.unwrap_or_default() {
            let volume = pod.volumes.iter().flatten().find(|v| v.name == m.name);
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
            for a in &mut args {
                if let Some(rest) = a.strip_prefix(m.mount_path.as_str()) {
                    *a = format!("{}{rest}", local.display());
                }
            }
        }
        Ok((args, env))
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

/// How the controller gets into the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Install {
    /// CRDs applied by the harness; the controller runs with admin credentials.
    #[default]
    Direct,

    /// `helm install charts/caravan`; the controller runs as the chart's
    /// ServiceAccount, with the chart's RBAC.
    Helm,
}

/// Values of the release the Helm test installs. No PVC (nothing binds it
/// here), and plain HTTP without the webhook: the harness runs the controller
/// on a loopback port, where neither the Service DNS name the chart's
/// certificate is for nor the Service the webhook points at exist. (The TLS
/// and webhook paths are tested with the harness's own certificate.)
pub const HELM_TEST_VALUES: &str =
    r#"{"persistence":{"enabled":false},"tls":{"enabled":false},"webhook":{"enabled":false}}"#;

/// Namespace the Helm release goes into.
pub const HELM_NAMESPACE: &str = "caravan-system";

/// Runs `scripts/helm.py` (the Helm v4 SDK) with the virtualenv `scripts/setup.sh` made.
pub fn helm(args: &[&str]) -> anyhow::Result<String> {
    let python = cache_dir().join("helm-venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} not found: run scripts/setup.sh",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(repo_root().join("scripts/helm.py"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm {}: {}{}",
        args[0],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Where `scripts/setup.sh` caches slow builds.
pub fn cache_dir() -> PathBuf {
    std::env::var("CARAVAN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(&std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/caravan")
        })
}

/// Everything of one Caravan installation: the controller and what it serves.
pub struct Caravan {
    pub dir: PathBuf,
    pub namespace: String,
    pub cluster: Cluster,
    pub controller: Proc,
    /// How the controller was started: arguments and environment.
    controller_cmd: (Vec<String>, Vec<(String, String)>),
    pub api_url: String,
    pub upload_token: String,
    pub relays: Vec<Proc>,
    pub agents: Vec<Agent>,
    /// Certificates when everything talks HTTPS.
    pub tls: Option<TestTls>,
    /// Extra arguments for every agent started from now on.
    pub agent_args: Vec<String>,
    /// The binary agents run from (default: the build's `caravan-agent`).
    pub agent_bin: Option<PathBuf>,
    /// Extra arguments for every relay started from now on.
    pub relay_args: Vec<String>,
    /// URL of each started relay, by site.
    pub relay_urls: std::collections::HashMap<String, String>,
    _tmp: Option<tempfile::TempDir>,
}

/// How to start Caravan in a test.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub install: Install,
    /// Controller and relays serve HTTPS with a test CA that the relays,
    /// agents and CLI are told to trust.
    pub tls: bool,
}

/// A CA and a server certificate for `localhost`/`127.0.0.1`, as PEM files.
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Caravan test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &ca)?;
        let tls = Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&tls.ca, ca.pem())?;
        std::fs::write(&tls.cert, cert.pem())?;
        std::fs::write(&tls.key, key.serialize_pem())?;
        Ok(tls)
    }
}

/// An HTTP client that trusts the test CA, if there is one.
pub fn http_client(tls: Option<&TestTls>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder();
    if let Some(tls) = tls {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&tls.ca)?)?);
    }
    Ok(b.build()?)
}

/// Waits until `url` answers 2xx; on time-out, shows the process's log.
async fn wait_http_ok(client: &reqwest::Client, url: &str, proc: &Proc) -> anyhow::Result<()> {
    wait_for(
        &format!("{url} to answer"),
        Duration::from_secs(60),
        || async {
            Ok(client
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        },
    )
    .await
    .map_err(|e| e.context(proc.log_tail(30)))
}

/// Starts the controller and waits until it answers.
async fn spawn_controller(
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
    api_url: &str,
    tls: Option<&TestTls>,
) -> anyhow::Result<Proc> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let controller = Proc::spawn("controller", &bin("caravan-controller")?, &args, env, dir)?;
    wait_http_ok(
        &http_client(tls)?,
        &format!("{api_url}/healthz"),
        &controller,
    )
    .await?;
    Ok(controller)
}

/// A running agent process and its directories.
pub struct Agent {
    pub name: String,
    pub proc: Proc,
    pub state_dir: PathBuf,
    pub install_root: PathBuf,
}

/// A relay started the way a kubelet would start the Site's Deployment.
pub struct RelayInfo {
    pub url: String,
    pub cache_dir: PathBuf,
    pub bootstrap_token: String,
}

impl Caravan {
    /// Starts a cluster, installs the CRDs, creates `namespace` and starts the controller.
    pub async fn start(namespace: &str) -> anyhow::Result<Self> {
        Self::start_with(namespace, Options::default()).await
    }

    /// Starts a cluster and Caravan in it, either directly or with the Helm chart.
    pub async fn start_with(namespace: &str, options: Options) -> anyhow::Result<Self> {
        let Options { install, tls } = options;
        let tmp = tempfile::Builder::new().prefix("caravan-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let keep = std::env::var("CARAVAN_KEEP").is_ok_and(|v| v == "1");
        let tmp = if keep {
            eprintln!("keeping {}", dir.display());
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        };
        let cluster = Cluster::start(&dir).await?;
        cluster.create_namespace(namespace).await?;
        let tls = if tls {
            Some(TestTls::generate(&dir.join("tls"))?)
        } else {
            None
        };
        let port = free_port();
        let api_url = format!(
            "{}://127.0.0.1:{port}",
            if tls.is_some() { "https" } else { "http" }
        );
        let data_dir = dir.join("controller").display().to_string();
        let (args, mut env) = match install {
            Install::Direct => {
                cluster.install_crds().await?;
                let args = ["--namespace", namespace].map(String::from).to_vec();
                (
                    args,
                    vec![(
                        "CARAVAN_UPLOAD_TOKEN".to_string(),
                        "caravan-test-upload-token".to_string(),
                    )],
                )
            }
            Install::Helm => {
                cluster.create_namespace(HELM_NAMESPACE).await?;
                let out = helm(&[
                    "install",
                    "caravan",
                    &repo_root().join("charts/caravan").display().to_string(),
                    "--namespace",
                    HELM_NAMESPACE,
                    "--kubeconfig",
                    &cluster.kubeconfig.display().to_string(),
                    "--set-json",
                    HELM_TEST_VALUES,
                ])?;
                eprintln!("{out}");
                cluster.wait_crds().await?;
                cluster
                    .container_command(HELM_NAMESPACE, "caravan", &dir.join("node/controller"))
                    .await?
            }
        };
        // The controller runs with the chart's RBAC when installed with Helm:
        // its kubeconfig impersonates the chart's ServiceAccount.
        let kubeconfig = match install {
            Install::Direct => cluster.kubeconfig.clone(),
            Install::Helm => {
                cluster.impersonating(&format!("system:serviceaccount:{HELM_NAMESPACE}:caravan"))?
            }
        };
        let mut flags = vec![
            ("--listen", format!("127.0.0.1:{port}")),
            ("--data-dir", data_dir),
            ("--relay-upstream-url", api_url.clone()),
            // Unreferenced blobs go 10 s after upload, checked every second.
            ("--blob-gc-interval-seconds", "1".to_string()),
            ("--blob-grace-seconds", "10".to_string()),
        ];
        if let Some(tls) = &tls {
            flags.extend([
                ("--tls-cert-file", tls.cert.display().to_string()),
                ("--tls-key-file", tls.key.display().to_string()),
                ("--relay-upstream-ca-file", tls.ca.display().to_string()),
            ]);
        }
        let args = override_args(args, &flags);
        let args: Vec<String> = args.into_iter().filter(|a| a != "--log-json").collect();
        let upload_token = env
            .iter()
            .find(|(k, _)| k == "CARAVAN_UPLOAD_TOKEN")
            .map(|(_, v)| v.clone())
            .context("no upload token")?;
        env.extend([
            ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
            ("RUST_LOG".to_string(), "info,kube=error".to_string()),
        ]);
        let controller = spawn_controller(&args, &env, &dir, &api_url, tls.as_ref()).await?;
        Ok(Self {
            controller_cmd: (args, env),
            tls,
            agent_args: vec![],
            agent_bin: None,
            relay_urls: Default::default(),
            relay_args: vec![],

            dir,
            namespace: namespace.into(),
            cluster,
            controller,
            api_url,
            upload_token,
            relays: vec![],
            agents: vec![],
            _tmp: tmp,
        })
    }

    pub fn client(&self) -> Client {
        self.cluster.client.clone()
    }

    /// The example fleet with hq's relay and one agent `agent`, once the
    /// agent has installed hello: the starting point of many tests.
    pub async fn hello_installed(
        &mut self,
        agent: &str,
    ) -> anyhow::Result<(git::GitRepo, RelayInfo)> {
        let repo = self.seed_example_fleet().await?;
        let relay = self.start_relay("hq").await?;
        self.start_agent(agent, &relay)?;
        self.wait_job(
            "hello-everywhere",
            "Succeeded",
            "1/1",
            Duration::from_secs(120),
        )
        .await?;
        Ok((repo, relay))
    }

    /// Kills the controller (SIGKILL) and starts it again, as it was.
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.controller.kill();
        let (args, env) = &self.controller_cmd;
        self.controller =
            spawn_controller(args, env, &self.dir, &self.api_url, self.tls.as_ref()).await?;
        Ok(())
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.client(), &self.namespace)
    }

    /// Declares a GitSource for `url` that syncs every `interval` seconds.
    pub async fn add_git_source(
        &self,
        name: &str,
        url: &str,
        path: &str,
        interval: u32,
    ) -> anyhow::Result<()> {
        let gs: GitSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "GitSource",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"url": url, "branch": "main", "path": path, "intervalSeconds": interval},
        }))?;
        self.api::<GitSource>()
            .patch(
                name,
                &PatchParams::apply("caravan-tests"),
                &Patch::Apply(&gs),
            )
            .await?;
        Ok(())
    }

    /// Registers the controller's validating admission webhook for Packages
    /// (the API server calls it over HTTPS, so only with TLS).
    pub async fn register_webhook(&self) -> anyhow::Result<()> {
        use base64::Engine as _;
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let tls = self
            .tls
            .as_ref()
            .context("the webhook needs the controller to serve HTTPS")?;
        let ca = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&tls.ca)?);
        let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": { "name": "caravan-packages" },
            "webhooks": [{
                "name": "packages.caravan.dev",
                "clientConfig": { "url": format!("{}/validate/packages", self.api_url), "caBundle": ca },
                "rules": [{ "apiGroups": ["caravan.dev"], "apiVersions": ["v1alpha1"], "resources": ["packages"], "operations": ["CREATE", "UPDATE"] }],
                "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 5,
            }],
        }))?;
        Api::<ValidatingWebhookConfiguration>::all(self.client())
            .patch(
                "caravan-packages",
                &PatchParams::apply("caravan-tests"),
                &Patch::Apply(&config),
            )
            .await?;
        Ok(())
    }

    /// Stores the test certificate as a `kubernetes.io/tls` Secret.
    pub async fn create_tls_secret(&self, name: &str, tls: &TestTls) -> anyhow::Result<()> {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": { "name": name, "namespace": self.namespace },
            "stringData": { "tls.crt": std::fs::read_to_string(&tls.cert)?, "tls.key": std::fs::read_to_string(&tls.key)? },
        }))?;
        self.api::<Secret>()
            .patch(
                name,
                &PatchParams::apply("caravan-tests"),
                &Patch::Apply(&secret),
            )
            .await?;
        Ok(())
    }

    /// Runs `caravan package push` for a directory into `manifest_dir`.
    pub fn push_package(
        &self,
        dir: &Path,
        name: &str,
        version: &str,
        manifest_dir: &Path,
    ) -> anyhow::Result<String> {
        let (dir, manifest_dir) = (
            dir.display().to_string(),
            manifest_dir.display().to_string(),
        );
        self.cli(&[
            "package",
            "push",
            &dir,
            "--name",
            name,
            "--version",
            version,
            "--manifest-dir",
            &manifest_dir,
        ])
    }

    /// Runs the `caravan` CLI against this installation's controller.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new(bin("caravan")?)
            .args(args)
            .env("CARAVAN_SERVER", &self.api_url)
            .env("CARAVAN_UPLOAD_TOKEN", &self.upload_token)
            .envs(self.tls.as_ref().map(|t| ("CARAVAN_CA_FILE", &t.ca)))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "caravan {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Plays the node: waits for the Site's relay Deployment, resolves its
    /// environment (Secrets included) and starts that container's command as
    /// a local `caravan-relay` process on a loopback port.
    pub async fn start_relay(&mut self, site: &str) -> anyhow::Result<RelayInfo> {
        let (args, env) = self
            .cluster
            .container_command(
                &self.namespace,
                &format!("{site}-relay"),
                &self.dir.join(format!("node/relay-{site}")),
            )
            .await?;
        let bootstrap_token = env
            .iter()
            .find(|(k, _)| k == "CARAVAN_BOOTSTRAP_TOKEN")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        // A child site's relay fetches from its parent's relay: the Service
        // address becomes the loopback address the parent was started on.
        let mut env = env;
        for (k, v) in &mut env {
            if k == "CARAVAN_CONTENT_UPSTREAM" {
                let host = v.split("://").nth(1).unwrap_or_default();
                let parent = host
                    .split('.')
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches("-relay");
                *v =
                    self.relay_urls.get(parent).cloned().with_context(|| {
                        format!("start the relay of parent site {parent} first")
                    })?;
            }
        }
        let port = free_port();
        let cache_dir = self.dir.join(format!("relay-{site}"));
        // The container's own arguments, with the node-local listen address and cache.
        let args = override_args(
            args,
            &[
                ("--listen", format!("127.0.0.1:{port}")),
                ("--cache-dir", cache_dir.display().to_string()),
            ],
        );
        let args: Vec<&str> = args
            .iter()
            .chain(&self.relay_args)
            .map(String::as_str)
            .collect();
        let proc = Proc::spawn(
            &format!("relay-{site}"),
            &bin("caravan-relay")?,
            &args,
            &env,
            &self.dir,
        )?;
        let scheme = if args.contains(&"--tls-cert-file") {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://127.0.0.1:{port}");
        wait_http_ok(
            &http_client(self.tls.as_ref())?,
            &format!("{url}/readyz"),
            &proc,
        )
        .await?;
        self.relays.push(proc);
        self.relay_urls.insert(site.to_string(), url.clone());
        Ok(RelayInfo {
            url,
            cache_dir,
            bootstrap_token,
        })
    }

    /// Starts an agent process enrolling at `relay` as host `name`.
    pub fn start_agent(&mut self, name: &str, relay: &RelayInfo) -> anyhow::Result<()> {
        let (state_dir, install_root) = self.agent_dirs(name);
        std::fs::create_dir_all(&install_root)?;
        let proc = self.spawn_agent(name, relay, &state_dir, &install_root)?;
        self.agents.push(Agent {
            name: name.into(),
            proc,
            state_dir,
            install_root,
        });
        Ok(())
    }

    pub fn spawn_agent(
        &self,
        name: &str,
        relay: &RelayInfo,
        state_dir: &Path,
        install_root: &Path,
    ) -> anyhow::Result<Proc> {
        let (args, env) = self.agent_invocation(name, relay, state_dir, install_root);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(
            &format!("agent-{name}"),
            &self.agent_program()?,
            &args,
            &env,
            &self.dir,
        )
    }

    /// Runs `caravan-agent run --once` for `name` to its end, with `env`
    /// added (its output goes to the agent's log).
    pub fn run_agent_once(
        &self,
        name: &str,
        relay: &RelayInfo,
        env: &[(&str, &str)],
    ) -> anyhow::Result<std::process::ExitStatus> {
        let (state_dir, install_root) = self.agent_dirs(name);
        let (mut args, base_env) = self.agent_invocation(name, relay, &state_dir, &install_root);
        args.push("--once".into());
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("agent-{name}.log")))?;
        Ok(std::process::Command::new(self.agent_program()?)
            .args(&args)
            .envs(base_env)
            .envs(env.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?)
    }

    fn agent_program(&self) -> anyhow::Result<PathBuf> {
        self.agent_bin
            .clone()
            .map_or_else(|| bin("caravan-agent"), Ok)
    }

    /// The state directory and install root of agent `name`.
    pub fn agent_dirs(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.join("agents").join(name);
        (dir.join("state"), dir.join("root"))
    }

    /// The arguments and environment of `caravan-agent run` for `name`.
    fn agent_invocation(
        &self,
        name: &str,
        relay: &RelayInfo,
        state_dir: &Path,
        install_root: &Path,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let mut args: Vec<String> = [
            "run",
            "--server",
            &relay.url,
            "--state-dir",
            &state_dir.display().to_string(),
            "--install-root",
            &install_root.display().to_string(),
            "--hostname",
            name,
            "--poll-wait",
            "10",
            "--retry-after",
            "2",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.agent_args.iter().cloned());
        let mut env = vec![(
            "CARAVAN_BOOTSTRAP_TOKEN".to_string(),
            relay.bootstrap_token.clone(),
        )];
        env.extend(
            self.tls
                .as_ref()
                .map(|t| ("CARAVAN_CA_FILE".to_string(), t.ca.display().to_string())),
        );
        (args, env)
    }

    /// Waits until `job`, aimed at one agent, has failed there; returns why.
    pub async fn wait_failed(&self, job: &str) -> anyhow::Result<String> {
        let job = self
            .wait_job(job, "Failed", "0/1", Duration::from_secs(120))
            .await?;
        let failure = job.status.and_then(|s| s.failures.into_iter().next());
        Ok(failure.context("a failed job names its failure")?.reason)
    }

    /// Waits until `job` reports `phase` with `succeeded` of `total`.
    pub async fn wait_job(
        &self,
        job: &str,
        phase: &str,
        progress: &str,
        timeout: Duration,
    ) -> anyhow::Result<DistributionJob> {
        let api = self.api::<DistributionJob>();
        wait_for(
            &format!("job {job} to be {phase} {progress}"),
            timeout,
            || {
                let (api, job) = (api.clone(), job.to_string());
                async move {
                    let j = api.get(&job).await?;
                    let st = j.status.clone().unwrap_or_default();
                    let ok = serde_json::to_value(st.phase)?.as_str() == Some(phase)
                        && st.progress == progress;
                    Ok(ok.then_some(j))
                }
            },
        )
        .await
        .map_err(|e| e.context(self.logs()))
    }

    pub async fn site(&self, name: &str) -> anyhow::Result<Site> {
        Ok(self.api::<Site>().get(name).await?)
    }

    /// The tails of every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = self.controller.log_tail(40);
        for r in &self.relays {
            out.push_str(&r.log_tail(20));
        }
        for a in &self.agents {
            out.push_str(&a.proc.log_tail(15));
        }
        out
    }
}

impl Caravan {
    /// Seeds a Git repository from `examples/`: the fleet manifests under
    /// `fleet/` and the `hello` example package pushed as version 1.0.0, then
    /// declares a GitSource for it that syncs every 2 seconds.
    pub async fn seed_example_fleet(&self) -> anyhow::Result<git::GitRepo> {
        let repo = git::GitRepo::create(&self.dir.join("git"))?;
        let examples = repo_root().join("examples");
        for entry in std::fs::read_dir(examples.join("fleet"))? {
            let entry = entry?;
            let mut text = std::fs::read_to_string(entry.path())?;
            if let (Some(tls), "site.yaml") =
                (&self.tls, entry.file_name().to_string_lossy().as_ref())
            {
                // The relay serves HTTPS with the test certificate.
                self.create_tls_secret("hq-tls", tls).await?;
                text = text.replace(
                    "    replicas: 1\n",
                    "    replicas: 1\n    tlsSecret: hq-tls\n",
                );
            }
            repo.write(
                &format!("fleet/{}", entry.file_name().to_string_lossy()),
                &text,
            )?;
        }
        self.push_package(
            &examples.join("packages/hello"),
            "hello",
            "1.0.0",
            &repo.work.join("fleet/packages"),
        )?;
        repo.commit("Declare the fleet: cabinet, hq site, hello 1.0.0 for everyone")?;
        self.add_git_source("fleet", &repo.url(), "fleet", 2)
            .await?;
        Ok(repo)
    }
}

/// Copies a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// Reads one sample (`name`, no labels) from a Prometheus `/metrics` endpoint.
pub async fn metric(base_url: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{base_url}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("metric {name} not found in:\n{text}"))
}

/// `len` incompressible bytes (xorshift from `seed`), so a package built
/// from them is as large as the data.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `len` incompressible bytes to `path` in 1 MiB pieces (for sizes
/// that should not be held in memory).
pub fn write_noise(path: &Path, len: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = len;
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    while left > 0 {
        let n = left.min(1 << 20);
        f.write_all(&noise(n as usize, seed))?;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        left -= n;
    }
    Ok(f.flush()?)
}
