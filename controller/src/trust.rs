//! The controller's side of signed desired state (see `caravan_api::trust`):
//! its signing key and chain of roots, kept in `<data dir>/trust/`, and the
//! [`Signer`] that turns each agent's computed desired state into a signed
//! document with a version and an expiry.
//!
//! - `key-<n>`: the private key of root version `n` (0600), and
//!   `root-<n>.json`: root `n`, signed by its own key and (from 2 on) by the
//!   key before it. The newest signs; agents follow the chain.
//! - A document keeps its signature while its content is unchanged and more
//!   than half its lifetime is left; then it is signed anew under a new
//!   version, so a healthy fleet never holds an expired document.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use caravan_api::{
    trust::{Envelope, Root, DESIRED_TYPE},
    wire::{AgentDocument, SiteDesired},
};
use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::SigningKey;

use crate::{
    error::{Error, Result},
    index::{AgentPlan, ByName, SignedDocument, SignedPart, SiteKey},
};

/// The controller's signing key and the chain of roots that vouches for it.
pub struct TrustKeys {
    key: SigningKey,
    /// Every root, oldest first; the last is the key's.
    pub roots: Vec<Envelope>,
}

impl std::fmt::Debug for TrustKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustKeys")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

fn key_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(caravan_api::backup::trust_key_name(version))
}

fn root_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(caravan_api::backup::trust_root_name(version))
}

fn write_key(dir: &Path, version: u64, key: &SigningKey) -> Result<()> {
    let path = key_path(dir, version);
    let text = format!("{}\n", caravan_api::signing::encode_private(key));
    caravan_net::fs::write_private(&path, text.as_bytes(), caravan_net::fs::Existing::Keep)
        .map_err(|e| Error::io(&path, e))
}

fn write_root(dir: &Path, version: u64, root: &Envelope) -> Result<()> {
    let path = root_path(dir, version);
    let json = serde_json::to_vec_pretty(root).expect("an envelope serializes");
    caravan_net::fs::write_private(&path, &json, caravan_net::fs::Existing::Keep)
        .map_err(|e| Error::io(&path, e))
}

impl TrustKeys {
    /// Loads the newest key and every root from `dir`, creating key and
    /// root 1 on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if !root_path(dir, 1).exists() {
            let key = SigningKey::from_bytes(&rand::random());
            write_key(dir, 1, &key)?;
            write_root(dir, 1, &Root::signed(1, &[&key]))?;
        }
        let mut roots = Vec::new();
        let mut version = 1;
        while root_path(dir, version).exists() {
            let path = root_path(dir, version);
            let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let root: Envelope = serde_json::from_slice(&text)
                .map_err(|e| Error::io(&path, std::io::Error::other(format!("not a root: {e}"))))?;
            roots.push(root);
            version += 1;
        }
        let newest = version - 1;
        let path = key_path(dir, newest);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let key = caravan_api::signing::parse_private(&text)
            .map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
        // The chain must hold together and end in this key, or agents
        // would refuse everything: better to refuse to start.
        let (root, _) = caravan_api::trust::pin(&roots, None)
            .map_err(|e| Error::io(dir, std::io::Error::other(format!("roots: {e}"))))?;
        let public = caravan_api::signing::encode_public(&key.verifying_key());
        if root.version != newest || !root.keys.contains(&public) {
            return Err(Error::io(
                &path,
                std::io::Error::other(format!("key {newest} is not root {newest}'s key")),
            ));
        }
        Ok(Self { key, roots })
    }

    /// Makes a new key and root (signed by the current key and the new
    /// one), which the controller signs with from its next start; agents
    /// follow. Returns the new root's version.
    pub fn rotate(dir: &Path) -> Result<u64> {
        let current = Self::load_or_create(dir)?;
        let version = current.roots.len() as u64 + 1;
        let next = SigningKey::from_bytes(&rand::random());
        let body = serde_json::to_vec(&Root {
            version,
            keys: vec![caravan_api::signing::encode_public(&next.verifying_key())],
            threshold: 1,
        })
        .expect("a root serializes");
        let root = Envelope::sign(caravan_api::trust::ROOT_TYPE, &body, &[&current.key, &next]);
        write_key(dir, version, &next)?;
        write_root(dir, version, &root)?;
        Ok(version)
    }

    /// The newest root's fingerprint, to pin agents to.
    pub fn fingerprint(&self) -> String {
        caravan_api::trust::fingerprint(self.roots.last().expect("at least root 1"))
            .expect("our own root decodes")
    }
}

/// One agent's part on its way through [`Signer::sign_sites`].
enum Part {
    Unsigned(AgentPlan),
    /// Unchanged: last round's document.
    Reused(SignedPart),
    /// To sign: the document and its content's hash, then a version and
    /// an expiry.
    Changed {
        document: AgentDocument,
        content: [u8; 32],
    },
    /// Signed this round (then kept, and [`Part::Reused`]).
    New(Signed),
}

/// Runs `f` on every item, the items split between the machine's cores.
fn on_every_core<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below this, threads cost more than they save.
    const ALONE: usize = 256;
    if cores == 1 || items.len() <= ALONE {
        return items.iter_mut().for_each(f);
    }
    let chunk = items.len().div_ceil(cores);
    std::thread::scope(|scope| {
        for items in items.chunks_mut(chunk) {
            scope.spawn(|| items.iter_mut().for_each(&f));
        }
    });
}

/// One agent's last signed document.
struct Signed {
    /// The hash of the document without version and expiry
    /// ([`AgentPlan::content`]).
    content: [u8; 32],
    expires: DateTime<Utc>,
    envelope: SignedPart,
}

/// Signs each agent's desired state, reusing a signature while it is
/// still good (see the module docs).
pub struct Signer {
    key: SigningKey,
    roots: Vec<Envelope>,
    ttl: chrono::Duration,
    signed: ByName<Signed>,
    /// The last version handed out: versions only ever grow.
    last_version: u64,
}

impl Signer {
    pub fn new(keys: &TrustKeys, ttl: Duration) -> Self {
        Self {
            key: keys.key.clone(),
            roots: keys.roots.clone(),
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(7)),
            signed: ByName::default(),
            last_version: 0,
        }
    }

    /// Every site's desired state, each agent's part signed. The parts
    /// are hashed (to find the unchanged ones, whose documents are not even
    /// made) and the changed ones signed on every core; versions are handed
    /// out in between, one at a time.
    pub fn sign_sites(
        &mut self,
        sites: HashMap<SiteKey, SiteDesired<AgentPlan>>,
        now: DateTime<Utc>,
    ) -> HashMap<SiteKey, SiteDesired<SignedPart>> {
        let mut sites: Vec<(SiteKey, SiteDesired<Part>)> = sites
            .into_iter()
            .map(|(key, site)| (key, site.map_agents(|_, d, _| Part::Unsigned(d))))
            .collect();
        let mut parts: Vec<(&str, &str, &mut Part)> = sites
            .iter_mut()
            .flat_map(|(key, site)| {
                let ns = key.0.as_str();
                site.agents
                    .iter_mut()
                    .map(move |(name, part)| (ns, name.as_str(), part))
            })
            .collect();
        on_every_core(&mut parts, |(ns, name, part)| {
            self.reuse(ns, name, part, now)
        });
        let mut changed = 0usize;
        for (_, _, part) in &mut parts {
            if let Part::Changed { document, .. } = part {
                changed += 1;
                let version = (now.timestamp_millis().max(0) as u64).max(self.last_version + 1);
                self.last_version = version;
                document.version = version;
                document.expires = (now + self.ttl).to_rfc3339_opts(SecondsFormat::Millis, true);
            }
        }
        on_every_core(&mut parts, |(_, _, part)| self.sign(part, now));
        tracing::debug!(agents = parts.len(), changed, "desired state signed");
        // This round's record: last round's entries moved over (those of the
        // agents gone stay behind), the new ones put in.
        let mut last = std::mem::take(&mut self.signed);
        for (ns, name, part) in parts {
            let (name, signed) = match part {
                Part::New(signed) => {
                    let reused = Part::Reused(signed.envelope.clone());
                    let Part::New(signed) = std::mem::replace(part, reused) else {
                        unreachable!("matched as new")
                    };
                    (name.to_string(), signed)
                }
                // (Reused from last round's record, so it is there: each
                // agent is in one site, once.)
                _ => last
                    .take(ns, name)
                    .expect("a reused part has last round's record"),
            };
            self.signed.insert(ns, name, signed);
        }
        sites
            .into_iter()
            .map(|(key, site)| {
                let mut signed = site.map_agents(|_, part, _| match part {
                    Part::Reused(envelope) => envelope,
                    _ => unreachable!("every part is signed by now"),
                });
                signed.roots = self.roots.clone();
                (key, signed)
            })
            .collect()
    }

    /// Takes the signature of `part` (agent `name` of namespace `ns`) from
    /// the last round if its content is unchanged and it is not half-way to
    /// its expiry, else makes its document and marks it changed.
    fn reuse(&self, ns: &str, name: &str, part: &mut Part, now: DateTime<Utc>) {
        let Part::Unsigned(plan) = part else {
            return;
        };
        let content = plan.content();
        *part = match self.signed.get(ns, name) {
            Some(s) if s.content == content && s.expires - now > self.ttl / 2 => {
                Part::Reused(s.envelope.clone())
            }
            _ => Part::Changed {
                document: plan.document(),
                content,
            },
        };
    }

    /// Signs a changed part (its version and expiry already set).
    fn sign(&self, part: &mut Part, now: DateTime<Utc>) {
        let Part::Changed { document, content } = part else {
            return;
        };
        let body = serde_json::to_vec(&document).expect("wire types serialize");
        let envelope = SignedPart(std::sync::Arc::new(SignedDocument {
            envelope: Envelope::sign(DESIRED_TYPE, &body, &[&self.key]),
            lists: std::mem::take(&mut document.lists),
        }));
        *part = Part::New(Signed {
            content: *content,
            expires: now + self.ttl,
            envelope,
        });
    }

    /// When the first document is due to be signed anew.
    pub fn next_refresh(&self) -> Option<DateTime<Utc>> {
        self.signed.values().map(|s| s.expires - self.ttl / 2).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::{
        trust::{pin, verify_desired},
        wire::AgentServed,
    };

    /// What a relay serves of `part` (these documents name no lists).
    fn served(part: &SignedPart) -> AgentServed {
        AgentServed {
            document: part.0.envelope.clone(),
            lists: Default::default(),
        }
    }

    fn desired(agent: &str, hold: &str) -> AgentPlan {
        AgentPlan {
            agent: agent.into(),
            hold: vec![hold.into()],
            ..Default::default()
        }
    }

    fn site(agents: &[AgentPlan]) -> HashMap<SiteKey, SiteDesired<AgentPlan>> {
        let site = SiteDesired {
            site: "hq".into(),
            agents: agents
                .iter()
                .map(|a| (a.agent.clone(), a.clone()))
                .collect(),
            ..Default::default()
        };
        HashMap::from([(("ns".into(), "hq".into()), site)])
    }

    #[test]
    fn documents_are_signed_once_per_content_and_anew_before_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TrustKeys::load_or_create(dir.path()).unwrap();
        let (root, _) = pin(&keys.roots, None).unwrap();
        let mut signer = Signer::new(&keys, Duration::from_secs(100));
        let t0 = Utc::now();
        let agent = |signed: &HashMap<SiteKey, SiteDesired<SignedPart>>| {
            served(&signed[&("ns".to_string(), "hq".to_string())].agents["a1"])
        };
        let first = agent(&signer.sign_sites(site(&[desired("a1", "x")]), t0));
        let (d1, accepted) = verify_desired(&first, &root, "a1", None, t0).unwrap();
        assert_eq!(d1.hold, ["x"]);
        // Unchanged, and not yet half-way to expiry: the same document.
        let t1 = t0 + chrono::Duration::seconds(40);
        assert_eq!(
            agent(&signer.sign_sites(site(&[desired("a1", "x")]), t1)),
            first
        );
        // Past half-way: signed anew, a newer version the agent takes.
        let t2 = t0 + chrono::Duration::seconds(60);
        let renewed = agent(&signer.sign_sites(site(&[desired("a1", "x")]), t2));
        let (d2, accepted) = verify_desired(&renewed, &root, "a1", Some(&accepted), t2).unwrap();
        assert!(d2.version > d1.version);
        // Changed content: a newer version at once, even in the same millisecond.
        let changed = agent(&signer.sign_sites(site(&[desired("a1", "y")]), t2));
        let (d3, _) = verify_desired(&changed, &root, "a1", Some(&accepted), t2).unwrap();
        assert!(d3.version > d2.version && d3.hold == ["y"]);
        assert_eq!(
            signer.next_refresh(),
            Some(t2 + chrono::Duration::seconds(50))
        );
        // An agent gone is forgotten.
        signer.sign_sites(site(&[]), t2);
        assert_eq!(signer.next_refresh(), None);
    }

    #[test]
    fn a_fleet_is_signed_on_every_core_each_agent_its_own_document() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TrustKeys::load_or_create(dir.path()).unwrap();
        let (root, _) = pin(&keys.roots, None).unwrap();
        let mut signer = Signer::new(&keys, Duration::from_secs(100));
        let now = Utc::now();
        // More agents than one thread takes alone.
        let fleet = |changed: &str| {
            let agents: Vec<_> = (0..1000)
                .map(|i| {
                    let name = format!("a{i}");
                    let hold = if name == changed { "new" } else { "old" };
                    desired(&name, &format!("{hold}-{i}"))
                })
                .collect();
            site(&agents)
        };
        let docs = |signed: &HashMap<SiteKey, SiteDesired<SignedPart>>| {
            signed[&("ns".to_string(), "hq".to_string())].agents.clone()
        };
        let first = docs(&signer.sign_sites(fleet(""), now));
        let mut versions = std::collections::HashSet::new();
        for (name, doc) in &first {
            let (d, _) = verify_desired(&served(doc), &root, name, None, now).unwrap();
            assert_eq!(d.hold, [format!("old-{}", &name[1..])]);
            versions.insert(d.version);
        }
        assert_eq!(versions.len(), 1000, "every document its own version");
        // One agent changed: only its document is signed anew.
        let second = docs(&signer.sign_sites(fleet("a7"), now));
        for (name, doc) in &second {
            let same = std::sync::Arc::ptr_eq(&doc.0, &first[name].0);
            assert_eq!(same, name != "a7", "{name}");
        }
        let (d, _) = verify_desired(&served(&second["a7"]), &root, "a7", None, now).unwrap();
        assert!(d.hold == ["new-7"] && d.version > versions.into_iter().max().unwrap());
    }

    #[test]
    fn a_rotated_key_signs_and_agents_on_the_old_root_follow() {
        let dir = tempfile::tempdir().unwrap();
        let old = TrustKeys::load_or_create(dir.path()).unwrap();
        let (root1, _) = pin(&old.roots, None).unwrap();
        assert_eq!(TrustKeys::rotate(dir.path()).unwrap(), 2);
        let keys = TrustKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(keys.roots.len(), 2);
        let now = Utc::now();
        let mut signer = Signer::new(&keys, Duration::from_secs(100));
        let signed = signer.sign_sites(site(&[desired("a1", "x")]), now);
        let doc = &signed[&("ns".to_string(), "hq".to_string())];
        let envelope = &served(&doc.agents["a1"]);
        assert!(
            verify_desired(envelope, &root1, "a1", None, now).is_err(),
            "root 1's key does not sign any more"
        );
        let (root2, _) = root1.follow(&doc.roots).unwrap().unwrap();
        assert!(verify_desired(envelope, &root2, "a1", None, now).is_ok());
        // A key file that does not match its root stops the controller.
        std::fs::remove_file(key_path(dir.path(), 2)).unwrap();
        write_key(dir.path(), 2, &SigningKey::from_bytes(&[5; 32])).unwrap();
        assert!(TrustKeys::load_or_create(dir.path()).is_err());
    }
}
