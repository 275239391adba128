//! One HTTP/1.1 connection, a request at a time.
//!
//! Each request's head is read here (with `httparse`, hyper's own parser)
//! and the request is handed to hyper alone: hyper reads exactly its bytes
//! and writes the answer, and the connection comes back for the next
//! request. That leaves room for two answers hyper cannot give cheaply
//! (see [`Shortcuts`]):
//!
//! - a **file** body goes from the page cache to the socket with
//!   `sendfile(2)`, never through userspace (plain connections only: kernel
//!   TLS is not available to hand the encryption to);
//! - a **long-poll** with nothing to answer yet waits here, holding only
//!   its request's bytes, instead of in hyper, whose buffers cost 16 KiB a
//!   connection; it goes to hyper once there is an answer (or its wait is
//!   over), marked [`Parked`] so it is answered at once.
//!
//! Anything this loop does not follow (a chunked or upgraded request, a head
//! it cannot parse, HTTP/1.0, HTTP/2) is handed to hyper together with the
//! rest of the connection, and hyper answers as it would have.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    http::{self, header, request::Parts, HeaderMap, HeaderValue, Method, Response, Version},
    Router,
};
use bytes::{Buf as _, Bytes, BytesMut};
use futures::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// What a server answers itself rather than through hyper. Both are asked
/// about requests without a body only, and may decline (`None`): hyper then
/// answers as usual, errors included.
pub trait Shortcuts: Send + Sync + 'static {
    /// The answer to a `GET` whose body is (a range of) a file. Asked only
    /// on plain connections, where the body is sent with `sendfile(2)`.
    fn file(&self, _req: &Parts) -> Option<FileAnswer> {
        None
    }

    /// For a long-poll with nothing to answer yet: a future that ends once
    /// there is an answer or the wait is over. The request then goes to the
    /// app marked [`Parked`]. A client that goes away meanwhile drops it.
    fn park(&self, _req: &Parts) -> Option<BoxFuture<'static, ()>> {
        None
    }
}

/// An answer whose body is `range` of `file`.
pub struct FileAnswer {
    /// Status and headers (`Content-Length` the length of `range`).
    pub head: Response<()>,
    /// (Shared, perhaps, with other answers: it is read at offsets.)
    pub file: std::sync::Arc<std::fs::File>,
    pub range: std::ops::Range<u64>,
    /// Kept until the body is sent (a cache lease, say).
    pub hold: Box<dyn Send>,
}

/// Marks a long-poll that waited here already (see [`Shortcuts::park`]):
/// the app answers it at once, with `304 Not Modified` if nothing changed.
#[derive(Clone, Copy, Debug)]
pub struct Parked;

/// A connection as this loop uses it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP socket itself, when bytes written to it reach the client as
    /// they are (no TLS), so files can be sent to it with `sendfile(2)`.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Transport for TcpStream {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for tokio_rustls::server::TlsStream<T> {}

/// What the app and the connections need to serve.
#[derive(Clone)]
pub struct Served {
    pub app: Router,
    /// `None`: hyper serves every connection whole, as it would alone
    /// (and notices at once a client that leaves while it waits).
    pub shortcuts: Option<Arc<dyn Shortcuts>>,
    /// A request's head must be in within this long (idle keep-alive
    /// connections included).
    pub header_read_timeout: Duration,
    pub shutdown: CancellationToken,
}

/// The longest request head read here; a longer one goes to hyper with
/// the rest of the connection (which then has no shortcuts), which refuses
/// heads beyond its buffer (64 KiB).
const MAX_HEAD: usize = 16 << 10;
/// Headers a request may have here (hyper's own limit is 100).
const MAX_HEADERS: usize = 64;
/// Bytes read at a time while waiting for a head.
const READ_SIZE: usize = 1024;

/// Serves the HTTP/1.1 connection `io` until it closes (or `shutdown`, at
/// the next request).
pub async fn serve<T: Transport + 'static>(mut io: T, served: Served) {
    let Some(shortcuts) = served.shortcuts.clone() else {
        return Box::pin(hyper_whole(io, BytesMut::new(), &served)).await;
    };
    let mut buf = BytesMut::new();
    loop {
        let head = tokio::select! {
            biased;
            () = served.shutdown.cancelled(), if buf.is_empty() => break,
            head = tokio::time::timeout(served.header_read_timeout, read_head(&mut io, &mut buf)) => head,
        };
        let head = match head {
            Ok(Ok(Some(Next::Request(head)))) => head,
            // Boxed, as hyper's futures and file answers are: a connection's
            // task is only as big as it must be while it waits.
            Ok(Ok(Some(Next::Hyper))) => return Box::pin(hyper_whole(io, buf, &served)).await,
            // Closed, timed out or broken.
            Ok(Ok(None) | Err(_)) | Err(_) => break,
        };
        let plain_get = head.body == 0 && head.parts.method == Method::GET;
        if plain_get && io.socket().is_some() {
            if let Some(answer) = shortcuts.file(&head.parts) {
                buf.advance(head.len);
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                let socket = io.socket().expect("checked above");
                match Box::pin(send_file(socket, answer, head.close)).await {
                    Ok(()) if !head.close => continue,
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "file answer cut off");
                        break;
                    }
                }
            }
        }
        let parked = match head.body == 0 {
            true => shortcuts.park(&head.parts),
            false => None,
        };
        let close = head.close;
        // The request's bytes: head, then its body as far as it is here.
        let here = buf.len().min(head.len.saturating_add(head.body as usize));
        let left = head.body - (here - head.len) as u64;
        drop(head);
        let request = match parked {
            // Kept for long: no bigger than it is.
            Some(_) => {
                let request = Bytes::copy_from_slice(&buf[..here]);
                buf.advance(here);
                request
            }
            None => buf.split_to(here).freeze(),
        };
        if buf.is_empty() {
            // A connection between requests holds no buffer.
            buf = BytesMut::new();
        }
        let parked = match parked {
            None => false,
            Some(wait) => match park(&mut io, &mut buf, wait, &served.shutdown).await {
                Some(()) => true,
                // The client went away.
                None => break,
            },
        };
        match Box::pin(hyper_one(&mut io, request, left, parked, &served)).await {
            Ok(()) if !close => {}
            _ => break,
        }
    }
    let _ = io.shutdown().await;
}

/// What comes next on a connection.
enum Next {
    Request(Box<Head>),
    /// Something for hyper to follow from here on.
    Hyper,
}

/// A request head read here.
struct Head {
    parts: Parts,
    /// Its length in bytes.
    len: usize,
    /// Its body's length (`Content-Length`).
    body: u64,
    /// Whether the client closes the connection after this request.
    close: bool,
}

/// Reads until `buf` starts with a whole request head; `None` once the
/// connection closes between requests.
async fn read_head<T: Transport>(io: &mut T, buf: &mut BytesMut) -> io::Result<Option<Next>> {
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Ok(Some(head)) => return Ok(Some(Next::Request(Box::new(head)))),
                Ok(None) if buf.len() < MAX_HEAD => {}
                _ => return Ok(Some(Next::Hyper)),
            }
        }
        // Wait for bytes before taking memory to read them into: idle
        // connections hold none.
        if let Some(socket) = io.socket() {
            socket.readable().await?;
        }
        buf.reserve(READ_SIZE);
        if io.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// The head at the start of `buf`: `Ok(None)` while incomplete, `Err` for
/// what this loop leaves to hyper.
fn parse(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(drop)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    if req.version != Some(1) {
        return Err(());
    }
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = header::HeaderName::from_bytes(h.name.as_bytes()).map_err(drop)?;
        map.append(name, HeaderValue::from_bytes(h.value).map_err(drop)?);
    }
    let mut parts = http::Request::builder()
        .method(Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(drop)?)
        .uri(req.path.unwrap_or_default())
        .version(Version::HTTP_11)
        .body(())
        .map_err(drop)?
        .into_parts()
        .0;
    parts.headers = map;
    let headers = &parts.headers;
    if headers.contains_key(header::TRANSFER_ENCODING) || headers.contains_key(header::UPGRADE) {
        return Err(());
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let body = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(v), None) => v.to_str().ok().and_then(|v| v.parse().ok()).ok_or(())?,
        (Some(_), Some(_)) => return Err(()),
    };
    let close = asks_to_close(headers);
    Ok(Some(Head {
        parts,
        len,
        body,
        close,
    }))
}

/// Whether `headers` (a request's or an answer's) close the connection
/// after this exchange.
fn asks_to_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// Waits for a parked long-poll's answer (or shutdown). Reads meanwhile, so
/// a client that goes away is noticed (`None`); a byte it sends is kept for
/// its next request.
async fn park<T: Transport>(
    io: &mut T,
    buf: &mut BytesMut,
    mut wait: BoxFuture<'static, ()>,
    shutdown: &CancellationToken,
) -> Option<()> {
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            () = &mut wait => return Some(()),
            () = shutdown.cancelled() => return Some(()),
            read = io.read_buf(buf), if watching => match read {
                Ok(0) | Err(_) => return None,
                // The client's next request, early: kept for it, and the
                // connection no longer read (the wait still ends on time).
                Ok(_) => watching = false,
            },
        }
    }
}

/// Writes `answer` to `socket`: its head, then its body straight from the
/// file.
async fn send_file(socket: &TcpStream, answer: FileAnswer, close: bool) -> io::Result<()> {
    let FileAnswer {
        head,
        file,
        range,
        hold: _hold,
    } = answer;
    let head = encode_head(&head, close);
    // With a body to follow, the head goes out in the body's first packet.
    let flags = match range.is_empty() {
        true => rustix::net::SendFlags::NOSIGNAL,
        false => rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::MORE,
    };
    let mut sent = 0;
    while sent < head.len() {
        sent += socket_io(socket, || rustix::net::send(socket, &head[sent..], flags)).await?;
    }
    let mut offset = range.start;
    while offset < range.end {
        let count = usize::try_from(range.end - offset).unwrap_or(usize::MAX);
        let n = socket_io(socket, || {
            rustix::fs::sendfile(socket, &*file, Some(&mut offset), count)
        })
        .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ended before its answer's length",
            ));
        }
    }
    Ok(())
}

/// Runs `op` on `socket` once it can be written to, until it does not
/// find it full.
async fn socket_io(
    socket: &TcpStream,
    mut op: impl FnMut() -> rustix::io::Result<usize>,
) -> io::Result<usize> {
    loop {
        socket.writable().await?;
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            op().map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// The bytes of a response head, as hyper would write them.
fn encode_head(head: &Response<()>, close: bool) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(256);
    let status = head.status();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in head.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(
        out,
        "date: {}\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Hands one request (`request`: its head and the body as far as read, with
/// `left` body bytes still to come) to hyper. `Ok` if the connection can
/// carry on: hyper read the whole request, answered in full and did not ask
/// to close.
async fn hyper_one<T: Transport>(
    io: &mut T,
    request: Bytes,
    left: u64,
    parked: bool,
    served: &Served,
) -> Result<(), ()> {
    let close = Arc::new(AtomicBool::new(false));
    let service = {
        let (app, close) = (served.app.clone(), Arc::clone(&close));
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            if parked {
                req.extensions_mut().insert(Parked);
            }
            let (app, close) = (app.clone(), Arc::clone(&close));
            async move {
                let res = app.oneshot(req.map(Body::new)).await?;
                if asks_to_close(res.headers()) {
                    close.store(true, Ordering::Relaxed);
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    };
    let mut one = One {
        io,
        prefix: request,
        left,
        whole: false,
    };
    let done = hyper::server::conn::http1::Builder::new()
        // The end of the request's bytes is not the client leaving.
        .half_close(true)
        .max_buf_size(super::MAX_BUF)
        .serve_connection(TokioIo::new(&mut one), service)
        .await;
    match done {
        Ok(()) if one.prefix.is_empty() && one.left == 0 && !close.load(Ordering::Relaxed) => {
            Ok(())
        }
        Ok(()) => Err(()),
        Err(e) => {
            tracing::debug!(error = %e, "connection ended");
            Err(())
        }
    }
}

/// Hands the rest of the connection to hyper (HTTP/1 or HTTP/2), `read`
/// being what was read of it already.
pub async fn hyper_whole<T: Transport + 'static>(io: T, read: BytesMut, served: &Served) {
    let one = One {
        io,
        prefix: read.freeze(),
        left: u64::MAX,
        whole: true,
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(super::MAX_BUF)
        .timer(TokioTimer::new())
        .header_read_timeout(served.header_read_timeout);
    let app = served.app.clone();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(Body::new))
    });
    let conn = builder.serve_connection(TokioIo::new(one), service);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => if let Err(e) = done {
            tracing::debug!(error = %e, "connection ended");
        },
        () = served.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The connection as hyper sees it: `prefix` (bytes read already), then up
/// to `left` more bytes from `io`, then the end (unless `whole`, when hyper
/// owns the connection from here on).
struct One<I> {
    io: I,
    prefix: Bytes,
    left: u64,
    whole: bool,
}

impl<I> One<I> {
    /// `n` bytes of the request were read from the connection.
    fn read(&mut self, n: usize) {
        if !self.whole {
            self.left -= n as u64;
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for One<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if this.left == 0 {
            return Poll::Ready(Ok(()));
        }
        let max = usize::try_from(this.left).unwrap_or(usize::MAX);
        if buf.remaining() <= max {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            this.read(buf.filled().len() - before);
            return Poll::Ready(Ok(()));
        }
        // The last of the request: no further than its end.
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(max));
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        this.read(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for One<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// The connection is closed only when hyper has all of it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.whole {
            Pin::new(&mut self.io).poll_shutdown(cx)
        } else {
            Pin::new(&mut self.io).poll_flush(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use axum::{extract::Request, routing::get};
    use caravan_api::Digest;
    use tokio::sync::watch;

    use super::*;

    /// Counts its drops.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `/file` from a file, `/poll` parked until `gate` changes.
    struct Test {
        file: std::path::PathBuf,
        gate: watch::Receiver<u32>,
        /// Files sent and parked polls ended (answered or given up).
        dropped: Arc<AtomicUsize>,
    }

    impl Shortcuts for Test {
        fn file(&self, req: &Parts) -> Option<FileAnswer> {
            (req.uri.path() == "/file").then(|| {
                let data = std::fs::read(&self.file).unwrap();
                let (head, range) =
                    super::super::blob_head(&Digest::of(&data), data.len() as u64, &req.headers);
                FileAnswer {
                    head,
                    file: std::sync::Arc::new(std::fs::File::open(&self.file).unwrap()),
                    range,
                    hold: Box::new(Dropped(self.dropped.clone())),
                }
            })
        }

        fn park(&self, req: &Parts) -> Option<BoxFuture<'static, ()>> {
            (req.uri.path() == "/poll").then(|| {
                let mut gate = self.gate.clone();
                let dropped = Dropped(self.dropped.clone());
                Box::pin(async move {
                    let _dropped = dropped;
                    let _ = gate.changed().await;
                }) as BoxFuture<'static, ()>
            })
        }
    }

    struct Server {
        port: u16,
        shutdown: CancellationToken,
        gate: watch::Sender<u32>,
        dropped: Arc<AtomicUsize>,
        data: Vec<u8>,
        _dir: tempfile::TempDir,
    }

    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("blob"), &data).unwrap();
        let (gate, gate_rx) = watch::channel(0);
        let dropped = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route("/file", get(|| async { "not from the file" }))
            .route(
                "/poll",
                get(|req: Request| async move {
                    match req.extensions().get::<Parked>() {
                        Some(Parked) => "parked",
                        None => "not parked",
                    }
                }),
            )
            .route(
                "/echo",
                axum::routing::post(|body: Bytes| async move { body }),
            );
        let served = Served {
            app,
            shortcuts: Some(Arc::new(Test {
                file: dir.path().join("blob"),
                gate: gate_rx,
                dropped: dropped.clone(),
            })),
            header_read_timeout: Duration::from_secs(5),
            shutdown: shutdown.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, served.clone()));
            }
        });
        Server {
            port,
            shutdown,
            gate,
            dropped,
            data,
            _dir: dir,
        }
    }

    /// A raw HTTP/1.1 client connection.
    struct Client {
        conn: TcpStream,
        /// Bytes read past the last answer.
        read: Vec<u8>,
    }

    impl Client {
        async fn to(server: &Server) -> Self {
            let conn = TcpStream::connect(("127.0.0.1", server.port))
                .await
                .unwrap();
            Self {
                conn,
                read: Vec::new(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.conn.write_all(bytes).await.unwrap();
        }

        /// The next answer: status and body.
        async fn answer(&mut self) -> (u16, Vec<u8>) {
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut res = httparse::Response::new(&mut headers);
                if let httparse::Status::Complete(len) = res.parse(&self.read).unwrap() {
                    let body: usize = res
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                        .unwrap();
                    let status = res.code.unwrap();
                    while self.read.len() < len + body {
                        assert!(self.more(10_000).await > 0, "closed: {:?}", self.read);
                    }
                    let rest = self.read.split_off(len + body);
                    let body = self.read.split_off(len);
                    self.read = rest;
                    return (status, body);
                }
                assert!(self.more(10_000).await > 0, "closed: {:?}", self.read);
            }
        }

        /// Reads what comes within `ms` milliseconds (0: the connection closed).
        async fn more(&mut self, ms: u64) -> usize {
            let read = self.conn.read_buf(&mut self.read);
            tokio::time::timeout(Duration::from_millis(ms), read)
                .await
                .expect("an answer in time")
                .unwrap()
        }

        /// Whether nothing comes within `ms` milliseconds.
        async fn silent_for(&mut self, ms: u64) -> bool {
            let read = self.conn.read_buf(&mut self.read);
            tokio::time::timeout(Duration::from_millis(ms), read)
                .await
                .is_err()
        }
    }

    #[tokio::test]
    async fn requests_on_one_connection_go_to_hyper_and_to_the_shortcuts_in_turn() {
        let server = start().await;
        let mut client = Client::to(&server).await;
        // Pipelined: a body for hyper, a range of the file, hyper again.
        client
            .send(
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n12345\
              GET /file HTTP/1.1\r\nhost: x\r\nrange: bytes=70000-\r\n\r\n\
              GET /hello HTTP/1.1\r\nhost: x\r\n\r\n",
            )
            .await;
        assert_eq!(client.answer().await, (200, b"12345".to_vec()));
        assert_eq!(client.answer().await, (206, server.data[70_000..].to_vec()));
        assert_eq!(client.answer().await, (200, b"hello".to_vec()));
        // A range past the end: refused, with no body, and the connection
        // serves on.
        client
            .send(
                b"GET /file HTTP/1.1\r\nhost: x\r\nrange: bytes=100000-\r\n\r\n\
              GET /hello HTTP/1.1\r\nhost: x\r\n\r\n",
            )
            .await;
        assert_eq!(client.answer().await, (416, Vec::new()));
        assert_eq!(client.answer().await, (200, b"hello".to_vec()));
        // The whole file, by a client that does not pipeline.
        let url = format!("http://127.0.0.1:{}/file", server.port);
        let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
        assert_eq!(body, server.data);
        assert_eq!(server.dropped.load(Ordering::SeqCst), 3, "leases let go");
    }

    #[tokio::test]
    async fn a_parked_long_poll_is_answered_once_its_wait_ends_marked_parked() {
        let server = start().await;
        let mut client = Client::to(&server).await;
        client.send(b"GET /poll HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(client.silent_for(300).await, "answered while parked");
        server.gate.send_replace(1);
        assert_eq!(client.answer().await, (200, b"parked".to_vec()));
        // The connection serves on.
        client.send(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(client.answer().await, (200, b"hello".to_vec()));
    }

    #[tokio::test]
    async fn at_shutdown_a_parked_long_poll_is_answered_at_once_and_the_connection_closed() {
        let server = start().await;
        let mut client = Client::to(&server).await;
        client.send(b"GET /poll HTTP/1.1\r\nhost: x\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.shutdown.cancel();
        assert_eq!(client.answer().await, (200, b"parked".to_vec()));
        assert_eq!(client.more(5_000).await, 0, "closed after");
    }

    #[tokio::test]
    async fn a_client_that_leaves_a_parked_long_poll_lets_go_of_its_wait() {
        let server = start().await;
        let mut client = Client::to(&server).await;
        client.send(b"GET /poll HTTP/1.1\r\nhost: x\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.dropped.load(Ordering::SeqCst), 0);
        drop(client);
        for _ in 0..100 {
            if server.dropped.load(Ordering::SeqCst) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the parked poll of a client that left is still waiting");
    }

    #[tokio::test]
    async fn what_this_loop_does_not_follow_goes_to_hyper() {
        let server = start().await;
        // A chunked body: hyper reads it, and the rest of the connection.
        let mut client = Client::to(&server).await;
        client.send(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n9\r\nhey there\r\n0\r\n\r\n\
              GET /hello HTTP/1.1\r\nhost: x\r\n\r\n",
        ).await;
        assert_eq!(client.answer().await, (200, b"hey there".to_vec()));
        assert_eq!(client.answer().await, (200, b"hello".to_vec()));
        // Garbage: hyper's answer to it.
        let mut client = Client::to(&server).await;
        client.send(b"\x16\x03\x01 not http at all\r\n\r\n").await;
        client.more(5_000).await;
        assert!(
            client.read.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            client.read
        );
    }
}
