//! Real Git hosts on loopback, from Debian's packages: `git http-backend`
//! behind nginx (TLS from a test CA, basic auth) through `fcgiwrap`, and
//! `sshd` with one authorized key. Both serve the bare repositories under
//! one directory.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{fixtures::TestTls, free_port, procs::Proc, wait_for};

/// `git http-backend` behind nginx, over HTTPS with basic auth.
pub struct GitHttps {
    /// `https://127.0.0.1:PORT`; a repository `x.git` under the root is at
    /// `{base}/x.git`.
    pub base: String,
    /// The CA that signed its certificate (PEM file).
    pub ca_file: PathBuf,
    pub username: String,
    pub password: String,
    _fcgi: Proc,
    _nginx: Proc,
}

impl GitHttps {
    /// Serves the repositories under `repos`, keeping its own files in `dir`.
    pub async fn start(dir: &Path, repos: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let tls = TestTls::generate(&dir.join("tls"))?;
        let (username, password) = ("fleet-bot".to_string(), "git-secret".to_string());
        let out = std::process::Command::new("htpasswd")
            .args(["-bn", &username, &password])
            .output()
            .context("htpasswd (apache2-utils): run scripts/setup.sh")?;
        anyhow::ensure!(out.status.success(), "htpasswd failed");
        std::fs::write(dir.join("htpasswd"), out.stdout)?;
        let socket = dir.join("fcgi.sock");
        let fcgi = Proc::spawn(
            "fcgiwrap",
            Path::new("/usr/sbin/fcgiwrap"),
            &["-s", &format!("unix:{}", socket.display())],
            &[],
            dir,
        )
        .context("fcgiwrap: run scripts/setup.sh")?;
        let port = free_port();
        let root = if nix_root() { "user root;\n" } else { "" };
        let config = format!(
            "{root}daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
               proxy_temp_path {d}/tmp/proxy;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
               server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
                 location / {{\n      auth_basic git;\n      auth_basic_user_file {d}/htpasswd;\n\
                   fastcgi_pass unix:{sock};\n      include /etc/nginx/fastcgi_params;\n\
                   fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;\n\
                   fastcgi_param GIT_PROJECT_ROOT {repos};\n      fastcgi_param GIT_HTTP_EXPORT_ALL \"\";\n\
                   fastcgi_param PATH_INFO $uri;\n      fastcgi_param REMOTE_USER $remote_user;\n    }}\n  }}\n}}\n",
            d = dir.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            sock = socket.display(),
            repos = repos.display(),
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let conf_arg = conf.display().to_string();
        let prefix = format!("{}/", dir.display());
        let nginx = Proc::spawn(
            "nginx",
            Path::new("/usr/sbin/nginx"),
            &["-c", &conf_arg, "-p", &prefix],
            &[],
            dir,
        )
        .context("nginx: run scripts/setup.sh")?;
        let base = format!("https://127.0.0.1:{port}");
        let http = caravan_net::client(Some(&tls.ca), Duration::from_secs(10))?;
        let url = format!("{base}/");
        crate::waits::wait_http(&http, &url, &nginx, |s| {
            s == reqwest::StatusCode::UNAUTHORIZED
        })
        .await?;
        Ok(Self {
            base,
            ca_file: tls.ca,
            username,
            password,
            _fcgi: fcgi,
            _nginx: nginx,
        })
    }
}

/// `sshd` on loopback letting in one key, as the user running the tests.
pub struct GitSsh {
    /// `ssh://USER@127.0.0.1:PORT`; a repository is at `{base}{path}`.
    pub base: String,
    /// The private key it lets in (OpenSSH PEM).
    pub identity: String,
    /// The `known_hosts` line of its host key.
    pub known_hosts: String,
    _sshd: Proc,
}

impl GitSsh {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let keygen = |file: &str| -> anyhow::Result<()> {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(file))
                .status()
                .context("ssh-keygen (openssh-client)")?;
            anyhow::ensure!(status.success(), "ssh-keygen failed");
            Ok(())
        };
        keygen("host_key")?;
        keygen("user_key")?;
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
        // sshd wants its privilege separation directory.
        std::fs::create_dir_all("/run/sshd")?;
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let conf = dir.join("sshd_config").display().to_string();
        let sshd = Proc::spawn(
            "sshd",
            Path::new("/usr/sbin/sshd"),
            &["-D", "-e", "-f", &conf],
            &[],
            dir,
        )
        .context("sshd (openssh-server): run scripts/setup.sh")?;
        wait_for("sshd to listen", Duration::from_secs(30), || async {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ()))
        })
        .await
        .map_err(|e| e.context(sshd.log_tail(20)))?;
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub"))?;
        let mut fields = host_pub.split_whitespace();
        let (kind, key) = (
            fields.next().context("host key type")?,
            fields.next().context("host key")?,
        );
        let out = std::process::Command::new("id").arg("-un").output()?;
        let user = String::from_utf8(out.stdout)?.trim().to_string();
        Ok(Self {
            base: format!("ssh://{user}@127.0.0.1:{port}"),
            identity: std::fs::read_to_string(dir.join("user_key"))?,
            known_hosts: format!("[127.0.0.1]:{port} {kind} {key}\n"),
            _sshd: sshd,
        })
    }
}

fn nix_root() -> bool {
    rustix::process::getuid().is_root()
}
