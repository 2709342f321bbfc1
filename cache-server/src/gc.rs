//! Garbage collection over a set of root store paths: every narinfo the roots reach through
//! `References` stays, with its NAR, its listing and its derivation's build log; everything
//! else of the cache layout that is older than a grace period is deleted, and so are uploads
//! abandoned before it. What the store holds outside the layout (files put there by hand,
//! uploads in progress) is never touched.
//!
//! The store is read in passes, each a paged listing, so memory grows with what is kept, not
//! with what is stored:
//!
//! 1. list: narinfos younger than the grace period become roots too (an upload just published
//!    keeps its closure);
//! 2. mark: read the narinfos the roots reach, remembering their NAR files and derivers;
//! 3. sweep narinfos and listings that were not reached;
//! 4. sweep NARs and logs no kept narinfo names — only after the narinfos that named them are
//!    gone, so a collection stopped half-way never leaves a narinfo without its NAR;
//! 5. drop what uploads that never ended left, begun before the grace period (S3 keeps
//!    incomplete multipart uploads, and bills them, until they are aborted).
//!
//! Uploads go on while a collection runs, and [`Guard`] keeps every closure whole:
//!
//! - a publication and a delete batch never overlap; what a publication writes (its narinfo,
//!   its NAR) is protected from the batches that follow it;
//! - while the mark runs, nothing is deleted yet: the narinfos publications refer to become
//!   roots too, marked with their closures before the first deletion;
//! - once marked, a narinfo neither reached nor re-published is doomed: a publication that
//!   refers to it is refused as stale (409), and the uploaders' "which are missing?" counts it
//!   missing, so the uploader publishes it (and what it needs) again — protected this time.
//!
//! Only publications in this process are seen: with several servers on one store, collect
//! through one while the others do not take uploads, or keep the grace period longer than a
//! push takes.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use cache_protocol::{GC_SAMPLE, GcReport, Tally};
use futures_util::{StreamExt as _, TryStreamExt as _};
use nix_formats::{NarInfo, StorePath};
use thiserror::Error;

use crate::narinfo_cache::NarinfoCache;
use crate::storage::{DELETE_BATCH, Key, KeyKind, Listed, Storage, StorageError, get_bytes};

/// Objects written this recently stay, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Narinfos read at once while marking.
const READS_IN_FLIGHT: usize = 64;

/// Why a collection did not run or stopped. Whatever was deleted before it stopped was
/// unreachable; nothing reachable is ever deleted.
#[derive(Debug, Error)]
pub enum GcError {
    /// No roots: the collection would delete the whole cache.
    #[error("no roots given: a collection keeps what the roots reach, and would delete everything")]
    NoRoots,
    /// A root is not a store path.
    #[error("root {0:?} is not a store path")]
    BadRoot(String),
    /// A reachable narinfo cannot be read, so what it keeps is unknown.
    #[error("{key} cannot be read ({why}); nothing it may keep is deleted: collection stopped")]
    Unreadable {
        /// The narinfo.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// Another collection is running.
    #[error("a collection is already running")]
    Busy,
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What to collect.
#[derive(Debug, Clone)]
pub struct Options {
    /// Store paths to keep with their closures.
    pub roots: Vec<String>,
    /// Only say what would go.
    pub dry_run: bool,
    /// Objects written this recently stay.
    pub grace: Duration,
}

/// Keeps collections one at a time and out of the way of publications.
#[derive(Default)]
pub struct Guard {
    /// Held shared by a publication from its checks to its write, exclusively by a delete
    /// batch (and by the end of the mark).
    exclusive: tokio::sync::RwLock<()>,
    /// While a collection runs: what publications relied on, and (once marked) what stays.
    view: Mutex<Option<View>>,
    /// Held by the running collection.
    running: tokio::sync::Mutex<()>,
}

/// What a running collection and the publications share.
#[derive(Default)]
struct View {
    /// Every key a publication wrote or relied on since the collection started.
    protected: HashSet<Key>,
    /// The narinfos the mark reached (hash parts), once it is done.
    live: Option<std::sync::Arc<HashSet<[u8; 32]>>>,
}

impl View {
    /// Doomed: marked as unreachable and not published again since.
    fn doomed(&self, hash_part: &str) -> bool {
        let Some(live) = &self.live else { return false };
        let reached = fixed(hash_part).is_some_and(|h| live.contains(&h));
        !reached && !Key::narinfo(hash_part).is_ok_and(|k| self.protected.contains(&k))
    }
}

/// Held by a publication: no delete batch runs until it is dropped.
pub struct Publishing<'a> {
    guard: &'a Guard,
    _shared: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl Guard {
    /// Waits for a running delete batch, then holds batches off until the returned value is
    /// dropped.
    pub async fn publishing(&self) -> Publishing<'_> {
        Publishing { _shared: self.exclusive.read().await, guard: self }
    }

    /// Of `hash_parts` (narinfos this cache holds), those the running collection is about to
    /// delete: an uploader must publish them again to rely on them.
    pub fn doomed<'h>(&self, hash_parts: impl IntoIterator<Item = &'h str>) -> Vec<&'h str> {
        match self.view.lock().expect("gc guard").as_ref() {
            Some(view) => hash_parts.into_iter().filter(|h| view.doomed(h)).collect(),
            None => Vec::new(),
        }
    }
}

impl Publishing<'_> {
    /// Keeps `keys` from being deleted by the running collection, if one runs (and makes the
    /// narinfos among them roots while it marks).
    pub fn protect(&self, keys: impl IntoIterator<Item = Key>) {
        if let Some(view) = self.guard.view.lock().expect("gc guard").as_mut() {
            view.protected.extend(keys);
        }
    }
}

/// A hash part or file hash as fixed bytes: what the sets hold, about 40 bytes an entry.
fn fixed<const N: usize>(s: &str) -> Option<[u8; N]> {
    s.as_bytes().try_into().ok()
}

/// Runs a collection. `forget` is told when narinfos were deleted (the in-memory narinfo cache
/// must not serve them).
pub async fn collect(
    storage: &dyn Storage,
    guard: &Guard,
    forget: Option<&NarinfoCache>,
    opts: &Options,
) -> Result<GcReport, GcError> {
    let Ok(_running) = guard.running.try_lock() else { return Err(GcError::Busy) };
    if opts.roots.is_empty() {
        return Err(GcError::NoRoots);
    }
    let roots = opts
        .roots
        .iter()
        .map(|r| StorePath::from_absolute(r).map_err(|_| GcError::BadRoot(r.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let _active = Active::start(guard);
    // Publications that began before they could see the collection finish before it lists
    // anything: what they wrote is then listed (young), what comes later is protected.
    drop(guard.exclusive.write().await);
    run(storage, guard, forget, opts, &roots).await
}

/// The collection's view, shared with publications for as long as it runs — also when it is
/// cut short (an error, or the request that asked for it going away).
struct Active<'a>(&'a Guard);

impl<'a> Active<'a> {
    fn start(guard: &'a Guard) -> Self {
        *guard.view.lock().expect("gc guard") = Some(View::default());
        Active(guard)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        *self.0.view.lock().expect("gc guard") = None;
    }
}

struct Run<'a> {
    storage: &'a dyn Storage,
    guard: &'a Guard,
    dry_run: bool,
    cutoff: SystemTime,
    report: GcReport,
    batch: Vec<(Key, u64)>,
}

async fn run(
    storage: &dyn Storage,
    guard: &Guard,
    forget: Option<&NarinfoCache>,
    opts: &Options,
    roots: &[StorePath],
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let mut r = Run {
        storage,
        guard,
        dry_run: opts.dry_run,
        cutoff: SystemTime::now() - opts.grace,
        report: GcReport {
            dry_run: opts.dry_run,
            roots: roots.len() as u64,
            grace_seconds: opts.grace.as_secs(),
            ..GcReport::default()
        },
        batch: Vec::with_capacity(DELETE_BATCH),
    };

    // 1. Young narinfos are roots too.
    let mut start: Vec<[u8; 32]> = roots.iter().filter_map(|p| fixed(p.hash_part())).collect();
    let root_count = start.len();
    r.report.requests += 1;
    let mut listing = storage.list();
    while let Some(obj) = listing.try_next().await? {
        if let KeyKind::Narinfo(hash) = obj.key.kind()
            && obj.modified > r.cutoff
        {
            start.extend(fixed(hash));
        }
    }

    // 2. Mark.
    let mut live = Live::default();
    let mut absent_roots = 0;
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let mut queue: Vec<([u8; 32], bool)> = Vec::new();
    for (i, h) in start.into_iter().enumerate() {
        if seen.insert(h) {
            queue.push((h, i < root_count));
        }
    }
    r.report.requests += mark(storage, &mut live, &mut seen, queue, &mut absent_roots).await?;
    // What publications relied on meanwhile is marked too, with publications held off, and
    // from then on they see what is doomed.
    let reached = {
        let _exclusive = guard.exclusive.write().await;
        let relied: Vec<([u8; 32], bool)> = {
            let view = guard.view.lock().expect("gc guard");
            let protected = view.as_ref().map(|v| &v.protected).into_iter().flatten();
            protected
                .filter_map(|k| match k.kind() {
                    KeyKind::Narinfo(h) => fixed(h).filter(|h| seen.insert(*h)).map(|h| (h, false)),
                    _ => None,
                })
                .collect()
        };
        tracing::debug!(
            relied = relied.len(),
            reached = live.narinfos.len(),
            "marking what uploads relied on"
        );
        r.report.requests += mark(storage, &mut live, &mut seen, relied, &mut absent_roots).await?;
        let marked = std::sync::Arc::new(std::mem::take(&mut live.narinfos));
        // A dry run deletes nothing, so nothing is doomed for uploads.
        if let Some(view) = guard.view.lock().expect("gc guard").as_mut().filter(|_| !opts.dry_run) {
            view.live = Some(marked.clone());
        }
        marked
    };
    drop(seen);
    r.report.roots_absent = absent_roots;
    r.report.reachable = reached.len() as u64;

    // 3. Narinfos and listings nothing reaches.
    r.report.requests += 1;
    let mut listing = storage.list();
    while let Some(obj) = listing.try_next().await? {
        let keep = match obj.key.kind() {
            KeyKind::Narinfo(h) | KeyKind::Listing(h) => fixed(h).is_some_and(|h| reached.contains(&h)),
            _ => continue,
        };
        r.consider(obj, keep).await?;
    }
    r.flush().await?;
    if let Some(cache) = forget.filter(|_| !opts.dry_run && r.report.deleted.narinfos > 0) {
        cache.clear();
    }

    // 4. NARs and logs no kept narinfo names.
    r.report.requests += 1;
    let mut listing = storage.list();
    while let Some(obj) = listing.try_next().await? {
        let keep = match obj.key.kind() {
            KeyKind::Nar(_) => {
                obj.key.nar_file_hash().and_then(fixed).is_some_and(|h| live.nars.contains(&h))
            }
            KeyKind::Log(drv) => fixed(&drv[..32]).is_some_and(|h| live.derivers.contains(&h)),
            KeyKind::CacheInfo => true,
            KeyKind::Narinfo(_) | KeyKind::Listing(_) => continue,
        };
        r.consider(obj, keep).await?;
    }
    r.flush().await?;

    // 5. Uploads that never ended (a server killed mid-upload), begun before the grace period.
    // The collection is done whatever this step meets: a key allowed no listing of multipart
    // uploads (an older IAM policy) or a bucket with a lifecycle rule doing it still collects.
    if !opts.dry_run {
        r.report.requests += 1;
        match storage.drop_abandoned(r.cutoff).await {
            Ok(n) => r.report.abandoned_uploads = n,
            Err(e) => tracing::warn!(error = %e, "uploads that never ended were not dropped"),
        }
    }
    r.report.seconds = started.elapsed().as_secs_f64();
    Ok(r.report)
}

/// Reads the narinfos `queue` names and everything they refer to that is not `seen` yet,
/// into `live`; counts the roots (`true` in the queue) this cache does not hold. Returns the
/// reads made.
async fn mark(
    storage: &dyn Storage,
    live: &mut Live,
    seen: &mut HashSet<[u8; 32]>,
    mut queue: Vec<([u8; 32], bool)>,
    absent_roots: &mut u64,
) -> Result<u64, GcError> {
    let mut requests = 0;
    let mut reads = futures_util::stream::FuturesUnordered::new();
    loop {
        while reads.len() < READS_IN_FLIGHT
            && let Some((hash, is_root)) = queue.pop()
        {
            reads.push(read_narinfo(storage, hash, is_root));
        }
        let Some(read) = reads.next().await else { break };
        requests += 1;
        let (info, is_root) = read?;
        let Some(info) = info else {
            *absent_roots += u64::from(is_root);
            continue;
        };
        for reference in &info.references {
            if let Some(h) = fixed(reference.hash_part())
                && seen.insert(h)
            {
                queue.push((h, false));
            }
        }
        live.add(&info);
    }
    Ok(requests)
}

/// What the marked narinfos keep.
#[derive(Default)]
struct Live {
    narinfos: HashSet<[u8; 32]>,
    nars: HashSet<[u8; 52]>,
    derivers: HashSet<[u8; 32]>,
}

impl Live {
    fn add(&mut self, info: &NarInfo) {
        self.narinfos.extend(fixed(info.store_path.hash_part()));
        // The URL was checked to name a NAR of this cache when the narinfo was read.
        let nar = Key::nar_url(&info.url).expect("checked by read_narinfo");
        self.nars.extend(nar.nar_file_hash().and_then(fixed));
        if let Some(d) = &info.deriver {
            self.derivers.extend(fixed(d.hash_part()));
        }
    }
}

async fn read_narinfo(
    storage: &dyn Storage,
    hash: [u8; 32],
    is_root: bool,
) -> Result<(Option<NarInfo>, bool), GcError> {
    let hash = std::str::from_utf8(&hash).expect("hash parts are ASCII");
    let key =
        Key::narinfo(hash).map_err(|e| GcError::Unreadable { key: hash.to_owned(), why: e.to_string() })?;
    let Some(bytes) = get_bytes(storage, &key).await? else { return Ok((None, is_root)) };
    let info = NarInfo::parse_bytes(&bytes)
        .map_err(|e| GcError::Unreadable { key: key.to_string(), why: e.to_string() })?;
    if Key::nar_url(&info.url).is_err() {
        let why = format!("its URL {:?} is not a NAR of this cache", info.url);
        return Err(GcError::Unreadable { key: key.to_string(), why });
    }
    Ok((Some(info), is_root))
}

impl Run<'_> {
    /// Counts an object as kept, or queues it for deletion (if it is old enough).
    async fn consider(&mut self, obj: Listed, reachable: bool) -> Result<(), GcError> {
        let young = obj.modified > self.cutoff;
        if reachable || young {
            self.report.young += u64::from(!reachable);
            count(&mut self.report.kept, &obj.key, obj.size);
            return Ok(());
        }
        self.batch.push((obj.key, obj.size));
        if self.batch.len() == DELETE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Deletes the queued batch, but for what a publication protected meanwhile.
    async fn flush(&mut self) -> Result<(), GcError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let _exclusive = self.guard.exclusive.write().await;
        let (protected, doomed): (Vec<_>, Vec<_>) = {
            let view = self.guard.view.lock().expect("gc guard");
            batch.into_iter().partition(|(k, _)| view.as_ref().is_some_and(|v| v.protected.contains(k)))
        };
        for (key, size) in &protected {
            self.report.protected += 1;
            count(&mut self.report.kept, key, *size);
        }
        if !self.dry_run && !doomed.is_empty() {
            let keys: Vec<Key> = doomed.iter().map(|(k, _)| k.clone()).collect();
            self.storage.delete_many(&keys).await?;
            self.report.requests += 1;
        }
        for (key, size) in doomed {
            count(&mut self.report.deleted, &key, size);
            if self.report.sample.len() < GC_SAMPLE {
                self.report.sample.push(key.to_string());
            }
        }
        self.batch = Vec::with_capacity(DELETE_BATCH);
        Ok(())
    }
}

fn count(t: &mut Tally, key: &Key, size: u64) {
    match key.kind() {
        KeyKind::Narinfo(_) => t.narinfos += 1,
        KeyKind::Listing(_) => t.listings += 1,
        KeyKind::Nar(_) => t.nars += 1,
        KeyKind::Log(_) => t.logs += 1,
        KeyKind::CacheInfo => {}
    }
    t.bytes += size;
}
