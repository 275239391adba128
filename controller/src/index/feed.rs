//! Every site's desired state as served to its relay, revision by revision.
//! A relay that holds an earlier revision of this process is answered with
//! what changed since: the agents whose signed document or key changed, and
//! those no longer served. A change that concerns a few agents of a large
//! site costs a few agents' worth of work, bytes and parsing, and nothing
//! is kept serialized: each agent's document exists once in memory.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
};

use caravan_api::{
    wire::{Envelope, SiteDesired, MAX_REMOVALS_KEPT},
    Digest,
};

use super::SiteKey;

/// An agent's signed document, shared by the signer's record of it and by
/// the site feeds that serve it: one copy in memory, however often the
/// index is computed (serialized as the envelope itself).
#[derive(Clone, Debug, PartialEq)]
pub struct SignedPart(pub Arc<SignedDocument>);

/// An agent's signed document and the assignment lists it names.
#[derive(Debug, PartialEq)]
pub struct SignedDocument {
    pub envelope: Envelope,
    pub lists: Vec<Digest>,
}

impl serde::Serialize for SignedPart {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.envelope.serialize(serializer)
    }
}

/// An agent's document in a site's feed, with the revision at which it (or
/// the agent's key) last changed; serialized as the envelope.
#[derive(Clone, Debug)]
pub struct Served {
    pub part: SignedPart,
    pub changed: u64,
}

impl serde::Serialize for Served {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.part.serialize(serializer)
    }
}

/// Desired state of every site, as served to relays.
#[derive(Debug)]
pub struct DesiredIndex {
    pub sites: HashMap<SiteKey, Arc<SiteFeed>>,
    /// This process's line of revisions: a revision (ETag) handed out by
    /// another process or replica never matches one of these.
    epoch: u64,
    /// The last revision handed out, for all sites alike: a site deleted and
    /// made anew never reuses one a relay may still hold.
    revision: u64,
}

impl Default for DesiredIndex {
    fn default() -> Self {
        Self {
            sites: HashMap::new(),
            epoch: rand::random(),
            revision: 0,
        }
    }
}

impl DesiredIndex {
    /// The index serving `signed` (every site's desired state, each agent's
    /// part signed), or `None` when it would serve nothing differently. A
    /// site whose state did not change keeps its feed (and its revision).
    pub fn next(&self, signed: HashMap<SiteKey, SiteDesired<SignedPart>>) -> Option<Self> {
        let revision = self.revision + 1;
        let mut changed = self.sites.len() != signed.len();
        let sites = signed
            .into_iter()
            .map(|(key, desired)| {
                let prev = self.sites.get(&key);
                let feed = match prev {
                    Some(prev) => prev.next(desired, revision).map(Arc::new),
                    None => Some(Arc::new(SiteFeed::new(desired, self.epoch, revision))),
                };
                let feed = feed.map_or_else(
                    || prev.expect("unchanged means known").clone(),
                    |f| {
                        changed = true;
                        f
                    },
                );
                (key, feed)
            })
            .collect();
        changed.then_some(Self {
            sites,
            epoch: self.epoch,
            revision,
        })
    }
}

/// Too many whole desired states are being made: ask again shortly.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

/// One site's desired state, the revision it is at, and enough history to
/// answer a relay with what changed since an earlier one.
#[derive(Debug)]
pub struct SiteFeed {
    /// The whole desired state.
    desired: SiteDesired<Served>,
    epoch: u64,
    revision: u64,
    /// Agents no longer served, with the revision they left at, oldest first.
    removed: VecDeque<(u64, String)>,
    /// The earliest revision changes can be answered from: the feed's first,
    /// or the last whose removals were forgotten.
    horizon: u64,
}

impl SiteFeed {
    fn new(desired: SiteDesired<SignedPart>, epoch: u64, revision: u64) -> Self {
        Self {
            desired: desired.map_agents(|_, part, _| Served {
                part,
                changed: revision,
            }),
            epoch,
            revision,
            removed: VecDeque::new(),
            horizon: revision,
        }
    }

    /// This feed at `revision` serving `desired`, or `None` if that is what
    /// it serves already.
    fn next(&self, desired: SiteDesired<SignedPart>, revision: u64) -> Option<Self> {
        let old = &self.desired;
        let mut agents_changed = false;
        // Old and new agents side by side, both in name order.
        let (mut olds, mut old_keys) = (
            old.agents.iter().peekable(),
            old.agent_keys.iter().peekable(),
        );
        let mut gone: Vec<&String> = Vec::new();
        let desired = desired.map_agents(|name, part, key| {
            while let Some((n, _)) = olds.next_if(|(n, _)| n.as_str() < name) {
                gone.push(n);
            }
            let prev = olds.next_if(|(n, _)| n.as_str() == name).map(|(_, s)| s);
            while old_keys.next_if(|(n, _)| n.as_str() < name).is_some() {}
            let old_key = old_keys
                .next_if(|(n, _)| n.as_str() == name)
                .map(|(_, k)| k);
            let changed = match prev {
                Some(s) if Arc::ptr_eq(&s.part.0, &part.0) && old_key == key => s.changed,
                _ => {
                    agents_changed = true;
                    revision
                }
            };
            Served { part, changed }
        });
        gone.extend(olds.map(|(n, _)| n));
        // (The lists follow from the agents' documents.)
        let site_changed = desired.blobs != old.blobs
            || desired.prestage != old.prestage
            || desired.lower != old.lower
            || desired.roots != old.roots
            || desired.unserved != old.unserved
            || desired.sources != old.sources;
        if !agents_changed && !site_changed && gone.is_empty() {
            return None;
        }
        let mut removed = self.removed.clone();
        removed.extend(gone.into_iter().map(|name| (revision, name.clone())));
        let mut horizon = self.horizon;
        while removed.len() > MAX_REMOVALS_KEPT {
            let (at, _) = removed.pop_front().expect("longer than the bound");
            horizon = horizon.max(at);
        }
        Some(Self {
            desired,
            epoch: self.epoch,
            revision,
            removed,
            horizon,
        })
    }

    /// The whole desired state.
    pub fn desired(&self) -> &SiteDesired<Served> {
        &self.desired
    }

    /// The feed's ETag: this process's epoch and the revision.
    pub fn etag(&self) -> String {
        format!("\"{:016x}-{}\"", self.epoch, self.revision)
    }

    /// The revision of this feed an ETag names, if it does.
    fn revision_of(&self, etag: &str) -> Option<u64> {
        let (epoch, revision) = etag.trim_matches('"').split_once('-')?;
        (u64::from_str_radix(epoch, 16).ok()? == self.epoch)
            .then(|| revision.parse().ok())
            .flatten()
    }

    /// What to answer a relay holding `known`: `None` if that is this
    /// revision; else this revision's ETag and, for a relay that takes
    /// changes (`deltas`) and holds a revision this feed can answer from,
    /// the changes since; else the whole desired state, if `whole` grants
    /// the making of one (it is every agent's document, serialized for the
    /// request) — else [`Busy`].
    pub fn answer<P>(
        &self,
        known: Option<&str>,
        deltas: bool,
        whole: impl FnOnce() -> Option<P>,
    ) -> Result<Option<(String, bytes::Bytes)>, Busy> {
        let etag = self.etag();
        if known == Some(etag.as_str()) {
            return Ok(None);
        }
        let since = known
            .filter(|_| deltas)
            .and_then(|k| self.revision_of(k))
            .filter(|since| (self.horizon..self.revision).contains(since));
        let body = match since {
            Some(since) => serde_json::to_vec(&self.changes(since, known)),
            None => {
                let _permit = whole().ok_or(Busy)?;
                serde_json::to_vec(&self.desired)
            }
        };
        let body = body.expect("wire types serialize");
        Ok(Some((etag, body.into())))
    }

    /// The changes since revision `since` (named `etag` to the relay).
    fn changes(&self, since: u64, etag: Option<&str>) -> SiteDesired<&Served> {
        let d = &self.desired;
        let agents: BTreeMap<String, &Served> = d
            .agents
            .iter()
            .filter(|(_, s)| s.changed > since)
            .map(|(name, s)| (name.clone(), s))
            .collect();
        let agent_keys = d
            .agent_keys
            .iter()
            .filter(|(name, _)| agents.contains_key(*name))
            .map(|(name, key)| (name.clone(), key.clone()))
            .collect();
        let removed = self
            .removed
            .iter()
            .filter(|(at, name)| *at > since && !d.agents.contains_key(name))
            .map(|(_, name)| name.clone())
            .collect();
        let lists = agents
            .values()
            .flat_map(|s| &s.part.0.lists)
            .filter_map(|digest| Some((*digest, d.lists.get(digest)?.clone())))
            .collect();
        SiteDesired {
            site: d.site.clone(),
            agents,
            lists,
            blobs: d.blobs.clone(),
            prestage: d.prestage.clone(),
            lower: d.lower.clone(),
            roots: d.roots.clone(),
            agent_keys,
            unserved: d.unserved.clone(),
            sources: d.sources.clone(),
            since: etag.map(str::to_owned),
            removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_api::{trust::DESIRED_TYPE, wire::AssignmentList};

    type Signed = HashMap<SiteKey, SiteDesired<SignedPart>>;

    fn key() -> SiteKey {
        ("ns".into(), "hq".into())
    }

    fn part(body: &str) -> SignedPart {
        listing(body, &[])
    }

    /// The assignment list `json` (any JSON will do here), and its digest.
    fn list(json: &str) -> (Digest, AssignmentList) {
        (
            Digest::of(json.as_bytes()),
            serde_json::from_str(json).unwrap(),
        )
    }

    /// A document naming these lists.
    fn listing(body: &str, lists: &[&str]) -> SignedPart {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        SignedPart(Arc::new(SignedDocument {
            envelope: Envelope::sign(DESIRED_TYPE, body.as_bytes(), &[&key]),
            lists: lists.iter().map(|l| list(l).0).collect(),
        }))
    }

    /// A site whose agents have these parts (and a key each), with the
    /// lists they name (each of whose digest is that of `[n]`, n < 10).
    fn site(agents: &[(&str, &SignedPart)]) -> Signed {
        let lists = (0..10)
            .map(|n| list(&format!("[{n}]")))
            .filter(|(digest, _)| agents.iter().any(|(_, p)| p.0.lists.contains(digest)))
            .collect();
        let d = SiteDesired {
            site: "hq".into(),
            lists,
            agents: agents
                .iter()
                .map(|(n, p)| (n.to_string(), (*p).clone()))
                .collect(),
            agent_keys: agents
                .iter()
                .map(|(n, _)| (n.to_string(), format!("ed25519:{n}")))
                .collect(),
            ..Default::default()
        };
        HashMap::from([(key(), d)])
    }

    fn grant() -> Option<()> {
        Some(())
    }

    fn read(body: &[u8]) -> SiteDesired {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn a_relay_behind_gets_only_what_changed_since_its_revision() {
        let (a, b, c) = (part("a"), part("b"), part("c"));
        let i1 = DesiredIndex::default()
            .next(site(&[("a1", &a), ("a2", &b), ("a3", &c)]))
            .unwrap();
        let f1 = &i1.sites[&key()];
        let (etag1, whole) = f1.answer(None, true, grant).unwrap().unwrap();
        let whole = read(&whole);
        assert_eq!((whole.since, whole.agents.len()), (None, 3));
        assert!(
            f1.answer(Some(&etag1), true, grant).unwrap().is_none(),
            "up to date"
        );

        // The same documents again: nothing is served differently.
        assert!(i1
            .next(site(&[("a1", &a), ("a2", &b), ("a3", &c)]))
            .is_none());

        // a2's document changes, a3 leaves.
        let b2 = part("b2");
        let i2 = i1.next(site(&[("a1", &a), ("a2", &b2)])).unwrap();
        let f2 = &i2.sites[&key()];
        let (etag2, delta) = f2.answer(Some(&etag1), true, grant).unwrap().unwrap();
        assert_ne!(etag1, etag2);
        let delta = read(&delta);
        assert_eq!(delta.since.as_deref(), Some(etag1.as_str()));
        assert_eq!(delta.agents.keys().collect::<Vec<_>>(), ["a2"]);
        assert_eq!(delta.agents["a2"], b2.0.envelope);
        assert_eq!(delta.agent_keys.keys().collect::<Vec<_>>(), ["a2"]);
        assert_eq!(delta.removed, ["a3"]);

        // Only a2's key changes (its document does not): its entry is sent.
        let mut rekeyed = site(&[("a1", &a), ("a2", &b2)]);
        rekeyed
            .get_mut(&key())
            .unwrap()
            .agent_keys
            .insert("a2".into(), "ed25519:new".into());
        let i3 = i2.next(rekeyed).unwrap();
        let (_, delta) = i3.sites[&key()]
            .answer(Some(&etag2), true, grant)
            .unwrap()
            .unwrap();
        let delta = read(&delta);
        assert_eq!(delta.agent_keys["a2"], "ed25519:new");
        assert!(delta.removed.is_empty());
        // From two revisions back: both changes, a3 still removed.
        let (_, delta) = i3.sites[&key()]
            .answer(Some(&etag1), true, grant)
            .unwrap()
            .unwrap();
        let delta = read(&delta);
        assert_eq!(delta.agents.keys().collect::<Vec<_>>(), ["a2"]);
        assert_eq!(delta.removed, ["a3"]);

        // The whole state, to a relay that does not take changes, to one
        // holding another process's revision, and to one holding garbage.
        for (known, deltas) in [
            (Some(etag1.as_str()), false),
            (Some("\"00000000000000ff-1\""), true),
            (Some("\"garbage\""), true),
        ] {
            let (_, body) = i3.sites[&key()]
                .answer(known, deltas, grant)
                .unwrap()
                .unwrap();
            let body = read(&body);
            assert_eq!((body.since, body.agents.len()), (None, 2), "{known:?}");
        }
        // Without leave to make a whole state the relay is told to ask
        // again; changes need none.
        let busy = || None::<()>;
        assert_eq!(i3.sites[&key()].answer(None, true, busy), Err(Busy));
        assert!(i3.sites[&key()].answer(Some(&etag1), true, busy).is_ok());
    }

    #[test]
    fn changes_carry_the_lists_the_changed_documents_name() {
        let (a, b) = (listing("a", &["[1]"]), listing("b", &["[1]", "[2]"]));
        let i1 = DesiredIndex::default()
            .next(site(&[("a1", &a), ("a2", &b)]))
            .unwrap();
        let (etag1, whole) = i1.sites[&key()].answer(None, true, grant).unwrap().unwrap();
        let whole = read(&whole);
        assert_eq!(whole.lists.len(), 2);
        for (digest, l) in &whole.lists {
            assert_eq!(Digest::of(l.json().as_bytes()), *digest, "sent as hashed");
        }
        // a2 now names [3] alone: the change carries it, not a1's [1].
        let b2 = listing("b2", &["[3]"]);
        let i2 = i1.next(site(&[("a1", &a), ("a2", &b2)])).unwrap();
        let (_, delta) = i2.sites[&key()]
            .answer(Some(&etag1), true, grant)
            .unwrap()
            .unwrap();
        let delta = read(&delta);
        assert_eq!(delta.lists.keys().collect::<Vec<_>>(), [&list("[3]").0]);
        assert_eq!(delta.lists[&list("[3]").0].json(), "[3]");
    }

    #[test]
    fn agents_that_join_or_leave_anywhere_in_name_order_are_each_told() {
        let (a, b, c, d) = (part("a"), part("b"), part("c"), part("d"));
        let i1 = DesiredIndex::default()
            .next(site(&[("b1", &b), ("c1", &c), ("d1", &d)]))
            .unwrap();
        let (etag1, _) = i1.sites[&key()].answer(None, true, grant).unwrap().unwrap();
        // a0 joins before every name and c2 between two; c1 leaves from the
        // middle (c2 has its document); b1 and d1 are as they were.
        let i2 = i1
            .next(site(&[("a0", &a), ("b1", &b), ("c2", &c), ("d1", &d)]))
            .unwrap();
        let (_, delta) = i2.sites[&key()]
            .answer(Some(&etag1), true, grant)
            .unwrap()
            .unwrap();
        let delta = read(&delta);
        assert_eq!(delta.agents.keys().collect::<Vec<_>>(), ["a0", "c2"]);
        assert_eq!(delta.removed, ["c1"]);
    }

    #[test]
    fn a_site_made_anew_and_a_relay_too_far_behind_get_the_whole_state() {
        let a = part("a");
        let i1 = DesiredIndex::default().next(site(&[("a1", &a)])).unwrap();
        let (etag1, _) = i1.sites[&key()].answer(None, true, grant).unwrap().unwrap();
        // The site goes, and comes back: revisions are never reused.
        let i2 = i1.next(HashMap::new()).unwrap();
        let i3 = i2.next(site(&[("a1", &a)])).unwrap();
        let (etag3, body) = i3.sites[&key()]
            .answer(Some(&etag1), true, grant)
            .unwrap()
            .unwrap();
        assert_ne!(etag1, etag3);
        assert_eq!(
            read(&body).since,
            None,
            "the new site's history starts after etag1"
        );

        // More removals than the feed remembers: a relay from before them
        // gets the whole state; one from after them, changes.
        let many: Vec<(String, SignedPart)> = (0..=MAX_REMOVALS_KEPT)
            .map(|i| (format!("x{i}"), a.clone()))
            .collect();
        let all: Vec<(&str, &SignedPart)> = many.iter().map(|(n, p)| (n.as_str(), p)).collect();
        let i4 = i3.next(site(&all)).unwrap();
        let (before, _) = i4.sites[&key()].answer(None, true, grant).unwrap().unwrap();
        let i5 = i4.next(site(&all[..1])).unwrap();
        let (after, _) = i5.sites[&key()].answer(None, true, grant).unwrap().unwrap();
        let i6 = i5.next(site(&[])).unwrap();
        let feed = &i6.sites[&key()];
        assert_eq!(feed.removed.len(), MAX_REMOVALS_KEPT);
        let (_, body) = feed.answer(Some(&before), true, grant).unwrap().unwrap();
        assert_eq!(
            read(&body).since,
            None,
            "some of its removals were forgotten"
        );
        let (_, body) = feed.answer(Some(&after), true, grant).unwrap().unwrap();
        assert_eq!(read(&body).removed, ["x0"]);
    }
}
