//! `orchestrator push` of paths or of what `orchestrator hook` queued, and the hook itself.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use builder::client::CacheClient;
use builder::push::{PushOptions, PushSummary};
use nix_formats::StorePath;
use orchestrator::push_queue;

use crate::CliError;
use crate::commands::read_token;

/// `orchestrator push PATHS`: their closures (a .drv's outputs), reported as a line or JSON.
pub(crate) fn push(
    cache: &str,
    token_file: &Path,
    opts: &PushOptions,
    json: bool,
    paths: &[String],
) -> Result<(), CliError> {
    let token = read_token(token_file)?;
    let mut roots = Vec::new();
    for p in paths {
        let resolved =
            std::fs::canonicalize(p).map(|r| r.display().to_string()).unwrap_or_else(|_| p.clone());
        let path = StorePath::from_absolute(&resolved).map_err(|e| CliError::Error(format!("{p}: {e}")))?;
        if path.is_derivation() {
            roots.extend(builder::nix::derivation_outputs(&path)?);
        } else {
            roots.push(path);
        }
    }
    let client = CacheClient::new(cache, &token)?;
    let rt = tokio::runtime::Runtime::new()?;
    let summary = rt.block_on(builder::push::push(&client, &roots, opts, progress()))?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        report(&summary);
    }
    if summary.failed.is_empty() {
        return Ok(());
    }
    for f in &summary.failed {
        eprintln!("error: {}: {}", f.path, f.reason);
    }
    Err(CliError::Failed)
}

/// Progress bars on a terminal, lines otherwise.
fn progress() -> Arc<dyn builder::push::Progress> {
    if std::io::stderr().is_terminal() {
        Arc::new(builder::progress::Bars::new())
    } else {
        Arc::new(builder::progress::Lines::default())
    }
}

/// The summary line of a push.
fn report(summary: &PushSummary) {
    eprintln!(
        "uploaded {} paths ({:.1} MiB compressed from {:.1} MiB), {} already cached, {} served by an \
             upstream ({:.1} MiB, not uploaded), in {:.1}s",
        summary.uploaded,
        summary.bytes as f64 / 1048576.0,
        summary.nar_bytes as f64 / 1048576.0,
        summary.already_present,
        summary.from_upstream,
        summary.upstream_nar_bytes as f64 / 1048576.0,
        summary.seconds
    );
}

/// Longest wait between two attempts at a batch that failed.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// `orchestrator push --from-queue DIR [--watch]`: pushes what is queued, removing each batch
/// once all of it is in the cache; a failed batch stays for the next round (or start).
pub(crate) fn from_queue(
    cache: &str,
    token_file: &Path,
    opts: &PushOptions,
    queue: &Path,
    watch: bool,
) -> Result<(), CliError> {
    let token = read_token(token_file)?;
    let client = CacheClient::new(cache, &token)?;
    let rt = tokio::runtime::Runtime::new()?;
    let queue_error = |e: std::io::Error| CliError::Error(format!("the push queue {}: {e}", queue.display()));
    let mut delay = Duration::from_secs(5);
    loop {
        let batch = push_queue::pending(queue).map_err(queue_error)?;
        if batch.files.is_empty() {
            if !watch {
                eprintln!("the push queue {} is empty", queue.display());
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let mut roots = Vec::new();
        for p in &batch.paths {
            let path = match StorePath::from_absolute(p) {
                Ok(path) => path,
                Err(e) => {
                    eprintln!("{p:?} in the queue is not a store path ({e}); skipped");
                    continue;
                }
            };
            let built = if path.is_derivation() && Path::new(p).exists() {
                builder::nix::derivation_outputs(&path).unwrap_or_else(|e| {
                    eprintln!("{path}: its outputs are unknown ({e}); skipped");
                    Vec::new()
                })
            } else {
                vec![path]
            };
            for out in built {
                // Collected from the store since it was built (or never built): nothing to push.
                if Path::new(&out.to_absolute()).exists() {
                    roots.push(out);
                } else {
                    eprintln!("{out}: not in the store; skipped");
                }
            }
        }
        if roots.is_empty() {
            push_queue::done(&batch).map_err(queue_error)?;
            continue;
        }
        eprintln!("pushing {} queued paths", roots.len());
        let failure = match rt.block_on(builder::push::push(&client, &roots, opts, progress())) {
            Ok(summary) if summary.failed.is_empty() => {
                report(&summary);
                push_queue::done(&batch).map_err(queue_error)?;
                delay = Duration::from_secs(5);
                continue;
            }
            Ok(summary) => summary.refusal().unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        eprintln!("error: {failure}; the paths stay queued");
        if !watch {
            return Err(CliError::Failed);
        }
        eprintln!("retrying in {}s", delay.as_secs());
        std::thread::sleep(delay);
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// `orchestrator hook`: queues the built paths and returns. It never fails the build: a path
/// that cannot be queued is reported on stderr (which Nix shows) and the build goes on.
pub(crate) fn hook(queue: Option<PathBuf>, paths: Vec<String>) -> Result<(), CliError> {
    let paths = if paths.is_empty() { push_queue::built_paths_from_env() } else { paths };
    if paths.is_empty() {
        return Ok(());
    }
    let dir = match queue.map_or_else(push_queue::default_dir, Ok) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("fleetcache hook: not queued for the cache: {e}");
            return Ok(());
        }
    };
    match push_queue::enqueue(&dir, &paths) {
        Ok(_) => eprintln!("fleetcache hook: {} paths queued for the cache", paths.len()),
        Err(e) => eprintln!("fleetcache hook: not queued for the cache ({}: {e})", dir.display()),
    }
    Ok(())
}
