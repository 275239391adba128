//! What the controller knows of each site's relay from its requests: when
//! it last talked to the controller, which release it said it is of and
//! what it last said about its cache.
//! The distribution API records both; the Site reconciler reads them into
//! the Site's status, and is asked to look again ([`RelayContacts::new`]'s
//! receiver) when a relay connects after a silence or its figures change.
//!
//! A relay may talk to any replica of the controller, and only the leader
//! reconciles Sites: every replica also writes what it saw into the relay's
//! presence Lease (`<site>-relay`, owned by the Site; [`Presence`]), at most
//! every [`PUBLISH_EVERY`] per site, and the leader reads the Lease too.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use caravan_api::{v1alpha1::Site, wire::RelayStats};
use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::mpsc;

use super::workload::relay_name;
use crate::index::SiteKey;

/// Least time between two writes of one relay's presence by one replica
/// (a relay that keeps talking renews it this often).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(30);
/// Least time between writes when only the relay's figures changed.
const PUBLISH_STATS_EVERY: Duration = Duration::from_secs(10);

/// Annotation of a relay's presence Lease: what the relay last said about
/// its cache (JSON).
const RELAY_STATS: &str = "caravan.dev/relay-stats";
/// Annotation of a relay's presence Lease: the release it said it is of.
const RELAY_VERSION: &str = "caravan.dev/relay-version";

/// The relay's presence: the replica that served it last (`holderIdentity`)
/// at `now` (`renewTime`), with what it said about its cache and release.
fn presence_lease(
    site: &Site,
    owner: &OwnerReference,
    replica: &str,
    heard: &Heard,
    now: k8s_openapi::jiff::Timestamp,
) -> Lease {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };
    let mut metadata = super::workload::meta(site, owner);
    let annotations: BTreeMap<String, String> = [
        (
            RELAY_STATS,
            heard
                .stats
                .as_ref()
                .and_then(|s| serde_json::to_string(s).ok()),
        ),
        (RELAY_VERSION, heard.version.clone()),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?)))
    .collect();
    metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    Lease {
        metadata,
        spec: Some(LeaseSpec {
            holder_identity: Some(replica.to_string()),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(RELAY_STALE_SECONDS as i32),
            ..Default::default()
        }),
    }
}

/// Writes relays' presence Leases for this replica.
pub struct Presence {
    pub client: kube::Client,
    /// This replica's name (the Lease's holder).
    pub replica: String,
    /// The Sites, for the Leases' owner.
    pub sites: Store<Site>,
    published: Mutex<HashMap<SiteKey, Instant>>,
}

impl Presence {
    pub fn new(client: kube::Client, replica: String, sites: Store<Site>) -> Self {
        Self {
            client,
            replica,
            sites,
            published: Mutex::default(),
        }
    }

    /// Writes the presence of `site`'s relay if due (`every` since the last).
    fn publish(&self, site: &SiteKey, heard: &Heard, every: Duration) {
        {
            let mut published = self.published.lock().expect("lock poisoned");
            if published.get(site).is_some_and(|t| t.elapsed() < every) {
                return;
            }
            published.insert(site.clone(), Instant::now());
        }
        let Some(obj) = self
            .sites
            .get(&ObjectRef::<Site>::new(&site.1).within(&site.0))
        else {
            return;
        };
        let Some(owner) = kube::Resource::controller_owner_ref(obj.as_ref(), &()) else {
            return;
        };
        let lease = presence_lease(
            &obj,
            &owner,
            &self.replica,
            heard,
            k8s_openapi::jiff::Timestamp::now(),
        );
        let api = kube::Api::<Lease>::namespaced(self.client.clone(), &site.0);
        let name = relay_name(&site.1);
        tokio::spawn(async move {
            let params = PatchParams::apply("caravan-relay-presence").force();
            if let Err(e) = api.patch(&name, &params, &Patch::Apply(&lease)).await {
                tracing::warn!(lease = %name, error = %e, "relay presence not written");
            }
        });
    }

    /// What any replica last heard from the relay of `site`, as its Lease says.
    pub async fn read(&self, site: &SiteKey) -> Option<Heard> {
        let api = kube::Api::<Lease>::namespaced(self.client.clone(), &site.0);
        let lease = api.get_opt(&relay_name(&site.1)).await.ok()??;
        let renewed = lease.spec?.renew_time?.0;
        let at = DateTime::<Utc>::from_timestamp(
            renewed.as_second(),
            renewed.subsec_nanosecond() as u32,
        )?;
        let annotations = lease.metadata.annotations.unwrap_or_default();
        Some(Heard {
            last_seen: Some(at),
            stats: annotations
                .get(RELAY_STATS)
                .and_then(|s| serde_json::from_str(s).ok()),
            version: annotations.get(RELAY_VERSION).cloned(),
        })
    }
}

/// A relay silent for longer than this is reported not ready.
pub const RELAY_STALE_SECONDS: i64 = 90;

/// Most Sites waiting to be looked at again.
const TRIGGERS: usize = 1024;

pub struct RelayContacts {
    heard: Mutex<HashMap<SiteKey, Heard>>,
    trigger: mpsc::Sender<SiteKey>,
    /// Shares the contacts with the other replicas (none: one replica).
    presence: Option<Presence>,
}

impl RelayContacts {
    /// The contacts, and the sites whose Site the reconciler should look at again.
    pub fn new(presence: Option<Presence>) -> (Self, mpsc::Receiver<SiteKey>) {
        let (trigger, rx) = mpsc::channel(TRIGGERS);
        let contacts = Self {
            heard: Default::default(),
            trigger,
            presence,
        };
        (contacts, rx)
    }

    /// Records that a site's relay of release `version` (as it said, if it
    /// did) talked to us; the first contact (or the first after a silence,
    /// or from another release) has the Site reconciled, so its status
    /// says so.
    pub fn contact(&self, site: &SiteKey, version: Option<&str>) {
        let now = Utc::now();
        let (heard, news) = {
            let mut all = self.heard.lock().expect("lock poisoned");
            let heard = all.entry(site.clone()).or_default();
            let stale = heard
                .last_seen
                .is_none_or(|t| now - t > chrono::Duration::seconds(RELAY_STALE_SECONDS / 2));
            let new_version = heard.version.as_deref() != version;
            heard.last_seen = Some(now);
            heard.version = version.map(str::to_owned);
            (heard.clone(), stale || new_version)
        };
        if news {
            self.poke(site);
        }
        if let Some(p) = &self.presence {
            // A new release is news for the other replicas, but no more
            // often than figures are (two relays of a site on different
            // releases during a rollout take turns).
            let every = if news {
                PUBLISH_STATS_EVERY
            } else {
                PUBLISH_EVERY
            };
            p.publish(site, &heard, every);
        }
    }

    /// Keeps what a relay says about its cache; a change has the Site reconciled.
    pub fn set_stats(&self, site: &SiteKey, stats: RelayStats) {
        let changed = {
            let mut all = self.heard.lock().expect("lock poisoned");
            let heard = all.entry(site.clone()).or_default();
            let changed = heard.stats.replace(stats) != Some(stats);
            changed.then(|| heard.clone())
        };
        if let Some(heard) = changed {
            self.poke(site);
            if let Some(p) = &self.presence {
                p.publish(site, &heard, PUBLISH_STATS_EVERY);
            }
        }
    }

    /// Has the Site reconciled soon (an agent enrolled there, say). When
    /// many are waiting already this one is dropped: every Site is looked
    /// at again within half a minute anyway.
    pub fn poke(&self, site: &SiteKey) {
        let _ = self.trigger.try_send(site.clone());
    }

    /// What the relay of `site` last said to any replica (this one, or
    /// another as the presence Lease says).
    pub async fn heard(&self, site: &SiteKey) -> Heard {
        let here = self
            .heard
            .lock()
            .expect("lock poisoned")
            .get(site)
            .cloned()
            .filter(|h| h.last_seen.is_some());
        let there = match &self.presence {
            Some(p) => p.read(site).await,
            None => None,
        };
        match (here, there) {
            (Some(h), Some(t)) => std::cmp::max_by_key(t, h, |h| h.last_seen),
            (h, t) => h.or(t).unwrap_or_default(),
        }
    }
}

/// What the replicas heard from a site's relay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heard {
    /// When it last talked to a replica.
    pub last_seen: Option<DateTime<Utc>>,
    /// What it said about its cache then.
    pub stats: Option<RelayStats>,
    /// The release it said it is of.
    pub version: Option<String>,
}

impl Heard {
    /// Whether the relay talked to a replica recently.
    pub fn connected(&self) -> bool {
        self.last_seen
            .is_some_and(|t| Utc::now() - t < chrono::Duration::seconds(RELAY_STALE_SECONDS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_first_contact_changed_figures_and_a_new_release_have_the_site_reconciled_but_chatter_does_not(
    ) {
        let (contacts, mut rx) = RelayContacts::new(None);
        let hq: SiteKey = ("ns".into(), "hq".into());
        assert!(!contacts.heard(&hq).await.connected());
        contacts.contact(&hq, Some("0.2.0"));
        contacts.contact(&hq, Some("0.2.0"));
        assert_eq!(rx.try_recv(), Ok(hq.clone()));
        assert!(
            rx.try_recv().is_err(),
            "a relay that keeps talking is no news"
        );
        assert!(contacts.heard(&hq).await.connected());
        let stats = RelayStats {
            cache_bytes: 10,
            ..Default::default()
        };
        contacts.set_stats(&hq, stats);
        contacts.set_stats(&hq, stats);
        assert_eq!(rx.try_recv(), Ok(hq.clone()));
        assert!(rx.try_recv().is_err());
        assert_eq!(contacts.heard(&hq).await.stats, Some(stats));
        // An upgraded relay is news, even while it keeps talking.
        contacts.contact(&hq, Some("0.3.0"));
        assert_eq!(rx.try_recv(), Ok(hq.clone()));
        let heard = contacts.heard(&hq).await;
        assert_eq!(heard.version.as_deref(), Some("0.3.0"));
        assert_eq!(heard.stats, Some(stats), "the figures stay");
    }
}
