//! What a backup archive holds (`caravan backup` writes it, `caravan
//! restore` reads it): one tar, in this order, so that it is read as it
//! streams:
//!
//! 1. [`MANIFEST`]: the [`Manifest`] (the release that wrote it, the root
//!    its controller signed with);
//! 2. [`OBJECTS`]: every Caravan object, status included, and the Secrets
//!    they use, one YAML document each, as the API server returned them;
//! 3. under [`DATA`], what of the controller's data directory cannot be
//!    made again, each a [`DataEntry`]: the secret key its credentials and
//!    CAs derive from, the ledger of published packages, the trust root's
//!    keys and roots, the built-in store's blobs. (Git checkouts are
//!    fetched again.)
//! 4. [`END`]: the [`End`], so that an archive cut short at an entry's
//!    end is not taken for a whole one.
//!
//! The controller writes and reads the third part (`GET /v1/backup`, `PUT
//! /v1/restore`); it never takes an entry this module does not name.

use serde::{Deserialize, Serialize};

use crate::Digest;

/// The archive's first entry.
pub const MANIFEST: &str = "caravan-backup.json";
/// The archive's second entry.
pub const OBJECTS: &str = "objects.yaml";
/// The archive's last entry.
pub const END: &str = "caravan-backup.end";
/// The largest [`OBJECTS`] read.
pub const MAX_OBJECTS_BYTES: u64 = 1 << 30;
/// The prefix of the controller's data in the archive.
pub const DATA: &str = "data/";
/// This layout; a reader refuses another.
pub const FORMAT: u32 = 1;

/// The secret key file in the controller's data directory.
pub const TOKEN_KEY: &str = "token.key";
/// Its size.
pub const TOKEN_KEY_BYTES: u64 = 32;
/// The ledger of every name+version published, and of cabinets that
/// require signatures.
pub const LEDGER: &str = "published.json";
/// The largest ledger taken.
pub const MAX_LEDGER_BYTES: u64 = 256 << 20;
/// The directory of the trust root's keys and roots.
pub const TRUST_DIR: &str = "trust";
/// The directory of the built-in store (its blobs under `sha256/<hex>`).
pub const BLOBS_DIR: &str = "blobs";
/// The largest trust-root key or root file taken.
pub const MAX_TRUST_FILE_BYTES: u64 = 64 << 10;

/// The file name of root `version`'s private key in [`TRUST_DIR`].
pub fn trust_key_name(version: u64) -> String {
    format!("key-{version}")
}

/// The file name of root `version` in [`TRUST_DIR`].
pub fn trust_root_name(version: u64) -> String {
    format!("root-{version}.json")
}

/// A stored blob's path in the built-in store's directory.
pub fn blob_path(digest: &Digest) -> String {
    format!("sha256/{}", digest.hex())
}

/// Where the archive came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The release of the `caravan` that wrote it.
    pub release: String,
    /// When it was taken (RFC 3339).
    pub created: String,
    /// What the controller said of itself when it was taken.
    pub controller: RestoreState,
    /// How many objects [`OBJECTS`] holds.
    pub objects: usize,
}

/// The archive's last entry: what came before it under [`DATA`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct End {
    pub data_entries: u64,
    pub data_bytes: u64,
}

/// What a controller says of itself (`GET /v1/restore`, and the answer to a
/// restore): after a restore it says the backup's root and CA.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreState {
    /// The controller's release.
    pub release: String,
    /// The fingerprint of the newest root it signs under (what agents pin).
    pub trust_root_sha256: String,
    /// The CA (PEM) that issues the controller its own certificate when it
    /// is given none.
    pub controller_ca: String,
    /// The controller waits for a restore (started with `--await-restore`
    /// on an empty data directory) and does nothing else until then.
    pub awaiting: bool,
}

/// One file of the controller's data directory in a backup, by its path
/// under [`DATA`] (the same path as in the data directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataEntry {
    /// `token.key`.
    TokenKey,
    /// `published.json`: the ledger of published packages.
    Ledger,
    /// `trust/key-<n>`: root `n`'s private key.
    TrustKey(u64),
    /// `trust/root-<n>.json`: root `n`.
    TrustRoot(u64),
    /// `blobs/sha256/<hex>`: a blob of the built-in store.
    Blob(Digest),
}

impl DataEntry {
    /// Reads a path, refusing anything that is not one of the entries
    /// (`..`, absolute paths, other files) with a message naming it.
    pub fn parse(path: &str) -> Result<Self, String> {
        let version = |n: &str| {
            n.parse::<u64>()
                .ok()
                .filter(|v| *v >= 1 && n == v.to_string())
        };
        let entry = if path == TOKEN_KEY {
            Some(Self::TokenKey)
        } else if path == LEDGER {
            Some(Self::Ledger)
        } else if let Some(name) = path
            .strip_prefix(TRUST_DIR)
            .and_then(|p| p.strip_prefix('/'))
        {
            name.strip_prefix("key-")
                .and_then(version)
                .map(Self::TrustKey)
                .or_else(|| {
                    name.strip_prefix("root-")
                        .and_then(|n| n.strip_suffix(".json"))
                        .and_then(version)
                        .map(Self::TrustRoot)
                })
        } else if let Some(hex) = path
            .strip_prefix(BLOBS_DIR)
            .and_then(|p| p.strip_prefix("/sha256/"))
        {
            Digest::from_hex(hex).ok().map(Self::Blob)
        } else {
            None
        };
        entry.ok_or_else(|| {
            format!("{path:?} is not a file of a controller's data directory (token.key, trust/key-<n>, trust/root-<n>.json, blobs/sha256/<hex>)")
        })
    }

    /// The entry's path in the data directory (and under [`DATA`]).
    pub fn path(&self) -> String {
        match self {
            Self::TokenKey => TOKEN_KEY.to_string(),
            Self::Ledger => LEDGER.to_string(),
            Self::TrustKey(n) => format!("{TRUST_DIR}/{}", trust_key_name(*n)),
            Self::TrustRoot(n) => format!("{TRUST_DIR}/{}", trust_root_name(*n)),
            Self::Blob(digest) => format!("{BLOBS_DIR}/{}", blob_path(digest)),
        }
    }

    /// The most bytes the entry may hold, blobs at most `max_blob`.
    pub fn max_size(&self, max_blob: u64) -> u64 {
        match self {
            Self::TokenKey => TOKEN_KEY_BYTES,
            Self::Ledger => MAX_LEDGER_BYTES,
            Self::TrustKey(_) | Self::TrustRoot(_) => MAX_TRUST_FILE_BYTES,
            Self::Blob(_) => max_blob,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_data_directorys_own_files_are_entries() {
        let digest = Digest::of(b"blob");
        for entry in [
            DataEntry::TokenKey,
            DataEntry::Ledger,
            DataEntry::TrustKey(1),
            DataEntry::TrustRoot(12),
            DataEntry::Blob(digest),
        ] {
            assert_eq!(DataEntry::parse(&entry.path()), Ok(entry));
        }
        for hostile in [
            "../token.key",
            "/token.key",
            "trust/../token.key",
            "trust/key-0",
            "trust/key-01",
            "trust/root-1",
            "trust/root-x.json",
            "blobs/sha256/../../etc/passwd",
            &format!("blobs/sha256/{}/x", digest.hex()),
            "blobs/uploads/abc",
            "git/repo/config",
            "",
        ] {
            let err = DataEntry::parse(hostile).unwrap_err();
            assert!(err.contains(&format!("{hostile:?}")), "{err}");
        }
        assert_eq!(DataEntry::TokenKey.max_size(9), TOKEN_KEY_BYTES);
        assert_eq!(DataEntry::Blob(digest).max_size(9), 9);
    }
}
