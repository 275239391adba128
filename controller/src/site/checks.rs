//! What a Site may ask of the controller. Whoever can write a Site (a Git
//! commit) must not be able to use the controller's privileges beyond
//! running a relay for it:
//! - the relay's Service name must be valid;
//! - the relay image must be one the controller allows (`--allowed-relay-image`);
//! - a child site's parent must be another Site that exists and serves the
//!   certificate the controller's CA issued it;
//! - the relay's extra hostnames must be names, and not cluster Services;
//! - the relay's objects (`<site>-relay`), where they exist, must be the
//!   Site's own, or the controller would take over (and, with the Site,
//!   delete) objects it never made.
//!
//! A Site that asks for more is Stalled with the reason, and nothing is applied.

use std::collections::HashSet;

use caravan_api::{conditions::reasons, names, v1alpha1::Site};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Secret, Service},
};
use kube::{Resource, ResourceExt};

use super::workload::relay_name;
use crate::{context::Context, error::Error};

/// Why a Site's relay is not made: a condition reason and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// The relay's Service is named after the site: a DNS-1035 label; the
/// names its certificate is for are IP addresses or DNS names.
pub fn check_name(site: &Site) -> Result<(), Refusal> {
    let name = site.name_any();
    names::service_name(&relay_name(&name)).map_err(|_| {
        Refusal::new(
            reasons::INVALID_NAME,
            format!(
                "site name {name:?} cannot name a relay Service ({:?}): use at most 57 lowercase letters, digits and '-', starting with a letter",
                relay_name(&name)
            ),
        )
    })?;
    for hostname in &site.spec.relay.hostnames {
        names::hostname(hostname).map_err(|e| {
            Refusal::new(reasons::INVALID_NAME, format!("spec.relay.hostnames: {e}"))
        })?;
        // In-cluster names would let a Site have a certificate for another
        // Site's (or namespace's) Service; its own are always in it.
        if hostname.ends_with(".svc") || hostname.contains(".svc.") {
            return Err(Refusal::new(
                reasons::INVALID_NAME,
                format!("spec.relay.hostnames: {hostname:?} is a cluster Service name; the relay's own are always in its certificate, and no other may be"),
            ));
        }
    }
    Ok(())
}

/// A child site's parent is another Site that exists (`lookup`) and serves
/// the certificate the controller's CA issued it: the child's relay takes
/// its content from the parent's, pinning that CA.
pub fn check_parent(site: &Site, lookup: impl Fn(&str) -> Option<Site>) -> Result<(), Refusal> {
    let Some(name) = &site.spec.parent else {
        return Ok(());
    };
    if *name == site.name_any() {
        return Err(Refusal::new(
            reasons::UNKNOWN_SITE,
            format!("site {name} cannot be its own parent"),
        ));
    }
    match lookup(name) {
        None => Err(Refusal::new(
            reasons::UNKNOWN_SITE,
            format!("parent site {name} does not exist: the relay is made once it does"),
        )),
        Some(parent) if parent.spec.relay.tls_secret.is_some() => Err(Refusal::new(
            reasons::UNKNOWN_SITE,
            format!("parent site {name} serves its own certificate (spec.relay.tlsSecret), which child relays cannot verify: they pin the controller's CA"),
        )),
        Some(_) => Ok(()),
    }
}

/// The repository of an image reference: without its tag or digest.
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or_default();
    match image.rsplit_once(':') {
        // A colon after the last slash starts the tag (before it, a registry port).
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

/// The images a Site may run its relay with: those of the repositories
/// `allowed` names (an entry ending in `/` allows everything beneath it),
/// and always the repository of the controller's default relay image.
/// The relay's settings (url, cache size, bandwidth, transfer window) can be used.
pub fn check_settings(site: &Site) -> Result<(), Refusal> {
    site.spec
        .relay
        .check()
        .map_err(|e| Refusal::new(reasons::INVALID_RELAY_SETTINGS, e))
}

pub fn check_image(site: &Site, default: &str, allowed: &[String]) -> Result<(), Refusal> {
    let Some(image) = &site.spec.relay.image else {
        return Ok(());
    };
    let repo = repository(image);
    let plain = !repo
        .split('/')
        .any(|part| part == ".." || part == "." || part.is_empty());
    let ok = plain
        && (repo == repository(default)
            || allowed
                .iter()
                .any(|a| repo == a.as_str() || (a.ends_with('/') && repo.starts_with(a.as_str()))));
    if ok {
        return Ok(());
    }
    Err(Refusal::new(
        reasons::IMAGE_NOT_ALLOWED,
        format!(
            "relay image {image:?} is not allowed; the controller allows {} (--allowed-relay-image)",
            std::iter::once(repository(default))
                .chain(allowed.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// The relay's objects, where they exist, belong to this Site.
pub async fn check_owned(ctx: &Context, site: &Site) -> Result<Result<(), Refusal>, Error> {
    let ns = site.namespace().unwrap_or_default();
    let name = relay_name(&site.name_any());
    let uid = site
        .meta()
        .uid
        .clone()
        .ok_or(Error::MissingField("metadata.uid"))?;
    let owners = [
        (
            "Secret",
            ctx.namespaced::<Secret>(&ns)
                .get_metadata_opt(&name)
                .await?
                .map(|o| o.metadata),
        ),
        (
            "Deployment",
            ctx.namespaced::<Deployment>(&ns)
                .get_metadata_opt(&name)
                .await?
                .map(|o| o.metadata),
        ),
        (
            "Service",
            ctx.namespaced::<Service>(&ns)
                .get_metadata_opt(&name)
                .await?
                .map(|o| o.metadata),
        ),
    ];
    for (kind, meta) in owners {
        let Some(meta) = meta else { continue };
        let ours = meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true));
        if !ours {
            return Ok(Err(Refusal::new(
                reasons::OBJECT_NOT_OWNED,
                format!("{kind} {name} exists and is not this Site's; remove it, or name the Site otherwise"),
            )));
        }
    }
    Ok(Ok(()))
}

/// The Secret a top-level site's relay signs in to registries with is one
/// meant for it: labelled `caravan.dev/registry-credentials: "true"` (as the
/// controller's own registry Secrets are), with a `.dockerconfigjson`. A
/// Site commit cannot hand its relay any other Secret of the namespace.
pub async fn check_registry_auth(ctx: &Context, site: &Site) -> Result<(), Refusal> {
    let Some(name) = &site.spec.relay.registry_auth_secret else {
        return Ok(());
    };
    let ns = site.namespace().unwrap_or_default();
    let refused = |e: String| {
        Refusal::new(
            reasons::WORKLOAD_REFUSED,
            format!("spec.relay.registryAuthSecret: {e}"),
        )
    };
    let data = crate::context::labelled_secret(
        &ctx.client,
        &ns,
        name,
        caravan_api::labels::REGISTRY_CREDENTIALS,
        "registry credentials",
    )
    .await
    .map_err(refused)?;
    if !data.contains_key(".dockerconfigjson") {
        return Err(refused(format!(
            "Secret {name} holds no .dockerconfigjson (make it with `kubectl create secret docker-registry`)"
        )));
    }
    Ok(())
}

/// Sites whose relay objects were checked to be their own (by UID): checked
/// once, then the controller knows it made them.
#[derive(Default)]
pub struct Verified(std::sync::Mutex<HashSet<String>>);

impl Verified {
    pub fn contains(&self, site: &Site) -> bool {
        site.meta()
            .uid
            .as_ref()
            .is_some_and(|u| self.0.lock().expect("lock poisoned").contains(u))
    }

    pub fn insert(&self, site: &Site) {
        if let Some(uid) = &site.meta().uid {
            self.0.lock().expect("lock poisoned").insert(uid.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, image: Option<&str>) -> Site {
        let mut s = Site::new(name, Default::default());
        s.spec.relay.image = image.map(str::to_owned);
        s
    }

    #[test]
    fn a_site_name_too_long_for_its_relay_service_is_refused_with_the_rule() {
        assert!(check_name(&site("hq", None)).is_ok());
        let e = check_name(&site(&"a".repeat(58), None)).unwrap_err();
        assert!(e.message.contains("at most 57"), "{}", e.message);
        assert!(check_name(&site("9lives", None)).is_err());
    }

    #[test]
    fn relay_hostnames_are_ip_addresses_or_dns_names() {
        let mut site = Site::new("berlin", Default::default());
        site.spec.relay.hostnames = vec!["relay.berlin.example.com".into(), "::1".into()];
        assert_eq!(check_name(&site), Ok(()));
        site.spec.relay.hostnames.push("Relay Berlin".into());
        let r = check_name(&site).unwrap_err();
        assert_eq!(r.reason, reasons::INVALID_NAME);
        assert!(r.message.contains("\"Relay Berlin\""), "{}", r.message);
        // Not another Site's Service.
        site.spec.relay.hostnames = vec!["hq-relay.fleet.svc".into()];
        let r = check_name(&site).unwrap_err();
        assert!(r.message.contains("cluster Service name"), "{}", r.message);
    }

    #[test]
    fn a_child_site_waits_for_its_parent() {
        let hq = Site::new("hq", Default::default());
        let lookup = |name: &str| (name == "hq").then(|| hq.clone());
        let mut site = Site::new("branch", Default::default());
        assert_eq!(check_parent(&site, |_| None), Ok(()), "no parent");
        site.spec.parent = Some("hq".into());
        assert_eq!(check_parent(&site, lookup), Ok(()));
        let r = check_parent(&site, |_| None).unwrap_err();
        assert_eq!(r.reason, reasons::UNKNOWN_SITE);
        assert!(
            r.message.contains("parent site hq does not exist"),
            "{}",
            r.message
        );
        // A parent with a certificate of its own, and a site of its own.
        let mut own = hq.clone();
        own.spec.relay.tls_secret = Some("hq-tls".into());
        let r = check_parent(&site, |_| Some(own.clone())).unwrap_err();
        assert!(
            r.message.contains("serves its own certificate"),
            "{}",
            r.message
        );
        site.spec.parent = Some("branch".into());
        let r = check_parent(&site, |_| Some(site.clone())).unwrap_err();
        assert!(r.message.contains("its own parent"), "{}", r.message);
    }

    #[test]
    fn only_allowed_relay_images_run() {
        let default = &caravan_api::images::relay();
        let allowed = [
            "registry.local:5000/mirror/caravan-relay".to_string(),
            "internal.example.com/caravan/".to_string(),
        ];
        for ok in [
            None,
            Some("ghcr.io/caravan-dev/caravan-relay:0.2.0"),
            Some("ghcr.io/caravan-dev/caravan-relay@sha256:abcd"),
            Some("registry.local:5000/mirror/caravan-relay:1"),
            Some("internal.example.com/caravan/relay-debug:1"),
        ] {
            assert!(
                check_image(&site("hq", ok), default, &allowed).is_ok(),
                "{ok:?}"
            );
        }
        for bad in [
            "evil.example.com/miner:latest",
            "ghcr.io/caravan-dev/caravan-relay-evil:1",
            "registry.local:5000/mirror/caravan-relay/../miner:1",
            "internal.example.com/caravanx:1",
            "internal.example.com/caravan/../miner:1",
        ] {
            let e = check_image(&site("hq", Some(bad)), default, &allowed).unwrap_err();
            assert_eq!(e.reason, reasons::IMAGE_NOT_ALLOWED, "{bad}");
        }
        assert_eq!(repository("localhost:5000/relay"), "localhost:5000/relay");
        assert_eq!(
            repository("localhost:5000/relay:1.2"),
            "localhost:5000/relay"
        );
    }
}
