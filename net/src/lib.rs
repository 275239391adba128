//! Plumbing shared by the Caravan binaries: HTTP clients that trust a given
//! CA, error bodies, resumable verified downloads, long-poll documents,
//! backoff, private file writes, logging and the shared command-line groups;
//! and (feature `server`) serving over HTTP or HTTPS, bearer tokens, JSON
//! errors, long-polls, blobs and running a server's components together.

pub mod agent_tokens;
pub mod args;
pub mod backoff;
pub mod body;
pub mod document;
pub mod fs;
pub mod lock;
pub mod oci;
pub mod pipe;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod supervise;

pub use backoff::Backoff;
pub use document::Document;

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use caravan_api::wire::{ErrorBody, MAX_SMALL_ANSWER_BYTES};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// The release the sender of `headers` says it is of, if it says one that
/// can be read (at most [`caravan_api::skew::MAX_VERSION_LEN`] characters).
pub fn said_release(headers: &reqwest::header::HeaderMap) -> Option<&str> {
    headers
        .get(caravan_api::skew::VERSION_HEADER)?
        .to_str()
        .ok()
        .filter(|v| v.len() <= caravan_api::skew::MAX_VERSION_LEN)
}

/// Installs the global `tracing` subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal, not in log files and journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// An HTTP client that fails on stalled connections (no byte for
/// `read_timeout`). Given `ca_file` (PEM: one or more CA certificates, so a
/// CA can be rolled over), it trusts those alone — pinned, not added to the
/// web PKI roots, so no other CA in the world can vouch for the server.
pub fn client(ca_file: Option<&Path>, read_timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let pem = match ca_file {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("reading CA file {}", path.display()))?,
        ),
        None => None,
    };
    let what = ca_file.map(|p| format!("CA file {}", p.display()));
    client_trusting(pem.as_deref().zip(what.as_deref()), read_timeout)
}

/// How long a client keeps an idle connection for its next request: less
/// than servers wait for one, so it never sends a request on a connection
/// the server is closing at that moment.
pub const IDLE_CONNECTION: Duration =
    Duration::from_secs(args::HEADER_READ_TIMEOUT_SECONDS * 2 / 3);

/// [`client`] trusting the CAs of `ca` alone: PEM certificates, and what
/// they are called in an error.
pub fn client_trusting(
    ca: Option<(&[u8], &str)>,
    read_timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(read_timeout)
        .pool_idle_timeout(IDLE_CONNECTION);
    if let Some((pem, what)) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .with_context(|| format!("{what} is not PEM certificates"))?;
        anyhow::ensure!(!certs.is_empty(), "{what} holds no certificate");
        builder = certs
            .into_iter()
            .fold(builder.tls_built_in_root_certs(false), |b, c| {
                b.add_root_certificate(c)
            });
    }
    Ok(builder.build()?)
}

/// Displays an error with every cause after it (`a: b: c`), for a log
/// line: a failed request's own message rarely says why (a certificate
/// nobody trusts, a refused connection).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// Refuses a plaintext `url` (given as `flag`) unless `insecure`: what
/// crosses a plaintext link can be read and delayed by anyone on it.
pub fn require_https(url: &str, insecure: bool, flag: &str) -> anyhow::Result<()> {
    let plaintext = url
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
    anyhow::ensure!(
        !plaintext || insecure,
        "{flag} {url} is plaintext HTTP: use https:// (with --ca-file), or pass --insecure to accept it"
    );
    Ok(())
}

/// The message of a Caravan error response (`{"error": "..."}`), or its
/// body (read up to [`MAX_SMALL_ANSWER_BYTES`]).
pub async fn error_message(res: reqwest::Response) -> String {
    match body::read_capped(res, MAX_SMALL_ANSWER_BYTES).await {
        Ok(bytes) => serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => format!("(an unreadable error answer: {e})"),
    }
}

/// Hashes what an interrupted download left in `partial`, to resume it:
/// the hasher fed with those bytes and their count (zero if there is none).
pub async fn hash_partial(partial: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut file = match tokio::fs::File::open(partial).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok((hasher, len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Opens `partial` to continue a download (`resumed`: the server sent the
/// rest) or to write it anew. A new one is readable by its owner only: a
/// package may hold secrets until it is installed with its own modes.
pub async fn open_partial(partial: &Path, resumed: bool) -> std::io::Result<tokio::fs::File> {
    let mut options = tokio::fs::OpenOptions::new();
    options
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(partial).await
}

/// A long-poll request for `url`: waits up to `wait` seconds for a document
/// other than the one with ETag `etag`.
pub fn poll_request(
    http: &reqwest::Client,
    url: &str,
    etag: Option<&str>,
    wait: u64,
) -> reqwest::RequestBuilder {
    let req = http.get(url).timeout(Duration::from_secs(wait + 30));
    match etag {
        Some(etag) => req.header(reqwest::header::IF_NONE_MATCH, etag),
        None => req,
    }
}

/// Reads a long-poll answer of at most `max` bytes: `None` when unchanged
/// (304), else the new document and its ETag.
pub async fn poll_answer<T: serde::de::DeserializeOwned>(
    res: reqwest::Response,
    max: u64,
) -> Result<Option<(String, T)>, body::BodyError> {
    if res.status() == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let etag = res
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(Some((etag, body::json_capped(res, max).await?)))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_partial_download_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.part");
        super::open_partial(&path, false).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn plaintext_is_refused_unless_insecure() {
        assert!(super::require_https("https://relay:8080", false, "--server").is_ok());
        let e = super::require_https("HTTP://relay:8080", false, "--server").unwrap_err();
        assert!(
            e.to_string()
                .contains("--server HTTP://relay:8080 is plaintext"),
            "{e}"
        );
        assert!(super::require_https("http://relay:8080", true, "--server").is_ok());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        for text in ["", "not a certificate\n"] {
            std::fs::write(&path, text).unwrap();
            let e = super::client(Some(&path), std::time::Duration::from_secs(1))
                .err()
                .unwrap_or_else(|| panic!("{text:?} accepted as a CA"));
            assert!(format!("{e:#}").contains("ca.crt"), "{e:#}");
        }
    }
}
