//! Bootstrap tokens: what a new endpoint presents, once, to enroll at a
//! site. The token is `<id>.<secret>`: the id names the BootstrapToken
//! object, which holds only the sha256 of the secret — the secret itself is
//! shown once, by `caravan token create`, and stored nowhere. A token
//! expires, may be limited to a number of uses, is revoked by deleting its
//! object, and is bound to the UID of its Site: a deleted Site's tokens do
//! not come back to life with a new Site of the same name.

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A token agents present to enroll at a site (see `caravan token create`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "BootstrapToken",
    namespaced,
    status = "BootstrapTokenStatus",
    shortname = "bt",
    category = "caravan",
    printcolumn = r#"{"name":"Site","type":"string","jsonPath":".spec.site"}"#,
    printcolumn = r#"{"name":"Uses","type":"integer","jsonPath":".status.uses"}"#,
    printcolumn = r#"{"name":"Max Uses","type":"integer","jsonPath":".spec.maxUses"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expires"}"#,
    printcolumn = r#"{"name":"Description","type":"string","jsonPath":".spec.description","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapTokenSpec {
    /// Site whose agents may enroll with the token.
    pub site: String,
    /// UID of that Site when the token was made: the token is refused once
    /// the Site is deleted, even if a Site of the same name is created again.
    #[serde(rename = "siteUID")]
    pub site_uid: String,
    /// sha256 (hex) of the token's secret part; the secret is stored nowhere.
    pub secret_sha256: String,
    /// The token is refused from this time on (RFC 3339).
    #[schemars(with = "String")]
    pub expires: DateTime<Utc>,
    /// Enrollments the token allows (unset: any number until it expires;
    /// 1: single-use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// What the token is for, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// How the token has been used.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapTokenStatus {
    /// Enrollments made with the token so far.
    #[serde(default)]
    pub uses: u32,
    /// When the token was last used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub last_used: Option<DateTime<Utc>>,
}

/// Length in hex digits of a token's id and secret.
pub const TOKEN_ID_HEX: usize = 16;
pub const TOKEN_SECRET_HEX: usize = 64;

/// A token as an agent presents it: `<id>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenString {
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for TokenString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenString({}.<redacted>)", self.id)
    }
}

impl std::fmt::Display for TokenString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TokenString {
    /// A token from its random parts (8 bytes of id, 32 of secret).
    pub fn new(id: [u8; TOKEN_ID_HEX / 2], secret: [u8; TOKEN_SECRET_HEX / 2]) -> Self {
        Self {
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    pub fn parse(text: &str) -> Result<Self, TokenRefusal> {
        match text.split_once('.') {
            Some((id, secret)) if is_hex(id, TOKEN_ID_HEX) && is_hex(secret, TOKEN_SECRET_HEX) => {
                Ok(Self {
                    id: id.into(),
                    secret: secret.into(),
                })
            }
            _ => Err(TokenRefusal::Malformed),
        }
    }

    /// What the token's object stores of it.
    pub fn secret_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

/// Why a bootstrap token was refused. The messages name the token by id
/// only, never its secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("not a bootstrap token: expected <16 hex digits>.<64 hex digits> (from `caravan token create`)")]
    Malformed,
    #[error("bootstrap token {0} does not exist or was revoked")]
    Unknown(String),
    #[error("bootstrap token {0} does not match its record")]
    WrongSecret(String),
    #[error("bootstrap token {id} is for site {site}, not {asked}")]
    OtherSite {
        id: String,
        site: String,
        asked: String,
    },
    #[error("bootstrap token {0} was made for a Site that has since been deleted")]
    SiteGone(String),
    #[error("bootstrap token {id} expired at {expires}")]
    Expired { id: String, expires: String },
    #[error("bootstrap token {id} is used up ({max} of {max} enrollments)")]
    UsedUp { id: String, max: u32 },
}

impl TokenRefusal {
    /// The refusal as an Event reason, one per kind.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "BootstrapTokenMalformed",
            Self::WrongSecret(_) => "BootstrapTokenInvalid",
            Self::Unknown(_) => "BootstrapTokenUnknown",
            Self::OtherSite { .. } => "BootstrapTokenOfOtherSite",
            Self::SiteGone(_) => "BootstrapTokenOfDeletedSite",
            Self::Expired { .. } => "BootstrapTokenExpired",
            Self::UsedUp { .. } => "BootstrapTokenUsedUp",
        }
    }
}

impl BootstrapToken {
    /// Whether `token` may enroll an agent at site `site` (whose current
    /// UID is `site_uid`, `None` if there is no such Site) at `now`.
    pub fn admits(
        &self,
        token: &TokenString,
        site: &str,
        site_uid: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), TokenRefusal> {
        let id = token.id.clone();
        // Digests are compared, not secrets: how long the comparison takes
        // tells of the digest only, which gives no way to the secret.
        if token.secret_sha256() != self.spec.secret_sha256 {
            return Err(TokenRefusal::WrongSecret(id));
        }
        if self.spec.site != site {
            return Err(TokenRefusal::OtherSite {
                id,
                site: self.spec.site.clone(),
                asked: site.into(),
            });
        }
        if site_uid != Some(self.spec.site_uid.as_str()) {
            return Err(TokenRefusal::SiteGone(id));
        }
        if self.spec.expires <= now {
            return Err(TokenRefusal::Expired {
                id,
                expires: self.spec.expires.to_rfc3339(),
            });
        }
        let uses = self.status.as_ref().map_or(0, |s| s.uses);
        if let Some(max) = self.spec.max_uses.filter(|max| uses >= *max) {
            return Err(TokenRefusal::UsedUp { id, max });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(token: &TokenString, max_uses: Option<u32>, uses: u32) -> BootstrapToken {
        let now = Utc::now();
        let mut bt = BootstrapToken::new(
            &token.id,
            BootstrapTokenSpec {
                site: "hq".into(),
                site_uid: "uid-1".into(),
                secret_sha256: token.secret_sha256(),
                expires: now + chrono::Duration::hours(1),
                max_uses,
                description: String::new(),
            },
        );
        bt.status = Some(BootstrapTokenStatus {
            uses,
            last_used: None,
        });
        bt
    }

    #[test]
    fn a_token_admits_only_its_live_site_until_it_expires_or_is_used_up() {
        let token = TokenString::new([1; 8], [2; 32]);
        assert_eq!(TokenString::parse(&token.to_string()), Ok(token.clone()));
        assert!(
            !format!("{token:?}").contains(&"02".repeat(32)),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "abc",
            "0101010101010101",
            &format!("{}.{}", "g".repeat(16), "0".repeat(64)),
        ] {
            assert_eq!(
                TokenString::parse(bad),
                Err(TokenRefusal::Malformed),
                "{bad}"
            );
        }
        let now = Utc::now();
        let bt = record(&token, None, 7);
        assert_eq!(bt.admits(&token, "hq", Some("uid-1"), now), Ok(()));
        let forged = TokenString::new([1; 8], [3; 32]);
        assert_eq!(
            bt.admits(&forged, "hq", Some("uid-1"), now),
            Err(TokenRefusal::WrongSecret(token.id.clone()))
        );
        assert!(matches!(
            bt.admits(&token, "paris", Some("uid-1"), now),
            Err(TokenRefusal::OtherSite { .. })
        ));
        // The Site was deleted, or deleted and made again under the same name.
        for uid in [None, Some("uid-2")] {
            assert_eq!(
                bt.admits(&token, "hq", uid, now),
                Err(TokenRefusal::SiteGone(token.id.clone()))
            );
        }
        assert!(matches!(
            bt.admits(
                &token,
                "hq",
                Some("uid-1"),
                now + chrono::Duration::hours(2)
            ),
            Err(TokenRefusal::Expired { .. })
        ));
        assert_eq!(
            record(&token, Some(1), 0).admits(&token, "hq", Some("uid-1"), now),
            Ok(())
        );
        assert_eq!(
            record(&token, Some(1), 1).admits(&token, "hq", Some("uid-1"), now),
            Err(TokenRefusal::UsedUp {
                id: token.id.clone(),
                max: 1
            })
        );
    }
}
