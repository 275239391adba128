//! Reconcilers that turn custom resources into other cluster objects.

pub mod site;
