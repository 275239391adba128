//! Signed documents, so that nobody between the controller and an agent (a
//! relay, a branch LAN) can make the agent act on anything the controller
//! did not say.
//!
//! - An [`Envelope`] is a DSSE envelope (the Dead Simple Signing Envelope of
//!   in-toto and sigstore): a payload, its type, and ed25519 signatures over
//!   DSSE's pre-authentication encoding of both, so a signature can be
//!   neither moved to another document nor to another kind of document.
//! - A [`Root`] says which keys sign and how many must (TUF's root role): an
//!   agent pins one at enrollment and follows a rotation only through a
//!   chain of roots, each signed by the keys of the one before and its own.
//! - The controller signs each agent's whole desired state
//!   ([`crate::wire::AgentDocument`], with a version and an expiry, naming
//!   its assignment lists by digest) under the
//!   root's keys; see [`verify_desired`] for what an agent refuses.
//! - Each agent signs its reports ([`crate::wire::AgentReport`], with a
//!   sequence that only grows) with the key it enrolled with, so a relay
//!   can neither forge nor replay one; see [`verify_report`].

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use crate::wire::{Envelope, EnvelopeSignature};
use crate::{
    signing,
    wire::{AgentDesired, AgentDocument, AgentReport, AgentServed, AssignmentList, ListError},
    Digest,
};
use std::collections::BTreeMap;

/// What an endpoint needs to enroll at a site and to trust what it is told
/// there, in one file: `caravan token create --bundle FILE` writes it from
/// the Site's status, `caravan-agent run --bundle FILE` reads it. It closes
/// trust on first use: the agent pins the root and the CA it names, not
/// whatever its relay offers.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollmentBundle {
    /// The bootstrap token (`<id>.<secret>`).
    pub bootstrap_token: String,
    /// sha256 of the controller's root of trust (`--trust-root-sha256`).
    pub trust_root_sha256: String,
    /// The CA (PEM) that issues the site's relay certificate (`--ca-file`).
    pub ca: String,
}

impl std::fmt::Debug for EnrollmentBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentBundle")
            .field("bootstrap_token", &"<redacted>")
            .field("trust_root_sha256", &self.trust_root_sha256)
            .finish_non_exhaustive()
    }
}

/// The payload type of an agent's desired state ([`AgentDocument`]). (v1
/// was a document that carried its assignments: an agent of this release
/// refuses one, as it is not a document that names its lists.)
pub const DESIRED_TYPE: &str = "application/vnd.caravan.agent-document.v2+json";
/// The payload type of a root of trust.
pub const ROOT_TYPE: &str = "application/vnd.caravan.root.v1+json";
/// The payload type of an agent's report.
pub const REPORT_TYPE: &str = "application/vnd.caravan.agent-report.v1+json";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("not a signed document: {0}")]
    Malformed(String),
    #[error("a {found} document where a {expected} was expected")]
    WrongType { expected: String, found: String },
    #[error("signed by {found} of the {threshold} trusted keys needed")]
    NotSigned { found: usize, threshold: usize },
    #[error("signed for agent {found}, not for {expected}")]
    OtherAgent { expected: String, found: String },
    #[error("desired state version {found} is older than version {accepted}, accepted already (a rollback)")]
    Rollback { accepted: u64, found: u64 },
    #[error("desired state version {version} changed content without a new version")]
    Equivocation { version: u64 },
    #[error("desired state version {version} expired at {expires} (updates are being withheld, or the controller is away)")]
    Expired { version: u64, expires: String },
    #[error("root version {found} does not follow version {current}")]
    RootOutOfOrder { current: u64, found: u64 },
    #[error("report sequence {found} is not newer than {accepted}, accepted already (a replay, or the endpoint's clock went back)")]
    Replayed { accepted: u64, found: u64 },
    #[error("desired state version {version} names assignment list {list}, which was not served with it (withheld)")]
    ListWithheld { version: u64, list: Digest },
    #[error("assignment list {list} of desired state version {version} was refused: {error}")]
    ListRefused {
        version: u64,
        list: Digest,
        error: ListError,
    },
}

impl TrustError {
    /// One word for a condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "Malformed",
            Self::WrongType { .. } => "WrongType",
            Self::NotSigned { .. } => "NotSigned",
            Self::OtherAgent { .. } => "OtherAgent",
            Self::Rollback { .. } => "Rollback",
            Self::Equivocation { .. } => "Equivocation",
            Self::Expired { .. } => "Expired",
            Self::RootOutOfOrder { .. } => "RootOutOfOrder",
            Self::Replayed { .. } => "Replayed",
            Self::ListWithheld { .. } => "ListWithheld",
            Self::ListRefused { .. } => "ListRefused",
        }
    }

    /// What an agent reports.
    pub fn refusal(&self) -> crate::wire::Refusal {
        crate::wire::Refusal {
            reason: self.reason().into(),
            message: self.to_string(),
        }
    }
}

/// DSSE's pre-authentication encoding.
fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

impl Envelope {
    /// `body` of type `payload_type`, signed by every key of `keys`.
    pub fn sign(payload_type: &str, body: &[u8], keys: &[&SigningKey]) -> Self {
        let message = pae(payload_type, body);
        Self {
            payload: B64.encode(body),
            payload_type: payload_type.to_string(),
            signatures: keys
                .iter()
                .map(|k| EnvelopeSignature {
                    keyid: signing::key_id(&k.verifying_key()),
                    sig: B64.encode(k.sign(&message).to_bytes()),
                })
                .collect(),
        }
    }

    /// The payload, unverified: for a relay, which only passes documents on
    /// and reads which blobs they name, never for acting on them.
    pub fn unverified_payload(&self) -> Result<Vec<u8>, TrustError> {
        B64.decode(&self.payload)
            .map_err(|e| TrustError::Malformed(format!("payload: {e}")))
    }

    /// The payload, if this is a `payload_type` document signed by at least
    /// `threshold` distinct keys of `keys`.
    pub fn verify(
        &self,
        payload_type: &str,
        keys: &[VerifyingKey],
        threshold: usize,
    ) -> Result<Vec<u8>, TrustError> {
        if self.payload_type != payload_type {
            return Err(TrustError::WrongType {
                expected: payload_type.into(),
                found: self.payload_type.clone(),
            });
        }
        let body = self.unverified_payload()?;
        let message = pae(payload_type, &body);
        let mut signers: Vec<String> = Vec::new();
        for s in &self.signatures {
            let Some(key) = keys.iter().find(|k| signing::key_id(k) == s.keyid) else {
                continue;
            };
            let ok = B64
                .decode(&s.sig)
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
                .is_some_and(|sig| key.verify_strict(&message, &sig).is_ok());
            if ok && !signers.contains(&s.keyid) {
                signers.push(s.keyid.clone());
            }
        }
        if signers.len() < threshold.max(1) {
            return Err(TrustError::NotSigned {
                found: signers.len(),
                threshold: threshold.max(1),
            });
        }
        Ok(body)
    }
}

/// A root of trust: the keys that sign desired state and the next root.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    /// Starts at 1; each rotation adds one.
    pub version: u64,
    /// `ed25519:<base64>` public keys.
    pub keys: Vec<String>,
    /// How many of them must sign.
    pub threshold: u32,
}

impl Root {
    /// The root's keys; a malformed one is an error.
    pub fn verifying_keys(&self) -> Result<Vec<VerifyingKey>, TrustError> {
        self.keys
            .iter()
            .map(|k| signing::parse_public(k).map_err(|e| TrustError::Malformed(e.to_string())))
            .collect()
    }

    /// The root made of `keys`, signed by them.
    pub fn signed(version: u64, keys: &[&SigningKey]) -> Envelope {
        let root = Root {
            version,
            keys: keys
                .iter()
                .map(|k| signing::encode_public(&k.verifying_key()))
                .collect(),
            threshold: keys.len() as u32,
        };
        Envelope::sign(
            ROOT_TYPE,
            &serde_json::to_vec(&root).expect("a root serializes"),
            keys,
        )
    }

    /// A root an agent is given at enrollment, checked to be signed by its
    /// own keys; `expected` (the sha256 of its payload, from the operator)
    /// pins it against whoever handed it over.
    pub fn first(envelope: &Envelope, expected: Option<&str>) -> Result<Self, TrustError> {
        let body = envelope.unverified_payload()?;
        let root: Root =
            serde_json::from_slice(&body).map_err(|e| TrustError::Malformed(e.to_string()))?;
        envelope.verify(ROOT_TYPE, &root.verifying_keys()?, root.threshold as usize)?;
        if let Some(expected) = expected {
            let found = hex::encode(Sha256::digest(&body));
            if !found.eq_ignore_ascii_case(expected) {
                return Err(TrustError::Malformed(format!(
                    "root sha256 {found} is not the one this agent was told to trust ({expected})"
                )));
            }
        }
        Ok(root)
    }

    /// The next root, if `envelope` is version `self.version + 1` signed by
    /// this root's keys and by its own (TUF's root rotation).
    pub fn rotate(&self, envelope: &Envelope) -> Result<Self, TrustError> {
        let body = envelope.verify(ROOT_TYPE, &self.verifying_keys()?, self.threshold as usize)?;
        let next: Root =
            serde_json::from_slice(&body).map_err(|e| TrustError::Malformed(e.to_string()))?;
        if next.version != self.version + 1 {
            return Err(TrustError::RootOutOfOrder {
                current: self.version,
                found: next.version,
            });
        }
        envelope.verify(ROOT_TYPE, &next.verifying_keys()?, next.threshold as usize)?;
        Ok(next)
    }
}

/// The sha256 (hex) of a root's payload: what an operator pins an agent
/// to (`caravan-agent run --trust-root-sha256`).
pub fn fingerprint(envelope: &Envelope) -> Result<String, TrustError> {
    Ok(hex::encode(Sha256::digest(envelope.unverified_payload()?)))
}

/// A root to trust from a chain of roots (oldest first, as a relay hands
/// it over): the one whose [`fingerprint`] is `pinned` (or, without a pin,
/// the first: trust on first use), followed to the newest through
/// [`Root::rotate`]. Returns the newest root and its envelope.
pub fn pin(chain: &[Envelope], pinned: Option<&str>) -> Result<(Root, Envelope), TrustError> {
    let start = match pinned {
        Some(pin) => chain
            .iter()
            .position(|e| fingerprint(e).is_ok_and(|f| f.eq_ignore_ascii_case(pin)))
            .ok_or_else(|| {
                TrustError::Malformed(format!(
                    "none of the {} roots offered has the pinned sha256 {pin}",
                    chain.len()
                ))
            })?,
        None => 0,
    };
    let first = chain
        .get(start)
        .ok_or_else(|| TrustError::Malformed("no root offered".into()))?;
    let root = Root::first(first, pinned)?;
    Ok(root
        .follow(&chain[start + 1..])?
        .unwrap_or_else(|| (root, first.clone())))
}

impl Root {
    /// Follows the rotations in `chain` (oldest first) past this root's
    /// version, each signed by the root before it; the newest root reached,
    /// if any. A root that does not follow stops it with an error.
    pub fn follow(&self, chain: &[Envelope]) -> Result<Option<(Root, Envelope)>, TrustError> {
        let mut at: Option<(Root, Envelope)> = None;
        for e in chain {
            let current = at.as_ref().map_or(self, |(r, _)| r);
            let version = Root::first(e, None).map(|r| r.version).unwrap_or(0);
            if version <= current.version {
                continue;
            }
            let next = current.rotate(e)?;
            at = Some((next, e.clone()));
        }
        Ok(at)
    }
}

/// What an agent last accepted of its desired state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub version: u64,
    /// sha256 of the accepted payload.
    pub payload_sha256: String,
}

/// The desired state `served`, if its document is signed under `root`,
/// for `agent`, not older than what was `accepted` (a rollback), not a
/// second content under an accepted version, and not expired at `now`, and
/// every assignment list it names was served with it, unchanged. Returns it
/// (the lists put in) and what to remember as accepted.
pub fn verify_desired(
    served: &AgentServed,
    root: &Root,
    agent: &str,
    accepted: Option<&Accepted>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(AgentDesired, Accepted), TrustError> {
    let body = served.document.verify(
        DESIRED_TYPE,
        &root.verifying_keys()?,
        root.threshold as usize,
    )?;
    let document: AgentDocument =
        serde_json::from_slice(&body).map_err(|e| TrustError::Malformed(e.to_string()))?;
    if document.agent != agent {
        return Err(TrustError::OtherAgent {
            expected: agent.into(),
            found: document.agent,
        });
    }
    let sha = hex::encode(Sha256::digest(&body));
    let version = document.version;
    if let Some(a) = accepted {
        if version < a.version {
            return Err(TrustError::Rollback {
                accepted: a.version,
                found: version,
            });
        }
        if version == a.version && sha != a.payload_sha256 {
            return Err(TrustError::Equivocation { version });
        }
    }
    let expired = chrono::DateTime::parse_from_rfc3339(&document.expires)
        .map(|t| t <= now)
        .unwrap_or(true);
    if expired {
        return Err(TrustError::Expired {
            version,
            expires: document.expires,
        });
    }
    let desired = with_lists(document, &served.lists)?;
    let accepted = Accepted {
        version,
        payload_sha256: sha,
    };
    Ok((desired, accepted))
}

/// `document` with the assignment lists it names put in, each checked
/// against its digest (the document itself is not checked here: see
/// [`verify_desired`]).
pub fn with_lists(
    document: AgentDocument,
    lists: &BTreeMap<Digest, AssignmentList>,
) -> Result<AgentDesired, TrustError> {
    let version = document.version;
    let mut assignments = Vec::new();
    for &list in &document.lists {
        let served = lists
            .get(&list)
            .ok_or(TrustError::ListWithheld { version, list })?;
        let opened = served
            .open(&list)
            .map_err(|error| TrustError::ListRefused {
                version,
                list,
                error,
            })?;
        assignments.extend(opened);
    }
    Ok(AgentDesired {
        agent: document.agent,
        assignments,
        hold: document.hold,
        frozen: document.frozen,
        version,
        expires: document.expires,
    })
}

/// `report`, signed with the agent's `key`.
pub fn sign_report(report: &AgentReport, key: &SigningKey) -> Envelope {
    let body = serde_json::to_vec(report).expect("a report serializes");
    Envelope::sign(REPORT_TYPE, &body, &[key])
}

/// The agent a signed report says it is from, unverified: for finding the
/// key to verify it with, never for acting on it.
pub fn report_agent(envelope: &Envelope) -> Result<String, TrustError> {
    #[derive(Deserialize)]
    struct Agent {
        agent: String,
    }
    let body = envelope.unverified_payload()?;
    let a: Agent =
        serde_json::from_slice(&body).map_err(|e| TrustError::Malformed(e.to_string()))?;
    Ok(a.agent)
}

/// The report in `envelope`, if `key` (the Agent's) signed it, it is
/// `agent`'s, and its sequence is above `accepted` (the last one taken).
pub fn verify_report(
    envelope: &Envelope,
    key: &VerifyingKey,
    agent: &str,
    accepted: u64,
) -> Result<AgentReport, TrustError> {
    let body = envelope.verify(REPORT_TYPE, std::slice::from_ref(key), 1)?;
    let report: AgentReport =
        serde_json::from_slice(&body).map_err(|e| TrustError::Malformed(e.to_string()))?;
    if report.agent != agent {
        return Err(TrustError::OtherAgent {
            expected: agent.into(),
            found: report.agent,
        });
    }
    // Kept in the Agent's status, where integers are int64.
    if report.sequence > i64::MAX as u64 || report.desired_version > i64::MAX as u64 {
        return Err(TrustError::Malformed(
            "sequence or desiredVersion beyond 2^63".into(),
        ));
    }
    if report.sequence <= accepted {
        return Err(TrustError::Replayed {
            accepted,
            found: report.sequence,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn desired(agent: &str, version: u64, expires: &str) -> AgentDocument {
        AgentDocument {
            agent: agent.into(),
            version,
            expires: expires.into(),
            ..Default::default()
        }
    }

    fn sign(d: &AgentDocument, k: &SigningKey) -> AgentServed {
        AgentServed {
            document: Envelope::sign(DESIRED_TYPE, &serde_json::to_vec(d).unwrap(), &[k]),
            lists: Default::default(),
        }
    }

    const LATER: &str = "2100-01-01T00:00:00Z";

    #[test]
    fn only_a_document_signed_under_the_root_for_this_agent_is_taken() {
        let k = key(1);
        let root = Root::first(&Root::signed(1, &[&k]), None).unwrap();
        let now = chrono::Utc::now();
        let doc = sign(&desired("a1", 5, LATER), &k);
        let (d, accepted) = verify_desired(&doc, &root, "a1", None, now).unwrap();
        assert_eq!((d.version, accepted.version), (5, 5));
        // Another key, another agent, another type, a touched payload.
        let e = verify_desired(
            &sign(&desired("a1", 6, LATER), &key(2)),
            &root,
            "a1",
            None,
            now,
        );
        assert!(
            matches!(e, Err(TrustError::NotSigned { found: 0, .. })),
            "{e:?}"
        );
        let e = verify_desired(&doc, &root, "a2", None, now);
        assert!(matches!(e, Err(TrustError::OtherAgent { .. })), "{e:?}");
        let mut retyped = doc.clone();
        retyped.document.payload_type = ROOT_TYPE.into();
        assert!(matches!(
            verify_desired(&retyped, &root, "a1", None, now),
            Err(TrustError::WrongType { .. })
        ));
        let mut tampered = doc.clone();
        let mut body = B64.decode(&tampered.document.payload).unwrap();
        body[5] ^= 1;
        tampered.document.payload = B64.encode(body);
        assert!(verify_desired(&tampered, &root, "a1", None, now).is_err());
        let mut unsigned = doc.clone();
        unsigned.document.signatures.clear();
        assert!(matches!(
            verify_desired(&unsigned, &root, "a1", None, now),
            Err(TrustError::NotSigned { .. })
        ));
    }

    #[test]
    fn rollbacks_equivocation_and_expired_documents_are_refused() {
        let k = key(1);
        let root = Root::first(&Root::signed(1, &[&k]), None).unwrap();
        let now = chrono::Utc::now();
        let (_, accepted) =
            verify_desired(&sign(&desired("a1", 5, LATER), &k), &root, "a1", None, now).unwrap();
        let e = verify_desired(
            &sign(&desired("a1", 4, LATER), &k),
            &root,
            "a1",
            Some(&accepted),
            now,
        );
        assert!(
            matches!(
                e,
                Err(TrustError::Rollback {
                    accepted: 5,
                    found: 4
                })
            ),
            "{e:?}"
        );
        let mut other = desired("a1", 5, LATER);
        other.hold = vec!["x".into()];
        let e = verify_desired(&sign(&other, &k), &root, "a1", Some(&accepted), now);
        assert!(
            matches!(e, Err(TrustError::Equivocation { version: 5 })),
            "{e:?}"
        );
        assert!(verify_desired(
            &sign(&desired("a1", 5, LATER), &k),
            &root,
            "a1",
            Some(&accepted),
            now
        )
        .is_ok());
        let e = verify_desired(
            &sign(&desired("a1", 6, "2020-01-01T00:00:00Z"), &k),
            &root,
            "a1",
            Some(&accepted),
            now,
        );
        assert!(matches!(e, Err(TrustError::Expired { .. })), "{e:?}");
    }

    #[test]
    fn a_document_of_the_format_before_lists_is_refused_not_read_as_empty() {
        // A v1 document the same key signed, carrying its assignments: read
        // as a document that names no lists it would remove everything.
        let k = key(1);
        let root = Root::first(&Root::signed(1, &[&k]), None).unwrap();
        let now = chrono::Utc::now();
        let old = serde_json::json!({
            "agent": "a1", "version": 5, "expires": LATER,
            "assignments": [{"job": "ns/j", "action": "install", "package": "p", "version": "1",
                "digest": Digest::of(b"p"), "size": 1, "install": {}}],
        });
        let body = serde_json::to_vec(&old).unwrap();
        let served = |payload_type: &str| AgentServed {
            document: Envelope::sign(payload_type, &body, &[&k]),
            lists: Default::default(),
        };
        let e = verify_desired(
            &served("application/vnd.caravan.agent-desired.v1+json"),
            &root,
            "a1",
            None,
            now,
        );
        assert!(matches!(e, Err(TrustError::WrongType { .. })), "{e:?}");
        // Nor under the new type: a field it does not know is refused.
        let e = verify_desired(&served(DESIRED_TYPE), &root, "a1", None, now);
        assert!(
            matches!(&e, Err(TrustError::Malformed(m)) if m.contains("assignments")),
            "{e:?}"
        );
    }

    #[test]
    fn every_list_a_document_names_must_be_served_unchanged() {
        use crate::wire::{Assignment, AssignmentList};
        let k = key(1);
        let root = Root::first(&Root::signed(1, &[&k]), None).unwrap();
        let now = chrono::Utc::now();
        let list = |package: &str| {
            let a: Assignment = serde_json::from_value(serde_json::json!({
                "job": "ns/j", "action": "install", "package": package, "version": "1",
                "digest": Digest::of(package.as_bytes()), "size": 1, "install": {},
            }))
            .unwrap();
            AssignmentList::new(&[a])
        };
        let ((d1, l1), (d2, l2)) = (list("one"), list("two"));
        let mut doc = desired("a1", 5, LATER);
        doc.lists = vec![d2, d1];
        let mut served = sign(&doc, &k);
        served.lists = [(d1, l1.clone()), (d2, l2.clone())].into();
        let (d, _) = verify_desired(&served, &root, "a1", None, now).unwrap();
        let packages: Vec<_> = d.assignments.iter().map(|a| a.package.as_str()).collect();
        assert_eq!(packages, ["two", "one"], "in the document's order");
        // Withheld.
        let mut withheld = served.clone();
        withheld.lists.remove(&d1);
        let e = verify_desired(&withheld, &root, "a1", None, now).unwrap_err();
        assert_eq!(
            e,
            TrustError::ListWithheld {
                version: 5,
                list: d1
            }
        );
        assert!(e.to_string().contains(&d1.to_string()), "{e}");
        // Another list under the digest, or the list's bytes changed.
        let mut swapped = served.clone();
        swapped.lists.insert(d1, l2.clone());
        let e = verify_desired(&swapped, &root, "a1", None, now).unwrap_err();
        assert!(
            matches!(e, TrustError::ListRefused { list, error: ListError::Tampered, .. } if list == d1),
            "{e:?}"
        );
        let touched = l1.json().replace("one", "evil");
        let mut touched_served = served.clone();
        touched_served
            .lists
            .insert(d1, serde_json::from_str(&touched).unwrap());
        assert!(matches!(
            verify_desired(&touched_served, &root, "a1", None, now),
            Err(TrustError::ListRefused { .. })
        ));
        // Lists the document does not name change nothing.
        let mut extra = served.clone();
        extra.lists.insert(Digest::of(b"x"), l2);
        assert_eq!(verify_desired(&extra, &root, "a1", None, now).unwrap().0, d);
    }

    #[test]
    fn a_root_rotates_only_through_a_root_both_old_and_new_keys_signed() {
        let (old, new) = (key(1), key(2));
        let root = Root::first(&Root::signed(1, &[&old]), None).unwrap();
        // Version 2 with the new key, signed by old and new.
        let body = serde_json::to_vec(&Root {
            version: 2,
            keys: vec![signing::encode_public(&new.verifying_key())],
            threshold: 1,
        })
        .unwrap();
        let both = Envelope::sign(ROOT_TYPE, &body, &[&old, &new]);
        let next = root.rotate(&both).unwrap();
        assert_eq!(next.version, 2);
        assert!(
            root.rotate(&Envelope::sign(ROOT_TYPE, &body, &[&new]))
                .is_err(),
            "the old keys must agree"
        );
        assert!(
            root.rotate(&Envelope::sign(ROOT_TYPE, &body, &[&old]))
                .is_err(),
            "the new keys must agree"
        );
        assert!(matches!(
            next.rotate(&both),
            Err(TrustError::RootOutOfOrder { .. }) | Err(TrustError::NotSigned { .. })
        ));
        // A pinned fingerprint is checked.
        let first = Root::signed(1, &[&old]);
        let sha = hex::encode(Sha256::digest(B64.decode(&first.payload).unwrap()));
        assert!(Root::first(&first, Some(&sha)).is_ok());
        assert!(Root::first(&first, Some(&"0".repeat(64))).is_err());
    }

    #[test]
    fn an_agent_pins_a_root_and_follows_the_chain_to_the_newest() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let r1 = Root::signed(1, &[&k1]);
        let next = |version: u64, old: &SigningKey, new: &SigningKey| {
            let body = serde_json::to_vec(&Root {
                version,
                keys: vec![signing::encode_public(&new.verifying_key())],
                threshold: 1,
            })
            .unwrap();
            Envelope::sign(ROOT_TYPE, &body, &[old, new])
        };
        let (r2, r3) = (next(2, &k1, &k2), next(3, &k2, &k3));
        let chain = [r1.clone(), r2.clone(), r3.clone()];
        // Trust on first use: from version 1 to 3.
        let (root, env) = pin(&chain, None).unwrap();
        assert_eq!((root.version, &env), (3, &r3));
        // Pinned to version 2: the same newest root.
        let (root, _) = pin(&chain, Some(&fingerprint(&r2).unwrap())).unwrap();
        assert_eq!(root.version, 3);
        // A pin no root has, and a chain with a forged link, are refused.
        assert!(pin(&chain, Some(&"ab".repeat(32))).is_err());
        let forged = next(3, &key(9), &key(9));
        assert!(pin(&[r1.clone(), r2.clone(), forged], None).is_err());
        // An agent at version 2 follows only what is newer.
        let at2 = Root::first(&r1, None).unwrap().rotate(&r2).unwrap();
        assert_eq!(at2.follow(&chain).unwrap().unwrap().0.version, 3);
        assert!(at2.follow(&chain[..2]).unwrap().is_none());
    }

    #[test]
    fn a_report_counts_only_signed_by_its_agent_for_itself_and_newer_than_the_last() {
        let report: AgentReport = serde_json::from_value(serde_json::json!({
            "agent": "desk", "sequence": 10, "version": "1", "os": "linux", "arch": "x86_64",
            "installed": [], "jobs": []
        }))
        .unwrap();
        let (agent_key, other) = (key(1), key(2));
        let signed = sign_report(&report, &agent_key);
        let k = agent_key.verifying_key();
        assert_eq!(report_agent(&signed).unwrap(), "desk");
        assert_eq!(verify_report(&signed, &k, "desk", 9).unwrap(), report);
        let reason = |r: Result<AgentReport, TrustError>| r.unwrap_err().reason();
        // Replayed: not above the last one taken.
        assert_eq!(reason(verify_report(&signed, &k, "desk", 10)), "Replayed");
        // Another agent's key, or the payload changed under the signature.
        assert_eq!(
            reason(verify_report(&sign_report(&report, &other), &k, "desk", 0)),
            "NotSigned"
        );
        let mut changed = report.clone();
        changed.sequence = 11;
        let spliced = Envelope {
            payload: B64.encode(serde_json::to_vec(&changed).unwrap()),
            ..signed.clone()
        };
        assert_eq!(reason(verify_report(&spliced, &k, "desk", 0)), "NotSigned");
        // Signed by the agent, but for another: the name is the agent's to sign.
        assert_eq!(reason(verify_report(&signed, &k, "lab", 0)), "OtherAgent");
        // A desired-state document is not a report.
        let desired = Envelope::sign(
            DESIRED_TYPE,
            &serde_json::to_vec(&report).unwrap(),
            &[&agent_key],
        );
        assert_eq!(reason(verify_report(&desired, &k, "desk", 0)), "WrongType");
    }
}
