//! The identity rules of packages, enforced both in the Git sync and by the
//! admission webhook: a Package never moves to another cabinet or changes its
//! name, and a name+version, once published, always means the same artifact
//! — even after its Package was deleted: the [`Ledger`] remembers. A
//! Cabinet that requires signatures always does (deleted and created again
//! included): switching it off would let unsigned packages through to
//! agents that rely on the cabinet's word.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Mutex,
};

use caravan_api::{v1alpha1::PackageSpec, Digest};
use serde::{Deserialize, Serialize};

/// Every name+version the controller has seen published, per namespace,
/// with its artifact, kept in the data directory (`published.json`): a
/// Package deleted and created again cannot bring other content under a
/// version agents have installed.
pub struct Ledger {
    path: PathBuf,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    packages: BTreeMap<Published, Digest>,
    /// `(namespace, cabinet)` of every Cabinet seen requiring signatures.
    signed_cabinets: BTreeSet<(String, String)>,
}

/// The ledger as written.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LedgerFile {
    packages: Vec<Entry>,
    cabinets_requiring_signatures: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Published {
    namespace: String,
    name: String,
    version: String,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    key: Published,
    digest: Digest,
}

impl Ledger {
    /// The ledger at `path` (empty if there is none yet).
    pub fn load(path: PathBuf) -> anyhow::Result<Self> {
        let file: LedgerFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerFile::default(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let entries = Entries {
            packages: file
                .packages
                .into_iter()
                .map(|e| (e.key, e.digest))
                .collect(),
            signed_cabinets: file.cabinets_requiring_signatures.into_iter().collect(),
        };
        Ok(Self {
            path,
            entries: Mutex::new(entries),
        })
    }

    fn key(namespace: &str, spec: &PackageSpec) -> Published {
        Published {
            namespace: namespace.into(),
            name: spec.name.clone(),
            version: spec.version.clone(),
        }
    }

    /// Remembers the packages of `published` (namespace, spec) and the
    /// cabinets requiring signatures (namespace, name) not seen before;
    /// writes the ledger if anything was new.
    pub fn record<'a>(
        &self,
        published: impl IntoIterator<Item = (&'a str, &'a PackageSpec)>,
        signed_cabinets: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> anyhow::Result<()> {
        let mut entries = self.entries.lock().expect("lock poisoned");
        let mut new = false;
        for (ns, spec) in published {
            entries
                .packages
                .entry(Self::key(ns, spec))
                .or_insert_with(|| {
                    new = true;
                    spec.artifact.digest
                });
        }
        for (ns, name) in signed_cabinets {
            new |= entries.signed_cabinets.insert((ns.into(), name.into()));
        }
        if new {
            let file = LedgerFile {
                packages: entries
                    .packages
                    .iter()
                    .map(|(key, digest)| Entry {
                        key: key.clone(),
                        digest: *digest,
                    })
                    .collect(),
                cabinets_requiring_signatures: entries.signed_cabinets.iter().cloned().collect(),
            };
            caravan_net::fs::write_private(
                &self.path,
                &serde_json::to_vec(&file)?,
                caravan_net::fs::Existing::Replace,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        }
        Ok(())
    }

    /// Whether Cabinet `name` of `namespace` may say `require_signatures`:
    /// a cabinet once seen requiring signatures always does.
    pub fn check_cabinet(
        &self,
        namespace: &str,
        name: &str,
        require_signatures: bool,
    ) -> Result<(), String> {
        let entries = self.entries.lock().expect("lock poisoned");
        if !require_signatures
            && entries
                .signed_cabinets
                .contains(&(namespace.to_string(), name.to_string()))
        {
            return Err(format!(
                "Cabinet {name} requires signatures, and that cannot be switched off (agents rely on it); \
                 put unsigned packages in a cabinet of their own"
            ));
        }
        Ok(())
    }

    /// Whether `spec`, in `namespace`, keeps the artifact its name+version
    /// was ever published with.
    pub fn check(&self, namespace: &str, spec: &PackageSpec) -> Result<(), String> {
        let entries = self.entries.lock().expect("lock poisoned");
        match entries.packages.get(&Self::key(namespace, spec)) {
            Some(digest) if *digest != spec.artifact.digest => Err(format!(
                "{} {} was published with artifact {digest} (its Package has been deleted since); a version \
                 never changes its content: publish a new version",
                spec.name, spec.version
            )),
            _ => Ok(()),
        }
    }
}

/// Checks the Package `object` with spec `new` against the existing packages
/// of its namespace, as `(object name, spec)`. Returns what is wrong.
pub fn check<'a>(
    object: &str,
    new: &PackageSpec,
    existing: impl IntoIterator<Item = (&'a str, &'a PackageSpec)>,
) -> Result<(), String> {
    for (other, old) in existing {
        if other == object {
            if old.cabinet != new.cabinet {
                return Err(format!(
                    "Package {object} cannot move from cabinet {} to cabinet {}: a package stays in the cabinet it was \
                     published to; publish it again under a new name",
                    old.cabinet, new.cabinet
                ));
            }
            if (&old.name, &old.version) != (&new.name, &new.version) {
                return Err(format!(
                    "Package {object} cannot be renamed from {} {} to {} {}",
                    old.name, old.version, new.name, new.version
                ));
            }
        }
        if old.name == new.name
            && old.version == new.version
            && old.artifact.digest != new.artifact.digest
        {
            return Err(format!(
                "{} {} is published already with artifact {} (Package {other}); a version never changes its \
                 content: publish a new version",
                new.name, new.version, old.artifact.digest
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cabinet: &str, name: &str, version: &str, digest: char) -> PackageSpec {
        serde_json::from_value(serde_json::json!({
            "cabinet": cabinet, "name": name, "version": version,
            "artifact": {"digest": format!("sha256:{}", digest.to_string().repeat(64)), "size": 1},
        }))
        .unwrap()
    }

    #[test]
    fn a_deleted_version_cannot_come_back_with_other_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("published.json");
        let ledger = Ledger::load(path.clone()).unwrap();
        let v1 = spec("main", "hello", "1.0.0", 'a');
        ledger
            .record([("fleet", &v1)], [("fleet", "secure")])
            .unwrap();
        // Remembered across a restart.
        let ledger = Ledger::load(path).unwrap();
        assert_eq!(ledger.check("fleet", &v1), Ok(()), "the same content again");
        let swapped = ledger
            .check("fleet", &spec("main", "hello", "1.0.0", 'b'))
            .unwrap_err();
        assert!(swapped.contains("deleted since"), "{swapped}");
        assert!(ledger
            .check("other-ns", &spec("main", "hello", "1.0.0", 'b'))
            .is_ok());
        assert!(ledger
            .check("fleet", &spec("main", "hello", "1.0.1", 'b'))
            .is_ok());
    }

    #[test]
    fn packages_keep_their_cabinet_name_and_content() {
        let old = spec("main", "hello", "1.0.0", 'a');
        let existing = [("hello-1.0.0", &old)];
        assert!(
            check("hello-1.0.0", &old, existing).is_ok(),
            "re-applying is fine"
        );
        let moved = check(
            "hello-1.0.0",
            &spec("other", "hello", "1.0.0", 'a'),
            existing,
        )
        .unwrap_err();
        assert!(
            moved.contains("cannot move from cabinet main to cabinet other"),
            "{moved}"
        );
        let renamed =
            check("hello-1.0.0", &spec("main", "hi", "1.0.0", 'a'), existing).unwrap_err();
        assert!(renamed.contains("cannot be renamed"), "{renamed}");
        let changed = check(
            "hello-1.0.0",
            &spec("main", "hello", "1.0.0", 'b'),
            existing,
        )
        .unwrap_err();
        assert!(changed.contains("published already"), "{changed}");
        // The same name+version under another object name is caught too.
        let twin = check(
            "hello-again",
            &spec("main", "hello", "1.0.0", 'b'),
            existing,
        )
        .unwrap_err();
        assert!(twin.contains("Package hello-1.0.0"), "{twin}");
        assert!(check(
            "hello-1.1.0",
            &spec("main", "hello", "1.1.0", 'b'),
            existing
        )
        .is_ok());
    }
}
