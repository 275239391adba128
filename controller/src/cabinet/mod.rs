//! Cabinets, as the controller keeps them: the built-in content-addressed
//! blob store ([`BlobStore`]), the fetches that copy the artifacts of `http`
//! and `oci` cabinets ([`registry`]) into it, verified ([`pull::Pulls`]),
//! and the collection of blobs
//! no Package references any more ([`gc::Collector`]).

pub mod gc;
pub mod pull;
pub mod registry;
mod store;

pub use store::{BlobStore, StoreError};
