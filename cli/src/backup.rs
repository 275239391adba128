//! `caravan backup` and `caravan restore`: the whole control plane in one
//! archive (its layout: `caravan_api::backup`) — every Caravan object, the
//! Secrets they use, and the controller's keys, roots, ledger and blobs —
//! and that archive brought back into a fresh cluster, whose relays and
//! agents then carry on as they were: same Agents, same credentials, same
//! trust root, nothing enrolled or installed again.
//!
//! A restore goes to a controller started with `--await-restore` on an
//! empty data directory (`helm install … --set restore.await=true`): its
//! data first (it starts again with the backup's keys), then the objects,
//! Sites after the Agents they serve and GitSources last, so that no relay
//! is ever given a desired state that misses one of its agents.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use caravan_api::{
    backup::{self, DataEntry, End, Manifest, RestoreState},
    labels,
    v1alpha1::{Agent, BootstrapToken, Cabinet, DistributionJob, GitSource, Package, Site},
    wire::paths,
};
use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::Value;

/// The controller a backup is taken from or restored into.
#[derive(clap::Args)]
pub struct ControllerArgs {
    /// The controller's distribution API.
    #[arg(long, env = "CARAVAN_SERVER")]
    server: String,
    /// The controller's backup token (the chart keeps it in the Secret
    /// `caravan-backup`, key `token`).
    #[arg(long, env = "CARAVAN_BACKUP_TOKEN", hide_env_values = true)]
    backup_token: String,
    /// CA certificate (PEM) to verify the controller's HTTPS certificate
    /// with. A restore also trusts the CA in the backup, which the
    /// controller serves under once it has the backup's keys.
    #[arg(long, env = "CARAVAN_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// The largest manifest or end entry read.
const MAX_SMALL_ENTRY: u64 = 1 << 20;

/// The field manager of what a restore writes (where the backup does not
/// say who owned what).
const FIELD_MANAGER: &str = "caravan-restore";

/// Every Caravan kind, in the order a restore creates them: what an object
/// names before it (a Package's Cabinet), Sites after the Agents their
/// relays serve, GitSources last (their first sync finds all in place).
fn kinds() -> [ApiResource; 7] {
    [
        ApiResource::erase::<Cabinet>(&()),
        ApiResource::erase::<Package>(&()),
        ApiResource::erase::<DistributionJob>(&()),
        ApiResource::erase::<BootstrapToken>(&()),
        ApiResource::erase::<Agent>(&()),
        ApiResource::erase::<Site>(&()),
        ApiResource::erase::<GitSource>(&()),
    ]
}

/// Where `value` (an object of the archive) goes in a restore: Secrets
/// first, then [`kinds`]' order.
fn rank(value: &Value) -> Option<(usize, ApiResource)> {
    let api_version = value.get("apiVersion")?.as_str()?;
    let kind = value.get("kind")?.as_str()?;
    std::iter::once(ApiResource::erase::<Secret>(&()))
        .chain(kinds())
        .enumerate()
        .find(|(_, ar)| ar.api_version == api_version && ar.kind == kind)
}

impl ControllerArgs {
    fn http(&self, extra_ca: Option<&str>) -> anyhow::Result<reqwest::Client> {
        let mut pem = match &self.ca_file {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("reading CA file {}", path.display()))?,
            None if extra_ca.is_none() => {
                return caravan_net::client(None, Duration::from_secs(120))
            }
            None => vec![],
        };
        pem.extend(extra_ca.unwrap_or_default().as_bytes());
        caravan_net::client_trusting(
            Some((&pem, "the CA file and the backup's CA")),
            Duration::from_secs(120),
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    /// What the controller says it is.
    async fn state(&self, http: &reqwest::Client) -> anyhow::Result<RestoreState> {
        let res = self.send(http.get(self.url(paths::RESTORE))).await?;
        Ok(res.json().await?)
    }

    /// Sends `req` with the backup token; an error answer says why.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let res = req
            .bearer_auth(&self.backup_token)
            .header(caravan_api::skew::VERSION_HEADER, caravan_api::RELEASE)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", self.server, caravan_net::Chain(&e)))?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        let said = serde_json::from_str::<caravan_api::wire::ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or(body);
        anyhow::bail!("the controller answered {status}: {said}")
    }
}

/// Drops what belongs to the stored object, not to what it declares (its
/// `managedFields` stay: who owns which field is restored with it).
fn strip(value: &mut Value) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "selfLink",
            "ownerReferences",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            meta.remove(field);
        }
    }
}

/// Every Caravan object and the Secrets they use, as listed now.
async fn objects(client: &Client) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut named_secrets = Vec::new();
    for ar in kinds() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let list = api
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing {}", ar.plural))?;
        for mut obj in list.items {
            obj.types = Some(kube::api::TypeMeta {
                api_version: ar.api_version.clone(),
                kind: ar.kind.clone(),
            });
            if ar.kind == "Site" {
                let site: Site = serde_json::from_value(serde_json::to_value(&obj)?)?;
                let ns = site.metadata.namespace.clone().unwrap_or_default();
                named_secrets.extend(
                    [
                        &site.spec.relay.tls_secret,
                        &site.spec.relay.registry_auth_secret,
                    ]
                    .into_iter()
                    .flatten()
                    .map(|name| (ns.clone(), name.clone())),
                );
            }
            all.push(serde_json::to_value(&obj)?);
        }
    }
    // The Secrets the controller reads carry one of its labels; a Site's
    // certificate and pull credentials are named by it.
    let mut secrets: std::collections::BTreeMap<(String, String), Secret> = Default::default();
    for label in [
        labels::GIT_CREDENTIALS,
        labels::WEBHOOK_SECRET,
        labels::REGISTRY_CREDENTIALS,
    ] {
        let api: Api<Secret> = Api::all(client.clone());
        let list = api
            .list(&ListParams::default().labels(&format!("{label}=true")))
            .await
            .context("listing Secrets")?;
        for s in list.items {
            let key = (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            secrets.insert(key, s);
        }
    }
    for (ns, name) in named_secrets {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        if let Some(s) = api
            .get_opt(&name)
            .await
            .with_context(|| format!("reading Secret {ns}/{name}"))?
        {
            secrets.insert((ns, name), s);
        }
    }
    for (_, s) in secrets {
        let mut value = serde_json::to_value(&s)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        all.push(value);
    }
    Ok(all)
}

/// `caravan backup`: writes the archive to `out` (mode 0600: it holds
/// the controller's keys), whole or not at all.
pub async fn backup(out: &Path, controller: ControllerArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the cluster (kubeconfig)")?;
    let http = controller.http(None)?;
    let state = controller.state(&http).await?;
    anyhow::ensure!(
        !state.awaiting,
        "the controller at {} awaits a restore: it has nothing to back up",
        controller.server
    );
    // Objects first: a blob a listed Package pins is then still there
    // when the data is read (the collector spares referenced blobs).
    let objects = objects(&client).await?;
    let manifest = Manifest {
        format: backup::FORMAT,
        release: caravan_api::RELEASE.into(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        controller: state,
        objects: objects.len(),
    };
    let res = controller
        .send(http.get(controller.url(paths::BACKUP)))
        .await?;
    let data = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
        res.bytes_stream().map_err(std::io::Error::other),
    ));
    let path = out.to_path_buf();
    let (end, manifest) = tokio::task::spawn_blocking(move || {
        write_archive(&path, &manifest, &objects, data).map(|end| (end, manifest))
    })
    .await??;
    eprintln!(
        "backup written to {}: {} objects, {} files of the controller's ({} bytes), trust root {}",
        out.display(),
        manifest.objects,
        end.data_entries,
        end.data_bytes,
        manifest.controller.trust_root_sha256
    );
    Ok(())
}

/// Writes the archive to `path`, whole or not at all.
fn write_archive(
    path: &Path,
    manifest: &Manifest,
    objects: &[Value],
    data: impl Read,
) -> anyhow::Result<End> {
    // Beside it (0600, as tempfile makes it), renamed over it once whole;
    // gone if anything fails.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let append = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        tar.append_data(&mut header, name, bytes)
    };
    append(
        &mut tar,
        backup::MANIFEST,
        &serde_json::to_vec_pretty(manifest)?,
    )?;
    let mut yaml = String::new();
    for object in objects {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml_ng::to_string(object)?);
    }
    append(&mut tar, backup::OBJECTS, yaml.as_bytes())?;
    let mut end = End::default();
    let mut archive = tar::Archive::new(data);
    for entry in archive.entries().context("reading the controller's data")? {
        let entry = entry.context("reading the controller's data")?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        DataEntry::parse(&name).map_err(|e| anyhow::anyhow!("the controller sent {e}"))?;
        let mut header = entry.header().clone();
        end.data_entries += 1;
        end.data_bytes += entry.size();
        tar.append_data(&mut header, format!("{}{name}", backup::DATA), entry)
            .context("reading the controller's data")?;
    }
    append(&mut tar, backup::END, &serde_json::to_vec(&end)?)?;
    let file = tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(end)
}

/// What a restore takes from an archive.
struct Archive {
    manifest: Manifest,
    objects: Vec<Value>,
    /// The fingerprint of the newest root in its data: what the controller
    /// signs under once restored (a root made after the manifest was
    /// written, by a rotation, included).
    trust_root: String,
}

/// Reads the whole archive once: its manifest, objects and newest root,
/// and whether it is whole (every data entry one of a controller's, the
/// end there and agreeing). Nothing is restored from an archive that is not.
fn read_archive(path: &Path) -> anyhow::Result<Archive> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut entries = archive.entries()?;
    let mut next = |what: &str| -> anyhow::Result<_> {
        let entry = entries
            .next()
            .with_context(|| format!("the archive ends before {what}"))??;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        Ok((name, entry))
    };
    let read_small = |entry: &mut dyn Read, max: u64| -> anyhow::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        entry.take(max + 1).read_to_end(&mut bytes)?;
        anyhow::ensure!(bytes.len() as u64 <= max, "more than {max} bytes");
        Ok(bytes)
    };
    let (name, mut entry) = next(backup::MANIFEST)?;
    anyhow::ensure!(
        name == backup::MANIFEST,
        "not a Caravan backup: it starts with {name:?}, not {}",
        backup::MANIFEST
    );
    let manifest: Manifest = serde_json::from_slice(&read_small(&mut entry, MAX_SMALL_ENTRY)?)
        .with_context(|| format!("reading {}", backup::MANIFEST))?;
    anyhow::ensure!(
        manifest.format == backup::FORMAT,
        "a backup of format {}; this caravan reads format {}",
        manifest.format,
        backup::FORMAT
    );
    let (name, mut entry) = next(backup::OBJECTS)?;
    anyhow::ensure!(
        name == backup::OBJECTS,
        "{name:?} where {} should be",
        backup::OBJECTS
    );
    let text = String::from_utf8(read_small(&mut entry, backup::MAX_OBJECTS_BYTES)?)
        .with_context(|| format!("{} is not UTF-8", backup::OBJECTS))?;
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("reading {}", backup::OBJECTS))?;
        anyhow::ensure!(
            rank(&value).is_some(),
            "{} holds an object of no Caravan kind: {}",
            backup::OBJECTS,
            value.get("kind").unwrap_or(&Value::Null)
        );
        objects.push(value);
    }
    anyhow::ensure!(
        objects.len() == manifest.objects,
        "{} holds {} objects; the manifest says {}",
        backup::OBJECTS,
        objects.len(),
        manifest.objects
    );
    let mut seen = End::default();
    let mut newest: Option<(u64, Vec<u8>)> = None;
    loop {
        let (name, mut entry) = next(backup::END)?;
        if name == backup::END {
            let end: End = serde_json::from_slice(&read_small(&mut entry, MAX_SMALL_ENTRY)?)?;
            anyhow::ensure!(
                end == seen,
                "the archive is not whole: its end says {end:?}, it holds {seen:?}"
            );
            let (_, root) = newest.context("the archive holds no trust root")?;
            let root: caravan_api::trust::Envelope =
                serde_json::from_slice(&root).context("its newest trust root does not read")?;
            let trust_root = caravan_api::trust::fingerprint(&root)
                .map_err(|e| anyhow::anyhow!("its newest trust root: {e}"))?;
            return Ok(Archive {
                manifest,
                objects,
                trust_root,
            });
        }
        let data = name
            .strip_prefix(backup::DATA)
            .with_context(|| format!("{name:?} is not an entry of a Caravan backup"))?;
        let kind = DataEntry::parse(data).map_err(anyhow::Error::msg)?;
        seen.data_entries += 1;
        seen.data_bytes += entry.size();
        match kind {
            DataEntry::TrustRoot(v) if newest.as_ref().is_none_or(|(n, _)| v > *n) => {
                newest = Some((v, read_small(&mut entry, backup::MAX_TRUST_FILE_BYTES)?));
            }
            _ => {
                std::io::copy(&mut entry, &mut std::io::sink())
                    .with_context(|| format!("{name:?} is cut short"))?;
            }
        }
    }
}

/// Streams the archive's data entries (their prefix dropped) as a tar to
/// `out`.
fn send_data(path: &Path, mut out: caravan_net::pipe::PipeWriter) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut tar = tar::Builder::new(&mut out);
    for entry in archive.entries()? {
        let entry = entry?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if let Some(data) = name.strip_prefix(backup::DATA) {
            let mut header = entry.header().clone();
            tar.append_data(&mut header, data, entry)?;
        }
    }
    tar.into_inner()?.flush()?;
    out.finish()?;
    Ok(())
}

/// `caravan restore`: see the module's doc. Run again after a failure, it
/// goes on where it stopped: data the controller already has is not sent
/// again, objects already there are left as they are.
pub async fn restore(
    archive: &Path,
    controller: ControllerArgs,
    resume: bool,
) -> anyhow::Result<()> {
    let path = archive.to_path_buf();
    let Archive {
        manifest,
        objects,
        trust_root,
    } = tokio::task::spawn_blocking(move || read_archive(&path))
        .await?
        .with_context(|| format!("{} cannot be restored", archive.display()))?;
    let client = Client::try_default()
        .await
        .context("connecting to the cluster (kubeconfig)")?;
    let backed_up = &manifest.controller;
    let http = controller.http(Some(&backed_up.controller_ca))?;
    let state = controller.state(&http).await?;
    anyhow::ensure!(
        !caravan_api::skew::later_release(&backed_up.release, &state.release),
        "the backup is of a controller of release {}, later than this controller's {}: restore it with release {} or later",
        backed_up.release,
        state.release,
        backed_up.release
    );
    let age = chrono::DateTime::parse_from_rfc3339(&manifest.created)
        .map(|t| {
            humantime::format_duration(std::time::Duration::from_secs(
                (chrono::Utc::now() - t.to_utc()).num_seconds().max(0) as u64,
            ))
            .to_string()
        })
        .unwrap_or_else(|_| "an unknown time".into());
    eprintln!(
        "restoring the backup taken {} ({age} ago): what changed since (enrollments, approvals, revocations, tokens, pushes) is as it was then",
        manifest.created
    );
    if state.awaiting {
        fresh(&client).await?;
        send(&controller, &http, archive).await?;
    } else {
        // A running controller: only to finish a restore of this archive
        // that stopped halfway, and only when asked to.
        anyhow::ensure!(
            resume && state.trust_root_sha256 == trust_root,
            "the controller at {} is running, under root {} (the backup's is {}): a backup is restored into a controller started with --await-restore on an empty data directory (helm: --set restore.await=true); to finish a restore of this archive that stopped halfway, run it again with --resume",
            controller.server,
            state.trust_root_sha256,
            trust_root
        );
        eprintln!("the controller has this backup's data already; creating what is missing of the objects");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match controller.state(&http).await {
            Ok(s) if !s.awaiting && s.trust_root_sha256 == trust_root => break,
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Ok(s) => {
                anyhow::bail!("the controller did not start with the backup's keys: it says {s:?}")
            }
            Err(e) => return Err(e.context("the controller did not come back within 120 s")),
        }
    }
    let created = create_objects(&client, objects).await?;
    eprintln!(
        "restored {created} of the backup's {} objects (the others were there); trust root {trust_root}",
        manifest.objects
    );
    Ok(())
}

/// Refuses a cluster that has Caravan objects already.
async fn fresh(client: &Client) -> anyhow::Result<()> {
    for ar in kinds() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let found = api
            .list(&ListParams::default().limit(1))
            .await
            .with_context(|| format!("listing {}", ar.plural))?;
        if let Some(obj) = found.items.first() {
            anyhow::bail!(
                "the cluster has Caravan objects already ({} {}/{}): a backup is restored into a fresh cluster",
                ar.kind,
                obj.metadata.namespace.as_deref().unwrap_or_default(),
                obj.metadata.name.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Sends the archive's data to the controller, which checks it whole,
/// takes it and starts again.
async fn send(
    controller: &ControllerArgs,
    http: &reqwest::Client,
    archive: &Path,
) -> anyhow::Result<()> {
    let (out, body) = caravan_net::pipe::pipe();
    let path = archive.to_path_buf();
    let sending = tokio::task::spawn_blocking(move || send_data(&path, out));
    let res = controller
        .send(
            http.put(controller.url(paths::RESTORE))
                .body(reqwest::Body::wrap_stream(body)),
        )
        .await;
    // The controller's answer says why first; the sender's error only
    // follows from it (the reader went away).
    let now: RestoreState = res?.json().await?;
    sending.await??;
    eprintln!(
        "controller data restored (trust root {}); waiting for it to start again",
        now.trust_root_sha256
    );
    Ok(())
}

/// Creates the archive's objects (Secrets first, then [`kinds`]' order),
/// each with its status and who owns which of its fields; a Site keeps the
/// UID its relay's credential and its tokens are bound to. One already
/// there is left alone. Returns how many were created.
async fn create_objects(client: &Client, mut objects: Vec<Value>) -> anyhow::Result<usize> {
    objects.sort_by_key(|o| rank(o).map(|(i, _)| i));
    let namespaces: std::collections::BTreeSet<String> = objects
        .iter()
        .filter_map(|o| o.pointer("/metadata/namespace")?.as_str().map(String::from))
        .collect();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces {
        if ns_api.get_opt(&ns).await?.is_none() {
            let namespace = Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            ns_api
                .create(&PostParams::default(), &namespace)
                .await
                .with_context(|| format!("creating namespace {ns}"))?;
        }
    }
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut created = 0;
    for mut value in objects {
        let (_, ar) = rank(&value).expect("checked when read");
        if ar.kind == "Site" {
            let meta: kube::api::ObjectMeta = serde_json::from_value(value["metadata"].clone())?;
            let original = caravan_api::original_uid(&meta).to_string();
            value["metadata"]["annotations"][labels::ORIGINAL_UID] = original.into();
        }
        let status = value.as_object_mut().and_then(|o| o.remove("status"));
        strip(&mut value);
        let obj: DynamicObject = serde_json::from_value(value)?;
        let (ns, name) = (
            obj.metadata.namespace.clone().unwrap_or_default(),
            obj.metadata.name.clone().unwrap_or_default(),
        );
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        match api.create(&post, &obj).await {
            Ok(_) => created += 1,
            // There: left alone, unless an earlier run created it and
            // stopped before its status and owners (then nobody but the
            // restore owns it yet).
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let there = api.get(&name).await?;
                let only_ours = there
                    .metadata
                    .managed_fields
                    .iter()
                    .flatten()
                    .all(|f| f.manager.as_deref() == Some(FIELD_MANAGER));
                if !only_ours {
                    continue;
                }
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("creating {} {ns}/{name}", ar.kind))
                )
            }
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        if let Some(status) = status.filter(|_| ar.kind != "Secret") {
            api.patch_status(
                &name,
                &params,
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await
            .with_context(|| format!("restoring the status of {} {ns}/{name}", ar.kind))?;
        }
        // Last, who owned what (a create takes none of it): the Git sync
        // goes on removing what Git stops saying, the CLI's fields stay the
        // CLI's, the status writers' theirs.
        if let Some(owners) = obj
            .metadata
            .managed_fields
            .as_ref()
            .filter(|m| !m.is_empty())
        {
            let patch = serde_json::json!({ "metadata": { "managedFields": owners } });
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .with_context(|| {
                    format!("restoring the field owners of {} {ns}/{name}", ar.kind)
                })?;
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind added to the CRDs but not here would be left out of every
    /// backup.
    #[test]
    fn every_caravan_kind_is_backed_up() {
        let mut ours: Vec<String> = kinds().iter().map(|ar| ar.kind.clone()).collect();
        let mut crds: Vec<String> = caravan_api::v1alpha1::crds()
            .into_iter()
            .map(|crd| crd.spec.names.kind)
            .collect();
        ours.sort();
        crds.sort();
        assert_eq!(ours, crds);
    }

    #[test]
    fn a_restore_creates_what_is_named_before_what_names_it() {
        let at = |kind: &str| {
            let ar = std::iter::once(ApiResource::erase::<Secret>(&()))
                .chain(kinds())
                .find(|ar| ar.kind == kind)
                .unwrap();
            rank(&serde_json::json!({"apiVersion": ar.api_version, "kind": kind}))
                .unwrap()
                .0
        };
        assert!(at("Secret") < at("Cabinet"));
        assert!(at("Cabinet") < at("Package"));
        assert!(at("Package") < at("DistributionJob"));
        assert!(
            at("Agent") < at("Site"),
            "a relay never sees its site without its agents"
        );
        assert!(at("Site") < at("GitSource"));
        assert_eq!(
            rank(&serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap"})),
            None
        );
    }

    #[test]
    fn what_the_api_server_sets_is_not_restored() {
        let mut v = serde_json::json!({"metadata": {"name": "a", "uid": "u", "resourceVersion": "9", "ownerReferences": [], "labels": {"x": "y"}}, "spec": {}});
        strip(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"metadata": {"name": "a", "labels": {"x": "y"}}, "spec": {}})
        );
    }
}
