use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A piece of software and how to install it. Its artifact lives in a cabinet.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Package",
    namespaced,
    status = "PackageStatus",
    shortname = "pkg",
    category = "caravan",
    printcolumn = r#"{"name":"Package","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
    printcolumn = r#"{"name":"Cabinet","type":"string","jsonPath":".spec.cabinet"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.artifact.size"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PackageSpec {
    /// Cabinet holding the artifact. A package cannot move to another cabinet.
    pub cabinet: String,
    /// Package name, as jobs refer to it.
    pub name: String,
    /// Package version.
    pub version: String,
    /// The packed artifact.
    pub artifact: Artifact,
    /// How agents install it.
    #[serde(default)]
    pub install: InstallSpec,
    /// Signatures over name, version, artifact and install spec
    /// (`caravan package sign`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<crate::signing::PackageSignature>,
    /// What the package is, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// `sha256:<64 lowercase hex digits>` of the artifact.
    pub digest: crate::Digest,
    /// Size in bytes.
    pub size: u64,
    /// In an `oci` cabinet: the digest of the artifact's manifest, whose one
    /// layer is the artifact. The tag may move; this does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<crate::Digest>,
}

/// How an agent installs a package. Either way the archive is first
/// extracted into `<install root>/<package name>`; `script` then runs a
/// script shipped in the package, whose exit code decides success.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallSpec {
    /// `archive` (default) or `script`.
    #[serde(default)]
    pub method: InstallMethod,
    /// The scripts, for `method: script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<ScriptSpec>,
    /// What the endpoint must offer; checked before anything is downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Requirements>,
    /// A check inside the package, run (with the scripts' environment,
    /// `CARAVAN_ACTION=health`) once the new version is in place and its
    /// install script has run, whatever the method: a non-zero exit rolls
    /// the install back to the previous version, which is kept until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    /// Packages that must be installed first, each at a version in its
    /// range. A job that installs this package installs them too, before
    /// it: the version the job names, else the highest in range (or leaves
    /// one to another job that takes precedence with a version in range).
    /// On the endpoint the package does not install until each is there at
    /// a version in range, and nothing removes one, or moves it out of
    /// range, while an installed package requires it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Dependency>,
    /// How to recognise this version already on an endpoint that Caravan
    /// did not install it on: when every rule holds, it counts as installed
    /// (`detected`) and nothing is downloaded or run. Caravan never removes
    /// software it only detected: it forgets it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detect: Vec<DetectionRule>,
}

/// A package another one needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dependency {
    /// The package's name (a Package in the same namespace).
    pub name: String,
    /// The versions that will do, as a semantic-version range
    /// (`>=1.2, <2`, `^1.4`, `~2.0.1`, `1.x`); any version if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl Dependency {
    /// Whether `version` is in this dependency's range.
    pub fn admits(&self, version: &str) -> Result<bool, String> {
        match &self.version {
            None => Ok(true),
            Some(range) => crate::version::in_range(version, range),
        }
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(range) => write!(f, "{} {range}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One thing that shows the package's version is present. Give exactly one
/// of `file`, `versionFile` and `command`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DetectionRule {
    /// A file (absolute path) that exists, with this content if `digest` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// `sha256:<hex>` the `file` must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::Digest>,
    /// A file (absolute path) whose first line is the package's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_file: Option<String>,
    /// A program and its arguments (no shell; `["/bin/sh", "-c", "…"]` for
    /// one) that exits 0 when the software is present. It runs as package
    /// scripts do and is killed after a minute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

impl DetectionRule {
    /// Refuses a rule that says nothing, or more than one thing.
    pub fn check(&self) -> Result<(), String> {
        let kinds = [
            self.file.is_some(),
            self.version_file.is_some(),
            !self.command.is_empty(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            1 => {}
            0 => return Err("gives none of file, versionFile and command".into()),
            _ => return Err("gives more than one of file, versionFile and command".into()),
        }
        if self.digest.is_some() && self.file.is_none() {
            return Err("gives a digest without a file".into());
        }
        for path in self.file.iter().chain(&self.version_file) {
            if !path.starts_with('/') {
                return Err(format!("path {path:?} is not absolute"));
            }
        }
        Ok(())
    }
}

impl InstallSpec {
    /// Refuses dependency ranges and detection rules that cannot be read,
    /// naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (i, d) in self.requires.iter().enumerate() {
            if let Some(range) = &d.version {
                crate::version::range(range)
                    .map_err(|e| format!("install.requires[{i}].version: {e}"))?;
            }
        }
        for (i, rule) in self.detect.iter().enumerate() {
            rule.check()
                .map_err(|e| format!("install.detect[{i}]: {e}"))?;
        }
        if !self.detect.is_empty() && self.method == InstallMethod::Agent {
            return Err("install.detect: an agent package is never found present: \
                        it is the agent itself"
                .into());
        }
        Ok(())
    }
}

/// Where a package with `method: agent` carries the new agent binary: this
/// file at the root of its archive.
pub const AGENT_BINARY: &str = "caravan-agent";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum InstallMethod {
    #[default]
    Archive,
    Script,
    /// A new agent: the archive holds a `caravan-agent` binary at its root,
    /// which the agent tries out, then replaces itself with and restarts into.
    Agent,
}

/// Scripts run from the extracted package directory, with the environment
/// variables `CARAVAN_PACKAGE_NAME`, `CARAVAN_PACKAGE_VERSION`,
/// `CARAVAN_PACKAGE_DIR`, `CARAVAN_INSTALL_ROOT` and `CARAVAN_ACTION`
/// (`install` or `uninstall`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScriptSpec {
    /// Path of the install script inside the package.
    #[serde(default = "default_install_script")]
    pub install: String,
    /// Path of the uninstall script inside the package, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninstall: Option<String>,
    /// A script running longer is killed and the step fails.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    /// When a newer version replaces this one, run this version's
    /// uninstall script first (with `CARAVAN_UPGRADE_TO` set to the new
    /// version); should the new version then fail, this one's install
    /// script runs again after its files are back. Otherwise the new
    /// version's install script upgrades in place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uninstall_on_upgrade: bool,
}

fn default_install_script() -> String {
    "install.sh".into()
}

fn default_timeout() -> u32 {
    600
}

/// Requirements an endpoint must meet; an agent that does not meet them
/// reports why instead of downloading.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requirements {
    /// Operating systems, as Rust names them (`linux`, `windows`, `macos`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub os: Vec<String>,
    /// Architectures (`x86_64`, `aarch64`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<String>,
    /// Free space needed in the install root besides the package itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_disk_bytes: Option<u64>,
}

/// Whether the artifact is there, verified, and signed as its cabinet requires.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The artifact is present in its cabinet with the declared digest and size.
    #[serde(default)]
    pub artifact_available: bool,
    /// The latest observations of the object's state (`Ready`, and the kind's own).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
