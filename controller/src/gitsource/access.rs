//! What a GitSource needs to reach its repository and to trust the host:
//! the credentials, known host keys and CA of its Secret
//! (`spec.secretRef`), and the signing keys of `spec.verify`. Both Secrets
//! must carry the label `caravan.dev/git-credentials: "true"`; the checks
//! here (host keys, certificates, where credentials may go) are pure.

use std::sync::Arc;

use caravan_api::labels;
use rustls::{
    client::{danger::ServerCertVerifier as _, WebPkiServerVerifier},
    pki_types::{pem::PemObject as _, CertificateDer, ServerName, UnixTime},
};

/// The contents of a GitSource's credentials Secret.
#[derive(Default, Clone)]
pub struct Access {
    pub username: Option<String>,
    /// A password or token (HTTPS).
    pub password: Option<String>,
    /// An OpenSSH private key (SSH).
    pub identity: Option<String>,
    /// `known_hosts` lines (SSH): without them no SSH host is trusted.
    pub known_hosts: Option<String>,
    /// The CA (PEM) an HTTPS host's certificate must chain to, instead of
    /// the system's roots.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    /// The host (`host` or `host:port`) the Secret is for: given, it is
    /// used for no other, whatever a GitSource's `url` says.
    pub host: Option<String>,
}

impl Access {
    /// Whether the Secret may be used for `remote` (it names no host, or
    /// this one).
    pub fn check_host(&self, remote: Option<&Remote>) -> Result<(), String> {
        let Some(host) = &self.host else {
            return Ok(());
        };
        let at = remote.map(|r| match r.port {
            Some(p) => format!("{}:{p}", r.host),
            None => r.host.clone(),
        });
        match at {
            Some(at) if at.eq_ignore_ascii_case(host) => Ok(()),
            at => Err(format!(
                "the credentials Secret is for host {host}, not {}: not used",
                at.as_deref().unwrap_or("a local repository")
            )),
        }
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or the key.
        f.debug_struct("Access")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("identity", &self.identity.as_ref().map(|_| "***"))
            .field("known_hosts", &self.known_hosts.is_some())
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("host", &self.host)
            .finish()
    }
}

impl Access {
    /// Reads Secret `name` (labelled for Git); none named, nothing.
    pub async fn read(kube: &kube::Client, ns: &str, name: Option<&str>) -> Result<Self, String> {
        let Some(name) = name else {
            return Ok(Self::default());
        };
        let data =
            crate::context::labelled_secret(kube, ns, name, labels::GIT_CREDENTIALS, "credentials")
                .await?;
        let text = |key: &str| -> Result<Option<String>, String> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.0.clone())
                        .map_err(|_| format!("Secret {name}: `{key}` is not UTF-8 text"))
                })
                .transpose()
        };
        let ca = match text("ca.crt")? {
            Some(pem) => Some(parse_ca(&pem).map_err(|e| format!("Secret {name}: `ca.crt`: {e}"))?),
            None => None,
        };
        Ok(Self {
            username: text("username")?.map(|u| u.trim().to_string()),
            password: text("password")?.map(|p| p.trim_end_matches(['\r', '\n']).to_string()),
            identity: text("identity")?,
            known_hosts: text("known_hosts")?,
            ca,
            host: text("host")?.map(|h| h.trim().to_string()),
        })
    }
}

/// The SSH public keys of a `spec.verify` Secret (labelled for Git): every
/// line of every value that is not blank or a comment.
pub async fn signers(
    kube: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<Vec<ssh_key::PublicKey>, String> {
    let data =
        crate::context::labelled_secret(kube, ns, name, labels::GIT_CREDENTIALS, "signing keys")
            .await?;
    let mut keys = vec![];
    for (key, value) in &data {
        let text = String::from_utf8_lossy(&value.0);
        keys.extend(parse_signers(&text).map_err(|e| format!("Secret {name}: `{key}`: {e}"))?);
    }
    if keys.is_empty() {
        return Err(format!("Secret {name} holds no SSH public key"));
    }
    Ok(keys)
}

/// SSH public keys, one per line (`ssh-ed25519 AAAA… comment`).
pub fn parse_signers(text: &str) -> Result<Vec<ssh_key::PublicKey>, String> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            ssh_key::PublicKey::from_openssh(l)
                .map_err(|e| format!("line {}: not an SSH public key: {e}", i + 1))
        })
        .collect()
}

fn parse_ca(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

/// Where a repository URL points: enough to decide where credentials may
/// go and which `known_hosts` name a host key must be listed under.
#[derive(Debug, PartialEq, Eq)]
pub struct Remote {
    pub ssh: bool,
    pub host: String,
    pub port: Option<u16>,
    pub user: Option<String>,
}

impl Remote {
    /// `https://…`, `ssh://…` or scp-like `[user@]host:path`; `None` for a
    /// local repository.
    pub fn parse(url: &str) -> Option<Self> {
        // scp-like `host:path` reads as a URL scheme `host`: look at it first.
        if !url.contains("://") && !url.starts_with('/') {
            let (authority, _) = url.split_once(':')?;
            let (user, host) = match authority.rsplit_once('@') {
                Some((u, h)) => (Some(u.to_string()), h),
                None => (None, authority),
            };
            return Some(Self {
                ssh: true,
                host: host.to_ascii_lowercase(),
                port: None,
                user,
            });
        }
        if let Ok(u) = url::Url::parse(url) {
            if !matches!(u.scheme(), "https" | "ssh") {
                return None;
            }
            return Some(Self {
                ssh: u.scheme() == "ssh",
                host: u.host_str()?.trim_matches(['[', ']']).to_ascii_lowercase(),
                port: u.port(),
                user: Some(u.username().to_string()).filter(|u| !u.is_empty()),
            });
        }
        None
    }

    /// The name a `known_hosts` line lists this host under.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }

    /// Whether `url` (where the Git host asks for credentials, after any
    /// redirect) is this host: credentials go nowhere else.
    pub fn same_host(&self, url: &str) -> bool {
        Self::parse(url).is_some_and(|o| o.host == self.host && o.port == self.port)
    }
}

/// Checks an SSH host key (its wire encoding) against `known_hosts` for
/// host `name` (`host` or `[host]:port`). Plain and hashed (`|1|…`) host
/// names are understood; `@revoked` keys are refused; wildcard patterns
/// and `@cert-authority` lines are not used.
pub fn check_host_key(known_hosts: &str, name: &str, key: &[u8]) -> Result<(), String> {
    let mut listed = false;
    for (i, line) in known_hosts.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry: ssh_key::known_hosts::Entry = line
            .parse()
            .map_err(|e| format!("known_hosts line {}: {e}", i + 1))?;
        let same_key = entry
            .public_key()
            .to_bytes()
            .is_ok_and(|b| b.as_slice() == key);
        match entry.marker() {
            Some(ssh_key::known_hosts::Marker::Revoked) if same_key => {
                return Err(format!("the host key of {name} is revoked in known_hosts"))
            }
            Some(_) => continue,
            None => {}
        }
        if !host_matches(entry.host_patterns(), name) {
            continue;
        }
        if same_key {
            return Ok(());
        }
        listed = true;
    }
    Err(if listed {
        format!("the host key of {name} is not the one in known_hosts: refusing to connect (has the host key changed, or is someone in between?)")
    } else {
        format!("{name} is not in known_hosts: add its host key to the Secret's `known_hosts` (ssh-keyscan)")
    })
}

fn host_matches(patterns: &ssh_key::known_hosts::HostPatterns, name: &str) -> bool {
    use hmac::{Hmac, Mac as _};
    match patterns {
        ssh_key::known_hosts::HostPatterns::Patterns(list) => {
            list.iter().any(|p| p.eq_ignore_ascii_case(name))
        }
        ssh_key::known_hosts::HostPatterns::HashedName { salt, hash } => {
            let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                return false;
            };
            mac.update(name.as_bytes());
            mac.verify_slice(hash).is_ok()
        }
    }
}

/// Checks an HTTPS host's certificate (DER) for `host` against `ca`.
/// libgit2 hands over only the host's own certificate, so it must be
/// signed by a certificate of `ca` directly (put intermediates in `ca`).
pub fn check_certificate(
    ca: &[CertificateDer<'static>],
    cert: &[u8],
    host: &str,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca.iter().cloned());
    if added == 0 {
        return Err("no usable CA certificate in `ca.crt`".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a host name: {e}"))?;
    verifier
        .verify_server_cert(
            &CertificateDer::from(cert.to_vec()),
            &[],
            &name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| format!("the certificate of {host} is not trusted (`ca.crt`): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SSH public key line made from `seed`.
    fn key(seed: u8) -> String {
        let data = ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(
            ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .to_bytes(),
        ));
        ssh_key::PublicKey::new(data, "").to_openssh().unwrap()
    }

    fn wire(line: &str) -> Vec<u8> {
        ssh_key::PublicKey::from_openssh(line)
            .unwrap()
            .to_bytes()
            .unwrap()
    }

    #[test]
    fn remotes_name_their_host_port_and_user() {
        let r = Remote::parse("ssh://git@127.0.0.1:2222/srv/fleet.git").unwrap();
        assert_eq!(
            (r.ssh, r.host.as_str(), r.port, r.user.as_deref()),
            (true, "127.0.0.1", Some(2222), Some("git"))
        );
        assert_eq!(r.known_hosts_name(), "[127.0.0.1]:2222");
        let r = Remote::parse("github.com:acme/fleet.git").unwrap();
        assert_eq!(
            (r.ssh, r.host.as_str(), r.user),
            (true, "github.com", None),
            "scp-like, no user"
        );
        let r = Remote::parse("git@GitHub.com:acme/fleet.git").unwrap();
        assert_eq!(
            (r.host.as_str(), r.known_hosts_name()),
            ("github.com", "github.com".into())
        );
        let r = Remote::parse("https://git.example.com/fleet.git").unwrap();
        assert!(!r.ssh && r.same_host("https://git.example.com/other.git"));
        assert!(
            !r.same_host("https://evil.example.com/fleet.git"),
            "credentials stay with the host"
        );
        assert!(
            !r.same_host("https://git.example.com:8443/fleet.git"),
            "another port is another host"
        );
        assert_eq!(Remote::parse("file:///srv/fleet.git"), None);
    }

    #[test]
    fn a_secret_bound_to_a_host_is_used_for_no_other() {
        let bound = Access {
            host: Some("git.example.com:8443".into()),
            ..Default::default()
        };
        let at = |url: &str| Remote::parse(url);
        assert_eq!(
            bound.check_host(at("https://git.example.com:8443/fleet.git").as_ref()),
            Ok(())
        );
        let e = bound
            .check_host(at("https://evil.example.com:8443/fleet.git").as_ref())
            .unwrap_err();
        assert!(
            e.contains("is for host git.example.com:8443, not evil.example.com:8443"),
            "{e}"
        );
        assert!(
            bound
                .check_host(at("https://git.example.com/fleet.git").as_ref())
                .is_err(),
            "another port"
        );
        assert!(bound.check_host(None).is_err());
        assert_eq!(
            Access::default().check_host(at("https://any.example.com/x").as_ref()),
            Ok(())
        );
    }

    #[test]
    fn only_a_listed_host_key_is_trusted() {
        let (ed25519_key, other_key) = (key(1), key(2));
        let name = "[127.0.0.1]:2222";
        let known = format!("# fleet\n{name} {ed25519_key}\n");
        assert_eq!(check_host_key(&known, name, &wire(&ed25519_key)), Ok(()));
        let e = check_host_key(&known, name, &wire(&other_key)).unwrap_err();
        assert!(e.contains("not the one in known_hosts"), "{e}");
        let e = check_host_key(&known, "[127.0.0.1]:2223", &wire(&ed25519_key)).unwrap_err();
        assert!(e.contains("not in known_hosts"), "{e}");
        let revoked = format!("@revoked * {ed25519_key}\n{name} {ed25519_key}\n");
        let e = check_host_key(&revoked, name, &wire(&ed25519_key)).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        let e = check_host_key("garbage here", name, &wire(&ed25519_key)).unwrap_err();
        assert!(e.starts_with("known_hosts line 1"), "{e}");
    }

    #[test]
    fn hashed_host_names_are_understood() {
        let ed25519_key = key(1);
        use base64::Engine as _;
        use hmac::{Hmac, Mac as _};
        let salt = [7u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"git.example.com");
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = format!(
            "|1|{}|{} {ed25519_key}",
            b64.encode(salt),
            b64.encode(mac.finalize().into_bytes())
        );
        assert_eq!(
            check_host_key(&line, "git.example.com", &wire(&ed25519_key)),
            Ok(())
        );
        assert!(check_host_key(&line, "git.example.org", &wire(&ed25519_key)).is_err());
    }

    #[test]
    fn signing_keys_are_read_line_by_line() {
        let (ed25519_key, other_key) = (key(1), key(2));
        let keys = parse_signers(&format!("# ops\n{ed25519_key} alice\n\n{other_key}\n")).unwrap();
        assert_eq!(keys.len(), 2);
        let e = parse_signers("ssh-ed25519 nonsense").unwrap_err();
        assert!(e.starts_with("line 1: not an SSH public key"), "{e}");
    }

    #[test]
    fn a_certificate_must_chain_to_the_given_ca() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let roots = parse_ca(&ca.pem()).unwrap();
        assert_eq!(check_certificate(&roots, leaf.der(), "127.0.0.1"), Ok(()));
        let e = check_certificate(&roots, leaf.der(), "localhost").unwrap_err();
        assert!(e.contains("not trusted"), "{e}");
        let stranger = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        assert!(check_certificate(&roots, stranger.cert.der(), "127.0.0.1").is_err());
        assert!(parse_ca("not pem").is_err());
    }
}
