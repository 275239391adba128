//! Logs for collectors: with `--log-json` (or `CARAVAN_LOG_JSON`), the
//! agent and the relay write one JSON object per event on stderr.

use std::io::BufRead as _;

use caravan_tests::bin;

/// The first line `program` writes on stderr with `args`, as JSON.
fn first_log_line(program: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut child = std::process::Command::new(bin(program)?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let read = std::io::BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read?;
    serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{program}: {e}: {line:?}"))
}

#[test]
fn the_agent_and_the_relay_log_json_lines_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = |p: &str| dir.path().join(p).display().to_string();
    // Nothing listens on port 1: the agent says why it cannot enroll.
    let (state, root) = (path("state"), path("root"));
    let agent = first_log_line(
        "caravan-agent",
        &[
            "--log-json",
            "run",
            "--server",
            "https://127.0.0.1:1",
            "--state-dir",
            &state,
            "--install-root",
            &root,
            "--bootstrap-token",
            "abc.def",
        ],
    )?;
    assert_eq!(agent["level"], "WARN", "{agent}");
    assert_eq!(agent["fields"]["message"], "enrollment failed", "{agent}");
    assert!(agent["timestamp"].is_string(), "{agent}");
    let cache = path("cache");
    let relay = first_log_line(
        "caravan-relay",
        &[
            "--log-json",
            "--upstream",
            "https://127.0.0.1:1",
            "--token",
            "t",
            "--cache-dir",
            &cache,
            "--listen",
            "127.0.0.1:0",
        ],
    )?;
    assert_eq!(relay["fields"]["message"], "relay starting", "{relay}");
    assert_eq!(
        relay["fields"]["upstream"], "https://127.0.0.1:1",
        "{relay}"
    );
    Ok(())
}
