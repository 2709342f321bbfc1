//! An in-memory index of the narinfos the cache holds, so a miss — most of a substituter's
//! questions to a fleet cache — is answered without a storage round trip.
//!
//! Loaded by a paged listing of the store after start (until then every question goes to
//! storage), told of every publication through this server, and listed again every
//! `index-refresh-seconds`, so replicas on one store see each other's uploads within that bound
//! (Nix itself remembers a miss for `narinfo-cache-negative-ttl`; the client module sets a
//! minute). Only its "no" is trusted: a path it holds is still read from storage (a collection
//! may have deleted it since), so a stale entry costs a round trip, never a wrong answer.
//!
//! A publication adds its hash before the narinfo is written, so no reader is told "no" for a
//! path already written; a listing that ran while a publication was in flight is completed with
//! the publications of the last [`RECENT`] before the new set replaces the old one.
//!
//! Memory: the listed hashes as a sorted array of 20 bytes each (19 MiB per million paths;
//! a lookup is a binary search), twice that while a refresh builds the new array beside the
//! old, plus a hash set of the publications since the last listing.

use std::collections::{HashSet, VecDeque};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use nix_formats::nixbase32;

use crate::storage::{KeyKind, Storage, StorageError};

/// Publications remembered to complete a listing that ran while they were in flight.
pub const RECENT: Duration = Duration::from_secs(600);

type Hash = [u8; 20];

fn decode(hash_part: &str) -> Option<Hash> {
    nixbase32::decode_exact::<20>(hash_part).ok()
}

#[derive(Default)]
struct Inner {
    /// What the last listing found, sorted; `None` until the first listing is complete.
    listed: Option<Vec<Hash>>,
    /// Publications since (or shortly before) the last listing that it does not hold.
    added: HashSet<Hash>,
    /// Publications, newest last.
    recent: VecDeque<(Instant, Hash)>,
    /// When the last listing ended, and the bytes of every object it found.
    loaded: Option<(Instant, u64)>,
}

/// What the index holds, and what its last listing found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexStatus {
    /// Narinfos held: the last listing's and the publications through this server since.
    pub paths: u64,
    /// Bytes of every object the last listing found (NARs, narinfos, listings, logs).
    pub bytes: u64,
    /// Seconds since the listing ended.
    pub age_seconds: f64,
}

/// The index. Answers nothing until loaded.
#[derive(Default)]
pub struct NarinfoIndex {
    inner: RwLock<Inner>,
}

impl NarinfoIndex {
    /// Whether the cache holds a narinfo for `hash_part`: `Some(false)` is sure (up to the
    /// refresh bound for other replicas' uploads), `Some(true)` means "ask storage", `None`
    /// that the index is not loaded yet.
    pub fn contains(&self, hash_part: &str) -> Option<bool> {
        let hash = decode(hash_part)?;
        let inner = self.inner.read().expect("not poisoned");
        let listed = inner.listed.as_ref()?;
        Some(listed.binary_search(&hash).is_ok() || inner.added.contains(&hash))
    }

    /// Records a publication (call before writing the narinfo).
    pub fn insert(&self, hash_part: &str) {
        let Some(hash) = decode(hash_part) else { return };
        let now = Instant::now();
        let mut inner = self.inner.write().expect("not poisoned");
        if inner.listed.as_ref().is_none_or(|l| l.binary_search(&hash).is_err()) {
            inner.added.insert(hash);
        }
        while inner.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > RECENT) {
            inner.recent.pop_front();
        }
        inner.recent.push_back((now, hash));
    }

    /// Lists the store and replaces the index with what it holds (plus recent publications).
    /// Returns the number of paths.
    pub async fn load(&self, storage: &dyn Storage) -> Result<usize, StorageError> {
        let started = Instant::now();
        let mut listed = Vec::new();
        let mut bytes = 0;
        let mut objects = storage.list();
        while let Some(obj) = objects.next().await {
            let obj = obj?;
            bytes += obj.size;
            if let KeyKind::Narinfo(hash_part) = obj.key.kind()
                && let Some(hash) = decode(hash_part)
            {
                listed.push(hash);
            }
        }
        listed.sort_unstable();
        listed.dedup();
        listed.shrink_to_fit();
        let mut inner = self.inner.write().expect("not poisoned");
        // Publications in flight when the listing began may be missing from it.
        let since = started.checked_sub(RECENT).unwrap_or(started);
        let added: HashSet<Hash> = inner
            .recent
            .iter()
            .filter(|(t, h)| *t >= since && listed.binary_search(h).is_err())
            .map(|(_, h)| *h)
            .collect();
        let n = listed.len() + added.len();
        inner.listed = Some(listed);
        inner.added = added;
        inner.loaded = Some((Instant::now(), bytes));
        Ok(n)
    }

    /// What the index holds now; `None` before the first load.
    pub fn status(&self) -> Option<IndexStatus> {
        let inner = self.inner.read().expect("not poisoned");
        let (at, bytes) = inner.loaded?;
        let paths = inner.listed.as_ref().map_or(0, Vec::len) + inner.added.len();
        Some(IndexStatus { paths: paths as u64, bytes, age_seconds: at.elapsed().as_secs_f64() })
    }

    /// Loads the index now and again every `every`, for as long as the server runs; a failed
    /// listing leaves the previous index (or none) and is retried at the next round.
    pub async fn keep_loaded(&self, storage: &dyn Storage, every: Duration) {
        loop {
            let started = Instant::now();
            match self.load(storage).await {
                Ok(n) => tracing::info!(
                    paths = n,
                    seconds = started.elapsed().as_secs_f64(),
                    "narinfo index loaded"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "listing the store for the narinfo index failed; retrying later")
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Key, LocalStorage, put_bytes};

    const A: &str = "0000000000000000000000000000000a";
    const B: &str = "0000000000000000000000000000000b";
    const C: &str = "0000000000000000000000000000000c";

    #[tokio::test]
    async fn misses_are_answered_once_loaded_and_publications_are_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).await.unwrap();
        put_bytes(&storage, &Key::narinfo(A).unwrap(), "x".into()).await.unwrap();
        let index = NarinfoIndex::default();
        assert_eq!(index.contains(A), None, "nothing is said before the first listing");
        index.insert(B); // published before the listing: kept through it
        assert_eq!(index.load(&storage).await.unwrap(), 2);
        assert_eq!(
            (index.contains(A), index.contains(B), index.contains(C)),
            (Some(true), Some(true), Some(false))
        );
        index.insert(C);
        assert_eq!(index.contains(C), Some(true));
        assert_eq!(index.contains("not a hash"), None);
        index.insert(A); // already listed: not counted twice
        assert_eq!(
            index.status().map(|s| (s.paths, s.bytes)),
            Some((3, 1)),
            "A, B and C; the listing saw 1 byte"
        );
    }
}
