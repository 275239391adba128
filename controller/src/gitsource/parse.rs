//! Reading a revision: every YAML document of every file must be a Caravan
//! object of a kind a GitSource may apply, valid against its Rust type (the
//! field at fault named), in the source's namespace, declared once; and the
//! revision's Packages must keep the identity rules ([`crate::identity`]).
//! All problems are found, one per file, before anything is applied.

use crate::identity;
use caravan_api::{
    labels, names,
    v1alpha1::{self as v1, ManifestError},
    API_VERSION,
};
use kube::{api::ApiResource, ResourceExt};

/// Largest manifest file read from Git.
const MAX_FILE_BYTES: usize = 1 << 20;

/// Parsing a YAML document within a budget of nodes: a document whose
/// aliases expand it beyond [`MAX_NODES`] (a "billion laughs") is refused
/// as soon as it gets there, not expanded in memory until the controller
/// dies (and dies again on every restart, since it re-reads the revision).
mod budget {
    use std::cell::Cell;

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    /// Most nodes (scalars, sequences, mappings) one document may hold once
    /// its aliases are expanded: far above any real manifest.
    pub const MAX_NODES: usize = 100_000;

    /// The document as JSON, within the budget.
    pub fn parse<'de, D: de::Deserializer<'de>>(doc: D) -> Result<Value, D::Error> {
        Budget(&Cell::new(MAX_NODES)).deserialize(doc)
    }

    #[derive(Clone, Copy)]
    struct Budget<'a>(&'a Cell<usize>);

    impl Budget<'_> {
        fn spend<E: de::Error>(self) -> Result<(), E> {
            match self.0.get().checked_sub(1) {
                Some(left) => {
                    self.0.set(left);
                    Ok(())
                }
                None => Err(E::custom(format!(
                    "the document expands to more than {MAX_NODES} nodes (aliases of aliases?); refused"
                ))),
            }
        }
    }

    impl<'de> DeserializeSeed<'de> for Budget<'_> {
        type Value = Value;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Budget<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a YAML document")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
            self.spend()?;
            Ok(Value::Bool(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
            self.spend()?;
            Ok(Value::from(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
            self.spend()?;
            Ok(Value::from(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            self.spend()?;
            Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
            self.spend()?;
            Ok(Value::String(v.to_string()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
            self.spend()?;
            Ok(Value::String(v))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
            self.spend()?;
            Ok(Value::Null)
        }

        fn visit_none<E: de::Error>(self) -> Result<Value, E> {
            self.visit_unit()
        }

        fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            self.deserialize(d)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            self.spend()?;
            let mut items = Vec::new();
            while let Some(item) = seq.next_element_seed(self)? {
                items.push(item);
            }
            Ok(Value::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            self.spend()?;
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                self.spend()?;
                let value = map.next_value_seed(self)?;
                out.insert(key, value);
            }
            Ok(Value::Object(out))
        }
    }
}

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
    /// Every kind, each after the kinds its objects name (a Package its
    /// Cabinet, a job its Packages and Sites, an Agent its Site): the order
    /// objects are applied in, and pruned in reverse.
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
                if c.spec.store.type_ == v1::StoreType::Oci {
                    c.spec
                        .store
                        .repository
                        .as_deref()
                        .ok_or("spec.store.repository: an oci store needs one".to_string())?
                        .parse::<caravan_net::oci::Repository>()
                        .map_err(|e| format!("spec.store.repository: {e}"))?;
                }
                if let Some(pem) = &c.spec.store.ca_bundle {
                    match reqwest::Certificate::from_pem_bundle(pem.as_bytes()) {
                        Ok(certs) if !certs.is_empty() => {}
                        _ => return Err("spec.store.caBundle: not PEM certificates".into()),
                    }
                }
                for k in &c.spec.trusted_keys {
                    caravan_api::signing::parse_public(&k.public_key)
                        .map_err(|e| format!("spec.trustedKeys[{}]: {e}", k.name))?;
                }
                Ok(())
            }
            Kind::Package => {
                let p = check::<v1::Package>(value)?;
                p.spec.install.check().map_err(|e| format!("spec.{e}"))
            }
            Kind::Site => {
                let s = check::<v1::Site>(value)?;
                if s.spec.parent.as_deref() == Some(&s.name_any()) {
                    return Err("spec.parent: a site cannot be its own parent".into());
                }
                Ok(())
            }
            Kind::DistributionJob => {
                let j = check::<v1::DistributionJob>(value)?;
                let exclude = j.spec.destinations.exclude.unwrap_or_default();
                for (path, sel) in [
                    (
                        "/spec/destinations/agentSelector",
                        j.spec.destinations.agent_selector,
                    ),
                    (
                        "/spec/destinations/exclude/agentSelector",
                        exclude.agent_selector,
                    ),
                ] {
                    let field = path.trim_start_matches('/').replace('/', ".");
                    // Fields a label selector does not have (`{role: kiosk}`
                    // instead of `{matchLabels: {role: kiosk}}`) would be
                    // dropped, leaving an empty selector.
                    if let Some(object) = value.pointer(path).and_then(|v| v.as_object()) {
                        if let Some(k) = object
                            .keys()
                            .find(|k| *k != "matchLabels" && *k != "matchExpressions")
                        {
                            return Err(format!(
                                "{field}: unknown field `{k}`: a label selector has matchLabels and matchExpressions (e.g. {{matchLabels: {{{k}: …}}}})"
                            ));
                        }
                    }
                    if let Some(sel) = sel {
                        caravan_api::selector::validate(&sel)
                            .map_err(|e| format!("{field}: {e}"))?;
                    }
                }
                Ok(())
            }
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
        let mut value =
            budget::parse(doc).map_err(|e| fail(format!("document {n}: invalid YAML: {e}")))?;
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

/// Applies the identity rules to the Packages (and Cabinets) of a revision, against
/// the existing packages and against each other.
pub fn check_identity<'a>(
    declared: &'a [Declared],
    existing: impl Iterator<Item = (&'a str, &'a v1::PackageSpec)>,
    published: &identity::Ledger,
    ns: &str,
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
    for m in declared.iter().filter(|m| m.kind == Kind::Cabinet) {
        let require = m.object["spec"]["requireSignatures"]
            .as_bool()
            .unwrap_or(false);
        if let Err(message) = published.check_cabinet(ns, &m.name, require) {
            errors.push(ManifestError {
                file: m.file.clone(),
                message,
            });
        }
    }
    for (m, spec) in &specs {
        if let Err(message) = identity::check(&m.name, spec, seen.iter().copied())
            .and_then(|()| published.check(ns, spec))
        {
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
    fn a_selector_in_another_shape_or_empty_is_refused_not_taken_for_every_agent() {
        let job = |selector: &str| {
            format!("apiVersion: caravan.dev/v1alpha1\nkind: DistributionJob\nmetadata: {{name: j}}\nspec:\n  packages: [{{name: hello}}]\n  destinations: {selector}\n")
        };
        let e =
            parse_file("j.yaml", &job("{agentSelector: {role: kiosk}}"), "ns", "s").unwrap_err();
        assert!(
            e.message
                .contains("spec.destinations.agentSelector: unknown field `role`"),
            "{}",
            e.message
        );
        let e = parse_file(
            "j.yaml",
            &job("{sites: [{name: hq}], exclude: {agentSelector: {}}}"),
            "ns",
            "s",
        )
        .unwrap_err();
        assert!(
            e.message
                .contains("spec.destinations.exclude.agentSelector: an empty selector"),
            "{}",
            e.message
        );
        let ok =
            job("{agentSelector: {matchExpressions: [{key: os, operator: In, values: [linux]}]}}");
        parse_file("j.yaml", &ok, "ns", "s").unwrap();
    }

    #[test]
    fn an_oci_cabinet_and_a_package_that_cannot_be_read_are_refused_naming_the_field() {
        let cabinet = |store: &str| {
            format!("apiVersion: caravan.dev/v1alpha1\nkind: Cabinet\nmetadata: {{name: c}}\nspec:\n  store: {store}\n")
        };
        let ok = cabinet("{type: oci, repository: registry.example.com/caravan/packages}");
        assert!(parse_file("c.yaml", &ok, "ns", "s").is_ok());
        for (store, says) in [
            (
                "{type: oci}",
                "spec.store.repository: an oci store needs one",
            ),
            (
                "{type: oci, repository: registry.example.com/Caravan}",
                "spec.store.repository: repository",
            ),
            (
                "{type: oci, repository: r.example.com/x, caBundle: nope}",
                "spec.store.caBundle: not PEM certificates",
            ),
        ] {
            let e = parse_file("c.yaml", &cabinet(store), "ns", "s").unwrap_err();
            assert!(e.message.contains(says), "{store}: {}", e.message);
        }
        let text = PACKAGE.replace(
            "  cabinet: main\n",
            "  cabinet: main\n  install: {requires: [{name: libc, version: '>>1'}]}\n",
        );
        let e = parse_file("p.yaml", &text, "ns", "s").unwrap_err();
        assert!(
            e.message
                .contains("spec.install.requires[0].version: version range"),
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

    #[test]
    fn an_alias_bomb_is_refused_without_expanding_it() {
        // Three layers of a thousand: 10^9 nodes if expanded, yet under the
        // YAML parser's own limit of alias jumps for a long way (it allows
        // a hundred per event, and this document has about 3,000 events).
        let layer =
            |name: &str, item: &str| format!("{name}: &{name} [{}]\n", vec![item; 1000].join(", "));
        let text = layer("a0", "x") + &layer("a1", "*a0") + &layer("a2", "*a1");
        let start = std::time::Instant::now();
        let e = parse_file("fleet/bomb.yaml", &text, "ns", "s").unwrap_err();
        assert_eq!(e.file, "fleet/bomb.yaml");
        assert!(
            e.message.contains("more than 100000 nodes"),
            "{}",
            e.message
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "expanded before refusing"
        );
        // Aliases within the budget are fine.
        let small = PACKAGE.replace(
            "  cabinet: main\n",
            "  cabinet: &c main\n  description: *c\n",
        );
        assert!(parse_file("p.yaml", &small, "ns", "s").is_ok());
    }
}
