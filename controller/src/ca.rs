//! The CA the controller manages, for TLS below it: it issues each site's
//! relay a serving certificate, and agents and child relays pin it.
//!
//! Everything is derived from the controller's secret key
//! ([`CredentialKey`]) and signed with Ed25519, whose signatures are
//! deterministic: the CA's key and certificate, and each relay's key and
//! certificate for one [`PERIOD_DAYS`] period, come out the same bytes every
//! time. So nothing new is stored, every reconcile applies the same Secret,
//! and several controller replicas agree. A relay's key also depends on its
//! Site's UID, credential key ID and hostnames: rotating the relay
//! credential (`caravan site rotate-relay-credential`) gives it a new TLS
//! key too. Each Site's periods start at a moment of their own, so the
//! relays of a cluster renew (and roll) at different times.

use anyhow::Context as _;
use caravan_api::v1alpha1::Site;
use chrono::{DateTime, Datelike as _, Utc};
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use kube::ResourceExt as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::credentials::CredentialKey;

/// A relay gets a new certificate (and key) every this many days...
pub const PERIOD_DAYS: i64 = 180;
/// ...good for this many days from the start of its period (a day before,
/// for clocks that lag).
const VALIDITY_DAYS: i64 = 365;

/// Names every relay certificate holds besides the relay's Service names
/// and its Site's `relay.hostnames`: for a port-forward, or an agent on the
/// relay's own host.
const LOCAL_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

pub struct Ca {
    key: CredentialKey,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A serving certificate (a relay's, the controller's) and key, as PEM.
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// Which period it is for: a new period, new pods.
    pub period: i64,
}

/// The Ed25519 key pair whose seed is `seed`.
fn key_pair(seed: [u8; 32]) -> anyhow::Result<KeyPair> {
    let der = ed25519_dalek::SigningKey::from_bytes(&seed)
        .to_pkcs8_der()
        .context("encoding a key")?;
    KeyPair::try_from(der.as_bytes()).context("loading a key")
}

/// Year, month and day of `t`.
fn ymd(t: DateTime<Utc>) -> (i32, u8, u8) {
    (t.year(), t.month() as u8, t.day() as u8)
}

impl Ca {
    /// The CA that issues relays their certificates (agents and child
    /// relays pin it), of the controller whose secret key is `key`.
    pub fn new(key: &CredentialKey) -> anyhow::Result<Self> {
        Self::derived(key, "Caravan CA", "ca")
    }

    /// The CA that issues the controller its own certificate (relays pin
    /// it): another than the relays', so that no relay's key can pose as
    /// the controller to other relays.
    pub fn controller(key: &CredentialKey) -> anyhow::Result<Self> {
        Self::derived(key, "Caravan controller CA", "controller-ca")
    }

    fn derived(key: &CredentialKey, name: &str, purpose: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2125, 1, 1);
        let signing = key_pair(key.derive(purpose, "v1"))?;
        let cert_pem = params.self_signed(&signing).context("making the CA")?.pem();
        Ok(Self {
            key: key.clone(),
            issuer: Issuer::new(params, signing),
            cert_pem,
        })
    }

    /// The CA certificate (PEM) agents and child relays pin.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The serving certificate of `site`'s relay for the period of `now`:
    /// for its Service names, `localhost`, `127.0.0.1` and the Site's
    /// `relay.hostnames`.
    pub fn relay_cert(&self, site: &Site, now: DateTime<Utc>) -> anyhow::Result<ServerCert> {
        let ns = site.namespace().unwrap_or_default();
        let relay = crate::site::workload::relay_name(&site.name_any());
        // Periods start at another moment for each Site, so the relays of
        // a cluster do not all roll (and their agents reconnect) at once.
        let length = PERIOD_DAYS * 86_400;
        let uid = caravan_api::original_uid(&site.metadata);
        let offset = i64::from_be_bytes(self.key.derive("relay-tls-offset", uid)[..8].try_into()?)
            .rem_euclid(length);
        let period = (now.timestamp() - offset).div_euclid(length);
        let start = DateTime::<Utc>::from_timestamp(period * length + offset, 0)
            .context("a period in range")?;
        // Not the bare `<site>-relay`: Sites of one name in two namespaces
        // would share it.
        let mut names: Vec<String> = vec![
            format!("{relay}.{ns}"),
            format!("{relay}.{ns}.svc"),
            format!("{relay}.{ns}.svc.cluster.local"),
        ];
        names.extend(LOCAL_NAMES.map(String::from));
        for name in &site.spec.relay.hostnames {
            caravan_api::names::hostname(name)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("site {ns}/{}'s relay hostnames", site.name_any()))?;
            names.push(name.clone());
        }
        names.dedup();
        // The names are in it too: another certificate, another key (and
        // serial number, which rcgen takes from the key).
        let subject = format!(
            "{ns}/{}/{uid}/{}/{period}/{}",
            site.name_any(),
            site.relay_key_id(),
            site.spec.relay.hostnames.join(",")
        );
        let (cert_pem, key_pem) = self
            .issue(
                names,
                &format!("{relay}.{ns}"),
                start,
                ("relay-tls", &subject),
            )
            .with_context(|| format!("site {ns}/{}'s relay certificate", site.name_any()))?;
        Ok(ServerCert {
            cert_pem,
            key_pem,
            period,
        })
    }

    /// The controller's own serving certificate for the period of `now`
    /// (relays reach it at the host of `--relay-upstream-url`): for
    /// `hostnames`, `localhost` and `127.0.0.1`.
    pub fn controller_cert(
        &self,
        hostnames: &[String],
        now: DateTime<Utc>,
    ) -> anyhow::Result<ServerCert> {
        let length = PERIOD_DAYS * 86_400;
        let period = now.timestamp().div_euclid(length);
        let start =
            DateTime::<Utc>::from_timestamp(period * length, 0).context("a period in range")?;
        let mut names: Vec<String> = hostnames.to_vec();
        names.extend(LOCAL_NAMES.map(String::from));
        names.sort();
        names.dedup();
        let subject = format!("controller/{period}/{}", names.join(","));
        let (cert_pem, key_pem) = self
            .issue(
                names,
                "caravan-controller",
                start,
                ("controller-tls", &subject),
            )
            .context("the controller's certificate")?;
        Ok(ServerCert {
            cert_pem,
            key_pem,
            period,
        })
    }

    /// A serving certificate for `names`, valid from a day before `start`
    /// for [`VALIDITY_DAYS`], whose key is derived for `(purpose, subject)`.
    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        start: DateTime<Utc>,
        (purpose, subject): (&str, &str),
    ) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names).context("the names")?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let (y, m, d) = ymd(start - chrono::Duration::days(1));
        params.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = ymd(start + chrono::Duration::days(VALIDITY_DAYS));
        params.not_after = rcgen::date_time_ymd(y, m, d);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = key_pair(self.key.derive(purpose, subject))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The host of `--relay-upstream-url` as a certificate names it (an IPv6
/// address without its brackets), after checking the URL is `https://`.
pub fn upstream_host(upstream_url: &str) -> anyhow::Result<Option<String>> {
    let url = reqwest::Url::parse(upstream_url)
        .with_context(|| format!("--relay-upstream-url {upstream_url}"))?;
    anyhow::ensure!(
        url.scheme() == "https",
        "--relay-upstream-url {upstream_url} is not https://: the controller serves HTTPS only, and relays refuse plaintext"
    );
    Ok(url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string()))
}

/// The controller's own serving certificate, when it is given none: issued
/// by its CA (which relays pin) for the names relays reach it by, and
/// replaced while serving when its period ends.
pub struct OwnCertificate {
    /// [`Ca::controller`].
    ca: Ca,
    hostnames: Vec<String>,
    pub tls: caravan_net::server::TlsConfig,
    period: i64,
}

impl OwnCertificate {
    /// Issued by `ca` ([`Ca::controller`]) for the host of `upstream_url`
    /// (the URL relays are given) and `extra` names.
    pub async fn new(ca: Ca, upstream_url: &str, extra: &[String]) -> anyhow::Result<Self> {
        let mut hostnames: Vec<String> = upstream_host(upstream_url)?.into_iter().collect();
        for name in extra {
            caravan_api::names::hostname(name)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--tls-hostname {name}"))?;
            hostnames.push(name.clone());
        }
        let cert = ca.controller_cert(&hostnames, Utc::now())?;
        let tls = caravan_net::server::tls_config(&cert.cert_pem, &cert.key_pem).await?;
        tracing::info!(names = ?hostnames, "serving HTTPS with a certificate from the controller's CA");
        Ok(Self {
            ca,
            hostnames,
            tls,
            period: cert.period,
        })
    }

    /// Replaces the certificate with the next period's when it comes,
    /// checking every hour, until `shutdown`.
    pub async fn renew(
        mut self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
            let cert = self.ca.controller_cert(&self.hostnames, Utc::now())?;
            if cert.period != self.period {
                self.tls
                    .reload_from_pem(cert.cert_pem.into_bytes(), cert.key_pem.into_bytes())
                    .await
                    .context("loading the controller's new certificate")?;
                self.period = cert.period;
                tracing::info!(period = self.period, "serving with a new certificate");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(uid: &str) -> Site {
        let mut site = Site::new("berlin", Default::default());
        site.metadata.namespace = Some("fleet".into());
        site.metadata.uid = Some(uid.into());
        site
    }

    fn key(byte: u8) -> CredentialKey {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        std::fs::write(&path, [byte; 32]).unwrap();
        CredentialKey::load_or_create(&path).unwrap()
    }

    #[test]
    fn certificates_are_the_same_bytes_every_time_until_their_period_or_key_changes() {
        let (ca, now) = (Ca::new(&key(1)).unwrap(), Utc::now());
        assert_eq!(ca.cert_pem(), Ca::new(&key(1)).unwrap().cert_pem());
        assert_ne!(ca.cert_pem(), Ca::new(&key(2)).unwrap().cert_pem());
        let a = ca.relay_cert(&site("uid-1"), now).unwrap();
        let b = ca.relay_cert(&site("uid-1"), now).unwrap();
        assert_eq!((&a.cert_pem, &a.key_pem), (&b.cert_pem, &b.key_pem));
        // Another Site of the same name, a rotated credential, a new period:
        // another key.
        assert_ne!(
            ca.relay_cert(&site("uid-2"), now).unwrap().key_pem,
            a.key_pem
        );
        let mut rotated = site("uid-1");
        rotated.metadata.annotations = Some(
            [(
                caravan_api::labels::RELAY_CREDENTIAL_ROTATION.to_string(),
                "1".to_string(),
            )]
            .into(),
        );
        assert_ne!(ca.relay_cert(&rotated, now).unwrap().key_pem, a.key_pem);
        let later = ca
            .relay_cert(&site("uid-1"), now + chrono::Duration::days(PERIOD_DAYS))
            .unwrap();
        assert_eq!(later.period, a.period + 1);
        assert_ne!(later.key_pem, a.key_pem);
        let mut named = site("uid-1");
        named.spec.relay.hostnames = vec!["relay.berlin.example.com".into()];
        assert_ne!(ca.relay_cert(&named, now).unwrap().key_pem, a.key_pem);
    }

    #[test]
    fn a_hostname_that_is_no_name_is_refused_by_site() {
        let ca = Ca::new(&key(1)).unwrap();
        let mut s = site("uid-1");
        s.spec.relay.hostnames = vec!["relay.berlin.example.com".into(), "10.0.0.7".into()];
        ca.relay_cert(&s, Utc::now()).unwrap();
        s.spec.relay.hostnames = vec!["not a name\u{1}".into()];
        let e = ca.relay_cert(&s, Utc::now()).err().unwrap();
        assert!(format!("{e:#}").contains("site fleet/berlin"), "{e:#}");
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn the_controllers_certificate_is_for_the_names_relays_reach_it_by() {
        let ca = Ca::controller(&key(1)).unwrap();
        // Not the relays' CA: no relay's key can pose as the controller.
        assert_ne!(ca.cert_pem(), Ca::new(&key(1)).unwrap().cert_pem());
        assert_eq!(
            upstream_host("https://[fd00::1]:8443").unwrap().as_deref(),
            Some("fd00::1")
        );
        assert!(upstream_host("http://caravan:8443").is_err());
        let now = Utc::now();
        let names = vec!["caravan.caravan-system.svc".to_string()];
        let a = ca.controller_cert(&names, now).unwrap();
        assert_eq!(
            a.cert_pem,
            ca.controller_cert(&names, now).unwrap().cert_pem
        );
        // The names are in the DER as they are (dNSName is an IA5String).
        let der = pem_body(&a.cert_pem);
        for name in ["caravan.caravan-system.svc", "localhost"] {
            assert!(
                der.windows(name.len()).any(|w| w == name.as_bytes()),
                "{name}"
            );
        }
        assert_ne!(
            a.key_pem,
            ca.relay_cert(&site("uid-1"), now).unwrap().key_pem
        );
        let later = ca
            .controller_cert(&names, now + chrono::Duration::days(PERIOD_DAYS))
            .unwrap();
        assert_eq!(later.period, a.period + 1);
    }
}
