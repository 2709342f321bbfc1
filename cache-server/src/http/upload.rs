//! Uploads: narinfos, NARs, listings and logs by PUT (as `nix copy --to` sends them) and the
//! native upload protocol; each body bounded by its kind's limit and the idle timeout, each
//! upload verified before anything is published.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use futures_util::StreamExt as _;

use super::app::{
    ApiError, ApiResult, AppState, MAX_LISTING_BYTES, MAX_LOG_BYTES, MAX_MISSING_PATHS, MAX_NAR_FILE_BYTES,
    check_upload, json, top_key,
};
use crate::ingest::{self, IngestError};
use crate::native;
use crate::storage::Key;

/// Why a request body could not be read.
#[derive(Debug)]
enum BodyError {
    /// It is longer than its kind may be.
    TooLarge(u64),
    /// It stalled or broke off.
    Broken(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(limit) => write!(f, "the body is over {limit} bytes"),
            BodyError::Broken(why) => f.write_str(why),
        }
    }
}

/// A request body, cut when it stalls for the body idle timeout or grows past `limit`.
fn upload_body(
    state: &AppState,
    body: Body,
    limit: u64,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, BodyError>> + Send + use<> {
    let mut seen = 0u64;
    crate::listener::idle_limited(body.into_data_stream(), state.limits.body_idle_timeout).map(move |chunk| {
        let chunk = chunk.map_err(BodyError::Broken)?;
        seen += chunk.len() as u64;
        if seen > limit { Err(BodyError::TooLarge(limit)) } else { Ok(chunk) }
    })
}

/// Reads a whole (small) request body, refusing one over `limit` by its declared length before
/// reading anything (so a client that sent `Expect: 100-continue` never sends it).
pub(super) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> ApiResult<bytes::Bytes> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {limit} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut stream = std::pin::pin!(upload_body(state, body, limit as u64));
    let mut bytes = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => bytes.extend_from_slice(&c),
            Err(BodyError::TooLarge(_)) => return Err(too_large()),
            Err(e) => return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}"))),
        }
    }
    Ok(bytes.freeze())
}

fn count_failure(state: &AppState, e: IngestError) -> ApiError {
    if !matches!(e, IngestError::Storage(_)) {
        state.metrics.verification_failure(e.reason());
        tracing::warn!(error = %e, "upload rejected");
    }
    e.into()
}

pub(super) async fn put_top(
    State(s): State<Arc<AppState>>,
    Path(file): Path<String>,
    h: HeaderMap,
    body: Body,
) -> ApiResult {
    let who = check_upload(&s, &h)?;
    let (key, _, _) = top_key(&file)?;
    let narinfo = file.ends_with(".narinfo");
    let limit = if narinfo { s.max_narinfo_bytes } else { MAX_LISTING_BYTES };
    let bytes = read_body(&s, &h, body, limit).await?;
    if let Some(hash) = file.strip_suffix(".narinfo") {
        let _verifying = s.upload_slots.verifying.acquire().await.expect("never closed");
        let text =
            ingest::ingest_narinfo(s.publisher(), hash, &bytes).await.map_err(|e| count_failure(&s, e))?;
        s.narinfo_cache.insert(hash, text.into());
        tracing::info!(uploader = %who, %key, "published");
    } else {
        // A NAR listing: Nix's JSON, version 1, or nothing.
        let listing: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("a NAR listing is JSON: {e}")))?;
        if listing.get("version") != Some(&serde_json::json!(1)) || listing.get("root").is_none() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "a NAR listing has version 1 and a root"));
        }
        crate::storage::put_bytes(s.storage.as_ref(), &key, bytes).await?;
    }
    Ok(StatusCode::OK.into_response())
}

pub(super) async fn put_nar(
    State(s): State<Arc<AppState>>,
    Path(file): Path<String>,
    h: HeaderMap,
    body: Body,
) -> ApiResult {
    check_upload(&s, &h)?;
    let key = Key::nar(&file)?;
    ingest::ingest_nar_file(s.storage.as_ref(), &s.metrics, &key, upload_body(&s, body, MAX_NAR_FILE_BYTES))
        .await
        .map_err(|e| count_failure(&s, e))?;
    Ok(StatusCode::OK.into_response())
}

pub(super) async fn put_log(
    State(s): State<Arc<AppState>>,
    Path(drv): Path<String>,
    h: HeaderMap,
    body: Body,
) -> ApiResult {
    check_upload(&s, &h)?;
    let key = Key::log(&drv)?;
    let log = read_body(&s, &h, body, MAX_LOG_BYTES).await?;
    crate::storage::put_bytes(s.storage.as_ref(), &key, log).await?;
    Ok(StatusCode::OK.into_response())
}

pub(super) async fn native_upload(State(s): State<Arc<AppState>>, h: HeaderMap, body: Body) -> ApiResult {
    let who = check_upload(&s, &h)?;
    let body = upload_body(&s, body, MAX_NAR_FILE_BYTES);
    let result = native::upload(s.publisher(), &s.metrics, &s.upload_slots, body)
        .await
        .map_err(|e| count_failure(&s, e))?;
    tracing::info!(uploader = %who, bytes = result.file_size, "published by native upload");
    Ok(json(&result))
}

pub(super) async fn native_missing(State(s): State<Arc<AppState>>, h: HeaderMap, body: Body) -> ApiResult {
    // Part of the upload protocol, and a batch of storage lookups: uploaders only.
    check_upload(&s, &h)?;
    // A store path is under 256 bytes: this many of them, as a JSON list, fit.
    let bytes = read_body(&s, &h, body, MAX_MISSING_PATHS * 256).await?;
    let req: native::MissingRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    if req.paths.len() > MAX_MISSING_PATHS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_MISSING_PATHS} paths per request"),
        ));
    }
    Ok(json(&native::missing(s.publisher(), req).await?))
}
