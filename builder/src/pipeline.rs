//! What happens after `nix build` starts, the same for a builder agent's job and for
//! `orchestrator build` on its own machine: the derivation is built, its output checked for the
//! files it must have, its closure pushed (a refusal by the cache counts as a failed push), its
//! build log uploaded, and its output verified on this machine's hardware when asked. The
//! caller records the [`Attempt`] it ends as.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix_formats::StorePath;
use tokio_util::sync::CancellationToken;

use crate::api::{Verification, VerifySpec};
use crate::client::CacheClient;
use crate::nix_build::{self, BuildEnd};
use crate::push::PushOptions;

/// The derivation to build and what its output must pass.
pub struct Target<'a> {
    /// The derivation.
    pub drv: &'a StorePath,
    /// Its outputs: the roots of the closure pushed.
    pub outputs: &'a [StorePath],
    /// The output the files and the verification are about.
    pub main_output: Option<&'a StorePath>,
    /// Files that output must have.
    pub required_files: &'a [String],
    /// The check to run on it, if any.
    pub verify: Option<&'a VerifySpec>,
}

/// Where the build goes and how.
pub struct Settings<'a> {
    /// The cache the closure and the log go to.
    pub cache: &'a CacheClient,
    /// How to push.
    pub push: &'a PushOptions,
    /// Log bytes kept (the tail) for the record and the failure message.
    pub max_log_bytes: usize,
    /// Features this machine has: a verification needing others is not run here.
    pub features: &'a [String],
    /// Who verifies, as the verification records it.
    pub name: &'a str,
}

/// A step of the pipeline, as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `nix build` runs.
    Building,
    /// The closure is being pushed.
    Pushing,
    /// The verification runs.
    Verifying,
}

impl Stage {
    /// The word a builder reports in its heartbeats.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Building => "building",
            Stage::Pushing => "pushing",
            Stage::Verifying => "verifying",
        }
    }
}

/// What the caller is told while the pipeline runs.
pub trait Watcher: Send + Sync {
    /// A step starts.
    fn stage(&self, stage: Stage);
    /// A line of the build log.
    fn log_line(&self, line: &str);
    /// NAR bytes pushed so far.
    fn pushed(&self, total: u64);
    /// Something worth telling that changes nothing (the log was not uploaded).
    fn note(&self, message: &str);
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Built and published; verified if a check was asked for.
    Built(Option<Verification>),
    /// The build failed, or its output lacks a required file: the derivation failed.
    Failed(String),
    /// The build is good but publishing it failed: another attempt pushes it again.
    PushFailed(String),
    /// Cancelled, with where it stopped.
    Stopped(&'static str),
}

/// An attempt's end, its log and its length.
#[derive(Debug)]
pub struct Attempt {
    /// How it ended.
    pub end: End,
    /// The tail of the build log.
    pub log: String,
    /// How long it took.
    pub seconds: f64,
}

/// Builds `target`, checks it, pushes it, uploads its log and verifies it, until `cancel`.
#[tracing::instrument(skip_all, fields(drv = %target.drv.to_absolute()))]
pub async fn realise(
    target: &Target<'_>,
    settings: &Settings<'_>,
    watcher: Arc<dyn Watcher>,
    cancel: &CancellationToken,
) -> Attempt {
    let started = Instant::now();
    tracing::debug!("building");
    watcher.stage(Stage::Building);
    let (built, log) =
        nix_build::build(target.drv, settings.max_log_bytes, cancel, |line| watcher.log_line(line)).await;
    let end = match built {
        BuildEnd::Cancelled => End::Stopped("stopped while building"),
        BuildEnd::Failed(e) => End::Failed(e),
        BuildEnd::Built => publish(target, settings, watcher, cancel).await,
    };
    let seconds = started.elapsed().as_secs_f64();
    tracing::debug!(?end, seconds, "attempt ended");
    Attempt { end, log: log.text(), seconds }
}

/// The steps after a good build.
async fn publish(
    target: &Target<'_>,
    settings: &Settings<'_>,
    watcher: Arc<dyn Watcher>,
    cancel: &CancellationToken,
) -> End {
    let lacking = target.main_output.and_then(|out| crate::verify::lacking(out, target.required_files));
    if let Some(why) = lacking {
        return End::Failed(why);
    }
    tracing::debug!("built; pushing the closure");
    watcher.stage(Stage::Pushing);
    let progress = Arc::new(PushProgress { watcher: watcher.clone(), pushed: AtomicU64::new(0) });
    let pushed = tokio::select! {
        r = crate::push::push(settings.cache, target.outputs, settings.push, progress) => r,
        _ = cancel.cancelled() => return End::Stopped("stopped while pushing"),
    };
    match pushed {
        Err(e) => return End::PushFailed(format!("push: {e}")),
        Ok(summary) => {
            if let Some(why) = summary.refusal() {
                return End::PushFailed(why);
            }
            if summary.from_upstream > 0 {
                watcher.note(&format!(
                    "pushed {} paths; {} paths ({:.1} MiB) are served by an upstream of the cache and were \
                     not uploaded",
                    summary.uploaded,
                    summary.from_upstream,
                    summary.upstream_nar_bytes as f64 / 1048576.0
                ));
            }
        }
    }
    if let Err(e) = nix_build::upload_stored_log(settings.cache, target.drv).await {
        watcher.note(&format!("{}: the build log was not uploaded: {e}", target.drv.to_absolute()));
    }
    let (Some(spec), Some(out)) = (target.verify, target.main_output) else { return End::Built(None) };
    tracing::debug!(command = %spec.command, "pushed; verifying");
    watcher.stage(Stage::Verifying);
    let mut verification = crate::verify::verify(out, spec, settings.features).await;
    verification.by = settings.name.to_owned();
    End::Built(Some(verification))
}

/// Push progress as the watcher takes it: NAR bytes read so far.
struct PushProgress {
    watcher: Arc<dyn Watcher>,
    pushed: AtomicU64,
}

impl crate::push::Progress for PushProgress {
    fn planned(&self, _closure: usize, _to_upload: usize, _nar_bytes: u64) {}
    fn started(&self, _path: &StorePath, _nar_size: u64) {}
    fn advanced(&self, _path: &StorePath, n: u64) {
        let total = self.pushed.fetch_add(n, Ordering::Relaxed) + n;
        self.watcher.pushed(total);
    }
    fn finished(&self, _path: &StorePath, _outcome: &Result<u64, String>, _will_retry: bool) {}
    fn note(&self, message: &str) {
        self.watcher.note(message);
    }
}
