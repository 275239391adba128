//! The install transaction: one package change on the endpoint, from a
//! verified archive to a committed version (or back), and its recovery
//! after a crash.
//!
//! # Expected flow
//!
//! An install of version V over version U (or over nothing):
//! 1. journal `Staging`; V is extracted next to U ([`layout`]: a hostile
//!    archive is refused before anything is written), synced, and made live
//!    by one rename of the package's symlink;
//! 2. journal `Swapped`; V's install script, then its health check, run;
//! 3. V's files are recorded as its drift baseline ([`crate::drift`]);
//!    journal `Configured`;
//! 4. U is deleted, `installed.json` names V, the journal is cleared.
//!
//! Should U ask for it (`uninstallOnUpgrade`), U's uninstall script runs
//! first (journal `Replacing`), and if V then fails, U's install script
//! runs again once U's files are back.
//!
//! A version the package's detection rules found (`detected`) has no files
//! in the install root: an install over it is a first install, and its
//! removal only forgets it.
//!
//! An uninstall: journal `Unconfiguring`, the uninstall script runs;
//! journal `Removing`, the files go, `installed.json` forgets the package,
//! the journal is cleared.
//!
//! # Guarantees
//!
//! - A package is always wholly at U or wholly at V: the switch is one
//!   rename, and U stays on disk until V is committed.
//! - A failing script or health check puts U back (or nothing, for a first
//!   install) before the error is returned.
//! - Killed at any point, the agent's next start ([`recover`], before
//!   anything else touches the install root) rolls back an install whose
//!   script had not finished, finishes one whose script had, repeats an
//!   uninstall whose script had not finished and finishes one whose script
//!   had. No script that finished runs twice for the same change.
//!
//! # Caveats
//!
//! - What a script changes outside the package directory is the script's
//!   business: a rollback restores the package's files, not the system.
//! - A script killed halfway by a crash runs again (for an install, from
//!   U after the rollback): scripts should be idempotent.
//! - An upgrade killed after the old version's uninstall script ran
//!   (`uninstallOnUpgrade`) comes back with the old version's files but
//!   not set up again: the upgrade, tried again, runs that script again
//!   first; should the job have changed meanwhile, the old version stays
//!   unconfigured until its next install.
//! - Durability needs a filesystem that honours fsync and rename; the
//!   install root and the state directory may be on different filesystems,
//!   but each version must be on the install root's.

pub mod journal;
mod layout;
pub mod scripts;

use std::path::Path;

use anyhow::Context as _;

use journal::{Entry, Step};
pub use layout::is_live;
use scripts::{Action, Target};

use crate::{
    drift::Baseline,
    failpoint,
    state::{Installed, InstalledRecord, StateDir},
};

/// Package changes in one install root, journalled in one state directory.
pub struct Transaction<'a> {
    pub state: &'a StateDir,
    pub root: &'a Path,
    /// Most bytes one package may unpack to (see [`crate::policy::unpack_limits`]).
    pub max_unpacked_bytes: u64,
    /// Whom package scripts run as (`None`: the agent's own user).
    pub run_as: Option<&'a scripts::RunAs>,
}

/// A committed install.
pub struct Installation {
    /// The tail of the install script's output.
    pub output: String,
    /// What the new version consists of, for drift.
    pub baseline: Baseline,
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context(what)?
}

impl Transaction<'_> {
    fn journal(
        &self,
        package: &str,
        step: Step,
        to: Option<&InstalledRecord>,
    ) -> anyhow::Result<()> {
        let entry = Entry {
            package: package.to_string(),
            step,
            to: to.cloned(),
        };
        journal::write(self.state, Some(&entry))
    }

    /// Puts the version before the change back (and, if its uninstall
    /// script ran for the upgrade, its install script again) and ends the
    /// change. `Err` only when that cannot be done.
    async fn roll_back(
        &self,
        package: &str,
        installed: &Installed,
        replaced: Option<&InstalledRecord>,
    ) -> anyhow::Result<()> {
        let (root, name) = (self.root.to_path_buf(), package.to_string());
        let previous = on_disk(installed, package).map(|r| r.digest);
        blocking("rollback task", move || {
            layout::roll_back(&root, &name, previous.as_ref())
        })
        .await?;
        journal::write(self.state, None)?;
        if let Some(old) = replaced {
            let target = self.target(old, None);
            scripts::run_for(
                &target,
                Action::Install,
                &self.root.join(package),
                self.root,
            )
            .await
            .with_context(|| {
                format!(
                    "package {package} {} is back, but not set up again",
                    old.version
                )
            })?;
        }
        Ok(())
    }

    /// The scripts of `record`, run as this transaction's user.
    fn target<'r>(
        &'r self,
        record: &'r InstalledRecord,
        upgrade_to: Option<&'r str>,
    ) -> Target<'r> {
        Target {
            name: &record.name,
            version: &record.version,
            install: &record.install,
            run_as: self.run_as,
            upgrade_to,
        }
    }

    /// Installs `to` from the verified archive `blob` (see the module docs),
    /// updating `installed` once committed.
    pub async fn install(
        &self,
        blob: &Path,
        to: &InstalledRecord,
        installed: &mut Installed,
    ) -> anyhow::Result<Installation> {
        let name = &to.name;
        let old = on_disk(installed, name).cloned();
        let previous = old.as_ref().map(|r| r.digest);
        let limits = crate::policy::unpack_limits(self.root, self.max_unpacked_bytes)?;
        // The version replaced goes first, if it asks to.
        let replaced = old.filter(|r| {
            r.digest != to.digest
                && r.install
                    .script
                    .as_ref()
                    .is_some_and(|s| s.uninstall_on_upgrade)
                && scripts::script_for(&r.install, Action::Uninstall).is_some()
        });
        if let Some(old) = &replaced {
            self.journal(name, Step::Replacing, Some(to))?;
            let target = self.target(old, Some(&to.version));
            let done =
                scripts::run_for(&target, Action::Uninstall, &self.root.join(name), self.root)
                    .await;
            if let Err(e) = done {
                journal::write(self.state, None)?;
                return Err(e.context(format!(
                    "package {name} kept at {}: its uninstall script failed before the upgrade to {}",
                    old.version, to.version
                )));
            }
        }
        self.journal(name, Step::Staging, Some(to))?;
        let (b, r, n, d) = (
            blob.to_path_buf(),
            self.root.to_path_buf(),
            name.clone(),
            to.digest,
        );
        let staged = blocking("install task", move || {
            layout::stage_and_swap(&b, &r, &n, &d, previous.as_ref(), &limits)
        })
        .await;
        if let Err(e) = staged {
            let e = e.context(format!("installing package {name} {}", to.version));
            let rollback = self.roll_back(name, installed, replaced.as_ref()).await;
            return Err(after(e, rollback));
        }
        self.journal(name, Step::Swapped, Some(to))?;
        failpoint::hit("swapped");
        // The install script, then the health check: either failing puts
        // the previous version (or nothing) back.
        let dir = self.root.join(name);
        let package = self.target(to, None);
        let mut output = String::new();
        for action in [Action::Install, Action::Health] {
            match scripts::run_for(&package, action, &dir, self.root).await {
                Ok(tail) if action == Action::Install => output = tail,
                Ok(_) => {}
                Err(e) => {
                    let e = e.context(format!("package {name} {} rolled back", to.version));
                    let rollback = self.roll_back(name, installed, replaced.as_ref()).await;
                    return Err(after(e, rollback));
                }
            }
        }
        // What the version consists of once its script has run: the baseline for drift.
        let baseline = blocking("baseline task", move || Ok(Baseline::record(&dir)?))
            .await
            .with_context(|| format!("recording the files of package {name}"))?;
        baseline.save(self.state, &to.digest)?;
        self.journal(name, Step::Configured, Some(to))?;
        failpoint::hit("configured");
        let (r, n, d) = (self.root.to_path_buf(), name.clone(), to.digest);
        blocking("install task", move || layout::drop_old(&r, &n, &d)).await?;
        failpoint::hit("old-dropped");
        installed.insert(name.clone(), to.clone());
        self.commit(installed)?;
        Ok(Installation { output, baseline })
    }

    /// Removes `package` (see the module docs), updating `installed`.
    /// Nothing to do if it is not installed.
    pub async fn uninstall(&self, package: &str, installed: &mut Installed) -> anyhow::Result<()> {
        let Some(record) = installed.get(package).cloned() else {
            return Ok(());
        };
        if record.detected {
            // Not Caravan's to remove: forgotten, left as found.
            installed.remove(package);
            return self.commit(installed);
        }
        if scripts::script_for(&record.install, Action::Uninstall).is_some() {
            self.journal(package, Step::Unconfiguring, None)?;
            failpoint::hit("unconfiguring");
            let p = self.target(&record, None);
            let done =
                scripts::run_for(&p, Action::Uninstall, &self.root.join(package), self.root).await;
            if let Err(e) = done {
                journal::write(self.state, None)?;
                return Err(e.context(format!("package {package} kept")));
            }
        }
        self.journal(package, Step::Removing, None)?;
        failpoint::hit("removing");
        let (r, p) = (self.root.to_path_buf(), package.to_string());
        blocking("remove task", move || layout::remove_package(&r, &p)).await?;
        failpoint::hit("removed");
        installed.remove(package);
        self.commit(installed)
    }

    /// The change is done: the record says so, the journal is cleared.
    fn commit(&self, installed: &Installed) -> anyhow::Result<()> {
        self.state.set_installed(installed)?;
        journal::write(self.state, None)?;
        Baseline::prune(self.state, installed)
    }
}

/// The failure `e`, and what else went wrong putting things back after it.
fn after(e: anyhow::Error, rollback: anyhow::Result<()>) -> anyhow::Error {
    match rollback {
        Ok(()) => e,
        Err(r) => anyhow::anyhow!("{e:#}; then, putting it back: {r:#}"),
    }
}

/// The installed version of `package` whose files Caravan put in the install
/// root (not one it only detected).
fn on_disk<'i>(installed: &'i Installed, package: &str) -> Option<&'i InstalledRecord> {
    installed.get(package).filter(|r| !r.detected)
}

/// What [`recover`] does about a change interrupted at `step`.
fn recovery(step: Step, to: Option<&InstalledRecord>) -> Recovery<'_> {
    match (step, to) {
        (Step::Staging | Step::Swapped, _) => Recovery::RollBack,
        (Step::Configured, Some(to)) => Recovery::Commit(to),
        (Step::Unconfiguring | Step::Replacing, _) => Recovery::Nothing,
        (Step::Removing, _) | (Step::Configured, None) => Recovery::Remove,
    }
}

#[derive(Debug, PartialEq)]
enum Recovery<'a> {
    /// Put the previous version back.
    RollBack,
    /// Finish the install of this version.
    Commit(&'a InstalledRecord),
    /// Leave it as it is: the uninstall runs again.
    Nothing,
    /// Finish the removal.
    Remove,
}

/// Finishes or undoes the change the journal records, if any (at start-up,
/// before anything else touches the install root). Returns what it did.
pub fn recover(state: &StateDir, root: &Path) -> anyhow::Result<Option<String>> {
    let Some(entry) = journal::read(state)? else {
        return Ok(None);
    };
    let mut installed = state.installed()?;
    let package = &entry.package;
    match recovery(entry.step, entry.to.as_ref()) {
        Recovery::RollBack => {
            let previous = on_disk(&installed, package).map(|r| r.digest);
            layout::roll_back(root, package, previous.as_ref())?;
        }
        Recovery::Commit(to) => {
            layout::drop_old(root, package, &to.digest)?;
            installed.insert(package.clone(), to.clone());
            state.set_installed(&installed)?;
        }
        Recovery::Nothing => {}
        Recovery::Remove => {
            layout::remove_package(root, package)?;
            installed.remove(package);
            state.set_installed(&installed)?;
        }
    }
    journal::write(state, None)?;
    let what = format!(
        "package {package}: a change interrupted at step {:?} was {}",
        entry.step,
        entry.step.outcome()
    );
    tracing::warn!("{what}");
    Ok(Some(what))
}

#[cfg(test)]
mod tests;
