//! Signed packages: a cabinet that requires signatures, a package signed
//! with `caravan package push --sign-key`, one pushed unsigned, and one whose
//! manifest was re-versioned after signing. The agent checks signatures
//! against its own keys and refuses the last two with the reason.

use std::time::Duration;

use caravan_api::{
    conditions,
    v1alpha1::{GitSource, Package},
};
use caravan_tests::{wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn only_packages_signed_by_a_key_the_agent_trusts_are_installed() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    let keys = c.dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    let out = c.cli(&[
        "key",
        "generate",
        "--out",
        &keys.join("release").display().to_string(),
    ])?;
    assert!(out.contains("key ID"), "{out}");
    let public = std::fs::read_to_string(keys.join("release.pub"))?;
    let private = keys.join("release.key").display().to_string();

    repo.write(
        "fleet/secure-cabinet.yaml",
        &format!(
            "apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {{name: secure}}\nspec:\n  requireSignatures: true\n  trustedKeys:\n  - name: release\n    publicKey: {}\n",
            public.trim()
        ),
    )?;
    let src = c.dir.join("app");
    std::fs::create_dir_all(&src)?;
    let manifests = repo.work.join("fleet/packages").display().to_string();
    let push = |name: &str, version: &str, sign: bool| -> anyhow::Result<String> {
        std::fs::write(src.join("payload"), format!("{name} {version}"))?;
        let src = src.display().to_string();
        let mut args = vec![
            "package",
            "push",
            &src,
            "--name",
            name,
            "--version",
            version,
            "--cabinet",
            "secure",
            "--manifest-dir",
            &manifests,
        ];
        if sign {
            args.extend(["--sign-key", &private]);
        }
        c.cli(&args)
    };
    push("signed-app", "1.0.0", true)?;
    push("unsigned-app", "1.0.0", false)?;
    // Signed as 1.0.0, then the manifest edited to claim 2.0.0.
    push("reversioned-app", "1.0.0", true)?;
    let path = repo.work.join("fleet/packages/reversioned-app-1.0.0.yaml");
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        text.replace("version: 1.0.0", "version: 2.0.0")
            .replace("name: reversioned-app-1.0.0", "name: reversioned-app-2.0.0"),
    )?;
    for app in ["signed-app", "unsigned-app", "reversioned-app"] {
        repo.write(
            &format!("fleet/{app}-job.yaml"),
            &format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: {app}}}\nspec:\n  packages: [{{name: {app}}}]\n  destinations: {{sites: [{{name: hq}}]}}\n"),
        )?;
    }
    repo.commit("A signed cabinet and three packages")?;

    // The controller checks signatures against the cabinet's keys too.
    let signed_condition = |name: &'static str| {
        let api = c.api::<Package>();
        async move {
            let p = api.get_opt(name).await?;
            Ok(p.and_then(|p| p.status).and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == conditions::SIGNED)
            }))
        }
    };
    let ok = wait_for("signed-app's signature check", T, || {
        signed_condition("signed-app-1.0.0")
    })
    .await?;
    assert_eq!(ok.status, "True", "{}", ok.message);
    let bad = wait_for("unsigned-app's signature check", T, || {
        signed_condition("unsigned-app-1.0.0")
    })
    .await?;
    assert_eq!(bad.status, "False");

    let relay = c.start_relay("hq").await?;
    c.agent_args = vec![
        "--trusted-key".into(),
        keys.join("release.pub").display().to_string(),
    ];
    c.start_agent("agent-1", &relay)?;
    c.wait_job("signed-app", "Succeeded", "1/1", T).await?;
    assert!(c.agents[0].install_root.join("signed-app/payload").exists());
    // The agent trusts a key, so even the unsigned example package is refused.
    for (job, package, why) in [
        (
            "unsigned-app",
            "unsigned-app",
            "not signed by any trusted key",
        ),
        ("reversioned-app", "reversioned-app", "does not match"),
        ("hello-everywhere", "hello", "not signed"),
    ] {
        let j = c.wait_job(job, "Failed", "0/1", T).await?;
        let reason = &j.status.unwrap().failures[0].reason;
        assert!(reason.contains(why), "{job}: {reason}");
        assert!(
            !c.agents[0].install_root.join(package).exists(),
            "{package} was not installed"
        );
    }

    // A package cannot move to another cabinet, nor a version change its
    // content: the whole revision is refused, naming the file.
    let file = "fleet/packages/signed-app-1.0.0.yaml";
    let original = std::fs::read_to_string(repo.work.join(file))?;
    let refused = |commit: String| {
        let sources = c.api::<GitSource>();
        async move {
            wait_for(&format!("revision {commit} to be refused"), T, || async {
                let st = sources.get("fleet").await?.status.unwrap_or_default();
                if st.last_attempted_revision.as_ref() != Some(&commit) {
                    return Ok(None);
                }
                Ok(st.errors.into_iter().find(|e| e.file == file))
            })
            .await
        }
    };
    repo.write(file, &original.replace("cabinet: secure", "cabinet: main"))?;
    let e = refused(repo.commit("Move signed-app to the main cabinet")?).await?;
    assert!(
        e.message
            .contains("cannot move from cabinet secure to cabinet main"),
        "{}",
        e.message
    );
    let digest = c
        .api::<Package>()
        .get("signed-app-1.0.0")
        .await?
        .spec
        .artifact
        .digest;
    repo.write(
        file,
        &original.replace(&digest.to_string(), &format!("sha256:{}", "e".repeat(64))),
    )?;
    let e = refused(repo.commit("Change what signed-app 1.0.0 is")?).await?;
    assert!(e.message.contains("published already"), "{}", e.message);
    let pkg = c.api::<Package>().get("signed-app-1.0.0").await?;
    assert_eq!(
        (pkg.spec.cabinet.as_str(), pkg.spec.artifact.digest),
        ("secure", digest),
        "nothing applied"
    );
    Ok(())
}
