//! Identity across an OS reinstall: back up a stopped agent, wipe its state
//! directory, restore, and it is the same Agent in the cluster (no second
//! one, no new enrollment) and keeps what is still installed. Backup and
//! restore refuse to run under a running agent.

use std::{os::unix::fs::MetadataExt, path::Path, time::Duration};

use caravan_api::v1alpha1::Agent;
use caravan_tests::{bin, wait_for, Caravan};

const T: Duration = Duration::from_secs(120);

fn agent_cli(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(std::process::Command::new(bin("caravan-agent")?)
        .args(args)
        .output()?)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_agent_is_the_same_agent_and_keeps_what_is_installed() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (_, relay) = c.hello_installed("laptop").await?;
    let (state, root) = c.agent_dirs("laptop");
    let (state_arg, backup) = (
        state.display().to_string(),
        c.dir.join("laptop.backup").display().to_string(),
    );
    let hello_dir =
        |root: &Path| -> anyhow::Result<u64> { Ok(std::fs::metadata(root.join("hello"))?.ino()) };
    let installed_at = hello_dir(&root)?;
    let agents = c.api::<Agent>().list(&Default::default()).await?.items;
    assert_eq!(agents.len(), 1);
    let name = agents[0].metadata.name.clone().unwrap();

    // Not while the agent runs.
    for args in [
        vec!["backup", "--state-dir", &state_arg, "--out", &backup],
        vec!["restore", "--state-dir", &state_arg, "--from", &backup],
    ] {
        let out = agent_cli(&args)?;
        assert!(!out.status.success(), "{args:?} ran under a running agent");
        assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));
    }

    // Stopped: back up, then the OS is reinstalled (the state directory goes,
    // the install root survives on its own disk).
    c.agents[0].proc.kill();
    let out = agent_cli(&["backup", "--state-dir", &state_arg, "--out", &backup])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(&backup)?.mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds secrets");
    std::fs::remove_dir_all(&state)?;

    let out = agent_cli(&["restore", "--state-dir", &state_arg, "--from", &backup])?;
    assert!(out.status.success(), "{}", stderr(&out));
    // A backup of another host does not silently replace this one.
    let other = c.dir.join("other.backup");
    let text = std::fs::read_to_string(&backup)?.replace(
        &std::fs::read_to_string(state.join("host-id"))?,
        "0123456789abcdef0123456789abcdef",
    );
    std::fs::write(&other, text)?;
    let out = agent_cli(&[
        "restore",
        "--state-dir",
        &state_arg,
        "--from",
        &other.display().to_string(),
    ])?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));

    // Started again, without a bootstrap token: it needs none.
    let last_seen = || async {
        anyhow::Ok(
            c.api::<Agent>()
                .get(&name)
                .await?
                .status
                .and_then(|s| s.last_seen),
        )
    };
    let seen_before = last_seen().await?;
    // Reports are stamped to the second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let no_token = caravan_tests::RelayInfo {
        bootstrap_token: String::new(),
        ..relay.clone()
    };
    let _agent = c.spawn_agent("laptop", &no_token, &state, &root)?;
    wait_for(
        "the restored agent to report",
        Duration::from_secs(60),
        || async {
            let seen = last_seen().await?;
            Ok((seen.is_some() && seen != seen_before).then_some(()))
        },
    )
    .await?;
    let agents = c.api::<Agent>().list(&Default::default()).await?.items;
    assert_eq!(agents.len(), 1, "still one Agent: {agents:?}");
    assert_eq!(agents[0].metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(
        hello_dir(&root)?,
        installed_at,
        "hello was not installed again"
    );
    // The file records came back too: drift is still noticed.
    std::fs::write(root.join("hello/VERSION"), "edited after the reinstall")?;
    wait_for(
        "drift after the restore",
        Duration::from_secs(60),
        || async {
            let status = c
                .api::<Agent>()
                .get(&name)
                .await?
                .status
                .unwrap_or_default();
            Ok(status
                .drift
                .iter()
                .any(|d| d.path == "VERSION")
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

async fn agents(c: &Caravan) -> anyhow::Result<Vec<Agent>> {
    Ok(c.api::<Agent>().list(&Default::default()).await?.items)
}

/// A machine whose disk is wiped and OS reinstalled, with its host ID from
/// its hardware (`--host-id-from`, here a file standing in for
/// `/sys/class/dmi/id/product_uuid`): no backup, so its secret and key are
/// gone. It asks to take its Agent over, and gets it, with its software,
/// once approved; until then it is not served and no second Agent appears.
#[tokio::test(flavor = "multi_thread")]
async fn a_reimaged_machine_with_a_hardware_host_id_takes_its_agent_back_once_approved(
) -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let uuid = c.dir.join("product_uuid");
    std::fs::write(&uuid, "4C4C4544-0035-3010-8052-B4C04F564433\n")?;
    c.agent_args = vec!["--host-id-from".into(), uuid.display().to_string()];
    let (_, relay) = c.hello_installed("laptop").await?;
    let (state, root) = c.agent_dirs("laptop");
    let before = c.agent_of("laptop").await?;
    let name = before.metadata.name.clone().unwrap();
    let host_id = std::fs::read_to_string(state.join("host-id"))?;
    assert_eq!(before.spec.host_id, host_id);

    // Reimaged: the whole disk, state and software, is gone.
    c.agents[0].proc.kill();
    c.agents.clear();
    std::fs::remove_dir_all(&state)?;
    std::fs::remove_dir_all(&root)?;
    c.start_agent("laptop", &relay)?;
    let asked = wait_for("the machine to ask for its Agent", T, || async {
        Ok(c.api::<Agent>().get(&name).await?.spec.replacement)
    })
    .await?;
    assert_eq!(asked.hostname, "laptop");
    assert_eq!(
        std::fs::read_to_string(state.join("host-id"))?,
        host_id,
        "the same host ID, from the machine, not from its old disk"
    );
    let note = c
        .wait_warning(&name, "ReplacementRequested", "caravan agent approve")
        .await?;
    assert!(note.contains(&host_id), "{note}");
    let all = agents(&c).await?;
    assert_eq!(all.len(), 1, "no second Agent");
    assert_eq!(all[0].spec.public_key, before.spec.public_key, "not yet");
    assert!(!root.join("hello").exists(), "not served before approval");
    let log = std::fs::read_to_string(c.dir.join("logs/agent-laptop.log"))?;
    assert!(log.contains("takes it over once approved"), "{log}");

    // The administrator checks the key the request names against the one
    // the machine itself logs (a relay passed the request on): a wrong one
    // is refused, a plain approve is refused (it must say which machine),
    // and approving the current machine does not hand the Agent over.
    let key_hex = std::fs::read_to_string(state.join("agent-key"))?;
    let key: [u8; 32] = hex::decode(key_hex.trim())?
        .try_into()
        .map_err(|_| anyhow::anyhow!("agent-key is 32 bytes"))?;
    let key_id =
        caravan_api::signing::key_id(&ed25519_dalek::SigningKey::from_bytes(&key).verifying_key());
    assert!(log.contains(&format!("key={key_id}")), "{log}");
    assert!(note.contains(&key_id), "{note}");
    let approve = |extra: &[&str]| {
        let mut args = vec!["agent", "approve", &name, "-n", &c.namespace];
        args.extend(extra);
        c.cli(&args)
    };
    let wrong = approve(&["--replacement", "0000000000000000"]);
    assert!(format!("{:#}", wrong.unwrap_err()).contains(&format!("has key {key_id}")));
    let plain = format!("{:#}", approve(&[]).unwrap_err());
    assert!(
        plain.contains(&format!("--replacement {key_id}")),
        "{plain}"
    );
    approve(&["--keep-current"])?;
    let kept = c.api::<Agent>().get(&name).await?;
    assert_eq!(
        kept.spec.public_key, before.spec.public_key,
        "not handed over"
    );
    // Approved with it: the same Agent, with the new machine's key, and
    // its software back.
    approve(&["--replacement", &key_id])?;
    wait_for("hello to be installed again", T, || async {
        Ok(root.join("hello").exists().then_some(()))
    })
    .await?;
    let after = c.api::<Agent>().get(&name).await?;
    assert_eq!(after.spec.replacement, None);
    assert_eq!(after.spec.public_key, asked.public_key);
    assert_eq!(after.metadata.uid, before.metadata.uid, "the same object");
    wait_for("its reports to count again", T, || async {
        let a = c.api::<Agent>().get(&name).await?;
        Ok((a.status.unwrap_or_default().installed_count == 1).then_some(()))
    })
    .await?;
    assert_eq!(agents(&c).await?.len(), 1);
    Ok(())
}

/// The whole control plane lost — API server, etcd, the controller and its
/// data directory — and rebuilt from `caravan backup`: the same Agents
/// carry on (same objects and keys, nothing enrolled or installed again),
/// the relay reconnects with the credential it has, a bootstrap token made
/// before still enrolls, and a change committed after the restore reaches
/// every agent, signed under the root they pinned.
#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_is_rebuilt_from_a_backup_and_the_fleet_carries_on() -> anyhow::Result<()>
{
    use caravan_api::v1alpha1::{BootstrapToken, DistributionJob};
    let mut c = Caravan::start("fleet").await?;
    let repo = c.seed_example_fleet().await?;
    ship_counted(&c, &repo, "1.0.0")?;
    let relay = c.start_relay("hq").await?;
    const AGENTS: [&str; 2] = ["a1", "a2"];
    for name in AGENTS {
        c.start_agent(name, &relay)?;
    }
    c.wait_job("counted", "Succeeded", "2/2", T).await?;
    let before = agents(&c).await?;
    let keys = |agents: &[Agent]| {
        let mut k: Vec<(String, String)> = agents
            .iter()
            .map(|a| (a.metadata.name.clone().unwrap(), a.spec.public_key.clone()))
            .collect();
        k.sort();
        k
    };
    let site_uid = c.site("hq").await?.metadata.uid.unwrap();
    // Who owns which field of the job (the Git sync, the status writer).
    let owners = |job: DistributionJob| {
        let mut m: Vec<String> = job
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.manager)
            .collect();
        m.sort();
        m.dedup();
        m
    };
    let owners_before = owners(c.api::<DistributionJob>().get("counted").await?);

    // Taken while everything runs.
    let archive = c.dir.join("caravan.backup").display().to_string();
    c.cli(&["backup", "-o", &archive])?;
    assert_eq!(
        std::fs::metadata(&archive)?.mode() & 0o777,
        0o600,
        "it holds the controller's keys"
    );

    // Everything of the control plane is lost; relays and agents run on.
    let enrolled_before: Vec<usize> = AGENTS.iter().map(|a| enrollments(&c, a)).collect();
    c.rebuild_control_plane().await?;
    let refused = c
        .cli(&["backup", "-o", &format!("{archive}.2")])
        .unwrap_err();
    assert!(
        refused.to_string().contains("awaits a restore"),
        "{refused:#}"
    );
    // A cut archive is refused before anything is touched.
    let cut = c.dir.join("cut.backup");
    let bytes = std::fs::read(&archive)?;
    std::fs::write(&cut, &bytes[..bytes.len() - 2048])?;
    let refused = c.cli(&["restore", &cut.display().to_string()]).unwrap_err();
    assert!(
        refused.to_string().contains("cannot be restored"),
        "{refused:#}"
    );

    c.cli(&["restore", &archive])?;
    c.restored()?;
    // Against a running controller, refused; finishing one that stopped
    // halfway (--resume): nothing is sent or made twice.
    let refused = c.cli(&["restore", &archive]).unwrap_err();
    assert!(refused.to_string().contains("--resume"), "{refused:#}");
    let again = c.cli_output(&["restore", "--resume", &archive])?;
    assert!(again.contains("restored 0 of the backup's"), "{again}");
    assert!(
        c.controller.running(),
        "started again in place: {}",
        c.controller.log_tail(20)
    );

    let site = c.site("hq").await?;
    assert_ne!(
        site.metadata.uid.as_deref(),
        Some(site_uid.as_str()),
        "a new object"
    );
    assert_eq!(
        caravan_api::original_uid(&site.metadata),
        site_uid,
        "bound to what it was"
    );
    assert_eq!(
        keys(&agents(&c).await?),
        keys(&before),
        "the same Agents, same keys"
    );
    assert_eq!(
        owners(c.api::<DistributionJob>().get("counted").await?),
        owners_before,
        "the same field owners: the Git sync goes on removing what Git no longer says"
    );
    assert_eq!(
        c.api::<BootstrapToken>()
            .list(&Default::default())
            .await?
            .items
            .len(),
        1
    );

    // What Git says next reaches them, through the restored blob store and
    // signed under the root they pinned, and they report it; a token made
    // before the loss still enrolls a new machine.
    ship_counted(&c, &repo, "2.0.0")?;
    c.start_agent("a3", &relay)?;
    c.wait_job("counted", "Succeeded", "3/3", T).await?;
    for (name, before) in AGENTS.iter().zip(&enrolled_before) {
        assert_eq!(
            runs(&c, name),
            ["1.0.0", "2.0.0"],
            "{name}: 1.0.0 not installed again"
        );
        assert_eq!(
            enrollments(&c, name),
            *before,
            "{name}: nothing enrolled again"
        );
    }
    assert_eq!(runs(&c, "a3"), ["2.0.0"]);
    assert_eq!(agents(&c).await?.len(), 3);
    Ok(())
}

/// Pushes `counted` `version` (its install script adds a line with its
/// version to a file beside the install root) and commits a job for hq.
fn ship_counted(
    c: &Caravan,
    repo: &caravan_tests::git::GitRepo,
    version: &str,
) -> anyhow::Result<()> {
    let src = c.dir.join("src/counted");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("install.sh"),
        "#!/bin/sh\necho \"$CARAVAN_PACKAGE_VERSION\" >> \"$CARAVAN_INSTALL_ROOT/../counted-runs\"\n",
    )?;
    // Another version, other bytes.
    std::fs::write(src.join("VERSION"), version)?;
    c.push_package_with(
        &src,
        "counted",
        version,
        &repo.work.join("fleet/packages"),
        &["--install", "script"],
    )?;
    repo.write(
        "fleet/counted-job.yaml",
        &format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: counted}}\n\
         spec:\n  packages: [{{name: counted, version: \"{version}\"}}]\n  destinations: {{sites: [{{name: hq}}]}}\n"),
    )?;
    repo.commit(&format!("counted {version} for hq"))?;
    Ok(())
}

/// The versions of `counted` agent `name` ran the install of, in order.
fn runs(c: &Caravan, name: &str) -> Vec<String> {
    std::fs::read_to_string(c.agent_dirs(name).1.with_file_name("counted-runs"))
        .map(|s| s.lines().map(String::from).collect())
        .unwrap_or_default()
}

/// How many times agent `name` has enrolled, by its log.
fn enrollments(c: &Caravan, name: &str) -> usize {
    std::fs::read_to_string(c.dir.join(format!("logs/agent-{name}.log")))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" enrolled"))
        .count()
}
