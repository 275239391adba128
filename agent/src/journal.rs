//! The install journal: which step of which package change the agent is in,
//! written (fsync, atomic rename) before the step starts. An agent killed at
//! any point finds it on its next start and finishes or undoes the change,
//! so a package is always wholly at its old version or wholly at its new
//! one, and a script that finished never runs again for the same change.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    install,
    state::{InstalledRecord, StateDir},
};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub package: String,
    pub step: Step,
    /// What the package is once the change is done (`None`: removed).
    pub to: Option<InstalledRecord>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Step {
    /// Extracting the new version next to the live one and swapping it in.
    Staging,
    /// The new version is live; its install script has not finished.
    Swapped,
    /// The install script has finished: only bookkeeping is left.
    Configured,
    /// The uninstall script is running.
    Unconfiguring,
    /// The uninstall script has finished: the files go.
    Removing,
}

impl Step {
    /// What the next start does about a change interrupted at this step.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Staging | Self::Swapped => "rolled back to the previous version",
            Self::Configured => "finished (the install script had run)",
            Self::Unconfiguring => "left installed; the uninstall runs again",
            Self::Removing => "finished (the uninstall script had run)",
        }
    }
}

/// Finishes or undoes the change the journal records, if any (at start-up,
/// before anything else touches the install root). Returns what it did.
pub fn recover(state: &StateDir, root: &Path) -> anyhow::Result<Option<String>> {
    let Some(entry) = state.journal()? else {
        return Ok(None);
    };
    let mut installed: BTreeMap<String, InstalledRecord> = state.installed()?;
    let package = &entry.package;
    match (entry.step, &entry.to) {
        (Step::Staging | Step::Swapped, _) => {
            let previous = installed.get(package).map(|r| r.digest.as_str());
            install::roll_back(root, package, previous)?;
        }
        (Step::Configured, Some(to)) => {
            install::drop_old(root, package, &to.digest)?;
            installed.insert(package.clone(), to.clone());
            state.set_installed(&installed)?;
        }
        (Step::Unconfiguring, _) => {}
        (Step::Removing, _) | (Step::Configured, None) => {
            install::remove_package(root, package)?;
            installed.remove(package);
            state.set_installed(&installed)?;
        }
    }
    state.set_journal(None)?;
    let what = format!(
        "package {package}: a change interrupted at step {:?} was {}",
        entry.step,
        entry.step.outcome()
    );
    tracing::warn!("{what}");
    Ok(Some(what))
}
