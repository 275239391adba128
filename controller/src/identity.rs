//! The identity rules of packages, enforced both in the Git sync and by the
//! admission webhook: a Package never moves to another cabinet or changes its
//! name, and a name+version, once published, always means the same artifact.

use caravan_api::v1alpha1::PackageSpec;

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
