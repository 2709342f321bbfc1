//! The HTTP client every part of fleetcache talks through (builder, orchestrator, CLI): HTTPS
//! with rustls, trusting the system's roots plus the bundles Nix itself is pointed at, through
//! the proxies the environment names.
//!
//! - Roots: the system's (`/etc/ssl/certs`, or `SSL_CERT_FILE`/`SSL_CERT_DIR` as OpenSSL reads
//!   them), plus every certificate in `NIX_SSL_CERT_FILE` and `SSL_CERT_FILE`, the files Nix
//!   reads, so a private CA that works for `nix copy` works here too. A certificate no root
//!   vouches for is refused, and the error says so.
//! - Proxies: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (either case).

use std::path::PathBuf;

use thiserror::Error;

/// The variables naming certificate bundles to trust besides the system's, in the order Nix
/// reads them.
pub const CERT_FILE_VARIABLES: [&str; 2] = ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"];

/// Why no client could be made.
#[derive(Debug, Error)]
pub enum HttpError {
    /// A bundle named by the environment cannot be read.
    #[error("{variable}={}: {source}", path.display())]
    ReadBundle {
        /// The variable.
        variable: &'static str,
        /// The file it names.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A bundle named by the environment holds no certificate we can read.
    #[error("{variable}={}: no PEM certificate in it ({message})", path.display())]
    BadBundle {
        /// The variable.
        variable: &'static str,
        /// The file it names.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The TLS stack refused the configuration.
    #[error("setting up HTTPS: {}", describe(.0))]
    Build(#[source] reqwest::Error),
}

/// The extra roots the environment names.
fn extra_roots() -> Result<Vec<reqwest::Certificate>, HttpError> {
    let mut roots = Vec::new();
    let mut seen = Vec::new();
    for variable in CERT_FILE_VARIABLES {
        let Some(path) = std::env::var_os(variable).filter(|p| !p.is_empty()).map(PathBuf::from) else {
            continue;
        };
        if seen.contains(&path) {
            continue;
        }
        let pem = std::fs::read(&path).map_err(|source| HttpError::ReadBundle {
            variable,
            path: path.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| HttpError::BadBundle {
            variable,
            path: path.clone(),
            message: e.to_string(),
        })?;
        if certs.is_empty() {
            return Err(HttpError::BadBundle { variable, path, message: "the file is empty".to_owned() });
        }
        roots.extend(certs);
        seen.push(path);
    }
    Ok(roots)
}

/// A client builder with fleetcache's TLS and proxy settings, for callers that add timeouts.
pub fn client_builder() -> Result<reqwest::ClientBuilder, HttpError> {
    Ok(reqwest::Client::builder()
        .tls_backend_rustls()
        .tls_certs_merge(extra_roots()?)
        .user_agent(concat!("fleetcache/", env!("CARGO_PKG_VERSION"))))
}

/// A client with fleetcache's TLS and proxy settings.
pub fn client() -> Result<reqwest::Client, HttpError> {
    client_builder()?.build().map_err(HttpError::Build)
}

/// Reads a response's body, refusing one over `limit` bytes (by its declared length before
/// reading, else as it arrives), so a server cannot make the client hold what it likes.
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let url = response.url().to_string();
    let too_large = || format!("the answer of {url} is over {limit} bytes");
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads a JSON answer of at most `limit` bytes (see [`read_limited`]).
pub async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    limit: usize,
) -> Result<T, String> {
    let url = response.url().to_string();
    let body = read_limited(response, limit).await?;
    serde_json::from_slice(&body).map_err(|e| format!("the answer of {url} is not the JSON expected: {e}"))
}

/// Most bytes of an error answer kept for its message.
pub const ERROR_TEXT_LIMIT: usize = 64 * 1024;

/// The text of an error answer, its first [`ERROR_TEXT_LIMIT`] bytes at most (the rest is not
/// read), trimmed; empty if it cannot be read.
pub async fn error_text(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = ERROR_TEXT_LIMIT - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= ERROR_TEXT_LIMIT {
            break;
        }
    }
    String::from_utf8_lossy(&body).trim().to_owned()
}

/// The whole cause chain of `e` in one line (reqwest's own message names only the URL), with a
/// hint when the server's certificate is what failed.
pub fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    if is_certificate_error(e) {
        text.push_str(
            " (the server's TLS certificate is not trusted: add its CA to the system's roots, or name a \
             bundle holding it in SSL_CERT_FILE or NIX_SSL_CERT_FILE)",
        );
    }
    text
}

/// Whether `e` is a refused server certificate: retrying cannot help.
pub fn is_certificate_error(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("invalid peer certificate") || text.contains("certificate verify failed") {
            return true;
        }
        // io::Error hides the error it wraps from `source()`.
        if let Some(inner) = s.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            let text = inner.to_string();
            if text.contains("invalid peer certificate") {
                return true;
            }
        }
        source = s.source();
    }
    false
}
