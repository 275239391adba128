//! Where packages go: the controller's built-in store (a resumable upload)
//! or an `oci` cabinet's registry, as the Cabinet in the cluster says or as
//! the command line names it; and `caravan cabinet copy`, from the first to
//! the second.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use caravan_api::{
    signing,
    v1alpha1::{Artifact, Package, PackageSpec},
    wire::{paths, UploadState},
};

/// Where an `oci` cabinet's registry is, and how to sign in to push.
#[derive(clap::Args, Clone)]
pub struct RegistryArgs {
    /// Push to this OCI repository (`host[:port]/name`, the `oci` cabinet's
    /// `store.repository`; the package goes to `<it>/<package name>`,
    /// tagged with its version). Without it, `push` asks the cluster what
    /// the cabinet is.
    #[arg(long, env = "CARAVAN_REGISTRY")]
    registry: Option<String>,
    /// CA certificates (PEM) that sign the registry's certificate, trusted
    /// alone (default: the Cabinet's `caBundle`, else the system's roots).
    #[arg(long, env = "CARAVAN_REGISTRY_CA_FILE")]
    registry_ca_file: Option<PathBuf>,
    /// User name to push as, its password in the environment variable
    /// CARAVAN_REGISTRY_PASSWORD (or a bearer token in CARAVAN_REGISTRY_TOKEN
    /// instead; secrets are never taken on the command line).
    #[arg(long, env = "CARAVAN_REGISTRY_USERNAME")]
    registry_username: Option<String>,
    /// The registry (`host[:port]`) the credentials are for, when the
    /// repository comes from the Cabinet in the cluster (which anyone who
    /// may commit one chooses): they are sent nowhere else.
    #[arg(long, env = "CARAVAN_REGISTRY_HOST")]
    registry_host: Option<String>,
}

impl RegistryArgs {
    /// Whether the pusher gave credentials (a user name, or a token).
    fn has_credentials(&self) -> bool {
        self.registry_username.is_some()
            || std::env::var("CARAVAN_REGISTRY_TOKEN").is_ok_and(|t| !t.is_empty())
    }

    /// The repository of package `name` in the registry the command line
    /// names, if it names one.
    pub fn registry(&self, name: &str) -> anyhow::Result<Option<caravan_net::oci::Registry>> {
        match &self.registry {
            Some(repo) => self.open(repo, None, name).map(Some),
            None => Ok(None),
        }
    }

    /// Package `name`'s repository in `repository`, trusting
    /// `--registry-ca-file`, else `ca_bundle` (PEM), else the system's roots.
    fn open(
        &self,
        repository: &str,
        ca_bundle: Option<&str>,
        name: &str,
    ) -> anyhow::Result<caravan_net::oci::Registry> {
        use caravan_net::oci::{Credentials, Registry, Repository};
        let repo = repository
            .parse::<Repository>()
            .and_then(|r| r.package(name))
            .map_err(anyhow::Error::msg)?;
        let timeout = std::time::Duration::from_secs(60);
        let http = match (&self.registry_ca_file, ca_bundle) {
            (None, Some(pem)) => caravan_net::client_trusting(
                Some((pem.as_bytes(), "the Cabinet's caBundle")),
                timeout,
            )?,
            (file, _) => caravan_net::client(file.as_deref(), timeout)?,
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let credentials = match (env("CARAVAN_REGISTRY_TOKEN"), &self.registry_username) {
            (Some(t), _) => Some(Credentials::Token(t)),
            (None, Some(u)) => Some(Credentials::Basic {
                username: u.clone(),
                password: env("CARAVAN_REGISTRY_PASSWORD").context(
                    "--registry-username needs the password in CARAVAN_REGISTRY_PASSWORD",
                )?,
            }),
            (None, None) => None,
        };
        Ok(Registry::new(repo, http, credentials))
    }
}

/// The controller's distribution API and upload token, for the built-in store.
pub struct StoreArgs {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// Where `caravan package push` puts a package.
pub enum Destination {
    /// The controller's built-in store.
    Store {
        server: String,
        token: String,
        ca_file: Option<PathBuf>,
    },
    /// The package's repository in an `oci` cabinet's registry.
    Registry(caravan_net::oci::Registry),
}

impl Destination {
    /// Where package `name` of `cabinet` goes: to the registry the command
    /// line names; else as the Cabinet in the cluster (namespace
    /// `namespace`, default the kubeconfig's) says — an `oci` one's
    /// repository, trusting its `caBundle`; else (a `builtin` Cabinet, or
    /// no cluster to ask) to the controller's store.
    pub async fn of(
        cabinet: &str,
        namespace: Option<String>,
        name: &str,
        store: StoreArgs,
        registry: &RegistryArgs,
    ) -> anyhow::Result<Self> {
        use caravan_api::v1alpha1::{Cabinet, StoreType};
        if let Some(registry) = registry.registry(name)? {
            return Ok(Self::Registry(registry));
        }
        // No cluster configured: the controller's store. A cluster that
        // cannot be asked (refused, away) is an error, not a reason to push
        // somewhere else than the cabinet.
        let found = match kube::Client::try_default().await {
            Ok(client) => {
                let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
                let found = kube::Api::<Cabinet>::namespaced(client, &ns)
                    .get_opt(cabinet)
                    .await
                    .with_context(|| format!("reading Cabinet {cabinet} in namespace {ns}"))?;
                Ok(found.map(|c| (c, ns.clone())).ok_or(ns))
            }
            Err(e) => Err(anyhow::Error::new(e).context("no cluster to ask (kubeconfig)")),
        };
        let builtin = |why: String| {
            match store {
            StoreArgs {
                server: Some(server),
                token: Some(token),
                ca_file,
            } => Ok(Self::Store {
                server,
                token,
                ca_file,
            }),
            _ => anyhow::bail!(
                "{why}; give --server and --token to push into the controller's store, or --registry for an oci cabinet"
            ),
        }
        };
        let (found, ns) = match found {
            Ok(Ok(found)) => found,
            Ok(Err(ns)) => {
                // Not declared yet (a first push before the commit that declares it).
                eprintln!("there is no Cabinet {cabinet} in namespace {ns} (yet): pushing to the controller's store");
                return builtin(format!("there is no Cabinet {cabinet} in namespace {ns}"));
            }
            Err(e) => return builtin(format!("{e:#}")),
        };
        let spec = &found.spec.store;
        match spec.type_ {
            StoreType::Builtin => builtin(format!("cabinet {cabinet} is the built-in store")),
            StoreType::Oci => {
                let repository = spec.repository.as_deref().with_context(|| {
                    format!("Cabinet {ns}/{cabinet} is of type oci but names no repository")
                })?;
                let opened = registry.open(repository, spec.ca_bundle.as_deref(), name)?;
                // Whoever may commit a Cabinet chooses its repository: the
                // pusher's credentials go only to the host they are bound to.
                let base = &opened.repository().base;
                let host = base.split_once("://").map_or(base.as_str(), |(_, h)| h);
                if registry.has_credentials() && registry.registry_host.as_deref() != Some(host) {
                    anyhow::bail!(
                        "cabinet {cabinet} is in registry {host}: give --registry-host {host} to send your registry credentials there"
                    );
                }
                println!("cabinet {cabinet} is in registry repository {repository}");
                Ok(Self::Registry(opened))
            }
            StoreType::Http => anyhow::bail!(
                "cabinet {cabinet} is an http store ({}): Caravan only reads it; put the archive \
                 (`caravan package build`) at <url>/sha256/<hex digest> there",
                spec.url.as_deref().unwrap_or("no url")
            ),
        }
    }
}

/// Pushes the archive at `path` of package `spec` to `registry` as an
/// artifact tagged with its version (which must not name another one
/// already), its signed metadata as config; returns the manifest's digest.
pub async fn push_to_registry(
    registry: &caravan_net::oci::Registry,
    spec: &PackageSpec,
    path: &Path,
) -> anyhow::Result<caravan_api::Digest> {
    use caravan_net::oci::{Descriptor, LAYER_MEDIA_TYPE};
    let config = serde_json::to_vec(&signing::Signed::of_spec(spec))?;
    let layer = Descriptor {
        media_type: LAYER_MEDIA_TYPE.into(),
        digest: spec.artifact.digest,
        size: spec.artifact.size,
        annotations: [(
            "org.opencontainers.image.title".to_string(),
            format!("{}-{}.tar.zst", spec.name, spec.version),
        )]
        .into(),
    };
    Ok(registry
        .push_package(path, layer, &config, &spec.name, &spec.version)
        .await?)
}

/// `caravan cabinet copy`: every Package manifest of `cabinet` in `dir`
/// that pins no registry manifest yet: its blob read from the controller
/// (verified), pushed to the registry, the manifest digest pinned.
pub async fn copy_cabinet(
    cabinet: &str,
    dir: &Path,
    server: &str,
    token: &str,
    ca_file: Option<&Path>,
    registry: &RegistryArgs,
) -> anyhow::Result<()> {
    use sha2::Digest as _;
    use tokio::io::AsyncWriteExt as _;
    let http = caravan_net::client(ca_file, std::time::Duration::from_secs(60))?;
    let mut copied = 0;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let Ok(mut pkg) = serde_yaml_ng::from_str::<Package>(&text) else {
            continue;
        };
        if pkg.spec.cabinet != cabinet || pkg.spec.artifact.manifest.is_some() {
            continue;
        }
        let spec = &pkg.spec;
        let reg = registry
            .registry(&spec.name)?
            .context("give the registry to copy into (--registry)")?;
        // The blob, from the controller's store, checked as it comes.
        let url = format!(
            "{server}{}",
            caravan_api::wire::paths::blob(&spec.artifact.digest)
        );
        let res = http.get(&url).bearer_auth(token).send().await?;
        anyhow::ensure!(
            res.status().is_success(),
            "{url}: {}: {}",
            res.status(),
            res.text().await.unwrap_or_default()
        );
        let tmp = tempfile::NamedTempFile::new()?;
        let mut out = tokio::fs::File::create(tmp.path()).await?;
        let (mut hasher, mut size) = (sha2::Sha256::new(), 0u64);
        let mut body = res.bytes_stream();
        use futures::StreamExt as _;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            anyhow::ensure!(
                size <= spec.artifact.size,
                "{url}: more than the Package's {} bytes",
                spec.artifact.size
            );
            hasher.update(&chunk);
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        let got = caravan_api::Digest::from_hasher(hasher);
        anyhow::ensure!(
            got == spec.artifact.digest && size == spec.artifact.size,
            "{url}: got {got} ({size} bytes), the Package says {} ({} bytes)",
            spec.artifact.digest,
            spec.artifact.size
        );
        let manifest = push_to_registry(&reg, spec, tmp.path()).await?;
        println!(
            "copied {} {} ({}) to {}@{manifest}",
            spec.name,
            spec.version,
            spec.artifact.digest,
            reg.repository()
        );
        pkg.spec.artifact.manifest = Some(manifest);
        std::fs::write(&file, serde_yaml_ng::to_string(&pkg)?)
            .with_context(|| format!("writing {}", file.display()))?;
        copied += 1;
    }
    println!("{copied} package(s) of cabinet {cabinet} copied; now make it `type: oci` with that repository");
    Ok(())
}

/// Streams the archive to the controller's store. An upload that breaks off
/// is resumed where the store says it stopped (it keeps what arrived), up to
/// a few times; a later `push` of the same package resumes too, since builds
/// are reproducible.
pub async fn upload(
    server: &str,
    token: &str,
    ca_file: Option<&Path>,
    artifact: &Artifact,
    file: &Path,
) -> anyhow::Result<()> {
    use tokio::io::AsyncSeekExt;
    let client = caravan_net::client(ca_file, std::time::Duration::from_secs(120))?;
    let server = server.trim_end_matches('/');
    let (blob_url, state_url) = (
        format!("{server}{}", paths::blob(&artifact.digest)),
        format!("{server}{}", paths::upload(&artifact.digest)),
    );
    // A few tries, each resuming where the last broke off.
    const ATTEMPTS: u32 = 5;
    let mut backoff = caravan_net::Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(8),
    );
    // Where another upload of the blob stood when ours was turned away (409).
    let mut waiting: Option<u64> = None;
    loop {
        let res = client
            .get(&state_url)
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("asking {state_url}"))?;
        if !res.status().is_success() {
            let status = res.status();
            anyhow::bail!(
                "{state_url}: {status}: {}",
                caravan_net::error_message(res).await
            );
        }
        let state: UploadState =
            caravan_net::body::json_capped(res, caravan_api::wire::MAX_SMALL_ANSWER_BYTES).await?;
        if state.complete {
            return Ok(());
        }
        let offset = state.offset.min(artifact.size);
        // Another upload of the blob that moved on since the last look is
        // waited for, however long it takes.
        if waiting.is_some_and(|at| offset > at) {
            backoff.reset();
        }
        let attempt = backoff.failures() + 1;
        if offset > 0 && waiting.is_none() {
            println!("resuming the upload at byte {offset} of {}", artifact.size);
        }
        let mut f = tokio::fs::File::open(file).await?;
        f.seek(std::io::SeekFrom::Start(offset)).await?;
        let mut req = client
            .put(&blob_url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_LENGTH, artifact.size - offset)
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(f),
            ));
        if offset > 0 {
            let range = format!(
                "bytes {offset}-{}/{}",
                artifact.size.saturating_sub(1),
                artifact.size
            );
            req = req.header(reqwest::header::CONTENT_RANGE, range);
        }
        match req.send().await {
            Ok(res) if res.status().is_success() => return Ok(()),
            Ok(res) => {
                let status = res.status();
                let msg = caravan_net::error_message(res).await;
                // Refusals (a wrong digest, a bad token) do not get better by
                // retrying; another upload of the same blob (409) finishes,
                // and a wrong offset is asked again.
                let retried = [
                    reqwest::StatusCode::RANGE_NOT_SATISFIABLE,
                    reqwest::StatusCode::CONFLICT,
                ];
                if status.is_client_error() && !retried.contains(&status) || attempt >= ATTEMPTS {
                    anyhow::bail!("upload to {blob_url} failed: {status}: {msg}");
                }
                waiting = (status == reqwest::StatusCode::CONFLICT).then_some(offset);
                eprintln!("upload to {blob_url}: {status}: {msg}; retrying");
            }
            Err(e) if attempt < ATTEMPTS => {
                eprintln!("upload to {blob_url} broke off ({e}); resuming")
            }
            Err(e) => return Err(e).with_context(|| format!("uploading to {blob_url}")),
        }
        backoff.wait().await;
    }
}
