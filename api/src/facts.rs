//! What an agent says about its endpoint, as labels on its Agent, so jobs
//! can select endpoints without anyone labelling them by hand: the OS,
//! architecture, distribution and its version, the host name — and the
//! labels the agent's own configuration declares (`--label role=kiosk`),
//! which land under the `agent.caravan.dev/` prefix (`agent.caravan.dev/role:
//! kiosk`), so an endpoint can never set a label an administrator sets.
//!
//! The controller writes them at enrollment and keeps them current from
//! every report ([`labels`], [`patch`]); the site label
//! ([`crate::labels::SITE`]) follows the Agent's site.

use std::collections::BTreeMap;

/// The endpoint's OS (`linux`, `windows`, `macos`, as Rust names them).
pub const OS: &str = "caravan.dev/os";
/// The endpoint's architecture (`x86_64`, `aarch64`).
pub const ARCH: &str = "caravan.dev/arch";
/// The distribution (`ID` of `/etc/os-release`: `debian`, `ubuntu`).
pub const DISTRO: &str = "caravan.dev/distro";
/// Its version (`VERSION_ID`: `12`, `22.04`).
pub const OS_VERSION: &str = "caravan.dev/os-version";
/// The host name the agent enrolled with.
pub const HOSTNAME: &str = "caravan.dev/hostname";
/// The prefix of the labels an agent's configuration declares.
pub const DECLARED_PREFIX: &str = "agent.caravan.dev/";
/// Most labels an agent may declare.
pub const MAX_DECLARED: usize = 16;

/// The fact label keys, each the controller's alone.
pub const KEYS: [&str; 5] = [OS, ARCH, DISTRO, OS_VERSION, HOSTNAME];

/// What an agent tells about its endpoint, at enrollment and in reports.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub distro: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os_version: String,
    /// Labels from the agent's configuration, by name (without the prefix).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Facts {
    /// The facts of this machine: `/etc/os-release` (where there is one)
    /// and the configured labels.
    pub fn of_this_machine(labels: BTreeMap<String, String>) -> Self {
        let release = ["/etc/os-release", "/usr/lib/os-release"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let field = |key: &str| os_release(&release, key).unwrap_or_default();
        Self {
            distro: field("ID"),
            os_version: field("VERSION_ID"),
            labels,
        }
    }
}

/// The value of `key` in an os-release file (`KEY=value`, optionally
/// quoted, as the freedesktop.org specification has it).
pub fn os_release(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        (k == key).then(|| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v)
                .to_string()
        })
    })
}

/// `text` as a label value: characters a label value cannot hold become
/// `-`, cut at 63 and trimmed to start and end with a letter or digit;
/// `None` if nothing is left.
pub fn label_value(text: &str) -> Option<String> {
    let mapped: String = text
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .take(63)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// Checks a declared label (`name=value` of the agent's configuration):
/// the name must be a label name without prefix, the value a label value.
pub fn check_declared(name: &str, value: &str) -> Result<(), String> {
    let ok = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !ok(name) {
        return Err(format!(
            "label name {name:?}: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (no prefix: it becomes {DECLARED_PREFIX}{name})"
        ));
    }
    if !value.is_empty() && !ok(value) {
        return Err(format!(
            "label {name}={value:?}: a value is at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks every declared label, and that there are not too many.
pub fn check(facts: &Facts) -> Result<(), String> {
    if facts.labels.len() > MAX_DECLARED {
        return Err(format!(
            "{} labels declared; at most {MAX_DECLARED}",
            facts.labels.len()
        ));
    }
    facts
        .labels
        .iter()
        .try_for_each(|(k, v)| check_declared(k, v))
}

/// The labels an Agent carries for what its agent says: the facts and the
/// declared labels (prefixed). Facts that make no label value are left out.
pub fn labels(os: &str, arch: &str, hostname: &str, facts: &Facts) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = [
        (OS, os),
        (ARCH, arch),
        (DISTRO, facts.distro.as_str()),
        (OS_VERSION, facts.os_version.as_str()),
        (HOSTNAME, hostname),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), label_value(v)?)))
    .collect();
    out.extend(
        facts
            .labels
            .iter()
            .map(|(k, v)| (format!("{DECLARED_PREFIX}{k}"), v.clone())),
    );
    out
}

/// The merge patch of `metadata.labels` that turns `current` into carrying
/// `wanted` — set what differs, remove the fact and declared labels not
/// wanted any more, leave every other label alone — or `None` if nothing
/// differs.
pub fn patch(
    current: &BTreeMap<String, String>,
    wanted: &BTreeMap<String, String>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut patch = serde_json::Map::new();
    for (k, v) in wanted {
        if current.get(k) != Some(v) {
            patch.insert(k.clone(), v.clone().into());
        }
    }
    for k in current.keys() {
        let ours = KEYS.contains(&k.as_str()) || k.starts_with(DECLARED_PREFIX);
        if ours && !wanted.contains_key(k) {
            patch.insert(k.clone(), serde_json::Value::Null);
        }
    }
    (!patch.is_empty()).then_some(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_fields_are_read_quoted_or_not() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n";
        assert_eq!(os_release(text, "ID").as_deref(), Some("debian"));
        assert_eq!(os_release(text, "VERSION_ID").as_deref(), Some("12"));
        assert_eq!(os_release(text, "BUILD_ID"), None);
    }

    #[test]
    fn facts_become_labels_and_declared_ones_are_prefixed() {
        let facts = Facts {
            distro: "debian".into(),
            os_version: "12".into(),
            labels: [("role".to_string(), "kiosk".to_string())].into(),
        };
        let l = labels("linux", "x86_64", "till 3/Ost", &facts);
        assert_eq!(l[OS], "linux");
        assert_eq!(l[OS_VERSION], "12");
        assert_eq!(l[HOSTNAME], "till-3-Ost", "made a label value");
        assert_eq!(l["agent.caravan.dev/role"], "kiosk");
        assert!(!l.contains_key("role"), "never an administrator's label");
        assert_eq!(label_value("///"), None);
        assert_eq!(label_value(&"x".repeat(80)).unwrap().len(), 63);
    }

    #[test]
    fn declared_labels_are_checked_by_name() {
        assert!(check_declared("role", "kiosk").is_ok());
        assert!(check_declared("ring", "").is_ok());
        let e = check_declared("example.com/role", "x").unwrap_err();
        assert!(e.contains("no prefix"), "{e}");
        let e = check_declared("role", "two words").unwrap_err();
        assert!(e.contains("label role=\"two words\""), "{e}");
        let many = Facts {
            labels: (0..17).map(|i| (format!("l{i}"), String::new())).collect(),
            ..Default::default()
        };
        assert!(check(&many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn the_patch_sets_what_changed_and_removes_only_our_stale_labels() {
        let current: BTreeMap<String, String> = [
            (OS_VERSION, "11"),
            (OS, "linux"),
            ("agent.caravan.dev/old", "x"),
            ("ring", "canary"),
            ("caravan.dev/site", "hq"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let wanted = labels(
            "linux",
            "x86_64",
            "",
            &Facts {
                os_version: "12".into(),
                ..Default::default()
            },
        );
        let p = patch(&current, &wanted).unwrap();
        assert_eq!(p[OS_VERSION], "12");
        assert_eq!(p[ARCH], "x86_64");
        assert_eq!(p["agent.caravan.dev/old"], serde_json::Value::Null);
        assert!(
            !p.contains_key("ring") && !p.contains_key("caravan.dev/site") && !p.contains_key(OS)
        );
        let mut now = current.clone();
        now.retain(|k, _| k != "agent.caravan.dev/old");
        now.extend(wanted.clone());
        assert_eq!(patch(&now, &wanted), None, "nothing to write");
    }
}
