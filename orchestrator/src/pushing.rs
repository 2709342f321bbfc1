//! `orchestrator push` of paths or of what `orchestrator hook` queued, and the hook itself.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use builder::client::CacheClient;
use builder::push::{FailedPath, PushOptions, PushSummary};
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
    for line in summary.failures() {
        eprintln!("error: {line}");
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

/// `orchestrator push --from-queue DIR [--watch]`: pushes what is queued, removing each file
/// once all of it is in the cache. A file that failed for a reason that may pass (the cache
/// unreachable) stays for the next round (or start); one whose paths the cache refused moves to
/// `refused/` ([`push_queue::refuse`]) so it neither blocks nor repeats.
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
    let queue_error = queue_error(queue);
    let mut delay = Duration::from_secs(5);
    let mut refused = 0;
    loop {
        let queued = push_queue::pending(queue).map_err(queue_error)?;
        if queued.is_empty() {
            if !watch {
                if refused == 0 {
                    eprintln!("the push queue {} is empty", queue.display());
                    return Ok(());
                }
                eprintln!(
                    "the push queue {} is empty; {} the cache refused in {}",
                    queue.display(),
                    count(refused, "batch", "batches"),
                    queue.join(push_queue::REFUSED).display()
                );
                return Err(CliError::Failed);
            }
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let files: Vec<(&push_queue::Queued, Vec<StorePath>)> =
            queued.iter().map(|q| (q, queued_roots(&q.paths))).collect();
        // Each once, in queue order (a system build queues thousands).
        let mut seen = HashSet::new();
        let roots: Vec<StorePath> =
            files.iter().flat_map(|(_, r)| r).filter(|r| seen.insert(*r)).cloned().collect();
        let summary = if roots.is_empty() {
            PushSummary::default()
        } else {
            eprintln!("pushing {} queued paths", roots.len());
            match rt.block_on(builder::push::push(&client, &roots, opts, progress())) {
                Ok(summary) => {
                    report(&summary);
                    summary
                }
                Err(e) => {
                    eprintln!("error: {e}; the paths stay queued");
                    if !watch {
                        return Err(CliError::Failed);
                    }
                    retry_after(&mut delay);
                    continue;
                }
            }
        };
        let failed: HashMap<&str, &FailedPath> =
            summary.failed.iter().map(|f| (f.path.as_str(), f)).collect();
        let mut kept = false;
        for (file, roots) in &files {
            let mine: Vec<&FailedPath> =
                roots.iter().filter_map(|r| failed.get(r.to_absolute().as_str()).copied()).collect();
            if mine.is_empty() {
                push_queue::done(file).map_err(queue_error)?;
            } else if mine.iter().any(|f| !f.permanent) {
                kept = true;
            } else {
                // What failed and, for a path that needs one that failed, that one.
                let mut why: Vec<String> = Vec::new();
                for f in &mine {
                    let cause = f.needs.as_deref().and_then(|n| failed.get(n));
                    for f in std::iter::once(f).chain(cause) {
                        let line = format!("{}: {}", f.path, f.reason);
                        if !why.contains(&line) {
                            why.push(line);
                        }
                    }
                }
                let to = push_queue::refuse(file, &why).map_err(queue_error)?;
                eprintln!(
                    "error: the cache refused {} ({}); moved to {} (move it back into the queue to retry)",
                    file.file.display(),
                    why.join("; "),
                    to.display()
                );
                refused += 1;
            }
        }
        if !kept {
            delay = Duration::from_secs(5);
            continue;
        }
        eprintln!("error: {}; the paths stay queued", summary.refusal().unwrap_or_default());
        if !watch {
            return Err(CliError::Failed);
        }
        retry_after(&mut delay);
    }
}

/// How a failure to read or change the queue `dir` is reported.
fn queue_error(dir: &Path) -> impl Fn(std::io::Error) -> CliError + Copy + '_ {
    move |e| CliError::Error(format!("the push queue {}: {e}", dir.display()))
}

/// Sleeps `delay` and doubles it (up to [`MAX_RETRY_DELAY`]).
fn retry_after(delay: &mut Duration) {
    eprintln!("retrying in {}s", delay.as_secs());
    std::thread::sleep(*delay);
    *delay = (*delay * 2).min(MAX_RETRY_DELAY);
}

/// What to push for the paths of one queue file: each path, or a derivation's outputs, that is
/// in the store (one collected since it was built, or never built, has nothing to push).
fn queued_roots(paths: &[String]) -> Vec<StorePath> {
    let mut roots = Vec::new();
    for p in paths {
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
            if Path::new(&out.to_absolute()).exists() {
                roots.push(out);
            } else {
                eprintln!("{out}: not in the store; skipped");
            }
        }
    }
    roots
}

/// `orchestrator queue`: what waits in the push queue, and what the cache refused and why.
pub(crate) fn show_queue(queue: Option<PathBuf>) -> Result<(), CliError> {
    let dir = queue.map_or_else(push_queue::default_dir, Ok).map_err(CliError::Error)?;
    let queue_error = queue_error(&dir);
    let waiting = push_queue::pending(&dir).map_err(queue_error)?;
    let refused = push_queue::refused(&dir).map_err(queue_error)?;
    let paths: usize = waiting.iter().map(|q| q.paths.len()).sum();
    println!(
        "{}: {} waiting ({})",
        dir.display(),
        count(waiting.len(), "batch", "batches"),
        count(paths, "path", "paths")
    );
    for q in &waiting {
        println!(
            "  {}: {}, queued {}",
            file_name(&q.file),
            count(q.paths.len(), "path", "paths"),
            age(&q.file)
        );
    }
    if refused.is_empty() {
        return Ok(());
    }
    println!(
        "{} refused by the cache, in {} (move a file back into the queue to retry):",
        count(refused.len(), "batch", "batches"),
        dir.join(push_queue::REFUSED).display()
    );
    for (q, why) in &refused {
        println!(
            "  {}: {}, queued {}",
            file_name(&q.file),
            count(q.paths.len(), "path", "paths"),
            age(&q.file)
        );
        for line in why.lines() {
            println!("    {line}");
        }
    }
    Ok(())
}

/// `1 batch`, `2 batches`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn file_name(file: &Path) -> String {
    file.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// How long ago `file` was written, as `5 min ago`.
fn age(file: &Path) -> String {
    let Ok(elapsed) =
        std::fs::metadata(file).and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default())
    else {
        return "at an unknown time".to_owned();
    };
    orchestrator::report::ago(elapsed.as_secs())
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
