//! What every handler shares: the server's state, the one error type (a status and a line for
//! the client, never an internal detail), the token checks, and the limits on what is uploaded.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nix_formats::SecretKey;

use crate::auth::{TokenFile, presented_token};
use crate::ingest::IngestError;
use crate::metrics::Metrics;
use crate::narinfo_cache::NarinfoCache;
use crate::storage::{Failure, Key, KeyError, Storage, StorageError};

/// Everything a request handler needs.
pub struct AppState {
    /// The cache.
    pub storage: Arc<dyn Storage>,
    /// Keys that sign every published narinfo; empty means read-only.
    pub signing_keys: Vec<SecretKey>,
    /// Who may upload; `None` means read-only. Read again when the file changes.
    pub upload_tokens: Option<TokenFile>,
    /// Who may read; `None` means public. Read again when the file changes.
    pub read_tokens: Option<TokenFile>,
    /// Who may collect garbage; `None` means nobody (over HTTP).
    pub admin_tokens: Option<TokenFile>,
    /// Keeps a garbage collection out of the way of uploads.
    pub gc: crate::gc::Guard,
    /// Caches whose signed paths references may be in.
    pub upstreams: crate::upstream::Upstreams,
    /// What narinfos the store holds, for misses without a storage request.
    pub index: crate::index::NarinfoIndex,
    /// How often the index is listed again; `None`: no index.
    pub index_refresh: Option<std::time::Duration>,
    /// The `nix-cache-info` served.
    pub cache_info: String,
    /// Where NAR downloads are sent instead of being served here.
    pub nar_redirect: crate::config::NarRedirect,
    /// Largest narinfo body accepted.
    pub max_narinfo_bytes: usize,
    /// Recently served narinfos.
    pub narinfo_cache: NarinfoCache,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The listener's limits (the body idle timeout applies to every upload).
    pub limits: crate::listener::Limits,
    /// How many uploads are verified, and stored, at once.
    pub upload_slots: crate::native::UploadSlots,
}

/// Largest build log accepted (`PUT /log/…`).
pub const MAX_LOG_BYTES: usize = 64 << 20;

/// Largest NAR listing accepted (`PUT /<hash>.ls`).
pub const MAX_LISTING_BYTES: usize = 64 << 20;

/// Largest NAR file accepted (`PUT /nar/…`, a native upload's compressed NAR).
pub const MAX_NAR_FILE_BYTES: u64 = 1 << 40;

pub use cache_protocol::MAX_MISSING_PATHS;

impl AppState {
    /// True if uploads are possible at all.
    pub fn writable(&self) -> bool {
        !self.signing_keys.is_empty() && self.upload_tokens.is_some()
    }

    /// What an upload publishes with.
    pub fn publisher(&self) -> crate::ingest::Publisher<'_> {
        crate::ingest::Publisher {
            storage: self.storage.as_ref(),
            keys: &self.signing_keys,
            gc: &self.gc,
            upstreams: &self.upstreams,
            index: &self.index,
        }
    }
}

/// An HTTP error: a status and a one-line message for the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, format!("{}\n", self.message)).into_response();
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"fleetcache\""));
        }
        r
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<StorageError> for ApiError {
    /// The client learns what kind of failure it was, the server's log the whole of it.
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage failure");
        match e.failure() {
            Failure::Full => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "the cache's storage is full (or over its quota); nothing was published: free space \
                 (a garbage collection) and send it again",
            ),
            Failure::Refused => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the cache's storage refuses this server (permissions, credentials or bucket): \
                 its log says more",
            ),
            Failure::Unavailable => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage backend unavailable; retry later")
            }
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Storage(s) => s.into(),
            // Not the upload's fault: what it refers to is not (or no longer) here.
            e @ (IngestError::MissingReferences(_) | IngestError::NarMissing(_)) => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            IngestError::Upstream(e) => {
                tracing::warn!(error = %e, "an upload waits for an upstream");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; retry later"))
            }
            e => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

pub(super) type ApiResult<T = Response> = Result<T, ApiError>;

pub(super) fn check_read(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(readers) = &state.read_tokens else {
        return Ok(());
    };
    let token = presented_token(headers)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "a read token is required"))?;
    // An upload token reads too; it is only looked for when the token is no read token.
    let uploader = || state.upload_tokens.as_ref().is_some_and(|t| t.check(&token).is_some());
    if readers.check(&token).is_none() && !uploader() {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"));
    }
    Ok(())
}

pub(super) fn check_upload(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
    let Some(uploaders) = state.upload_tokens.as_ref().filter(|_| state.writable()) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this cache-server is read-only: it has no signing key or no upload tokens configured",
        ));
    };
    let token = presented_token(headers)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "an upload token is required"))?;
    uploaders.check(&token).ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid upload token"))
}

pub(super) fn check_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
    let Some(admins) = &state.admin_tokens else {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "this cache-server has no admin tokens configured"));
    };
    let token = presented_token(headers)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "an admin token is required"))?;
    admins.check(&token).ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid admin token"))
}

/// What kind of file a top-level name is.
pub(super) fn top_key(file: &str) -> Result<(Key, &'static str, &'static str), KeyError> {
    if let Some(hash) = file.strip_suffix(".narinfo") {
        Ok((Key::narinfo(hash)?, "text/x-nix-narinfo", NARINFO_CACHE_CONTROL))
    } else if let Some(hash) = file.strip_suffix(".ls") {
        Ok((Key::listing(hash)?, "application/json", "public, max-age=300"))
    } else {
        Err(KeyError(file.to_owned()))
    }
}

/// Narinfos may gain a signature during a key rotation: let clients and CDNs keep them briefly.
pub(super) const NARINFO_CACHE_CONTROL: &str = "public, max-age=300";

pub(super) fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not in this cache")
}

pub(super) fn json(value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("serialisable");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
