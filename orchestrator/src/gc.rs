//! Garbage collection by fleet revision: the state knows which revisions matter (the newest,
//! the recent, the pinned), the cache knows what it stores. The orchestrator turns the first
//! into root store paths and asks the cache-server to keep what they reach and delete the rest
//! (`POST /api/v1/gc`); the cache stays ignorant of revisions and schedulers.

use cache_protocol::{GcReport, GcRequest};
use serde::Serialize;
use thiserror::Error;

use crate::cache::{CacheError, CacheTarget};
use crate::config::Config;
use crate::state::{Roots, State, StateError};

/// Why a collection did not happen.
#[derive(Debug, Error)]
pub enum GcError {
    /// Nothing would be kept: the cache would be emptied.
    #[error(
        "no recorded revision has outputs to keep ({0} revision(s) known): a collection now would empty the cache; build a revision first"
    )]
    NothingKept(usize),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The cache refused or failed the collection.
    #[error("collecting garbage on {location}: {source}")]
    Collect {
        /// The cache.
        location: String,
        /// What it said.
        #[source]
        source: builder::client::ClientError,
    },
}

/// What to keep, beside the configuration's `[gc]`.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// The newest revisions kept.
    pub revisions: usize,
    /// Revisions built within this many days are kept.
    pub days: u64,
}

/// A collection's outcome: what was kept, and the cache's report.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// The cache collected.
    pub cache: String,
    /// The revisions kept and why.
    pub kept: Roots,
    /// What the cache did.
    pub report: GcReport,
}

/// Computes the roots from the state and has the cache collect.
pub async fn collect(config: &Config, state: &State, keep: Keep, dry_run: bool) -> Result<Outcome, GcError> {
    let kept = state.gc_roots(keep.revisions, keep.days).await?;
    if kept.paths.is_empty() {
        return Err(GcError::NothingKept(kept.revisions.len() + kept.dropped));
    }
    let cache = CacheTarget::open_admin(&config.cache).await?;
    let req = GcRequest { roots: kept.paths.clone(), dry_run, grace_seconds: Some(config.gc.grace_seconds) };
    let result = cache.client.collect(&req).await;
    let location = cache.location.clone();
    cache.close().await;
    let report = result.map_err(|source| GcError::Collect { location: location.clone(), source })?;
    Ok(Outcome { cache: location, kept, report })
}
