//! Validating admission webhook for Packages: the identity rules of
//! [`crate::identity`] for every write, whoever makes it (kubectl, the Git
//! sync, another tool). Served at `/validate/packages` on the distribution
//! API, which must then be HTTPS: the API server calls webhooks over TLS only.
//! CEL validation rules would be simpler, but the oldest supported API
//! server (v1.20) rejects them.

use std::sync::Arc;

use axum::{extract::State, Json};
use caravan_api::v1alpha1::{Package, PackageSpec};
use kube::{
    core::{
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
        DynamicObject,
    },
    ResourceExt,
};

use crate::context::Context;

/// Path the ValidatingWebhookConfiguration points at.
pub const PACKAGES_PATH: &str = "/validate/packages";

pub async fn validate_packages(
    State(ctx): State<Arc<Context>>,
    Json(review): Json<AdmissionReview<Package>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Package> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let response = AdmissionResponse::from(&req);
    Json(
        match decide(&ctx, &req) {
            Ok(()) => response,
            Err(reason) => {
                tracing::info!(package = %req.name, %reason, "write refused");
                response.deny(reason)
            }
        }
        .into_review(),
    )
}

fn decide(ctx: &Context, req: &AdmissionRequest<Package>) -> Result<(), String> {
    // Deletions carry no new object; they are always allowed.
    let Some(new) = &req.object else {
        return Ok(());
    };
    let ns = req.namespace.clone().unwrap_or_default();
    let name = new.name_any();
    let mut existing: Vec<(String, PackageSpec)> = ctx
        .stores
        .packages
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
    )
}
