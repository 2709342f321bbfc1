//! fleetcache's cache-server: a Nix binary cache over a local directory or S3 that verifies
//! every upload, signs narinfos with the fleet's key(s) and serves them to fleet machines.
//!
//! [`run`] takes an already-bound listener and a shutdown signal, so tests bind port 0 and
//! systemd socket activation works; SIGTERM drains requests in flight.

pub mod auth;
pub mod config;
pub mod gc;
pub mod http;
pub mod index;
pub mod ingest;
pub mod listener;
pub mod metrics;
pub mod narinfo_cache;
pub mod native;
pub mod storage;
pub mod upstream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix_formats::{CacheInfo, SecretKey};
use thiserror::Error;

use crate::auth::{TokenFile, TokenFileError};
use crate::config::{Config, ConfigError, StoreUrl};
use crate::http::AppState;
use crate::metrics::{Metrics, TimedStorage};
use crate::narinfo_cache::NarinfoCache;
use crate::storage::{LocalStorage, S3Options, S3Storage, Storage, StorageError};

/// Why the server could not be set up from its configuration.
#[derive(Debug, Error)]
pub enum SetupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A signing key file could not be read or parsed.
    #[error("signing key {path}: {message}")]
    SigningKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tokens file could not be read or parsed.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    /// The S3 credentials file could not be read or lacks a key.
    #[error("S3 credentials file {path}: {message}")]
    S3CredentialsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// S3 credentials are missing.
    #[error(transparent)]
    S3(#[from] storage::MissingCredentials),
    /// The storage could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The upstream settings are unusable.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamConfigError),
}

/// Reads the signing keys, tokens and storage a configuration names. Does not contact S3.
pub async fn setup(config: &Config) -> Result<AppState, SetupError> {
    let signing_keys = config
        .signing_key_files
        .iter()
        .map(|path| {
            let err = |message: String| SetupError::SigningKey { path: path.clone(), message };
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            SecretKey::parse(&text).map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let upload_tokens = config.upload_tokens_file.as_deref().map(TokenFile::load).transpose()?;
    let read_tokens = config.read_tokens_file.as_deref().map(TokenFile::load).transpose()?;
    let admin_tokens = config.admin_tokens_file.as_deref().map(TokenFile::load).transpose()?;
    let metrics = Arc::new(Metrics::default());
    let store = StoreUrl::parse(&config.store)?;
    let nar_redirect = config.nar_redirect(&store)?;
    let backend: Box<dyn Storage> = match store {
        StoreUrl::File(dir) => Box::new(LocalStorage::open(&dir).await?),
        StoreUrl::S3 { bucket, endpoint, region, checksums_when_required } => {
            let s3 = S3Storage::new(&S3Options {
                bucket,
                endpoint,
                region,
                credentials: config.s3_credentials_file.as_deref().map(s3_credentials).transpose()?,
                checksums_when_required,
                timeout: (config.s3_timeout_seconds > 0)
                    .then(|| Duration::from_secs(config.s3_timeout_seconds)),
            })?;
            Box::new(match &config.nar_presigned_endpoint {
                Some(e) => s3.presigning_for(e),
                None => s3,
            })
        }
    };
    let cache_info = CacheInfo { priority: Some(config.priority), ..CacheInfo::fleetcache_default() };
    Ok(AppState {
        storage: Arc::new(TimedStorage::new(backend, metrics.clone())),
        signing_keys,
        upload_tokens,
        read_tokens,
        admin_tokens,
        gc: gc::Guard::default(),
        upstreams: upstream::Upstreams::new(&config.upstream)?,
        index: index::NarinfoIndex::default(),
        index_refresh: (config.index_refresh_seconds > 0)
            .then(|| Duration::from_secs(config.index_refresh_seconds)),
        cache_info: cache_info.to_string(),
        nar_redirect,
        max_narinfo_bytes: config.max_narinfo_bytes,
        narinfo_cache: NarinfoCache::new(
            Duration::from_secs(config.narinfo_cache_seconds),
            narinfo_cache::DEFAULT_BUDGET,
        ),
        metrics,
        limits: config.limits(),
        upload_slots: native::UploadSlots::default(),
    })
}

/// Reads an access key id and secret from `KEY=value` lines (`#` comments, optional quotes).
fn s3_credentials(path: &std::path::Path) -> Result<(String, String), SetupError> {
    let err = |message: String| SetupError::S3CredentialsFile { path: path.to_owned(), message };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let (mut id, mut secret) = (None, None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once('=').ok_or_else(|| err("expected KEY=value lines".into()))?;
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').to_owned();
        match key.trim().trim_start_matches("export ") {
            "AWS_ACCESS_KEY_ID" => id = Some(value),
            "AWS_SECRET_ACCESS_KEY" => secret = Some(value),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Ok((id, secret)),
        _ => Err(err("needs both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into())),
    }
}

/// Serves `state` on `listener` until `shutdown` resolves, then finishes requests in flight
/// (within the drain deadline), with the listener limits of its configuration.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits.clone();
    let state = Arc::new(state);
    let loader = state.index_refresh.map(|every| {
        let state = state.clone();
        tokio::spawn(async move { state.index.keep_loaded(state.storage.as_ref(), every).await })
    });
    let served = listener::serve(listener, http::router(state), limits, shutdown).await;
    if let Some(loader) = loader {
        loader.abort();
    }
    served
}
