//! Where the cache lives: one trait, two backends (a local directory and S3), one layout —
//! exactly Nix's binary cache layout, so the directory or bucket alone is a valid cache.
//!
//! Writes go through an [`Upload`] that becomes visible only on [`Upload::commit`]: a rename
//! for the directory, a completed (multipart) upload for S3. An upload that is aborted,
//! dropped or interrupted by a crash leaves nothing under its key.

mod key;
mod local;
mod s3;

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use thiserror::Error;

pub use key::{Key, KeyError, KeyKind};
pub use local::LocalStorage;
pub use s3::{MissingCredentials, S3Options, S3Storage};

/// A storage failure. Every variant is the server's problem (5xx), never the client's; its
/// [`Failure`] says which.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The local file system failed.
    #[error("storage I/O on {key}: {source}")]
    Io {
        /// The key being read or written.
        key: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The S3 service failed or could not be reached.
    #[error("S3 {op} {key}: {message}")]
    S3 {
        /// The S3 operation.
        op: &'static str,
        /// The key.
        key: String,
        /// The service's or the connection's error, flattened.
        message: String,
        /// What the service's answer means.
        failure: Failure,
    },
}

/// What a storage failure means for whoever asked, and so how the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Out of space, or over a quota: nothing is stored until space is freed.
    Full,
    /// The store refuses this server (permissions, credentials, no such bucket): its
    /// configuration must change.
    Refused,
    /// Anything else (unreachable, timed out, failing): worth trying again later.
    Unavailable,
}

impl StorageError {
    /// What this failure means.
    pub fn failure(&self) -> Failure {
        match self {
            StorageError::Io { source, .. } => match source.kind() {
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Failure::Full,
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Failure::Refused,
                _ => Failure::Unavailable,
            },
            StorageError::S3 { failure, .. } => *failure,
        }
    }
}

/// Objects up to this size (narinfos, listings, `nix-cache-info`) are read whole in one go rather
/// than streamed: by the local backend in one trip to the blocking pool, by the HTTP layer into
/// one response buffer.
pub const SMALL_OBJECT: u64 = 64 * 1024;

/// A byte range, both ends inclusive, as in HTTP `Range: bytes=start-end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// An object's bytes, streamed.
pub struct Object {
    /// Size of the whole object.
    pub size: u64,
    /// The body: the whole object, or the requested range.
    pub body: BoxStream<'static, io::Result<Bytes>>,
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Object").field("size", &self.size).finish_non_exhaustive()
    }
}

/// An object a listing found.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its key.
    pub key: Key,
    /// Its size.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// Most keys [`Storage::delete_many`] is given at once (S3's `DeleteObjects` limit).
pub const DELETE_BATCH: usize = 1000;

/// A storage backend holding a binary cache.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Reads an object, or the given range of it; `None` if it does not exist.
    async fn get(&self, key: &Key, range: Option<ByteRange>) -> Result<Option<Object>, StorageError>;

    /// The size of an object; `None` if it does not exist.
    async fn head(&self, key: &Key) -> Result<Option<u64>, StorageError>;

    /// Starts writing an object; nothing is visible under `key` until the upload is committed.
    async fn begin_put(&self, key: &Key) -> Result<Box<dyn Upload>, StorageError>;

    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, key: &Key) -> Result<(), StorageError>;

    /// Deletes up to [`DELETE_BATCH`] objects, in one request where the backend can; missing
    /// objects are not an error.
    async fn delete_many(&self, keys: &[Key]) -> Result<(), StorageError> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }

    /// Every object of the cache layout the store holds, a page at a time (memory does not
    /// grow with the store); names outside the layout are skipped. In no particular order.
    fn list(&self) -> BoxStream<'static, Result<Listed, StorageError>>;

    /// A URL anyone holding it may GET the object from for `valid_for`, without this server (an
    /// S3 presigned URL); `None` when the backend has no such URL. Asks nothing of the store: the
    /// object need not exist, and a missing one is the URL's own 404.
    async fn presigned_get(&self, key: &Key, valid_for: Duration) -> Result<Option<String>, StorageError> {
        let _ = (key, valid_for);
        Ok(None)
    }

    /// Drops what uploads that never ended left behind, begun (for a directory: last written)
    /// before `before`: files in the directory's upload area, S3's incomplete multipart uploads
    /// of layout keys (which S3 keeps, and bills, until aborted). Returns how many. An upload
    /// in flight is younger than any sane `before`; one dropped anyway fails and is sent again.
    async fn drop_abandoned(&self, before: SystemTime) -> Result<u64, StorageError>;

    /// A short description for logs (`file:///…`, `s3://bucket`).
    fn describe(&self) -> String;
}

/// An object being written.
#[async_trait]
pub trait Upload: Send {
    /// Appends bytes.
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError>;

    /// Makes the object visible, replacing any previous one; returns its size.
    async fn commit(self: Box<Self>) -> Result<u64, StorageError>;

    /// Makes the object visible only if none exists under its key yet; returns its size, or
    /// `None` when an object was there (it is kept, and what was written is discarded). For
    /// content-addressed names that must never change once a narinfo points at them.
    async fn commit_new(self: Box<Self>) -> Result<Option<u64>, StorageError>;

    /// Discards what was written. Dropping an upload without committing does the same.
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// Writes a whole object from memory.
pub async fn put_bytes(storage: &dyn Storage, key: &Key, bytes: Bytes) -> Result<(), StorageError> {
    let mut up = storage.begin_put(key).await?;
    up.write(bytes).await?;
    up.commit().await?;
    Ok(())
}

/// Reads a whole object into memory; for small objects (narinfos) only.
pub async fn get_bytes(storage: &dyn Storage, key: &Key) -> Result<Option<Bytes>, StorageError> {
    use futures_util::TryStreamExt as _;
    let Some(obj) = storage.get(key, None).await? else {
        return Ok(None);
    };
    let chunks: Vec<Bytes> =
        obj.body.try_collect().await.map_err(|source| StorageError::Io { key: key.to_string(), source })?;
    Ok(Some(chunks.concat().into()))
}

#[cfg(test)]
mod failure_tests {
    use std::io::Write as _;

    use super::*;

    fn io(source: io::Error) -> Failure {
        StorageError::Io { key: "nar/x.nar.zst".into(), source }.failure()
    }

    #[test]
    fn the_operating_system_says_when_the_disk_is_full() {
        // A real ENOSPC: /dev/full refuses every write with it.
        let full =
            std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap().write_all(b"x").unwrap_err();
        assert_eq!(io(full), Failure::Full);
        assert_eq!(io(io::Error::from_raw_os_error(122)), Failure::Full, "EDQUOT: over a disk quota");
        assert_eq!(io(io::Error::from_raw_os_error(13)), Failure::Refused, "EACCES");
        assert_eq!(io(io::Error::from_raw_os_error(30)), Failure::Refused, "EROFS");
        assert_eq!(io(io::Error::from_raw_os_error(5)), Failure::Unavailable, "EIO");
    }
}
