//! Validating admission webhooks for Packages and Cabinets: the identity
//! rules of [`crate::identity`] for every write, whoever makes it (kubectl,
//! the Git sync, another tool). Served at `wire::paths::VALIDATE_PACKAGES`
//! and `VALIDATE_CABINETS` on the distribution API, which must then be HTTPS: the API server calls webhooks
//! over TLS only.
//! CEL validation rules would be simpler, but the oldest supported API
//! server (v1.20) rejects them.

use axum::Json;
use caravan_api::v1alpha1::{Cabinet, Package, PackageSpec};
use kube::{
    core::{
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
        DynamicObject,
    },
    runtime::reflector::Store,
    ResourceExt,
};

/// Answers an admission review of a Package write, judging it against
/// `packages` (the cached Packages).
pub async fn validate_packages(
    packages: Store<Package>,
    ctx: std::sync::Arc<crate::context::Context>,
    Json(review): Json<AdmissionReview<Package>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Package> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let response = AdmissionResponse::from(&req);
    Json(
        match decide(&packages, &ctx.published, &req) {
            Ok(()) => response,
            Err(reason) => {
                tracing::info!(package = %req.name, %reason, "write refused");
                response.deny(reason)
            }
        }
        .into_review(),
    )
}

fn decide(
    packages: &Store<Package>,
    published: &crate::identity::Ledger,
    req: &AdmissionRequest<Package>,
) -> Result<(), String> {
    // Deletions carry no new object; they are always allowed.
    let Some(new) = &req.object else {
        return Ok(());
    };
    let ns = req.namespace.clone().unwrap_or_default();
    let name = new.name_any();
    let mut existing: Vec<(String, PackageSpec)> = packages
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && p.name_any() != name)
        .map(|p| (p.name_any(), p.spec.clone()))
        .collect();
    // The object as it is now comes with the request itself, fresher than the cache.
    if let Some(old) = &req.old_object {
        existing.push((name.clone(), old.spec.clone()));
    }
    crate::identity::check(
        &name,
        &new.spec,
        existing.iter().map(|(n, s)| (n.as_str(), s)),
    )?;
    // Deleted and created again: what the version was published with stays.
    published.check(&ns, &new.spec)
}

/// Answers an admission review of a Cabinet write: one that requires
/// signatures (now, or ever before) keeps requiring them.
pub async fn validate_cabinets(
    ctx: std::sync::Arc<crate::context::Context>,
    Json(review): Json<AdmissionReview<Cabinet>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Cabinet> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let response = AdmissionResponse::from(&req);
    let decision = match &req.object {
        None => Ok(()),
        Some(new) if new.spec.require_signatures => Ok(()),
        Some(new) => {
            let ns = req.namespace.clone().unwrap_or_default();
            let was = req
                .old_object
                .as_ref()
                .is_some_and(|old| old.spec.require_signatures);
            if was {
                Err(format!(
                    "Cabinet {} requires signatures, and that cannot be switched off (agents rely on it); \
                     put unsigned packages in a cabinet of their own",
                    new.name_any()
                ))
            } else {
                ctx.published.check_cabinet(&ns, &new.name_any(), false)
            }
        }
    };
    Json(
        match decision {
            Ok(()) => response,
            Err(reason) => {
                tracing::info!(cabinet = %req.name, %reason, "write refused");
                response.deny(reason)
            }
        }
        .into_review(),
    )
}
