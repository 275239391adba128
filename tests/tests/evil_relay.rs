//! Attacks by a malicious relay: a real HTTP server written for the test,
//! standing where an agent's relay should be, against a real agent process.
//! The test also holds the controller's signing key, to sign what the
//! controller would; the relay's own inventions carry no valid signature.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use caravan_api::{
    trust::{Envelope, Root, DESIRED_TYPE},
    wire::{AgentServed, Assignment, AssignmentList},
    Digest,
};
use caravan_tests::{bin, Proc};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the evil relay answers for the agent's desired state and blobs.
#[derive(Clone, Copy)]
enum Evil {
    /// A desired-state document that never ends.
    EndlessDocument,
    /// A signed document assigning a 10-byte blob, then a blob that never ends.
    EndlessBlob,
    /// A document of the relay's own, assigning a script package: unsigned.
    Invented,
    /// Roots of the relay's own, not the one the agent was told to pin.
    ForeignRoot,
    /// A signed document assigning a 1 MB blob, then the blob a byte at a
    /// time, five bytes a second (slow retrieval).
    Trickle,
    /// A signed document, served with an assignment list of the relay's
    /// own under the digest the document names.
    ForgedList,
    /// A signed document, served without the list it names.
    WithheldList,
}

/// Blob requests the evil relay answered (nextest runs each test in a process of its own).
static BLOB_REQUESTS: AtomicUsize = AtomicUsize::new(0);

const DIGEST: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// The controller's key, as far as this test is concerned.
fn controller_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn root() -> Envelope {
    Root::signed(1, &[&controller_key()])
}

/// The assignment list the controller would sign for: a script package
/// of `size` bytes.
fn list(size: u64) -> AssignmentList {
    let assignment: Assignment = serde_json::from_value(serde_json::json!({
        "job": "ns/j", "action": "install", "package": "payload", "version": "1",
        "digest": DIGEST, "size": size,
        "install": {"method": "script", "script": {"install": "install.sh"}}
    }))
    .unwrap();
    AssignmentList::new(&[assignment]).1
}

/// A document naming the list of `size`, signed by `signer`, served with
/// `served` under that list's digest (or with no list).
fn document(signer: Option<&SigningKey>, size: u64, served: Option<AssignmentList>) -> String {
    let genuine = list(size);
    let digest = Digest::of(genuine.json().as_bytes());
    let desired = serde_json::json!({
        "agent": "victim",
        "version": 1,
        "expires": "2100-01-01T00:00:00Z",
        "lists": [digest],
    });
    let keys: Vec<&SigningKey> = signer.into_iter().collect();
    let envelope = Envelope::sign(DESIRED_TYPE, &serde_json::to_vec(&desired).unwrap(), &keys);
    let served: AgentServed = AgentServed {
        document: envelope,
        lists: served.map(|l| (digest, l)).into_iter().collect(),
    };
    serde_json::to_string(&served).unwrap()
}

/// [`document`] as the controller would have it served.
fn honest(signer: Option<&SigningKey>, size: u64) -> String {
    document(signer, size, Some(list(size)))
}

async fn answer(mut conn: tokio::net::TcpStream, evil: Evil) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let json = |body: String| {
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"1\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    };
    if line.contains("/v1/enroll") {
        conn.write_all(json(r#"{"agent":"victim","token":"victim/00"}"#.into()).as_bytes())
            .await?;
    } else if line.contains("/v1/report") {
        conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
    } else if line.contains("/v1/roots") {
        let roots = match evil {
            Evil::ForeignRoot => vec![Root::signed(1, &[&SigningKey::from_bytes(&[6; 32])])],
            _ => vec![root()],
        };
        conn.write_all(json(serde_json::to_string(&roots).unwrap()).as_bytes())
            .await?;
    } else if line.contains("/v1/desired") {
        match evil {
            Evil::EndlessDocument => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"1\"\r\nConnection: close\r\n\r\n{\"payload\":\"").await?;
                let filler = [b'A'; 64 << 10];
                while conn.write_all(&filler).await.is_ok() {}
            }
            Evil::EndlessBlob | Evil::ForeignRoot => {
                conn.write_all(json(honest(Some(&controller_key()), 10)).as_bytes())
                    .await?;
            }
            Evil::Trickle => {
                conn.write_all(json(honest(Some(&controller_key()), 1_000_000)).as_bytes())
                    .await?;
            }
            Evil::Invented => {
                conn.write_all(json(honest(None, 10)).as_bytes()).await?;
            }
            Evil::ForgedList => {
                // The same package, installed by a script of the relay's choosing.
                let forged = list(10).json().replace("install.sh", "implant.sh");
                let forged = serde_json::from_str(&forged).unwrap();
                let body = document(Some(&controller_key()), 10, Some(forged));
                conn.write_all(json(body).as_bytes()).await?;
            }
            Evil::WithheldList => {
                let body = document(Some(&controller_key()), 10, None);
                conn.write_all(json(body).as_bytes()).await?;
            }
        }
    } else if line.contains("/v1/blobs/") {
        BLOB_REQUESTS.fetch_add(1, Ordering::SeqCst);
        conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .await?;
        if let Evil::Trickle = evil {
            while conn.write_all(&[0]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let zeros = [0u8; 64 << 10];
        while conn.write_all(&zeros).await.is_ok() {}
    }
    Ok(())
}

async fn evil_relay(evil: Evil) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(answer(conn, evil));
        }
    });
    Ok(format!("http://{addr}"))
}

/// Runs `caravan-agent run --once` against `server`, pinned to the
/// controller's root, until it exits; returns whether it succeeded and its log.
async fn run_agent(server: &str) -> anyhow::Result<(bool, String)> {
    run_agent_with(server, &[]).await
}

/// [`run_agent`] with `extra` arguments.
async fn run_agent_with(server: &str, extra: &[&str]) -> anyhow::Result<(bool, String)> {
    let pin = caravan_api::trust::fingerprint(&root())?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state").display().to_string();
    let root = dir.path().join("root").display().to_string();
    let args = [
        "run",
        "--once",
        "--server",
        server,
        "--state-dir",
        &state,
        "--install-root",
        &root,
        "--hostname",
        "victim",
        "--trust-root-sha256",
        &pin,
        // The evil relay serves plaintext (a LAN attacker with TLS off, or
        // a relay that holds its TLS key: the same to the agent).
        "--insecure",
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    let env = [(
        "CARAVAN_BOOTSTRAP_TOKEN".to_string(),
        "anything".to_string(),
    )];
    let mut agent = Proc::spawn("agent", &bin("caravan-agent")?, &args, &env, dir.path())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = agent.exit_status() {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent did not give up: {}",
            agent.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(&agent.log)?;
    assert!(
        !dir.path().join("root/payload").exists(),
        "nothing installed"
    );
    Ok((status.success(), log))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_desired_state_is_refused_at_its_limit() -> anyhow::Result<()> {
    let server = evil_relay(Evil::EndlessDocument).await?;
    let (ok, log) = run_agent(&server).await?;
    assert!(!ok, "{log}");
    assert!(log.contains("larger than 16777216 bytes"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_blob_is_cut_at_its_declared_size_and_refused() -> anyhow::Result<()> {
    let server = evil_relay(Evil::EndlessBlob).await?;
    let (ok, log) = run_agent(&server).await?;
    assert!(!ok, "{log}");
    assert!(log.contains("size mismatch"), "{log}");
    assert!(BLOB_REQUESTS.load(Ordering::SeqCst) > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_document_the_relay_made_up_is_refused_unopened() -> anyhow::Result<()> {
    let server = evil_relay(Evil::Invented).await?;
    let (ok, log) = run_agent(&server).await?;
    assert!(!ok, "{log}");
    assert!(
        log.contains("desired state refused: signed by 0 of the 1 trusted keys needed"),
        "{log}"
    );
    assert_eq!(
        BLOB_REQUESTS.load(Ordering::SeqCst),
        0,
        "nothing downloaded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_assignment_list_the_relay_rewrote_or_withheld_is_refused_by_its_digest(
) -> anyhow::Result<()> {
    let digest = Digest::of(list(10).json().as_bytes());
    for (evil, refusal) in [
        (
            Evil::ForgedList,
            format!("assignment list {digest} of desired state version 1 was refused: its bytes do not hash to its digest"),
        ),
        (
            Evil::WithheldList,
            format!("desired state version 1 names assignment list {digest}, which was not served with it (withheld)"),
        ),
    ] {
        let server = evil_relay(evil).await?;
        let (ok, log) = run_agent(&server).await?;
        assert!(!ok, "{log}");
        assert!(
            log.contains(&format!("desired state refused: {refusal}")),
            "{log}"
        );
    }
    assert_eq!(
        BLOB_REQUESTS.load(Ordering::SeqCst),
        0,
        "nothing downloaded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_other_than_the_pinned_one_is_refused() -> anyhow::Result<()> {
    let server = evil_relay(Evil::ForeignRoot).await?;
    let (ok, log) = run_agent(&server).await?;
    assert!(!ok, "{log}");
    assert!(
        log.contains("none of the 1 roots offered has the pinned sha256"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_that_trickles_is_given_up_within_its_window() -> anyhow::Result<()> {
    let server = evil_relay(Evil::Trickle).await?;
    let (ok, log) = run_agent_with(
        &server,
        &[
            "--min-download-rate",
            "100",
            "--download-window-seconds",
            "2",
        ],
    )
    .await?;
    assert!(!ok, "{log}");
    assert!(
        log.contains("download too slow") && log.contains("below the minimum of 100 bytes/s"),
        "{log}"
    );
    // (The relay never stops and a byte comes every 200 ms, so no read
    // timeout fires: without the rate, `run_agent` times out.)
    assert!(BLOB_REQUESTS.load(Ordering::SeqCst) > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_relay_is_refused_unless_the_agent_is_told_it_is_insecure() -> anyhow::Result<()>
{
    let server = evil_relay(Evil::Invented).await?;
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(bin("caravan-agent")?)
        .args(["run", "--once", "--server", &server, "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--install-root")
        .arg(dir.path().join("root"))
        .env("CARAVAN_BOOTSTRAP_TOKEN", "anything")
        .env_remove("CARAVAN_INSECURE")
        .output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("is plaintext HTTP"), "{log}");
    assert_eq!(BLOB_REQUESTS.load(Ordering::SeqCst), 0);
    assert!(
        !dir.path().join("state").join("credentials.json").exists(),
        "nothing was sent: no enrollment"
    );
    Ok(())
}
