//! The server half: serving, JSON errors, bearer tokens, long-polls, blobs.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    body::Body,
    extract::{FromRequestParts, Query, Request},
    http::{header, request::Parts, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use caravan_api::{
    skew,
    wire::{ErrorBody, MAX_WAIT_SECONDS, WAIT_PARAM},
    Digest,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// How long open connections (long-polls, downloads) get to finish once
/// shutdown is asked for.
const CONNECTION_GRACE: Duration = Duration::from_secs(5);

/// TLS a server holds in memory (certificates it was issued rather than
/// given as files), which can be replaced while it serves
/// (`reload_from_pem`).
pub type TlsConfig = axum_server::tls_rustls::RustlsConfig;

/// A [`TlsConfig`] from a PEM certificate chain and key.
pub async fn tls_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<TlsConfig> {
    // Fails only if a provider is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    TlsConfig::from_pem(cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec())
        .await
        .context("loading a TLS certificate and key")
}

mod conn;

pub use conn::{FileAnswer, Parked, Shortcuts};

/// Serves `app` as `args` say (address, HTTPS with rustls when a
/// certificate and key are given, header read timeout) until `shutdown`
/// (then connections get a few seconds to finish) or the server fails.
pub async fn serve<const PORT: u16>(
    args: &crate::args::ServeArgs<PORT>,
    app: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(args, app, shutdown, None, None).await
}

/// [`serve`], with HTTPS from `own_tls` when `args` name no certificate,
/// and the answers `shortcuts` gives outside hyper (none: hyper serves
/// every connection whole).
pub async fn serve_with<const PORT: u16>(
    args: &crate::args::ServeArgs<PORT>,
    app: axum::Router,
    shutdown: CancellationToken,
    own_tls: Option<TlsConfig>,
    shortcuts: Option<Arc<dyn Shortcuts>>,
) -> anyhow::Result<()> {
    let addr = args.listen;
    let tls = match (args.tls(), own_tls) {
        (Some((cert, key)), _) => {
            // Fails only if a provider is installed already, which is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = TlsConfig::from_pem_file(cert, key).await.with_context(|| {
                format!(
                    "loading TLS certificate {} and key {}",
                    cert.display(),
                    key.display()
                )
            })?;
            Some(config)
        }
        (None, own) => own,
    };
    let open_files = raise_open_files_limit();
    let max_connections = match args.max_connections {
        0 => open_files.saturating_sub(FD_RESERVE).max(1),
        n => n,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(
        max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let listener = listen(addr).with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), max_connections, "listening");
    // A body that stalls is cut off (uploads may take long, but not stall).
    let body_idle = Duration::from_secs(args.body_idle_timeout_seconds.max(1));
    let app = app
        .layer(axum::middleware::map_request(
            move |req: axum::extract::Request| async move {
                req.map(|b| {
                    axum::body::Body::new(tower_http::timeout::TimeoutBody::new(body_idle, b))
                })
            },
        ))
        // Every answer says which release sent it (a relay learns its
        // controller's release from it, to judge its agents by).
        .layer(axum::middleware::map_response(
            |mut res: Response| async move {
                res.headers_mut().insert(
                    skew::VERSION_HEADER,
                    header::HeaderValue::from_static(caravan_api::RELEASE),
                );
                res
            },
        ));
    let served = conn::Served {
        app,
        shortcuts,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds.max(1)),
        shutdown: shutdown.clone(),
    };
    let tls = tls.map(Acceptor::new);
    let connections = tokio_util::task::TaskTracker::new();
    // Connections still open when the grace after shutdown is over.
    let cut = CancellationToken::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        // One more than the cap is closed as it arrives (its client sees
        // the connection reset and retries later), instead of the server
        // running out of descriptors.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("connection refused: at the connection cap");
            continue;
        };
        let (served, tls, cut) = (served.clone(), tls.clone(), cut.clone());
        connections.spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = connection(stream, tls, served) => {}
                () = cut.cancelled() => {}
            }
        });
    }
    connections.close();
    if tokio::time::timeout(CONNECTION_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::info!(open = connections.len(), "connections cut off at shutdown");
        cut.cancel();
        connections.wait().await;
    }
    Ok(())
}

/// Waits after a failed `accept` if the server ran out of something (its
/// connections close in time); a connection that failed alone (reset
/// before it was accepted) is no reason to.
async fn accept_failed(e: &std::io::Error) {
    use rustix::io::Errno;
    let out_of = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()));
    if out_of {
        tracing::warn!(error = %e, "accepting connections");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(error = %e, "accepting a connection");
    }
}

/// Serves one connection, over TLS if `tls`.
async fn connection(stream: tokio::net::TcpStream, tls: Option<Acceptor>, served: conn::Served) {
    match tls {
        None => conn::serve(stream, served).await,
        // Boxed: the task of a plain connection does not carry the state of
        // a TLS one.
        Some(tls) => Box::pin(tls_connection(stream, tls, served)).await,
    }
}

type Acceptor = axum_server::tls_rustls::RustlsAcceptor;

async fn tls_connection(stream: tokio::net::TcpStream, tls: Acceptor, served: conn::Served) {
    use axum_server::accept::Accept as _;
    let stream = match tls.accept(stream, ()).await {
        Ok((stream, ())) => stream,
        Err(e) => return tracing::debug!(error = %e, "TLS handshake failed"),
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        conn::hyper_whole(stream, Default::default(), &served).await
    } else {
        conn::serve(stream, served).await
    }
}

/// A connection asks for the next chunk of a response when less than
/// 64 KiB of the last is left to write (hyper's default is 400 KiB), so a
/// thousand downloads do not hold hundreds of MiB.
const MAX_BUF: usize = 64 << 10;

/// Connections waiting to be accepted: enough for thousands of agents
/// reconnecting at once after a restart.
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Every long-polling agent holds a connection, so a server may need many
/// more descriptors than the usual soft limit of 1024: raise it to the hard
/// limit, as Go's runtime does. Returns the limit in force.
fn raise_open_files_limit() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = raised,
            Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
        }
    }
    limit
        .current
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Descriptors kept for the server's own use (cache files, upstream
/// connections, logs) when the connection cap follows the open-files limit.
const FD_RESERVE: usize = 128;

/// An error answer: status code and a message that names the problem,
/// sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn new(code: StatusCode, msg: impl Into<String>) -> Self {
        Self(code, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// `Ok` if the sender of `headers` (a `component` of the release its
/// [`skew::VERSION_HEADER`] says) is within `controller`'s window; else
/// `426 Upgrade Required`, naming both releases and what to upgrade.
pub fn within_window(
    controller: &str,
    component: skew::Component,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    skew::check(controller, component, crate::said_release(headers))
        .map_err(|s| ApiError::new(StatusCode::UPGRADE_REQUIRED, s.to_string()))
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The long-polls open per client (an agent, a site's relay), capped, so
/// one client (or a stolen token) cannot hold thousands of connections.
pub struct PollSlots {
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    max: usize,
}

/// One open long-poll; its slot is given back when dropped.
pub struct PollSlot {
    slots: std::sync::Arc<PollSlots>,
    key: String,
}

impl PollSlots {
    pub fn new(max: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            open: Default::default(),
            max,
        })
    }

    /// A slot for `key`, or `429 Too Many Requests` if it has all of them.
    pub fn take(self: &std::sync::Arc<Self>, key: &str) -> Result<PollSlot, ApiError> {
        let mut open = self.open.lock().expect("lock poisoned");
        let n = open.entry(key.to_string()).or_default();
        if *n >= self.max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{key} has {} long-polls open already", self.max),
            ));
        }
        *n += 1;
        Ok(PollSlot {
            slots: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("lock poisoned");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// How long a long-poll may wait: the `?wait=<seconds>` of the request
/// (none: answer at once), at most [`MAX_WAIT_SECONDS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wait(pub Duration);

impl<S: Send + Sync> FromRequestParts<S> for Wait {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Self::of(parts)
    }
}

impl Wait {
    /// The wait a request asks for: none once it waited [`Parked`].
    pub fn of(parts: &Parts) -> Result<Self, ApiError> {
        if parts.extensions.get::<Parked>().is_some() {
            return Ok(Self::default());
        }
        let Query(query) =
            Query::<std::collections::HashMap<String, String>>::try_from_uri(&parts.uri)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        let seconds = match query.get(WAIT_PARAM) {
            None => 0,
            Some(v) => v.parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{WAIT_PARAM}={v:?} is not a number of seconds"),
                )
            })?,
        };
        Ok(Self(Duration::from_secs(seconds.min(MAX_WAIT_SECONDS))))
    }
}

/// Answers a long-poll for a document published through `rx`: at once when
/// it differs from the request's `If-None-Match`, else as soon as it changes,
/// else `304 Not Modified` after `wait`. `answer` is given the current value
/// and the ETag the client holds, and returns `None` when the client is up
/// to date, else the ETag and body to answer with (which may depend on what
/// the client holds), or an error to answer.
pub async fn long_poll<T: Clone>(
    mut rx: watch::Receiver<T>,
    headers: &HeaderMap,
    Wait(wait): Wait,
    mut answer: impl FnMut(&T, Option<&str>) -> Result<Option<(String, bytes::Bytes)>, ApiError>,
) -> Result<Response, ApiError> {
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // A copy (an `Arc`): the channel is not held while answering.
        let value = rx.borrow_and_update().clone();
        if let Some((etag, body)) = answer(&value, known.as_deref())? {
            return Ok((
                [
                    (header::ETAG, etag),
                    (header::CONTENT_TYPE, "application/json".into()),
                ],
                body,
            )
                .into_response());
        }
        // Nothing to wait for: answer at once, not on the timer's next tick.
        let changed = tokio::time::Instant::now() < deadline
            && matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            );
        if !changed {
            let etag = known.unwrap_or_default();
            return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
        }
    }
}

/// [`long_poll`]'s answer for a document whose body does not depend on what
/// the client holds: `body` is made only if the client's is not `etag`.
pub fn changed(
    etag: &str,
    body: impl FnOnce() -> bytes::Bytes,
    known: Option<&str>,
) -> Option<(String, bytes::Bytes)> {
    (known != Some(etag)).then(|| (etag.to_string(), body()))
}

/// Bytes the blob responses of a server may hold in memory together.
const BLOB_BUFFERS: usize = 32 << 20;

/// The size of the reads for a blob response while `serving` responses
/// (this one included) run: 256 KiB, a quarter of the syscalls and copies of
/// the usual 64 KiB, down to 16 KiB as they grow in number, so their buffers
/// stay within [`BLOB_BUFFERS`].
pub fn blob_chunk(serving: usize) -> usize {
    (BLOB_BUFFERS / serving.max(1)).clamp(16 << 10, 256 << 10)
}

/// Serves a content-addressed blob file in reads of `chunk` bytes: `Range`
/// honoured, the digest as its (strong) ETag. Returns the response and the
/// number of body bytes.
pub async fn serve_blob(
    path: &Path,
    digest: &Digest,
    chunk: usize,
    mut req: Request,
) -> Result<(Response, u64), ApiError> {
    let etag = digest.etag();
    // If-Range with another validator: the client's part is of something
    // else, so it gets the whole blob rather than a range to splice.
    if req
        .headers()
        .get(header::IF_RANGE)
        .is_some_and(|v| v.as_bytes() != etag.as_bytes())
    {
        req.headers_mut().remove(header::RANGE);
    }
    let mut res = tower_http::services::ServeFile::new(path)
        .with_buf_chunk_size(chunk)
        .oneshot(req)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Body::new);
    res.headers_mut().insert(
        header::ETAG,
        etag.parse().expect("hex is a valid header value"),
    );
    let len = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    Ok((res, len))
}

/// Serves a content-addressed blob of `len` bytes, with `body(range)`
/// giving the bytes of `range` (perhaps as they arrive), as [`blob_head`]
/// says. Returns the response and the number of body bytes.
pub fn serve_stream(
    digest: &Digest,
    len: u64,
    headers: &HeaderMap,
    body: impl FnOnce(std::ops::Range<u64>) -> Body,
) -> (Response, u64) {
    let (head, range) = blob_head(digest, len, headers);
    let n = range.end - range.start;
    let body = match head.status() {
        StatusCode::RANGE_NOT_SATISFIABLE => Body::empty(),
        _ => body(range),
    };
    (head.map(|()| body), n)
}

/// The head of the answer to a request for a content-addressed blob of
/// `len` bytes, and the range of the blob its body carries. A single range
/// (`bytes=A-B`, `bytes=A-`, `bytes=-N`) is honoured under the same
/// If-Range rule as in [`serve_blob`]; anything else gets the whole blob.
pub fn blob_head(
    digest: &Digest,
    len: u64,
    headers: &HeaderMap,
) -> (axum::http::Response<()>, std::ops::Range<u64>) {
    let etag = digest.etag();
    let same_blob = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let range = headers
        .get(header::RANGE)
        .filter(|_| same_blob)
        .and_then(|v| v.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
        .and_then(
            |(a, b)| match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
                (Some(a), None) if b.is_empty() => Some(a..len),
                (Some(a), Some(b)) if a <= b => Some(a..len.min(b + 1)),
                (None, Some(n)) if a.is_empty() => Some(len.saturating_sub(n)..len),
                _ => None,
            },
        );
    let mut res = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let range = match range {
        Some(r) if r.start >= len => {
            let res = res
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(())
                .expect("valid response");
            return (res, 0..0);
        }
        Some(r) => {
            res = res.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{len}", r.start, r.end - 1),
            );
            r
        }
        None => 0..len,
    };
    let res = res
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .body(())
        .expect("valid response");
    (res, range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> Digest {
        Digest::of(b"abc")
    }

    async fn get(path: &Path, headers: &[(&str, &str)]) -> (StatusCode, u64) {
        let mut req = Request::builder().uri("/blob");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (res, len) = serve_blob(path, &blob(), 1024, req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        (res.status(), len)
    }

    #[tokio::test]
    async fn ranges_are_served_only_to_a_client_resuming_the_same_blob() {
        let dir = std::env::temp_dir().join(format!("caravan-net-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        assert_eq!(get(&path, &[]).await, (StatusCode::OK, 100));
        assert_eq!(
            get(&path, &[("range", "bytes=40-")]).await,
            (StatusCode::PARTIAL_CONTENT, 60)
        );
        assert_eq!(
            get(
                &path,
                &[("range", "bytes=40-"), ("if-range", &blob().etag())]
            )
            .await,
            (StatusCode::PARTIAL_CONTENT, 60)
        );
        assert_eq!(
            get(&path, &[("range", "bytes=40-"), ("if-range", "\"other\"")]).await,
            (StatusCode::OK, 100)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_streamed_blob_is_resumed_from_the_asked_byte_only_if_it_is_the_same_blob() {
        let ask = |headers: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let mut from = None;
            let (res, len) = serve_stream(&blob(), 100, &map, |r| {
                from = Some(r.start);
                Body::empty()
            });
            let range = res
                .headers()
                .get(header::CONTENT_RANGE)
                .map(|v| v.to_str().unwrap().to_string());
            (res.status(), len, from, range)
        };
        assert_eq!(ask(&[]), (StatusCode::OK, 100, Some(0), None));
        assert_eq!(
            ask(&[("range", "bytes=10-19")]),
            (
                StatusCode::PARTIAL_CONTENT,
                10,
                Some(10),
                Some("bytes 10-19/100".into())
            )
        );
        assert_eq!(
            ask(&[("range", "bytes=-30")]),
            (
                StatusCode::PARTIAL_CONTENT,
                30,
                Some(70),
                Some("bytes 70-99/100".into())
            )
        );
        assert_eq!(
            ask(&[("range", "bytes=40-"), ("if-range", &blob().etag())]),
            (
                StatusCode::PARTIAL_CONTENT,
                60,
                Some(40),
                Some("bytes 40-99/100".into())
            )
        );
        assert_eq!(
            ask(&[("range", "bytes=40-"), ("if-range", "\"other\"")]),
            (StatusCode::OK, 100, Some(0), None)
        );
        assert_eq!(
            ask(&[("range", "bytes=100-")]),
            (
                StatusCode::RANGE_NOT_SATISFIABLE,
                0,
                None,
                Some("bytes */100".into())
            )
        );
    }

    #[tokio::test]
    async fn a_long_poll_waits_only_as_long_as_asked_and_never_past_the_cap() {
        let wait = |uri: &str| {
            let (mut parts, ()) = axum::http::Request::get(uri).body(()).unwrap().into_parts();
            async move { Wait::from_request_parts(&mut parts, &()).await }
        };
        assert_eq!(wait("/v1/desired").await.unwrap(), Wait(Duration::ZERO));
        assert_eq!(
            wait("/v1/desired?wait=30").await.unwrap(),
            Wait(Duration::from_secs(30))
        );
        assert_eq!(
            wait("/v1/desired?wait=99999").await.unwrap(),
            Wait(Duration::from_secs(MAX_WAIT_SECONDS))
        );
        let e = wait("/v1/desired?wait=soon").await.unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.1.contains("wait=\"soon\""), "{}", e.1);
    }

    #[test]
    fn one_client_holds_at_most_its_share_of_long_polls() {
        let slots = PollSlots::new(2);
        let a = slots.take("agent-a").unwrap();
        let _b = slots.take("agent-a").unwrap();
        let e = slots.take("agent-a").err().unwrap();
        assert_eq!(e.0, StatusCode::TOO_MANY_REQUESTS);
        assert!(slots.take("agent-b").is_ok(), "others are not held up");
        drop(a);
        assert!(
            slots.take("agent-a").is_ok(),
            "a slot comes back when a poll ends"
        );
    }

    /// A server on a free loopback port with `header` and `body` idle
    /// timeouts (seconds) and a connection cap.
    async fn start(
        header: u64,
        body: u64,
        max_connections: usize,
    ) -> (
        u16,
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args = crate::args::ServeArgs::<0> {
            listen: ([127, 0, 0, 1], port).into(),
            tls_cert_file: None,
            tls_key_file: None,
            header_read_timeout_seconds: header,
            body_idle_timeout_seconds: body,
            max_connections,
        };
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|| async { "ok" }).post(|body: String| async move { body }),
        );
        let shutdown = CancellationToken::new();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { serve(&args, app, shutdown).await }
        });
        // Up once it accepts a connection.
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (port, shutdown, server)
    }

    struct NoShortcuts;
    impl Shortcuts for NoShortcuts {}

    #[tokio::test]
    async fn a_waiting_plain_connection_is_a_small_task() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let served = conn::Served {
            app: axum::Router::new(),
            shortcuts: Some(Arc::new(NoShortcuts)),
            header_read_timeout: Duration::from_secs(5),
            shutdown: CancellationToken::new(),
        };
        // What hyper, a file answer or TLS need while they run is boxed, not
        // carried by every connection that waits.
        let size = std::mem::size_of_val(&connection(stream, None, served));
        assert!(size <= 1024, "a plain connection's task is {size} bytes");
    }

    /// What the server sends on `conn` before it closes or 10 s pass.
    async fn answer(conn: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the server neither answered nor hung up")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Sends `bytes` on a new connection; how long until the server
    /// answered or hung up, and what it sent.
    async fn send_and_wait(port: u16, bytes: &[u8]) -> (Duration, String) {
        use tokio::io::AsyncWriteExt;
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        conn.write_all(bytes).await.unwrap();
        let start = std::time::Instant::now();
        let answer = answer(&mut conn).await;
        (start.elapsed(), answer)
    }

    #[tokio::test]
    async fn a_client_that_dribbles_its_headers_is_disconnected() {
        let (port, shutdown, server) = start(1, 60, 0).await;
        // The rest of the headers never comes: the server hangs up.
        let (took, answer) = send_and_wait(port, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        assert!(took >= Duration::from_millis(900));
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_request_body_that_stalls_is_cut_off() {
        let (port, shutdown, server) = start(30, 1, 0).await;
        // Ninety bytes never come: the body is given up on, not waited for.
        let request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
        let (took, answer) = send_and_wait(port, request).await;
        assert!(took >= Duration::from_millis(900));
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_as_they_arrive() {
        use tokio::io::AsyncWriteExt;
        let (port, shutdown, server) = start(30, 60, 2).await;
        // The connection `start` made to see the server up is gone; let its
        // slot come back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let connect = || tokio::net::TcpStream::connect(("127.0.0.1", port));
        let (mut a, _b) = (connect().await.unwrap(), connect().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = connect().await.unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(
            answer(&mut c).await,
            "",
            "the third connection is closed unanswered"
        );
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(
            answer(&mut a).await.starts_with("HTTP/1.1 200"),
            "those within the cap are served"
        );
        drop(a);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut d = connect().await.unwrap();
        d.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(
            answer(&mut d).await.starts_with("HTTP/1.1 200"),
            "a closed connection frees its slot"
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
