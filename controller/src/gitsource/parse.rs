//! Reading a revision: every YAML document of every file must be a Caravan
//! object of a kind a GitSource may apply, valid against its Rust type (the
//! field at fault named), in the source's namespace, declared once; and the
//! revision's Packages must keep the identity rules ([`crate::identity`]).
//! All problems are found, one per file, before anything is applied.

use caravan_api::{
    labels, names,
    v1alpha1::{self as v1, ManifestError},
    API_VERSION,
};
use kube::{api::ApiResource, ResourceExt};
use serde::Deserialize;

use crate::identity;

/// Largest manifest file read from Git.
const MAX_FILE_BYTES: usize = 1 << 20;

/// The kinds a GitSource may apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Cabinet,
    Package,
    Site,
    DistributionJob,
    Agent,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Cabinet,
        Kind::Package,
        Kind::Site,
        Kind::DistributionJob,
        Kind::Agent,
    ];

    fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == kind)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Cabinet => "Cabinet",
            Kind::Package => "Package",
            Kind::Site => "Site",
            Kind::DistributionJob => "DistributionJob",
            Kind::Agent => "Agent",
        }
    }

    pub fn resource(self) -> ApiResource {
        match self {
            Kind::Cabinet => ApiResource::erase::<v1::Cabinet>(&()),
            Kind::Package => ApiResource::erase::<v1::Package>(&()),
            Kind::Site => ApiResource::erase::<v1::Site>(&()),
            Kind::DistributionJob => ApiResource::erase::<v1::DistributionJob>(&()),
            Kind::Agent => ApiResource::erase::<v1::Agent>(&()),
        }
    }

    /// Checks `value` against the Rust type of the kind, naming the field at fault.
    fn validate(self, value: &serde_json::Value) -> Result<(), String> {
        fn check<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, String> {
            serde_path_to_error::deserialize::<_, T>(v).map_err(|e| match e.path().to_string() {
                p if p == "." => e.inner().to_string(),
                p => format!("{p}: {}", e.inner()),
            })
        }
        match self {
            Kind::Cabinet => {
                let c = check::<v1::Cabinet>(value)?;
                let url = c.spec.store.url.as_deref().unwrap_or_default();
                if c.spec.store.type_ == v1::StoreType::Http
                    && !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    return Err(format!("spec.store.url: an http store needs an http:// or https:// URL, not {url:?}"));
                }
                for k in &c.spec.trusted_keys {
                    caravan_api::signing::parse_public(&k.public_key)
                        .map_err(|e| format!("spec.trustedKeys[{}]: {e}", k.name))?;
                }
                Ok(())
            }
            Kind::Package => check::<v1::Package>(value).map(drop),
            Kind::Site => {
                let s = check::<v1::Site>(value)?;
                if s.spec.parent.as_deref() == Some(&s.name_any()) {
                    return Err("spec.parent: a site cannot be its own parent".into());
                }
                Ok(())
            }
            Kind::DistributionJob => check::<v1::DistributionJob>(value).map(drop),
            Kind::Agent => check::<v1::Agent>(value).map(drop),
        }
    }
}

/// One object declared in Git, validated, ready to apply.
#[derive(Debug, Clone)]
pub struct Declared {
    pub file: String,
    pub kind: Kind,
    pub name: String,
    pub object: serde_json::Value,
}

/// Parses and validates one file; every document must be a Caravan object of
/// an allowed kind, in `namespace` (or none).
pub fn parse_file(
    file: &str,
    text: &str,
    namespace: &str,
    source: &str,
) -> Result<Vec<Declared>, ManifestError> {
    let fail = |message: String| ManifestError {
        file: file.to_string(),
        message,
    };
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let mut value = serde_json::Value::deserialize(doc)
            .map_err(|e| fail(format!("document {n}: invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let Some(obj) = value.as_object_mut() else {
            return Err(fail(format!(
                "document {n}: expected a mapping with apiVersion, kind and metadata"
            )));
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind_name = obj
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if api_version != API_VERSION {
            return Err(fail(format!(
                "document {n}: apiVersion {api_version:?} is not {API_VERSION:?}"
            )));
        }
        let Some(kind) = Kind::parse(&kind_name) else {
            return Err(fail(format!(
                "document {n}: kind {kind_name:?} cannot be applied from Git (allowed: Cabinet, Package, Site, DistributionJob, Agent)"
            )));
        };
        let meta_str = |key: &str| {
            obj.get("metadata")
                .and_then(|m| m.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let name = meta_str("name").unwrap_or_default();
        let what = format!("document {n} ({kind_name} {name:?})");
        if let Err(e) = names::object_name(&name) {
            return Err(fail(format!("{what}: metadata.name: {e}")));
        }
        match meta_str("namespace") {
            Some(ns) if ns != namespace => {
                return Err(fail(format!(
                    "{what}: metadata.namespace {ns:?} differs from the GitSource's namespace {namespace:?}"
                )))
            }
            _ => {}
        }
        obj.remove("status");
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .ok_or_else(|| fail(format!("{what}: metadata must be a mapping")))?;
        meta.insert("namespace".into(), namespace.into());
        let labels = meta
            .entry("labels")
            .or_insert_with(|| serde_json::json!({}));
        let Some(labels) = labels.as_object_mut() else {
            return Err(fail(format!("{what}: metadata.labels must be a mapping")));
        };
        labels.insert(labels::SOURCE.into(), source.into());
        kind.validate(&value)
            .map_err(|e| fail(format!("{what}: {e}")))?;
        out.push(Declared {
            file: file.to_string(),
            kind,
            name,
            object: value,
        });
    }
    Ok(out)
}

/// Parses every file of a revision; all problems are returned, one per file.
pub fn parse_revision(
    files: &[(String, Vec<u8>)],
    namespace: &str,
    source: &str,
) -> Result<Vec<Declared>, Vec<ManifestError>> {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    for (file, bytes) in files {
        if bytes.len() > MAX_FILE_BYTES {
            errors.push(ManifestError {
                file: file.clone(),
                message: format!(
                    "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                    bytes.len()
                ),
            });
            continue;
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            errors.push(ManifestError {
                file: file.clone(),
                message: "file is not valid UTF-8".into(),
            });
            continue;
        };
        match parse_file(file, text, namespace, source) {
            Ok(m) => manifests.extend(m),
            Err(e) => errors.push(e),
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for m in &manifests {
        if let Some(first) = seen.insert((m.kind, m.name.clone()), m.file.clone()) {
            errors.push(ManifestError {
                file: m.file.clone(),
                message: format!("{} {:?} is also declared in {first}", m.kind.name(), m.name),
            });
        }
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

/// Applies the package identity rules to the Packages of a revision, against
/// the existing packages and against each other.
pub fn check_identity<'a>(
    declared: &'a [Declared],
    existing: impl Iterator<Item = (&'a str, &'a v1::PackageSpec)>,
) -> Result<(), Vec<ManifestError>> {
    let mut seen: Vec<(&str, &v1::PackageSpec)> = existing.collect();
    let mut specs = Vec::new();
    for m in declared.iter().filter(|m| m.kind == Kind::Package) {
        match serde_json::from_value::<v1::Package>(m.object.clone()) {
            Ok(p) => specs.push((m, p.spec)),
            // Validated before; cannot happen.
            Err(e) => {
                return Err(vec![ManifestError {
                    file: m.file.clone(),
                    message: e.to_string(),
                }])
            }
        }
    }
    let mut errors = Vec::new();
    for (m, spec) in &specs {
        if let Err(message) = identity::check(&m.name, spec, seen.iter().copied()) {
            errors.push(ManifestError {
                file: m.file.clone(),
                message,
            });
        }
        seen.push((m.name.as_str(), spec));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGE: &str = r#"
apiVersion: caravan.dev/v1alpha1
kind: Package
metadata:
  name: hello-1.0.0
spec:
  cabinet: main
  name: hello
  version: 1.0.0
  artifact:
    digest: sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
    size: 3
"#;

    #[test]
    fn valid_manifests_are_placed_in_the_source_namespace_and_labelled() {
        let m = parse_file("pkgs/hello.yaml", PACKAGE, "team-a", "fleet").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, Kind::Package);
        assert_eq!(m[0].object["metadata"]["namespace"], "team-a");
        assert_eq!(m[0].object["metadata"]["labels"][labels::SOURCE], "fleet");
    }

    #[test]
    fn malformed_yaml_is_reported_with_file_and_line() {
        let e =
            parse_file("jobs/bad.yaml", "kind: Package\n  name: [oops\n", "ns", "s").unwrap_err();
        assert_eq!(e.file, "jobs/bad.yaml");
        assert!(
            e.message.contains("invalid YAML") && e.message.contains("line"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_missing_field_is_named_with_its_path() {
        let text = PACKAGE.replace("  cabinet: main\n", "");
        let e = parse_file("p.yaml", &text, "ns", "s").unwrap_err();
        assert!(
            e.message.contains("spec") && e.message.contains("cabinet"),
            "{}",
            e.message
        );
        let text = PACKAGE.replace("sha256:2c26", "md5:2c26");
        let e = parse_file("p.yaml", &text, "ns", "s").unwrap_err();
        assert!(e.message.contains("spec.artifact.digest"), "{}", e.message);
    }

    #[test]
    fn foreign_kinds_namespaces_and_duplicates_are_refused() {
        let e = parse_file(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "ns",
            "s",
        )
        .unwrap_err();
        assert!(e.message.contains("apiVersion"), "{}", e.message);
        let other_ns = PACKAGE.replace(
            "  name: hello-1.0.0\n",
            "  name: hello-1.0.0\n  namespace: other\n",
        );
        assert!(parse_file("p.yaml", &other_ns, "ns", "s")
            .unwrap_err()
            .message
            .contains("namespace"));
        let files = vec![
            ("a.yaml".to_string(), PACKAGE.as_bytes().to_vec()),
            ("b.yaml".to_string(), PACKAGE.as_bytes().to_vec()),
        ];
        let errors = parse_revision(&files, "ns", "s").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("also declared in a.yaml"),
            "{}",
            errors[0].message
        );
    }
}
