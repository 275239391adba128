//! A client of the OCI distribution API, for cabinets kept in a registry
//! (the CNCF `distribution` registry, Harbor, GitLab, GHCR, ECR, ACR,
//! Artifactory…): a package is an artifact — an image manifest of
//! [`ARTIFACT_TYPE`] whose one layer is the package archive and whose config
//! is the package's metadata — in a repository of its own below the
//! cabinet's ([`Repository::package`]), tagged with its version.
//!
//! Authentication is the registries' own: HTTP basic, or the bearer-token
//! exchange a `401` with `WWW-Authenticate: Bearer realm=…` asks for (with
//! the basic credentials, or anonymously), tokens kept per access (pull, or
//! pull and push). Blobs stream in and out; a manifest is read up to
//! [`MAX_MANIFEST_BYTES`] and only used once its digest is the one pinned.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use caravan_api::Digest;
use reqwest::{header, Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// The artifact type of a Caravan package.
pub const ARTIFACT_TYPE: &str = "application/vnd.caravan.package.v1";
/// The media type of its config: the package's metadata, as JSON.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.caravan.package.config.v1+json";
/// The media type of its one layer: the package archive.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.caravan.package.layer.v1.tar+zstd";
/// The manifest's own media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The most of a manifest (or a registry's error) that is read.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// How long a manifest, a tag or a token may take to arrive.
pub const SMALL_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// An OCI image manifest, as far as Caravan writes and reads one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// The manifest of a package: `config` (its metadata) and the archive.
    pub fn package(config: &[u8], archive: Descriptor, name: &str, version: &str) -> Self {
        Self {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: Descriptor {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: Digest::of(config),
                size: config.len() as u64,
                annotations: BTreeMap::new(),
            },
            layers: vec![archive],
            annotations: BTreeMap::from([
                ("org.opencontainers.image.title".into(), name.into()),
                ("org.opencontainers.image.version".into(), version.into()),
            ]),
        }
    }

    /// The package archive this manifest holds, if it is a Caravan package.
    pub fn archive(&self) -> Result<&Descriptor, String> {
        if self.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(format!(
                "not a Caravan package (artifact type {:?})",
                self.artifact_type.as_deref().unwrap_or("none")
            ));
        }
        match self.layers.as_slice() {
            [layer] if layer.media_type == LAYER_MEDIA_TYPE => Ok(layer),
            _ => Err(format!(
                "a Caravan package has one layer of type {LAYER_MEDIA_TYPE}"
            )),
        }
    }
}

/// The tag a package version is pushed under: the version itself, which
/// must be one (letters, digits, `_`, `.`, `-`; 128 at most; not starting
/// with `.` or `-`).
pub fn tag(version: &str) -> Result<&str, String> {
    let ok = !version.is_empty()
        && version.len() <= 128
        && !version.starts_with(['.', '-'])
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    match ok {
        true => Ok(version),
        false => Err(format!(
            "version {version:?} cannot be a registry tag (letters, digits, _ . - only, at most 128): give the package another version"
        )),
    }
}

/// A repository in a registry: `[https://]host[:port]/name` (`http://` for a
/// registry without TLS, named so on purpose).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repository {
    /// `https://host:port`.
    pub base: String,
    /// The repository's name in the registry (`caravan/packages`).
    pub name: String,
}

impl std::str::FromStr for Repository {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme @ ("https" | "http"), rest)) => (scheme, rest),
            Some((other, _)) => {
                return Err(format!(
                    "repository {s:?}: scheme {other} is not https or http"
                ))
            }
            None => ("https", s),
        };
        let (host, name) = rest.split_once('/').ok_or_else(|| {
            format!("repository {s:?} names no repository after the registry host")
        })?;
        let name = name.trim_end_matches('/');
        // The distribution spec's path components: lowercase alphanumerics
        // joined by `.`, `_`, `__` or dashes.
        let component = |c: &str| {
            !c.is_empty()
                && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
        };
        if host.is_empty() || host.contains(['@', '?', '#']) {
            return Err(format!(
                "repository {s:?}: registry host {host:?} is not one"
            ));
        }
        if !name.split('/').all(component) {
            return Err(format!(
                "repository {s:?}: name {name:?} is not a registry repository name (lowercase letters, digits, and . _ - between them, / between parts)"
            ));
        }
        Ok(Self {
            base: format!("{scheme}://{host}"),
            name: name.into(),
        })
    }
}

impl Repository {
    /// The repository of package `name` in this one (`<name>/<package>`):
    /// each package's versions are its tags.
    pub fn package(&self, name: &str) -> Result<Self, String> {
        format!("{}/{name}", self).parse().map_err(|e: String| {
            format!("package {name} cannot be a repository of the registry: {e}")
        })
    }
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.name)
    }
}

/// How to sign in to a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    /// A bearer token, sent as it is.
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        match self {
            Self::Basic { username, .. } => write!(f, "Basic({username}, …)"),
            Self::Token(_) => f.write_str("Token(…)"),
        }
    }
}

impl Credentials {
    /// The credentials a Docker `config.json` (the format of a
    /// `kubernetes.io/dockerconfigjson` Secret) holds for registry `host`
    /// (`host[:port]`): `auth` (base64 of `user:password`), `username` and
    /// `password`, or `registrytoken`. Keys may carry a scheme or a path
    /// (`https://index.docker.io/v1/`).
    pub fn from_docker_config(config: &[u8], host: &str) -> Result<Option<Self>, String> {
        use base64::Engine as _;
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
            registrytoken: Option<String>,
        }
        let config: Config =
            serde_json::from_slice(config).map_err(|e| format!("not a Docker config.json: {e}"))?;
        let key_host = |k: &str| {
            let k = k.split_once("://").map_or(k, |(_, rest)| rest);
            k.split('/').next().unwrap_or_default().to_string()
        };
        let Some(entry) = config
            .auths
            .into_iter()
            .find_map(|(k, e)| (key_host(&k) == host).then_some(e))
        else {
            return Ok(None);
        };
        let bad = |what: &str| format!("the entry for {host}: {what}");
        if let Some(token) = entry.registrytoken.filter(|t| !t.is_empty()) {
            return Ok(Some(Self::Token(token)));
        }
        let (username, password) = match (entry.auth, entry.username, entry.password) {
            (Some(auth), ..) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad("`auth` is not base64"))?;
                let decoded = String::from_utf8(decoded).map_err(|_| bad("`auth` is not text"))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| bad("`auth` is not user:password"))?;
                (u.to_string(), p.to_string())
            }
            (_, Some(u), Some(p)) => (u, p),
            _ => {
                return Err(bad(
                    "neither `auth`, `username` and `password`, nor `registrytoken`",
                ))
            }
        };
        Ok(Some(Self::Basic { username, password }))
    }
}

/// What went wrong talking to a registry, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{repo}: the registry refused the credentials ({status}){detail}")]
    Unauthorized {
        repo: String,
        status: StatusCode,
        detail: String,
    },
    #[error("{repo}: {what} not found ({status}){detail}")]
    NotFound {
        repo: String,
        what: String,
        status: StatusCode,
        detail: String,
    },
    #[error("{repo}: {what}: {status}{detail}")]
    Status {
        repo: String,
        what: String,
        status: StatusCode,
        detail: String,
    },
    #[error("{repo}: {what}: {}", crate::Chain(.source))]
    Transport {
        repo: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{repo}: {0}", repo = .1)]
    Invalid(String, String),
}

/// Which access a request needs (and its token gives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    Pull,
    Push,
}

impl Access {
    fn scope(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "pull,push",
        }
    }
}

/// One repository of one registry, signed in as needed.
pub struct Registry {
    repo: Repository,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// The `Authorization` header to send, per access, once learnt.
    auth: Mutex<BTreeMap<Access, String>>,
}

impl Registry {
    pub fn new(repo: Repository, http: reqwest::Client, credentials: Option<Credentials>) -> Self {
        let auth = match &credentials {
            // A token is sent from the start; basic credentials only when asked.
            Some(Credentials::Token(t)) => [Access::Pull, Access::Push]
                .into_iter()
                .map(|a| (a, format!("Bearer {t}")))
                .collect(),
            _ => BTreeMap::new(),
        };
        Self {
            repo,
            http,
            credentials,
            auth: Mutex::new(auth),
        }
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.repo.base, self.repo.name)
    }

    fn invalid(&self, msg: String) -> OciError {
        OciError::Invalid(msg, self.repo.to_string())
    }

    /// Sends the request `build` makes, signing in (and sending it again)
    /// when the registry asks. `build` gives `None` when it cannot make the
    /// request again (a streamed body): the refusal is returned as it is,
    /// so sign in before with a request without one.
    async fn send(
        &self,
        what: &str,
        access: Access,
        build: impl Fn(&reqwest::Client) -> Option<RequestBuilder>,
    ) -> Result<Response, OciError> {
        let transport = |source| OciError::Transport {
            repo: self.repo.to_string(),
            what: what.to_string(),
            source,
        };
        let mut refused = None;
        for _ in 0..2 {
            let Some(mut req) = build(&self.http) else {
                break;
            };
            let auth = self
                .auth
                .lock()
                .expect("lock poisoned")
                .get(&access)
                .cloned();
            if let Some(auth) = auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            let res = req.send().await.map_err(transport)?;
            // A token given is used as it is, never traded for another.
            let fixed = matches!(self.credentials, Some(Credentials::Token(_)));
            if res.status() != StatusCode::UNAUTHORIZED || refused.is_some() || fixed {
                return Ok(res);
            }
            let challenge = res
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let signing_in = self.sign_in(&challenge, access);
            let Some(auth) = self.bounded("signing in", signing_in).await? else {
                return Ok(res);
            };
            self.auth
                .lock()
                .expect("lock poisoned")
                .insert(access, auth);
            refused = Some(res);
        }
        Ok(refused.expect("sent at least once, or built nothing after a refusal"))
    }

    /// The `Authorization` header a `WWW-Authenticate` challenge asks for:
    /// basic credentials, or a token from the challenge's realm. `None`
    /// when there is nothing to answer it with.
    async fn sign_in(&self, challenge: &str, access: Access) -> Result<Option<String>, OciError> {
        let challenges = http_auth::parse_challenges(challenge).map_err(|e| {
            self.invalid(format!(
                "WWW-Authenticate {challenge:?} cannot be read: {e}"
            ))
        })?;
        let param = |c: &http_auth::ChallengeRef, name: &str| {
            c.params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        use base64::Engine as _;
        let basic = match &self.credentials {
            Some(Credentials::Basic { username, password }) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            _ => None,
        };
        // Credentials never cross plain http.
        let plain = |url: &str| !url.starts_with("https://");
        for c in &challenges {
            if c.scheme.eq_ignore_ascii_case("basic") {
                if basic.is_some() && plain(&self.repo.base) {
                    return Err(self.invalid("refusing to send credentials over plain http".into()));
                }
                return Ok(basic);
            }
            if c.scheme.eq_ignore_ascii_case("bearer") {
                let Some(realm) = param(c, "realm") else {
                    continue;
                };
                if basic.is_some() && plain(&realm) {
                    return Err(self.invalid(format!(
                        "refusing to send credentials to token realm {realm} over plain http"
                    )));
                }
                let mut query = vec![(
                    "scope".to_string(),
                    format!("repository:{}:{}", self.repo.name, access.scope()),
                )];
                if let Some(service) = param(c, "service") {
                    query.push(("service".into(), service));
                }
                let mut req = self.http.get(&realm).query(&query);
                if let Some(basic) = &basic {
                    req = req.header(header::AUTHORIZATION, basic);
                }
                let what = format!("token from {realm}");
                let res = req.send().await.map_err(|source| OciError::Transport {
                    repo: self.repo.to_string(),
                    what: what.clone(),
                    source,
                })?;
                if !res.status().is_success() {
                    return Err(self.error(&what, res).await);
                }
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let body = crate::body::read_capped(res, MAX_MANIFEST_BYTES)
                    .await
                    .map_err(|e| self.invalid(format!("{what}: {e}")))?;
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| self.invalid(format!("{what}: not a token answer: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .ok_or_else(|| self.invalid(format!("{what}: the answer holds no token")))?;
                return Ok(Some(format!("Bearer {token}")));
            }
        }
        Ok(None)
    }

    /// The error a response that is not a success says, with the registry's
    /// own error codes when it gives them.
    async fn error(&self, what: &str, res: Response) -> OciError {
        let status = res.status();
        let body = crate::body::read_capped(res, 64 << 10)
            .await
            .unwrap_or_default();
        #[derive(Deserialize)]
        struct Errors {
            errors: Vec<RegistryError>,
        }
        #[derive(Deserialize)]
        struct RegistryError {
            code: String,
            #[serde(default)]
            message: String,
        }
        let mut detail = match serde_json::from_slice::<Errors>(&body) {
            Ok(e) if !e.errors.is_empty() => format!(
                ": {}",
                e.errors
                    .iter()
                    .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            _ => String::new(),
        };
        if detail.len() > 512 {
            let cut = (0..=512)
                .rev()
                .find(|i| detail.is_char_boundary(*i))
                .unwrap_or(0);
            detail.truncate(cut);
            detail.push('…');
        }
        let (repo, what) = (self.repo.to_string(), what.to_string());
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::Unauthorized {
                repo,
                status,
                detail,
            },
            StatusCode::NOT_FOUND => OciError::NotFound {
                repo,
                what,
                status,
                detail,
            },
            _ => OciError::Status {
                repo,
                what,
                status,
                detail,
            },
        }
    }

    /// Fails unless `res` is a success.
    async fn ok(&self, what: &str, res: Response) -> Result<Response, OciError> {
        match res.status().is_success() {
            true => Ok(res),
            false => Err(self.error(what, res).await),
        }
    }

    /// The size of blob `digest` in the repository, if it is there (asked
    /// with `access`: a push asks with its own).
    async fn blob_size(&self, digest: &Digest, access: Access) -> Result<Option<u64>, OciError> {
        let url = self.url(&format!("blobs/{digest}"));
        let what = format!("blob {digest}");
        let res = self.send(&what, access, |h| Some(h.head(&url))).await?;
        if res.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let res = self.ok(&what, res).await?;
        // (Read from the header: a HEAD answer has no body to measure.)
        Ok(res
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// Pushes a package: its archive (the file at `path`, `archive` its
    /// digest and size, streamed) and `config`, then its manifest tagged
    /// `version` — refused before anything is uploaded when the tag cannot
    /// be one or already names another build. Returns the manifest's digest.
    pub async fn push_package(
        &self,
        path: &Path,
        archive: Descriptor,
        config: &[u8],
        name: &str,
        version: &str,
    ) -> Result<Digest, OciError> {
        let tag = tag(version).map_err(|e| self.invalid(e))?;
        let manifest = Manifest::package(config, archive.clone(), name, version);
        let digest = Digest::of(&serde_json::to_vec(&manifest).expect("a manifest serializes"));
        match self.tag_as(tag, Access::Push).await? {
            Some(d) if d != digest => {
                return Err(self.invalid(format!(
                    "tag {tag} names another artifact ({d}); a version is published once: give this build a new version"
                )))
            }
            _ => {}
        }
        if self.blob_size(&archive.digest, Access::Push).await? != Some(archive.size) {
            let location = self.start_upload(&archive.digest).await?;
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| self.invalid(format!("reading {}: {e}", path.display())))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            self.finish_upload(&location, &archive.digest, archive.size, body)
                .await?;
        }
        let config_digest = Digest::of(config);
        if self.blob_size(&config_digest, Access::Push).await? != Some(config.len() as u64) {
            let location = self.start_upload(&config_digest).await?;
            self.finish_upload(
                &location,
                &config_digest,
                config.len() as u64,
                config.to_vec().into(),
            )
            .await?;
        }
        self.put_manifest(tag, &manifest).await
    }

    /// Opens an upload session (signing in for push); returns where to
    /// send it, which must be this registry.
    async fn start_upload(&self, digest: &Digest) -> Result<String, OciError> {
        let url = self.url("blobs/uploads/");
        let what = format!("upload of blob {digest}");
        let res = self
            .send(&what, Access::Push, |h| {
                Some(h.post(&url).header(header::CONTENT_LENGTH, 0))
            })
            .await?;
        let res = self.ok(&what, res).await?;
        let location = res
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.invalid(format!("{what}: the registry gave no upload location")))?;
        // Relative to the registry, or absolute on it: the credentials go
        // nowhere else.
        let location = match location.starts_with('/') {
            true => format!("{}{location}", self.repo.base),
            false => location.to_string(),
        };
        if !location.starts_with(&format!("{}/", self.repo.base)) {
            return Err(self.invalid(format!(
                "{what}: the registry sends the upload elsewhere ({location}); refused"
            )));
        }
        Ok(location)
    }

    async fn finish_upload(
        &self,
        location: &str,
        digest: &Digest,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), OciError> {
        let what = format!("upload of blob {digest}");
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        // Sent once: a streamed body cannot be sent again.
        let body = std::sync::Mutex::new(Some(body));
        let res = self
            .send(&what, Access::Push, |h| {
                let b = body.lock().expect("lock poisoned").take()?;
                Some(
                    h.put(&url)
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, size)
                        .body(b),
                )
            })
            .await?;
        self.ok(&what, res).await.map(|_| ())
    }

    /// Stores `manifest` under `reference` (a tag); returns its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<Digest, OciError> {
        let body = serde_json::to_vec(manifest).expect("a manifest serializes");
        let digest = Digest::of(&body);
        let url = self.url(&format!("manifests/{reference}"));
        let what = format!("manifest {reference}");
        let res = self
            .send(&what, Access::Push, |h| {
                Some(
                    h.put(&url)
                        .header(header::CONTENT_TYPE, MANIFEST_MEDIA_TYPE)
                        .body(body.clone()),
                )
            })
            .await?;
        self.ok(&what, res).await?;
        Ok(digest)
    }

    /// The manifest `digest`, read only if its bytes have that digest.
    pub async fn manifest(&self, digest: &Digest) -> Result<Manifest, OciError> {
        let what = format!("manifest {digest}");
        let body = self
            .bounded(&what, self.read_manifest(&digest.to_string()))
            .await?;
        let got = Digest::of(&body);
        if got != *digest {
            return Err(self.invalid(format!(
                "{what}: the registry sent a manifest with digest {got}"
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| self.invalid(format!("{what}: not an image manifest: {e}")))
    }

    /// The bytes of the manifest `reference` names (at most
    /// [`MAX_MANIFEST_BYTES`]).
    async fn read_manifest(&self, reference: &str) -> Result<bytes::Bytes, OciError> {
        let url = self.url(&format!("manifests/{reference}"));
        let what = format!("manifest {reference}");
        let res = self
            .send(&what, Access::Pull, |h| {
                Some(h.get(&url).header(header::ACCEPT, MANIFEST_MEDIA_TYPE))
            })
            .await?;
        let res = self.ok(&what, res).await?;
        crate::body::read_capped(res, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.invalid(format!("{what}: {e}")))
    }

    /// `fut`, given up after [`SMALL_REQUEST_TIMEOUT`]: a registry that
    /// trickles a manifest or a token does not hold a fetch for ever.
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, OciError>>,
    ) -> Result<T, OciError> {
        tokio::time::timeout(SMALL_REQUEST_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(self.invalid(format!(
                    "{what}: no answer within {}s",
                    SMALL_REQUEST_TIMEOUT.as_secs()
                )))
            })
    }

    /// The digest of the manifest `tag` names now, if the tag exists.
    pub async fn tag(&self, tag: &str) -> Result<Option<Digest>, OciError> {
        self.bounded(&format!("tag {tag}"), self.tag_as(tag, Access::Pull))
            .await
    }

    async fn tag_as(&self, tag: &str, access: Access) -> Result<Option<Digest>, OciError> {
        let url = self.url(&format!("manifests/{tag}"));
        let what = format!("tag {tag}");
        let res = self
            .send(&what, access, |h| {
                Some(h.head(&url).header(header::ACCEPT, MANIFEST_MEDIA_TYPE))
            })
            .await?;
        if res.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let res = self.ok(&what, res).await?;
        let Some(digest) = res
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        else {
            // Not every registry says: the manifest's own bytes do.
            return Ok(Some(Digest::of(&self.read_manifest(tag).await?)));
        };
        digest
            .parse()
            .map(Some)
            .map_err(|e| self.invalid(format!("{what}: digest {digest:?}: {e}")))
    }

    /// Blob `digest`, streaming (verify it as it arrives), from byte
    /// `offset` on (`206 Partial Content` when the registry resumes).
    pub async fn blob(&self, digest: &Digest, offset: u64) -> Result<Response, OciError> {
        let url = self.url(&format!("blobs/{digest}"));
        let what = format!("blob {digest}");
        let res = self
            .send(&what, Access::Pull, |h| {
                let req = h.request(Method::GET, &url);
                Some(match offset {
                    0 => req,
                    _ => req.header(reqwest::header::RANGE, format!("bytes={offset}-")),
                })
            })
            .await?;
        self.ok(&what, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_from_a_docker_config_for_their_registry_alone() {
        let config = br#"{"auths": {
            "https://registry.example.com:5000/v1/": {"auth": "Y2k6czNjcmV0"},
            "ghcr.io": {"username": "bot", "password": "pw"},
            "token.example.com": {"registrytoken": "t0k"},
            "broken.example.com": {"auth": "not base64!"}
        }}"#;
        let basic = |u: &str, p: &str| {
            Some(Credentials::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        let read = |host| Credentials::from_docker_config(config, host);
        assert_eq!(
            read("registry.example.com:5000").unwrap(),
            basic("ci", "s3cret")
        );
        assert_eq!(read("ghcr.io").unwrap(), basic("bot", "pw"));
        assert_eq!(
            read("token.example.com").unwrap(),
            Some(Credentials::Token("t0k".into()))
        );
        assert_eq!(read("registry.example.com").unwrap(), None, "another port");
        let e = read("broken.example.com").unwrap_err();
        assert!(
            e.contains("broken.example.com") && e.contains("base64"),
            "{e}"
        );
        assert!(Credentials::from_docker_config(b"{", "x").is_err());
    }

    #[test]
    fn repositories_are_read_with_https_by_default_and_bad_names_refused() {
        let r: Repository = "registry.example.com:5000/caravan/packages"
            .parse()
            .unwrap();
        assert_eq!(r.base, "https://registry.example.com:5000");
        assert_eq!(r.name, "caravan/packages");
        let r: Repository = "http://127.0.0.1:5000/pkgs/".parse().unwrap();
        assert_eq!(
            (r.base.as_str(), r.name.as_str()),
            ("http://127.0.0.1:5000", "pkgs")
        );
        for (bad, says) in [
            ("ftp://h/x", "scheme ftp"),
            ("registry.example.com", "names no repository"),
            ("h/Caravan", "is not a registry repository name"),
            ("h/a//b", "is not a registry repository name"),
            ("h/-a", "is not a registry repository name"),
            ("user@h/a", "is not one"),
        ] {
            let e = bad.parse::<Repository>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_package_manifest_names_its_archive_and_nothing_else_passes_for_one() {
        let archive = Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest: Digest::of(b"archive"),
            size: 7,
            annotations: BTreeMap::new(),
        };
        let m = Manifest::package(b"{}", archive.clone(), "hello", "1.0.0");
        assert_eq!(m.archive(), Ok(&archive));
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["artifactType"], ARTIFACT_TYPE);
        assert_eq!(json["layers"][0]["digest"], archive.digest.to_string());
        let mut image = m.clone();
        image.artifact_type = None;
        assert!(image
            .archive()
            .unwrap_err()
            .contains("not a Caravan package"));
        let mut two = m;
        two.layers.push(archive);
        assert!(two.archive().unwrap_err().contains("one layer"));
    }

    /// A registry that asks for a bearer token from its realm, as Harbor,
    /// GHCR or Docker Hub do: the token service wants the scope and the
    /// service; the registry wants the token.
    #[tokio::test]
    async fn a_bearer_challenge_is_answered_with_a_token_from_its_realm() {
        use axum::{extract::Query, http::HeaderMap, routing::get, Router};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tokens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let issued = tokens.clone();
        let realm = format!("http://{addr}/token");
        let manifest = Manifest::package(
            b"{}",
            Descriptor {
                media_type: LAYER_MEDIA_TYPE.into(),
                digest: Digest::of(b"a"),
                size: 1,
                annotations: BTreeMap::new(),
            },
            "hello",
            "1",
        );
        let body = serde_json::to_vec(&manifest).unwrap();
        let digest = Digest::of(&body);
        let app = Router::new()
            .route(
                "/token",
                get(move |q: Query<BTreeMap<String, String>>, h: HeaderMap| {
                    let issued = issued.clone();
                    async move {
                        // Anonymous: no credentials over plain http.
                        if h.contains_key("authorization")
                            || q.get("scope").map(String::as_str) != Some("repository:team/hello:pull")
                            || q.get("service").map(String::as_str) != Some("registry.test")
                        {
                            return (axum::http::StatusCode::UNAUTHORIZED, String::new());
                        }
                        issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        (axum::http::StatusCode::OK, r#"{"token":"t0ken"}"#.to_string())
                    }
                }),
            )
            .route(
                "/v2/team/hello/manifests/{reference}",
                get(move |h: HeaderMap| {
                    let (body, realm) = (body.clone(), realm.clone());
                    async move {
                        let challenge = format!(r#"Bearer realm="{realm}",service="registry.test",scope="repository:team/hello:pull""#);
                        match h.get("authorization").map(|v| v.to_str().unwrap()) {
                            Some("Bearer t0ken") => (axum::http::StatusCode::OK, HeaderMap::new(), body),
                            _ => {
                                let mut headers = HeaderMap::new();
                                headers.insert("www-authenticate", challenge.parse().unwrap());
                                (axum::http::StatusCode::UNAUTHORIZED, headers, Vec::new())
                            }
                        }
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let repo: Repository = format!("http://{addr}/team/hello").parse().unwrap();
        let registry = Registry::new(repo.clone(), reqwest::Client::new(), None);
        assert_eq!(registry.manifest(&digest).await.unwrap(), manifest);
        // The token is kept: asked for once. (And a registry that does not
        // say a tag's digest has the manifest hashed.)
        assert_eq!(registry.manifest(&digest).await.unwrap(), manifest);
        assert_eq!(registry.tag("1").await.unwrap(), Some(digest));
        assert_eq!(tokens.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another digest than the one asked for is refused.
        let other = Digest::of(b"another manifest");
        let e = registry.manifest(&other).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "the registry sent a manifest with digest {digest}"
            )),
            "{e}"
        );
        // Credentials are not sent to a realm over plain http.
        let credentials = Credentials::Basic {
            username: "ci".into(),
            password: "pw".into(),
        };
        let signed = Registry::new(repo, reqwest::Client::new(), Some(credentials));
        let e = signed.manifest(&digest).await.unwrap_err().to_string();
        assert!(
            e.contains("refusing to send credentials to token realm"),
            "{e}"
        );
    }

    #[test]
    fn a_version_is_a_tag_only_if_a_registry_takes_it() {
        assert_eq!(tag("1.0.0-rc_1"), Ok("1.0.0-rc_1"));
        for bad in ["1.0.0+build", "", "-1", "a/b", &"9".repeat(129)] {
            let e = tag(bad).unwrap_err();
            assert!(e.contains("cannot be a registry tag"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn credentials_never_cross_plain_http() {
        use axum::{http::HeaderMap, routing::get, Router};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/v2/x/manifests/{reference}",
            get(|| async {
                let mut h = HeaderMap::new();
                h.insert("www-authenticate", r#"Basic realm="x""#.parse().unwrap());
                (axum::http::StatusCode::UNAUTHORIZED, h)
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let repo: Repository = format!("http://{addr}/x").parse().unwrap();
        let credentials = Credentials::Basic {
            username: "ci".into(),
            password: "pw".into(),
        };
        let registry = Registry::new(repo, reqwest::Client::new(), Some(credentials));
        let e = registry
            .manifest(&Digest::of(b"m"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing to send credentials over plain http"),
            "{e}"
        );
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let c = Credentials::Basic {
            username: "ci".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Token("t0ken".into())).contains("t0ken"));
    }
}
