//! Drift: files of an installed package changed, deleted or added on the
//! endpoint are noticed on the agent's next pass and shown in its Agent
//! status; once the job asks for repair, the agent puts the package back
//! as installed and the drift clears.

use std::time::Duration;

use caravan_api::{
    v1alpha1::Agent,
    wire::{Drift, DriftChange},
};
use caravan_tests::{wait_for, Caravan};

#[tokio::test(flavor = "multi_thread")]
async fn drifted_files_are_reported_and_repaired_when_the_job_asks() -> anyhow::Result<()> {
    let mut c = Caravan::start("fleet").await?;
    let (repo, _relay) = c.hello_installed("desk").await?;
    let (_, root) = c.agent_dirs("desk");
    let hello = root.join("hello");
    let version = std::fs::read(hello.join("VERSION"))?;
    let (name, _) = (
        c.api::<Agent>().list(&Default::default()).await?.items[0]
            .metadata
            .name
            .clone()
            .unwrap(),
        (),
    );

    // Someone edits, deletes and adds files on the endpoint.
    std::fs::write(hello.join("VERSION"), "9.9.9 (edited by hand)\n")?;
    let deleted = std::fs::read_dir(hello.join("bin"))?
        .next()
        .unwrap()?
        .file_name()
        .to_string_lossy()
        .into_owned();
    let deleted_content = std::fs::read(hello.join("bin").join(&deleted))?;
    std::fs::remove_file(hello.join("bin").join(&deleted))?;
    std::fs::write(hello.join("stray.txt"), "not from the package")?;
    let expected = vec![
        ("VERSION".to_string(), DriftChange::Modified),
        (format!("bin/{deleted}"), DriftChange::Deleted),
        ("stray.txt".to_string(), DriftChange::Added),
    ];
    let drift_of = |d: &[Drift]| -> Vec<(String, DriftChange)> {
        let mut v: Vec<_> = d.iter().map(|d| (d.path.clone(), d.change)).collect();
        v.sort();
        v
    };
    let mut want = expected.clone();
    want.sort();
    let status = || async {
        anyhow::Ok(
            c.api::<Agent>()
                .get(&name)
                .await?
                .status
                .unwrap_or_default(),
        )
    };
    wait_for(
        "the drift in the Agent status",
        Duration::from_secs(60),
        || async {
            let status = status().await?;
            Ok((drift_of(&status.drift) == want && status.drifted_files == 3).then_some(()))
        },
    )
    .await?;
    // Reported, not repaired: the job has not asked.
    assert_eq!(
        std::fs::read_to_string(hello.join("VERSION"))?,
        "9.9.9 (edited by hand)\n"
    );

    // The job asks for repair.
    let job = std::fs::read_to_string(repo.work.join("fleet/job.yaml"))?
        .replace("  action: install\n", "  action: install\n  repair: true\n");
    repo.write("fleet/job.yaml", &job)?;
    repo.commit("hello: repair drift")?;
    wait_for(
        "the package to be repaired and the drift to clear",
        Duration::from_secs(90),
        || async {
            let status = status().await?;
            Ok((status.drift.is_empty() && status.drifted_files == 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(std::fs::read(hello.join("VERSION"))?, version);
    assert_eq!(
        std::fs::read(hello.join("bin").join(&deleted))?,
        deleted_content
    );
    assert!(!hello.join("stray.txt").exists(), "what was added is gone");
    Ok(())
}
