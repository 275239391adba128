//! Pushing packages: an upload that breaks off keeps what arrived, and the
//! next `caravan package push` of the same package resumes from there instead
//! of sending everything again; a build is the same bytes every time.

use std::time::Duration;

use futures::StreamExt as _;

use caravan_api::v1alpha1::Package;
use caravan_tests::{wait_for, Caravan};

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_upload_is_resumed_by_the_next_push() -> anyhow::Result<()> {
    let c = Caravan::start("fleet").await?;
    let src = c.dir.join("big");
    std::fs::create_dir_all(&src)?;
    let data = caravan_tests::noise(4_000_000, 2);
    std::fs::write(src.join("data.bin"), &data)?;
    let manifests = c.dir.join("manifests");
    let archive = c.dir.join("big.tar.zst");
    let (src_s, manifests_s, archive_s) = (
        src.display().to_string(),
        manifests.display().to_string(),
        archive.display().to_string(),
    );
    c.cli(&[
        "package",
        "build",
        &src_s,
        "--name",
        "big",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests_s,
        "--out",
        &archive_s,
    ])?;
    let bytes = std::fs::read(&archive)?;
    let manifest = std::fs::read_to_string(manifests.join("big-1.0.0.yaml"))?;
    let digest = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("digest: "))
        .unwrap()
        .to_string();

    // The first upload sends half of the archive, then (once that has
    // arrived) the connection breaks.
    let half = bytes.len() / 2;
    let first = bytes[..half].to_vec();
    let chunks = futures::stream::unfold(0, move |step| {
        let first = first.clone();
        async move {
            match step {
                0 => Some((Ok(first), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Some((Err(std::io::Error::other("cable pulled")), 2))
                }
                _ => None,
            }
        }
    });
    let http = caravan_tests::http();
    let res = http
        .put(format!("{}/v1/blobs/{digest}", c.api_url))
        .bearer_auth(&c.upload_token)
        .header("Content-Length", bytes.len())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    assert!(res.is_err() || !res.unwrap().status().is_success());
    let state_url = format!("{}/v1/uploads/{digest}", c.api_url);
    let kept = wait_for(
        "the store to keep the first half",
        Duration::from_secs(30),
        || async {
            let st: caravan_api::wire::UploadState = http
                .get(&state_url)
                .bearer_auth(&c.upload_token)
                .send()
                .await?
                .json()
                .await?;
            Ok((st.offset > 0).then_some(st.offset))
        },
    )
    .await?;
    assert!(kept as usize <= half && !bytes.is_empty());

    // `push` of the same package builds the same bytes and sends only the rest.
    let out = c.cli(&[
        "package",
        "push",
        &src_s,
        "--name",
        "big",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &manifests_s,
    ])?;
    assert!(
        out.contains(&format!("resuming the upload at byte {kept}")),
        "{out}"
    );
    assert!(
        out.contains(&digest),
        "the same digest as the first build: {out}"
    );
    let uploaded = caravan_tests::metric(&c.api_url, "caravan_store_upload_bytes_total").await?;
    assert_eq!(
        uploaded as usize,
        bytes.len() - kept as usize,
        "only the missing part was sent"
    );
    let stored = std::fs::read(
        c.dir
            .join("controller/blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )?;
    assert_eq!(
        stored, bytes,
        "the resumed blob is the archive, byte for byte"
    );
    Ok(())
}

/// Two controller replicas on one data directory (one ReadWriteMany volume):
/// packages pushed through either, the same build through both at once,
/// Packages created and deleted, and both replicas' collectors running every
/// second with a 10 s grace. No blob is lost or truncated, and what no
/// Package references any more goes.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_the_builtin_store_while_packages_are_pushed_and_collected(
) -> anyhow::Result<()> {
    let c = Caravan::start("fleet").await?;
    let (_replica, replica_url) = c.start_replica().await?;
    let servers = [c.api_url.clone(), replica_url.clone()];
    let manifests = c.dir.join("manifests");
    let source = |name: &str, seed: u64, len: usize| -> anyhow::Result<()> {
        let src = c.dir.join("src").join(name);
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("data.bin"), caravan_tests::noise(len, seed))?;
        Ok(())
    };
    // Pushes a package through `server`, its manifest into `manifests/<to>`.
    let push = |name: &str, server: &str, to: &str| -> anyhow::Result<(Package, String)> {
        let src = c.dir.join("src").join(name).display().to_string();
        let dir = manifests.join(to);
        let dir_s = dir.display().to_string();
        let args = [
            "package",
            "push",
            &src,
            "--name",
            name,
            "--version",
            "1.0.0",
            "--manifest-dir",
            &dir_s,
        ];
        c.cli_with(&args, &[("CARAVAN_SERVER", server)])?;
        let file = dir.join(format!("{name}-1.0.0.yaml"));
        let package = serde_yaml_ng::from_str(&std::fs::read_to_string(&file)?)?;
        Ok((package, file.display().to_string()))
    };
    let kubectl = |verb: &str, file: &str| c.cluster.kubectl(&[verb, "-n", "fleet", "-f", file]);

    let (mut kept, mut dropped) = (vec![], vec![]);

    // Two uploads of one blob overlapping for sure, one through each
    // replica: the first sends half and pauses; the second, starting then,
    // is turned away (409) rather than writing over it, and the blob the
    // first completes is whole.
    source("overlap", 300, 4_000_000)?;
    let (src, dir) = (c.dir.join("src/overlap"), manifests.join("built"));
    let (src, out, dir) = (
        src.display().to_string(),
        c.dir.join("overlap.tar.zst").display().to_string(),
        dir.display().to_string(),
    );
    c.cli(&[
        "package",
        "build",
        &src,
        "--name",
        "overlap",
        "--version",
        "1.0.0",
        "--manifest-dir",
        &dir,
        "--out",
        &out,
    ])?;
    let bytes = std::fs::read(&out)?;
    let file = format!("{dir}/overlap-1.0.0.yaml");
    let overlap: Package = serde_yaml_ng::from_str(&std::fs::read_to_string(&file)?)?;
    let blob = caravan_api::wire::paths::blob(&overlap.spec.artifact.digest);
    let http = caravan_tests::http();
    let url = |server: &str| format!("{server}{blob}");
    let half = bytes.len() / 2;
    let (first, rest) = (bytes[..half].to_vec(), bytes[half..].to_vec());
    let body = futures::stream::iter([(first, Duration::ZERO), (rest, Duration::from_secs(3))])
        .then(|(chunk, pause)| async move {
            tokio::time::sleep(pause).await;
            Ok::<_, std::io::Error>(chunk)
        });
    let first = http
        .put(url(&servers[0]))
        .bearer_auth(&c.upload_token)
        .header("Content-Length", bytes.len())
        .body(reqwest::Body::wrap_stream(body))
        .send();
    // The second upload's first 64 KiB (small enough to be sent whole
    // though the answer comes before the body is read).
    let second = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        http.put(url(&servers[1]))
            .bearer_auth(&c.upload_token)
            .body(bytes[..64 << 10].to_vec())
            .send()
            .await
    };
    let (first, second) = tokio::join!(first, second);
    let second = second?;
    assert_eq!(second.status(), 409, "{}", second.text().await?);
    assert_eq!(first?.status(), 201);
    kubectl("apply", &file)?;
    kept.push((overlap, file));

    for round in 0..3u64 {
        // One build pushed through both replicas at the same moment: one
        // waits for the other (409) and then finds it there.
        let shared = format!("shared{round}");
        source(&shared, 200 + 2 * round, 6_000_000)?;
        let both: Vec<_> = std::thread::scope(|s| {
            let pushes: Vec<_> = servers
                .iter()
                .enumerate()
                .map(|(i, server)| {
                    let (shared, push) = (&shared, &push);
                    s.spawn(move || push(shared, server, &format!("via{i}")))
                })
                .collect();
            pushes.into_iter().map(|p| p.join().unwrap()).collect()
        });
        let mut both = both.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        assert_eq!(both[0].0.spec.artifact, both[1].0.spec.artifact);
        let shared = both.remove(0);
        kubectl("apply", &shared.1)?;
        kept.push(shared);
        for i in 0..4u64 {
            let name = format!("p{round}x{i}");
            source(&name, 1000 + 20 * round + 2 * i, 300_000)?;
            let p = push(&name, &servers[(i % 2) as usize], "via0")?;
            if i % 2 == 0 {
                kubectl("apply", &p.1)?;
                kept.push(p);
            } else {
                dropped.push(p);
            }
        }
        // A Package of the round before is deleted: its blob becomes garbage.
        if round > 0 {
            let victim = kept.remove(0);
            kubectl("delete", &victim.1)?;
            dropped.push(victim);
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let (kept, dropped): (Vec<Package>, Vec<Package>) = (
        kept.into_iter().map(|p| p.0).collect(),
        dropped.into_iter().map(|p| p.0).collect(),
    );

    let fetch = |server: String, digest: caravan_api::Digest| {
        let req = http
            .get(format!(
                "{server}{}",
                caravan_api::wire::paths::blob(&digest)
            ))
            .bearer_auth(&c.upload_token);
        async move { anyhow::Ok(req.send().await?) }
    };
    // The garbage goes, through whichever replica collects it first...
    for p in &dropped {
        let digest = p.spec.artifact.digest;
        wait_for(
            &format!("{} collected", p.spec.name),
            Duration::from_secs(90),
            || async {
                let gone = fetch(servers[0].clone(), digest).await?.status() == 404
                    && fetch(servers[1].clone(), digest).await?.status() == 404;
                Ok(gone.then_some(()))
            },
        )
        .await?;
    }
    // ...while every referenced blob is whole, from either replica.
    for p in &kept {
        for server in &servers {
            let res = fetch(server.clone(), p.spec.artifact.digest).await?;
            anyhow::ensure!(
                res.status().is_success(),
                "{}: {}",
                p.spec.name,
                res.status()
            );
            let body = res.bytes().await?;
            assert_eq!(
                body.len() as u64,
                p.spec.artifact.size,
                "{} truncated",
                p.spec.name
            );
            assert_eq!(
                caravan_api::Digest::of(&body),
                p.spec.artifact.digest,
                "{}",
                p.spec.name
            );
        }
    }
    // The store holds exactly the referenced blobs, each under its own
    // digest, and no upload part or lock file is left.
    let store = c.dir.join("controller/blobs");
    let mut stored: Vec<String> = std::fs::read_dir(store.join("sha256"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    stored.sort();
    let mut expected: Vec<String> = kept.iter().map(|p| p.spec.artifact.digest.hex()).collect();
    expected.sort();
    expected.dedup();
    assert_eq!(stored, expected);
    for hex in &stored {
        let bytes = std::fs::read(store.join("sha256").join(hex))?;
        assert_eq!(caravan_api::Digest::of(&bytes).hex(), *hex);
    }
    assert_eq!(std::fs::read_dir(store.join("uploads"))?.count(), 0);
    Ok(())
}
