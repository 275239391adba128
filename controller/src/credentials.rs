//! Credentials the controller issues, derived from one secret key so that no
//! token has to be stored: a relay token names its site and carries an
//! HMAC-SHA256 over it.
//!
//! Relay token format: `<namespace>/<site>/<hex mac>` (neither part may hold `/`).

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct CredentialKey {
    key: [u8; 32],
}

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialKey(<redacted>)")
    }
}

impl CredentialKey {
    /// Loads the key from `path`, creating it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut key = [0; 32];
                key.copy_from_slice(&bytes);
                Ok(Self { key })
            }
            Ok(_) => Err(Error::io(
                path,
                std::io::Error::other("token key must be 32 bytes"),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                caravan_net::fs::write_private(path, &key, caravan_net::fs::Existing::Keep)
                    .map_err(|e| Error::io(path, e))?;
                Ok(Self { key })
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn mac(&self, purpose: &str, subject: &str) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any size");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(subject.as_bytes());
        mac
    }

    /// The token the relay of `namespace/site` authenticates with.
    pub fn relay_token(&self, namespace: &str, site: &str) -> String {
        let mac = self.mac("relay", &format!("{namespace}/{site}"));
        format!(
            "{namespace}/{site}/{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// Checks a relay token; returns the `(namespace, site)` it is for.
    pub fn verify_relay_token(&self, token: &str) -> Option<(String, String)> {
        let mut parts = token.split('/');
        let (ns, site, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let mac = hex::decode(mac).ok()?;
        self.mac("relay", &format!("{ns}/{site}"))
            .verify_slice(&mac)
            .ok()?;
        Some((ns.to_string(), site.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_tokens_verify_only_for_their_site() {
        let dir = tempfile::tempdir().unwrap();
        let keys = CredentialKey::load_or_create(&dir.path().join("key")).unwrap();
        let token = keys.relay_token("ns", "berlin");
        assert_eq!(
            keys.verify_relay_token(&token),
            Some(("ns".into(), "berlin".into()))
        );
        let forged = token.replace("berlin", "paris");
        assert_eq!(keys.verify_relay_token(&forged), None);
        assert_eq!(keys.verify_relay_token("ns/berlin/00"), None);
        // The key survives a restart.
        let again = CredentialKey::load_or_create(&dir.path().join("key")).unwrap();
        assert_eq!(
            again.verify_relay_token(&token),
            Some(("ns".into(), "berlin".into()))
        );
    }
}
