//! Dependencies between packages: the packages a job names, with those
//! they require (`install.requires`, and theirs in turn) placed before
//! them, so that an endpoint installing in the job's order installs each
//! dependency first.
//!
//! A dependency resolves to the package the job names (which must be in
//! range), else to the highest version in range in the namespace. A
//! package whose dependencies cannot all be resolved (no version in range,
//! a range that cannot be read, a cycle, or the job naming a version out of
//! another package's range) is not installed, and neither is anything
//! brought in only for it; the job's other packages go on.

use caravan_api::v1alpha1::{Dependency, Package};

/// One package the job installs, and the packages of the job that require
/// it (none: the job names it).
#[derive(Debug)]
pub struct Resolved<'a> {
    pub package: &'a Package,
    pub required_by: Vec<String>,
}

/// The packages `named` (the job's, in its order) with their dependencies
/// from `pool` (the namespace's packages) before them, and the named
/// packages that could not be resolved, each with why.
pub fn resolve<'a>(
    named: &[&'a Package],
    pool: &[&'a Package],
) -> (Vec<Resolved<'a>>, Vec<(&'a Package, String)>) {
    let mut order = Vec::new();
    let mut failed = Vec::new();
    for p in named {
        let mut attempt: Vec<Resolved> = order
            .iter()
            .map(|r: &Resolved<'a>| Resolved {
                package: r.package,
                required_by: r.required_by.clone(),
            })
            .collect();
        let mut walk = Walk {
            named,
            pool,
            order: &mut attempt,
        };
        match walk.visit(p, None, &mut Vec::new()) {
            Ok(()) => order = attempt,
            Err(e) => failed.push((*p, e)),
        }
    }
    (order, failed)
}

/// The packages an uninstall job names, those that require others first
/// (so that nothing goes while a package of the job still needs it).
pub fn dependents_first(mut named: Vec<&Package>) -> Vec<&Package> {
    let mut order = Vec::with_capacity(named.len());
    while !named.is_empty() {
        let required = |p: &Package| {
            named.iter().any(|o| {
                o.spec.name != p.spec.name
                    && o.spec
                        .install
                        .requires
                        .iter()
                        .any(|d| d.name == p.spec.name)
            })
        };
        // In a cycle, the first.
        let next = named.iter().position(|p| !required(p)).unwrap_or(0);
        order.push(named.remove(next));
    }
    order
}

struct Walk<'a, 'o> {
    named: &'o [&'a Package],
    pool: &'o [&'a Package],
    order: &'o mut Vec<Resolved<'a>>,
}

impl<'a> Walk<'a, '_> {
    /// Places `p` (required by `by`, or named when `None`) after its
    /// dependencies; `path` is the chain of packages that led to it.
    fn visit(
        &mut self,
        p: &'a Package,
        by: Option<&str>,
        path: &mut Vec<String>,
    ) -> Result<(), String> {
        let name = &p.spec.name;
        if let Some(placed) = self.order.iter_mut().find(|r| r.package.spec.name == *name) {
            if placed.package.spec.artifact.digest != p.spec.artifact.digest {
                return Err(format!(
                    "the job installs package {name} {} and {}",
                    placed.package.spec.version, p.spec.version
                ));
            }
            match by {
                Some(by) if !placed.required_by.is_empty() => {
                    placed.required_by.push(by.to_string())
                }
                Some(_) => {}
                None => placed.required_by.clear(),
            }
            return Ok(());
        }
        p.spec
            .install
            .check()
            .map_err(|e| format!("package {name} {}: {e}", p.spec.version))?;
        if path.contains(name) {
            path.push(name.clone());
            return Err(format!("dependency cycle: {}", path.join(" → ")));
        }
        path.push(name.clone());
        for d in &p.spec.install.requires {
            let needs = || format!("package {name} {} requires {d}", p.spec.version);
            let dep = match self.order.iter().find(|r| r.package.spec.name == d.name) {
                // Placed already (named, or needed by another): it must do.
                Some(r) => match d.admits(&r.package.spec.version) {
                    Ok(true) => r.package,
                    Ok(false) => {
                        return Err(format!(
                            "{}, but the job installs {} {}",
                            needs(),
                            d.name,
                            r.package.spec.version
                        ))
                    }
                    Err(e) => return Err(format!("{}: {e}", needs())),
                },
                None => self.choose(d).map_err(|e| format!("{}: {e}", needs()))?,
            };
            self.visit(dep, Some(name), path)?;
        }
        path.pop();
        self.order.push(Resolved {
            package: p,
            required_by: by.into_iter().map(str::to_string).collect(),
        });
        Ok(())
    }

    /// The package that satisfies `d`: the one the job names if in range,
    /// else the highest version in range.
    fn choose(&self, d: &Dependency) -> Result<&'a Package, String> {
        if let Some(range) = &d.version {
            caravan_api::version::range(range)?;
        }
        let mut in_range = Vec::new();
        let mut versions = Vec::new();
        for p in self.pool.iter().filter(|p| p.spec.name == d.name) {
            versions.push(p.spec.version.as_str());
            // A version that is not semantic is simply not in range.
            if d.admits(&p.spec.version).unwrap_or(false) {
                in_range.push(*p);
            }
        }
        // The version the job names, wherever it names it, or none.
        if let Some(named) = self.named.iter().find(|n| n.spec.name == d.name) {
            let digest = named.spec.artifact.digest;
            return match in_range.iter().any(|p| p.spec.artifact.digest == digest) {
                true => Ok(named),
                false => Err(format!(
                    "the job installs {} {}",
                    d.name, named.spec.version
                )),
            };
        }
        let highest = in_range.into_iter().max_by(|a, b| {
            let (va, vb) = (&a.spec.version, &b.spec.version);
            match (
                caravan_api::version::semantic(va),
                caravan_api::version::semantic(vb),
            ) {
                (Ok(a), Ok(b)) => a.cmp(&b),
                _ => caravan_api::version::cmp(va, vb),
            }
        });
        highest.ok_or_else(|| match versions.is_empty() {
            true => format!("no package {} in the namespace", d.name),
            false => {
                versions.sort_by(|a, b| caravan_api::version::cmp(a, b));
                format!("no version in range (there are {})", versions.join(", "))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::fixtures::package;

    fn needing(mut p: Package, deps: &[(&str, &str)]) -> Package {
        p.spec.install.requires = deps
            .iter()
            .map(|(name, range)| Dependency {
                name: name.to_string(),
                version: (!range.is_empty()).then(|| range.to_string()),
            })
            .collect();
        p
    }

    fn names(r: &[Resolved]) -> Vec<String> {
        r.iter()
            .map(|r| {
                let by = match r.required_by.is_empty() {
                    true => String::new(),
                    false => format!(" for {}", r.required_by.join(",")),
                };
                format!("{} {}{by}", r.package.spec.name, r.package.spec.version)
            })
            .collect()
    }

    #[test]
    fn dependencies_come_first_at_the_highest_version_in_range() {
        let app = needing(
            package("app", "2.0.0"),
            &[("libfoo", ">=1.2, <2"), ("tools", "")],
        );
        let libfoo = needing(package("libfoo", "1.4.0"), &[("libc", "^1")]);
        let pool = [
            package("libfoo", "1.1.0"),
            libfoo.clone(),
            package("libfoo", "2.0.0"),
            package("libc", "1.0.0"),
            package("libc", "1.9.0"),
            package("tools", "3"),
            app.clone(),
        ];
        let pool: Vec<_> = pool.iter().collect();
        let (order, failed) = resolve(&[&app], &pool);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            names(&order),
            [
                "libc 1.9.0 for libfoo",
                "libfoo 1.4.0 for app",
                "tools 3 for app",
                "app 2.0.0"
            ]
        );
    }

    #[test]
    fn a_version_the_job_names_is_used_when_in_range_and_refused_when_not() {
        let app = needing(package("app", "1"), &[("libfoo", "^1.2")]);
        let (old, pinned, newest) = (
            package("libfoo", "1.0.0"),
            package("libfoo", "1.2.0"),
            package("libfoo", "1.5.0"),
        );
        let pool = vec![&app, &old, &pinned, &newest];
        // Named before or after the package that needs it: one libfoo, named.
        for named in [vec![&pinned, &app], vec![&app, &pinned]] {
            let (order, failed) = resolve(&named, &pool);
            assert!(failed.is_empty(), "{failed:?}");
            assert_eq!(names(&order), ["libfoo 1.2.0", "app 1"]);
        }
        // A named version out of range: app does not install, libfoo does
        // (wherever the job names it).
        for named in [vec![&old, &app], vec![&app, &old]] {
            let (order, failed) = resolve(&named, &pool);
            assert_eq!(names(&order), ["libfoo 1.0.0"]);
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0.spec.name, "app");
            assert!(
                failed[0]
                    .1
                    .starts_with("package app 1 requires libfoo ^1.2")
                    && failed[0].1.ends_with("the job installs libfoo 1.0.0"),
                "{}",
                failed[0].1
            );
        }
    }

    #[test]
    fn a_package_whose_dependencies_do_not_resolve_installs_nothing_and_says_why() {
        let app = needing(package("app", "1"), &[("libfoo", ">=3")]);
        let cli = needing(package("cli", "1"), &[("shared", ""), ("nowhere", "")]);
        let shared = package("shared", "1");
        let a = needing(package("a", "1"), &[("b", "")]);
        let b = needing(package("b", "1"), &[("a", "")]);
        let odd = needing(package("odd", "1"), &[("libfoo", ">>2")]);
        let pool = [
            app.clone(),
            cli.clone(),
            shared.clone(),
            a.clone(),
            b.clone(),
            package("libfoo", "1.0.0"),
            package("libfoo", "2.1"),
            package("tools", "1"),
        ];
        let pool: Vec<_> = pool.iter().collect();
        let tools = package("tools", "1");
        let (order, failed) = resolve(&[&app, &cli, &a, &odd, &tools], &pool);
        // Only tools: shared came in for cli alone, and went with it.
        assert_eq!(names(&order), ["tools 1"]);
        let why: Vec<_> = failed
            .iter()
            .map(|(p, e)| (p.spec.name.as_str(), e.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                ("app", "package app 1 requires libfoo >=3: no version in range (there are 1.0.0, 2.1)"),
                ("cli", "package cli 1 requires nowhere: no package nowhere in the namespace"),
                ("a", "dependency cycle: a → b → a"),
                (
                    "odd",
                    "package odd 1: install.requires[0].version: version range \">>2\" cannot be read: unexpected character '>' while parsing major version number"
                ),
            ]
        );
    }

    #[test]
    fn an_uninstall_takes_dependents_before_what_they_require() {
        let libc = package("libc", "1");
        let libfoo = needing(package("libfoo", "1"), &[("libc", "")]);
        let app = needing(package("app", "1"), &[("libfoo", ""), ("libc", "")]);
        let tools = package("tools", "1");
        let order: Vec<_> = dependents_first(vec![&libc, &tools, &libfoo, &app])
            .iter()
            .map(|p| p.spec.name.as_str())
            .collect();
        assert_eq!(order, ["tools", "app", "libfoo", "libc"]);
    }

    #[test]
    fn a_dependency_shared_by_two_packages_is_installed_once_for_both() {
        let app = needing(package("app", "1"), &[("libfoo", "^1")]);
        let web = needing(package("web", "1"), &[("libfoo", ">=1.1")]);
        let libfoo = package("libfoo", "1.3.0");
        let pool = vec![&app, &web, &libfoo];
        let (order, failed) = resolve(&[&app, &web], &pool);
        assert!(failed.is_empty());
        assert_eq!(
            names(&order),
            ["libfoo 1.3.0 for app,web", "app 1", "web 1"]
        );
    }
}
