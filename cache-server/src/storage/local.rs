//! The local directory backend (`file:///var/lib/fleetcache/cache`).

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::fs;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::io::ReaderStream;

use super::{ByteRange, Key, Listed, Object, SMALL_OBJECT, Storage, StorageError, Upload};

/// Uploads in progress live here, under the root, so the final rename stays on one file system.
/// Nix never asks for names starting with a dot, and [`Key`] cannot name them.
const TMP_DIR: &str = ".fleetcache-tmp";

/// Uploads older than this in [`TMP_DIR`] were left by a process that died (no upload of ours
/// stalls that long: a stalled body is cut after a minute); they are removed at start.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// A cache in a local directory.
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Opens (creating if needed) a cache directory, removing uploads a killed process left.
    pub async fn open(root: &Path) -> Result<Self, StorageError> {
        let io_err = |source| StorageError::Io { key: root.display().to_string(), source };
        fs::create_dir_all(root.join(TMP_DIR)).await.map_err(io_err)?;
        fs::create_dir_all(root.join("nar")).await.map_err(io_err)?;
        let storage = LocalStorage { root: root.to_owned() };
        let removed = storage.drop_abandoned(std::time::SystemTime::now() - ABANDONED_AFTER).await?;
        if removed > 0 {
            tracing::info!(removed, "removed uploads a stopped server left behind");
        }
        Ok(storage)
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.as_str())
    }
}

/// Removes the files in `dir` last modified before `before` (another process's uploads in
/// flight are younger); returns how many.
async fn remove_abandoned(dir: &Path, before: std::time::SystemTime) -> io::Result<u64> {
    let mut removed = 0;
    let mut entries = fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let old = entry.metadata().await?.modified()? < before;
        if old && fs::remove_file(entry.path()).await.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Sends every object of the layout under `root` to `tx`, directory by directory (the root's
/// narinfos and listings, `nar/`, `log/`); stops early when the receiver is gone.
fn walk(root: &Path, tx: &tokio::sync::mpsc::Sender<Result<Listed, StorageError>>) {
    for dir in ["", "nar", "log"] {
        let at = root.join(dir);
        let entries = match std::fs::read_dir(&at) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                let _ = tx.blocking_send(Err(StorageError::Io { key: at.display().to_string(), source }));
                return;
            }
        };
        for entry in entries {
            let listed = entry.and_then(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let full = if dir.is_empty() { name.into_owned() } else { format!("{dir}/{name}") };
                let Ok(key) = Key::parse(&full) else { return Ok(None) };
                let meta = entry.metadata()?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some(Listed { key, size: meta.len(), modified: meta.modified()? }))
            });
            let item = match listed {
                Ok(Some(l)) => Ok(l),
                Ok(None) => continue,
                // Deleted between the directory read and the stat: not there any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => Err(StorageError::Io { key: at.display().to_string(), source }),
            };
            if tx.blocking_send(item).is_err() {
                return;
            }
        }
    }
}

fn io_err(key: &Key) -> impl Fn(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { key: key.to_string(), source }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn get(&self, key: &Key, range: Option<ByteRange>) -> Result<Option<Object>, StorageError> {
        // Open, stat and (for small objects) read in one trip to the blocking pool: narinfo
        // requests are the hot path, and each trip costs more than the syscalls themselves.
        let path = self.path(key);
        let opened = tokio::task::spawn_blocking(
            move || -> io::Result<Option<(std::fs::File, u64, Option<Bytes>)>> {
                let mut file = match std::fs::File::open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                let size = file.metadata()?.len();
                if range.is_none() && size <= SMALL_OBJECT {
                    let mut buf = Vec::with_capacity(size as usize);
                    std::io::Read::read_to_end(&mut file, &mut buf)?;
                    return Ok(Some((file, size, Some(buf.into()))));
                }
                Ok(Some((file, size, None)))
            },
        );
        let opened = joined(key, opened).await?;
        let Some((file, size, whole)) = opened else { return Ok(None) };
        if let Some(bytes) = whole {
            return Ok(Some(Object {
                size: bytes.len() as u64,
                body: futures_util::stream::once(async { Ok(bytes) }).boxed(),
            }));
        }
        let mut file = fs::File::from_std(file);
        let body = match range {
            None => ReaderStream::with_capacity(file, 256 * 1024).boxed(),
            Some(r) => {
                file.seek(SeekFrom::Start(r.start)).await.map_err(io_err(key))?;
                ReaderStream::with_capacity(file.take(r.len()), 256 * 1024).boxed()
            }
        };
        Ok(Some(Object { size, body }))
    }

    async fn head(&self, key: &Key) -> Result<Option<u64>, StorageError> {
        // A stat, here rather than on the blocking pool: an upload asks for each of its
        // references and its NAR, and the trips cost more than the stats (1001 small paths:
        // 41 000 -> 27 000 context switches, 1.37 -> 1.18 server CPU-seconds).
        match std::fs::metadata(self.path(key)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    async fn begin_put(&self, key: &Key) -> Result<Box<dyn Upload>, StorageError> {
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand).map_err(|e| io_err(key)(io::Error::other(e.to_string())))?;
        let tmp = self.root.join(TMP_DIR).join(format!("{:016x}", u64::from_le_bytes(rand)));
        Ok(Box::new(LocalUpload {
            key: key.clone(),
            dest: self.path(key),
            file: Some(TmpFile { path: tmp, file: None, named: false }),
            writing: None,
            flusher: None,
            flushing: None,
            unflushed: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            size: 0,
        }))
    }

    async fn delete(&self, key: &Key) -> Result<(), StorageError> {
        match fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(key)(e)),
            _ => Ok(()),
        }
    }

    fn list(&self) -> futures_util::stream::BoxStream<'static, Result<Listed, StorageError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || walk(&root, &tx));
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
            .boxed()
    }

    async fn drop_abandoned(&self, before: std::time::SystemTime) -> Result<u64, StorageError> {
        let dir = self.root.join(TMP_DIR);
        let io_err = |source| StorageError::Io { key: dir.display().to_string(), source };
        remove_abandoned(&dir, before).await.map_err(io_err)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// Bytes gathered before they are written: one blocking write per batch instead of a thread
/// hop and a copy per network chunk.
const WRITE_BATCH: usize = 4 << 20;

/// Bytes written between two background flushes of an upload's file. Without them a large NAR
/// sits in the page cache until its final sync, which then waits for all of it at once (a
/// gigabyte is two to four seconds on a cloud disk) after the last byte has arrived; with them
/// the disk writes while the network receives, and the final sync waits only for the tail.
const FLUSH_EVERY: usize = 32 << 20;

/// An upload's temporary file, created by its first write: an object smaller than a batch (a
/// narinfo, most NARs) is created, written, synced and named in one trip to the blocking pool.
/// Removed when dropped unnamed, by whichever of the upload and a write in flight holds it last.
struct TmpFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    named: bool,
}

impl TmpFile {
    /// The file, created now if it is not yet.
    fn file(&mut self) -> io::Result<&mut std::fs::File> {
        match &mut self.file {
            Some(file) => Ok(file),
            empty => Ok(empty.insert(std::fs::File::create_new(&self.path)?)),
        }
    }

    fn write_all(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        let file = self.file()?;
        chunks.iter().try_for_each(|chunk| io::Write::write_all(file, chunk))
    }

    /// Writes `chunks`, makes the file durable and gives it the name `dest`: replacing what is
    /// there, or only if nothing is (`false` then, and the file is removed). The bytes are on
    /// disk before the name appears, so a crash never leaves a short file; the name is on disk
    /// before this returns, or a crash could keep a narinfo (written after its NAR, in another
    /// directory) and lose the NAR's name.
    fn place(mut self, chunks: &[Bytes], dest: &Path, replace: bool) -> io::Result<bool> {
        self.write_all(chunks)?;
        self.file()?.sync_all()?;
        let parent = dest.parent().expect("an object's path is under the root");
        std::fs::create_dir_all(parent)?;
        if replace {
            std::fs::rename(&self.path, dest)?;
            self.named = true;
        } else {
            // A hard link, unlike a rename, never replaces what is there.
            let linked = std::fs::hard_link(&self.path, dest);
            std::fs::remove_file(&self.path)?;
            self.named = true;
            match linked {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                linked => linked?,
            }
        }
        match std::fs::File::open(parent)?.sync_all() {
            // A file system that cannot sync a directory (EINVAL, ENOTSUP: some network and
            // FUSE ones) gives no stronger promise to ask for; refusing uploads would not help.
            Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) => {
                Ok(true)
            }
            synced => synced.map(|()| true),
        }
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.named {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A file being written by batches on the blocking pool, one batch in flight while the next is
/// gathered.
struct LocalUpload {
    key: Key,
    dest: PathBuf,
    /// The temporary file, while no batch is being written to it.
    file: Option<TmpFile>,
    /// The batch being written; gives the file back.
    writing: Option<tokio::task::JoinHandle<io::Result<TmpFile>>>,
    /// A second handle on the file, flushed to disk while batches are written through the first.
    flusher: Option<Arc<std::fs::File>>,
    /// The flush in flight, if any.
    flushing: Option<tokio::task::JoinHandle<io::Result<()>>>,
    /// Bytes handed to the writer since the last flush started.
    unflushed: usize,
    /// Chunks not written yet, and their bytes.
    pending: Vec<Bytes>,
    pending_bytes: usize,
    size: u64,
}

impl LocalUpload {
    /// The file, once the batch in flight (if any) is written.
    async fn idle_file(&mut self) -> Result<TmpFile, StorageError> {
        if let Some(writing) = self.writing.take() {
            self.file = Some(joined(&self.key, writing).await?);
        }
        Ok(self.file.take().expect("the file is here when no batch is in flight"))
    }

    /// Starts writing what is pending, and a flush of what was written before once enough is.
    async fn write_pending(&mut self) -> Result<(), StorageError> {
        let mut file = self.idle_file().await?;
        let batch = std::mem::take(&mut self.pending);
        self.unflushed += std::mem::take(&mut self.pending_bytes);
        if self.unflushed >= FLUSH_EVERY {
            // Waiting for the previous flush keeps at most two flushes' worth of dirty pages
            // per upload, and an upload faster than the disk slows to the disk's speed.
            self.flushed().await?;
            if let (None, Some(f)) = (&self.flusher, &file.file) {
                self.flusher = Some(Arc::new(f.try_clone().map_err(io_err(&self.key))?));
            }
            if let Some(flusher) = self.flusher.clone() {
                self.flushing = Some(tokio::task::spawn_blocking(move || flusher.sync_data()));
            }
            self.unflushed = 0;
        }
        self.writing = Some(tokio::task::spawn_blocking(move || {
            file.write_all(&batch)?;
            Ok(file)
        }));
        Ok(())
    }

    /// Waits for the flush in flight, if any: its failure is the upload's.
    async fn flushed(&mut self) -> Result<(), StorageError> {
        match self.flushing.take() {
            Some(flushing) => joined(&self.key, flushing).await,
            None => Ok(()),
        }
    }

    /// Writes what is pending and names the file `dest` ([`TmpFile::place`]).
    async fn place(&mut self, replace: bool) -> Result<bool, StorageError> {
        let file = self.idle_file().await?;
        self.flushed().await?;
        let (chunks, dest) = (std::mem::take(&mut self.pending), self.dest.clone());
        joined(&self.key, tokio::task::spawn_blocking(move || file.place(&chunks, &dest, replace))).await
    }
}

/// The result of a file operation on the blocking pool, its failure (or the task's) named by
/// `key`.
async fn joined<T>(key: &Key, task: tokio::task::JoinHandle<io::Result<T>>) -> Result<T, StorageError> {
    task.await.map_err(io::Error::other).and_then(|r| r).map_err(io_err(key))
}

#[async_trait]
impl Upload for LocalUpload {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.size += chunk.len() as u64;
        self.pending_bytes += chunk.len();
        self.pending.push(chunk);
        if self.pending_bytes >= WRITE_BATCH {
            self.write_pending().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64, StorageError> {
        self.place(true).await?;
        Ok(self.size)
    }

    async fn commit_new(mut self: Box<Self>) -> Result<Option<u64>, StorageError> {
        Ok(self.place(false).await?.then_some(self.size))
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        // The file is removed when dropped: after the write in flight, which may create it.
        self.flushing = None;
        if let Some(writing) = self.writing.take() {
            let _ = writing.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uploads_a_killed_process_left_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(TMP_DIR);
        std::fs::create_dir_all(&tmp).unwrap();
        let (old, fresh) = (tmp.join("0000000000000001"), tmp.join("0000000000000002"));
        std::fs::write(&old, b"half an upload").unwrap();
        std::fs::write(&fresh, b"an upload in flight").unwrap();
        let long_ago = std::time::SystemTime::now() - 2 * ABANDONED_AFTER;
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(long_ago).unwrap();
        LocalStorage::open(dir.path()).await.unwrap();
        assert!(!old.exists(), "an abandoned upload stayed");
        assert!(fresh.exists(), "an upload in flight was removed");
    }
}
