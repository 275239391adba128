//! Package signatures (ed25519). A signature covers the package's identity
//! and content together — name, version and artifact digest — so it cannot be
//! moved to another package or version. Keys are exchanged as one line of
//! text: `ed25519:<base64 of the 32-byte key>`; a key's ID is the first 16 hex
//! digits of the sha256 of the public key.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::Digest;

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
    #[error("signature by key {0} does not match the package (tampered or re-versioned)")]
    Invalid(String),
}

/// The bytes a package signature covers.
pub fn message(name: &str, version: &str, digest: &Digest) -> Vec<u8> {
    format!("caravan-package-v1\0{name}\0{version}\0{digest}").into_bytes()
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

pub fn sign(key: &SigningKey, name: &str, version: &str, digest: &Digest) -> PackageSignature {
    PackageSignature {
        key_id: key_id(&key.verifying_key()),
        signature: B64.encode(key.sign(&message(name, version, digest)).to_bytes()),
    }
}

/// Checks that one of `signatures` is a valid signature by one of `trusted`.
/// Returns the ID of the key that signed.
pub fn verify(
    trusted: &[VerifyingKey],
    signatures: &[PackageSignature],
    name: &str,
    version: &str,
    digest: &Digest,
) -> Result<String, SignatureError> {
    let msg = message(name, version, digest);
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
    fn a_signature_binds_name_version_and_digest() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = parse_public(&encode_public(&key.verifying_key())).unwrap();
        let (aa, bb) = (Digest::of(b"a"), Digest::of(b"b"));
        let sig = sign(&key, "hello", "1.0.0", &aa);
        // The signed bytes keep their format: signatures made earlier stay valid.
        assert_eq!(
            message("hello", "1.0.0", &aa),
            format!("caravan-package-v1\0hello\01.0.0\0sha256:{}", aa.hex()).into_bytes()
        );
        assert_eq!(
            verify(&[public], std::slice::from_ref(&sig), "hello", "1.0.0", &aa),
            Ok(key_id(&public))
        );
        let wrong = Err(SignatureError::Invalid(key_id(&public)));
        assert_eq!(
            verify(&[public], std::slice::from_ref(&sig), "hello", "1.0.1", &aa),
            wrong
        );
        assert_eq!(
            verify(&[public], std::slice::from_ref(&sig), "hello", "1.0.0", &bb),
            wrong
        );
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert_eq!(
            verify(&[other], &[sig], "hello", "1.0.0", &aa),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(
            verify(&[public], &[], "hello", "1.0.0", &aa),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(
            parse_public("ed25519:AAAA").unwrap_err(),
            SignatureError::BadKey
        );
    }
}
