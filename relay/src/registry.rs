//! Blobs a top-level site's relay fetches from an OCI registry itself (the
//! layers of `oci` cabinets whose layers come from relays): where each is,
//! as the site's desired state says, and the relay's own credentials for
//! each registry (`--registry-auth-file`, a Docker `config.json`). What
//! arrives is verified against its digest like any upstream blob.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use caravan_api::{wire::BlobSource, Digest};
use caravan_net::oci::{Credentials, OciError, Registry, Repository};

/// The registry sources of the site's blobs.
#[derive(Default)]
pub struct Registries {
    /// The Docker `config.json` the relay signs in with, if any: read at
    /// each fetch, so rotated credentials (a Secret updated in place,
    /// short-lived tokens) are taken without a restart.
    auth_file: Option<PathBuf>,
    sources: Mutex<BTreeMap<Digest, BlobSource>>,
}

impl Registries {
    /// With the credentials in the Docker `config.json` at `auth_file`
    /// (refused now if it cannot be read, not at the first fetch).
    pub fn new(auth_file: Option<&Path>) -> anyhow::Result<Self> {
        let registries = Self {
            auth_file: auth_file.map(Path::to_path_buf),
            sources: Mutex::default(),
        };
        registries.credentials("").map_err(anyhow::Error::msg)?;
        Ok(registries)
    }

    /// The credentials for `host`, from the auth file as it is now.
    fn credentials(&self, host: &str) -> Result<Option<Credentials>, String> {
        let Some(path) = &self.auth_file else {
            return Ok(None);
        };
        let bytes = std::fs::read(path)
            .map_err(|e| format!("reading --registry-auth-file {}: {e}", path.display()))?;
        Credentials::from_docker_config(&bytes, host)
            .map_err(|e| format!("--registry-auth-file {}: {e}", path.display()))
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
        let credentials = self.credentials(host).map_err(setup)?;
        let ca = source
            .ca_bundle
            .as_deref()
            .map(|pem| (pem.as_bytes(), "the cabinet's caBundle"));
        // Like the upstream client: a stalled transfer fails and resumes.
        let http = caravan_net::client_trusting(ca, Duration::from_secs(90))
            .map_err(|e| setup(format!("{e:#}")))?;
        let res = Registry::new(repo, http, credentials)
            .blob(digest, offset)
            .await?;
        // Never more than the blob: the length must be what is left of it.
        let len = res.content_length();
        if len != Some(source.size.saturating_sub(offset)) {
            return Err(RegistryError::Length {
                repository: source.repository.clone(),
                digest: *digest,
                len,
                size: source.size,
                offset,
            });
        }
        Ok(res)
    }
}

/// A registry fetch that could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry source {repository}: {message}")]
    Setup { repository: String, message: String },
    #[error(transparent)]
    Registry(#[from] OciError),
    #[error(
        "{repository}: blob {digest} from byte {offset} is {len:?} bytes long; it is {size} bytes"
    )]
    Length {
        repository: String,
        digest: Digest,
        len: Option<u64>,
        size: u64,
        offset: u64,
    },
}

impl RegistryError {
    /// Whether trying again may succeed (the registry was away or failed).
    pub fn transient(&self) -> bool {
        match self {
            Self::Registry(OciError::Transport { .. }) => true,
            Self::Registry(OciError::Status { status, .. }) => {
                status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }

    /// Whether the registry refused the range asked for (the partial file
    /// is as long as the blob or longer).
    pub fn range_not_satisfiable(&self) -> bool {
        matches!(self, Self::Registry(OciError::Status { status, .. })
            if *status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE)
    }
}
