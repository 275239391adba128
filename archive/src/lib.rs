//! Caravan's package archive format, both ends of it: a package is a
//! zstd-compressed tar whose bytes the Package manifest pins by digest.
//!
//! - [`pack`] (the CLI) writes it reproducibly: entries in sorted order, zero
//!   timestamps and owners, modes kept, symlinks kept as links, empty
//!   directories kept, so the same directory always gives the same digest.
//! - [`check`] and [`extract`] (the agent) read it defensively: no absolute
//!   paths, no `..`, nothing beneath a link, no link (or chain of links)
//!   out of the target, no device files or FIFOs, every entry's data as long
//!   as its header says, no setuid/setgid/world-writable modes, and no more
//!   than [`Limits`] allow. A hostile archive is refused before anything is
//!   written (`check` reads it all first), and nothing is ever written
//!   outside the target directory. The fuzz target
//!   `fuzz/fuzz_targets/archive.rs` holds them to that.

mod extract;
mod pack;

pub use extract::{check, extract, ArchiveError, Limits, MODE_MASK};
pub use pack::pack;
