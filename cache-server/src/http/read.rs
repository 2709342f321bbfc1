//! Nix's binary cache protocol, read side: narinfos (from memory when recent), NARs, listings
//! and logs, with HEAD (the same handler, answering without a body) and single byte ranges.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;

use super::app::{ApiError, ApiResult, AppState, NARINFO_CACHE_CONTROL, check_read, not_found, top_key};
use crate::config::NarRedirect;
use crate::storage::{ByteRange, Key, SMALL_OBJECT, StorageError};

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

// The read handlers take the request itself, whose headers they borrow: the HeaderMap
// extractor would copy them on every request.
pub(super) async fn top(State(s): State<Arc<AppState>>, Path(file): Path<String>, req: Request) -> ApiResult {
    let h = req.headers();
    check_read(&s, h)?;
    let (key, ctype, cache) = top_key(&file)?;
    let head_only = req.method() == Method::HEAD;
    match file.strip_suffix(".narinfo") {
        Some(hash) => narinfo(&s, hash, &key, head_only).await,
        None => serve(&s, &key, ctype, cache, h, head_only).await,
    }
}

/// Serves a narinfo, from memory when it was read or published moments ago; a path the index
/// does not hold is answered 404 without asking storage.
async fn narinfo(state: &AppState, hash: &str, key: &Key, head_only: bool) -> ApiResult {
    if state.index.contains(hash) == Some(false) {
        return Err(not_found());
    }
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

pub(super) async fn nar(State(s): State<Arc<AppState>>, Path(file): Path<String>, req: Request) -> ApiResult {
    let h = req.headers();
    check_read(&s, h)?;
    let key = Key::nar(&file)?;
    let head_only = req.method() == Method::HEAD;
    match &s.nar_redirect {
        NarRedirect::Proxy => {}
        // The mapping from name to URL never changes, so a client may remember it a while.
        NarRedirect::BaseUrl(base) => {
            return Ok(redirect(&format!("{base}/{}", key.as_str()), "public, max-age=3600"));
        }
        // A presigned URL is signed for GET alone, so HEAD is answered here.
        NarRedirect::Presigned(_) if head_only => {}
        NarRedirect::Presigned(valid) => {
            if let Some(url) = s.storage.presigned_get(&key, *valid).await? {
                return Ok(redirect(&url, "no-store"));
            }
        }
    }
    serve(&s, &key, "application/x-nix-nar", IMMUTABLE, h, head_only).await
}

/// A temporary redirect (the method and a range header are sent again to `location`).
fn redirect(location: &str, cache_control: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, cache_control)
        .body(Body::empty())
        .expect("a URL made of a valid key is a valid header")
}

pub(super) async fn log(State(s): State<Arc<AppState>>, Path(drv): Path<String>, req: Request) -> ApiResult {
    let h = req.headers();
    check_read(&s, h)?;
    let head_only = req.method() == Method::HEAD;
    serve(&s, &Key::log(&drv)?, "text/plain; charset=utf-8", "public, max-age=300", h, head_only).await
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
