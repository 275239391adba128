//! Package signatures (ed25519): release keys vouching for a package, the
//! "image repository" side of Uptane. A signature covers the whole package
//! metadata an agent acts on — name, version, artifact digest and size, and
//! the install spec (method, scripts, health check, requirements) — so it
//! can be moved neither to another package or version nor to another way
//! of installing it. Keys are exchanged as one line of text:
//! `ed25519:<base64 of the 32-byte key>`; a key's ID is the first 16 hex
//! digits of the sha256 of the public key.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    v1alpha1::{InstallSpec, PackageSpec},
    Digest,
};

const PREFIX: &str = "ed25519:";

/// One signature on a Package.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageSignature {
    /// ID of the signing key (see [`key_id`]).
    pub key_id: String,
    /// Base64 ed25519 signature of [`message`].
    pub signature: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("not an ed25519 key: expected `ed25519:<base64 of 32 bytes>`")]
    BadKey,
    #[error("package is not signed by any trusted key")]
    Unsigned,
    #[error("signature by key {0} does not match the package (tampered, re-versioned, or signed before signatures covered the install spec: sign it again)")]
    Invalid(String),
}

/// The package metadata a signature covers.
#[derive(Serialize, Debug, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub struct Signed<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub digest: &'a Digest,
    pub size: u64,
    pub install: &'a InstallSpec,
}

impl<'a> Signed<'a> {
    /// What a Package in Git declares.
    pub fn of_spec(spec: &'a PackageSpec) -> Self {
        Self {
            name: &spec.name,
            version: &spec.version,
            digest: &spec.artifact.digest,
            size: spec.artifact.size,
            install: &spec.install,
        }
    }
}

/// The bytes a package signature covers: a domain prefix, then the
/// metadata as JSON, fields in a fixed order (that of the Rust types,
/// absent options left out).
pub fn message(package: &Signed) -> Vec<u8> {
    let mut out = b"caravan-package-v2\0".to_vec();
    serde_json::to_writer(&mut out, package).expect("package metadata serializes");
    out
}

fn decode32(text: &str) -> Result<[u8; 32], SignatureError> {
    let b64 = text
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(SignatureError::BadKey)?;
    B64.decode(b64)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(SignatureError::BadKey)
}

/// A public key as text.
pub fn parse_public(text: &str) -> Result<VerifyingKey, SignatureError> {
    VerifyingKey::from_bytes(&decode32(text)?).map_err(|_| SignatureError::BadKey)
}

/// A private key as text.
pub fn parse_private(text: &str) -> Result<SigningKey, SignatureError> {
    Ok(SigningKey::from_bytes(&decode32(text)?))
}

pub fn encode_public(key: &VerifyingKey) -> String {
    format!("{PREFIX}{}", B64.encode(key.as_bytes()))
}

pub fn encode_private(key: &SigningKey) -> String {
    format!("{PREFIX}{}", B64.encode(key.to_bytes()))
}

/// First 16 hex digits of the sha256 of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// A signature (base64) of any `message` by `key`.
pub fn sign_bytes(key: &SigningKey, message: &[u8]) -> String {
    B64.encode(key.sign(message).to_bytes())
}

/// Checks a signature (base64) of `message` by the public key `key` (text
/// form).
pub fn verify_bytes(key: &str, message: &[u8], signature: &str) -> Result<(), SignatureError> {
    let key = parse_public(key)?;
    let signature = B64
        .decode(signature)
        .ok()
        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
        .ok_or_else(|| SignatureError::Invalid(key_id(&key)))?;
    key.verify_strict(message, &signature)
        .map_err(|_| SignatureError::Invalid(key_id(&key)))
}

pub fn sign(key: &SigningKey, package: &Signed) -> PackageSignature {
    PackageSignature {
        key_id: key_id(&key.verifying_key()),
        signature: B64.encode(key.sign(&message(package)).to_bytes()),
    }
}

/// Checks that one of `signatures` is a valid signature by one of `trusted`.
/// Returns the ID of the key that signed.
pub fn verify(
    trusted: &[VerifyingKey],
    signatures: &[PackageSignature],
    package: &Signed,
) -> Result<String, SignatureError> {
    let msg = message(package);
    let mut invalid = None;
    for sig in signatures {
        let Some(key) = trusted.iter().find(|k| key_id(k) == sig.key_id) else {
            continue;
        };
        let ok = B64
            .decode(&sig.signature)
            .ok()
            .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
            .is_some_and(|s| key.verify_strict(&msg, &s).is_ok());
        if ok {
            return Ok(sig.key_id.clone());
        }
        invalid = Some(sig.key_id.clone());
    }
    Err(invalid.map_or(SignatureError::Unsigned, SignatureError::Invalid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_of_bytes_verifies_only_for_its_key_and_message() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = encode_public(&key.verifying_key());
        let sig = sign_bytes(&key, b"renew kiosk-1 at 1000");
        assert_eq!(
            verify_bytes(&public, b"renew kiosk-1 at 1000", &sig),
            Ok(())
        );
        assert!(verify_bytes(&public, b"renew kiosk-2 at 1000", &sig).is_err());
        let other = encode_public(&SigningKey::from_bytes(&[8; 32]).verifying_key());
        assert!(verify_bytes(&other, b"renew kiosk-1 at 1000", &sig).is_err());
        assert!(verify_bytes(&public, b"renew kiosk-1 at 1000", "not base64").is_err());
        assert_eq!(
            verify_bytes("ed25519:AAAA", b"x", &sig),
            Err(SignatureError::BadKey)
        );
    }

    #[test]
    fn a_signature_binds_the_whole_package_metadata() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = parse_public(&encode_public(&key.verifying_key())).unwrap();
        let (aa, bb) = (Digest::of(b"a"), Digest::of(b"b"));
        let install = InstallSpec::default();
        let pkg = Signed {
            name: "hello",
            version: "1.0.0",
            digest: &aa,
            size: 10,
            install: &install,
        };
        let sig = sign(&key, &pkg);
        // The signed bytes are pinned: a change here invalidates every signature
        // already committed to Git, so it must come with a new domain prefix.
        assert_eq!(
            String::from_utf8(message(&pkg)).unwrap(),
            format!(
                "caravan-package-v2\0{{\"name\":\"hello\",\"version\":\"1.0.0\",\"digest\":\"sha256:{}\",\"size\":10,\"install\":{{\"method\":\"archive\"}}}}",
                aa.hex()
            )
        );
        let check = |p: &Signed| verify(&[public], std::slice::from_ref(&sig), p);
        assert_eq!(check(&pkg), Ok(key_id(&public)));
        let wrong = Err(SignatureError::Invalid(key_id(&public)));
        assert_eq!(
            check(&Signed {
                version: "1.0.1",
                ..pkg
            }),
            wrong
        );
        assert_eq!(check(&Signed { digest: &bb, ..pkg }), wrong);
        assert_eq!(check(&Signed { size: 11, ..pkg }), wrong);
        let script: InstallSpec =
            serde_json::from_value(serde_json::json!({"method": "script"})).unwrap();
        assert_eq!(
            check(&Signed {
                install: &script,
                ..pkg
            }),
            wrong,
            "another install method"
        );
        let checked = InstallSpec {
            health_check: Some("bin/check".into()),
            ..Default::default()
        };
        assert_eq!(
            check(&Signed {
                install: &checked,
                ..pkg
            }),
            wrong,
            "another health check"
        );
        // Every part of the install spec is signed: a signature over the
        // spec without it does not hold for the spec with it.
        let spec = |v| serde_json::from_value::<InstallSpec>(v).unwrap();
        for (what, without, with) in [
            (
                "a dependency",
                serde_json::json!({}),
                serde_json::json!({"requires": [{"name": "libc"}]}),
            ),
            (
                "a detection rule",
                serde_json::json!({}),
                serde_json::json!({"detect": [{"command": ["/bin/true"]}]}),
            ),
            (
                "an uninstall before upgrades",
                serde_json::json!({"method": "script", "script": {}}),
                serde_json::json!({"method": "script", "script": {"uninstallOnUpgrade": true}}),
            ),
        ] {
            let (without, with) = (spec(without), spec(with));
            let sig = sign(
                &key,
                &Signed {
                    install: &without,
                    ..pkg
                },
            );
            let held = verify(
                &[public],
                &[sig],
                &Signed {
                    install: &with,
                    ..pkg
                },
            );
            assert_eq!(held, wrong, "{what}");
        }
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert_eq!(
            verify(&[other], &[sig], &pkg),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(verify(&[public], &[], &pkg), Err(SignatureError::Unsigned));
        assert_eq!(
            parse_public("ed25519:AAAA").unwrap_err(),
            SignatureError::BadKey
        );
    }
}
