//! Credentials a relay checks without storing anything:
//! `<name>/<expiry>/<hex mac>`, an HMAC-SHA256 of name and expiry keyed
//! with the relay's own token, so no other site's relay can forge them.
//! Agents get theirs from the relay at enrollment and renew them before
//! they expire by proving they hold the key they enrolled with (the name is
//! the Agent's); the relay of a child site gets its own from the controller
//! (the name is `relay:<child site>`, expiry `0`: it lives as long as the
//! relay's Secret), to fetch content from its parent's relay.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Prefix of the names of child-site relays (agent names never hold `:`).
pub const CHILD_RELAY: &str = "relay:";

/// The name a child site's relay presents to its parent's relay.
pub fn child_relay_name(site: &str) -> String {
    format!("{CHILD_RELAY}{site}")
}

fn mac(key: &str, name: &str, expires: u64) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(b"agent-v2\0");
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(expires.to_string().as_bytes());
    mac
}

/// A credential for `name`, good until `expires` (seconds since the Unix
/// epoch; `None`: for as long as `key` is).
pub fn issue(key: &str, name: &str, expires: Option<u64>) -> String {
    let expires = expires.unwrap_or(0);
    let tag = hex::encode(mac(key, name, expires).finalize().into_bytes());
    format!("{name}/{expires}/{tag}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("invalid agent token; enroll again")]
    Invalid,
    #[error("agent credential expired; renew it")]
    Expired,
}

/// The name a valid, unexpired token was issued for (`now`: seconds since
/// the Unix epoch).
pub fn verify<'t>(key: &str, token: &'t str, now: u64) -> Result<&'t str, TokenError> {
    let mut parts = token.split('/');
    let (Some(name), Some(expires), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Invalid);
    };
    let expires: u64 = expires.parse().map_err(|_| TokenError::Invalid)?;
    let tag = hex::decode(tag).map_err(|_| TokenError::Invalid)?;
    mac(key, name, expires)
        .verify_slice(&tag)
        .map_err(|_| TokenError::Invalid)?;
    if expires != 0 && expires <= now {
        return Err(TokenError::Expired);
    }
    Ok(name)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

/// The bytes an agent signs to renew its credential at a relay: the agent's
/// name and the time, so a proof is good for one agent and a few minutes.
pub fn renewal_message(agent: &str, time: u64) -> Vec<u8> {
    format!("caravan-renew-v1\0{agent}\0{time}").into_bytes()
}

/// How far the time in a proof of key (renewal or enrollment) may be from
/// the checker's clock.
pub const PROOF_SKEW_SECONDS: u64 = 300;

/// The bytes an agent that has a key signs, with it, to enroll again: its
/// host ID, the public key it enrolls with now (the same or a new one), the
/// bootstrap token it presents (only good at one site, so a relay that
/// sees the proof cannot move the agent elsewhere) and the time.
pub fn enrollment_message(
    host_id: &str,
    public_key: &str,
    bootstrap_token: &str,
    time: u64,
) -> Vec<u8> {
    let token = hex::encode(Sha256::digest(bootstrap_token.as_bytes()));
    format!("caravan-enroll-v1\0{host_id}\0{public_key}\0{token}\0{time}").into_bytes()
}

/// When a credential runs out (seconds since the Unix epoch; `None`: never,
/// or not a credential) as it says, unverified: for its holder to renew it
/// in time.
pub fn expiry(token: &str) -> Option<u64> {
    let mut parts = token.split('/');
    let (Some(_), Some(expires), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    expires.parse().ok().filter(|e| *e != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_tokens_are_bound_to_the_agent_the_relay_key_and_their_expiry() {
        let t = issue("relay-key", "kiosk-1", Some(1000));
        assert_eq!(verify("relay-key", &t, 999), Ok("kiosk-1"));
        assert_eq!(verify("relay-key", &t, 1000), Err(TokenError::Expired));
        assert_eq!(verify("other-key", &t, 999), Err(TokenError::Invalid));
        for forged in [
            t.replace("kiosk-1", "kiosk-2"),
            t.replace("/1000/", "/99999/"),
            t.replace("/1000/", "/0/"),
            "kiosk-1".into(),
            format!("{t}/extra"),
        ] {
            assert_eq!(
                verify("relay-key", &forged, 999),
                Err(TokenError::Invalid),
                "{forged}"
            );
        }
        let forever = issue("relay-key", "relay:berlin", None);
        assert_eq!(verify("relay-key", &forever, u64::MAX), Ok("relay:berlin"));
    }
}
