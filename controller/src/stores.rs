//! The controller's caches of the five kinds the distribution engine watches.
//! A task of the engine's fills them (it runs the reflectors, see
//! [`Writers::watch`]);
//! everything else only reads them: the Git sync (package identity), the
//! Site reconciler (agent counts), the distribution API (reports, the
//! admission webhook) and the blob garbage collector.

use caravan_api::v1alpha1::{Agent, Cabinet, DistributionJob, Package, Site};
use futures::{stream::BoxStream, FutureExt, StreamExt};
use kube::{
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Resource, ResourceExt,
};

use crate::context::Context;

/// Read handles of the caches (cheap to clone).
#[derive(Clone)]
pub struct Stores {
    pub sites: Store<Site>,
    pub agents: Store<Agent>,
    pub jobs: Store<DistributionJob>,
    pub packages: Store<Package>,
    pub cabinets: Store<Cabinet>,
}

/// The writing halves of the caches, for the task that runs the reflectors.
pub struct Writers {
    sites: Writer<Site>,
    agents: Writer<Agent>,
    jobs: Writer<DistributionJob>,
    packages: Writer<Package>,
    cabinets: Writer<Cabinet>,
}

impl Stores {
    pub fn new() -> (Writers, Self) {
        let (sites, sites_w) = reflector::store();
        let (agents, agents_w) = reflector::store();
        let (jobs, jobs_w) = reflector::store();
        let (packages, packages_w) = reflector::store();
        let (cabinets, cabinets_w) = reflector::store();
        (
            Writers {
                sites: sites_w,
                agents: agents_w,
                jobs: jobs_w,
                packages: packages_w,
                cabinets: cabinets_w,
            },
            Self {
                sites,
                agents,
                jobs,
                packages,
                cabinets,
            },
        )
    }

    /// Whether every cache holds a complete list. Nothing may be computed
    /// from half-filled caches: an agent missing from them would look like
    /// one that should have its software removed.
    pub fn ready(&self) -> bool {
        self.sites.wait_until_ready().now_or_never().is_some()
            && self.agents.wait_until_ready().now_or_never().is_some()
            && self.jobs.wait_until_ready().now_or_never().is_some()
            && self.packages.wait_until_ready().now_or_never().is_some()
            && self.cabinets.wait_until_ready().now_or_never().is_some()
    }

    /// Waits for the next tick of `tick` at which the caches are
    /// [`Self::ready`]: `false` once shutdown is asked for instead.
    pub async fn next_round(
        &self,
        tick: &mut tokio::time::Interval,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> bool {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                _ = tick.tick() => {}
            }
            if self.ready() {
                return true;
            }
        }
    }
}

/// One change the caches took in, as the engine hears of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// To an object a GitSource applied (or a whole list, after a watch
    /// started again): part of a commit, which arrives as one apply after
    /// another, so a computation between two of them would publish half a
    /// commit (a new Package version under the job's old rollout).
    Declared,
    /// To anything else: an agent's report or enrollment, an approval, a
    /// command's write, the engine's own status writes to those.
    Lone,
}

impl Change {
    fn of<K: Resource>(event: &watcher::Event<K>) -> Self {
        match event {
            watcher::Event::Apply(o) | watcher::Event::Delete(o)
                if !o.labels().contains_key(caravan_api::labels::SOURCE) =>
            {
                Change::Lone
            }
            _ => Change::Declared,
        }
    }
}

impl Writers {
    /// Watches the five kinds into the caches; each item of the returned
    /// streams is one change.
    pub fn watch(self, ctx: &Context) -> Vec<BoxStream<'static, Change>> {
        vec![
            reflect(ctx, self.sites),
            reflect(ctx, self.agents),
            reflect(ctx, self.jobs),
            reflect(ctx, self.packages),
            reflect(ctx, self.cabinets),
        ]
    }
}

/// How the caches list: from the API server's watch cache, unpaged (see
/// [`reflect`]).
fn cache_lists() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    }
}

fn reflect<K>(ctx: &Context, writer: Writer<K>) -> BoxStream<'static, Change>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // Lists come from the API server's watch cache (`resourceVersion=0`),
    // as client-go's informers take theirs: with 100,000 Agents changing a
    // hundred times a second, the cache's window of events is a second or
    // two, so a watch that falls behind must list again, and a consistent
    // list read from etcd 500 at a time outlived etcd's compaction (its
    // continue token expired after minutes of paging) and started over.
    // Unpaged: a list with a limit is sent without `resourceVersion=0`
    // (kube-core's `ListParams`), i.e. read from etcd again. (With several
    // API servers, one behind the others can answer a relist with an older
    // state, for as long as it is behind; client-go's informers take that
    // risk for their first list too.)
    watcher(ctx.all::<K>(), cache_lists())
        .default_backoff()
        // Nothing reads who set which field from the caches, and it is a
        // large part of a cached Agent (every status field, per manager).
        .modify(|obj| obj.managed_fields_mut().clear())
        .reflect(writer)
        .filter_map(|event| async move {
            match event {
                Ok(event) => Some(Change::of(&event)),
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
                    None
                }
            }
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::{api::ListParams, runtime::watcher::Event};

    use super::Change;

    #[test]
    fn a_change_to_an_object_from_git_waits_for_the_rest_of_its_commit() {
        let object = |labels: &[(&str, &str)]| {
            let mut a = ConfigMap::default();
            a.metadata.labels = Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            a
        };
        let enrolled = object(&[("caravan.dev/site", "hq")]);
        let declared = object(&[(caravan_api::labels::SOURCE, "fleet")]);
        assert_eq!(Change::of(&Event::Apply(enrolled.clone())), Change::Lone);
        assert_eq!(Change::of(&Event::Delete(enrolled.clone())), Change::Lone);
        assert_eq!(
            Change::of(&Event::Apply(declared.clone())),
            Change::Declared
        );
        assert_eq!(Change::of(&Event::Delete(declared)), Change::Declared);
        // A whole list again (a watch restarted): anything may have changed.
        assert_eq!(Change::of(&Event::InitApply(enrolled)), Change::Declared);
        assert_eq!(Change::of(&Event::<ConfigMap>::InitDone), Change::Declared);
    }

    #[test]
    fn the_caches_list_from_the_api_servers_watch_cache() {
        let config = super::cache_lists();
        // The list the watcher sends: any resourceVersion, its page size.
        let list = ListParams {
            limit: config.page_size,
            ..ListParams::default().match_any()
        };
        let request = kube::core::Request::new("/apis/caravan.dev/v1alpha1/agents")
            .list(&list)
            .unwrap();
        let query = request.uri().query().unwrap_or_default().to_string();
        assert!(query.contains("resourceVersion=0"), "{query}");
    }
}
