//! Pushing packages: an upload that breaks off keeps what arrived, and the
//! next `caravan package push` of the same package resumes from there instead
//! of sending everything again; a build is the same bytes every time.

use std::time::Duration;

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
