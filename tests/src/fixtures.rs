//! What tests are made of: TLS certificates, incompressible data, copies of
//! directories. (The example fleet is `caravan::fleet`.)

use std::path::{Path, PathBuf};

/// A CA and a server certificate for `localhost`/`127.0.0.1`, as PEM files.
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Caravan test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &ca)?;
        let tls = Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&tls.ca, ca.pem())?;
        std::fs::write(&tls.cert, cert.pem())?;
        std::fs::write(&tls.key, key.serialize_pem())?;
        Ok(tls)
    }
}

/// CA certificates (PEM) the clients of [`http`] trust in this process.
static TRUSTED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Has every client from [`http`] in this process trust the CA
/// certificates in `pem` (each test runs in a process of its own).
pub fn trust(pem: &[u8]) {
    TRUSTED.lock().expect("lock poisoned").push(pem.to_vec());
}

/// A client builder whose every request says this release (as an agent's
/// and a relay's do: one that says none is refused).
pub fn http_builder() -> reqwest::ClientBuilder {
    says(Some(caravan_api::RELEASE))
}

/// A client builder whose every request says it comes from `release`
/// (none: says nothing).
fn says(release: Option<&str>) -> reqwest::ClientBuilder {
    let mut said = reqwest::header::HeaderMap::new();
    if let Some(release) = release {
        said.insert(
            caravan_api::skew::VERSION_HEADER,
            reqwest::header::HeaderValue::from_str(release).expect("a release is a header value"),
        );
    }
    reqwest::Client::builder().default_headers(said)
}

/// An HTTP client of this release ([`http_builder`]) that trusts the CAs
/// this process was told of ([`trust`]: the controller's, and the test CA
/// when there is one).
pub fn http() -> reqwest::Client {
    http_as(Some(caravan_api::RELEASE))
}

/// [`http`], saying it comes from `release` (none: saying nothing).
pub fn http_as(release: Option<&str>) -> reqwest::Client {
    let mut b = says(release);
    for pem in TRUSTED.lock().expect("lock poisoned").iter() {
        for cert in reqwest::Certificate::from_pem_bundle(pem).expect("trusted CAs are PEM") {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().expect("a client")
}

/// Copies a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// `len` incompressible bytes (xorshift from `seed`), so a package built
/// from them is as large as the data.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `len` incompressible bytes to `path` in 1 MiB pieces (for sizes
/// that should not be held in memory).
pub fn write_noise(path: &Path, len: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = len;
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    while left > 0 {
        let n = left.min(1 << 20);
        f.write_all(&noise(n as usize, seed))?;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        left -= n;
    }
    Ok(f.flush()?)
}

/// The desired state a relay serves an agent: the signed document and the
/// assignment lists it names, put together (the lists checked against their
/// digests, the signature not: what a test looks at, never acts on).
pub fn desired_of(body: &[u8]) -> anyhow::Result<caravan_api::wire::AgentDesired> {
    let served: caravan_api::wire::AgentServed = serde_json::from_slice(body)?;
    let document = serde_json::from_slice(&served.document.unverified_payload()?)?;
    Ok(caravan_api::trust::with_lists(document, &served.lists)?)
}

/// A report as agent `agent` would send its relay, signed with a key of the
/// test's (a relay checks only whose it is; the controller refuses it).
pub fn report_as(agent: &str) -> caravan_api::trust::Envelope {
    let report: caravan_api::wire::AgentReport = serde_json::from_value(serde_json::json!(
        {"agent": agent, "version": "0", "os": "linux", "arch": "x86_64", "installed": [], "jobs": []}
    ))
    .expect("a report");
    caravan_api::trust::sign_report(&report, &ed25519_dalek::SigningKey::from_bytes(&[1; 32]))
}
