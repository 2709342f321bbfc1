//! `POST /api/v1/gc`: a garbage collection over the roots the caller names (admin tokens
//! only). The answer comes when the collection is done; a second one meanwhile is refused.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use cache_protocol::{GcRequest, MAX_MISSING_PATHS};

use super::app::{ApiError, ApiResult, AppState, check_admin, json};
use super::upload::read_body;
use crate::gc::{self, GcError};

/// Most roots one collection is given (a fleet's kept revisions have a few thousand outputs).
pub const MAX_ROOTS: usize = MAX_MISSING_PATHS;

pub(super) async fn collect(State(s): State<Arc<AppState>>, h: HeaderMap, body: Body) -> ApiResult {
    let who = check_admin(&s, &h)?;
    let bytes = read_body(&s, &h, body, MAX_ROOTS * 256).await?;
    let req: GcRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    if req.roots.len() > MAX_ROOTS {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("at most {MAX_ROOTS} roots")));
    }
    let opts = gc::Options {
        roots: req.roots,
        dry_run: req.dry_run,
        grace: req.grace_seconds.map_or(gc::DEFAULT_GRACE, Duration::from_secs),
    };
    tracing::info!(admin = %who, roots = opts.roots.len(), dry_run = opts.dry_run, "collecting garbage");
    let report =
        gc::collect(s.storage.as_ref(), &s.gc, Some(&s.narinfo_cache), &opts).await.map_err(|e| {
            tracing::error!(error = %e, "garbage collection");
            match e {
                GcError::Busy => ApiError::new(StatusCode::CONFLICT, e.to_string()),
                GcError::NoRoots | GcError::BadRoot(_) => {
                    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
                }
                GcError::Unreadable { .. } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                GcError::Storage(e) => e.into(),
            }
        })?;
    s.metrics.collected(&report);
    tracing::info!(
        dry_run = report.dry_run,
        kept = report.kept.narinfos,
        deleted = report.deleted.narinfos,
        freed = report.deleted.bytes,
        abandoned_uploads = report.abandoned_uploads,
        seconds = report.seconds,
        "garbage collected"
    );
    Ok(json(&report))
}
