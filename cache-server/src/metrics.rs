//! Counters exported in Prometheus text format on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    bytes_served: AtomicU64,
    bytes_ingested: AtomicU64,
    verification_failures: Mutex<BTreeMap<&'static str, u64>>,
    storage: Mutex<BTreeMap<&'static str, (u64, f64)>>,
    last_collection: Mutex<Option<cache_protocol::GcReport>>,
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, route: &'static str, method: &'static str, status: u16) {
        *self.requests.lock().expect("metrics lock").entry((route, method, status)).or_default() += 1;
    }

    /// Counts response body bytes.
    pub fn served(&self, n: u64) {
        self.bytes_served.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts accepted upload bytes.
    pub fn ingested(&self, n: u64) {
        self.bytes_ingested.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an upload rejected by verification, by reason.
    pub fn verification_failure(&self, reason: &'static str) {
        *self.verification_failures.lock().expect("metrics lock").entry(reason).or_default() += 1;
    }

    /// Records how long a storage operation took.
    pub fn storage_op(&self, op: &'static str, took: Duration) {
        let mut m = self.storage.lock().expect("metrics lock");
        let e = m.entry(op).or_default();
        e.0 += 1;
        e.1 += took.as_secs_f64();
    }

    /// Remembers a finished collection (a dry run changes nothing, so it is not one).
    pub fn collected(&self, report: &cache_protocol::GcReport) {
        if !report.dry_run {
            let mut r = report.clone();
            r.sample = Vec::new();
            *self.last_collection.lock().expect("metrics lock") = Some(r);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP fleetcache_http_requests_total HTTP requests by route, method and status.\n");
        s.push_str("# TYPE fleetcache_http_requests_total counter\n");
        for ((route, method, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                s,
                "fleetcache_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        s.push_str("# HELP fleetcache_bytes_served_total Response body bytes sent.\n");
        s.push_str("# TYPE fleetcache_bytes_served_total counter\n");
        let _ = writeln!(s, "fleetcache_bytes_served_total {}", self.bytes_served.load(Ordering::Relaxed));
        s.push_str("# HELP fleetcache_bytes_ingested_total Upload bytes accepted into storage.\n");
        s.push_str("# TYPE fleetcache_bytes_ingested_total counter\n");
        let _ =
            writeln!(s, "fleetcache_bytes_ingested_total {}", self.bytes_ingested.load(Ordering::Relaxed));
        s.push_str("# HELP fleetcache_upload_verification_failures_total Uploads rejected, by reason.\n");
        s.push_str("# TYPE fleetcache_upload_verification_failures_total counter\n");
        for (reason, n) in self.verification_failures.lock().expect("metrics lock").iter() {
            let _ = writeln!(s, "fleetcache_upload_verification_failures_total{{reason=\"{reason}\"}} {n}");
        }
        s.push_str("# HELP fleetcache_storage_operation_seconds Time spent in storage operations.\n");
        s.push_str("# TYPE fleetcache_storage_operation_seconds summary\n");
        for (op, (count, sum)) in self.storage.lock().expect("metrics lock").iter() {
            let _ = writeln!(s, "fleetcache_storage_operation_seconds_count{{op=\"{op}\"}} {count}");
            let _ = writeln!(s, "fleetcache_storage_operation_seconds_sum{{op=\"{op}\"}} {sum:.6}");
        }
        if let Some(gc) = self.last_collection.lock().expect("metrics lock").as_ref() {
            s.push_str("# HELP fleetcache_store_objects Objects the store held after the last collection.\n");
            s.push_str("# TYPE fleetcache_store_objects gauge\n");
            for (kind, n) in [
                ("narinfo", gc.kept.narinfos),
                ("nar", gc.kept.nars),
                ("listing", gc.kept.listings),
                ("log", gc.kept.logs),
            ] {
                let _ = writeln!(s, "fleetcache_store_objects{{kind=\"{kind}\"}} {n}");
            }
            s.push_str("# HELP fleetcache_store_bytes Bytes the store held after the last collection.\n");
            s.push_str("# TYPE fleetcache_store_bytes gauge\n");
            let _ = writeln!(s, "fleetcache_store_bytes {}", gc.kept.bytes);
            s.push_str("# HELP fleetcache_gc_freed_bytes Bytes the last collection deleted.\n");
            s.push_str("# TYPE fleetcache_gc_freed_bytes gauge\n");
            let _ = writeln!(s, "fleetcache_gc_freed_bytes {}", gc.deleted.bytes);
            s.push_str("# HELP fleetcache_gc_deleted_objects Objects the last collection deleted.\n");
            s.push_str("# TYPE fleetcache_gc_deleted_objects gauge\n");
            let _ = writeln!(s, "fleetcache_gc_deleted_objects {}", gc.deleted.objects());
            s.push_str("# HELP fleetcache_gc_duration_seconds How long the last collection took.\n");
            s.push_str("# TYPE fleetcache_gc_duration_seconds gauge\n");
            let _ = writeln!(s, "fleetcache_gc_duration_seconds {:.3}", gc.seconds);
        }
        s
    }
}

/// A [`Storage`] that records how long each operation takes in [`Metrics`].
pub struct TimedStorage {
    inner: Box<dyn Storage>,
    metrics: std::sync::Arc<Metrics>,
}

impl TimedStorage {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Storage>, metrics: std::sync::Arc<Metrics>) -> Self {
        TimedStorage { inner, metrics }
    }
}

use crate::storage::{ByteRange, Key, Listed, Object, Storage, StorageError, Upload};

#[async_trait::async_trait]
impl Storage for TimedStorage {
    async fn get(&self, key: &Key, range: Option<ByteRange>) -> Result<Option<Object>, StorageError> {
        let t = std::time::Instant::now();
        let r = self.inner.get(key, range).await;
        self.metrics.storage_op("get", t.elapsed());
        r
    }

    async fn head(&self, key: &Key) -> Result<Option<u64>, StorageError> {
        let t = std::time::Instant::now();
        let r = self.inner.head(key).await;
        self.metrics.storage_op("head", t.elapsed());
        r
    }

    async fn begin_put(&self, key: &Key) -> Result<Box<dyn Upload>, StorageError> {
        let t = std::time::Instant::now();
        let r = self.inner.begin_put(key).await;
        self.metrics.storage_op("begin_put", t.elapsed());
        r
    }

    async fn delete(&self, key: &Key) -> Result<(), StorageError> {
        let t = std::time::Instant::now();
        let r = self.inner.delete(key).await;
        self.metrics.storage_op("delete", t.elapsed());
        r
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<(), StorageError> {
        let t = std::time::Instant::now();
        let r = self.inner.delete_many(keys).await;
        self.metrics.storage_op("delete_many", t.elapsed());
        r
    }

    /// Not timed: a listing is a stream its reader paces, so its duration says nothing of the
    /// store.
    fn list(&self) -> futures_util::stream::BoxStream<'static, Result<Listed, StorageError>> {
        self.inner.list()
    }

    async fn drop_abandoned(&self, before: std::time::SystemTime) -> Result<u64, StorageError> {
        let t = std::time::Instant::now();
        let r = self.inner.drop_abandoned(before).await;
        self.metrics.storage_op("drop_abandoned", t.elapsed());
        r
    }

    /// Not timed: presigning is local computation, no request.
    async fn presigned_get(&self, key: &Key, valid_for: Duration) -> Result<Option<String>, StorageError> {
        self.inner.presigned_get(key, valid_for).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
