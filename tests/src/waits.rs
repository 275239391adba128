//! Waiting for things to happen, with a deadline and a useful error: a
//! condition to hold, a server to answer, a metric to be read.

use std::{future::Future, time::Duration};

use anyhow::Context as _;

use crate::procs::Proc;

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `url` answers 2xx; on time-out, shows the process's log.
pub async fn wait_http_ok(client: &reqwest::Client, url: &str, proc: &Proc) -> anyhow::Result<()> {
    wait_http(client, url, proc, |s| s.is_success()).await
}

/// Waits until `url` answers with a status `wanted` takes (a server that
/// asks for credentials: `401`); on time-out, shows the process's log.
pub async fn wait_http(
    client: &reqwest::Client,
    url: &str,
    proc: &Proc,
    wanted: impl Fn(reqwest::StatusCode) -> bool,
) -> anyhow::Result<()> {
    wait_for(
        &format!("{url} to answer"),
        Duration::from_secs(60),
        || async {
            Ok(client
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| wanted(r.status()))
                .map(|_| ()))
        },
    )
    .await
    .map_err(|e| e.context(proc.log_tail(30)))
}

/// Reads one sample (`name`, no labels) from a Prometheus `/metrics` endpoint.
pub async fn metric(base_url: &str, name: &str) -> anyhow::Result<f64> {
    let text = crate::http()
        .get(format!("{base_url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("metric {name} not found in:\n{text}"))
}
