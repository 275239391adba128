//! Removes, every `--blob-gc-interval-seconds`, the blobs no Package
//! references any more (after `--blob-grace-seconds`, so a push can be
//! followed by its commit at leisure): deleting a package from Git frees
//! its space. Interrupted uploads nobody resumed within the grace go too.

use std::{collections::HashSet, sync::Arc, time::Duration};

use caravan_api::v1alpha1::Package;
use futures::FutureExt;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use super::BlobStore;

pub struct Collector {
    pub blobs: Arc<BlobStore>,
    pub packages: Store<Package>,
    pub interval: Duration,
    pub grace: Duration,
}

impl Collector {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            // Only with a complete view of the packages: a half-filled cache
            // would make every blob look unreferenced.
            if self.packages.wait_until_ready().now_or_never().is_none() {
                continue;
            }
            let keep: HashSet<_> = self
                .packages
                .state()
                .iter()
                .map(|p| p.spec.artifact.digest)
                .collect();
            match self.blobs.remove_stale_uploads(self.grace).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "removed interrupted uploads nobody resumed"),
                Err(e) => tracing::warn!(error = %e, "removing stale uploads failed"),
            }
            match self.blobs.remove_unreferenced(&keep, self.grace).await {
                Ok(removed) => {
                    for digest in removed {
                        tracing::info!(blob = %digest, "removed blob no package references");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "blob garbage collection failed"),
            }
        }
    }
}
