//! The install journal: which step of which package change the agent is
//! in, written durably (fsync, atomic rename) before the step starts, in
//! `journal.json` of the state directory.

use serde::{Deserialize, Serialize};

use crate::state::{InstalledRecord, StateDir};

const FILE: &str = "journal.json";

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
    /// The uninstall script of the version an upgrade replaces is running
    /// (it asked for that: `uninstallOnUpgrade`); nothing is staged yet.
    Replacing,
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
            Self::Replacing => "left at the previous version; the upgrade runs again",
            Self::Unconfiguring => "left installed; the uninstall runs again",
            Self::Removing => "finished (the uninstall script had run)",
        }
    }
}

/// The change in progress, if any.
pub fn read(state: &StateDir) -> anyhow::Result<Option<Entry>> {
    state.json(FILE)
}

/// Records the step about to start (`None`: the change is over).
pub fn write(state: &StateDir, entry: Option<&Entry>) -> anyhow::Result<()> {
    state.set_json(FILE, entry)
}
