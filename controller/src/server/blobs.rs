//! Blobs: served to relays (only those of their site and the sites below)
//! and to the publisher holding the upload token (any: `caravan cabinet
//! copy` moves them to a registry), and uploaded by `caravan package push`
//! (upload token; resumable; the digest is verified before a blob enters
//! the store).

use axum::{
    body::Body,
    extract::{Path, Request, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use caravan_api::wire::UploadState;
use caravan_net::server::{serve_blob, ApiError};

use super::{parse_digest, AppState, RelaySite};
use crate::{cabinet::StoreError, context::Context};

/// Who reads a blob.
pub enum Reader {
    /// A relay: only the blobs its site's agents are assigned.
    Relay(RelaySite),
    /// The publisher (upload token): any.
    Publisher,
}

impl axum::extract::FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        if check_upload_token(&state.ctx, &parts.headers).is_ok() {
            return Ok(Self::Publisher);
        }
        RelaySite::from_request_parts(parts, state)
            .await
            .map(Self::Relay)
    }
}

/// Serves a blob from the store; `Range` and `If-Range` are honoured.
pub async fn get(
    State(s): State<AppState>,
    reader: Reader,
    Path(digest): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let digest = parse_digest(&digest)?;
    let site = match reader {
        Reader::Relay(RelaySite(site)) => site,
        Reader::Publisher => return serve_stored(&s, &digest, req).await,
    };
    // A relay gets only the blobs its site's agents are assigned.
    let assigned = s
        .desired
        .borrow()
        .sites
        .get(&site)
        .is_some_and(|feed| feed.desired().all_digests().any(|d| *d == digest));
    if !assigned {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "blob {digest} is not assigned to any agent of site {}/{}",
                site.0, site.1
            ),
        ));
    }
    serve_stored(&s, &digest, req).await
}

async fn serve_stored(
    s: &AppState,
    digest: &caravan_api::Digest,
    req: Request,
) -> Result<Response, ApiError> {
    let path = s.blobs.path(digest);
    if s.blobs.size(digest).await.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("blob {digest} is not in the store"),
        ));
    }
    let (res, len) = serve_blob(&path, digest, caravan_net::server::blob_chunk(1), req).await?;
    s.ctx.metrics.blob_served_bytes.inc_by(len);
    Ok(res)
}

/// Checks the upload token (`Authorization: Bearer`).
fn check_upload_token(ctx: &Context, headers: &HeaderMap) -> Result<(), ApiError> {
    super::check_token(ctx.config.upload_token.as_deref(), "upload", headers)
}

/// Where an upload of a blob stands: stored already, or how many bytes of
/// an interrupted upload are kept (resume with `Content-Range`).
pub async fn upload_state(
    State(s): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Json<UploadState>, ApiError> {
    check_upload_token(&s.ctx, &headers)?;
    let digest = parse_digest(&digest)?;
    Ok(Json(
        match s.blobs.present(&digest).await.map_err(store_error)? {
            Some(size) => UploadState {
                complete: true,
                offset: size,
            },
            None => UploadState {
                complete: false,
                offset: s.blobs.upload_offset(&digest).await,
            },
        },
    ))
}

/// Stores an uploaded blob; refused unless its bytes hash to the digest in
/// the path. `Content-Range: bytes <offset>-<last>/<size>` continues an
/// interrupted upload at `offset`.
pub async fn put(
    State(s): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_upload_token(&s.ctx, &headers)?;
    let digest = parse_digest(&digest)?;
    if let Some(size) = s.blobs.present(&digest).await.map_err(store_error)? {
        let existing = serde_json::json!({ "digest": digest, "size": size, "existed": true });
        return Ok((StatusCode::OK, Json(existing)).into_response());
    }
    let offset = match headers.get(header::CONTENT_RANGE) {
        None => 0,
        Some(v) => content_range_start(v.to_str().unwrap_or_default()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "Content-Range must be `bytes <first>-<last>/<size>`",
            )
        })?,
    };
    let max = s.ctx.config.max_upload_bytes;
    let size = s
        .blobs
        .put(&digest, offset, max, body.into_data_stream())
        .await
        .map_err(store_error)?;
    tracing::info!(%digest, size, resumed_at = offset, "blob stored");
    s.ctx.metrics.blob_upload_bytes.inc_by(size - offset);
    let stored = serde_json::json!({ "digest": digest, "size": size, "existed": false });
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

/// The answer to an upload the store refused.
fn store_error(e: StoreError) -> ApiError {
    use StoreError as E;
    let status = match e {
        E::DigestMismatch { .. } | E::Interrupted { .. } => StatusCode::BAD_REQUEST,
        E::Offset { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        E::Busy => StatusCode::CONFLICT,
        E::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        E::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

/// The first byte of `bytes <first>-<last>/<size>`.
fn content_range_start(v: &str) -> Option<u64> {
    let (first, _) = v.strip_prefix("bytes ")?.split_once('-')?;
    first.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_content_range_resumes_an_upload() {
        assert_eq!(content_range_start("bytes 4000-9999/10000"), Some(4000));
        assert_eq!(content_range_start("bytes */10000"), None);
        assert_eq!(content_range_start("4000-9999/10000"), None);
    }
}
