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
    /// Worth retrying: connection trouble (not an untrusted certificate), 5xx, 408, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(e) => !crate::http::is_certificate_error(e),
            ClientError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            ClientError::Protocol(_) => false,
        }
    }

    /// The cache lacked a reference the path needs (409): a collection deleted it since the
    /// cache said it had it. Asking again what is missing and uploading it mends that.
    pub fn is_stale(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if *status == StatusCode::CONFLICT)
    }
}

pub use cache_protocol::UploadMeta;
use cache_protocol::{MissingRequest, MissingResponse, UploadResult};

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
        let message = resp.text().await.unwrap_or_default().trim().to_owned();
        Err(ClientError::Status { status, message })
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
            let resp: MissingResponse =
                Self::check(resp).await?.json().await.map_err(|e| ClientError::Protocol(e.to_string()))?;
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
        Self::check(resp).await?.json().await.map_err(|e| ClientError::Protocol(e.to_string()))
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
        let result: UploadResult =
            Self::check(resp).await?.json().await.map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(result.file_size)
    }
}
