use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A location with its own relay; agents enroll at a site.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Site",
    namespaced,
    status = "SiteStatus",
    shortname = "site",
    category = "caravan",
    printcolumn = r#"{"name":"Parent","type":"string","jsonPath":".spec.parent"}"#,
    printcolumn = r#"{"name":"Relay","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.agents"}"#,
    printcolumn = r#"{"name":"Cache","type":"integer","jsonPath":".status.relay.cacheBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// The site above this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The relay the controller runs for the site (a Deployment and Service named `<site>-relay`).
    #[serde(default)]
    pub relay: RelaySpec,
    /// How agents join the site.
    #[serde(default)]
    pub enrollment: EnrollmentSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// Relay pods (default 1).
    #[serde(default = "one")]
    pub replicas: i32,
    /// Relay image; the controller's default when empty. Only images the
    /// controller allows (`--allowed-relay-image`) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A `kubernetes.io/tls` Secret to serve agents with instead of the
    /// certificate the controller's CA issues the relay (it must still be
    /// signed by a CA the agents are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    /// More names (DNS names or IP addresses) agents reach the relay by, for
    /// the certificate the controller's CA issues it; the relay's Service
    /// names, `localhost` and `127.0.0.1` are always in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// A `kubernetes.io/dockerconfigjson` Secret with the relay's own (pull)
    /// credentials for registries of `oci` cabinets whose layers relays
    /// fetch (`layersFrom: Relays`), mounted as its `--registry-auth-file`.
    /// Only a top-level site's relay fetches from registries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth_secret: Option<String>,
}

impl Default for RelaySpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            image: None,
            tls_secret: None,
            hostnames: Vec::new(),
            registry_auth_secret: None,
        }
    }
}

fn one() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSpec {
    /// New agents wait for approval (`caravan agent approve`, which sets
    /// the Agent's `spec.approved`) before they get any work. Agents enroll
    /// with a BootstrapToken of the site (`caravan token create`).
    #[serde(default)]
    pub require_approval: bool,
}

/// The site's agents and its relay, as the controller last saw them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Agents enrolled at this site.
    #[serde(default)]
    pub agents: u32,
    /// When the relay last talked to the controller (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_last_seen: Option<String>,
    /// The relay's cache, as it last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<crate::wire::RelayStats>,
    /// The CA (PEM) that issued the relay's certificate, which the site's
    /// agents pin (`--ca-file`); none when the Site brings its own
    /// certificate (`spec.relay.tlsSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// sha256 of the controller's root of trust, which the site's agents
    /// pin (`--trust-root-sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_root_sha256: Option<String>,
    /// The latest observations of the object's state (`Ready`, and the kind's own).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl Site {
    /// The key ID of the site's relay credential, derived from the Site's UID
    /// and its rotation annotation
    /// ([`crate::labels::RELAY_CREDENTIAL_ROTATION`]): each rotation gives
    /// a new one, and so does a Site deleted and created again under the
    /// same name, so no credential outlives the Site it was issued for.
    pub fn relay_key_id(&self) -> String {
        use sha2::Digest as _;
        let rotation = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::labels::RELAY_CREDENTIAL_ROTATION));
        let mut hash = sha2::Sha256::new();
        hash.update(self.metadata.uid.as_deref().unwrap_or_default());
        hash.update(b"\0");
        hash.update(rotation.map_or("", String::as_str));
        hex::encode(&hash.finalize()[..6])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rotation_and_each_new_site_gives_the_relay_credential_a_new_key_id() {
        let mut site = Site::new("berlin", SiteSpec::default());
        site.metadata.uid = Some("uid-1".into());
        let unrotated = site.relay_key_id();
        let rotate = |v: &str| {
            Some(
                [(
                    crate::labels::RELAY_CREDENTIAL_ROTATION.to_string(),
                    v.to_string(),
                )]
                .into(),
            )
        };
        site.metadata.annotations = rotate("1");
        let first = site.relay_key_id();
        site.metadata.annotations = rotate("2");
        let second = site.relay_key_id();
        assert_ne!(second, first);
        assert_ne!(first, unrotated);
        // The same name and annotation, but another Site.
        site.metadata.uid = Some("uid-2".into());
        assert_ne!(site.relay_key_id(), second);
        assert!(
            first.bytes().all(|b| b.is_ascii_hexdigit()),
            "no / in a token part"
        );
    }
}
