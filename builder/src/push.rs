//! Pushing closures into the cache, fast and exactly once.
//!
//! One batch query finds what the cache lacks; nothing else is read or sent. Each missing path
//! is serialised from the store by our NAR writer, compressed with zstd (level 1; a large NAR
//! as a frame per 4 MiB on several threads, [`crate::compress`]; optionally with long-distance
//! matching) and streamed to the cache-server in one request, all stages overlapped with
//! bounded memory; the server hashes it against the NarHash from Nix's database before
//! publishing. Paths start once every reference they have is in the cache (the server
//! publishes nothing whose references it lacks), largest first, several at a time. Transient
//! failures are retried with backoff; a refusal stops that path, and the paths that need it,
//! with the server's reason.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use nix_formats::StorePath;
use nix_formats::nar::{DumpError, dump_path};
use serde::Serialize;
use thiserror::Error;

use crate::client::{CacheClient, ClientError, UploadMeta};
use crate::compress::{self, BufferPool, ParallelEncoder};
use crate::nix::{self, NixError, PathInfo};

/// NARs larger than this are compressed on several threads.
const MULTITHREAD_ABOVE: u64 = 32 * 1024 * 1024;

/// Whether a NAR of `nar_size` bytes is large: compressed on several threads, and one of at
/// most [`LARGE_AT_ONCE`] uploading at once.
fn is_large(nar_size: u64) -> bool {
    nar_size > MULTITHREAD_ABOVE
}

/// Uploads at once unless told otherwise. Most store paths are small, and a small path's
/// upload waits on round trips and on the server's syncs more than on any core; on a
/// journalled file system the uploads waiting for a sync together share one commit. On 2
/// cores, 1001 small paths to ext4 took 1.64 s eight at a time and 1.22 s sixteen at a time
/// (32: no faster); without a journal, 1.16 and 1.03 s.
pub const DEFAULT_JOBS: usize = 16;

/// Large NARs (over [`MULTITHREAD_ABOVE`]) uploaded at once: two keep every compression thread
/// busy ([`compress::THREADS_MAX`] threads, [`compress::IN_FLIGHT`] segments of a NAR out at
/// once); more would only hold their segments and frames in memory, ~50 MiB each.
const LARGE_AT_ONCE: usize = compress::THREADS_MAX.div_ceil(compress::IN_FLIGHT);

/// Compressed bytes are handed to the HTTP body in chunks of this size.
const CHUNK: usize = 1024 * 1024;

/// The zstd level of a push unless told otherwise: fast, and within a few percent of level 3's
/// size on store paths.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// How a push runs.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Paths uploaded at once; of them at most two large NARs (over 32 MiB).
    pub jobs: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// zstd long-distance matching on NARs over 32 MiB: on those of real binaries about 16%
    /// fewer bytes, for about 40% more compression time and ~150 MiB more memory (measured by
    /// scripts/bench-push).
    pub long_distance_matching: bool,
    /// Attempts per path for transient failures.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time, up to 30 s.
    pub backoff: Duration,
}

impl Default for PushOptions {
    /// [`DEFAULT_JOBS`] at once, zstd level 1 without long-distance matching, 5 attempts from
    /// 0.5 s.
    fn default() -> Self {
        PushOptions {
            jobs: DEFAULT_JOBS,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            long_distance_matching: false,
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushSummary {
    /// Paths uploaded now.
    pub uploaded: usize,
    /// Paths the cache had already.
    pub already_present: usize,
    /// Paths not uploaded because an upstream of the cache serves them (machines substitute
    /// them from that upstream).
    pub from_upstream: usize,
    /// Uncompressed NAR bytes of those paths.
    pub upstream_nar_bytes: u64,
    /// Compressed bytes sent.
    pub bytes: u64,
    /// Uncompressed NAR bytes of the uploaded paths.
    pub nar_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Paths not uploaded, with why.
    pub failed: Vec<FailedPath>,
}

impl PushSummary {
    /// `push refused: <path>: <reason>; …` when the cache refused some path (a few paths of any
    /// one reason, the rest counted: [`PushSummary::failures`]).
    pub fn refusal(&self) -> Option<String> {
        if self.failed.is_empty() {
            return None;
        }
        Some(format!("push refused: {}", self.failures().join("; ")))
    }

    /// What failed, a line each: `<path>: <reason>` for the first [`SHOWN_PER_REASON`] paths of
    /// a reason, then `<n> more paths: <reason>` (a full cache fails every path the same way).
    pub fn failures(&self) -> Vec<String> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut lines = Vec::new();
        for f in &self.failed {
            let n = seen.entry(&f.reason).or_default();
            *n += 1;
            if *n <= SHOWN_PER_REASON {
                lines.push(format!("{}: {}", f.path, f.reason));
            }
        }
        let mut more: Vec<(&str, usize)> = seen.into_iter().filter(|(_, n)| *n > SHOWN_PER_REASON).collect();
        more.sort();
        lines.extend(
            more.into_iter().map(|(reason, n)| format!("{} more paths: {reason}", n - SHOWN_PER_REASON)),
        );
        lines
    }
}

/// Paths named with any one reason in [`PushSummary::failures`].
pub const SHOWN_PER_REASON: usize = 3;

/// A path that could not be pushed.
#[derive(Debug, Clone, Serialize)]
pub struct FailedPath {
    /// The store path.
    pub path: String,
    /// The server's reason, or the dependency that failed.
    pub reason: String,
    /// Pushing it again would fail the same way: the cache refused the path itself (its NAR
    /// does not match its hash, say) or it cannot be read from the store; or it needs such a
    /// path. False when the failure may pass: the cache unreachable or overloaded, the token
    /// refused.
    pub permanent: bool,
    /// The path it needs that failed, when that is why.
    pub needs: Option<String>,
}

/// Why a push could not start.
#[derive(Debug, Error)]
pub enum PushError {
    /// Nix could not describe the closure.
    #[error(transparent)]
    Nix(#[from] NixError),
    /// The cache could not be asked what it is missing.
    #[error(transparent)]
    Cache(#[from] ClientError),
}

/// Paths whose references are all in the cache, largest first, the large NARs apart: small
/// ones start while as many large ones as [`LARGE_AT_ONCE`] are uploading.
#[derive(Default)]
struct Ready<'a> {
    large: BinaryHeap<(u64, &'a StorePath)>,
    small: BinaryHeap<(u64, &'a StorePath)>,
}

impl<'a> Ready<'a> {
    fn push(&mut self, nar_size: u64, path: &'a StorePath) {
        let heap = if is_large(nar_size) { &mut self.large } else { &mut self.small };
        heap.push((nar_size, path));
    }

    /// The next path to start, `large_running` large ones uploading now.
    fn pop(&mut self, large_running: usize) -> Option<&'a StorePath> {
        let large = if large_running < LARGE_AT_ONCE { self.large.pop() } else { None };
        large.or_else(|| self.small.pop()).map(|(_, path)| path)
    }
}

/// Reports progress; called from several threads.
pub trait Progress: Send + Sync {
    /// The plan: closure size, paths to upload and their total NAR bytes.
    fn planned(&self, closure: usize, to_upload: usize, nar_bytes: u64);
    /// An upload attempt starts.
    fn started(&self, path: &StorePath, nar_size: u64);
    /// `n` more NAR bytes of `path` were read and compressed.
    fn advanced(&self, path: &StorePath, n: u64);
    /// A path ended: uploaded (`Ok(compressed bytes)`), or failed, or will be retried.
    fn finished(&self, path: &StorePath, outcome: &Result<u64, String>, will_retry: bool);
    /// Something else worth telling (the cache is unreachable and the query is retried).
    fn note(&self, message: &str);
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn planned(&self, _: usize, _: usize, _: u64) {}
    fn started(&self, _: &StorePath, _: u64) {}
    fn advanced(&self, _: &StorePath, _: u64) {}
    fn finished(&self, _: &StorePath, _: &Result<u64, String>, _: bool) {}
    fn note(&self, _: &str) {}
}

/// Chunk buffers the HTTP client has sent, for the next chunks (~100 000 page faults on
/// scripts/bench-push's entropy fixture without it, ~17 000 with it): the chunks in flight of a
/// few uploads at once.
static CHUNKS: BufferPool = BufferPool::new(CHUNK, 16);

/// Hands a chunk to the HTTP body; the receiver is gone when the request failed: stop producing.
fn send_chunk(tx: &tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>, chunk: Bytes) -> io::Result<()> {
    tx.blocking_send(Ok(chunk)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload ended"))
}

/// Sends what is written to the HTTP body, [`CHUNK`] bytes at a time. Its buffer is taken
/// from [`CHUNKS`] when a chunk starts, so the end of a path holds none.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        send_chunk(&self.tx, CHUNKS.chunk(std::mem::take(&mut self.buf)))
    }
}

impl Write for ChannelWriter {
    /// Takes what fits in the chunk.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let (n, full) = CHUNKS.fill(&mut self.buf, data);
        if full {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Reports NAR bytes to the progress as they pass.
struct Counting<W> {
    inner: W,
    progress: Arc<dyn Progress>,
    path: StorePath,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.progress.advanced(&self.path, n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Serialises and compresses one path into `tx` (blocking).
///
/// No hash is computed here: the NarHash sent is the one in Nix's database, and the server
/// hashes what it receives before publishing anything, so a second hash on this side would
/// only cost a core-second per GiB.
fn produce(
    info: &PathInfo,
    opts: &PushOptions,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
    progress: Arc<dyn Progress>,
) -> io::Result<()> {
    let large = is_large(info.nar_size);
    if large && !opts.long_distance_matching {
        let enc = ParallelEncoder::new(opts.zstd_level, |chunk| send_chunk(&tx, chunk))?;
        return dump(info, enc, progress)?.finish();
    }
    let sink = ChannelWriter { tx, buf: Vec::new() };
    let mut enc = zstd::stream::write::Encoder::new(sink, opts.zstd_level)?;
    if large {
        // Long-distance matching needs one frame with a long window: zstd's own threads. On
        // a smaller NAR its 128 MiB window is set up for little to find: a push of 1001 small
        // paths took 5.0 s with it on each of them, 1.9 s without.
        enc.long_distance_matching(true)?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        enc.multithread(cores as u32)?;
    }
    let mut sink = dump(info, enc, progress)?.finish()?;
    sink.flush()
}

/// Writes the NAR of `info`'s path to `out`, reporting its bytes to `progress`.
fn dump<W: Write>(info: &PathInfo, out: W, progress: Arc<dyn Progress>) -> io::Result<W> {
    let counting = Counting { inner: out, progress, path: info.path.clone() };
    let counting = dump_path(Path::new(&info.path.to_absolute()), counting).map_err(|e| match e {
        // The request ended (the server answered early): keep the kind, its answer says why.
        DumpError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe => source,
        e => io::Error::other(e.to_string()),
    })?;
    Ok(counting.inner)
}

/// Why one attempt at one path failed (by default: for no reason that has a kind of its own).
#[derive(Debug, Default)]
struct AttemptError {
    message: String,
    transient: bool,
    /// Trying again cannot help ([`FailedPath::permanent`]).
    permanent: bool,
    /// The cache lacked a reference it had said it had ([`ClientError::is_stale`]).
    stale: bool,
    /// The cache's storage is full ([`ClientError::is_full`]).
    full: bool,
}

async fn upload_one(
    client: &CacheClient,
    info: &PathInfo,
    opts: &PushOptions,
    progress: Arc<dyn Progress>,
) -> Result<u64, AttemptError> {
    let meta = UploadMeta {
        store_path: info.path.to_absolute(),
        references: info.references.iter().map(StorePath::to_absolute).collect(),
        deriver: info.deriver.as_ref().map(StorePath::to_absolute),
        ca: info.ca.clone(),
        nar_hash: info.nar_hash.to_string(),
        nar_size: info.nar_size,
    };
    let mut line = serde_json::to_vec(&meta).expect("serialisable");
    line.push(b'\n');
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Ok(Bytes::from(line))).await.expect("receiver alive");
    let (owned, opts) = (info.clone(), opts.clone());
    let producer = tokio::task::spawn_blocking(move || produce(&owned, &opts, tx, progress));
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let sent = client.upload(body).await;
    let produced =
        producer.await.map_err(|e| AttemptError { message: e.to_string(), ..Default::default() })?;
    match (sent, produced) {
        (Ok(size), Ok(())) => Ok(size),
        (_, Err(e)) if e.kind() != io::ErrorKind::BrokenPipe => Err(AttemptError {
            message: format!("reading {} from the store: {e}", info.path),
            permanent: true,
            ..Default::default()
        }),
        (Err(e), _) => Err(AttemptError {
            transient: e.is_transient(),
            permanent: e.is_refusal(),
            stale: e.is_stale(),
            full: e.is_full(),
            message: e.to_string(),
        }),
        (Ok(_), Err(e)) => {
            Err(AttemptError { message: e.to_string(), transient: true, ..Default::default() })
        }
    }
}

/// The delay before retry number `tries` (from 1): doubling from `opts.backoff`, at most 30 s.
fn backoff(opts: &PushOptions, tries: u32) -> Duration {
    opts.backoff.saturating_mul(1 << (tries - 1).min(6)).min(Duration::from_secs(30))
}

/// Pushes the closures of `roots` to the cache.
///
/// When the cache refuses a path because a reference it said it had is gone (a garbage
/// collection ran meanwhile), the push asks once more what is missing and uploads that.
pub async fn push(
    client: &CacheClient,
    roots: &[StorePath],
    opts: &PushOptions,
    progress: Arc<dyn Progress>,
) -> Result<PushSummary, PushError> {
    let start = Instant::now();
    let (mut summary, stale) = push_round(client, roots, opts, progress.clone()).await?;
    if stale {
        progress.note(
            "the cache lost a reference during the push (garbage collection?); asking again what it lacks",
        );
        let (again, _) = push_round(client, roots, opts, progress).await?;
        summary.uploaded += again.uploaded;
        summary.from_upstream = again.from_upstream;
        summary.upstream_nar_bytes = again.upstream_nar_bytes;
        summary.bytes += again.bytes;
        summary.nar_bytes += again.nar_bytes;
        summary.failed = again.failed;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// One round of [`push`]: what the cache lacks, uploaded in dependency order. Also says
/// whether a path was refused for a reference the cache no longer has.
async fn push_round(
    client: &CacheClient,
    roots: &[StorePath],
    opts: &PushOptions,
    progress: Arc<dyn Progress>,
) -> Result<(PushSummary, bool), PushError> {
    let roots_owned = roots.to_vec();
    let infos = tokio::task::spawn_blocking(move || nix::closure_info(&roots_owned))
        .await
        .expect("path-info task")?;
    let all: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let mut tries = 0;
    let query = loop {
        tries += 1;
        match client.query(&all).await {
            Ok(q) => break q,
            Err(e) if e.is_transient() && tries < opts.attempts => {
                let delay = backoff(opts, tries);
                progress.note(&format!("asking the cache what it lacks failed ({e}); retrying in {delay:?}"));
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let missing: HashSet<StorePath> = query.missing.into_iter().collect();
    let upstream: HashSet<StorePath> = query.upstream.into_iter().collect();
    let upstream_nar_bytes = infos.iter().filter(|i| upstream.contains(&i.path)).map(|i| i.nar_size).sum();
    let infos: HashMap<StorePath, PathInfo> =
        infos.into_iter().filter(|i| missing.contains(&i.path)).map(|i| (i.path.clone(), i)).collect();

    let mut summary = PushSummary {
        already_present: all.len().saturating_sub(infos.len() + upstream.len()),
        from_upstream: upstream.len(),
        upstream_nar_bytes,
        ..Default::default()
    };
    progress.planned(all.len(), infos.len(), infos.values().map(|i| i.nar_size).sum());

    // A path waits for its references that are not in the cache yet.
    let mut waiting: HashMap<&StorePath, usize> = HashMap::new();
    let mut dependents: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    let mut ready = Ready::default();
    for info in infos.values() {
        let pending: Vec<&StorePath> =
            info.references.iter().filter(|r| **r != info.path && infos.contains_key(*r)).collect();
        for r in &pending {
            dependents.entry(*r).or_default().push(&info.path);
        }
        if pending.is_empty() {
            ready.push(info.nar_size, &info.path);
        } else {
            waiting.insert(&info.path, pending.len());
        }
    }

    let mut running = FuturesUnordered::new();
    let mut stale = false;
    let mut attempts: HashMap<&StorePath, u32> = HashMap::new();
    let attempt = |path: &'_ StorePath, delay: Duration| {
        let info = &infos[path];
        let progress = progress.clone();
        async move {
            tokio::time::sleep(delay).await;
            progress.started(&info.path, info.nar_size);
            (&info.path, upload_one(client, info, opts, progress).await)
        }
    };
    let mut large_running = 0;
    // Once the cache says it is full, no upload starts: each would be refused the same way.
    let mut full = false;
    loop {
        while !full && running.len() < opts.jobs.max(1) {
            let Some(path) = ready.pop(large_running) else { break };
            large_running += usize::from(is_large(infos[path].nar_size));
            running.push(attempt(path, Duration::ZERO));
        }
        let Some((path, result)) = running.next().await else { break };
        let tries = attempts.entry(path).or_insert(0);
        *tries += 1;
        let retried = matches!(&result, Err(e) if e.transient && *tries < opts.attempts);
        if !retried {
            large_running -= usize::from(is_large(infos[path].nar_size));
        }
        match result {
            Ok(size) => {
                progress.finished(path, &Ok(size), false);
                summary.uploaded += 1;
                summary.bytes += size;
                summary.nar_bytes += infos[path].nar_size;
                for d in dependents.get(path).into_iter().flatten() {
                    // Not waiting any more: another of its references failed, and so did it.
                    let Some(left) = waiting.get_mut(d) else { continue };
                    *left -= 1;
                    if *left == 0 {
                        waiting.remove(d);
                        ready.push(infos[*d].nar_size, d);
                    }
                }
            }
            Err(e) if retried => {
                progress.finished(path, &Err(e.message), true);
                running.push(attempt(path, backoff(opts, *tries)));
            }
            Err(e) => {
                stale |= e.stale;
                if e.full && !full {
                    full = true;
                    progress
                        .note("the cache is full: no further upload starts (free space, then push again)");
                }
                progress.finished(path, &Err(e.message.clone()), false);
                summary.failed.push(FailedPath {
                    path: path.to_string(),
                    reason: e.message,
                    permanent: e.permanent,
                    needs: None,
                });
                // Everything that needs this path can never be published: say so.
                let mut stack = vec![path];
                while let Some(p) = stack.pop() {
                    for d in dependents.get(p).into_iter().flatten() {
                        if waiting.remove(d).is_some() {
                            summary.failed.push(FailedPath {
                                path: d.to_string(),
                                reason: format!("not uploaded: it needs {path}, which failed"),
                                permanent: e.permanent,
                                needs: Some(path.to_string()),
                            });
                            stack.push(d);
                        }
                    }
                }
            }
        }
    }
    if full {
        // What never started: ready, or waiting for a reference that was not uploaded.
        let left = std::iter::from_fn(|| ready.pop(0)).chain(waiting.into_keys());
        summary.failed.extend(left.map(|p| FailedPath {
            path: p.to_string(),
            reason: "not uploaded: the cache is full".to_owned(),
            permanent: false,
            needs: None,
        }));
    }
    Ok((summary, stale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_a_few_paths_of_a_reason_and_count_the_rest() {
        let failed = |path: &str, reason: &str| FailedPath {
            path: path.to_owned(),
            reason: reason.to_owned(),
            permanent: false,
            needs: None,
        };
        let mut summary = PushSummary::default();
        assert_eq!(summary.refusal(), None);
        summary.failed.push(failed("/nix/store/a", "the cache answered 507"));
        summary.failed.push(failed("/nix/store/b", "needs /nix/store/a"));
        summary.failed.extend((0..7).map(|i| failed(&format!("/nix/store/l{i}"), "the cache is full")));
        assert_eq!(
            summary.failures(),
            [
                "/nix/store/a: the cache answered 507",
                "/nix/store/b: needs /nix/store/a",
                "/nix/store/l0: the cache is full",
                "/nix/store/l1: the cache is full",
                "/nix/store/l2: the cache is full",
                "4 more paths: the cache is full",
            ]
        );
        assert!(
            summary.refusal().unwrap().starts_with("push refused: /nix/store/a: the cache answered 507; ")
        );
    }

    #[test]
    fn large_nars_wait_for_a_slot_while_small_ones_start() {
        let paths: Vec<StorePath> = (0..5)
            .map(|i| StorePath::from_absolute(&format!("/nix/store/{}-p{i}", "a".repeat(32))).unwrap())
            .collect();
        let mut ready = Ready::default();
        let (mib, large) = (1 << 20, MULTITHREAD_ABOVE + 1);
        for (path, size) in paths.iter().zip([large, mib, large + 2, 2 * mib, large + 1]) {
            ready.push(size, path);
        }
        // Largest first while large slots are free, then only small ones, then the last large.
        assert_eq!(ready.pop(0), Some(&paths[2]));
        assert_eq!(ready.pop(1), Some(&paths[4]));
        assert_eq!(ready.pop(LARGE_AT_ONCE), Some(&paths[3]));
        assert_eq!(ready.pop(LARGE_AT_ONCE), Some(&paths[1]));
        assert_eq!(ready.pop(LARGE_AT_ONCE), None);
        assert_eq!(ready.pop(LARGE_AT_ONCE - 1), Some(&paths[0]));
        assert_eq!(ready.pop(0), None);
    }

    #[test]
    fn chunks_are_full_and_keep_every_byte() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let mut sink = ChannelWriter { tx, buf: Vec::new() };
        // Writes of awkward sizes, one larger than a chunk, so chunk ends fall inside writes.
        let data: Vec<u8> = (0..5 * CHUNK + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        let mut rest = &data[..];
        for size in [1, CHUNK - 1, 3, CHUNK + CHUNK / 2, 100_000].into_iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = size.min(rest.len());
            sink.write_all(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
        sink.flush().unwrap();
        drop(sink);
        let mut chunks = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            chunks.push(chunk.unwrap());
        }
        let (last, full) = chunks.split_last().unwrap();
        assert!(full.iter().all(|c| c.len() == CHUNK), "every chunk but the last is full");
        assert_eq!(last.len(), 12_345);
        assert_eq!(chunks.concat(), data);
        // Sent chunks give their buffers back, empty, at their size.
        drop(chunks);
        let pooled = CHUNKS.held();
        assert!(!pooled.is_empty() && pooled.iter().all(|&b| b == (0, CHUNK)), "{pooled:?}");
    }
}
