//! The server's side of fleetcache's own upload protocol ([`cache_protocol`]), for builders: one
//! request per store path, and one request for "which of these paths are missing?".
//!
//! `POST /api/v1/upload`: the body is one line of JSON [`UploadMeta`], a newline, then the
//! zstd-compressed NAR. The server stores the compressed bytes as they arrive (multipart on
//! S3, so a 10 GiB NAR works) while a second thread decompresses them and checks the NAR and
//! its hash; the object is committed only if NarHash and NarSize match the claim, and the
//! narinfo is written after that, signed. Nothing is visible if anything fails.
//!
//! `POST /api/v1/missing`: `{"paths": [...]}` in, `{"missing": [...], "upstream": [...]}` out:
//! what the uploader must send, and what an upstream cache serves instead.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Buf as _, Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use nix_formats::{ContentAddress, Hash, NarInfo, StorePath};
use tokio::sync::Semaphore;

use crate::ingest::{IngestError, Publisher};
use crate::metrics::Metrics;
use crate::storage::Key;

pub use cache_protocol::{MAX_META_BYTES, MissingRequest, MissingResponse, UploadMeta, UploadResult};

fn bad(field: &'static str, e: impl std::fmt::Display) -> IngestError {
    IngestError::Metadata { field, why: e.to_string() }
}

/// Answers a batch "which are missing?" with bounded concurrency against storage.
///
/// While a collection runs, a path it is about to delete counts as missing: the uploader
/// publishes it again rather than rely on it ([`crate::gc`]). A path this cache lacks and an
/// upstream serves is not missing but named in `upstream`; one whose upstream cannot be asked
/// is missing (uploading it here loses nothing).
pub async fn missing(publisher: Publisher<'_>, req: MissingRequest) -> Result<MissingResponse, IngestError> {
    let Publisher { storage, gc, upstreams, .. } = publisher;
    let parsed = req
        .paths
        .iter()
        .map(|p| StorePath::from_absolute(p).map_err(|e| bad("paths", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let count = parsed.len();
    let parsed_ref = &parsed;
    let found: Vec<(usize, bool)> = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let key = Key::narinfo(parsed_ref[i].hash_part()).expect("valid hash part");
            storage.head(&key).await.map(|h| (i, h.is_some()))
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut present = vec![false; count];
    for (i, ok) in found {
        present[i] = ok;
    }
    let held = parsed.iter().zip(&present).filter(|(_, ok)| **ok).map(|(p, _)| p.hash_part());
    let doomed: std::collections::HashSet<&str> = gc.doomed(held).into_iter().collect();
    for (p, ok) in parsed.iter().zip(present.iter_mut()) {
        *ok &= !doomed.contains(p.hash_part());
    }
    let absent: Vec<usize> =
        (0..count).filter(|&i| !present[i] && !doomed.contains(parsed[i].hash_part())).collect();
    let mut upstream = vec![false; count];
    let asked = upstreams.serving_each(absent.iter().map(|&i| parsed[i].clone()).collect()).await;
    for (&i, found) in absent.iter().zip(asked) {
        match found {
            Ok(found) => upstream[i] = found.is_some(),
            Err(e) => tracing::warn!(error = %e, path = %parsed[i], "counted as missing"),
        }
    }
    let (mut missing, mut served) = (Vec::new(), Vec::new());
    for ((path, here), upstream) in req.paths.into_iter().zip(present).zip(upstream) {
        match (here, upstream) {
            (true, _) => {}
            (false, true) => served.push(path),
            (false, false) => missing.push(path),
        }
    }
    Ok(MissingResponse { missing, upstream: served })
}

/// The compressed bytes as the decompressing verifier thread reads them from the async side.
/// The decoder reads the chunks in place ([`io::BufRead`]), without a copy.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl io::BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => break,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        self.current.advance(amt);
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = io::BufRead::fill_buf(self)?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        io::BufRead::consume(self, n);
        Ok(n)
    }
}

/// Decompresses on this thread and checks the NAR on a second one (each is about a core-second
/// per GiB); reads the body to its end, so whatever follows the zstd stream is received too.
fn verify_zstd_stream(mut reader: ChannelReader) -> Result<(Hash, u64), IngestError> {
    let decoder = crate::ingest::zstd_decoder_buffered(&mut reader)?;
    let verified = crate::ingest::verify_decompressed(decoder)?;
    io::copy(&mut reader, &mut io::sink()).map_err(|e| IngestError::Body(e.to_string()))?;
    Ok(verified)
}

/// How many uploads are at each stage at once; more wait for a slot.
pub struct UploadSlots {
    /// Reading and checking a NAR, which takes a core.
    pub verifying: Semaphore,
    /// Storing and publishing what was checked, which waits on storage, holding at most the
    /// tail of its NAR not written yet (up to a part, 8 MiB, on S3; 4 MiB in a directory).
    /// Separate from `verifying`: on a journalled file system the uploads waiting for a sync
    /// together share one commit. A push of 1001 small paths, 16 at a time, to ext4 on 2 cores:
    /// 1.8 s and 2380 journal commits when verifying slots were held to the end (so at most 4
    /// uploads waited on the disk), 1.2 s and 1270 commits with slots of their own.
    pub storing: Semaphore,
}

impl Default for UploadSlots {
    /// Two uploads verified per core, sixteen stored per core.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        UploadSlots { verifying: Semaphore::new(2 * cores), storing: Semaphore::new(16 * cores) }
    }
}

/// Handles `POST /api/v1/upload`, in a verifying slot while the body is read and checked, then
/// in a storing slot ([`UploadSlots`]). A verified upload keeps its verifying slot until it
/// has a storing one, so uploads waiting on storage stay bounded, and so does their memory.
pub async fn upload<S, E>(
    publisher: Publisher<'_>,
    metrics: &Arc<Metrics>,
    slots: &UploadSlots,
    body: S,
) -> Result<UploadResult, IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let verifying = slots.verifying.acquire().await.expect("never closed");
    let mut body = std::pin::pin!(body);
    // The metadata line.
    let mut head = BytesMut::new();
    let newline = loop {
        if let Some(i) = head.iter().position(|&b| b == b'\n') {
            break i;
        }
        if head.len() > MAX_META_BYTES {
            return Err(bad("line", format!("longer than {MAX_META_BYTES} bytes")));
        }
        match body.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(IngestError::Body(e.to_string())),
            None => {
                return Err(bad("line", "missing (the body must start with a JSON line)"));
            }
        }
    };
    let meta: UploadMeta = serde_json::from_slice(&head[..newline]).map_err(|e| bad("JSON", e))?;
    let rest = head.split_off(newline + 1).freeze();

    let store_path = StorePath::from_absolute(&meta.store_path).map_err(|e| bad("store_path", e))?;
    let references = meta
        .references
        .iter()
        .map(|r| StorePath::from_absolute(r).map_err(|e| bad("references", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let deriver =
        meta.deriver.as_deref().map(StorePath::from_absolute).transpose().map_err(|e| bad("deriver", e))?;
    let nar_hash = Hash::parse_sha256(&meta.nar_hash).map_err(|e| bad("nar_hash", e))?;
    if meta.nar_size == 0 {
        return Err(bad("nar_size", "must not be 0"));
    }
    let ca = meta.ca.as_deref().map(ContentAddress::parse).transpose().map_err(|e| bad("ca", e))?;
    // A path this cache could not publish is refused before its bytes are read.
    crate::ingest::check_references(publisher, &store_path, &references).await?;
    let storage = publisher.storage;

    // Named by the NAR hash: known before the bytes arrive, and checked before commit. A NAR
    // stored under the name already is never replaced (narinfos point at it, with its size):
    // this upload is then only verified, not stored again.
    let file_name = format!("{}.nar.zst", nar_hash.to_nix32());
    let key = Key::nar(&file_name).expect("a nix32 sha256 is a valid NAR file name");
    let existing = storage.head(&key).await?;
    let mut upload = match existing {
        Some(_) => None,
        None => Some(storage.begin_put(&key).await?),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let verifier =
        tokio::task::spawn_blocking(move || verify_zstd_stream(ChannelReader { rx, current: Bytes::new() }));
    let mut next = if rest.is_empty() { None } else { Some(Ok(rest)) };
    let streamed: Result<(), IngestError> = async {
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match body.next().await {
                    Some(Ok(c)) => Ok(c),
                    Some(Err(e)) => Err(IngestError::Body(e.to_string())),
                    None => break,
                },
            }?;
            // A closed channel means the verifier already failed: stop reading, its error is
            // the answer.
            if tx.send(chunk.clone()).await.is_err() {
                break;
            }
            if let Some(upload) = upload.as_mut() {
                upload.write(chunk).await?;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let verified = verifier.await.map_err(|e| IngestError::Body(format!("verifier failed: {e}")))?;
    let (found_hash, found_size) = match (streamed, verified) {
        (Err(e), _) | (Ok(()), Err(e)) => {
            if let Some(upload) = upload {
                let _ = upload.abort().await;
            }
            return Err(e);
        }
        (Ok(()), Ok(v)) => v,
    };
    let mismatch = if found_hash != nar_hash {
        Some(("NarHash", nar_hash.to_string(), found_hash.to_string()))
    } else if found_size != meta.nar_size {
        Some(("NarSize", meta.nar_size.to_string(), found_size.to_string()))
    } else {
        None
    };
    if let Some((field, claimed, actual)) = mismatch {
        if let Some(upload) = upload {
            let _ = upload.abort().await;
        }
        return Err(IngestError::Mismatch { field, claimed, actual });
    }
    // Checked: stored in a storing slot, taken before the verifying one is given back.
    let _storing = slots.storing.acquire().await.expect("never closed");
    drop(verifying);
    let committed = match upload {
        Some(upload) => upload.commit_new().await?,
        None => None,
    };
    // The narinfo has no FileHash: the compressed bytes were checked by decompressing them to
    // the NarHash, which is what Nix checks when it substitutes, and a second SHA-256 over the
    // compressed stream would cost the server ~0.7 core-seconds per GiB (a quarter of an
    // upload's server CPU on incompressible content, measured with scripts/bench-push's entropy
    // fixture) for a field Nix does not verify. FileSize is the stored object's.
    let file_size = match committed {
        Some(size) => {
            metrics.ingested(size);
            size
        }
        None => match storage.head(&key).await? {
            Some(size) => size,
            None => return Err(IngestError::NarMissing(key.to_string())),
        },
    };
    let info = NarInfo {
        store_path,
        url: format!("nar/{file_name}"),
        compression: Some("zstd".to_owned()),
        file_hash: None,
        file_size: Some(file_size),
        nar_hash,
        nar_size: found_size,
        references,
        deriver,
        system: None,
        signatures: Vec::new(),
        ca,
        unknown: Vec::new(),
    };
    let narinfo = crate::ingest::publish(publisher, info).await?;
    Ok(UploadResult { narinfo, file_size })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use tokio::sync::Notify;

    use super::*;
    use crate::storage::{ByteRange, Listed, LocalStorage, Object, Storage, StorageError, Upload};

    /// Commits that reached the gate, and a signal each time one does.
    type Held = Arc<(AtomicUsize, Notify)>;

    /// A directory store whose NAR commits wait for a permit of `gate`: an upload stays in the
    /// storing stage until the test lets it go.
    struct Gated {
        inner: LocalStorage,
        gate: Arc<Semaphore>,
        held: Held,
    }

    struct GatedUpload {
        inner: Box<dyn Upload>,
        gate: Arc<Semaphore>,
        held: Held,
    }

    #[async_trait]
    impl Storage for Gated {
        async fn get(&self, key: &Key, range: Option<ByteRange>) -> Result<Option<Object>, StorageError> {
            self.inner.get(key, range).await
        }
        async fn head(&self, key: &Key) -> Result<Option<u64>, StorageError> {
            self.inner.head(key).await
        }
        async fn begin_put(&self, key: &Key) -> Result<Box<dyn Upload>, StorageError> {
            let inner = self.inner.begin_put(key).await?;
            Ok(Box::new(GatedUpload { inner, gate: self.gate.clone(), held: self.held.clone() }))
        }
        async fn delete(&self, key: &Key) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        fn list(&self) -> futures_util::stream::BoxStream<'static, Result<Listed, StorageError>> {
            self.inner.list()
        }
        async fn drop_abandoned(&self, before: std::time::SystemTime) -> Result<u64, StorageError> {
            self.inner.drop_abandoned(before).await
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    #[async_trait]
    impl Upload for GatedUpload {
        async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
            self.inner.write(chunk).await
        }
        async fn commit(self: Box<Self>) -> Result<u64, StorageError> {
            self.inner.commit().await
        }
        async fn commit_new(self: Box<Self>) -> Result<Option<u64>, StorageError> {
            self.held.0.fetch_add(1, Ordering::SeqCst);
            self.held.1.notify_one();
            self.gate.acquire().await.expect("never closed").forget();
            self.inner.commit_new().await
        }
        async fn abort(self: Box<Self>) -> Result<(), StorageError> {
            self.inner.abort().await
        }
    }

    /// What a publication needs, around a gated store.
    struct Cache {
        _dir: tempfile::TempDir,
        storage: Gated,
        keys: [nix_formats::SecretKey; 1],
        gc: crate::gc::Guard,
        upstreams: crate::upstream::Upstreams,
        index: crate::index::NarinfoIndex,
        metrics: Arc<Metrics>,
    }

    impl Cache {
        async fn new() -> (Self, Arc<Semaphore>, Held) {
            let dir = tempfile::tempdir().unwrap();
            let (gate, held) = (Arc::new(Semaphore::new(0)), Held::default());
            let inner = LocalStorage::open(dir.path()).await.unwrap();
            let storage = Gated { inner, gate: gate.clone(), held: held.clone() };
            let cache = Cache {
                _dir: dir,
                storage,
                keys: [nix_formats::SecretKey::generate("test-1").unwrap()],
                gc: crate::gc::Guard::default(),
                upstreams: crate::upstream::Upstreams::none(),
                index: crate::index::NarinfoIndex::default(),
                metrics: Arc::new(Metrics::default()),
            };
            (cache, gate, held)
        }

        fn publisher(&self) -> Publisher<'_> {
            Publisher {
                storage: &self.storage,
                keys: &self.keys,
                gc: &self.gc,
                upstreams: &self.upstreams,
                index: &self.index,
            }
        }
    }

    /// A native upload's body for a store path holding one file of `contents`; `ended` is
    /// notified once the body has been read to its end.
    fn upload_body(
        name: &str,
        contents: &[u8],
        ended: Arc<Notify>,
    ) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), contents).unwrap();
        let nar = nix_formats::nar::dump_path(&dir.path().join("f"), Vec::new()).unwrap();
        let meta = UploadMeta {
            store_path: format!("/nix/store/{}{}-{name}", "0".repeat(31), &name[..1]),
            references: Vec::new(),
            deriver: None,
            ca: None,
            nar_hash: Hash::sha256_of(&nar).to_string(),
            nar_size: nar.len() as u64,
        };
        let mut body = serde_json::to_vec(&meta).unwrap();
        body.push(b'\n');
        body.extend(zstd::encode_all(&nar[..], 1).unwrap());
        let end = futures_util::stream::poll_fn(move |_| {
            ended.notify_one();
            std::task::Poll::Ready(None)
        });
        futures_util::stream::iter([Ok(Bytes::from(body))]).chain(end)
    }

    /// Waits until `n` commits have reached the gate; panics if `uploads` end first.
    async fn reach_gate(held: &Held, n: usize, uploads: &mut (impl std::future::Future + Unpin)) {
        let reached = tokio::time::timeout(Duration::from_secs(20), async {
            while held.0.load(Ordering::SeqCst) < n {
                tokio::select! {
                    _ = &mut *uploads => panic!("an upload finished at a closed gate"),
                    () = held.1.notified() => {}
                }
            }
        });
        assert!(reached.await.is_ok(), "{n} uploads did not reach the storing stage");
    }

    #[tokio::test]
    async fn an_upload_being_stored_leaves_its_verifying_slot_to_the_next() {
        let (cache, gate, held) = Cache::new().await;
        let slots = UploadSlots { verifying: Semaphore::new(1), storing: Semaphore::new(2) };
        let bodies = [("a", &b"first"[..]), ("b", b"second")].map(|(n, c)| upload_body(n, c, Arc::default()));
        let uploads = bodies.map(|body| upload(cache.publisher(), &cache.metrics, &slots, body));
        let mut both = std::pin::pin!(futures_util::future::join_all(uploads));
        // Both reach the storing stage while the first waits there: it holds no verifying slot.
        reach_gate(&held, 2, &mut both).await;
        gate.add_permits(2);
        for result in both.await {
            let result = result.unwrap();
            assert!(result.narinfo.contains("Sig: test-1:"), "{}", result.narinfo);
        }
        assert_eq!(slots.verifying.available_permits(), 1);
        assert_eq!(slots.storing.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_verified_upload_waits_for_a_storing_slot_in_its_verifying_one() {
        let (cache, gate, held) = Cache::new().await;
        let slots = UploadSlots { verifying: Semaphore::new(1), storing: Semaphore::new(1) };
        let second_read = Arc::new(Notify::new());
        let first =
            upload(cache.publisher(), &cache.metrics, &slots, upload_body("a", b"first", Arc::default()));
        let second =
            upload(cache.publisher(), &cache.metrics, &slots, upload_body("b", b"2", second_read.clone()));
        let mut both = std::pin::pin!(futures_util::future::join(first, second));
        reach_gate(&held, 1, &mut both).await;
        // The second is read and checked while the first is stored ...
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::select! {
                _ = &mut both => panic!("an upload finished at a closed gate"),
                () = second_read.notified() => {}
            }
        });
        assert!(read.await.is_ok(), "the second upload was not read while the first was stored");
        // ... and then waits, its verifying slot held, until the first is done. (A settling
        // time: were it not waiting, it would reach the gate within it.)
        tokio::select! {
            _ = &mut both => panic!("an upload finished at a closed gate"),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        assert_eq!(held.0.load(Ordering::SeqCst), 1, "two uploads were stored with one storing slot");
        assert_eq!(slots.verifying.available_permits(), 0, "the waiting upload gave its verifying slot up");
        gate.add_permits(1);
        reach_gate(&held, 2, &mut both).await;
        gate.add_permits(1);
        let (first, second) = both.await;
        first.unwrap();
        second.unwrap();
        assert_eq!((slots.verifying.available_permits(), slots.storing.available_permits()), (1, 1));
    }
}
