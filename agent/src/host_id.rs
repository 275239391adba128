//! Where the host ID an agent enrolls with comes from: made at random on
//! first start (the default), or derived from an identity of the machine
//! that survives an OS reinstall (`--host-id-from
//! /sys/class/dmi/id/product_uuid`, the SMBIOS product UUID), so that a
//! reimaged endpoint enrolls as the same Agent. Its secret is gone with the
//! old disk, so the controller lets it take the Agent over only once an
//! administrator approves (see the controller's `enroll`).
//!
//! Either way the ID is made once: a state directory keeps the ID it has.

use std::{io::Read as _, path::Path};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// Values firmware puts where a product UUID belongs on machines that have
/// none of their own (compared lowercase, trimmed). Every such machine would
/// be the same host.
const PLACEHOLDERS: &[&str] = &[
    "03000200-0400-0500-0006-000700080009",
    "not settable",
    "not present",
    "not specified",
    "to be filled by o.e.m.",
    "default string",
    "none",
];

/// Gives a state directory that has no host ID yet the one derived from
/// the machine identity in `path`. One that has an ID keeps it (it is the
/// Agent's), whatever the file says now.
pub fn adopt(state: &crate::state::StateDir, path: &Path) -> anyhow::Result<()> {
    match state.identity()? {
        Some((kept, _)) => {
            if derive(path).is_ok_and(|derived| derived != kept) {
                tracing::info!(host_id = %kept, from = %path.display(), "keeping the host ID this state directory has; --host-id-from applies to a new one");
            }
            Ok(())
        }
        None => state.set_host_id(&derive(path)?),
    }
}

/// Most bytes read from the file (a product UUID is 36).
const MAX_LEN: u64 = 1024;

/// The host ID derived from the machine identity in `path`: a hash of it
/// (32 hex digits), so the hardware's own identifier is never sent. An
/// identity that is a placeholder, or too short to tell machines apart, is
/// refused by name.
pub fn derive(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_LEN).read_to_string(&mut text))
        .with_context(|| format!("reading the machine identity in {}", path.display()))?;
    let identity = text.trim().to_ascii_lowercase();
    let digits: Vec<char> = identity.chars().filter(char::is_ascii_hexdigit).collect();
    let placeholder = PLACEHOLDERS.contains(&identity.as_str())
        || digits.len() < 16
        || digits.iter().all(|c| *c == digits[0]);
    anyhow::ensure!(
        !placeholder,
        "{} holds {identity:?}, not an identity of this machine (firmware gives that to machines without one, so they would all be the same host): run without --host-id-from",
        path.display()
    );
    let hash = Sha256::new()
        .chain_update(b"caravan host id\0")
        .chain_update(identity.as_bytes())
        .finalize();
    Ok(hex::encode(&hash[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(identity: &str) -> anyhow::Result<String> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("product_uuid");
        std::fs::write(&path, identity)?;
        derive(&path)
    }

    #[test]
    fn a_machine_identity_gives_the_same_host_id_every_time_and_placeholders_none() {
        let uuid = "4C4C4544-0035-3010-8052-B4C04F564433\n";
        let id = derived(uuid).unwrap();
        assert_eq!(id.len(), 32);
        assert!(caravan_api::names::host_id(&id).is_ok(), "{id}");
        // The same machine after a reinstall (the kernel may print it in
        // either case).
        assert_eq!(derived(&uuid.to_lowercase()).unwrap(), id);
        assert_ne!(derived("4C4C4544-0035-3010-8052-B4C04F564434").unwrap(), id);
        assert!(!id.contains("4c4c4544"), "the identity itself is not sent");
        for placeholder in [
            "03000200-0400-0500-0006-000700080009",
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "To Be Filled By O.E.M.",
            "",
        ] {
            let e = derived(placeholder).unwrap_err().to_string();
            assert!(e.contains("not an identity of this machine"), "{e}");
        }
        let missing = derive(Path::new("/nonexistent/product_uuid")).unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/product_uuid"));
    }

    #[test]
    fn only_a_state_directory_without_a_host_id_takes_the_derived_one() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = dir.path().join("product_uuid");
        std::fs::write(&uuid, "4C4C4544-0035-3010-8052-B4C04F564433").unwrap();
        let fresh = crate::state::StateDir::open(&dir.path().join("fresh")).unwrap();
        adopt(&fresh, &uuid).unwrap();
        assert_eq!(fresh.host_id().unwrap(), derive(&uuid).unwrap());
        let old = crate::state::StateDir::open(&dir.path().join("old")).unwrap();
        let random = old.host_id().unwrap();
        adopt(&old, &uuid).unwrap();
        assert_eq!(old.host_id().unwrap(), random, "an enrolled ID is kept");
        // A placeholder is refused only where it would be used.
        std::fs::write(&uuid, "Not Settable").unwrap();
        adopt(&old, &uuid).unwrap();
        let new = crate::state::StateDir::open(&dir.path().join("new")).unwrap();
        assert!(adopt(&new, &uuid).is_err());
        assert!(new.identity().unwrap().is_none());
    }
}
