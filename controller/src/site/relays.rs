//! What the controller knows of each site's relay from its requests: when
//! it last talked to the controller and what it last said about its cache.
//! The distribution API records both; the Site reconciler reads them into
//! the Site's status, and is asked to look again ([`RelayContacts::new`]'s
//! receiver) when a relay connects after a silence or its figures change.

use std::{collections::HashMap, sync::Mutex};

use caravan_api::wire::RelayStats;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::index::SiteKey;

/// A relay silent for longer than this is reported not ready.
pub const RELAY_STALE_SECONDS: i64 = 90;

/// Most Sites waiting to be looked at again.
const TRIGGERS: usize = 1024;

pub struct RelayContacts {
    seen: Mutex<HashMap<SiteKey, DateTime<Utc>>>,
    stats: Mutex<HashMap<SiteKey, RelayStats>>,
    trigger: mpsc::Sender<SiteKey>,
}

impl RelayContacts {
    /// The contacts, and the sites whose Site the reconciler should look at again.
    pub fn new() -> (Self, mpsc::Receiver<SiteKey>) {
        let (trigger, rx) = mpsc::channel(TRIGGERS);
        let contacts = Self {
            seen: Default::default(),
            stats: Default::default(),
            trigger,
        };
        (contacts, rx)
    }

    /// Records that a site's relay talked to us; the first contact (or the
    /// first after a silence) has the Site reconciled, so it turns Ready.
    pub fn contact(&self, site: &SiteKey) {
        let now = Utc::now();
        let previous = self
            .seen
            .lock()
            .expect("lock poisoned")
            .insert(site.clone(), now);
        let stale =
            previous.is_none_or(|t| now - t > chrono::Duration::seconds(RELAY_STALE_SECONDS / 2));
        if stale {
            self.poke(site);
        }
    }

    /// Keeps what a relay says about its cache; a change has the Site reconciled.
    pub fn set_stats(&self, site: &SiteKey, stats: RelayStats) {
        let changed = self
            .stats
            .lock()
            .expect("lock poisoned")
            .insert(site.clone(), stats)
            != Some(stats);
        if changed {
            self.poke(site);
        }
    }

    /// Has the Site reconciled soon (an agent enrolled there, say). When
    /// many are waiting already this one is dropped: every Site is looked
    /// at again within half a minute anyway.
    pub fn poke(&self, site: &SiteKey) {
        let _ = self.trigger.try_send(site.clone());
    }

    /// When the relay of `site` last talked to us.
    pub fn last_seen(&self, site: &SiteKey) -> Option<DateTime<Utc>> {
        self.seen.lock().expect("lock poisoned").get(site).copied()
    }

    /// Whether the relay of `site` talked to us recently.
    pub fn connected(&self, site: &SiteKey) -> bool {
        self.last_seen(site)
            .is_some_and(|t| Utc::now() - t < chrono::Duration::seconds(RELAY_STALE_SECONDS))
    }

    /// What the relay of `site` last said about its cache.
    pub fn stats(&self, site: &SiteKey) -> Option<RelayStats> {
        self.stats.lock().expect("lock poisoned").get(site).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_contact_and_changed_figures_have_the_site_reconciled_but_chatter_does_not() {
        let (contacts, mut rx) = RelayContacts::new();
        let hq: SiteKey = ("ns".into(), "hq".into());
        assert!(!contacts.connected(&hq));
        contacts.contact(&hq);
        contacts.contact(&hq);
        assert_eq!(rx.try_recv(), Ok(hq.clone()));
        assert!(
            rx.try_recv().is_err(),
            "a relay that keeps talking is no news"
        );
        assert!(contacts.connected(&hq));
        let stats = RelayStats {
            cache_bytes: 10,
            ..Default::default()
        };
        contacts.set_stats(&hq, stats);
        contacts.set_stats(&hq, stats);
        assert_eq!(rx.try_recv(), Ok(hq.clone()));
        assert!(rx.try_recv().is_err());
        assert_eq!(contacts.stats(&hq), Some(stats));
    }
}
