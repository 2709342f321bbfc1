//! The HTTP interface: Nix's binary cache protocol (GET/HEAD), uploads (PUT), health and
//! metrics, and a landing page for people. One error type maps every failure to a status code without leaking internals.
//!
//! [`app`] is what every handler shares, [`read`] the substituter side, [`upload`] the upload
//! side; this file routes and observes.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

mod app;
mod gc;
mod landing;
mod read;
mod upload;

pub use app::{ApiError, AppState, MAX_LISTING_BYTES, MAX_LOG_BYTES, MAX_MISSING_PATHS, MAX_NAR_FILE_BYTES};
use app::{ApiResult, check_read};
pub use landing::page_head;
use read::{log, nar, top};
use upload::{native_missing, native_upload, put_log, put_nar, put_top};

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(landing::landing))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/nix-cache-info", get(cache_info))
        .route("/nar/{file}", get(nar).head(nar).put(put_nar))
        .route("/log/{drv}", get(log).head(log).put(put_log))
        .route("/{file}", get(top).head(top).put(put_top))
        .route(cache_protocol::UPLOAD, post(native_upload))
        .route(cache_protocol::MISSING, post(native_missing))
        .route(cache_protocol::GC, post(gc::collect))
        .route(cache_protocol::KEYS, get(keys))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Request span, metrics by route and status.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let private = state.read_tokens.is_some();
    let route: &'static str = match req.extensions().get::<MatchedPath>().map(|m| m.as_str()) {
        Some("/") => "landing",
        Some("/healthz") => "healthz",
        Some("/metrics") => "metrics",
        Some("/nix-cache-info") => "nix-cache-info",
        Some("/nar/{file}") => "nar",
        Some("/log/{drv}") => "log",
        Some("/api/v1/upload") => "api-upload",
        Some("/api/v1/missing") => "api-missing",
        Some("/api/v1/gc") => "api-gc",
        Some("/api/v1/keys") => "api-keys",
        Some("/{file}") if req.uri().path().ends_with(".ls") => "ls",
        Some("/{file}") => "narinfo",
        _ => "other",
    };
    let method: &'static str = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        _ => "other",
    };
    let start = Instant::now();
    // Only copied when it will be logged: this runs on every request.
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let mut resp = next.run(req).await;
    if private && resp.headers().contains_key(header::CACHE_CONTROL) {
        // Behind read tokens nothing may sit in a shared cache (a CDN, a proxy).
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    }
    let status = resp.status();
    state.metrics.request(route, method, status.as_u16());
    if let Some(path) = path {
        tracing::debug!(method, %path, status = status.as_u16(), ms = start.elapsed().as_millis() as u64, "request");
    }
    resp
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    // With read tokens, what the cache holds and serves is no anonymous visitor's business.
    check_read(&state, &headers)?;
    let mut text = state.metrics.render();
    if let Some(index) = state.index.status() {
        use std::fmt::Write as _;
        let (paths, age, bytes) = (index.paths, index.age_seconds, index.bytes);
        text.push_str("# HELP fleetcache_index_paths Narinfos the in-memory index holds (its last listing and the publications since).\n");
        text.push_str("# TYPE fleetcache_index_paths gauge\n");
        let _ = writeln!(text, "fleetcache_index_paths {paths}");
        text.push_str(
            "# HELP fleetcache_index_listed_bytes Bytes of every object the index's last listing found.\n",
        );
        text.push_str("# TYPE fleetcache_index_listed_bytes gauge\n");
        let _ = writeln!(text, "fleetcache_index_listed_bytes {bytes}");
        text.push_str("# HELP fleetcache_index_age_seconds Seconds since the index was last listed.\n");
        text.push_str("# TYPE fleetcache_index_age_seconds gauge\n");
        let _ = writeln!(text, "fleetcache_index_age_seconds {age:.1}");
    }
    if !state.upstreams.is_empty() {
        use std::fmt::Write as _;
        text.push_str(
            "# HELP fleetcache_upstream_requests_total Narinfo requests made to upstream caches.\n",
        );
        text.push_str("# TYPE fleetcache_upstream_requests_total counter\n");
        let _ = writeln!(text, "fleetcache_upstream_requests_total {}", state.upstreams.requests());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The public halves of the signing keys, for `orchestrator use`: not secret, so whoever may
/// read may know them (trusting them is the user's choice).
async fn keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    check_read(&state, &headers)?;
    let public_keys = state.signing_keys.iter().map(|k| k.public_key().to_string()).collect();
    Ok(app::json(&cache_protocol::CacheKeys { public_keys }))
}

async fn cache_info(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    check_read(&state, &headers)?;
    Ok(([(header::CONTENT_TYPE, "text/x-nix-cache-info")], state.cache_info.clone()).into_response())
}

async fn fallback() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "not a binary cache path")
}
