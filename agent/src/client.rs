//! The agent's client of its relay.

use std::{path::Path, time::Duration};

use caravan_api::{
    trust::Envelope,
    wire::{
        paths, AgentServed, EnrollRequest, EnrollResponse, RenewRequest, MAX_AGENT_DESIRED_BYTES,
        MAX_SMALL_ANSWER_BYTES, MAX_WAIT_SECONDS,
    },
    Digest,
};
use futures::StreamExt;
use reqwest::{header, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("relay refused the credentials: {0}")]
    Unauthorized(String),
    /// The credentials are good but the agent is not served: it awaits
    /// approval, was revoked, or its Agent was deleted.
    #[error("relay turned this agent away: {0}")]
    Forbidden(String),
    /// The relay does not know this agent at all (`410`): its Agent was
    /// deleted, and it must enroll again.
    #[error("relay does not know this agent: {0}")]
    Gone(String),
    /// The relay refuses this agent's release (`426`): only upgrading the
    /// agent (or the controller, if the agent is newer) helps.
    #[error("relay refuses this agent's release: {0}")]
    Skew(String),
    #[error("{url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: {error}")]
    Body {
        url: String,
        error: caravan_net::body::BodyError,
    },
    #[error("relay answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    /// The relay says to come back later (`503` with `Retry-After`): outside
    /// its transfer window, say. Nothing failed.
    #[error("{message}")]
    Waiting {
        message: String,
        retry_after: std::time::Duration,
    },
    #[error("digest mismatch: downloaded bytes have {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("size mismatch: downloaded {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("download too slow: {received} bytes in {seconds} s, below the minimum of {min} bytes/s (--min-download-rate); it resumes at the next attempt")]
    TooSlow {
        received: u64,
        seconds: u64,
        min: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The slowest a download may go: at least `bytes_per_second` over every
/// `window` (or what is left of the blob, if less), else it is given up —
/// TUF's defence against slow retrieval, where a mirror trickles (or stalls)
/// to keep an endpoint from ever getting its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinRate {
    pub bytes_per_second: u64,
    pub window: Duration,
}

impl MinRate {
    /// 256 bytes a second over each minute: far below any real link (a
    /// relay's bandwidth limit shared by a thousand agents included).
    pub const DEFAULT: Self = Self {
        bytes_per_second: 256,
        window: Duration::from_secs(60),
    };

    /// What a download that had `remaining` bytes to go at the start of a
    /// window must receive in it.
    fn needed(&self, remaining: u64) -> u64 {
        self.bytes_per_second
            .saturating_mul(self.window.as_secs().max(1))
            .min(remaining)
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    min_rate: MinRate,
    token: Option<String>,
    /// When `token` was set (seconds since the Unix epoch).
    token_since: u64,
    /// The release every request says it comes from.
    release: String,
}

impl Client {
    pub fn new(base: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        // A stalled connection fails instead of hanging; long-polls wait at most MAX_WAIT_SECONDS.
        let http = caravan_net::client(ca_file, Duration::from_secs(MAX_WAIT_SECONDS + 30))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            min_rate: MinRate::DEFAULT,
            token: None,
            token_since: 0,
            release: caravan_api::RELEASE.to_string(),
        })
    }

    /// Says `release` instead of the agent's own (`--claim-release`).
    pub fn with_release(self, release: String) -> Self {
        Self { release, ..self }
    }

    /// Gives up downloads slower than `min_rate`.
    pub fn with_min_rate(self, min_rate: MinRate) -> Self {
        Self { min_rate, ..self }
    }

    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
        self.token_since = caravan_net::agent_tokens::unix_now();
    }

    /// Whether the agent's credential is two thirds through the life it had
    /// left when it was set, so it is time to renew it (before the relay
    /// refuses it).
    pub fn renewal_due(&self) -> bool {
        let Some(expires) = self
            .token
            .as_deref()
            .and_then(caravan_net::agent_tokens::expiry)
        else {
            return false;
        };
        let life = expires.saturating_sub(self.token_since);
        caravan_net::agent_tokens::unix_now() >= expires.saturating_sub(life / 3)
    }

    /// Sends `req` with the agent's credential.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        self.send_as(req, url, self.token.as_deref()).await
    }

    /// Sends `req` with `bearer` (if any) as its only credential.
    async fn send_as(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
        bearer: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        // Every request says which release sent it (the relay and the
        // controller refuse one outside their window, saying why).
        let req = req.header(caravan_api::skew::VERSION_HEADER, &self.release);
        let req = match bearer {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let res = req.send().await.map_err(|source| ClientError::Request {
            url: url.to_string(),
            source,
        })?;
        let status = res.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(res);
        }
        let retry_after = res
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let message = caravan_net::error_message(res).await;
        if let (StatusCode::SERVICE_UNAVAILABLE, Some(secs)) = (status, retry_after) {
            return Err(ClientError::Waiting {
                message,
                retry_after: std::time::Duration::from_secs(secs),
            });
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized(message));
        }
        if status == StatusCode::FORBIDDEN {
            return Err(ClientError::Forbidden(message));
        }
        if status == StatusCode::UPGRADE_REQUIRED {
            return Err(ClientError::Skew(message));
        }
        if status == StatusCode::GONE {
            return Err(ClientError::Gone(message));
        }
        Err(ClientError::Status { status, message })
    }

    pub async fn enroll(
        &self,
        bootstrap_token: &str,
        req: &EnrollRequest,
    ) -> Result<EnrollResponse, ClientError> {
        self.post_small(paths::ENROLL, req, Some(bootstrap_token))
            .await
    }

    /// A new credential for proof of the agent's key.
    pub async fn renew(&self, req: &RenewRequest) -> Result<EnrollResponse, ClientError> {
        self.post_small(paths::RENEW, req, None).await
    }

    /// POSTs `body` as JSON to `path` with `bearer` (not the agent's
    /// credential) and reads a small JSON answer.
    async fn post_small<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        bearer: Option<&str>,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = self
            .http
            .post(&url)
            .json(body)
            .timeout(Duration::from_secs(60));
        let res = self.send_as(req, &url, bearer).await?;
        caravan_net::body::json_capped(res, MAX_SMALL_ANSWER_BYTES)
            .await
            .map_err(|source| ClientError::Body { url, error: source })
    }

    /// The controller's roots of trust, oldest first, as the relay has them.
    pub async fn roots(&self) -> Result<Vec<Envelope>, ClientError> {
        let url = format!("{}{}", self.base, paths::ROOTS);
        let res = self
            .send(self.http.get(&url).timeout(Duration::from_secs(60)), &url)
            .await?;
        caravan_net::body::json_capped(res, MAX_SMALL_ANSWER_BYTES)
            .await
            .map_err(|source| ClientError::Body { url, error: source })
    }

    /// Long-polls the agent's signed desired state (and the assignment
    /// lists it names); `Ok(None)` when unchanged.
    pub async fn desired(
        &self,
        etag: Option<&str>,
        wait: u64,
    ) -> Result<Option<(String, AgentServed)>, ClientError> {
        let url = format!("{}{}", self.base, paths::poll(paths::DESIRED, wait));
        let res = self
            .send(
                caravan_net::poll_request(&self.http, &url, etag, wait),
                &url,
            )
            .await?;
        caravan_net::poll_answer(res, MAX_AGENT_DESIRED_BYTES)
            .await
            .map_err(|source| ClientError::Body { url, error: source })
    }

    /// Sends a signed report (`StateDir::sign_report`).
    pub async fn report(&self, report: &Envelope) -> Result<(), ClientError> {
        let url = format!("{}{}", self.base, paths::REPORT);
        self.send(
            self.http
                .post(&url)
                .json(report)
                .timeout(Duration::from_secs(30)),
            &url,
        )
        .await?;
        Ok(())
    }

    /// Downloads blob `digest` of `size` bytes into `partial`, resuming what
    /// is there, calling `progress` with the bytes received so far, and
    /// verifies size and digest. The file is deleted when verification fails.
    pub async fn download(
        &self,
        digest: &Digest,
        size: u64,
        partial: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<(), ClientError> {
        let io = |source| ClientError::Io {
            path: partial.display().to_string(),
            source,
        };
        let (mut hasher, mut offset) = caravan_net::hash_partial(partial).await.map_err(io)?;
        if offset < size || size == 0 {
            let url = format!("{}{}", self.base, paths::blob(digest));
            let mut req = self.http.get(&url);
            if offset > 0 {
                // If-Range: resume only if it is still the same blob.
                req = req
                    .header(header::RANGE, format!("bytes={offset}-"))
                    .header(header::IF_RANGE, digest.etag());
            }
            let res = self.send(req, &url).await?;
            let resumed = res.status() == StatusCode::PARTIAL_CONTENT;
            if !resumed {
                hasher = Sha256::new();
                offset = 0;
            }
            let mut file = caravan_net::open_partial(partial, resumed)
                .await
                .map_err(io)?;
            let mut body = res.bytes_stream();
            let mut window_end = tokio::time::Instant::now() + self.min_rate.window;
            let mut window_start = offset;
            loop {
                match tokio::time::timeout_at(window_end, body.next()).await {
                    Ok(None) => break,
                    Ok(Some(chunk)) => {
                        let chunk = chunk.map_err(|source| ClientError::Request {
                            url: url.clone(),
                            source,
                        })?;
                        offset += chunk.len() as u64;
                        if offset > size {
                            break;
                        }
                        hasher.update(&chunk);
                        file.write_all(&chunk).await.map_err(io)?;
                        progress(offset);
                        if crate::failpoint::armed("downloading") && offset * 2 >= size {
                            // Half of it on disk, then dead.
                            file.sync_all().await.map_err(io)?;
                            crate::failpoint::hit("downloading");
                        }
                    }
                    // The window is over with nothing more received.
                    Err(_) => {}
                }
                if tokio::time::Instant::now() >= window_end {
                    let received = offset - window_start;
                    if received < self.min_rate.needed(size.saturating_sub(window_start)) {
                        // What came is good: kept, to resume from.
                        file.sync_all().await.map_err(io)?;
                        return Err(ClientError::TooSlow {
                            received,
                            seconds: self.min_rate.window.as_secs(),
                            min: self.min_rate.bytes_per_second,
                        });
                    }
                    window_end = tokio::time::Instant::now() + self.min_rate.window;
                    window_start = offset;
                }
            }
            file.sync_all().await.map_err(io)?;
        }
        let result = if offset != size {
            Err(ClientError::SizeMismatch {
                expected: size,
                actual: offset,
            })
        } else {
            let actual = Digest::from_hasher(hasher);
            if actual == *digest {
                Ok(())
            } else {
                Err(ClientError::DigestMismatch {
                    expected: *digest,
                    actual,
                })
            }
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(partial).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_renewed_two_thirds_through_its_life() {
        let now = caravan_net::agent_tokens::unix_now();
        let mut client = Client::new("https://relay", None).unwrap();
        assert!(!client.renewal_due(), "no credential, nothing to renew");
        client.set_token(Some(format!("desk/{}/00", now + 3600)));
        assert!(!client.renewal_due(), "an hour to go");
        client.token_since = now - 2000;
        assert!(!client.renewal_due(), "two thirds of 5600 s not gone");
        client.token_since = now - 7300;
        assert!(client.renewal_due(), "over two thirds of 10900 s gone");
        client.set_token(Some(format!("desk/{}/00", now - 1)));
        assert!(client.renewal_due(), "expired");
        client.set_token(Some("relay:branch/0/00".into()));
        assert!(!client.renewal_due(), "a credential that never expires");
    }

    /// A server on loopback that answers one request with `answer` (a
    /// whole HTTP response), and the head of that request, lowercased.
    async fn answering(answer: &'static str) -> (Client, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client =
            Client::new(&format!("http://{}", listener.local_addr().unwrap()), None).unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        (client, server)
    }

    #[tokio::test]
    async fn every_request_says_which_release_sent_it() {
        let (client, server) = answering(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
             content-length: 2\r\nconnection: close\r\n\r\n[]",
        )
        .await;
        assert!(client.roots().await.unwrap().is_empty());
        let head = server.await.unwrap();
        let said = format!(
            "{}: {}\r\n",
            caravan_api::skew::VERSION_HEADER,
            caravan_api::RELEASE
        );
        assert!(head.contains(&said), "{head}");
        // Told to say another (`--claim-release`), it says that.
        let (client, server) = answering(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
             content-length: 2\r\nconnection: close\r\n\r\n[]",
        )
        .await;
        let client = client.with_release("0.0.7".into());
        client.roots().await.unwrap();
        let head = server.await.unwrap();
        assert!(head.contains("caravan-version: 0.0.7\r\n"), "{head}");
    }

    #[tokio::test]
    async fn a_refused_release_is_told_apart_from_other_refusals() {
        let (client, _server) = answering(
            "HTTP/1.1 426 Upgrade Required\r\ncontent-type: application/json\r\n\
             content-length: 22\r\nconnection: close\r\n\r\n{\"error\":\"upgrade it\"}",
        )
        .await;
        match client.roots().await {
            Err(ClientError::Skew(message)) => assert_eq!(message, "upgrade it"),
            other => panic!("{:?}", other.map(|r| r.len()).map_err(|e| e.to_string())),
        }
    }

    #[test]
    fn a_window_needs_its_rate_or_the_rest_of_the_blob() {
        let rate = MinRate {
            bytes_per_second: 100,
            window: Duration::from_secs(10),
        };
        assert_eq!(rate.needed(1 << 20), 1000);
        assert_eq!(rate.needed(10), 10);
        assert_eq!(rate.needed(0), 0);
    }
}
