//! A real OCI registry on loopback: Debian's `docker-registry` (the CNCF
//! `distribution` registry), serving TLS with a test CA and asking for
//! basic credentials (an `htpasswd` file, bcrypt).

use std::{path::Path, time::Duration};

use anyhow::Context as _;

use crate::{fixtures::TestTls, free_port, procs::Proc};

pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// The CA that signed its certificate (PEM file).
    pub ca_file: std::path::PathBuf,
    /// Where it keeps its blobs and manifests.
    pub root: std::path::PathBuf,
    pub username: String,
    pub password: String,
    _proc: Proc,
}

impl Registry {
    /// Starts one in `dir`, with user `caravan`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tls = TestTls::generate(&dir.join("tls"))?;
        let (username, password) = ("caravan".to_string(), "registry-secret".to_string());
        let out = std::process::Command::new("htpasswd")
            .args(["-Bbn", &username, &password])
            .output()
            .context("htpasswd (apache2-utils): run scripts/setup.sh")?;
        anyhow::ensure!(out.status.success(), "htpasswd failed");
        std::fs::write(dir.join("htpasswd"), out.stdout)?;
        let root = dir.join("data");
        let host = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {root}}}\n  delete: {{enabled: true}}\n\
             http:\n  addr: {host}\n  tls: {{certificate: {cert}, key: {key}}}\n\
             auth:\n  htpasswd: {{realm: caravan-test, path: {htpasswd}}}\n",
            root = root.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let proc = Proc::spawn(
            "registry",
            Path::new("/usr/bin/docker-registry"),
            &["serve", &dir.join("config.yml").display().to_string()],
            &[],
            dir,
        )?;
        let http = caravan_net::client(Some(&tls.ca), Duration::from_secs(10))?;
        let url = format!("https://{host}/v2/");
        // Up once it asks for credentials.
        crate::waits::wait_http(&http, &url, &proc, |s| {
            s == reqwest::StatusCode::UNAUTHORIZED
        })
        .await?;
        Ok(Self {
            host,
            ca_file: tls.ca,
            root,
            username,
            password,
            _proc: proc,
        })
    }

    /// The repository `name` in it, as a Cabinet names it.
    pub fn repository(&self, name: &str) -> String {
        format!("{}/{name}", self.host)
    }

    /// Sets `c` up for an `oci` cabinet in this registry: the controller's
    /// pull Secret `registry-pull` applied, its relays given the registry's
    /// credentials. Returns the YAML of Cabinet `name` in `repository`
    /// whose layers come from `layers_from` (`Controller` or `Relays`).
    pub fn connect(
        &self,
        c: &mut crate::Caravan,
        name: &str,
        repository: &str,
        layers_from: &str,
    ) -> anyhow::Result<String> {
        let secret = c.dir.join("registry-pull.yaml");
        std::fs::write(
            &secret,
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: registry-pull\n  namespace: {}\n  labels: {{caravan.dev/registry-credentials: \"true\"}}\n\
                 stringData: {{registry: \"{}\", username: {}, password: {}}}\n",
                c.namespace, self.host, self.username, self.password
            ),
        )?;
        c.cluster
            .kubectl(&["apply", "-f", &secret.display().to_string()])?;
        let auth = c.dir.join("relay-registry-auth.json");
        std::fs::write(&auth, self.docker_config())?;
        c.relay_args = vec!["--registry-auth-file".into(), auth.display().to_string()];
        let ca: String = std::fs::read_to_string(&self.ca_file)?
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect();
        Ok(format!(
            "apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {{name: {name}}}\nspec:\n  store:\n    type: oci\n    repository: {}\n    credentialsSecret: registry-pull\n    layersFrom: {layers_from}\n    caBundle: |\n{ca}",
            self.repository(repository)
        ))
    }

    /// A Docker `config.json` with the registry's credentials.
    pub fn docker_config(&self) -> String {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.username, self.password));
        format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, self.host)
    }

    /// How many requests the registry answered whose log line holds all of
    /// `fragments` (method, path…).
    pub fn requests(&self, fragments: &[&str]) -> anyhow::Result<usize> {
        let log = std::fs::read_to_string(&self._proc.log)?;
        Ok(log
            .lines()
            .filter(|l| l.contains("response completed") && fragments.iter().all(|f| l.contains(f)))
            .count())
    }
}
