//! A short-lived in-memory cache of narinfos that exist.
//!
//! Narinfo lookups are most of a substituter's traffic, and a published narinfo does not
//! change except to gain signatures during a key rotation, so holding hits for a few seconds
//! saves a storage round trip (an S3 request) per lookup. Misses are never cached: a path
//! published by another replica must be seen at once.
//!
//! Its memory is bounded by bytes, not by count: entries leave when they expire (the oldest
//! first, as every entry lives for the same time) or when the budget is spent, and a narinfo
//! larger than [`MAX_ENTRY_BYTES`] (real ones are a few hundred bytes) is never held.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Largest narinfo held.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// Bytes all held narinfos may take by default (keys and bookkeeping included).
pub const DEFAULT_BUDGET: usize = 64 << 20;

/// What each entry costs beside its bytes: its key twice, the map and queue slots.
const OVERHEAD: usize = 128;

struct Entries {
    by_hash: HashMap<String, (Instant, Bytes)>,
    /// Insertion order (so expiry order), with the time each was inserted: a key here whose
    /// map entry has another time was replaced since and is skipped.
    order: VecDeque<(Instant, String)>,
    bytes: usize,
}

/// The cache. A TTL of zero disables it.
pub struct NarinfoCache {
    ttl: Duration,
    budget: usize,
    entries: Mutex<Entries>,
}

impl NarinfoCache {
    /// A cache holding narinfos for `ttl` each, in at most `budget` bytes.
    pub fn new(ttl: Duration, budget: usize) -> Self {
        let entries = Entries { by_hash: HashMap::new(), order: VecDeque::new(), bytes: 0 };
        NarinfoCache { ttl, budget, entries: Mutex::new(entries) }
    }

    /// The narinfo for `hash_part`, if cached and fresh.
    pub fn get(&self, hash_part: &str) -> Option<Bytes> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().expect("narinfo cache lock");
        entries.by_hash.get(hash_part).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, b)| b.clone())
    }

    /// Remembers a narinfo that exists.
    pub fn insert(&self, hash_part: &str, narinfo: Bytes) {
        if self.ttl.is_zero() || narinfo.len() > MAX_ENTRY_BYTES {
            return;
        }
        let cost = narinfo.len() + hash_part.len() * 2 + OVERHEAD;
        let mut e = self.entries.lock().expect("narinfo cache lock");
        let now = Instant::now();
        if let Some((_, old)) = e.by_hash.insert(hash_part.to_owned(), (now, narinfo)) {
            e.bytes -= old.len() + hash_part.len() * 2 + OVERHEAD;
        }
        e.order.push_back((now, hash_part.to_owned()));
        e.bytes += cost;
        // The oldest go first: expired ones, then as many as the budget needs.
        while let Some((at, key)) = e.order.front().cloned() {
            if at.elapsed() < self.ttl && e.bytes <= self.budget {
                break;
            }
            e.order.pop_front();
            if e.by_hash.get(&key).is_some_and(|(t, _)| *t == at) {
                let (_, gone) = e.by_hash.remove(&key).expect("present");
                e.bytes -= gone.len() + key.len() * 2 + OVERHEAD;
            }
        }
    }

    /// Forgets everything (after a collection deleted narinfos: none may be served from here).
    pub fn clear(&self) {
        let mut e = self.entries.lock().expect("narinfo cache lock");
        e.by_hash.clear();
        e.order.clear();
        e.bytes = 0;
    }

    /// Bytes held now (for `/metrics` and tests).
    pub fn bytes(&self) -> usize {
        self.entries.lock().expect("narinfo cache lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_expire_and_bytes_are_bounded() {
        let entry = |n: usize| Bytes::from(vec![b'x'; n]);
        let c = NarinfoCache::new(Duration::from_secs(60), 3 * (1000 + 2 + OVERHEAD));
        c.insert("a", entry(1000));
        c.insert("b", entry(1000));
        c.insert("c", entry(1000));
        assert!(c.get("a").is_some());
        // A fourth does not fit: the oldest leaves.
        c.insert("d", entry(1000));
        assert!(c.get("a").is_none() && c.get("d").is_some());
        assert!(c.bytes() <= 3 * (1000 + 2 + OVERHEAD));
        // Replacing an entry counts it once.
        c.insert("d", entry(10));
        assert_eq!(c.bytes(), 2 * (1000 + 2 + OVERHEAD) + 10 + 2 + OVERHEAD);
        // Too large to hold at all.
        c.insert("e", entry(MAX_ENTRY_BYTES + 1));
        assert!(c.get("e").is_none());

        let off = NarinfoCache::new(Duration::ZERO, 1 << 20);
        off.insert("a", entry(1));
        assert!(off.get("a").is_none());

        // Expired entries are gone, and their bytes with them, once anything is inserted.
        let short = NarinfoCache::new(Duration::from_millis(1), 1 << 20);
        for i in 0..100 {
            short.insert(&format!("k{i}"), entry(1000));
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get("k1").is_none());
        short.insert("fresh", entry(1));
        assert_eq!(short.bytes(), 1 + 10 + OVERHEAD);
    }
}
