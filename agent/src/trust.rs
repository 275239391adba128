//! What the agent trusts: the controller's root, pinned once (at the first
//! poll after enrollment, checked against `--trust-root-sha256` when given)
//! and followed through rotations, and the version of the desired state it
//! last accepted. Every document the relay serves is verified here before
//! the agent acts on it (see `caravan_api::trust` for what is refused);
//! a refused document leaves the agent on the last one it accepted, which
//! it stops acting on once that expires.

use caravan_api::{
    trust::{self, Accepted, Envelope, Root, TrustError},
    wire::{AgentDesired, AgentDocument, AgentServed},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::StateDir;

const FILE: &str = "trust.json";

/// The trust state, as kept in the state directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Trust {
    /// The newest root the agent follows.
    pub root: Envelope,
    /// The desired state last accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Accepted>,
}

/// What came of a document the relay served.
#[derive(Debug)]
pub enum Verdict {
    /// Signed, for this agent, current: act on it.
    Accept(AgentDesired),
    /// An unsigned document saying only "change nothing": the controller
    /// has not described this agent (yet); the agent waits, acting on what
    /// it accepted before, if anything.
    NotDescribed,
}

impl Trust {
    pub fn load(state: &StateDir) -> anyhow::Result<Option<Self>> {
        state.json(FILE)
    }

    pub fn save(&self, state: &StateDir) -> anyhow::Result<()> {
        state.set_json(FILE, Some(self))
    }

    /// The trust to start from, given the roots a relay offers.
    pub fn pin(chain: &[Envelope], pinned: Option<&str>) -> Result<Self, TrustError> {
        let (_, root) = trust::pin(chain, pinned)?;
        Ok(Self {
            root,
            accepted: None,
        })
    }

    pub fn root(&self) -> Result<Root, TrustError> {
        Root::first(&self.root, None)
    }

    /// Follows the rotations in `chain`; whether the root changed.
    pub fn follow(&mut self, chain: &[Envelope]) -> Result<bool, TrustError> {
        match self.root()?.follow(chain)? {
            Some((_, envelope)) => {
                self.root = envelope;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Judges a document the relay served to `agent`. On acceptance the
    /// caller saves `self`, which now remembers the version.
    pub fn judge(
        &mut self,
        served: &AgentServed,
        agent: &str,
        now: DateTime<Utc>,
    ) -> Result<Verdict, TrustError> {
        let root = self.root()?;
        match trust::verify_desired(served, &root, agent, self.accepted.as_ref(), now) {
            Ok((desired, accepted)) => {
                self.accepted = Some(accepted);
                Ok(Verdict::Accept(desired))
            }
            Err(TrustError::NotSigned { .. }) if served.document.signatures.is_empty() => {
                let frozen = served
                    .document
                    .unverified_payload()
                    .ok()
                    .and_then(|b| serde_json::from_slice::<AgentDocument>(&b).ok())
                    .is_some_and(|d| d == AgentDocument::frozen(agent));
                if frozen {
                    Ok(Verdict::NotDescribed)
                } else {
                    Err(TrustError::NotSigned {
                        found: 0,
                        threshold: root.threshold as usize,
                    })
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether a desired state accepted earlier has expired by `now`.
pub fn expired(desired: &AgentDesired, now: DateTime<Utc>) -> Option<TrustError> {
    let expired = DateTime::parse_from_rfc3339(&desired.expires)
        .map(|t| t <= now)
        .unwrap_or(true);
    expired.then(|| TrustError::Expired {
        version: desired.version,
        expires: desired.expires.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::trust::DESIRED_TYPE;
    use ed25519_dalek::SigningKey;

    /// `d` as a relay serves it, signed by `keys`.
    fn served(d: &AgentDocument, keys: &[&SigningKey]) -> AgentServed {
        AgentServed {
            document: Envelope::sign(DESIRED_TYPE, &serde_json::to_vec(d).unwrap(), keys),
            lists: Default::default(),
        }
    }

    #[test]
    fn only_signed_documents_are_acted_on_and_unsigned_ones_at_most_wait() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut trust = Trust::pin(&[Root::signed(1, &[&key])], None).unwrap();
        let now = Utc::now();
        let frozen = |agent: &str| served(&AgentDocument::frozen(agent), &[]);
        assert!(matches!(
            trust.judge(&frozen("a1"), "a1", now),
            Ok(Verdict::NotDescribed)
        ));
        // Another agent's frozen document, or an unsigned one asking for
        // anything at all, is refused.
        assert!(trust.judge(&frozen("a2"), "a1", now).is_err());
        let d = AgentDocument {
            agent: "a1".into(),
            version: 7,
            expires: (now + chrono::Duration::hours(1)).to_rfc3339(),
            ..Default::default()
        };
        assert!(matches!(
            trust.judge(&served(&d, &[]), "a1", now),
            Err(TrustError::NotSigned { .. })
        ));
        let Ok(Verdict::Accept(accepted)) = trust.judge(&served(&d, &[&key]), "a1", now) else {
            panic!("a signed document is accepted")
        };
        assert_eq!(trust.accepted.as_ref().unwrap().version, 7);
        assert!(expired(&accepted, now).is_none());
        assert!(expired(&accepted, now + chrono::Duration::hours(2)).is_some());
    }
}
