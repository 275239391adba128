//! Command-line groups every server shares, flattened into each binary's
//! own arguments (`#[command(flatten)]`), so the flags and their
//! environment variables are spelled once.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Where a server listens, over HTTP, or HTTPS given a certificate and key.
/// `PORT` is the binary's default port.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs<const PORT: u16> {
    /// Address to listen on.
    #[arg(long, env = "CARAVAN_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], PORT)))]
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate (PEM chain)...
    #[arg(long, env = "CARAVAN_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, env = "CARAVAN_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// A client that has not sent a request's headers within this many
    /// seconds (a new request, or the next one on a kept-alive connection)
    /// is disconnected, so slow clients cannot hold connections forever.
    #[arg(
        long,
        env = "CARAVAN_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = HEADER_READ_TIMEOUT_SECONDS
    )]
    pub header_read_timeout_seconds: u64,
    /// A request body (an upload, a report) that sends nothing for this
    /// many seconds is cut off.
    #[arg(long, env = "CARAVAN_BODY_IDLE_TIMEOUT_SECONDS", default_value_t = 60)]
    pub body_idle_timeout_seconds: u64,
    /// Most connections served at once; more are closed as they arrive, so
    /// a flood cannot take every file descriptor (0: the open-files limit
    /// less a reserve for the server's own files).
    #[arg(long, env = "CARAVAN_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
}

impl<const PORT: u16> ServeArgs<PORT> {
    /// The certificate and key, when serving HTTPS.
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
        ))
    }
}

/// How a binary logs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log as JSON lines (one object per event: timestamp, level, fields,
    /// target), for log collectors.
    #[arg(long, global = true, env = "CARAVAN_LOG_JSON")]
    pub log_json: bool,
}

impl LogArgs {
    /// Installs the global subscriber (see [`crate::init_logging`]).
    pub fn init(&self) {
        crate::init_logging(self.log_json);
    }
}

/// How long a server waits for a request's headers by default, on an idle
/// kept-alive connection too.
pub const HEADER_READ_TIMEOUT_SECONDS: u64 = 30;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Server {
        #[command(flatten)]
        serve: ServeArgs<8080>,
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn the_shared_flags_parse_with_the_binarys_default_port() {
        let s = Server::try_parse_from(["x"]).unwrap();
        assert_eq!(s.serve.listen, "0.0.0.0:8080".parse().unwrap());
        assert!(s.serve.tls().is_none() && !s.log.log_json);
        let s = Server::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:1",
            "--tls-cert-file",
            "c",
            "--tls-key-file",
            "k",
            "--log-json",
        ])
        .unwrap();
        assert_eq!(s.serve.tls(), Some((Path::new("c"), Path::new("k"))));
        assert!(s.log.log_json);
        assert!(
            Server::try_parse_from(["x", "--tls-cert-file", "c"]).is_err(),
            "a certificate needs its key"
        );
    }
}
