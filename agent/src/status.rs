//! `caravan-agent status`: what is installed, each assignment's state as
//! last reported (with the download in progress, if any), and any change a
//! crash interrupted; on a terminal it then follows the download with a
//! progress bar. It reads the state directory only, so it works whether the
//! agent runs or not.

use std::time::Duration;

use caravan_api::wire::{AgentReport, AssignmentPhase};

use crate::{
    state::{Credentials, Installed, Progress, StateDir},
    transaction::journal::{self, Entry},
};

/// Prints the summary; on a terminal, follows the download in progress.
pub async fn show(state: &StateDir) -> anyhow::Result<()> {
    print!(
        "{}",
        render(
            state.credentials()?.as_ref(),
            &state.installed()?,
            journal::read(state)?.as_ref(),
            state.last_report()?.as_ref(),
            state.progress().as_ref(),
        )
    );
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        follow_download(state).await;
    }
    Ok(())
}

/// The human summary of an agent's state.
pub fn render(
    credentials: Option<&Credentials>,
    installed: &Installed,
    interrupted: Option<&Entry>,
    report: Option<&AgentReport>,
    progress: Option<&Progress>,
) -> String {
    let mut out = String::new();
    match credentials {
        Some(c) => out.push_str(&format!("agent: {} (relay {})\n", c.agent, c.server)),
        None => out.push_str("agent: not enrolled\n"),
    }
    out.push_str("installed:\n");
    if installed.is_empty() {
        out.push_str("  (nothing)\n");
    }
    for r in installed.values() {
        let found = match r.detected {
            true => " (found present, not installed by Caravan)",
            false => "",
        };
        out.push_str(&format!("  {} {} {}{found}\n", r.name, r.version, r.digest));
    }
    if let Some(j) = interrupted {
        out.push_str(&format!(
            "interrupted: package {} at step {:?}; the next start will have it {}\n",
            j.package,
            j.step,
            j.step.outcome()
        ));
    }
    if let Some(report) = report {
        out.push_str("assignments:\n");
        for j in &report.jobs {
            let phase = match (j.phase, progress) {
                (AssignmentPhase::Downloading, Some(p)) if p.digest == j.digest => format!(
                    "Downloading {}% ({:.1} of {:.1} MiB)",
                    (p.received * 100).checked_div(p.total).unwrap_or(0),
                    p.received as f64 / 1048576.0,
                    p.total as f64 / 1048576.0
                ),
                _ => j.summary(),
            };
            out.push_str(&format!(
                "  {} {:?} {}: {}\n",
                j.job, j.action, j.package, phase
            ));
        }
    }
    out
}

/// On a terminal: a progress bar for the download in progress, until it ends.
async fn follow_download(state: &StateDir) {
    let Some(first) = state.progress() else {
        return;
    };
    let bar = indicatif::ProgressBar::new(first.total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {percent}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{} {}", first.package, first.version));
    let mut moved = std::time::Instant::now();
    while let Some(p) = state.progress().filter(|p| p.digest == first.digest) {
        if p.received != bar.position() {
            bar.set_position(p.received);
            moved = std::time::Instant::now();
        } else if moved.elapsed() > Duration::from_secs(30) {
            // The agent is not running, or the relay stopped sending.
            bar.abandon_with_message(format!("{} {}: stalled", first.package, first.version));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_with_message(format!("{} {} downloaded", first.package, first.version));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{state::InstalledRecord, transaction::journal::Step};
    use caravan_api::{
        v1alpha1::JobAction,
        wire::{AgentReport, JobState},
        Digest,
    };

    #[test]
    fn the_summary_shows_installs_failures_downloads_and_interrupted_changes() {
        let hello = Digest::of(b"hello");
        let big = Digest::of(b"big");
        let record = InstalledRecord {
            name: "hello".into(),
            version: "1.0.0".into(),
            digest: hello,
            job: "ns/j".into(),
            install: Default::default(),
            detected: false,
        };
        let state = |package: &str, digest, phase, message: &str| JobState {
            job: "ns/j".into(),
            package: package.into(),
            digest,
            action: JobAction::Install,
            phase,
            message: message.into(),
            time: String::new(),
            attempts: 2,
            retry_at: Some("2026-12-06T10:00:00Z".into()),
        };
        let report = AgentReport {
            agent: String::new(),
            sequence: 0,
            version: "0".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            installed: vec![],
            jobs: vec![
                state("hello", hello, AssignmentPhase::Succeeded, ""),
                state("big", big, AssignmentPhase::Downloading, ""),
                state(
                    "bad",
                    Digest::of(b"bad"),
                    AssignmentPhase::Failed,
                    "digest mismatch",
                ),
            ],
            drift: vec![],
            desired_version: 0,
            desired_refused: None,
            facts: Default::default(),
        };
        let progress = Progress {
            package: "big".into(),
            version: "2".into(),
            digest: big,
            received: 450 << 20,
            total: 1000 << 20,
        };
        let entry = Entry {
            package: "tools".into(),
            step: Step::Swapped,
            to: None,
        };
        let creds = Credentials {
            server: "https://relay".into(),
            agent: "desk-1".into(),
            token: "secret".into(),
        };
        let text = render(
            Some(&creds),
            &Installed::from([("hello".into(), record)]),
            Some(&entry),
            Some(&report),
            Some(&progress),
        );
        assert!(
            text.starts_with("agent: desk-1 (relay https://relay)\n"),
            "{text}"
        );
        assert!(text.contains(&format!("  hello 1.0.0 {hello}\n")), "{text}");
        assert!(text.contains("interrupted: package tools at step Swapped; the next start will have it rolled back"), "{text}");
        assert!(
            text.contains("ns/j Install big: Downloading 45% (450.0 of 1000.0 MiB)"),
            "{text}"
        );
        assert!(
            text.contains(
                "ns/j Install bad: Failed 2 time(s) (tried again at 2026-12-06T10:00:00Z): digest mismatch"
            ),
            "{text}"
        );
        assert!(text.contains("ns/j Install hello: Succeeded"), "{text}");
        assert!(!text.contains("secret"), "no token is shown");
        let empty = render(None, &Installed::new(), None, None, None);
        assert_eq!(empty, "agent: not enrolled\ninstalled:\n  (nothing)\n");
    }
}
