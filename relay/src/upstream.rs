//! The relay's client of the controller's distribution API.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use caravan_api::{
    wire::{
        paths, EnrollForward, Envelope, RelayStats, SiteDesired, SiteEnroll,
        MAX_SITE_DESIRED_BYTES, MAX_SMALL_ANSWER_BYTES,
    },
    Digest,
};
use caravan_net::Backoff;
use reqwest::{header, StatusCode};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream request to {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream answer from {url}: {error}")]
    Body {
        url: String,
        error: caravan_net::body::BodyError,
    },
    #[error("upstream {url} answered {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
}

impl UpstreamError {
    /// The HTTP status to pass on to an agent for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Status { status, .. } if status.is_client_error() => *status,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

#[derive(Clone)]
pub struct Upstream {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The release the controller said it is of in its last desired state.
    controller: Arc<Mutex<Option<Arc<str>>>>,
    /// The release every request says it comes from.
    release: String,
}

impl Upstream {
    pub fn new(base: &str, token: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        // A stalled connection fails instead of hanging (long-polls answer within 30 s).
        let http = caravan_net::client(ca_file, Duration::from_secs(90))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            controller: Arc::default(),
            release: caravan_api::RELEASE.to_string(),
        })
    }

    /// Says `release` instead of the relay's own (`--claim-release`).
    pub fn with_release(self, release: &str) -> Self {
        Self {
            release: release.to_string(),
            ..self
        }
    }

    /// The release of the controller, as its last desired state said (none
    /// before the first, or if it said none that can be read).
    pub fn controller_release(&self) -> Option<Arc<str>> {
        self.controller.lock().expect("lock poisoned").clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let res = req
            .bearer_auth(&self.token)
            .header(caravan_api::skew::VERSION_HEADER, &self.release)
            .send()
            .await
            .map_err(|source| UpstreamError::Request {
                url: url.to_string(),
                source,
            })?;
        if res.status().is_success()
            || res.status() == StatusCode::NOT_MODIFIED
            || res.status() == StatusCode::PARTIAL_CONTENT
        {
            return Ok(res);
        }
        let status = res.status();
        let message = caravan_net::error_message(res).await;
        Err(UpstreamError::Status {
            url: url.to_string(),
            status,
            message,
        })
    }

    /// Long-polls the site's desired state, taking answers of changes since
    /// `etag`. `Ok(None)`: unchanged.
    pub async fn desired(
        &self,
        etag: Option<&str>,
        wait: u64,
    ) -> Result<Option<(String, SiteDesired)>, UpstreamError> {
        let url = self.url(&paths::site_desired_poll(wait));
        let res = self
            .send(
                caravan_net::poll_request(&self.http, &url, etag, wait),
                &url,
            )
            .await?;
        // Only the controller answers this (a parent relay serves blobs).
        let release = caravan_net::said_release(res.headers()).map(Arc::from);
        *self.controller.lock().expect("lock poisoned") = release;
        caravan_net::poll_answer(res, MAX_SITE_DESIRED_BYTES)
            .await
            .map_err(|source| UpstreamError::Body { url, error: source })
    }

    pub async fn enroll(&self, req: &SiteEnroll) -> Result<EnrollForward, UpstreamError> {
        let url = self.url(paths::SITE_ENROLL);
        let res = self
            .send(
                self.http
                    .post(&url)
                    .json(req)
                    .timeout(Duration::from_secs(30)),
                &url,
            )
            .await?;
        caravan_net::body::json_capped(res, MAX_SMALL_ANSWER_BYTES)
            .await
            .map_err(|source| UpstreamError::Body { url, error: source })
    }

    pub async fn stats(&self, stats: &RelayStats) -> Result<(), UpstreamError> {
        let url = self.url(paths::SITE_STATS);
        self.send(
            self.http
                .post(&url)
                .json(stats)
                .timeout(Duration::from_secs(30)),
            &url,
        )
        .await?;
        Ok(())
    }

    pub async fn reports(&self, batch: &[Envelope]) -> Result<(), UpstreamError> {
        let url = self.url(paths::SITE_REPORTS);
        self.send(
            self.http
                .post(&url)
                .json(batch)
                .timeout(Duration::from_secs(60)),
            &url,
        )
        .await?;
        Ok(())
    }

    /// Starts a download of a blob, from `offset` on.
    pub async fn blob(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self.url(&paths::blob(digest));
        let mut req = self.http.get(&url);
        if offset > 0 {
            // If-Range on the digest (a strong validator): resume only the same blob.
            req = req
                .header(header::RANGE, format!("bytes={offset}-"))
                .header(header::IF_RANGE, digest.etag());
        }
        self.send(req, &url).await
    }
}

/// Most reports sent upstream in one request.
pub const MAX_REPORT_BATCH: usize = 500;

/// Most reports waiting to be passed up by default (`--report-queue`);
/// agents beyond it are told to report again later, so a flood of reports
/// cannot exhaust the relay's memory.
pub const REPORT_QUEUE: usize = 10_000;

/// Passes agent reports up in batches until every sender is gone (the
/// agent API has stopped), so what agents reported before shutdown still
/// goes up while the relay drains. Only the latest report of each agent is
/// kept while the controller is unreachable, so memory stays bounded.
pub async fn forward_reports(
    upstream: Upstream,
    mut rx: tokio::sync::mpsc::Receiver<(String, Envelope)>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut pending: HashMap<String, Envelope> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some((agent, r)) => {
                    pending.insert(agent, r);
                }
                None => return Ok(()),
            }
        }
        // Gather what else arrived within a short window into the same batch.
        let window = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(window);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some((agent, r)) => { pending.insert(agent, r); }
                    None => break,
                },
                () = &mut window => break,
            }
        }
        let (agents, batch): (Vec<String>, Vec<Envelope>) = pending
            .iter()
            .take(MAX_REPORT_BATCH)
            .map(|(a, r)| (a.clone(), r.clone()))
            .unzip();
        match upstream.reports(&batch).await {
            Ok(()) => {
                for a in &agents {
                    pending.remove(a);
                }
                backoff.reset();
            }
            // The controller will never take this batch (too big, malformed):
            // retrying cannot help, and must not block the reports behind it.
            Err(e @ UpstreamError::Status { status, .. }) if status.is_client_error() => {
                tracing::error!(error = %e, agents = batch.len(), "reports refused by upstream; dropped");
                for a in &agents {
                    pending.remove(a);
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %caravan_net::Chain(&e), agents = batch.len(), retry_in = ?delay, "passing reports upstream failed");
                // Draining with the controller away: what is pending is lost.
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}
