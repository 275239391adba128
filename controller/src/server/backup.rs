//! Backups (backup token): `GET /v1/backup` streams the controller's part
//! of one ([`crate::backup::write`]); `GET /v1/restore` says what the
//! controller is ([`RestoreState`]); `PUT /v1/restore` takes a backup's
//! data into a controller that awaits one ([`crate::backup::restore`]),
//! answers with what it now is, and has it start again with those keys.

use std::{path::PathBuf, sync::Arc};

use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use caravan_api::{backup::RestoreState, wire::paths};
use caravan_net::server::ApiError;
use futures::TryStreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::{backup::RestoreError, ca::Ca, credentials::CredentialKey};

/// What the backup calls need.
pub struct BackupState {
    data_dir: PathBuf,
    token: Option<String>,
    /// The largest blob a restore takes (the largest upload).
    max_blob: u64,
    /// What the controller is: its root (none while it awaits a restore)
    /// and CA.
    state: RestoreState,
    /// Cancelled once a restore is in: the controller then starts again.
    /// `None`: it has keys of its own and takes no restore.
    restored: Option<CancellationToken>,
    /// One restore at a time in this process (and a file lock between
    /// replicas: `crate::backup::restore`).
    restoring: tokio::sync::Mutex<()>,
}

impl BackupState {
    /// For a controller with `credentials` whose root is `trust_root`
    /// (`None` while it awaits a restore, which cancels `restored`).
    pub fn new(
        config: &crate::Config,
        credentials: &CredentialKey,
        trust_root: Option<String>,
        restored: Option<CancellationToken>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            data_dir: config.data_dir.clone(),
            token: config.backup_token.clone(),
            max_blob: config.max_upload_bytes,
            state: RestoreState {
                release: caravan_api::RELEASE.into(),
                awaiting: trust_root.is_none(),
                trust_root_sha256: trust_root.unwrap_or_default(),
                controller_ca: Ca::controller(credentials)?.cert_pem().to_string(),
            },
            restored,
            restoring: Default::default(),
        }))
    }

    fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        super::check_token(self.token.as_deref(), "backup", headers)
    }
}

pub fn router(state: Arc<BackupState>) -> Router {
    Router::new()
        .route(paths::BACKUP, get(backup))
        .route(paths::RESTORE, get(whoami).put(restore))
        .with_state(state)
}

/// The controller's part of a backup, streamed as it is read.
async fn backup(
    State(s): State<Arc<BackupState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    s.check(&headers)?;
    if s.restored.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this controller awaits a restore: it has nothing to back up",
        ));
    }
    let (mut out, body) = caravan_net::pipe::pipe();
    let dir = s.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        match crate::backup::write(&dir, &mut out).and_then(|blobs| out.finish().map(|()| blobs)) {
            Ok(blobs) => tracing::info!(blobs, "backup data sent"),
            // The answer ends in an error, so the client sees it cut.
            Err(e) => tracing::warn!(error = %e, "backup data not sent whole"),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(body),
    )
        .into_response())
}

/// What the controller is.
async fn whoami(
    State(s): State<Arc<BackupState>>,
    headers: HeaderMap,
) -> Result<Json<RestoreState>, ApiError> {
    s.check(&headers)?;
    Ok(Json(s.state.clone()))
}

/// Takes a backup's data, then has the controller start again with it.
async fn restore(
    State(s): State<Arc<BackupState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RestoreState>, ApiError> {
    s.check(&headers)?;
    let Some(restored) = s.restored.clone() else {
        return Err(ApiError::new(StatusCode::CONFLICT, crate::backup::HAS_KEYS));
    };
    let Ok(_one) = s.restoring.try_lock() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "a restore is in progress",
        ));
    };
    if restored.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "restored already; the controller is starting again",
        ));
    }
    let input = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
        body.into_data_stream().map_err(std::io::Error::other),
    ));
    let (dir, max) = (s.data_dir.clone(), s.max_blob);
    let outcome = tokio::task::spawn_blocking(move || crate::backup::restore(&dir, max, input))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let done = outcome.map_err(|e| match e {
        RestoreError::Refused(why) => {
            ApiError::new(StatusCode::BAD_REQUEST, format!("backup refused: {why}"))
        }
        e @ RestoreError::Io { .. } => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    })?;
    // In: whatever follows, the controller starts again with it.
    restored.cancel();
    let (credentials, trust) = load(&s.data_dir)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let now = RestoreState {
        release: caravan_api::RELEASE.into(),
        trust_root_sha256: trust.fingerprint(),
        controller_ca: Ca::controller(&credentials)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .cert_pem()
            .to_string(),
        awaiting: false,
    };
    tracing::info!(blobs = done.blobs, bytes = done.bytes, root = %now.trust_root_sha256, "backup restored; starting again with its keys");
    Ok(Json(now))
}

/// The restored key and root, read (never made: they are there).
fn load(data_dir: &std::path::Path) -> anyhow::Result<(CredentialKey, crate::trust::TrustKeys)> {
    use caravan_api::backup::{TOKEN_KEY, TRUST_DIR};
    anyhow::ensure!(
        data_dir.join(TOKEN_KEY).exists() && data_dir.join(TRUST_DIR).exists(),
        "the restored data is not in {}",
        data_dir.display()
    );
    Ok((
        CredentialKey::load_or_create(&data_dir.join(TOKEN_KEY))?,
        crate::trust::TrustKeys::load_or_create(&data_dir.join(TRUST_DIR))?,
    ))
}
