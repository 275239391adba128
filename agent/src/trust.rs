//! What the agent trusts: the controller's root, pinned once (at the first
//! poll after enrollment, checked against `--trust-root-sha256` when given)
//! and followed through rotations, and the version of the desired state it
//! last accepted. Every document the relay serves is verified here before
//! the agent acts on it (see `caravan_api::trust` for what is refused);
//! a refused document leaves the agent on the last one it accepted, which
//! it stops acting on once that expires.

use caravan_api::{
    trust::{self, Accepted, Envelope, Root, TrustError},
    wire::{AgentDesired, AgentServed},
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

    /// Judges a document the relay served to `agent`: signed under the
    /// root, for this agent, current, with its lists (see
    /// `caravan_api::trust::verify_desired`). On acceptance the caller
    /// saves `self`, which now remembers the version.
    pub fn judge(
        &mut self,
        served: &AgentServed,
        agent: &str,
        now: DateTime<Utc>,
    ) -> Result<AgentDesired, TrustError> {
        let root = self.root()?;
        let (desired, accepted) =
            trust::verify_desired(served, &root, agent, self.accepted.as_ref(), now)?;
        self.accepted = Some(accepted);
        Ok(desired)
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
    use caravan_api::{trust::DESIRED_TYPE, wire::AgentDocument};
    use ed25519_dalek::SigningKey;

    /// `d` as a relay serves it, signed by `keys`.
    fn served(d: &AgentDocument, keys: &[&SigningKey]) -> AgentServed {
        AgentServed {
            document: Envelope::sign(DESIRED_TYPE, &serde_json::to_vec(d).unwrap(), keys),
            lists: Default::default(),
        }
    }

    #[test]
    fn only_signed_documents_are_acted_on() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut trust = Trust::pin(&[Root::signed(1, &[&key])], None).unwrap();
        let now = Utc::now();
        let d = AgentDocument {
            agent: "a1".into(),
            version: 7,
            expires: (now + chrono::Duration::hours(1)).to_rfc3339(),
            ..Default::default()
        };
        // Unsigned, even one asking only to change nothing, is refused.
        let frozen = AgentDocument {
            frozen: true,
            ..d.clone()
        };
        for unsigned in [&d, &frozen] {
            assert!(matches!(
                trust.judge(&served(unsigned, &[]), "a1", now),
                Err(TrustError::NotSigned { .. })
            ));
        }
        assert!(trust.accepted.is_none());
        let accepted = trust.judge(&served(&d, &[&key]), "a1", now).unwrap();
        assert_eq!(trust.accepted.as_ref().unwrap().version, 7);
        assert!(expired(&accepted, now).is_none());
        assert!(expired(&accepted, now + chrono::Duration::hours(2)).is_some());
    }
}
