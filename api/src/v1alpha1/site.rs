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
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.relayVersion"}"#,
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
    /// The URL the relays of the sites below reach this site's relay at
    /// (`https://`, verified with the controller's CA): for a relay run
    /// outside the cluster (`charts/caravan-relay`), its address there. The
    /// relay's Service in the cluster when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The relay's blob cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// Most bytes per second the relay's upstream fetches take together, as
    /// a quantity (`10Mi`: 10 MiB/s); no limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    /// A daily window outside which the relay fetches nothing from
    /// upstream (agents wait for it, told when it opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_window: Option<TransferWindow>,
}

/// The relay's blob cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Largest size of the cache, as a quantity (`50Gi`): least recently
    /// used blobs are evicted beyond nine tenths of it, and the cache volume
    /// is limited to it.
    pub size: String,
    /// Keep the cache on the PersistentVolumeClaim `<site>-relay-cache` in
    /// the Site's namespace (declare it beside the Site) instead of an
    /// `emptyDir`, so it outlives the relay's pods. Replicas share it (it
    /// must then be `ReadWriteMany`) and fetch each blob from upstream once
    /// between them; on `emptyDir`s each replica fetches its own. The name
    /// is fixed so that a Site can mount no other claim.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persistent: bool,
}

/// The PersistentVolumeClaim a Site's relay keeps its cache on with
/// `relay.cache.persistent`.
pub fn relay_cache_claim(site: &str) -> String {
    format!("{site}-relay-cache")
}

/// A daily window, which may cross midnight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferWindow {
    /// When it opens, `HH:MM`.
    pub start: String,
    /// When it closes, `HH:MM`.
    pub end: String,
    /// The IANA time zone the times are in (`Europe/Berlin`); UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

impl RelaySpec {
    /// Whether `url`, `cache`, `bandwidth` and `transferWindow` can be
    /// used; else what is wrong, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            if !url.starts_with("https://") {
                return Err(format!("relay.url {url:?} must be https://"));
            }
        }
        if let Some(c) = &self.cache {
            quantity_bytes(&c.size).map_err(|e| format!("relay.cache.size: {e}"))?;
        }
        if let Some(b) = &self.bandwidth {
            quantity_bytes(b).map_err(|e| format!("relay.bandwidth: {e}"))?;
        }
        if let Some(w) = &self.transfer_window {
            let minutes = |t: &str| -> Option<u32> {
                let (h, m) = t.split_once(':')?;
                let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
                (h < 24 && m < 60 && t.len() == 5).then_some(h * 60 + m)
            };
            let (Some(start), Some(end)) = (minutes(&w.start), minutes(&w.end)) else {
                return Err(format!(
                    "relay.transferWindow: start {:?} and end {:?} must be HH:MM",
                    w.start, w.end
                ));
            };
            if start == end {
                return Err("relay.transferWindow is empty (start = end)".into());
            }
            if let Some(tz) = &w.time_zone {
                jiff::tz::TimeZone::get(tz)
                    .map_err(|e| format!("relay.transferWindow.timeZone {tz:?}: {e}"))?;
            }
        }
        Ok(())
    }
}

impl TransferWindow {
    /// As the relay's `--transfer-window` takes it: `22:00-06:00 Europe/Berlin`.
    pub fn to_arg(&self) -> String {
        format!(
            "{}-{} {}",
            self.start,
            self.end,
            self.time_zone.as_deref().unwrap_or("UTC")
        )
    }
}

impl Default for RelaySpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            image: None,
            tls_secret: None,
            hostnames: Vec::new(),
            registry_auth_secret: None,
            url: None,
            cache: None,
            bandwidth: None,
            transfer_window: None,
        }
    }
}

/// Bytes in a Kubernetes quantity of bytes (`512`, `10Mi`, `50Gi`, `1G`,
/// `1.5Gi`). Returns what is wrong.
pub fn quantity_bytes(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let scale: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{q:?} is not a quantity of bytes (like 512, 10Mi, 50Gi or 1G)"
            ))
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{q:?} is not a quantity of bytes (like 512, 10Mi, 50Gi or 1G)"))?;
    let bytes = n * scale as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{q:?} is not a positive number of bytes"));
    }
    Ok(bytes as u64)
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
    /// The release of the relay, as it last said (`VersionSupported` says
    /// whether the controller works with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_version: Option<String>,
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
    /// The key ID of the site's relay credential, derived from the Site's
    /// UID ([`crate::original_uid`]: kept across a restore) and its rotation annotation
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
        hash.update(crate::original_uid(&self.metadata));
        hash.update(b"\0");
        hash.update(rotation.map_or("", String::as_str));
        hex::encode(&hash.finalize()[..6])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_settings_that_cannot_be_used_are_named() {
        let ok: RelaySpec = serde_json::from_value(serde_json::json!({
            "url": "https://relay.berlin.example.com:8080", "cache": {"size": "50Gi", "persistent": true}, "bandwidth": "10Mi",
            "transferWindow": {"start": "22:00", "end": "06:00", "timeZone": "Europe/Berlin"},
        }))
        .unwrap();
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            ok.transfer_window.as_ref().unwrap().to_arg(),
            "22:00-06:00 Europe/Berlin"
        );
        for (patch, says) in [
            (serde_json::json!({"url": "http://relay:8080"}), "relay.url"),
            (
                serde_json::json!({"cache": {"size": "lots"}}),
                "relay.cache.size",
            ),
            (
                serde_json::json!({"bandwidth": "10 MB/s"}),
                "relay.bandwidth",
            ),
            (
                serde_json::json!({"transferWindow": {"start": "22", "end": "06:00"}}),
                "must be HH:MM",
            ),
            (
                serde_json::json!({"transferWindow": {"start": "22:00", "end": "06:00", "timeZone": "Mars/Base"}}),
                "timeZone",
            ),
        ] {
            let spec: RelaySpec = serde_json::from_value(patch).unwrap();
            let e = spec.check().unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn quantities_of_bytes_are_read_as_kubernetes_writes_them() {
        assert_eq!(quantity_bytes("512"), Ok(512));
        assert_eq!(quantity_bytes("10Mi"), Ok(10 << 20));
        assert_eq!(quantity_bytes("50Gi"), Ok(50 << 30));
        assert_eq!(quantity_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Ok(3 << 29));
        for bad in ["", "Gi", "10 MB", "-1Gi", "0", "ten"] {
            assert!(quantity_bytes(bad).is_err(), "{bad:?}");
        }
    }

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
        // Restored from a backup: a new UID, the first one kept.
        let mut restored = site.clone();
        restored.metadata.uid = Some("uid-3".into());
        restored
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(crate::labels::ORIGINAL_UID.into(), "uid-2".into());
        assert_eq!(restored.relay_key_id(), site.relay_key_id());
        assert!(
            first.bytes().all(|b| b.is_ascii_hexdigit()),
            "no / in a token part"
        );
    }
}
