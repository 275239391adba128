//! A new controller's relay image reaches the sites one at a time: a relay
//! Deployment that runs another image than the controller's (an upgrade,
//! or a rollback) is moved to it only while no other site's relay is on its
//! way there; the next moves once that one's Deployment has rolled out and
//! its relay is back: it talked after that, so from a pod of the new image,
//! of a release the controller works with. A relay that does not come back holds the rest, each Site saying
//! which it waits for (an Event). Sites that name their own image
//! (`spec.relay.image`) are theirs to move.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::reflector::ObjectRef;

use super::{relays::RelayContacts, workload::relay_name};
use crate::{context::Context, error::Error, index::SiteKey, stores::Stores};

/// Whether Deployment `d` runs its current spec: every replica updated and
/// available (what `kubectl rollout status` waits for).
pub fn rolled_out(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    status.observed_generation >= d.metadata.generation
        && updated >= want
        // No pod of the old spec left (during a rolling update the old
        // pods are still counted, and available).
        && status.replicas.unwrap_or(0) <= updated
        && status.available_replicas.unwrap_or(0) >= want
}

/// The image of a relay Deployment's container.
fn image_of(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}

/// What a Site's relay runs now, and what it is to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The controller's image (already, or new).
    Current,
    /// Moved to the controller's image now, from the image it ran.
    Moving { from: String },
    /// Kept on the image it runs until the relay of `behind` is back.
    Held { image: String, behind: SiteKey },
}

#[derive(Default)]
pub struct Rollout {
    /// The site whose relay was moved last, until it is back; `None` until
    /// this process has looked (it may have started mid-rollout), then
    /// `Some(None)` while no site is on its way.
    moving: tokio::sync::Mutex<Option<Option<SiteKey>>>,
    /// When each moving site's Deployment was first seen rolled out: its
    /// relay is back once it talks after that (no old pod is left then).
    rolled_at: std::sync::Mutex<HashMap<SiteKey, chrono::DateTime<chrono::Utc>>>,
    /// The image each site's relay Deployment was last applied with.
    applied: std::sync::Mutex<HashMap<SiteKey, String>>,
    /// Sites held, to look at again once the moving one is back.
    held: std::sync::Mutex<HashSet<SiteKey>>,
}

impl Rollout {
    /// The step of `site`'s relay toward the controller's image.
    pub async fn step(
        &self,
        ctx: &Context,
        stores: &Stores,
        relays: &RelayContacts,
        site: &SiteKey,
    ) -> Result<Step, Error> {
        let new = &ctx.config.relay_image;
        let known = self
            .applied
            .lock()
            .expect("lock poisoned")
            .get(site)
            .cloned();
        let running = match known {
            Some(image) => Some(image),
            None => ctx
                .namespaced::<Deployment>(&site.0)
                .get_opt(&relay_name(&site.1))
                .await?
                .as_ref()
                .and_then(image_of),
        };
        let mut moving = self.moving.lock().await;
        let from = match running {
            // A new relay, or one on the controller's image already.
            None => return Ok(Step::Current),
            Some(image) if image == *new => {
                let this = moving.as_ref().and_then(Option::as_ref) == Some(site);
                if this && self.back(ctx, stores, relays, site).await? {
                    *moving = Some(None);
                    for held in self.held.lock().expect("lock poisoned").drain() {
                        relays.poke(&held);
                    }
                }
                return Ok(Step::Current);
            }
            Some(image) => image,
        };
        // The site moving, as this process knows it or, after a restart or
        // a change of leader, as the cluster shows it.
        let other = match moving.clone() {
            Some(other) => other.filter(|other| other != site),
            None => self.moving_in_cluster(ctx, stores, relays, site).await?,
        };
        if let Some(other) = other {
            if !self.back(ctx, stores, relays, &other).await? {
                *moving = Some(Some(other.clone()));
                self.held
                    .lock()
                    .expect("lock poisoned")
                    .insert(site.clone());
                return Ok(Step::Held {
                    image: from,
                    behind: other,
                });
            }
        }
        *moving = Some(Some(site.clone()));
        self.rolled_at.lock().expect("lock poisoned").remove(site);
        self.held.lock().expect("lock poisoned").remove(site);
        Ok(Step::Moving { from })
    }

    /// A site other than `except` whose relay Deployment runs the
    /// controller's image and is not back yet: one a controller before this
    /// one moved (only looked for when this process knows of none).
    async fn moving_in_cluster(
        &self,
        ctx: &Context,
        stores: &Stores,
        relays: &RelayContacts,
        except: &SiteKey,
    ) -> Result<Option<SiteKey>, Error> {
        let relay_objects = kube::api::ListParams::default()
            .labels(&format!("{}=relay", caravan_api::labels::COMPONENT));
        let deployments = ctx.all::<Deployment>().list(&relay_objects).await?;
        for d in deployments.items {
            let ns = d.metadata.namespace.clone().unwrap_or_default();
            let Some(name) = d
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(caravan_api::labels::SITE))
            else {
                continue;
            };
            let key: SiteKey = (ns, name.clone());
            let own_image = stores
                .sites
                .get(&ObjectRef::new(&key.1).within(&key.0))
                .is_some_and(|s| s.spec.relay.image.is_some());
            if key == *except
                || own_image
                || image_of(&d).as_deref() != Some(ctx.config.relay_image.as_str())
            {
                continue;
            }
            if !self.back(ctx, stores, relays, &key).await? {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// Records the image `site`'s relay Deployment was applied with.
    pub fn applied(&self, site: &SiteKey, image: &str) {
        self.applied
            .lock()
            .expect("lock poisoned")
            .insert(site.clone(), image.to_string());
    }

    /// Whether the relay of `site` is back on the controller's image: its
    /// Deployment rolled out, and the relay talked since, of a release the
    /// controller works with. A Site gone is no longer waited for.
    async fn back(
        &self,
        ctx: &Context,
        stores: &Stores,
        relays: &RelayContacts,
        site: &SiteKey,
    ) -> Result<bool, Error> {
        if stores
            .sites
            .get(&ObjectRef::new(&site.1).within(&site.0))
            .is_none()
        {
            return Ok(true);
        }
        let Some(d) = ctx
            .namespaced::<Deployment>(&site.0)
            .get_opt(&relay_name(&site.1))
            .await?
        else {
            return Ok(true);
        };
        if !rolled_out(&d) || image_of(&d).as_deref() != Some(ctx.config.relay_image.as_str()) {
            return Ok(false);
        }
        // Rolled out: no pod of the old spec is left, so a relay that talks
        // after that is of the new image (whatever release it says, as long
        // as the controller works with it: a relay image pinned a release
        // behind is fine).
        let rolled_at = *self
            .rolled_at
            .lock()
            .expect("lock poisoned")
            .entry(site.clone())
            .or_insert_with(chrono::Utc::now);
        let heard = relays.heard(site).await;
        let supported = caravan_api::skew::check(
            caravan_api::RELEASE,
            caravan_api::skew::Component::Relay,
            heard.version.as_deref(),
        )
        .is_ok();
        // (A relay saying the controller's release is of the new image
        // already: that is the common case, and needs no wait.)
        let talked_since = heard.version.as_deref() == Some(caravan_api::RELEASE)
            || heard.last_seen.is_some_and(|t| t > rolled_at);
        Ok(heard.connected() && supported && talked_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    fn deployment(generation: i64, observed: i64, replicas: i32, available: i32) -> Deployment {
        Deployment {
            metadata: kube::api::ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                updated_replicas: Some(available),
                available_replicas: Some(available),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_deployment_has_rolled_out_once_every_replica_runs_its_current_spec() {
        assert!(rolled_out(&deployment(3, 3, 2, 2)));
        assert!(!rolled_out(&deployment(3, 2, 2, 2)), "spec not seen yet");
        assert!(!rolled_out(&deployment(3, 3, 2, 1)), "one replica to go");
        let mut surge = deployment(3, 3, 1, 1);
        surge.status.as_mut().unwrap().replicas = Some(2);
        assert!(
            !rolled_out(&surge),
            "the old pod still runs beside the new one"
        );
        let mut fresh = deployment(1, 1, 1, 1);
        fresh.status = None;
        assert!(!rolled_out(&fresh), "no status: nothing runs");
    }
}
