//! Everything of one Caravan installation in a test: a cluster, the
//! controller (started directly or with the Helm chart), and the API calls,
//! CLI runs and waits tests make against it.

mod fleet;
pub mod nodes;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use caravan_api::v1alpha1::{Agent, DistributionJob, GitSource, Site};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};

use nodes::AgentProc;
pub use nodes::RelayInfo;

use crate::{
    bin,
    cluster::{override_args, Cluster},
    free_port, git,
    helm::{helm, HELM_NAMESPACE, HELM_TEST_VALUES},
    http,
    procs::Proc,
    repo_root,
    service::Service,
    wait_for,
    waits::wait_http_ok,
    TestTls,
};

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

/// Everything of one Caravan installation: the controller and what it serves.
pub struct Caravan {
    pub dir: PathBuf,
    pub namespace: String,
    pub cluster: Cluster,
    pub controller: Proc,
    /// How the controller was started: arguments and environment.
    controller_cmd: (Vec<String>, Vec<(String, String)>),
    /// The flags the harness sets over the Deployment's (its node's
    /// addresses and directories, the tests' timings).
    controller_flags: Vec<(String, String)>,
    pub api_url: String,
    pub upload_token: String,
    /// The controller's backup token (`caravan backup`, `caravan restore`).
    pub backup_token: String,
    pub relays: Vec<Proc>,
    pub agents: Vec<AgentProc>,
    /// Certificates when everything talks HTTPS.
    pub tls: Option<TestTls>,
    /// Extra arguments for every agent started from now on.
    pub agent_args: Vec<String>,
    /// How long agents started from now on long-poll (`--poll-wait`).
    pub agent_poll_wait: u64,
    /// Extra environment of the agent of each host (e.g. its `TZ`).
    pub agent_env: std::collections::BTreeMap<String, Vec<(String, String)>>,
    /// The CAs agents pin (`--ca-file`): the controller's, and the test CA
    /// when Caravan runs with it.
    pub ca_file: PathBuf,
    /// The CA that issued the controller's certificate (its own controller
    /// CA, or the test CA): for the CLI's `--ca-file`.
    pub controller_ca_file: PathBuf,
    /// The binary agents run from (default: the build's `caravan-agent`).
    pub agent_bin: Option<PathBuf>,
    /// Extra arguments for every relay started from now on.
    pub relay_args: Vec<String>,
    /// Relays started from now on serve plaintext HTTP, not the HTTPS their
    /// Deployment says (the relay benchmark compares them with a plaintext
    /// peer); agents of theirs need `--insecure`.
    pub relay_plaintext: bool,
    /// URL of each started relay, by site.
    pub relay_urls: std::collections::HashMap<String, String>,
    /// What relays reach the controller through, if not its own port.
    pub service: Option<Service>,
    _tmp: Option<tempfile::TempDir>,
}

/// How to start Caravan in a test.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub install: Install,
    /// Controller and relays serve HTTPS with a test CA that the relays,
    /// agents and CLI are told to trust.
    pub tls: bool,
    /// How long signed desired-state documents are good for (default: the
    /// controller's).
    pub desired_state_ttl_seconds: Option<u64>,
    /// Enrollments each site may make per second (default: the controller's).
    pub enrollments_per_second: Option<u32>,
    /// When silent Agents turn Stale, and are deleted (default: the chart's).
    pub agent_stale_after_seconds: Option<u64>,
    pub agent_delete_after_seconds: Option<u64>,
    /// The leader's Lease is the controller's default, not the tests' 10 s
    /// (with which a crashed leader is replaced sooner): what benchmarks run.
    pub default_lease: bool,
    /// Relays reach the controller through a [`Service`] (to which
    /// [`Caravan::start_replica`] adds its replica), not at its own port.
    pub service: bool,
}

/// The controller's arguments on the harness's node: the Deployment's,
/// with `flags` set over them (JSON logs off: the tests read them).
fn node_args(args: Vec<String>, flags: &[(String, String)]) -> Vec<String> {
    let flags: Vec<(&str, String)> = flags.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    override_args(args, &flags)
        .into_iter()
        .filter(|a| a != "--log-json")
        .collect()
}

/// Starts the controller and waits until it answers.
async fn spawn_controller(
    name: &str,
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
    api_url: &str,
) -> anyhow::Result<Proc> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let controller = Proc::spawn(name, &bin("caravan-controller")?, &argv, env, dir)?;
    // Given no certificate, it serves one from its own CA, which exists
    // once it has made its key at its first start: the tests trust it then.
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .context("no --data-dir")?;
    wait_for("the controller's key", Duration::from_secs(60), || async {
        Ok(Path::new(data_dir).join("token.key").exists().then_some(()))
    })
    .await?;
    let ca = controller_one_off(data_dir, "ca --controller")?;
    std::fs::write(dir.join("controller-ca.crt"), &ca)?;
    crate::trust(&ca);
    wait_http_ok(&http(), &format!("{api_url}/healthz"), &controller).await?;
    Ok(controller)
}

/// Runs `caravan-controller --data-dir <data_dir> <command…>` and returns its output.
fn controller_one_off(data_dir: &str, command: &str) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new(bin("caravan-controller")?)
        .args(["--data-dir", data_dir])
        .args(command.split(' '))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "caravan-controller {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

impl Caravan {
    /// Starts a cluster, installs the CRDs, creates `namespace` and starts the controller.
    pub async fn start(namespace: &str) -> anyhow::Result<Self> {
        Self::start_with(namespace, Options::default()).await
    }

    /// Starts a cluster and Caravan in it, either directly or with the Helm chart.
    pub async fn start_with(namespace: &str, options: Options) -> anyhow::Result<Self> {
        let Options {
            install,
            tls,
            desired_state_ttl_seconds,
            enrollments_per_second,
            agent_stale_after_seconds,
            agent_delete_after_seconds,
            default_lease,
            service,
        } = options;
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
            let tls = TestTls::generate(&dir.join("tls"))?;
            crate::trust(&std::fs::read(&tls.ca)?);
            Some(tls)
        } else {
            None
        };
        let port = free_port();
        // HTTPS either way: with the test CA's certificate, or with one
        // from the controller's own CA.
        let api_url = format!("https://127.0.0.1:{port}");
        let service = match service {
            true => {
                let s = Service::start().await?;
                s.add(([127, 0, 0, 1], port).into());
                Some(s)
            }
            false => None,
        };
        let upstream_url = match &service {
            Some(s) => format!("https://127.0.0.1:{}", s.port),
            None => api_url.clone(),
        };
        let data_dir = dir.join("controller").display().to_string();
        let trust_dir = data_dir.clone();
        let (args, mut env) = match install {
            Install::Direct => {
                cluster.install_crds().await?;
                let args = ["--namespace", namespace].map(String::from).to_vec();
                (
                    args,
                    vec![
                        (
                            "CARAVAN_UPLOAD_TOKEN".to_string(),
                            "caravan-test-upload-token".to_string(),
                        ),
                        (
                            "CARAVAN_BACKUP_TOKEN".to_string(),
                            "caravan-test-backup-token".to_string(),
                        ),
                    ],
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
                    .container_command(
                        HELM_NAMESPACE,
                        "caravan",
                        &dir.join("node/controller"),
                        &dir.join("claims"),
                    )
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
            ("--relay-upstream-url", upstream_url),
            // Each process its own name in the leader election.
            ("--leader-election-identity", "controller".to_string()),
            // Unreferenced blobs go 10 s after upload, checked every second.
            ("--blob-gc-interval-seconds", "1".to_string()),
            ("--blob-grace-seconds", "10".to_string()),
            // The tests' repositories are local; nothing else is.
            (
                "--allow-local-git-under",
                dir.join("git").display().to_string(),
            ),
        ];
        if !default_lease {
            flags.push(("--leader-election-lease-seconds", "10".to_string()));
        }
        if let Some(ttl) = desired_state_ttl_seconds {
            flags.push(("--desired-state-ttl-seconds", ttl.to_string()));
        }
        if let Some(rate) = enrollments_per_second {
            flags.push(("--enrollments-per-second", rate.to_string()));
        }
        if let Some(after) = agent_stale_after_seconds {
            flags.push(("--agent-stale-after-seconds", after.to_string()));
        }
        if let Some(after) = agent_delete_after_seconds {
            flags.push(("--agent-delete-after-seconds", after.to_string()));
        }
        if let Some(tls) = &tls {
            flags.extend([
                ("--tls-cert-file", tls.cert.display().to_string()),
                ("--tls-key-file", tls.key.display().to_string()),
                ("--relay-upstream-ca-file", tls.ca.display().to_string()),
            ]);
        }
        let controller_flags: Vec<(String, String)> = flags
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let args = node_args(args, &controller_flags);
        let token = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("no {name}"))
        };
        let (upload_token, backup_token) = (
            token("CARAVAN_UPLOAD_TOKEN")?,
            token("CARAVAN_BACKUP_TOKEN")?,
        );
        env.extend([
            ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
            (
                "RUST_LOG".to_string(),
                std::env::var("CARAVAN_CONTROLLER_LOG")
                    .unwrap_or_else(|_| "info,kube=error".to_string()),
            ),
        ]);
        let controller = spawn_controller("controller", &args, &env, &dir, &api_url).await?;
        // Agents are pinned to the controller's root, as an operator would pin them.
        let root = String::from_utf8(controller_one_off(&trust_dir, "trust-root")?)?
            .trim()
            .to_string();
        // ...and given the controller's CA, which issues the relays'
        // certificates (and the test CA, when the Sites use it).
        let mut bundle = controller_one_off(&trust_dir, "ca")?;
        crate::trust(&bundle);
        if let Some(tls) = &tls {
            bundle.extend(std::fs::read(&tls.ca)?);
        }
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, bundle)?;
        let controller_ca_file = match &tls {
            Some(tls) => tls.ca.clone(),
            None => dir.join("controller-ca.crt"),
        };
        Ok(Self {
            controller_cmd: (args, env),
            controller_flags,
            tls,
            agent_args: vec!["--trust-root-sha256".into(), root],
            agent_env: Default::default(),
            agent_poll_wait: 10,
            ca_file,
            controller_ca_file,
            agent_bin: None,
            relay_urls: Default::default(),
            relay_args: vec![],
            relay_plaintext: false,
            service,

            dir,
            namespace: namespace.into(),
            cluster,
            controller,
            api_url,
            upload_token,
            backup_token,
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

    /// Kills the controller and starts it again with `flags` set (kept for
    /// later restarts), as a new release of its Deployment would.
    pub async fn restart_controller_with(
        &mut self,
        flags: &[(&str, String)],
    ) -> anyhow::Result<()> {
        for (flag, value) in flags {
            self.controller_flags.retain(|(f, _)| f != flag);
            self.controller_flags
                .push((flag.to_string(), value.clone()));
        }
        self.controller_cmd.0 = override_args(std::mem::take(&mut self.controller_cmd.0), flags);
        self.restart_controller().await
    }

    /// Kills the controller and starts it as the chart's Deployment says
    /// now (after a `helm upgrade` or `rollback`), as the kubelet would roll
    /// its pod. `Err` with the controller's last words if it does not come up.
    pub async fn restart_controller_from_deployment(&mut self) -> anyhow::Result<()> {
        let (args, env) = self
            .cluster
            .container_command(
                HELM_NAMESPACE,
                "caravan",
                &self.dir.join("node/controller"),
                &self.dir.join("claims"),
            )
            .await?;
        let kept: Vec<(String, String)> = self
            .controller_cmd
            .1
            .iter()
            .filter(|(k, _)| k == "KUBECONFIG" || k == "RUST_LOG")
            .cloned()
            .collect();
        self.controller_cmd = (
            node_args(args, &self.controller_flags),
            env.into_iter().chain(kept).collect(),
        );
        self.controller.kill();
        let (args, env) = &self.controller_cmd;
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        self.controller = Proc::spawn(
            "controller",
            &bin("caravan-controller")?,
            &argv,
            env,
            &self.dir,
        )?;
        let healthz = format!("{}/healthz", self.api_url);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.controller.exit_status() {
                // What it said before it stopped (a backtrace may follow).
                let log = std::fs::read_to_string(&self.controller.log).unwrap_or_default();
                let said = log.lines().rev().find(|l| l.starts_with("Error: "));
                anyhow::bail!(
                    "the controller stopped ({status}): {}",
                    said.map_or_else(|| self.controller.log_tail(20), String::from)
                );
            }
            let up = http().get(&healthz).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the controller did not answer within 60 s: {}",
                self.controller.log_tail(5)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the controller (SIGKILL) and starts it again, as it was.
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.controller.kill();
        let (args, env) = &self.controller_cmd;
        self.controller =
            spawn_controller("controller", args, env, &self.dir, &self.api_url).await?;
        Ok(())
    }

    /// Destroys the control plane — the controller, the API server, etcd
    /// and the controller's data directory — and starts a fresh one in its
    /// place: a new API server with the CRDs and the namespace, and the
    /// controller (same flags, same address) on an empty data directory,
    /// awaiting a restore. Relays and agents run on, cut off.
    pub async fn rebuild_control_plane(&mut self) -> anyhow::Result<()> {
        self.controller.kill();
        let fresh = Cluster::start(&self.dir.join("rebuilt")).await?;
        drop(std::mem::replace(&mut self.cluster, fresh));
        self.cluster.install_crds().await?;
        self.cluster.create_namespace(&self.namespace).await?;
        std::fs::remove_dir_all(self.data_dir()?)?;
        let env = &mut self.controller_cmd.1;
        env.retain(|(k, _)| k != "KUBECONFIG" && k != "CARAVAN_AWAIT_RESTORE");
        env.extend([
            (
                "KUBECONFIG".to_string(),
                self.cluster.kubeconfig.display().to_string(),
            ),
            ("CARAVAN_AWAIT_RESTORE".to_string(), "true".to_string()),
        ]);
        self.restart_controller().await
    }

    /// The controller's data directory.
    fn data_dir(&self) -> anyhow::Result<String> {
        self.controller_flags
            .iter()
            .find(|(f, _)| f == "--data-dir")
            .map(|(_, d)| d.clone())
            .context("no --data-dir")
    }

    /// After `caravan restore`: the controller serves under the backup's
    /// CA again; the CLI is given it.
    pub fn restored(&mut self) -> anyhow::Result<()> {
        let ca = controller_one_off(&self.data_dir()?, "ca --controller")?;
        std::fs::write(self.dir.join("controller-ca.crt"), &ca)?;
        crate::trust(&ca);
        Ok(())
    }

    /// Starts another replica of the controller on the same data directory
    /// (as on a shared volume), serving at the returned URL.
    pub async fn start_replica(&self) -> anyhow::Result<(Proc, String)> {
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let (args, env) = &self.controller_cmd;
        let args = override_args(
            args.clone(),
            &[
                ("--listen", format!("127.0.0.1:{port}")),
                ("--leader-election-identity", "controller-replica".into()),
            ],
        );
        let replica = spawn_controller("controller-replica", &args, env, &self.dir, &url).await?;
        if let Some(s) = &self.service {
            s.add(([127, 0, 0, 1], port).into());
        }
        Ok((replica, url))
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
        self.apply_git_source(
            name,
            serde_json::json!({"url": url, "ref": {"branch": "main"}, "path": path, "intervalSeconds": interval}),
        )
        .await
    }

    /// Declares (or changes) GitSource `name` with `spec`.
    pub async fn apply_git_source(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> anyhow::Result<()> {
        let gs: GitSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "caravan.dev/v1alpha1", "kind": "GitSource",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
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
            }, {
                "name": "cabinets.caravan.dev",
                "clientConfig": { "url": format!("{}/validate/cabinets", self.api_url), "caBundle": ca },
                "rules": [{ "apiGroups": ["caravan.dev"], "apiVersions": ["v1alpha1"], "resources": ["cabinets"], "operations": ["CREATE", "UPDATE"] }],
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
        self.push_package_with(dir, name, version, manifest_dir, &[])
    }

    /// [`Self::push_package`] with `extra` arguments (`--install script`, …).
    pub fn push_package_with(
        &self,
        dir: &Path,
        name: &str,
        version: &str,
        manifest_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let (dir, manifest_dir) = (
            dir.display().to_string(),
            manifest_dir.display().to_string(),
        );
        let mut args = vec![
            "package",
            "push",
            &dir,
            "--name",
            name,
            "--version",
            version,
            "--manifest-dir",
            &manifest_dir,
        ];
        args.extend(extra);
        self.cli(&args)
    }

    /// Runs the `caravan` CLI against this installation's controller and
    /// cluster (as its administrator).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cli_with(args, &[])
    }

    /// [`Self::cli`], returning what it said on both outputs.
    pub fn cli_output(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli_command(args, &[])?;
        anyhow::ensure!(
            out.status.success(),
            "caravan {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn cli_command(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(bin("caravan")?)
            .args(args)
            .env("KUBECONFIG", &self.cluster.kubeconfig)
            .env("CARAVAN_SERVER", &self.api_url)
            .env("CARAVAN_UPLOAD_TOKEN", &self.upload_token)
            .env("CARAVAN_BACKUP_TOKEN", &self.backup_token)
            .env("CARAVAN_CA_FILE", &self.controller_ca_file)
            .envs(env.iter().copied())
            .output()?)
    }

    /// [`Self::cli`] with more environment variables.
    pub fn cli_with(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
        let out = self.cli_command(args, env)?;
        anyhow::ensure!(
            out.status.success(),
            "caravan {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Caravan {
    /// A new bootstrap token for agents of `site`, made with
    /// `caravan token create` (and `extra` arguments: `--ttl`, `--max-uses`).
    pub fn bootstrap_token(&self, site: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["token", "create", "--site", site, "-n", &self.namespace];
        args.extend(extra);
        Ok(self.cli(&args)?.trim().to_string())
    }

    /// Waits until `job`, aimed at one agent, has failed there; returns why.
    pub async fn wait_failed(&self, job: &str) -> anyhow::Result<String> {
        let job = self
            .wait_job(job, "Failed", "0/1", Duration::from_secs(120))
            .await?;
        let failure = job.status.and_then(|s| s.failures.into_iter().next());
        Ok(failure.context("a failed job names its failure")?.reason)
    }

    /// The API server's own `/metrics`, as they stand now.
    pub fn api_metrics(&self) -> anyhow::Result<ApiMetrics> {
        Ok(ApiMetrics(
            self.cluster.kubectl(&["get", "--raw", "/metrics"])?,
        ))
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

    /// The Agent of the endpoint with hostname `host`.
    pub async fn agent_of(&self, host: &str) -> anyhow::Result<Agent> {
        self.api::<Agent>()
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|a| a.spec.hostname == host)
            .with_context(|| format!("no Agent for host {host}"))
    }

    /// Waits until the Agent of `host` reports its desired state refused
    /// (or not) for `reason`; returns the condition's message.
    pub async fn wait_desired_state(&self, host: &str, reason: &str) -> anyhow::Result<String> {
        wait_for(
            &format!("agent {host} to report its desired state {reason}"),
            Duration::from_secs(120),
            || async {
                let agent = self.agent_of(host).await?;
                let condition = agent.status.and_then(|s| {
                    s.conditions
                        .into_iter()
                        .find(|c| c.type_ == caravan_api::conditions::DESIRED_STATE_ACCEPTED)
                });
                Ok(condition.filter(|c| c.reason == reason).map(|c| c.message))
            },
        )
        .await
        .map_err(|e| e.context(self.logs()))
    }

    /// Waits for a Warning Event whose reason starts with `reason`, about
    /// the object named `name`, with a note containing `words`; returns the note.
    pub async fn wait_warning(
        &self,
        name: &str,
        reason: &str,
        words: &str,
    ) -> anyhow::Result<String> {
        self.wait_event("Warning", name, reason, words).await
    }

    /// Waits for an Event of `type_` (`Normal`, `Warning`) about object
    /// `name` whose reason starts with `reason` and whose note has `words`;
    /// returns the note.
    pub async fn wait_event(
        &self,
        type_: &str,
        name: &str,
        reason: &str,
        words: &str,
    ) -> anyhow::Result<String> {
        wait_for(
            &format!("a {reason} {type_} Event on {name} with {words:?}"),
            Duration::from_secs(120),
            || async {
                let events = self
                    .api::<k8s_openapi::api::events::v1::Event>()
                    .list(&Default::default())
                    .await?;
                Ok(events.items.into_iter().find_map(|e| {
                    let note = e.note.unwrap_or_default();
                    (e.reason.as_deref().is_some_and(|r| r.starts_with(reason))
                        && e.type_.as_deref() == Some(type_)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                        && note.contains(words))
                    .then_some(note)
                }))
            },
        )
        .await
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

/// A snapshot of the API server's `/metrics` ([`Caravan::api_metrics`]);
/// figures over a span of time are one snapshot taken since another.
pub struct ApiMetrics(String);

/// The verbs that write (`apiserver_request_total`'s `verb` label).
pub const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "DELETE", "APPLY"];
/// The verbs that read, but for watches.
pub const READ_VERBS: &[&str] = &["GET", "LIST"];

impl ApiMetrics {
    /// Every sample of metric `name`: its labels, read by name, and value.
    fn samples<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (impl Fn(&str) -> &'a str, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let label = move |l: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(l)?.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"'))
                    .unwrap_or_default()
            };
            Some((label, value.trim().parse::<f64>().unwrap_or(0.0)))
        })
    }

    /// The writes (POST, PUT, PATCH, DELETE, APPLY) since `before` to the
    /// resources `which` picks, by `resource/subresource`.
    pub fn writes_since(&self, before: &Self, which: impl Fn(&str) -> bool) -> f64 {
        let count = |m: &Self| -> f64 {
            m.samples("apiserver_request_total")
                .filter(|(l, _)| WRITE_VERBS.contains(&l("verb")))
                .filter(|(l, _)| which(&format!("{}/{}", l("resource"), l("subresource"))))
                .map(|(_, v)| v)
                .sum()
        };
        count(self) - count(before)
    }

    /// Quantile `q` of the latencies of the requests with `verbs` since
    /// `before` (`apiserver_request_duration_seconds`): the upper bound, in
    /// seconds, of the histogram bucket it falls in.
    pub fn latency_since(&self, before: &Self, verbs: &[&str], q: f64) -> f64 {
        let buckets = |m: &Self| {
            let mut by_le = std::collections::BTreeMap::<u64, f64>::new();
            for (l, v) in m.samples("apiserver_request_duration_seconds_bucket") {
                if verbs.contains(&l("verb")) {
                    let le = l("le").parse::<f64>().unwrap_or(f64::INFINITY);
                    *by_le.entry(le.to_bits()).or_default() += v;
                }
            }
            by_le
        };
        let (now, then) = (buckets(self), buckets(before));
        // Positive floats order as their bits do.
        let counts: Vec<(f64, f64)> = now
            .iter()
            .map(|(le, n)| {
                (
                    f64::from_bits(*le),
                    n - then.get(le).copied().unwrap_or(0.0),
                )
            })
            .collect();
        let total = counts.last().map_or(0.0, |(_, n)| *n);
        counts
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map_or(0.0, |(le, _)| *le)
    }
}
