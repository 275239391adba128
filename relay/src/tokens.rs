//! Agent credentials, issued by the relay at enrollment: `<agent>/<hex mac>`,
//! an HMAC-SHA256 keyed with the relay's own token, so the relay checks them
//! without storing anything and no other site's relay can forge them.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

fn mac(key: &str, agent: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(b"agent\0");
    mac.update(agent.as_bytes());
    mac
}

pub fn issue(key: &str, agent: &str) -> String {
    format!(
        "{agent}/{}",
        hex::encode(mac(key, agent).finalize().into_bytes())
    )
}

/// Returns the agent name a valid token was issued for.
pub fn verify<'t>(key: &str, token: &'t str) -> Option<&'t str> {
    let (agent, tag) = token.split_once('/')?;
    let tag = hex::decode(tag).ok()?;
    mac(key, agent).verify_slice(&tag).ok()?;
    Some(agent)
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn agent_tokens_are_bound_to_the_agent_and_the_relay_key() {
        let t = super::issue("relay-key", "kiosk-1");
        assert_eq!(super::verify("relay-key", &t), Some("kiosk-1"));
        assert_eq!(super::verify("other-key", &t), None);
        assert_eq!(
            super::verify("relay-key", &t.replace("kiosk-1", "kiosk-2")),
            None
        );
        assert_eq!(super::verify("relay-key", "kiosk-1"), None);
    }
}
