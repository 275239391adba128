//! Credentials a relay checks without storing anything: `<name>/<hex mac>`,
//! an HMAC-SHA256 of the name keyed with the relay's own token, so no other
//! site's relay can forge them. Agents get theirs from the relay at
//! enrollment (the name is the Agent's); the relay of a child site gets its
//! own from the controller (the name is `relay:<child site>`), to fetch
//! content from its parent's relay.

/// Prefix of the names of child-site relays (agent names never hold `:`).
pub const CHILD_RELAY: &str = "relay:";

/// The name a child site's relay presents to its parent's relay.
pub fn child_relay_name(site: &str) -> String {
    format!("{CHILD_RELAY}{site}")
}

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
