//! The cache-server's native API, as seen from a builder: "which paths are missing?" and one
//! streamed upload per path. The wire format is defined by the cache-server
//! (`cache_server::native`); this side only speaks it over HTTP, and the end-to-end tests hold
//! the two together.

use bytes::Bytes;
use nix_formats::StorePath;
use reqwest::StatusCode;
use thiserror::Error;

/// Why a request to the cache failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connection failed or was cut, or the server's certificate is not trusted.
    #[error("cannot reach the cache: {}", crate::http::describe(.0))]
    Transport(#[source] reqwest::Error),
    /// The server refused the request; its reason is in `message`.
    #[error("the cache answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The server's explanation.
        message: String,
    },
    /// The server answered something this client does not understand.
    #[error("unexpected answer from the cache: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Worth retrying: connection trouble (not an untrusted certificate), 5xx but a full cache
    /// (507), 408, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(e) => !crate::http::is_certificate_error(e),
            ClientError::Status { status, .. } => {
                (status.is_server_error() && !self.is_full())
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            ClientError::Protocol(_) => false,
        }
    }

    /// The cache refused what was sent and would refuse it again: 400 (a NAR that does not
    /// match its hash, an invalid NAR), 413 (too large), 422. Not a refused token (401, 403,
    /// mended by fixing the token), a wrong address (404, 405), a timeout or rate limit (408,
    /// 429) or a stale reference (409).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::Status { status, .. } if [
                StatusCode::BAD_REQUEST,
                StatusCode::PAYLOAD_TOO_LARGE,
                StatusCode::UNPROCESSABLE_ENTITY,
            ]
            .contains(status)
        )
    }

    /// The cache's storage is full (507): every upload is refused until space is freed.
    pub fn is_full(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if *status == StatusCode::INSUFFICIENT_STORAGE)
    }

    /// The cache lacked a reference the path needs (409): a collection deleted it since the
    /// cache said it had it. Asking again what is missing and uploading it mends that.
    pub fn is_stale(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if *status == StatusCode::CONFLICT)
    }
}

pub use cache_protocol::UploadMeta;
use cache_protocol::{MissingRequest, MissingResponse, UploadResult};

/// Largest answer to a "missing" batch read: every path of a full batch, at Nix's longest.
const MAX_MISSING_ANSWER: usize = 32 << 20;
/// Largest garbage collection report read.
const MAX_GC_ANSWER: usize = 16 << 20;
/// Largest upload result read (the published narinfo is at most 1 MiB).
const MAX_UPLOAD_ANSWER: usize = 4 << 20;

/// A client for one cache-server.
#[derive(Clone)]
pub struct CacheClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// What the cache said of a set of paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Paths to upload.
    pub missing: Vec<StorePath>,
    /// Paths the cache lacks and an upstream of it serves: not uploaded, and accepted as
    /// references.
    pub upstream: Vec<StorePath>,
}

/// The end of a build log the cache holds ([`CacheClient::log_tail`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTail {
    /// The last lines, lossily decoded as UTF-8.
    pub text: String,
    /// The whole log's size in the cache.
    pub total_bytes: u64,
}

impl CacheClient {
    /// A client for the cache at `base` (`https://host` or `http://host:port`), uploading with
    /// `token`.
    pub fn new(base: &str, token: &str) -> Result<Self, crate::http::HttpError> {
        Ok(Self::with_http(crate::http::client()?, base, token))
    }

    /// [`CacheClient::new`] sharing an existing HTTP client.
    pub fn with_http(http: reqwest::Client, base: &str, token: &str) -> Self {
        CacheClient { http, base: base.trim_end_matches('/').to_owned(), token: token.to_owned() }
    }

    async fn check(
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = resp.map_err(ClientError::Transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let message = crate::http::error_text(resp).await;
        Err(ClientError::Status { status, message })
    }

    /// A JSON answer of at most `limit` bytes.
    async fn json<T: serde::de::DeserializeOwned>(
        resp: Result<reqwest::Response, reqwest::Error>,
        limit: usize,
    ) -> Result<T, ClientError> {
        crate::http::read_json(Self::check(resp).await?, limit).await.map_err(ClientError::Protocol)
    }

    /// The subset of `paths` that the cache does not have and no upstream of it serves, in
    /// request order ([`CacheClient::query`]).
    pub async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, ClientError> {
        Ok(self.query(paths).await?.missing)
    }

    /// Which of `paths` must be uploaded and which an upstream of the cache serves instead:
    /// one round trip per [`cache_protocol::MAX_MISSING_PATHS`] paths.
    pub async fn query(&self, paths: &[StorePath]) -> Result<Query, ClientError> {
        let mut query = Query::default();
        let parse =
            |p: &String| StorePath::from_absolute(p).map_err(|e| ClientError::Protocol(e.to_string()));
        for batch in paths.chunks(cache_protocol::MAX_MISSING_PATHS) {
            let body = MissingRequest { paths: batch.iter().map(StorePath::to_absolute).collect() };
            let resp = self
                .http
                .post(format!("{}{}", self.base, cache_protocol::MISSING))
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await;
            let resp: MissingResponse = Self::json(resp, MAX_MISSING_ANSWER).await?;
            query.missing.extend(resp.missing.iter().map(parse).collect::<Result<Vec<_>, _>>()?);
            query.upstream.extend(resp.upstream.iter().map(parse).collect::<Result<Vec<_>, _>>()?);
        }
        Ok(query)
    }

    /// Asks the cache to collect garbage (the token must be one of its admin tokens); the
    /// answer comes when the collection is done.
    pub async fn collect(
        &self,
        req: &cache_protocol::GcRequest,
    ) -> Result<cache_protocol::GcReport, ClientError> {
        let resp = self
            .http
            .post(format!("{}{}", self.base, cache_protocol::GC))
            .bearer_auth(&self.token)
            .json(req)
            .send()
            .await;
        Self::json(resp, MAX_GC_ANSWER).await
    }

    /// Stores the build log of `drv` as `log/<drv base name>`, where `nix log` looks for it.
    pub async fn upload_log(&self, drv: &StorePath, log: Bytes) -> Result<(), ClientError> {
        let resp = self
            .http
            .put(format!("{}/log/{}", self.base, drv.base_name()))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(log)
            .send()
            .await;
        Self::check(resp).await.map(drop)
    }

    /// The last `max` bytes at most of the build log the cache holds for `drv`, and the whole
    /// log's size; `None` when the cache has no log for it. The tail starts at a line.
    pub async fn log_tail(&self, drv: &StorePath, max: usize) -> Result<Option<LogTail>, ClientError> {
        let resp = self
            .http
            .get(format!("{}/log/{}", self.base, drv.base_name()))
            .bearer_auth(&self.token)
            .header(reqwest::header::RANGE, format!("bytes=-{max}"))
            .send()
            .await;
        if resp.as_ref().is_ok_and(|r| r.status() == StatusCode::NOT_FOUND) {
            return Ok(None);
        }
        let resp = Self::check(resp).await?;
        // 206 names the whole size in Content-Range (`bytes a-b/size`); 200 is the whole log.
        let total = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok()?.rsplit('/').next()?.parse::<u64>().ok());
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let body = crate::http::read_limited(resp, max).await.map_err(ClientError::Protocol)?;
        let total = total.unwrap_or(body.len() as u64);
        let mut text = String::from_utf8_lossy(&body).into_owned();
        if partial && total > body.len() as u64 {
            // Cut in the middle of a line (or of a character): start at the next one.
            text = text.split_once('\n').map_or(String::new(), |(_, rest)| rest.to_owned());
        }
        Ok(Some(LogTail { text, total_bytes: total }))
    }

    /// Uploads one path: `body` yields the metadata line, then the zstd-compressed NAR.
    /// Returns the compressed size the server stored.
    pub async fn upload(
        &self,
        body: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    ) -> Result<u64, ClientError> {
        let resp = self
            .http
            .post(format!("{}{}", self.base, cache_protocol::UPLOAD))
            .bearer_auth(&self.token)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await;
        let result: UploadResult = Self::json(resp, MAX_UPLOAD_ANSWER).await?;
        Ok(result.file_size)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A server that answers every request with `status` and a body that never ends, counting
    /// the bytes it managed to send.
    async fn endless(status: &'static str) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = conn.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let start = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    );
                    if conn.write_all(start.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
                    while conn.write_all(chunk.as_bytes()).await.is_ok() {
                        counter.fetch_add(1 << 20, Ordering::Relaxed);
                    }
                });
            }
        });
        (url, sent)
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_at_its_limit() {
        let (url, sent) = endless("200 OK").await;
        let client = CacheClient::new(&url, "t").unwrap();
        let paths = [StorePath::from_absolute("/nix/store/00000000000000000000000000000000-x").unwrap()];
        let answer = tokio::time::timeout(std::time::Duration::from_secs(60), client.missing(&paths));
        let err = answer.await.expect("the client stops reading").unwrap_err().to_string();
        assert!(err.contains(&format!("is over {MAX_MISSING_ANSWER} bytes")), "{err}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let sent = sent.load(Ordering::Relaxed) as usize;
        // What was sent is what the limit read plus what the sockets held.
        assert!(sent < MAX_MISSING_ANSWER + (16 << 20), "the client stopped reading: {sent} bytes sent");
    }

    #[tokio::test]
    async fn an_endless_error_is_read_only_for_its_message() {
        let (url, _) = endless("500 Internal Server Error").await;
        let client = CacheClient::new(&url, "t").unwrap();
        let path = StorePath::from_absolute("/nix/store/00000000000000000000000000000000-x").unwrap();
        match client.missing(&[path]).await {
            Err(ClientError::Status { status, message }) => {
                assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
                assert!(
                    message.is_empty() || message.len() <= crate::http::ERROR_TEXT_LIMIT,
                    "{}",
                    message.len()
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
