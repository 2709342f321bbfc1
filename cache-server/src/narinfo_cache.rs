//! A short-lived in-memory cache of narinfos that exist.
//!
//! Narinfo lookups are most of a substituter's traffic, and a published narinfo does not
//! change except to gain signatures during a key rotation, so holding hits for a few seconds
//! saves a storage round trip (an S3 request) per lookup. Misses are never cached: a path
//! published by another replica must be seen at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The cache. A TTL of zero disables it.
pub struct NarinfoCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, (Instant, Bytes)>>,
}

impl NarinfoCache {
    /// A cache holding at most `capacity` narinfos for `ttl` each.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        NarinfoCache { ttl, capacity, entries: Mutex::new(HashMap::new()) }
    }

    /// The narinfo for `hash_part`, if cached and fresh.
    pub fn get(&self, hash_part: &str) -> Option<Bytes> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().expect("narinfo cache lock");
        entries.get(hash_part).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, b)| b.clone())
    }

    /// Remembers a narinfo that exists.
    pub fn insert(&self, hash_part: &str, narinfo: Bytes) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("narinfo cache lock");
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(hash_part.to_owned(), (Instant::now(), narinfo));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_expire_and_capacity_is_bounded() {
        let c = NarinfoCache::new(Duration::from_secs(60), 2);
        c.insert("a", Bytes::from_static(b"1"));
        c.insert("b", Bytes::from_static(b"2"));
        assert_eq!(c.get("a").unwrap(), &b"1"[..]);
        c.insert("c", Bytes::from_static(b"3"));
        assert!(c.entries.lock().unwrap().len() <= 2);
        assert_eq!(c.get("c").unwrap(), &b"3"[..]);

        let off = NarinfoCache::new(Duration::ZERO, 10);
        off.insert("a", Bytes::from_static(b"1"));
        assert!(off.get("a").is_none());

        let short = NarinfoCache::new(Duration::from_millis(1), 10);
        short.insert("a", Bytes::from_static(b"1"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get("a").is_none());
    }
}
