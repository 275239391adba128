//! The content address of a blob: `sha256:<64 lowercase hex digits>`,
//! parsed once at the edge (a manifest, a URL path, a report) and carried as
//! a [`Digest`] from then on.

use std::{fmt, str::FromStr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The only algorithm Caravan addresses content by.
const PREFIX: &str = "sha256:";
/// The pattern the CRD schemas check digests against, so the API server
/// refuses a malformed one from anybody.
pub const PATTERN: &str = "^sha256:[0-9a-f]{64}$";

/// A sha256 digest. Displays, serializes and parses as `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not of the form sha256:<64 lowercase hex digits>")]
pub struct DigestError(pub String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(Sha256::digest(bytes).into())
    }

    /// The digest a finished hasher computed.
    pub fn from_hasher(hasher: Sha256) -> Self {
        use sha2::Digest as _;
        Self(hasher.finalize().into())
    }

    /// Parses the bare hex part (a file name in a content-addressed store).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        let valid = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let mut bytes = [0; 32];
        match valid && hex::decode_to_slice(hex, &mut bytes).is_ok() {
            true => Ok(Self(bytes)),
            false => Err(DigestError(hex.to_string())),
        }
    }

    /// The 64 hex digits: the file name of the blob in a content-addressed store.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The blob's strong HTTP validator: its hex digits, quoted.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.hex())
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        s.strip_prefix(PREFIX)
            .and_then(|hex| Self::from_hex(hex).ok())
            .ok_or_else(|| DigestError(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Digest {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Digest".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": PATTERN })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print_as_sha256_hex_and_nothing_else() {
        let d = Digest::of(b"hello");
        let text = d.to_string();
        assert_eq!(
            text,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(text.parse::<Digest>(), Ok(d));
        assert_eq!(Digest::from_hex(&d.hex()), Ok(d));
        assert_eq!(d.etag(), format!("\"{}\"", d.hex()));
        assert_eq!(serde_json::to_value(d).unwrap(), serde_json::json!(text));
        assert_eq!(serde_json::from_value::<Digest>(text.into()).unwrap(), d);
        let hex = d.hex();
        for bad in [
            format!("md5:{hex}"),
            hex.clone(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            format!("sha256:{}/..", &hex[..61]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} parsed");
        }
        let e = serde_json::from_value::<Digest>("sha256:zz".into()).unwrap_err();
        assert!(
            e.to_string().contains("sha256:<64 lowercase hex digits>"),
            "{e}"
        );
    }

    #[test]
    fn the_schema_pattern_accepts_exactly_what_parses() {
        // The CRD pattern and the parser must agree: a simple check of the
        // pattern's pieces against a digest and a near miss.
        assert_eq!(PATTERN, format!("^{PREFIX}[0-9a-f]{{64}}$"));
        let schema = schemars::schema_for!(Digest);
        assert_eq!(
            schema.get("pattern").and_then(|p| p.as_str()),
            Some(PATTERN)
        );
    }
}
