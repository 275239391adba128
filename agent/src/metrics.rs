//! The agent's figures for Prometheus, in the text format, written to
//! `--metrics-file` after every report: node_exporter's textfile collector
//! (`--collector.textfile.directory`) serves them on the endpoint's own
//! `/metrics`, so the agent opens no port. They are the report it sends,
//! as numbers, plus whether the relay took it.

use std::{path::Path, time::SystemTime};

use caravan_api::wire::{AgentReport, AssignmentPhase};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    os: String,
    arch: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// Every phase an assignment can be in, each with a series (0 included),
/// so a graph does not lose a line when no assignment is in it.
const PHASES: [AssignmentPhase; 12] = [
    AssignmentPhase::Pending,
    AssignmentPhase::Downloading,
    AssignmentPhase::Downloaded,
    AssignmentPhase::Installing,
    AssignmentPhase::Removing,
    AssignmentPhase::Succeeded,
    AssignmentPhase::Failed,
    AssignmentPhase::NotApplicable,
    AssignmentPhase::Conflict,
    AssignmentPhase::Expired,
    AssignmentPhase::Available,
    AssignmentPhase::Deferred,
];

/// A phase as the wire names it.
fn name(phase: AssignmentPhase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The figures of `report` in the text format; `delivered` is when the
/// relay last took a report (`None`: never, since the agent started).
pub fn encode(report: &AgentReport, delivered: Option<SystemTime>) -> String {
    let mut r = Registry::with_prefix("caravan_agent");
    let info = Family::<InfoLabels, Gauge>::default();
    info.get_or_create(&InfoLabels {
        version: report.version.clone(),
        os: report.os.clone(),
        arch: report.arch.clone(),
    })
    .set(1);
    r.register("info", "The agent's version and platform", info);
    let assignments = Family::<PhaseLabels, Gauge>::default();
    for phase in PHASES {
        let n = report.jobs.iter().filter(|j| j.phase == phase).count();
        assignments
            .get_or_create(&PhaseLabels { phase: name(phase) })
            .set(n as i64);
    }
    r.register(
        "assignments",
        "Job assignments of this endpoint by phase",
        assignments,
    );
    let gauge = |r: &mut Registry, name: &str, help: &str, value: i64| {
        let g = Gauge::<i64>::default();
        g.set(value);
        r.register(name, help, g);
    };
    gauge(
        &mut r,
        "installed_packages",
        "Packages installed (or found present)",
        report.installed.len() as i64,
    );
    gauge(
        &mut r,
        "drifted_files",
        "Files of installed packages changed since they were installed (up to the reported 50)",
        report.drift.len() as i64,
    );
    gauge(
        &mut r,
        "desired_version",
        "Version of the signed desired state the agent acts on (0: none yet)",
        i64::try_from(report.desired_version).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "desired_refused",
        "1 when the agent refuses the desired state its relay last served",
        i64::from(report.desired_refused.is_some()),
    );
    let seconds = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    gauge(
        &mut r,
        "report_delivered_timestamp_seconds",
        "When the relay last took the agent's report (0: not since the agent started)",
        delivered.map_or(0, seconds),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)
        .expect("writing to a String cannot fail");
    out
}

/// Replaces `path` with `text` atomically (a scrape never reads half a
/// file), readable by the collector (mode 0644).
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(text.as_bytes())?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_becomes_figures_with_every_phase_present() {
        let report: AgentReport = serde_json::from_value(serde_json::json!({
            "agent": "kiosk", "sequence": 1, "version": "0.1.0", "os": "linux", "arch": "x86_64",
            "installed": [{"name": "hello", "version": "1.0.0", "digest": caravan_api::Digest::of(b"h")}],
            "jobs": [
                {"job": "ns/a", "package": "hello", "digest": caravan_api::Digest::of(b"h"),
                 "action": "install", "phase": "Succeeded", "message": "", "time": "2026-01-01T00:00:00Z"},
                {"job": "ns/b", "package": "tool", "digest": caravan_api::Digest::of(b"t"),
                 "action": "install", "phase": "Failed", "message": "exit 1", "time": "2026-01-01T00:00:00Z"},
            ],
            "desiredVersion": 42,
        }))
        .unwrap();
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let text = encode(&report, Some(at));
        for line in [
            r#"caravan_agent_info{version="0.1.0",os="linux",arch="x86_64"} 1"#,
            r#"caravan_agent_assignments{phase="Succeeded"} 1"#,
            r#"caravan_agent_assignments{phase="Failed"} 1"#,
            r#"caravan_agent_assignments{phase="Downloading"} 0"#,
            "caravan_agent_installed_packages 1",
            "caravan_agent_desired_version 42",
            "caravan_agent_desired_refused 0",
            "caravan_agent_report_delivered_timestamp_seconds 1700000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("caravan.prom");
        write(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
