//! Packages and cabinets: when an artifact is ready to serve.

use std::collections::HashMap;

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::*,
};

use super::super::{fixtures::*, status::*};
use super::condition;

#[test]
fn an_http_cabinet_is_ready_only_while_its_artifacts_can_be_fetched() {
    let http = cabinet("mirror").http("https://files.example.com/pkgs");
    let mut p1 = package("a", "1");
    p1.spec.cabinet = "mirror".into();
    let mut p2 = package("b", "1");
    p2.spec.cabinet = "mirror".into();
    let packages = all([p1, p2]);
    let mut artifacts: Artifacts = HashMap::from([
        (key("a-1"), ArtifactState::Stored(10)),
        (key("b-1"), ArtifactState::Fetching),
    ]);
    let st = cabinet_status(&http, &packages, &artifacts, &HashMap::new());
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(ready.status, "True");
    assert_eq!(
        ready.message,
        "http store https://files.example.com/pkgs: 1 of 2 artifacts fetched and verified"
    );
    assert!(!ready.message.contains("built-in"));
    artifacts.insert(
        key("b-1"),
        ArtifactState::FetchFailed(
            "fetching https://files.example.com/pkgs/sha256/…: 404 Not Found".into(),
        ),
    );
    let st = cabinet_status(&http, &packages, &artifacts, &HashMap::new());
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reasons::ARTIFACT_UNAVAILABLE)
    );
    assert!(ready.message.contains("404 Not Found"), "{}", ready.message);
    assert_eq!((st.packages, st.bytes), (2, 20));
    let builtin = cabinet_status(&cabinet("main"), &packages, &artifacts, &HashMap::new());
    assert_eq!(
        builtin.packages, 0,
        "packages of other cabinets do not count"
    );
    assert_eq!(
        condition(&builtin.conditions, conditions::READY).message,
        "built-in store available"
    );
}

#[test]
fn a_package_is_ready_only_with_its_whole_artifact_in_the_store() {
    let p = package("hello", "1.0.0");
    let cabinets = all([cabinet("main")]);
    let ready_with = |state: ArtifactState| {
        let st = package_status(&p, &cabinets, &HashMap::from([(key("hello-1.0.0"), state)]));
        let c = condition(&st.conditions, conditions::READY).clone();
        (st.artifact_available, c.reason, c.message)
    };
    let (ok, reason, _) = ready_with(ArtifactState::Stored(10));
    assert!(ok && reason == reasons::ARTIFACT_AVAILABLE);
    let (ok, reason, msg) = ready_with(ArtifactState::Stored(9));
    assert!(
        !ok && reason == reasons::ARTIFACT_MISSING && msg.contains("9 bytes"),
        "{msg}"
    );
    let (ok, _, msg) = ready_with(ArtifactState::Missing);
    assert!(!ok && msg.contains("caravan package push"), "{msg}");
    let st = package_status(&p, &[], &HashMap::new());
    assert_eq!(
        condition(&st.conditions, conditions::READY).reason,
        reasons::UNKNOWN_CABINET
    );
}

#[test]
fn a_cabinet_that_requires_signatures_keeps_an_unsigned_package_from_being_ready() {
    let mut strict = cabinet("main");
    strict.spec.require_signatures = true;
    let st = package_status(
        &package("hello", "1.0.0"),
        &all([strict]),
        &HashMap::from([(key("hello-1.0.0"), ArtifactState::Stored(10))]),
    );
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reasons::SIGNATURE_INVALID)
    );
    assert_eq!(
        condition(&st.conditions, conditions::SIGNED).status,
        "False"
    );
}

#[test]
fn a_package_whose_detection_rule_cannot_be_read_is_not_ready_and_says_which() {
    let mut p = package("hello", "1.0.0");
    p.spec.install.detect = vec![DetectionRule {
        file: Some("opt/hello".into()),
        ..Default::default()
    }];
    let st = package_status(
        &p,
        &all([cabinet("main")]),
        &HashMap::from([(key("hello-1.0.0"), ArtifactState::Stored(10))]),
    );
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            ready.message.as_str()
        ),
        (
            "False",
            reasons::INVALID_MANIFEST,
            "install.detect[0]: path \"opt/hello\" is not absolute: no job installs it"
        )
    );
}

#[test]
fn packages_of_one_digest_in_two_cabinets_stand_apart() {
    let builtin = package("hello", "1.0.0");
    let mut mirrored = package("hello", "1.0.0");
    mirrored.metadata.name = Some("hello-mirrored".into());
    mirrored.spec.cabinet = "mirror".into();
    let cabinets = all([
        cabinet("main"),
        cabinet("mirror").http("https://files.example.com"),
    ]);
    let artifacts = HashMap::from([
        (key("hello-1.0.0"), ArtifactState::Missing),
        (
            key("hello-mirrored"),
            ArtifactState::FetchFailed("404 Not Found".into()),
        ),
    ]);
    let reason = |p: &Package| {
        let st = package_status(p, &cabinets, &artifacts);
        let c = condition(&st.conditions, conditions::READY).clone();
        (c.reason, c.message)
    };
    let (r, m) = reason(&builtin);
    assert_eq!(r, reasons::ARTIFACT_MISSING);
    assert!(m.contains("caravan package push"), "{m}");
    let (r, m) = reason(&mirrored);
    assert_eq!(
        (r.as_str(), m.as_str()),
        (reasons::ARTIFACT_UNAVAILABLE, "404 Not Found")
    );
}

#[test]
fn relays_are_sent_to_the_registry_only_for_artifacts_verified_there() {
    let oci = |name: &str, layers_from| {
        let mut c = cabinet(name);
        c.spec.store = CabinetStore {
            type_: StoreType::Oci,
            repository: Some("registry.example.com/caravan/".into()),
            ca_bundle: Some("PEM".into()),
            layers_from,
            ..Default::default()
        };
        c
    };
    let cabinets = all([
        oci("direct", LayersFrom::Relays),
        oci("through", LayersFrom::Controller),
    ]);
    let in_cabinet = |name: &str, cabinet: &str| {
        let mut p = package(name, "1");
        p.spec.cabinet = cabinet.into();
        p
    };
    let packages = all([
        in_cabinet("a", "direct"),
        in_cabinet("b", "direct"),
        in_cabinet("c", "through"),
    ]);
    let artifacts: Artifacts = HashMap::from([
        (key("a-1"), ArtifactState::InRegistry(10)),
        (
            key("b-1"),
            ArtifactState::FetchFailed("manifest not found".into()),
        ),
        (key("c-1"), ArtifactState::Stored(10)),
    ]);
    let sources = super::super::desired::sources(&packages, &cabinets, &artifacts);
    assert_eq!(
        sources,
        HashMap::from([(
            digest_of("a", "1"),
            caravan_api::wire::BlobSource {
                repository: "registry.example.com/caravan/a".into(),
                size: 10,
                ca_bundle: Some("PEM".into()),
            }
        )])
    );
    // The package is ready, and the cabinet says who fetches the layers.
    let st = package_status(&packages[0], &cabinets, &artifacts);
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(ready.status, "True", "{}", ready.message);
    assert!(
        ready.message.contains("relays fetch it from there"),
        "{}",
        ready.message
    );
    let st = cabinet_status(&cabinets[0], &packages, &artifacts, &HashMap::new());
    let ready = condition(&st.conditions, conditions::READY);
    assert!(
        ready
            .message
            .contains("1 of 2 artifacts verified in the registry (relays fetch the layers)"),
        "{}",
        ready.message
    );
}

#[test]
fn an_oci_cabinet_whose_registry_refuses_it_is_not_ready_with_no_package_to_fetch() {
    let mut idle = cabinet("idle");
    idle.spec.store = CabinetStore {
        type_: StoreType::Oci,
        repository: Some("registry.example.com/caravan".into()),
        ..Default::default()
    };
    let fine = cabinet_status(&idle, &[], &HashMap::new(), &HashMap::new());
    assert_eq!(
        condition(&fine.conditions, conditions::READY).status,
        "True"
    );
    let refused =
        "registry.example.com/caravan: the registry refused the credentials (401 Unauthorized)";
    let unreachable = HashMap::from([(key("idle"), refused.to_string())]);
    let st = cabinet_status(&idle, &[], &HashMap::new(), &unreachable);
    let ready = condition(&st.conditions, conditions::READY);
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, reasons::ARTIFACT_UNAVAILABLE);
    assert_eq!(
        ready.message,
        format!("oci store registry.example.com/caravan: 0 of 0 artifacts fetched and verified; {refused}")
    );
}
