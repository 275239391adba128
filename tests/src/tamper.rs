//! A tampering proxy: a real HTTP server standing between agents and their
//! real relay, as a compromised relay or an attacker on the branch LAN
//! would. It passes everything on, records every desired-state document it
//! passes and every report it carries up (per agent), and, when a test says
//! so, answers an agent's desired-state polls with something else.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the proxy does to desired-state answers.
#[derive(Clone, Debug, Default)]
pub enum Tamper {
    /// Pass them on.
    #[default]
    Honest,
    /// Answer every poll with this body (a made-up or replayed document).
    Serve(Vec<u8>),
    /// Answer every poll with "unchanged" (or, without an ETag to compare,
    /// the last document passed): updates are withheld.
    Freeze,
}

#[derive(Default)]
struct Shared {
    tamper: Tamper,
    /// Every desired-state body passed on, per agent, oldest first.
    seen: HashMap<String, Vec<Vec<u8>>>,
    /// Every report body passed up, per agent, oldest first.
    reports: HashMap<String, Vec<Vec<u8>>>,
}

/// The proxy; dropping it does not stop it (it lives as long as the test).
#[derive(Clone)]
pub struct TamperProxy {
    pub url: String,
    shared: Arc<Mutex<Shared>>,
}

impl TamperProxy {
    /// Starts a proxy (plain HTTP: agents behind it run `--insecure`) in
    /// front of the relay at `upstream`.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (upstream, state) = (upstream.to_string(), shared.clone());
        tokio::spawn(async move {
            let http = crate::http();
            while let Ok((conn, _)) = listener.accept().await {
                let (http, upstream, state) = (http.clone(), upstream.clone(), state.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &http, &upstream, &state).await;
                });
            }
        });
        Ok(Self { url, shared })
    }

    pub fn set(&self, tamper: Tamper) {
        self.shared.lock().unwrap().tamper = tamper;
    }

    /// Every desired-state document passed on to agent `agent`, oldest first.
    pub fn seen(&self, agent: &str) -> Vec<Vec<u8>> {
        let shared = self.shared.lock().unwrap();
        shared.seen.get(agent).cloned().unwrap_or_default()
    }

    /// Every report agent `agent` sent through the proxy, oldest first.
    pub fn reports(&self, agent: &str) -> Vec<Vec<u8>> {
        let shared = self.shared.lock().unwrap();
        shared.reports.get(agent).cloned().unwrap_or_default()
    }
}

/// Reads one request, answers it, closes the connection.
async fn serve(
    mut conn: tokio::net::TcpStream,
    http: &reqwest::Client,
    upstream: &str,
    shared: &Mutex<Shared>,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    // Agent tokens are `<agent>/<mac>`.
    let agent = header("authorization")
        .and_then(|v| Some(v.strip_prefix("Bearer ")?.split_once('/')?.0.to_string()))
        .unwrap_or_default();
    let desired = method == "GET" && target.starts_with(caravan_api::wire::paths::DESIRED);
    if method == "POST" && target == caravan_api::wire::paths::REPORT {
        let mut shared = shared.lock().unwrap();
        shared
            .reports
            .entry(agent.clone())
            .or_default()
            .push(body.clone());
    }
    let tamper = shared.lock().unwrap().tamper.clone();
    if desired {
        match tamper {
            Tamper::Honest => {}
            Tamper::Serve(doc) => {
                let etag = etag_of(&doc);
                if header("if-none-match").as_deref() == Some(etag.as_str()) {
                    return unchanged(&mut conn).await;
                }
                return reply(&mut conn, 200, Some(&etag), &doc).await;
            }
            Tamper::Freeze => {
                if header("if-none-match").is_some() {
                    return unchanged(&mut conn).await;
                }
                let last = shared
                    .lock()
                    .unwrap()
                    .seen
                    .get(&agent)
                    .and_then(|v| v.last().cloned());
                if let Some(doc) = last {
                    return reply(&mut conn, 200, Some("\"frozen\""), &doc).await;
                }
            }
        }
    }
    // Pass it on.
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut req = http.request(method, format!("{upstream}{target}"));
    for (k, v) in &headers {
        if !matches!(k.as_str(), "host" | "connection" | "content-length") {
            req = req.header(k, v);
        }
    }
    let res = req.body(body).send().await?;
    let status = res.status().as_u16();
    let etag = res
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let answer = res.bytes().await?.to_vec();
    if desired && status == 200 {
        let now = {
            let mut shared = shared.lock().unwrap();
            shared.seen.entry(agent).or_default().push(answer.clone());
            shared.tamper.clone()
        };
        // A long-poll that began before the tampering started ends tampered.
        match now {
            Tamper::Honest => {}
            Tamper::Freeze => return reply(&mut conn, 304, None, b"").await,
            Tamper::Serve(doc) => return reply(&mut conn, 200, Some(&etag_of(&doc)), &doc).await,
        }
    }
    reply(&mut conn, status, etag.as_deref(), &answer).await
}

/// The ETag of a document the proxy serves in the relay's stead.
fn etag_of(doc: &[u8]) -> String {
    use sha2::Digest as _;
    format!(
        "\"tampered-{}\"",
        &hex::encode(sha2::Sha256::digest(doc))[..16]
    )
}

/// "Unchanged", after a moment, as a long-poll would.
async fn unchanged(conn: &mut tokio::net::TcpStream) -> anyhow::Result<()> {
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    reply(conn, 304, None, b"").await
}

async fn reply(
    conn: &mut tokio::net::TcpStream,
    status: u16,
    etag: Option<&str>,
    body: &[u8],
) -> anyhow::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(etag) = etag {
        head.push_str(&format!("ETag: {etag}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    conn.shutdown().await?;
    Ok(())
}
