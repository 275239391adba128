//! A cabinet in a real OCI registry (Debian's `docker-registry`, TLS and
//! basic auth on loopback): `caravan package push --registry` pushes the
//! package as an artifact and pins its manifest and layer digests in Git;
//! the controller fetches them with its own credentials, verified, and
//! agents install it through their relay. A wrong credential, a missing
//! repository and a layer replaced in the registry each get a condition
//! that names the problem, and nothing unverified is served. A built-in
//! cabinet moves into a registry with `caravan cabinet copy`.

use std::time::Duration;

use caravan_api::{
    conditions,
    v1alpha1::{Cabinet, Package},
    Digest,
};
use caravan_tests::{registry::Registry, wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

/// The Ready condition of `obj`'s status conditions: (status, message).
fn ready(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> (String, String) {
    conds
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .map(|c| (c.status.clone(), c.message.clone()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn packages_in_an_oci_registry_are_pinned_verified_and_installed() -> anyhow::Result<()> {
    let mut c = Caravan::start("oci").await?;
    let repo = c.seed_example_fleet().await?;
    let registry = Registry::start(&c.dir.join("registry")).await?;
    let ca = std::fs::read_to_string(&registry.ca_file)?;
    let ns = c.namespace.clone();
    // The controller's pull credentials (a Secret, never in Git), a wrong
    // one, and the right one but said to be for another registry.
    for (name, password, host) in [
        (
            "registry-pull",
            registry.password.as_str(),
            registry.host.as_str(),
        ),
        ("registry-wrong", "nope", registry.host.as_str()),
        (
            "registry-other",
            registry.password.as_str(),
            "registry.example.com",
        ),
    ] {
        let secret = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{caravan.dev/registry-credentials: \"true\"}}\n\
             stringData: {{registry: \"{host}\", username: {}, password: {password}}}\n",
            registry.username
        );
        let file = c.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, secret)?;
        c.cluster
            .kubectl(&["apply", "-f", &file.display().to_string()])?;
    }
    let cabinet = |name: &str, repository: &str, secret: &str| {
        let ca = ca
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>();
        format!(
            "apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {{name: {name}}}\nspec:\n  store:\n    type: oci\n    repository: {}\n    credentialsSecret: {secret}\n    caBundle: |\n{ca}",
            registry.repository(repository)
        )
    };
    repo.write(
        "fleet/vault.yaml",
        &cabinet("vault", "caravan/packages", "registry-pull"),
    )?;
    repo.write(
        "fleet/locked.yaml",
        &cabinet("locked", "caravan/locked", "registry-wrong"),
    )?;
    repo.write(
        "fleet/elsewhere.yaml",
        &cabinet("elsewhere", "caravan/missing", "registry-pull"),
    )?;
    repo.write(
        "fleet/borrowed.yaml",
        &cabinet("borrowed", "caravan/borrowed", "registry-other"),
    )?;
    // No package in it yet: its registry is asked all the same.
    repo.write(
        "fleet/idle.yaml",
        &cabinet("idle", "caravan/idle", "registry-wrong"),
    )?;

    let manifests = repo.work.join("fleet/packages");
    let outside = c.dir.join("unpublished");
    let ca_file = registry.ca_file.display().to_string();
    let push = |name: &str, cabinet: &str, repository: &str, dir: &std::path::Path| {
        let src = c.dir.join("src").join(name);
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("README"), format!("{name} from the registry\n"))?;
        c.cli_with(
            &[
                "package",
                "push",
                &src.display().to_string(),
                "--name",
                name,
                "--version",
                "1.0.0",
                "--cabinet",
                cabinet,
                "--manifest-dir",
                &dir.display().to_string(),
                "--registry",
                &registry.repository(repository),
                "--registry-ca-file",
                &ca_file,
                "--registry-username",
                &registry.username,
            ],
            &[("CARAVAN_REGISTRY_PASSWORD", &registry.password)],
        )
    };
    push("tools", "vault", "caravan/packages", &manifests)?;
    push("secret-tools", "locked", "caravan/locked", &manifests)?;
    // Pushed to one repository, declared in a cabinet whose repository
    // does not exist.
    push("lost", "elsewhere", "caravan/packages", &manifests)?;
    push("borrowed", "borrowed", "caravan/borrowed", &manifests)?;
    push("tampered", "vault", "caravan/packages", &outside)?;

    // The manifest pins both digests.
    let tools: Package = serde_yaml_ng::from_str(&std::fs::read_to_string(
        manifests.join("tools-1.0.0.yaml"),
    )?)?;
    let pinned = tools
        .spec
        .artifact
        .manifest
        .expect("the manifest digest is pinned");
    let blob = |d: &Digest| {
        registry
            .root
            .join("docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    };
    // In a repository of its own, tagged with its version.
    assert!(registry
        .root
        .join("docker/registry/v2/repositories/caravan/packages/tools/_manifests/tags/1.0.0")
        .is_dir());
    let stored = std::fs::read(blob(&pinned))?;
    assert_eq!(Digest::of(&stored), pinned);
    let manifest: caravan_net::oci::Manifest = serde_json::from_slice(&stored)?;
    assert_eq!(
        manifest.archive().map_err(anyhow::Error::msg)?.digest,
        tools.spec.artifact.digest
    );

    // A version is published once: the same build again is fine, another
    // one under the same tag is refused.
    push("tools", "vault", "caravan/packages", &outside)?;
    std::fs::write(c.dir.join("src/tools/EXTRA"), "changed")?;
    let again = push("tools", "vault", "caravan/packages", &outside).unwrap_err();
    assert!(
        format!("{again:#}").contains("tag 1.0.0 names another artifact"),
        "{again:#}"
    );

    // Someone moves tag 1.0.0 of tools to another manifest: the pinned one
    // is still what is fetched, and the Package hears of it.
    let tag_mover = caravan_net::oci::Registry::new(
        registry
            .repository("caravan/packages/tools")
            .parse()
            .map_err(anyhow::Error::msg)?,
        caravan_net::client(Some(&registry.ca_file), Duration::from_secs(10))?,
        Some(caravan_net::oci::Credentials::Basic {
            username: registry.username.clone(),
            password: registry.password.clone(),
        }),
    );
    let mut moved = manifest.clone();
    moved
        .annotations
        .insert("moved".into(), "by someone else".into());
    let moved = tag_mover.put_manifest("1.0.0", &moved).await?;
    assert_ne!(moved, pinned);

    // Someone replaces the layer of `tampered` in the registry's storage;
    // then it is published.
    let tampered: Package = serde_yaml_ng::from_str(&std::fs::read_to_string(
        outside.join("tampered-1.0.0.yaml"),
    )?)?;
    let layer = blob(&tampered.spec.artifact.digest);
    let mut bytes = std::fs::read(&layer)?;
    bytes[0] ^= 0xff;
    std::fs::write(&layer, bytes)?;
    std::fs::copy(
        outside.join("tampered-1.0.0.yaml"),
        manifests.join("tampered-1.0.0.yaml"),
    )?;
    repo.write(
        "fleet/tools-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: tools}\n\
         spec:\n  packages: [{name: tools}]\n  destinations: {sites: [{name: hq}]}\n  rollout: {batches: [{size: 100%}]}\n",
    )?;
    repo.commit("Cabinets in the registry; tools for hq")?;

    let relay = c.start_relay("hq").await?;
    c.start_agent("laptop", &relay)?;
    c.wait_job("tools", "Succeeded", "1/1", T).await?;
    assert_eq!(
        std::fs::read_to_string(c.agents[0].install_root.join("tools/README"))?,
        "tools from the registry\n"
    );

    // With the Cabinet in the cluster, `push --cabinet` finds the registry
    // (and the CA to trust) there: only the pusher's own credentials are given.
    let src = c.dir.join("src/extras");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("README"), "extras\n")?;
    let (src_s, outside_s) = (src.display().to_string(), outside.display().to_string());
    let push_extras = |extra: &[&str]| {
        let mut args = vec![
            "package",
            "push",
            &src_s,
            "--name",
            "extras",
            "--version",
            "2.0.0",
            "--cabinet",
            "vault",
            "-n",
            &ns,
            "--manifest-dir",
            &outside_s,
            "--registry-username",
            &registry.username,
        ];
        args.extend(extra);
        c.cli_with(&args, &[("CARAVAN_REGISTRY_PASSWORD", &registry.password)])
    };
    // The credentials go only to the registry they are bound to.
    let refused = push_extras(&[]).unwrap_err().to_string();
    assert!(
        refused.contains(&format!("give --registry-host {}", registry.host)),
        "{refused}"
    );
    let out = push_extras(&["--registry-host", &registry.host])?;
    assert!(
        out.contains("cabinet vault is in registry repository"),
        "{out}"
    );
    let extras: Package =
        serde_yaml_ng::from_str(&std::fs::read_to_string(outside.join("extras-2.0.0.yaml"))?)?;
    let manifest = extras.spec.artifact.manifest.expect("pinned");
    assert_eq!(
        std::fs::read_to_string(registry.root.join(
            "docker/registry/v2/repositories/caravan/packages/extras/_manifests/tags/2.0.0/current/link"
        ))?,
        manifest.to_string()
    );

    let events = c.cluster.kubectl(&[
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "reason=TagMoved",
        "-o",
        "jsonpath={.items[*].message}",
    ])?;
    assert!(
        events.contains(&format!("tag 1.0.0 of https://{}/caravan/packages/tools names {moved}, not the pinned manifest {pinned}", registry.host)),
        "{events}"
    );
    let cabinets = c.api::<Cabinet>();
    let condition_of = |name: &'static str| {
        let cabinets = cabinets.clone();
        async move {
            let cab = cabinets.get(name).await?;
            Ok::<_, anyhow::Error>(ready(&cab.status.unwrap_or_default().conditions))
        }
    };
    // Wrong credentials, a repository that is not there: said so.
    let (status, message) = wait_for("cabinet locked to say why", T, || async {
        let r = condition_of("locked").await?;
        Ok((r.0 == "False").then_some(r))
    })
    .await?;
    assert_eq!(status, "False");
    assert!(
        message.contains("the registry refused the credentials (401 Unauthorized)"),
        "{message}"
    );
    let (_, message) = wait_for("cabinet idle to say why", T, || async {
        let r = condition_of("idle").await?;
        Ok((r.0 == "False").then_some(r))
    })
    .await?;
    assert!(
        message.contains("0 of 0 artifacts")
            && message.contains("the registry refused the credentials (401 Unauthorized)"),
        "{message}"
    );
    let (_, message) = wait_for("cabinet elsewhere to say why", T, || async {
        let r = condition_of("elsewhere").await?;
        Ok((r.0 == "False").then_some(r))
    })
    .await?;
    assert!(
        message.contains("caravan/missing/lost") && message.contains("not found (404 Not Found)"),
        "{message}"
    );
    let (_, message) = wait_for("cabinet borrowed to say why", T, || async {
        let r = condition_of("borrowed").await?;
        Ok((r.0 == "False").then_some(r))
    })
    .await?;
    assert!(
        message.contains("holds credentials for registry registry.example.com, not 127.0.0.1:"),
        "{message}"
    );
    // The replaced layer never enters the store.
    let packages = c.api::<Package>();
    let (_, message) = wait_for("the tampered package to be refused", T, || async {
        let p = packages.get("tampered-1.0.0").await?;
        let r = ready(&p.status.unwrap_or_default().conditions);
        Ok((r.0 == "False" && r.1.contains("digest")).then_some(r))
    })
    .await?;
    assert!(message.contains("digest mismatch"), "{message}");
    let vault = condition_of("vault").await?;
    assert_eq!(vault.0, "False", "{vault:?}");
    assert!(
        vault.1.contains("1 of 2 artifacts fetched and verified"),
        "{vault:?}"
    );
    Ok(())
}

/// Every file named `name` below `dir`.
fn find(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(find(&path, name));
        } else if entry.file_name() == name {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builtin_cabinet_moves_into_a_registry_keeping_every_digest() -> anyhow::Result<()> {
    let mut c = Caravan::start("oci-copy").await?;
    let repo = c.seed_example_fleet().await?;
    let registry = Registry::start(&c.dir.join("registry")).await?;
    let relay = c.start_relay("hq").await?;
    c.start_agent("first", &relay)?;
    c.wait_job("hello-everywhere", "Succeeded", "1/1", T)
        .await?;
    let manifests = repo.work.join("fleet/packages");
    let before: Package = serde_yaml_ng::from_str(&std::fs::read_to_string(
        manifests.join("hello-1.0.0.yaml"),
    )?)?;

    // Copied from the controller's store into the registry; the manifest
    // gains the pin and keeps its digest.
    let ca_file = registry.ca_file.display().to_string();
    let out = c.cli_with(
        &[
            "cabinet",
            "copy",
            "main",
            "--manifest-dir",
            &manifests.display().to_string(),
            "--registry",
            &registry.repository("caravan/main"),
            "--registry-ca-file",
            &ca_file,
            "--registry-username",
            &registry.username,
        ],
        &[("CARAVAN_REGISTRY_PASSWORD", &registry.password)],
    )?;
    assert!(out.contains("1 package(s) of cabinet main copied"), "{out}");
    let after: Package = serde_yaml_ng::from_str(&std::fs::read_to_string(
        manifests.join("hello-1.0.0.yaml"),
    )?)?;
    assert_eq!(after.spec.artifact.digest, before.spec.artifact.digest);
    assert_eq!(after.spec.signatures, before.spec.signatures);
    let pinned = after.spec.artifact.manifest.expect("pinned");
    let layer = find(&registry.root, "data")
        .into_iter()
        .find(|p| {
            p.parent()
                .is_some_and(|d| d.ends_with(before.spec.artifact.digest.hex()))
        })
        .expect("the layer is in the registry");
    assert_eq!(
        Digest::of(&std::fs::read(layer)?),
        before.spec.artifact.digest
    );
    let manifest = find(&registry.root, "data")
        .into_iter()
        .find(|p| p.parent().is_some_and(|d| d.ends_with(pinned.hex())))
        .expect("the pinned manifest is in the registry");
    assert_eq!(Digest::of(&std::fs::read(manifest)?), pinned);

    // The Cabinet becomes an oci one; the controller's copy goes; a new
    // agent still installs hello, now fetched from the registry.
    let ns = c.namespace.clone();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: pull\n  namespace: {ns}\n  labels: {{caravan.dev/registry-credentials: \"true\"}}\n\
         stringData: {{registry: \"{}\", username: {}, password: {}}}\n",
        registry.host, registry.username, registry.password
    );
    let file = c.dir.join("pull.yaml");
    std::fs::write(&file, secret)?;
    c.cluster
        .kubectl(&["apply", "-f", &file.display().to_string()])?;
    let ca = std::fs::read_to_string(&registry.ca_file)?
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect::<String>();
    repo.write(
        "fleet/cabinet.yaml",
        &format!(
            "apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {{name: main}}\nspec:\n  store:\n    type: oci\n    repository: {}\n    credentialsSecret: pull\n    caBundle: |\n{ca}",
            registry.repository("caravan/main")
        ),
    )?;
    repo.commit("Cabinet main lives in the registry now")?;
    let cabinets = c.api::<Cabinet>();
    wait_for("cabinet main to be an oci one", T, || async {
        let cab = cabinets.get("main").await?;
        let (status, message) = ready(&cab.status.unwrap_or_default().conditions);
        Ok((status == "True" && message.starts_with("oci store")).then_some(()))
    })
    .await?;
    let stored = find(&c.dir, &before.spec.artifact.digest.hex())
        .into_iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("blobs/sha256")))
        .collect::<Vec<_>>();
    assert_eq!(stored.len(), 1, "{stored:?}");
    std::fs::remove_file(&stored[0])?;
    c.start_agent("second", &relay)?;
    c.wait_job("hello-everywhere", "Succeeded", "2/2", T)
        .await?;
    assert!(stored[0].exists(), "fetched again, from the registry");
    // The Package's status is written after the fetch, maybe after the install.
    let packages = c.api::<Package>();
    let fetched = format!(
        "artifact fetched from {}/hello@{}",
        registry.repository("caravan/main"),
        before.spec.artifact.digest
    );
    wait_for("hello's status to say where it came from", T, || async {
        let p = packages.get("hello-1.0.0").await?;
        let (_, message) = ready(&p.status.unwrap_or_default().conditions);
        Ok(message.starts_with(&fetched).then_some(()))
    })
    .await?;
    Ok(())
}

/// A cabinet whose layers relays fetch: the controller checks the pinned
/// manifest only and never holds the layer; the relays of two top-level
/// sites each fetch it from the registry once, signed in with their own
/// `--registry-auth-file`, and their agents install it.
#[tokio::test(flavor = "multi_thread")]
async fn relays_fetch_the_layers_from_the_registry_once_per_site() -> anyhow::Result<()> {
    let mut c = Caravan::start("oci").await?;
    let repo = c.seed_example_fleet().await?;
    let registry = Registry::start(&c.dir.join("registry")).await?;
    let cabinet = registry.connect(&mut c, "direct", "caravan/direct", "Relays")?;
    repo.write("fleet/direct.yaml", &cabinet)?;
    repo.write(
        "fleet/branch.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: Site\nmetadata: {name: branch}\nspec:\n  relay: {replicas: 1}\n",
    )?;
    repo.write(
        "fleet/tools-job.yaml",
        "apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {name: tools}\n\
         spec:\n  packages: [{name: tools}]\n  destinations: {sites: [{name: hq}, {name: branch}]}\n  rollout: {batches: [{size: 100%}]}\n",
    )?;
    let src = c.dir.join("src/tools");
    std::fs::create_dir_all(&src)?;
    caravan_tests::write_noise(&src.join("tool.bin"), 3_000_000)?;
    let ca_file = registry.ca_file.display().to_string();
    c.cli_with(
        &[
            "package",
            "push",
            &src.display().to_string(),
            "--name",
            "tools",
            "--version",
            "1.0.0",
            "--cabinet",
            "direct",
            "--manifest-dir",
            &repo.work.join("fleet/packages").display().to_string(),
            "--registry",
            &registry.repository("caravan/direct"),
            "--registry-ca-file",
            &ca_file,
            "--registry-username",
            &registry.username,
        ],
        &[("CARAVAN_REGISTRY_PASSWORD", &registry.password)],
    )?;
    repo.commit("tools in a registry whose layers relays fetch, for hq and branch")?;

    for site in ["hq", "branch"] {
        let relay = c.start_relay(site).await?;
        c.start_agent(&format!("{site}-desk"), &relay)?;
    }
    c.wait_job("tools", "Succeeded", "2/2", T).await?;
    let tools = c.api::<Package>().get("tools-1.0.0").await?;
    let (status, message) = ready(&tools.status.unwrap_or_default().conditions);
    assert_eq!(status, "True");
    assert!(message.contains("relays fetch it from there"), "{message}");
    let digest = tools.spec.artifact.digest;
    for agent in &c.agents {
        let installed = std::fs::read(agent.install_root.join("tools/tool.bin"))?;
        assert_eq!(installed.len(), 3_000_000, "{}", agent.name);
    }
    // The layer never went through the controller...
    assert!(!c
        .dir
        .join("controller/blobs/sha256")
        .join(digest.hex())
        .exists());
    // ...and crossed from the registry once per site.
    let layer_gets = registry.requests(&["GET", &format!("blobs/{digest}")])?;
    assert_eq!(layer_gets, 2, "one fetch per site");
    Ok(())
}
