//! What every part of the controller needs: the Kubernetes client, the
//! Event recorder, the metrics, the configuration, the credential and
//! trust keys, the CA, and the ledger of published packages.
//! Caches, channels and the blob store are not here: each belongs to the
//! task that runs it and is handed to whoever reads it (see [`crate::run`]).

use kube::runtime::events::{Recorder, Reporter};

use crate::{
    ca::Ca, credentials::CredentialKey, identity::Ledger, metrics::Metrics, trust::TrustKeys,
    Config,
};

pub struct Context {
    pub client: kube::Client,
    /// Records Events on the objects the controller reconciles.
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: Config,
    /// Derives and checks relay and bootstrap tokens.
    pub credentials: CredentialKey,
    /// Issues relays their TLS certificates.
    pub ca: Ca,
    /// Signs desired state.
    pub trust: TrustKeys,
    /// Every name+version ever published, with its artifact.
    pub published: Ledger,
}

impl Context {
    pub fn new(client: kube::Client, config: Config) -> crate::error::Result<Self> {
        let credentials = CredentialKey::load_or_create(&config.data_dir.join(crate::TOKEN_KEY))?;
        let trust = TrustKeys::load_or_create(&config.trust_dir())?;
        let ca = Ca::new(&credentials)
            .map_err(|e| crate::error::Error::Certificate(format!("{e:#}")))?;
        let published =
            Ledger::load(config.data_dir.join(caravan_api::backup::LEDGER)).map_err(|e| {
                crate::error::Error::io(&config.data_dir, std::io::Error::other(e.to_string()))
            })?;
        tracing::info!(root = %trust.fingerprint(), version = trust.roots.len(), "signing desired state under this root");
        let reporter = Reporter {
            controller: "caravan-controller".into(),
            instance: None,
        };
        Ok(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics: Metrics::default(),
            config,
            credentials,
            ca,
            trust,
            published,
        })
    }

    /// The Kubernetes API for `K`, limited to the configured namespace if any.
    pub fn all<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match &self.config.namespace {
            Some(ns) => kube::Api::namespaced(self.client.clone(), ns),
            None => kube::Api::all(self.client.clone()),
        }
    }

    /// The Kubernetes API for `K` in namespace `ns`.
    pub fn namespaced<K>(&self, ns: &str) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        kube::Api::namespaced(self.client.clone(), ns)
    }

    /// Records `event` about `obj`; an Event that cannot be recorded is
    /// only logged (at debug: the API server being away is logged already).
    pub async fn publish<K: kube::Resource<DynamicType = ()>>(
        &self,
        event: &kube::runtime::events::Event,
        obj: &K,
    ) {
        if let Err(e) = self.recorder.publish(event, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }
}

/// The data of Secret `name` in `ns`, a `what` Secret, if it carries the
/// opt-in `label` (value `"true"`): the controller reads no other Secret a
/// manifest names.
pub async fn labelled_secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
    label: &str,
    what: &str,
) -> Result<std::collections::BTreeMap<String, k8s_openapi::ByteString>, String> {
    use kube::ResourceExt as _;
    let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("reading Secret {name}: {e}"))?
        .ok_or_else(|| format!("{what} Secret {name} does not exist"))?;
    if secret.labels().get(label).map(String::as_str) != Some("true") {
        return Err(format!(
            "Secret {name} is not labelled {label}: \"true\", so it is not used"
        ));
    }
    Ok(secret.data.unwrap_or_default())
}
