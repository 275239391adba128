//! `oci` cabinets: the artifact of a Package, fetched from its registry —
//! the manifest the Package pins (its digest checked), then the one layer
//! it names, which must be the Package's artifact (size and digest checked
//! again as it enters the store).

use caravan_api::{
    labels,
    v1alpha1::{CabinetStore, LayersFrom},
    Digest,
};
use caravan_net::oci::{Credentials, Registry, Repository};

use super::BlobStore;

/// Where an `oci` cabinet's artifact is: the cabinet's store and namespace,
/// and the manifest the Package pins.
#[derive(Clone, Debug)]
pub struct OciSource {
    pub namespace: String,
    pub store: CabinetStore,
    /// The package's name: its repository is `<store.repository>/<name>`.
    pub package: String,
    /// Its version: the tag it was pushed under.
    pub version: String,
    pub manifest: Option<Digest>,
}

/// A fetched artifact, and what the registry said besides.
pub struct Fetched {
    pub size: u64,
    /// The version's tag names another manifest than the one pinned (which
    /// is what was fetched): said why.
    pub tag_moved: Option<String>,
}

impl OciSource {
    /// Whether the cabinet's relays fetch its layers (the controller only
    /// checks the manifest).
    pub fn layers_from_relays(&self) -> bool {
        self.store.layers_from == LayersFrom::Relays
    }

    /// Fetches artifact `digest` (`size` bytes) into `blobs`, verified; with
    /// no `blobs` (layers from relays), only checks that the pinned
    /// manifest names it.
    pub async fn fetch(
        &self,
        kube: &kube::Client,
        blobs: Option<&BlobStore>,
        digest: &Digest,
        size: u64,
    ) -> Result<Fetched, String> {
        let pinned = self.manifest.ok_or(
            "the Package pins no artifact.manifest (push it with `caravan package push --registry`, which pins it)",
        )?;
        let registry = self.registry(kube).await?;
        let manifest = registry
            .manifest(&pinned)
            .await
            .map_err(|e| e.to_string())?;
        let layer = manifest
            .archive()
            .map_err(|e| format!("{}: manifest {pinned}: {e}", registry.repository()))?;
        if layer.digest != *digest || layer.size != size {
            return Err(format!(
                "{}: manifest {pinned} holds {} ({} bytes), not the Package's artifact {digest} ({size} bytes)",
                registry.repository(),
                layer.digest,
                layer.size
            ));
        }
        if let Some(blobs) = blobs {
            let res = registry.blob(digest, 0).await.map_err(|e| e.to_string())?;
            let from = format!("{} blob {digest}", registry.repository());
            blobs.take(digest, size, res, &from).await?;
        }
        // Never followed: said, if the tag moved (or went).
        let tag_moved = match registry.tag(&self.version).await {
            Ok(Some(now)) if now == pinned => None,
            Ok(now) => Some(format!(
                "tag {} of {} names {}, not the pinned manifest {pinned}; the pinned one is used",
                self.version,
                registry.repository(),
                now.map_or("nothing".to_string(), |d| d.to_string())
            )),
            Err(e) => {
                tracing::debug!(error = %e, "tag not checked");
                None
            }
        };
        Ok(Fetched { size, tag_moved })
    }

    /// Whether the registry answers and takes the cabinet's credentials:
    /// asks for a tag in the cabinet's repository (that it is not there is
    /// an answer). For a source with no `package`.
    pub async fn probe(&self, kube: &kube::Client) -> Result<(), String> {
        let registry = self.registry(kube).await?;
        registry
            .tag("caravan-probe")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The cabinet's registry, signed in with its credentials, if any.
    async fn registry(&self, kube: &kube::Client) -> Result<Registry, String> {
        let repo: Repository = self
            .store
            .repository
            .as_deref()
            .ok_or("an oci cabinet names no store.repository")?
            .parse::<Repository>()?;
        // The cabinet's own repository for a probe; a package's below it.
        let repo = match self.package.as_str() {
            "" => repo,
            name => repo.package(name)?,
        };
        let ca = self
            .store
            .ca_bundle
            .as_deref()
            .map(|pem| (pem.as_bytes(), "store.caBundle"));
        let http = caravan_net::client_trusting(ca, std::time::Duration::from_secs(60))
            .map_err(|e| format!("{e:#}"))?;
        let host = repo.base.split_once("://").map_or("", |(_, h)| h);
        let credentials = match &self.store.credentials_secret {
            Some(name) => Some(credentials(kube, &self.namespace, name, host).await?),
            None => None,
        };
        Ok(Registry::new(repo, http, credentials))
    }
}

/// The registry credentials in Secret `name` (labelled for it), which must
/// say they are for registry `host` (its `registry` key): a Cabinet cannot
/// send them to a registry of its choosing.
async fn credentials(
    kube: &kube::Client,
    ns: &str,
    name: &str,
    host: &str,
) -> Result<Credentials, String> {
    let data = crate::context::labelled_secret(
        kube,
        ns,
        name,
        labels::REGISTRY_CREDENTIALS,
        "credentials",
    )
    .await?;
    let text = |key: &str| {
        data.get(key).map(|v| {
            String::from_utf8_lossy(&v.0)
                .trim_end_matches('\n')
                .to_string()
        })
    };
    match text("registry") {
        Some(h) if h == host => {}
        Some(h) => {
            return Err(format!(
                "Secret {name} holds credentials for registry {h}, not {host}: not sent there"
            ))
        }
        None => {
            return Err(format!(
                "Secret {name} names no `registry` (the host[:port] its credentials are for)"
            ))
        }
    }
    match (text("username"), text("password"), text("token")) {
        (_, _, Some(token)) => Ok(Credentials::Token(token)),
        (Some(username), Some(password), None) => Ok(Credentials::Basic { username, password }),
        _ => Err(format!(
            "Secret {name} holds neither `username` and `password` nor `token`"
        )),
    }
}
