//! What planning and building a revision share: the state, the cache, the progress display,
//! the run's name and settings.

use std::sync::Arc;

use builder::client::ClientError;
use builder::push::PushOptions;
use nix_formats::StorePath;
use tokio_util::sync::CancellationToken;

use crate::cache::CacheTarget;
use crate::report::Reporter;
use crate::state::State;

/// Settings of a run.
#[derive(Clone)]
pub struct BuildOptions {
    /// Rebuild derivations whose last attempt failed.
    pub retry_failed: bool,
    /// Derivations built at once.
    pub max_jobs: usize,
    /// Push settings.
    pub push: PushOptions,
    /// Log bytes kept per attempt.
    pub max_log_bytes: usize,
    /// This machine's features, for verifications.
    pub features: Vec<String>,
}

/// What a run needs.
pub struct Context {
    /// The state database.
    pub state: State,
    /// Where results go.
    pub cache: Arc<CacheTarget>,
    /// Progress.
    pub reporter: Arc<dyn Reporter>,
    /// This run's name in claims and attempts.
    pub owner: String,
    /// Cancelled on Ctrl-C.
    pub cancel: CancellationToken,
    /// Settings.
    pub options: BuildOptions,
}

impl Context {
    /// The subset of `paths` the cache lacks, retrying transient failures.
    pub async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, ClientError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut tries = 0;
        loop {
            tries += 1;
            match self.cache.client.missing(paths).await {
                Err(e) if e.is_transient() && tries < self.options.push.attempts => {
                    self.reporter.note(&format!("asking the cache failed ({e}); retrying"));
                    tokio::time::sleep(self.options.push.backoff * tries).await;
                }
                other => return other,
            }
        }
    }
}
