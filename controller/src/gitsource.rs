//! GitSource sync: fetch the repository with git2, parse and validate every
//! manifest under the source's path, dry-run them all against the API server,
//! and only then apply them with server-side apply and prune what left Git.
//! A revision with any problem applies nothing: the last good revision stays
//! in place and `Ready=False` names the file and the problem.

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use caravan_api::{
    conditions::{self, reasons},
    labels,
    v1alpha1::{self as v1, GitSource, GitSourceSpec, GitSourceStatus, ManifestError},
    API_VERSION, FIELD_MANAGER,
};
use futures::StreamExt;
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        watcher, Controller,
    },
    Api, Resource, ResourceExt,
};
use serde::Deserialize;

use crate::{context::Context, error::Error, metrics::ResultLabel};

/// Largest manifest file read from Git.
const MAX_FILE_BYTES: usize = 1 << 20;

/// Runs the GitSource controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    Controller::new(ctx.all::<GitSource>(), watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "gitsource reconcile");
            }
        })
        .await;
}

fn error_policy(_: Arc<GitSource>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(%error, "gitsource reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// The kinds a GitSource may apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Cabinet,
    Package,
    Site,
    DistributionJob,
    Agent,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Cabinet,
        Kind::Package,
        Kind::Site,
        Kind::DistributionJob,
        Kind::Agent,
    ];

    fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == kind)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Cabinet => "Cabinet",
            Kind::Package => "Package",
            Kind::Site => "Site",
            Kind::DistributionJob => "DistributionJob",
            Kind::Agent => "Agent",
        }
    }

    fn resource(self) -> ApiResource {
        match self {
            Kind::Cabinet => ApiResource::erase::<v1::Cabinet>(&()),
            Kind::Package => ApiResource::erase::<v1::Package>(&()),
            Kind::Site => ApiResource::erase::<v1::Site>(&()),
            Kind::DistributionJob => ApiResource::erase::<v1::DistributionJob>(&()),
            Kind::Agent => ApiResource::erase::<v1::Agent>(&()),
        }
    }

    /// Checks `value` against the Rust type of the kind, naming the field at fault.
    fn validate(self, value: &serde_json::Value) -> Result<(), String> {
        fn check<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, String> {
            serde_path_to_error::deserialize::<_, T>(v).map_err(|e| match e.path().to_string() {
                p if p == "." => e.inner().to_string(),
                p => format!("{p}: {}", e.inner()),
            })
        }
        match self {
            Kind::Cabinet => {
                let c = check::<v1::Cabinet>(value)?;
                let url = c.spec.store.url.as_deref().unwrap_or_default();
                if c.spec.store.type_ == v1::StoreType::Http
                    && !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    return Err(format!("spec.store.url: an http store needs an http:// or https:// URL, not {url:?}"));
                }
                for k in &c.spec.trusted_keys {
                    caravan_api::signing::parse_public(&k.public_key)
                        .map_err(|e| format!("spec.trustedKeys[{}]: {e}", k.name))?;
                }
                Ok(())
            }
            Kind::Package => {
                let p = check::<v1::Package>(value)?;
                if v1::sha256_hex(&p.spec.artifact.digest).is_none() {
                    return Err(format!(
                        "spec.artifact.digest: {:?} is not of the form sha256:<64 lowercase hex digits>",
                        p.spec.artifact.digest
                    ));
                }
                Ok(())
            }
            Kind::Site => {
                let s = check::<v1::Site>(value)?;
                if s.spec.parent.as_deref() == Some(&s.name_any()) {
                    return Err("spec.parent: a site cannot be its own parent".into());
                }
                Ok(())
            }
            Kind::DistributionJob => check::<v1::DistributionJob>(value).map(drop),
            Kind::Agent => check::<v1::Agent>(value).map(drop),
        }
    }
}

/// One object read from Git, ready to apply.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub file: String,
    pub kind: Kind,
    pub name: String,
    pub object: serde_json::Value,
}

/// Parses and validates one file; every document must be a Caravan object of
/// an allowed kind, in `namespace` (or none).
pub fn parse_file(
    file: &str,
    text: &str,
    namespace: &str,
    source: &str,
) -> Result<Vec<Manifest>, ManifestError> {
    let fail = |message: String| ManifestError {
        file: file.to_string(),
        message,
    };
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let mut value = serde_json::Value::deserialize(doc)
            .map_err(|e| fail(format!("document {n}: invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let Some(obj) = value.as_object_mut() else {
            return Err(fail(format!(
                "document {n}: expected a mapping with apiVersion, kind and metadata"
            )));
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind_name = obj
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if api_version != API_VERSION {
            return Err(fail(format!(
                "document {n}: apiVersion {api_version:?} is not {API_VERSION:?}"
            )));
        }
        let Some(kind) = Kind::parse(&kind_name) else {
            return Err(fail(format!(
                "document {n}: kind {kind_name:?} cannot be applied from Git (allowed: Cabinet, Package, Site, DistributionJob, Agent)"
            )));
        };
        let meta_str = |key: &str| {
            obj.get("metadata")
                .and_then(|m| m.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let name = meta_str("name").unwrap_or_default();
        let what = format!("document {n} ({kind_name} {name:?})");
        if let Err(e) = validate_name(&name) {
            return Err(fail(format!("{what}: metadata.name: {e}")));
        }
        match meta_str("namespace") {
            Some(ns) if ns != namespace => {
                return Err(fail(format!(
                    "{what}: metadata.namespace {ns:?} differs from the GitSource's namespace {namespace:?}"
                )))
            }
            _ => {}
        }
        obj.remove("status");
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .ok_or_else(|| fail(format!("{what}: metadata must be a mapping")))?;
        meta.insert("namespace".into(), namespace.into());
        let labels = meta
            .entry("labels")
            .or_insert_with(|| serde_json::json!({}));
        let Some(labels) = labels.as_object_mut() else {
            return Err(fail(format!("{what}: metadata.labels must be a mapping")));
        };
        labels.insert(labels::SOURCE.into(), source.into());
        kind.validate(&value)
            .map_err(|e| fail(format!("{what}: {e}")))?;
        out.push(Manifest {
            file: file.to_string(),
            kind,
            name,
            object: value,
        });
    }
    Ok(out)
}

/// The URL without any credentials in it, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// DNS-1123 subdomain, as Kubernetes requires of object names.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("missing".into());
    }
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} must be lowercase letters, digits, '-' and '.', starting and ending alphanumeric"))
    }
}

/// Parses every file of a revision; all problems are returned, one per file.
pub fn parse_revision(
    files: &[(String, Vec<u8>)],
    namespace: &str,
    source: &str,
) -> Result<Vec<Manifest>, Vec<ManifestError>> {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    for (file, bytes) in files {
        if bytes.len() > MAX_FILE_BYTES {
            errors.push(ManifestError {
                file: file.clone(),
                message: format!(
                    "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                    bytes.len()
                ),
            });
            continue;
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            errors.push(ManifestError {
                file: file.clone(),
                message: "file is not valid UTF-8".into(),
            });
            continue;
        };
        match parse_file(file, text, namespace, source) {
            Ok(m) => manifests.extend(m),
            Err(e) => errors.push(e),
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for m in &manifests {
        if let Some(first) = seen.insert((m.kind, m.name.clone()), m.file.clone()) {
            errors.push(ManifestError {
                file: m.file.clone(),
                message: format!("{} {:?} is also declared in {first}", m.kind.name(), m.name),
            });
        }
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

/// Manifest files of a revision: path relative to the repository root, contents.
pub type Files = Vec<(String, Vec<u8>)>;

/// Applies the package identity rules to the Packages of a revision, against
/// the existing packages and against each other.
pub fn check_identity<'a>(
    manifests: &'a [Manifest],
    existing: impl Iterator<Item = (&'a str, &'a v1::PackageSpec)>,
) -> Result<(), Vec<ManifestError>> {
    let mut seen: Vec<(&str, &v1::PackageSpec)> = existing.collect();
    let mut specs = Vec::new();
    for m in manifests.iter().filter(|m| m.kind == Kind::Package) {
        match serde_json::from_value::<v1::Package>(m.object.clone()) {
            Ok(p) => specs.push((m, p.spec)),
            // Validated before; cannot happen.
            Err(e) => {
                return Err(vec![ManifestError {
                    file: m.file.clone(),
                    message: e.to_string(),
                }])
            }
        }
    }
    let mut errors = Vec::new();
    for (m, spec) in &specs {
        if let Err(message) = crate::identity::check(&m.name, spec, seen.iter().copied()) {
            errors.push(ManifestError {
                file: m.file.clone(),
                message,
            });
        }
        seen.push((m.name.as_str(), spec));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Fetches the source and returns the commit id and every `*.yaml`/`*.yml` file
/// under its path (paths relative to the repository root).
pub fn fetch(dir: &Path, spec: &GitSourceSpec) -> Result<(String, Files), Error> {
    let repo = match git2::Repository::open_bare(dir) {
        Ok(r) => r,
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            git2::Repository::init_bare(dir)?
        }
    };
    let local_ref = format!("refs/caravan/{}", spec.branch);
    let refspec = format!("+refs/heads/{}:{local_ref}", spec.branch);
    let mut remote = repo.remote_anonymous(&spec.url)?;
    remote
        .fetch(&[&refspec], None, None)
        .map_err(|source| Error::GitFetch {
            url: spec.url.clone(),
            source,
        })?;
    let commit = match &spec.commit {
        Some(c) => repo.revparse_single(c)?.peel_to_commit()?,
        None => repo.find_reference(&local_ref)?.peel_to_commit()?,
    };
    let root = commit.tree()?;
    let path = spec.path.trim_matches('/');
    let (tree, prefix) = if path.is_empty() || path == "." {
        (root, String::new())
    } else {
        let entry = root.get_path(Path::new(path))?;
        (entry.to_object(&repo)?.peel_to_tree()?, format!("{path}/"))
    };
    let mut files = Vec::new();
    let mut failure = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        let name = entry.name().unwrap_or_default();
        if entry.kind() == Some(git2::ObjectType::Blob)
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
        {
            match entry.to_object(&repo).and_then(|o| o.peel_to_blob()) {
                Ok(blob) => files.push((format!("{prefix}{dir}{name}"), blob.content().to_vec())),
                Err(e) => {
                    failure = Some(e);
                    return git2::TreeWalkResult::Abort;
                }
            }
        }
        git2::TreeWalkResult::Ok
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    files.sort();
    Ok((commit.id().to_string(), files))
}

async fn reconcile(gs: Arc<GitSource>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = gs
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = gs.name_any();
    let generation = gs.meta().generation;
    let interval = Duration::from_secs(gs.spec.interval_seconds.max(1).into());
    let previous = gs.status.clone().unwrap_or_default();
    let mut status = GitSourceStatus {
        observed_generation: generation,
        ..previous.clone()
    };
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let oref = gs.object_ref(&());

    if gs.spec.suspend {
        status.conditions = vec![conditions::new(
            conditions::READY,
            false,
            reasons::SUSPENDED,
            "sync suspended",
            generation,
        )];
        patch_status(&ctx, &ns, &name, &previous, status).await?;
        return Ok(Action::requeue(interval));
    }

    let dir = ctx.config.data_dir.join("git").join(&ns).join(&name);
    let spec = gs.spec.clone();
    let fetched = tokio::task::spawn_blocking(move || fetch(&dir, &spec))
        .await
        .unwrap_or_else(|e| Err(Error::io("git fetch task", std::io::Error::other(e))));
    let (commit, files) = match fetched {
        Ok(x) => x,
        Err(e) => {
            ctx.metrics
                .git_syncs
                .get_or_create(&ResultLabel {
                    result: "fetch_failed",
                })
                .inc();
            let msg = format!(
                "fetching {} ({}): {e}",
                redact(&gs.spec.url),
                gs.spec.branch
            );
            status.conditions = vec![conditions::new(
                conditions::READY,
                false,
                reasons::FETCH_FAILED,
                &msg,
                generation,
            )];
            warn_event(&recorder, &oref, reasons::FETCH_FAILED, &msg).await;
            patch_status(&ctx, &ns, &name, &previous, status).await?;
            return Ok(Action::requeue(interval));
        }
    };
    status.last_attempted_revision = Some(commit.clone());
    let short = &commit[..commit.len().min(12)];

    let parsed = parse_revision(&files, &ns, &name).and_then(|m| {
        let existing: Vec<_> = ctx
            .stores
            .packages
            .state()
            .into_iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
            .collect();
        check_identity(
            &m,
            existing
                .iter()
                .map(|p| (p.meta().name.as_deref().unwrap_or_default(), &p.spec)),
        )?;
        Ok(m)
    });
    let outcome = match parsed {
        Err(errors) => Err((reasons::INVALID_MANIFEST, errors)),
        Ok(manifests) => apply_all(&ctx, &ns, &name, &manifests, gs.spec.prune)
            .await
            .map(|()| manifests.len())
            .map_err(|errors| (reasons::APPLY_FAILED, errors)),
    };
    let result = if outcome.is_ok() {
        "applied"
    } else {
        "refused"
    };
    ctx.metrics
        .git_syncs
        .get_or_create(&ResultLabel { result })
        .inc();
    match outcome {
        Ok(count) => {
            let changed = status.last_applied_revision.as_deref() != Some(commit.as_str());
            status.last_applied_revision = Some(commit.clone());
            status.applied_objects = count as u32;
            status.errors.clear();
            let msg = format!("applied revision {short}: {count} objects");
            status.conditions = vec![conditions::new(
                conditions::READY,
                true,
                reasons::SUCCEEDED,
                &msg,
                generation,
            )];
            if changed {
                let _ = recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "Applied".into(),
                            note: Some(msg),
                            action: "Apply".into(),
                            secondary: None,
                        },
                        &oref,
                    )
                    .await;
            }
        }
        Err((reason, errors)) => {
            let detail = errors
                .iter()
                .map(|e| format!("{}: {}", e.file, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            let kept = match &status.last_applied_revision {
                Some(r) => format!("keeping revision {}", &r[..r.len().min(12)]),
                None => "nothing applied yet".into(),
            };
            let msg = format!("revision {short} not applied ({kept}): {detail}");
            status.errors = errors;
            status.conditions = vec![conditions::new(
                conditions::READY,
                false,
                reason,
                &msg,
                generation,
            )];
            if previous.last_attempted_revision.as_deref() != Some(commit.as_str())
                || previous.errors.is_empty()
            {
                warn_event(&recorder, &oref, reason, &msg).await;
            }
        }
    }
    patch_status(&ctx, &ns, &name, &previous, status).await?;
    Ok(Action::requeue(interval))
}

async fn warn_event(
    recorder: &Recorder,
    oref: &k8s_openapi::api::core::v1::ObjectReference,
    reason: &str,
    msg: &str,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(msg, 1000)),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, oref).await {
        tracing::debug!(error = %e, "event not recorded");
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Dry-runs every manifest, then applies them all and prunes. Errors name the file.
async fn apply_all(
    ctx: &Context,
    ns: &str,
    source: &str,
    manifests: &[Manifest],
    prune: bool,
) -> Result<(), Vec<ManifestError>> {
    let api = |kind: Kind| {
        Api::<DynamicObject>::namespaced_with(ctx.client.clone(), ns, &kind.resource())
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for dry_run in [true, false] {
        let params = if dry_run {
            params.clone().dry_run()
        } else {
            params.clone()
        };
        let mut errors = Vec::new();
        for m in manifests {
            if let Err(e) = api(m.kind)
                .patch(&m.name, &params, &Patch::Apply(&m.object))
                .await
            {
                errors.push(ManifestError {
                    file: m.file.clone(),
                    message: format!("{} {:?}: {}", m.kind.name(), m.name, api_error_message(&e)),
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
    }
    if prune {
        let wanted: BTreeSet<_> = manifests
            .iter()
            .map(|m| (m.kind, m.name.as_str()))
            .collect();
        let selector = ListParams::default().labels(&format!("{}={source}", labels::SOURCE));
        for kind in Kind::ALL {
            let list = match api(kind).list_metadata(&selector).await {
                Ok(l) => l,
                Err(e) => {
                    return Err(vec![ManifestError {
                        file: "-".into(),
                        message: format!(
                            "listing {}s to prune: {}",
                            kind.name(),
                            api_error_message(&e)
                        ),
                    }])
                }
            };
            for obj in list {
                let name = obj.name_any();
                if !wanted.contains(&(kind, name.as_str())) {
                    tracing::info!(kind = kind.name(), %name, "pruning object removed from Git");
                    if let Err(e) = api(kind).delete(&name, &DeleteParams::background()).await {
                        tracing::warn!(kind = kind.name(), %name, error = %e, "prune failed");
                    }
                }
            }
        }
    }
    Ok(())
}

fn api_error_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

async fn patch_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    previous: &GitSourceStatus,
    mut status: GitSourceStatus,
) -> Result<(), Error> {
    status.conditions = conditions::merge(&previous.conditions, status.conditions);
    if &status == previous {
        return Ok(());
    }
    let api: Api<GitSource> = Api::namespaced(ctx.client.clone(), ns);
    let patch =
        serde_json::json!({ "apiVersion": API_VERSION, "kind": "GitSource", "status": status });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGE: &str = r#"
apiVersion: caravan.dev/v1alpha1
kind: Package
metadata:
  name: hello-1.0.0
spec:
  cabinet: main
  name: hello
  version: 1.0.0
  artifact:
    digest: sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
    size: 3
"#;

    #[test]
    fn valid_manifests_are_placed_in_the_source_namespace_and_labelled() {
        let m = parse_file("pkgs/hello.yaml", PACKAGE, "team-a", "fleet").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, Kind::Package);
        assert_eq!(m[0].object["metadata"]["namespace"], "team-a");
        assert_eq!(m[0].object["metadata"]["labels"][labels::SOURCE], "fleet");
    }

    #[test]
    fn malformed_yaml_is_reported_with_file_and_line() {
        let e =
            parse_file("jobs/bad.yaml", "kind: Package\n  name: [oops\n", "ns", "s").unwrap_err();
        assert_eq!(e.file, "jobs/bad.yaml");
        assert!(
            e.message.contains("invalid YAML") && e.message.contains("line"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_missing_field_is_named_with_its_path() {
        let text = PACKAGE.replace("  cabinet: main\n", "");
        let e = parse_file("p.yaml", &text, "ns", "s").unwrap_err();
        assert!(
            e.message.contains("spec") && e.message.contains("cabinet"),
            "{}",
            e.message
        );
        let text = PACKAGE.replace("sha256:2c26", "md5:2c26");
        let e = parse_file("p.yaml", &text, "ns", "s").unwrap_err();
        assert!(e.message.contains("spec.artifact.digest"), "{}", e.message);
    }

    #[test]
    fn foreign_kinds_namespaces_and_duplicates_are_refused() {
        let e = parse_file(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "ns",
            "s",
        )
        .unwrap_err();
        assert!(e.message.contains("apiVersion"), "{}", e.message);
        let other_ns = PACKAGE.replace(
            "  name: hello-1.0.0\n",
            "  name: hello-1.0.0\n  namespace: other\n",
        );
        assert!(parse_file("p.yaml", &other_ns, "ns", "s")
            .unwrap_err()
            .message
            .contains("namespace"));
        let files = vec![
            ("a.yaml".to_string(), PACKAGE.as_bytes().to_vec()),
            ("b.yaml".to_string(), PACKAGE.as_bytes().to_vec()),
        ];
        let errors = parse_revision(&files, "ns", "s").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("also declared in a.yaml"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn credentials_in_urls_never_reach_messages() {
        assert_eq!(
            redact("https://bot:s3cret@git.example.com/fleet.git"),
            "https://***@git.example.com/fleet.git"
        );
        assert_eq!(
            redact("https://git.example.com/a@b.git"),
            "https://git.example.com/a@b.git"
        );
        assert_eq!(redact("/srv/git/fleet.git"), "/srv/git/fleet.git");
    }

    #[test]
    fn object_names_follow_kubernetes_rules() {
        assert!(validate_name("hello-1.0.0").is_ok());
        assert!(validate_name("Hello").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("").is_err());
    }
}
