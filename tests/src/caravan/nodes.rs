//! Playing the node for a Caravan installation: relays started from their
//! Site's Deployment as a kubelet would, and agents on loopback, each with
//! its own state directory and install root.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Caravan;
use crate::{bin, cluster::override_args, free_port, http, procs::Proc, waits::wait_http_ok};

/// A running agent process and its directories.
pub struct AgentProc {
    pub name: String,
    pub proc: Proc,
    pub state_dir: PathBuf,
    pub install_root: PathBuf,
}

impl AgentProc {
    /// The agent's name and credential, as it keeps them in its state directory.
    pub fn credentials(&self) -> anyhow::Result<(String, String)> {
        let creds: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.state_dir.join("credentials.json"))?)?;
        let field = |k: &str| creds[k].as_str().map(String::from);
        Ok((
            field("agent").context("no agent in credentials.json")?,
            field("token").context("no token in credentials.json")?,
        ))
    }
}

/// A relay started the way a kubelet would start the Site's Deployment.
#[derive(Clone, Debug)]
pub struct RelayInfo {
    pub url: String,
    pub cache_dir: PathBuf,
    /// A bootstrap token of the site (`caravan token create`, 24 h, any
    /// number of uses).
    pub bootstrap_token: String,
    /// The certificate and key files the relay serves HTTPS with, if it does.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Caravan {
    /// Plays the node: waits for the Site's relay Deployment, resolves its
    /// environment (Secrets included) and starts that container's command as
    /// a local `caravan-relay` process on a loopback port.
    pub async fn start_relay(&mut self, site: &str) -> anyhow::Result<RelayInfo> {
        self.start_relay_on(site, free_port()).await
    }

    /// [`Self::start_relay`] on `port` (one the Site declares in `relay.url`).
    pub async fn start_relay_at(&mut self, site: &str, port: u16) -> anyhow::Result<RelayInfo> {
        self.start_relay_on(site, port).await
    }

    /// Stops the relay of `site` and starts it again from its Deployment as
    /// it is now (a pod rolled), on the same address and cache.
    pub async fn restart_relay(&mut self, site: &str) -> anyhow::Result<RelayInfo> {
        let url = self
            .relay_urls
            .get(site)
            .cloned()
            .with_context(|| format!("no relay of site {site} runs"))?;
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("a relay URL ends in its port")?;
        let name = format!("relay-{site}");
        for p in self.relays.iter_mut().filter(|p| p.name == name) {
            p.kill();
        }
        self.relays.retain(|p| p.name != name);
        self.start_relay_on(site, port).await
    }

    async fn start_relay_on(&mut self, site: &str, port: u16) -> anyhow::Result<RelayInfo> {
        self.start_relay_from(site, &format!("{site}-relay"), port, 0)
            .await
    }

    /// Starts replica `replica` (1, 2, ...) of the relay of `site` beside
    /// the one [`Self::start_relay`] started: another pod of the Site's
    /// Deployment, on its own port, with its own `emptyDir` or the claim
    /// they share.
    pub async fn start_relay_replica(
        &mut self,
        site: &str,
        replica: usize,
    ) -> anyhow::Result<RelayInfo> {
        self.start_relay_from(site, &format!("{site}-relay"), free_port(), replica)
            .await
    }

    /// Starts the relay of `site` as Deployment `deployment` (one the
    /// controller made, or a `charts/caravan-relay` release) says, on a
    /// free port.
    pub async fn start_relay_deployed(
        &mut self,
        site: &str,
        deployment: &str,
    ) -> anyhow::Result<RelayInfo> {
        self.start_relay_from(site, deployment, free_port(), 0)
            .await
    }

    async fn start_relay_from(
        &mut self,
        site: &str,
        deployment: &str,
        port: u16,
        replica: usize,
    ) -> anyhow::Result<RelayInfo> {
        let name = match replica {
            0 => format!("relay-{site}"),
            n => format!("relay-{site}-{n}"),
        };
        let claims = self.dir.join("claims");
        let (args, env) = self
            .cluster
            .container_command(
                &self.namespace,
                deployment,
                &self.dir.join("node").join(&name),
                &claims,
            )
            .await?;
        // What the site's administrator hands the endpoints to enroll with.
        let bootstrap_token = self.bootstrap_token(site, &[])?;
        // A child site's relay fetches from its parent's relay: the Service
        // address becomes the loopback address the parent was started on.
        let mut env = env;
        for (k, v) in &mut env {
            if k == "CARAVAN_CONTENT_UPSTREAM" && v.contains(".svc") {
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
        // The cache: on a claim, as the Deployment says; else the pod's own
        // emptyDir (kept across restarts of the relay here).
        let on_claim = |a: &String| a.starts_with(&claims.display().to_string());
        let cache_dir = match args.iter().skip_while(|a| *a != "--cache-dir").nth(1) {
            Some(dir) if on_claim(dir) => PathBuf::from(dir),
            _ => self.dir.join(&name),
        };
        // The container's own arguments, with the node-local listen address and cache.
        let args = override_args(
            args,
            &[
                ("--listen", format!("127.0.0.1:{port}")),
                ("--cache-dir", cache_dir.display().to_string()),
            ],
        );
        let mut args: Vec<&str> = args
            .iter()
            .chain(&self.relay_args)
            .map(String::as_str)
            .collect();
        if self.relay_plaintext {
            while let Some(i) = args
                .iter()
                .position(|a| *a == "--tls-cert-file" || *a == "--tls-key-file")
            {
                args.drain(i..(i + 2).min(args.len()));
            }
        }
        let proc = Proc::spawn(&name, &bin("caravan-relay")?, &args, &env, &self.dir)?;
        let file = |flag: &str| {
            let at = args.iter().position(|a| *a == flag)?;
            args.get(at + 1).map(PathBuf::from)
        };
        let tls = file("--tls-cert-file").zip(file("--tls-key-file"));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}");
        wait_http_ok(&http(), &format!("{url}/readyz"), &proc).await?;
        self.relays.push(proc);
        self.cluster
            .mark_rolled_out(&self.namespace, deployment)
            .await?;
        if replica == 0 {
            self.relay_urls.insert(site.to_string(), url.clone());
        }
        Ok(RelayInfo {
            url,
            cache_dir,
            bootstrap_token,
            tls,
        })
    }

    /// Starts an agent process enrolling at `relay` as host `name`.
    pub fn start_agent(&mut self, name: &str, relay: &RelayInfo) -> anyhow::Result<()> {
        let (state_dir, install_root) = self.agent_dirs(name);
        std::fs::create_dir_all(&install_root)?;
        let proc = self.spawn_agent(name, relay, &state_dir, &install_root)?;
        self.agents.push(AgentProc {
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

    /// Where agent `name` writes its figures (`--metrics-file`).
    pub fn agent_metrics_file(&self, name: &str) -> PathBuf {
        self.dir.join("agents").join(name).join("caravan.prom")
    }

    /// The arguments and environment of `caravan-agent run` for `name`.
    fn agent_invocation(
        &self,
        name: &str,
        relay: &RelayInfo,
        state_dir: &Path,
        install_root: &Path,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let poll_wait = self.agent_poll_wait.to_string();
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
            &poll_wait,
            "--retry-after",
            "2",
            "--metrics-file",
            &self.agent_metrics_file(name).display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.agent_args.iter().cloned());
        let mut env = vec![
            (
                "CARAVAN_BOOTSTRAP_TOKEN".to_string(),
                relay.bootstrap_token.clone(),
            ),
            (
                "CARAVAN_CA_FILE".to_string(),
                self.ca_file.display().to_string(),
            ),
        ];
        env.extend(self.agent_env.get(name).into_iter().flatten().cloned());
        (args, env)
    }
}
