//! Package and cabinet status: whether each artifact is there (stored,
//! fetched, verified in a registry) and signed, and whether each cabinet's
//! store works.

use std::{collections::HashMap, sync::Arc};

use caravan_api::{
    conditions::{self, reasons},
    signing,
    v1alpha1::*,
};
use kube::{Resource, ResourceExt};

use super::super::{key_of, ObjectKey};

/// Where a package's artifact stands in the controller's store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactState {
    /// In the store, this many bytes.
    Stored(u64),
    /// Being fetched from its `http` cabinet.
    Fetching,
    /// The last fetch from its `http` cabinet failed (tried again shortly).
    FetchFailed(String),
    /// Not in the store.
    Missing,
    /// Not in the store, and need not be: the registry's pinned manifest
    /// names it (this many bytes), and relays fetch it from there.
    InRegistry(u64),
}

/// Why the registry of an `oci` cabinet cannot be used, by cabinet (as its
/// last probe found).
pub type Unreachable = HashMap<ObjectKey, String>;

/// Where each package's artifact stands, by package (two packages of one
/// digest in different cabinets stand apart: one may be fetched, the other pushed).
pub type Artifacts = HashMap<ObjectKey, ArtifactState>;

/// The status of package `p`: its artifact (present, of the declared size)
/// and its signatures (checked against the keys its cabinet trusts).
pub fn package_status(
    p: &Package,
    cabinets: &[Arc<Cabinet>],
    artifacts: &Artifacts,
) -> PackageStatus {
    let generation = p.meta().generation;
    let cabinet = cabinets
        .iter()
        .find(|c| c.namespace() == p.namespace() && c.name_any() == p.spec.cabinet);
    let digest = &p.spec.artifact.digest;
    let state = artifacts.get(&key_of(p)).unwrap_or(&ArtifactState::Missing);
    let artifact = match (cabinet, state) {
        (None, _) => Err((
            reasons::UNKNOWN_CABINET,
            format!("cabinet {} not found", p.spec.cabinet),
        )),
        (Some(c), ArtifactState::Stored(size)) if *size == p.spec.artifact.size => {
            Ok(match c.spec.store.artifact_url(&p.spec.name, digest) {
                Some(url) => format!("artifact fetched from {url}, size and digest verified"),
                None => format!("artifact {digest} stored"),
            })
        }
        (Some(c), ArtifactState::InRegistry(size)) if *size == p.spec.artifact.size => {
            Ok(format!(
                "artifact {} verified in the registry (pinned manifest, layer digest and size); relays fetch it from there",
                c.spec
                    .store
                    .artifact_url(&p.spec.name, digest)
                    .unwrap_or_default()
            ))
        }
        (Some(_), ArtifactState::Stored(size) | ArtifactState::InRegistry(size)) => Err((
            reasons::ARTIFACT_MISSING,
            format!(
                "stored artifact is {size} bytes, manifest says {}",
                p.spec.artifact.size
            ),
        )),
        (Some(c), ArtifactState::Fetching) => Err((
            reasons::ARTIFACT_FETCHING,
            format!(
                "fetching {}",
                c.spec
                    .store
                    .artifact_url(&p.spec.name, digest)
                    .unwrap_or_default()
            ),
        )),
        (Some(_), ArtifactState::FetchFailed(message)) => {
            Err((reasons::ARTIFACT_UNAVAILABLE, message.clone()))
        }
        (Some(_), ArtifactState::Missing) => Err((
            reasons::ARTIFACT_MISSING,
            format!(
                "artifact {digest} is not in cabinet {}; push it with `caravan package push`",
                p.spec.cabinet
            ),
        )),
    };
    let mut conds = Vec::new();
    // Signatures are checked against the keys the cabinet trusts.
    let signed = cabinet
        .filter(|c| !c.spec.trusted_keys.is_empty() || c.spec.require_signatures)
        .map(|c| {
            let keys: Vec<_> = c
                .spec
                .trusted_keys
                .iter()
                .filter_map(|k| signing::parse_public(&k.public_key).ok())
                .collect();
            signing::verify(
                &keys,
                &p.spec.signatures,
                &signing::Signed::of_spec(&p.spec),
            )
        });
    if let Some(result) = &signed {
        conds.push(match result {
            Ok(key) => conditions::new(
                conditions::SIGNED,
                true,
                reasons::SIGNATURE_VERIFIED,
                format!("signed by trusted key {key}"),
                generation,
            ),
            Err(e) => conditions::new(
                conditions::SIGNED,
                false,
                reasons::SIGNATURE_INVALID,
                e.to_string(),
                generation,
            ),
        });
    }
    let require = cabinet.is_some_and(|c| c.spec.require_signatures);
    let unreadable = p.spec.install.check().err();
    let ready = match (&artifact, &signed) {
        (Err((reason, msg)), _) => {
            conditions::new(conditions::READY, false, reason, msg.clone(), generation)
        }
        (Ok(_), _) if unreadable.is_some() => conditions::new(
            conditions::READY,
            false,
            reasons::INVALID_MANIFEST,
            format!("{}: no job installs it", unreadable.unwrap_or_default()),
            generation,
        ),
        (Ok(_), Some(Err(e))) if require => conditions::new(
            conditions::READY,
            false,
            reasons::SIGNATURE_INVALID,
            format!(
                "cabinet {} requires a trusted signature: {e}",
                p.spec.cabinet
            ),
            generation,
        ),
        (Ok(msg), _) => conditions::new(
            conditions::READY,
            true,
            reasons::ARTIFACT_AVAILABLE,
            msg.clone(),
            generation,
        ),
    };
    conds.insert(0, ready);
    PackageStatus {
        observed_generation: generation,
        artifact_available: artifact.is_ok(),
        conditions: conds,
    }
}

/// The status of cabinet `c`: its packages and their bytes, and whether
/// the store works: the built-in store always does; an `http` store is
/// not Ready while fetching an artifact from it fails.
pub fn cabinet_status(
    c: &Cabinet,
    packages: &[Arc<Package>],
    artifacts: &Artifacts,
    unreachable: &Unreachable,
) -> CabinetStatus {
    let generation = c.meta().generation;
    let mine: Vec<_> = packages
        .iter()
        .filter(|p| p.namespace() == c.namespace() && p.spec.cabinet == c.name_any())
        .collect();
    let store = &c.spec.store;
    let remote = match store.type_ {
        StoreType::Http => Some(format!(
            "http store {}",
            store.url.as_deref().unwrap_or_default()
        )),
        StoreType::Oci => Some(format!(
            "oci store {}",
            store.repository.as_deref().unwrap_or_default()
        )),
        StoreType::Builtin => None,
    };
    let ready = match remote {
        Some(url) => {
            let state = |p: &Package| artifacts.get(&key_of(p));
            let fetched = mine
                .iter()
                .filter(|p| {
                    matches!(
                        state(p),
                        Some(ArtifactState::Stored(_) | ArtifactState::InRegistry(_))
                    )
                })
                .count();
            // The registry refusing or away comes first; then a fetch that failed.
            let failed = unreachable
                .get(&key_of(c))
                .into_iter()
                .chain(mine.iter().filter_map(|p| match state(p) {
                    Some(ArtifactState::FetchFailed(m)) => Some(m),
                    _ => None,
                }))
                .next();
            let counts = match store.layers_from {
                LayersFrom::Controller => {
                    format!("{fetched} of {} artifacts fetched and verified", mine.len())
                }
                LayersFrom::Relays => format!(
                    "{fetched} of {} artifacts verified in the registry (relays fetch the layers)",
                    mine.len()
                ),
            };
            match failed {
                None => conditions::new(
                    conditions::READY,
                    true,
                    reasons::SUCCEEDED,
                    format!("{url}: {counts}"),
                    generation,
                ),
                Some(m) => conditions::new(
                    conditions::READY,
                    false,
                    reasons::ARTIFACT_UNAVAILABLE,
                    format!("{url}: {counts}; {m}"),
                    generation,
                ),
            }
        }
        None => conditions::new(
            conditions::READY,
            true,
            reasons::SUCCEEDED,
            "built-in store available",
            generation,
        ),
    };
    CabinetStatus {
        observed_generation: generation,
        packages: mine.len() as u32,
        bytes: mine.iter().map(|p| p.spec.artifact.size).sum(),
        conditions: vec![ready],
    }
}
