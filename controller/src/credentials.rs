//! Credentials the controller issues, derived from one secret key so that no
//! token has to be stored: a relay token names its site and the site's
//! current key ID, and carries an HMAC-SHA256 over them. Rotating one site's
//! credential (`caravan site rotate-relay-credential`, which sets the
//! annotation `caravan.dev/relay-credential-rotation` on the Site: [`caravan_api::v1alpha1::Site::relay_key_id`]) changes its key ID, and so
//! does deleting the Site and creating it again: the old token stops
//! working and the relay's Secret gets the new one. No other site is
//! affected, and no agent has to enroll again: the credentials the relay
//! issued its agents (keyed by its token) are refused, and each agent renews
//! its own with its key.
//!
//! Relay token format: `<namespace>/<site>/<key ID>/<hex mac>` (no part may hold `/`).

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

    /// 32 bytes for `purpose` and `subject` that only this key can make
    /// (the seeds of the CA's and the relays' TLS keys).
    pub fn derive(&self, purpose: &str, subject: &str) -> [u8; 32] {
        self.mac(purpose, subject).finalize().into_bytes().into()
    }

    /// The token the relay of `namespace/site` authenticates with under key
    /// ID `kid`.
    pub fn relay_token(&self, namespace: &str, site: &str, kid: &str) -> String {
        let mac = self.mac("relay", &format!("{namespace}/{site}/{kid}"));
        format!(
            "{namespace}/{site}/{kid}/{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// Checks a relay token; returns the `(namespace, site, key ID)` it is
    /// for (whether that key ID is the site's current one is the caller's
    /// to check).
    pub fn verify_relay_token(&self, token: &str) -> Option<(String, String, String)> {
        let mut parts = token.split('/');
        let (ns, site, kid, mac) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let mac = hex::decode(mac).ok()?;
        self.mac("relay", &format!("{ns}/{site}/{kid}"))
            .verify_slice(&mac)
            .ok()?;
        Some((ns.to_string(), site.to_string(), kid.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_tokens_verify_only_for_their_site() {
        let dir = tempfile::tempdir().unwrap();
        let keys = CredentialKey::load_or_create(&dir.path().join("key")).unwrap();
        let token = keys.relay_token("ns", "berlin", "0");
        let berlin = Some(("ns".into(), "berlin".into(), "0".into()));
        assert_eq!(keys.verify_relay_token(&token), berlin);
        let forged = token.replace("berlin", "paris");
        assert_eq!(keys.verify_relay_token(&forged), None);
        let rekeyed = token.replace("/0/", "/1/");
        assert_eq!(
            keys.verify_relay_token(&rekeyed),
            None,
            "a key ID is signed too"
        );
        assert_eq!(keys.verify_relay_token("ns/berlin/0/00"), None);
        // The key survives a restart.
        let again = CredentialKey::load_or_create(&dir.path().join("key")).unwrap();
        assert_eq!(again.verify_relay_token(&token), berlin);
    }
}
