//! The HTTP interface: Nix's binary cache protocol (GET/HEAD), uploads (PUT), health and
//! metrics. One error type maps every failure to a status code without leaking internals.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use nix_formats::SecretKey;

use crate::auth::{TokenFile, presented_token};
use crate::ingest::{self, IngestError};
use crate::metrics::Metrics;
use crate::narinfo_cache::NarinfoCache;
use crate::native;
use crate::storage::{ByteRange, Key, KeyError, SMALL_OBJECT, Storage, StorageError};

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
    /// The `nix-cache-info` served.
    pub cache_info: String,
    /// Largest narinfo body accepted.
    pub max_narinfo_bytes: usize,
    /// Recently served narinfos.
    pub narinfo_cache: NarinfoCache,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The listener's limits (the body idle timeout applies to every upload).
    pub limits: crate::listener::Limits,
    /// Uploads verified at once (each decompresses and hashes a NAR on a core); more wait.
    pub verifications: tokio::sync::Semaphore,
}

/// Uploads verified at once by default: two per core.
pub fn default_verifications() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
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
}

/// An HTTP error: a status and a one-line message for the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
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
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage failure");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage backend unavailable; retry later")
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Storage(s) => s.into(),
            e => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/nix-cache-info", get(cache_info))
        .route("/nar/{file}", get(get_nar).head(head_nar).put(put_nar))
        .route("/log/{drv}", get(get_log).head(head_log).put(put_log))
        .route("/{file}", get(get_top).head(head_top).put(put_top))
        .route(cache_protocol::UPLOAD, post(native_upload))
        .route(cache_protocol::MISSING, post(native_missing))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

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
async fn read_body(
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

/// Request span, metrics by route and status.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let private = state.read_tokens.is_some();
    let route: &'static str = match req.extensions().get::<MatchedPath>().map(|m| m.as_str()) {
        Some("/healthz") => "healthz",
        Some("/metrics") => "metrics",
        Some("/nix-cache-info") => "nix-cache-info",
        Some("/nar/{file}") => "nar",
        Some("/log/{drv}") => "log",
        Some("/api/v1/upload") => "api-upload",
        Some("/api/v1/missing") => "api-missing",
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

fn check_read(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(readers) = &state.read_tokens else {
        return Ok(());
    };
    let token = presented_token(headers)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "a read token is required"))?;
    let uploader = state.upload_tokens.as_ref().and_then(|t| t.check(&token));
    if readers.check(&token).or(uploader).is_none() {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"));
    }
    Ok(())
}

fn check_upload(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    // With read tokens, what the cache holds and serves is no anonymous visitor's business.
    check_read(&state, &headers)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response())
}

async fn cache_info(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    check_read(&state, &headers)?;
    Ok(([(header::CONTENT_TYPE, "text/x-nix-cache-info")], state.cache_info.clone()).into_response())
}

async fn fallback() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "not a binary cache path")
}

/// What kind of file a top-level name is.
fn top_key(file: &str) -> Result<(Key, &'static str, &'static str), KeyError> {
    if let Some(hash) = file.strip_suffix(".narinfo") {
        Ok((Key::narinfo(hash)?, "text/x-nix-narinfo", NARINFO_CACHE_CONTROL))
    } else if let Some(hash) = file.strip_suffix(".ls") {
        Ok((Key::listing(hash)?, "application/json", "public, max-age=300"))
    } else {
        Err(KeyError(file.to_owned()))
    }
}

/// Narinfos may gain a signature during a key rotation: let clients and CDNs keep them briefly.
const NARINFO_CACHE_CONTROL: &str = "public, max-age=300";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

async fn get_top(State(s): State<Arc<AppState>>, Path(file): Path<String>, h: HeaderMap) -> ApiResult {
    check_read(&s, &h)?;
    let (key, ctype, cache) = top_key(&file)?;
    match file.strip_suffix(".narinfo") {
        Some(hash) => narinfo(&s, hash, &key, false).await,
        None => serve(&s, &key, ctype, cache, &h, false).await,
    }
}

async fn head_top(State(s): State<Arc<AppState>>, Path(file): Path<String>, h: HeaderMap) -> ApiResult {
    check_read(&s, &h)?;
    let (key, ctype, cache) = top_key(&file)?;
    match file.strip_suffix(".narinfo") {
        Some(hash) => narinfo(&s, hash, &key, true).await,
        None => serve(&s, &key, ctype, cache, &h, true).await,
    }
}

/// Serves a narinfo, from memory when it was read or published moments ago.
async fn narinfo(state: &AppState, hash: &str, key: &Key, head_only: bool) -> ApiResult {
    let bytes = match state.narinfo_cache.get(hash) {
        Some(b) => b,
        None => {
            let b = crate::storage::get_bytes(state.storage.as_ref(), key).await?.ok_or_else(not_found)?;
            state.narinfo_cache.insert(hash, b.clone());
            b
        }
    };
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "text/x-nix-narinfo")
        .header(header::CACHE_CONTROL, NARINFO_CACHE_CONTROL)
        .header(header::CONTENT_LENGTH, bytes.len());
    if head_only {
        return Ok(builder.body(Body::empty()).expect("valid response"));
    }
    state.metrics.served(bytes.len() as u64);
    Ok(builder.body(Body::from(bytes)).expect("valid response"))
}

async fn get_nar(State(s): State<Arc<AppState>>, Path(file): Path<String>, h: HeaderMap) -> ApiResult {
    check_read(&s, &h)?;
    serve(&s, &Key::nar(&file)?, "application/x-nix-nar", IMMUTABLE, &h, false).await
}

async fn head_nar(State(s): State<Arc<AppState>>, Path(file): Path<String>, h: HeaderMap) -> ApiResult {
    check_read(&s, &h)?;
    serve(&s, &Key::nar(&file)?, "application/x-nix-nar", IMMUTABLE, &h, true).await
}

async fn get_log(State(s): State<Arc<AppState>>, Path(drv): Path<String>, h: HeaderMap) -> ApiResult {
    check_read(&s, &h)?;
    serve(&s, &Key::log(&drv)?, "text/plain; charset=utf-8", "public, max-age=300", &h, false).await
}

async fn head_log(State(s): State<Arc<AppState>>, Path(drv): Path<String>, h: HeaderMap) -> ApiResult {
    check_read(&s, &h)?;
    serve(&s, &Key::log(&drv)?, "text/plain; charset=utf-8", "public, max-age=300", &h, true).await
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not in this cache")
}

/// Parses a single `bytes=` range against an object of `size` bytes. `Ok(None)`: serve it all.
fn parse_range(value: &str, size: u64) -> Result<Option<ByteRange>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // Multiple ranges: RFC 9110 lets us answer with the whole object.
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
        }
        (a, "") => (a.parse().map_err(|_| ())?, size.checked_sub(1).ok_or(())?),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| ())?, b.parse().map_err(|_| ())?);
            (a, b.min(size.saturating_sub(1)))
        }
    };
    if start > end || start >= size {
        return Err(());
    }
    Ok(Some(ByteRange { start, end }))
}

async fn serve(
    state: &Arc<AppState>,
    key: &Key,
    content_type: &'static str,
    cache_control: &'static str,
    headers: &HeaderMap,
    head_only: bool,
) -> ApiResult {
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, cache_control)
        .header(header::ACCEPT_RANGES, "bytes");
    if head_only || range_header.is_some() {
        let size = state.storage.head(key).await?.ok_or_else(not_found)?;
        let range = match range_header.map(|v| parse_range(v, size)) {
            Some(Err(())) => {
                let mut e =
                    ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable").into_response();
                e.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                );
                return Ok(e);
            }
            Some(Ok(r)) => r,
            None => None,
        };
        if head_only {
            return Ok(builder
                .header(header::CONTENT_LENGTH, size)
                .body(Body::empty())
                .expect("valid response"));
        }
        if let Some(r) = range {
            let obj = state.storage.get(key, Some(r)).await?.ok_or_else(not_found)?;
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {}-{}/{size}", r.start, r.end))
                .header(header::CONTENT_LENGTH, r.len());
            return Ok(builder.body(counted(state, obj.body)).expect("valid response"));
        }
    }
    let obj = state.storage.get(key, None).await?.ok_or_else(not_found)?;
    builder = builder.header(header::CONTENT_LENGTH, obj.size);
    if obj.size <= SMALL_OBJECT {
        // narinfos and the like: one buffer, so headers and body leave in one write.
        let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(obj.body)
            .await
            .map_err(|e| StorageError::Io { key: key.to_string(), source: e })?;
        let body = chunks.concat();
        state.metrics.served(body.len() as u64);
        return Ok(builder.body(Body::from(body)).expect("valid response"));
    }
    Ok(builder.body(counted(state, obj.body)).expect("valid response"))
}

fn counted(
    state: &Arc<AppState>,
    body: futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
) -> Body {
    let metrics = state.metrics.clone();
    Body::from_stream(body.inspect(move |c| {
        if let Ok(c) = c {
            metrics.served(c.len() as u64);
        }
    }))
}

fn count_failure(state: &AppState, e: IngestError) -> ApiError {
    if !matches!(e, IngestError::Storage(_)) {
        state.metrics.verification_failure(e.reason());
        tracing::warn!(error = %e, "upload rejected");
    }
    e.into()
}

async fn put_top(
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
        let _verifying = s.verifications.acquire().await.expect("never closed");
        let text = ingest::ingest_narinfo(s.storage.as_ref(), &s.signing_keys, hash, &bytes)
            .await
            .map_err(|e| count_failure(&s, e))?;
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

async fn put_nar(
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

async fn put_log(
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

async fn native_upload(State(s): State<Arc<AppState>>, h: HeaderMap, body: Body) -> ApiResult {
    let who = check_upload(&s, &h)?;
    let _verifying = s.verifications.acquire().await.expect("never closed");
    let body = upload_body(&s, body, MAX_NAR_FILE_BYTES);
    let result = native::upload(s.storage.as_ref(), &s.signing_keys, &s.metrics, body)
        .await
        .map_err(|e| count_failure(&s, e))?;
    tracing::info!(uploader = %who, bytes = result.file_size, "published by native upload");
    Ok(json(&result))
}

async fn native_missing(State(s): State<Arc<AppState>>, h: HeaderMap, body: Body) -> ApiResult {
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
    Ok(json(&native::missing(s.storage.as_ref(), req).await?))
}

fn json(value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("serialisable");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |s| parse_range(s, 100);
        assert_eq!(r("bytes=0-9"), Ok(Some(ByteRange { start: 0, end: 9 })));
        assert_eq!(r("bytes=90-"), Ok(Some(ByteRange { start: 90, end: 99 })));
        assert_eq!(r("bytes=-10"), Ok(Some(ByteRange { start: 90, end: 99 })));
        assert_eq!(r("bytes=-1000"), Ok(Some(ByteRange { start: 0, end: 99 })));
        assert_eq!(r("bytes=50-1000"), Ok(Some(ByteRange { start: 50, end: 99 })));
        assert_eq!(r("bytes=0-1,5-6"), Ok(None));
        assert_eq!(r("items=0-1"), Ok(None));
        assert_eq!(r("bytes=100-"), Err(()));
        assert_eq!(r("bytes=5-1"), Err(()));
        assert_eq!(r("bytes=-0"), Err(()));
        assert_eq!(r("bytes=x-1"), Err(()));
        assert_eq!(parse_range("bytes=0-", 0), Err(()));
    }
}
