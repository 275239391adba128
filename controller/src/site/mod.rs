//! Site reconciler: each Site gets a relay ([`workload`]: a Secret with its
//! credentials, a Deployment and a Service, owned by the Site), and its
//! status says whether that relay has connected to the controller lately
//! ([`RelayContacts`]), how many agents enrolled there and what the relay
//! last said about its cache.
//!
//! A reconcile is three steps, each owning its part of the status:
//! 1. [`checks`]: what the Site asks for may be done (a valid relay name, an
//!    allowed image, an opted-in bootstrap Secret, relay objects that are
//!    its own); else Stalled with the reason, nothing applied;
//! 2. `apply_workload`: Secret, Deployment, Service, by server-side apply
//!    (refused by the API server: Stalled until the Site changes; any other
//!    failure is retried with a backoff);
//! 3. `summarize`: Ready (relay connected, of a release the controller
//!    works with), VersionSupported, agents, cache figures.

pub mod checks;
mod relays;
pub mod rollout;
pub mod workload;

use std::{sync::Arc, time::Duration};

use caravan_api::{
    conditions::{self, reasons},
    labels,
    skew::Component,
    v1alpha1::{Site, SiteStatus},
};
use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Secret, Service},
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef, watcher, Controller},
    Resource, ResourceExt,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::instrument;

pub use relays::{Presence, RelayContacts, RELAY_STALE_SECONDS};
use workload::{relay_name, RelayCredentials, RelayParams};

use crate::{
    context::Context,
    error::{Error, ErrorClass, Retries, STALLED_RECHECK},
    field_managers,
    index::SiteKey,
    status_patch,
    stores::Stores,
};

/// How often a Site is looked at without any change (its relay may go quiet).
const RESYNC: Duration = Duration::from_secs(30);

pub struct SiteReconciler {
    ctx: Arc<Context>,
    stores: Stores,
    relays: Arc<RelayContacts>,
    /// PEM of the CA relays verify the controller with, if configured.
    upstream_ca: Option<String>,
    retries: Retries<Site>,
    /// Sites whose relay objects are known to be their own.
    verified: checks::Verified,
    /// The relay key ID each Site's workload was last applied with.
    key_ids: std::sync::Mutex<std::collections::HashMap<SiteKey, String>>,
    /// The controller's relay image, reaching the sites one at a time.
    rollout: rollout::Rollout,
}

impl SiteReconciler {
    pub fn new(
        ctx: Arc<Context>,
        stores: Stores,
        relays: Arc<RelayContacts>,
        upstream_ca: Option<String>,
    ) -> Self {
        Self {
            ctx,
            stores,
            relays,
            upstream_ca,
            retries: Retries::default(),
            verified: Default::default(),
            key_ids: Default::default(),
            rollout: Default::default(),
        }
    }

    /// Runs the Site controller until shutdown; `triggers` names Sites to
    /// look at again (see [`RelayContacts`]).
    pub async fn run(
        self,
        triggers: mpsc::Receiver<SiteKey>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let triggers = futures::stream::unfold(triggers, |mut rx| async move {
            rx.recv()
                .await
                .map(|(ns, name)| (ObjectRef::<Site>::new(&name).within(&ns), rx))
        });
        let relay_objects =
            watcher::Config::default().labels(&format!("{}=relay", labels::COMPONENT));
        let ctx = self.ctx.clone();
        Controller::new(ctx.all::<Site>(), watcher::Config::default())
            .owns(ctx.all::<Deployment>(), relay_objects.clone())
            .owns(ctx.all::<Service>(), relay_objects.clone())
            // A relay heard by another replica.
            .owns(ctx.all::<Lease>(), relay_objects)
            .reconcile_on(triggers)
            .graceful_shutdown_on(shutdown.cancelled_owned())
            .run(
                reconcile,
                |site, e, this| this.retries.policy(&site, e),
                Arc::new(self),
            )
            .for_each(|outcome| async move { crate::error::log_outcome(outcome) })
            .await;
        Ok(())
    }
}

#[instrument(skip_all, fields(namespace = site.namespace(), site = %site.name_any()))]
async fn reconcile(site: Arc<Site>, this: Arc<SiteReconciler>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let done = reconcile_steps(&site, &this).await;
    this.ctx
        .metrics
        .reconciled("Site", started.elapsed(), done.is_ok());
    done
}

async fn reconcile_steps(site: &Site, this: &SiteReconciler) -> Result<Action, Error> {
    let action = match this.refusal(site).await? {
        Some(r) => {
            this.stall(site, r.reason, &r.message).await?;
            Action::requeue(STALLED_RECHECK)
        }
        None => match this.apply_workload(site).await {
            // The same spec would be refused again: say so and wait for a change.
            Err(e) if e.class() == ErrorClass::Stalled => {
                let message = format!("the relay's objects were refused: {e}");
                this.stall(site, reasons::WORKLOAD_REFUSED, &message)
                    .await?;
                Action::requeue(STALLED_RECHECK)
            }
            Err(e) => return Err(e),
            Ok(()) => {
                this.summarize(site).await?;
                Action::requeue(RESYNC)
            }
        },
    };
    this.retries.succeeded(site);
    Ok(action)
}

impl SiteReconciler {
    /// Step 1: why the Site's relay may not be made, if it may not.
    async fn refusal(&self, site: &Site) -> Result<Option<checks::Refusal>, Error> {
        let config = &self.ctx.config;
        let ns = site.namespace().unwrap_or_default();
        if let Err(r) = checks::check_name(site)
            .and_then(|()| checks::check_settings(site))
            .and_then(|()| {
                checks::check_image(site, &config.relay_image, &config.allowed_relay_images)
            })
            .and_then(|()| {
                checks::check_parent(site, |parent| {
                    self.stores
                        .sites
                        .get(&ObjectRef::new(parent).within(&ns))
                        .map(|s| (*s).clone())
                })
            })
        {
            return Ok(Some(r));
        }
        // Once the Site's objects are known to be its own, they stay so.
        if !self.verified.contains(site) {
            if let Err(r) = checks::check_owned(&self.ctx, site).await? {
                return Ok(Some(r));
            }
        }
        if site.spec.parent.is_none() {
            if let Err(r) = checks::check_registry_auth(&self.ctx, site).await {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Only a change to the Site can help: `Ready=False` and `Stalled=True`,
    /// saying why (what the status says of the relay stays).
    async fn stall(&self, site: &Site, reason: &str, message: &str) -> Result<(), Error> {
        let generation = site.meta().generation;
        let status = SiteStatus {
            observed_generation: generation,
            conditions: vec![
                conditions::new(conditions::READY, false, reason, message, generation),
                conditions::new(conditions::STALLED, true, reason, message, generation),
            ],
            ..site.status.clone().unwrap_or_default()
        };
        status_patch::apply(&self.ctx.client, site, status, field_managers::STATUS).await?;
        Ok(())
    }

    /// Applies the relay's Secret, Deployment and Service.
    async fn apply_workload(&self, site: &Site) -> Result<(), Error> {
        let ns = site
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let name = site.name_any();
        let owner = site
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        let keys = &self.ctx.credentials;
        let kid = site.relay_key_id();
        // A child's credential at its parent's relay is keyed by the
        // parent's token: it follows the parent's rotations (the parent
        // has its children looked at again when its key ID changes). No
        // parent Site (yet): no credential there.
        let parent = site.spec.parent.as_ref().and_then(|parent| {
            let kid = self
                .stores
                .sites
                .get(&ObjectRef::new(parent).within(&ns))?
                .relay_key_id();
            Some((parent, kid))
        });
        let cert = self
            .ctx
            .ca
            .relay_cert(site, chrono::Utc::now())
            .map_err(|e| Error::Certificate(format!("{e:#}")))?;
        let creds = RelayCredentials {
            tls: (cert.cert_pem, cert.key_pem),
            content_token: parent.as_ref().map(|(parent, parent_kid)| {
                caravan_net::agent_tokens::issue(
                    &keys.relay_token(&ns, parent, parent_kid),
                    &caravan_net::agent_tokens::child_relay_name(&name),
                    None,
                )
            }),
            token: keys.relay_token(&ns, &name, &kid),
        };
        // The relay reads its certificate at start: a new one (a new
        // period, new hostnames) rolls the pods.
        let cert_id = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(&creds.tls.0)[..4]);
        let credential_id = match &parent {
            Some((_, parent_kid)) => format!("{kid}-{cert_id}.{parent_kid}"),
            None => format!("{kid}-{cert_id}"),
        };
        let parent_site = site.spec.parent.as_ref().and_then(|p| {
            self.stores
                .sites
                .get(&ObjectRef::<Site>::new(p).within(&ns))
        });
        let key: SiteKey = (ns.clone(), name.clone());
        // A relay on another image than the controller's moves to it only
        // in its turn (see `rollout`).
        let step = match site.spec.relay.image {
            Some(_) => rollout::Step::Current,
            None => {
                self.rollout
                    .step(&self.ctx, &self.stores, &self.relays, &key)
                    .await?
            }
        };
        let image = match &step {
            rollout::Step::Held { image, .. } => image.clone(),
            _ => self.ctx.config.relay_image.clone(),
        };
        self.upgrade_event(site, &step).await;
        let params = RelayParams {
            default_image: &image,
            upstream_url: &self.ctx.config.relay_upstream_url,
            upstream_ca: self.upstream_ca.as_deref(),
            parent_url: parent_site
                .as_ref()
                .and_then(|p| p.spec.relay.url.as_deref()),
            credential_id: &credential_id,
            ca: self.ctx.ca.cert_pem(),
        };
        let apply = PatchParams::apply(field_managers::APPLY).force();
        let relay = relay_name(&name);
        let secret = workload::secret(site, &owner, &creds, &params);
        self.ctx
            .namespaced::<Secret>(&ns)
            .patch(&relay, &apply, &Patch::Apply(&secret))
            .await?;
        let deployment = workload::deployment(site, &owner, &params);
        self.ctx
            .namespaced::<Deployment>(&ns)
            .patch(&relay, &apply, &Patch::Apply(&deployment))
            .await?;
        let service = workload::service(site, &owner);
        self.ctx
            .namespaced::<Service>(&ns)
            .patch(&relay, &apply, &Patch::Apply(&service))
            .await?;
        self.verified.insert(site);
        if site.spec.relay.image.is_none() {
            self.rollout.applied(&key, &image);
        }
        let changed = self
            .key_ids
            .lock()
            .expect("lock poisoned")
            .insert(key.clone(), kid.clone())
            != Some(kid);
        if changed {
            // Children waiting for this site to exist, or whose credentials
            // here are keyed by its old token.
            for child in self.stores.sites.state().iter().filter(|s| {
                s.namespace().as_ref() == Some(&key.0) && s.spec.parent.as_ref() == Some(&key.1)
            }) {
                self.relays.poke(&(key.0.clone(), child.name_any()));
            }
        }
        Ok(())
    }

    /// Says where the relay's move to the controller's image stands, when
    /// it is moved or held.
    async fn upgrade_event(&self, site: &Site, step: &rollout::Step) {
        let (reason, note) = match step {
            rollout::Step::Current => return,
            rollout::Step::Moving { from } => (
                "RelayUpgrade",
                format!(
                    "the relay moves from {from} to {}",
                    self.ctx.config.relay_image
                ),
            ),
            rollout::Step::Held { image, behind } => (
                "RelayUpgradeWaiting",
                format!(
                    "the relay stays on {image} until site {}'s relay is back on {} (one site at a time)",
                    behind.1, self.ctx.config.relay_image
                ),
            ),
        };
        tracing::info!(site = %site.name_any(), %note, "relay upgrade");
        let event = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Upgrade".into(),
            secondary: None,
        };
        self.ctx.publish(&event, site).await;
    }

    /// The Site's status: agents enrolled there and whether its relay is connected.
    async fn summarize(&self, site: &Site) -> Result<(), Error> {
        let key: SiteKey = (site.namespace().unwrap_or_default(), site.name_any());
        let agents = self
            .stores
            .agents
            .state()
            .iter()
            .filter(|a| a.namespace().as_ref() == Some(&key.0) && a.spec.site == key.1)
            .count() as u32;
        let generation = site.meta().generation;
        let heard = self.relays.heard(&key).await;
        // Judged by what it last said, even if it is quiet now.
        let supported = heard.last_seen.is_some().then(|| {
            conditions::version_supported(
                caravan_api::RELEASE,
                Component::Relay,
                heard.version.as_deref(),
                generation,
            )
        });
        let refused = supported.as_ref().filter(|c| c.status != "True");
        let ready = match refused {
            // Connected, and refused at every request.
            Some(refused) if heard.connected() => conditions::new(
                conditions::READY,
                false,
                &refused.reason,
                format!("the controller refuses the relay: {}", refused.message),
                generation,
            ),
            _ if heard.connected() => conditions::new(
                conditions::READY,
                true,
                reasons::RELAY_CONNECTED,
                "relay is connected to the controller",
                generation,
            ),
            _ => conditions::new(
                conditions::READY,
                false,
                reasons::RELAY_NOT_CONNECTED,
                format!(
                    "waiting for relay {} to connect to the controller",
                    relay_name(&key.1)
                ),
                generation,
            ),
        };
        let previous = site.status.clone().unwrap_or_default();
        let status = SiteStatus {
            observed_generation: generation,
            agents,
            relay: heard.stats,
            relay_version: heard.version.or(previous.relay_version),
            relay_last_seen: heard
                .last_seen
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .or(previous.relay_last_seen),
            // What `caravan token create --bundle` hands the site's agents.
            ca: site
                .spec
                .relay
                .tls_secret
                .is_none()
                .then(|| self.ctx.ca.cert_pem().to_string()),
            trust_root_sha256: Some(self.ctx.trust.fingerprint()),
            conditions: [Some(ready), supported].into_iter().flatten().collect(),
        };
        let events = <Site as status_patch::HasStatus>::events(site.status.as_ref(), &status);
        let written =
            status_patch::apply(&self.ctx.client, site, status, field_managers::STATUS).await?;
        if matches!(written, status_patch::Written::Written(_)) {
            for event in events {
                self.ctx.publish(&event, site).await;
            }
        }
        Ok(())
    }
}
