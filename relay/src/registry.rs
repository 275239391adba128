//! Blobs a top-level site's relay fetches from an OCI registry itself (the
//! layers of `oci` cabinets whose layers come from relays): where each is,
//! as the site's desired state says, and the relay's own credentials for
//! each registry (`--registry-auth-file`, a Docker `config.json`). What
//! arrives is verified against its digest like any upstream blob.

use std::{collections::BTreeMap, path::Path, sync::Mutex, time::Duration};

use anyhow::Context as _;
use caravan_api::{wire::BlobSource, Digest};
use caravan_net::oci::{Credentials, OciError, Registry, Repository};

/// The registry sources of the site's blobs.
#[derive(Default)]
pub struct Registries {
    /// The Docker `config.json` the relay signs in with, if any.
    auth: Option<Vec<u8>>,
    sources: Mutex<BTreeMap<Digest, BlobSource>>,
}

impl Registries {
    /// With the credentials in the Docker `config.json` at `auth_file`.
    pub fn new(auth_file: Option<&Path>) -> anyhow::Result<Self> {
        let auth = match auth_file {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading --registry-auth-file {}", path.display()))?;
                // Refused now if unreadable, not at the first fetch.
                Credentials::from_docker_config(&bytes, "")
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("--registry-auth-file {}", path.display()))?;
                Some(bytes)
            }
            None => None,
        };
        Ok(Self {
            auth,
            sources: Mutex::default(),
        })
    }

    /// The registry sources the site's latest desired state names.
    pub fn set(&self, sources: BTreeMap<Digest, BlobSource>) {
        *self.sources.lock().expect("lock poisoned") = sources;
    }

    /// Blob `digest` from byte `offset`, if it comes from a registry:
    /// `None` when it comes from upstream.
    pub async fn blob(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Option<Result<reqwest::Response, RegistryError>> {
        let source = self
            .sources
            .lock()
            .expect("lock poisoned")
            .get(digest)
            .cloned()?;
        Some(self.fetch(&source, digest, offset).await)
    }

    async fn fetch(
        &self,
        source: &BlobSource,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, RegistryError> {
        let setup = |e: String| RegistryError::Setup {
            repository: source.repository.clone(),
            message: e,
        };
        let repo: Repository = source.repository.parse().map_err(setup)?;
        let host = repo.base.split_once("://").map_or("", |(_, h)| h);
        let credentials = match &self.auth {
            Some(config) => Credentials::from_docker_config(config, host).map_err(setup)?,
            None => None,
        };
        let ca = source
            .ca_bundle
            .as_deref()
            .map(|pem| (pem.as_bytes(), "the cabinet's caBundle"));
        // Like the upstream client: a stalled transfer fails and resumes.
        let http = caravan_net::client_trusting(ca, Duration::from_secs(90))
            .map_err(|e| setup(format!("{e:#}")))?;
        Ok(Registry::new(repo, http, credentials)
            .blob(digest, offset)
            .await?)
    }
}

/// A registry fetch that could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry source {repository}: {message}")]
    Setup { repository: String, message: String },
    #[error(transparent)]
    Registry(#[from] OciError),
}

impl RegistryError {
    /// Whether trying again may succeed (the registry was away or failed).
    pub fn transient(&self) -> bool {
        match self {
            Self::Registry(OciError::Transport { .. }) => true,
            Self::Registry(OciError::Status { status, .. }) => status.is_server_error(),
            _ => false,
        }
    }
}
