//! Accepting uploads: nothing unverified is ever published.
//!
//! `nix copy --to http://…` PUTs each compressed NAR to `nar/<filehash>.nar.<ext>`, then its
//! narinfo. A NAR is stored only if its bytes hash to the name they are stored under, so a
//! stored NAR is never wrong, only possibly unreferenced. A narinfo is published only after
//! the NAR it points at was read back, decompressed, parsed as a canonical NAR and found to
//! have the claimed NarHash and NarSize, and after every reference has a narinfo here or in
//! an upstream cache ([`crate::upstream`]); it is then signed with every server key and
//! written last.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use nix_formats::hash::{Hash, HashingWriter};
use nix_formats::nar::{NarError, NarVerifier};
use nix_formats::narinfo::{Compression, NarInfoError};
use nix_formats::{NarInfo, SecretKey, StorePath, nixbase32};
use sha2::Digest as _;
use thiserror::Error;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::gc::Guard;
use crate::metrics::Metrics;
use crate::storage::{Key, KeyError, Storage, StorageError, put_bytes};
use crate::upstream::{UpstreamDown, Upstreams};

/// What publishing a narinfo needs: the cache, the keys that sign, the collection it must not
/// race and the upstream caches references may be in.
#[derive(Clone, Copy)]
pub struct Publisher<'a> {
    /// The cache.
    pub storage: &'a dyn Storage,
    /// Every key signs every narinfo.
    pub keys: &'a [SecretKey],
    /// Keeps a running collection from deleting what a publication relies on.
    pub gc: &'a Guard,
    /// Caches whose signed paths count as present.
    pub upstreams: &'a Upstreams,
    /// Told of every publication.
    pub index: &'a crate::index::NarinfoIndex,
}

/// Why an upload was refused. Every variant but `Storage` and `Upstream` is the client's fault.
#[derive(Debug, Error)]
pub enum IngestError {
    /// The narinfo does not parse.
    #[error("invalid narinfo: {0}")]
    NarInfo(#[from] NarInfoError),
    /// The narinfo was PUT under another path's name.
    #[error("narinfo for {store_path} uploaded as {uploaded_as}.narinfo")]
    WrongName {
        /// The store path inside.
        store_path: String,
        /// The name in the URL.
        uploaded_as: String,
    },
    /// The URL field is not a NAR file name of this cache.
    #[error("narinfo URL: {0}")]
    BadUrl(#[from] KeyError),
    /// Compression that this server cannot decompress to verify.
    #[error("compression {0:?} is not supported (use zstd, xz or none)")]
    UnsupportedCompression(String),
    /// The URL's extension and the Compression field disagree.
    #[error("narinfo says Compression {compression} but its URL {url} has another extension")]
    CompressionMismatch {
        /// The Compression field.
        compression: String,
        /// The URL field.
        url: String,
    },
    /// The narinfo points at a NAR that was not uploaded.
    #[error("the NAR {0} has not been uploaded")]
    NarMissing(String),
    /// The NAR does not decompress or is not a valid, canonical NAR.
    #[error("the NAR is invalid: {0}")]
    InvalidNar(String),
    /// A claimed hash or size is not what the bytes have.
    #[error("{field} mismatch: the narinfo claims {claimed}, the uploaded NAR has {actual}")]
    Mismatch {
        /// NarHash, NarSize, FileHash or FileSize.
        field: &'static str,
        /// The claimed value.
        claimed: String,
        /// The computed value.
        actual: String,
    },
    /// References without a narinfo in this cache or an upstream.
    #[error("references not in this cache or an upstream (upload them first): {}", .0.join(", "))]
    MissingReferences(Vec<String>),
    /// An upstream that might hold a reference could not be asked; nothing is taken on trust.
    #[error(transparent)]
    Upstream(#[from] UpstreamDown),
    /// The bytes PUT to `nar/<hash>…` do not hash to `<hash>`.
    #[error("the uploaded file hashes to {actual}, not to the {claimed} it is named after")]
    FileHashMismatch {
        /// The hash in the name.
        claimed: String,
        /// The hash of the body.
        actual: String,
    },
    /// A native upload's metadata line is missing, malformed or names what is not a store path.
    #[error("upload metadata {field}: {why}")]
    Metadata {
        /// The field (or `line`, `JSON`).
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The request body ended early or could not be read.
    #[error("upload interrupted: {0}")]
    Body(String),
    /// Storage failed; the client may retry.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl IngestError {
    /// A short label for the verification-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::NarInfo(_) | IngestError::WrongName { .. } | IngestError::BadUrl(_) => "bad_narinfo",
            IngestError::UnsupportedCompression(_) | IngestError::CompressionMismatch { .. } => "compression",
            IngestError::NarMissing(_) => "nar_missing",
            IngestError::InvalidNar(_) => "invalid_nar",
            IngestError::Mismatch { .. } => "hash_or_size_mismatch",
            IngestError::MissingReferences(_) => "missing_references",
            IngestError::FileHashMismatch { .. } => "file_hash_mismatch",
            IngestError::Metadata { .. } => "bad_metadata",
            IngestError::Body(_) => "interrupted",
            IngestError::Storage(_) => "storage",
            IngestError::Upstream(_) => "upstream_down",
        }
    }
}

/// What verifying a compressed NAR found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSummary {
    /// SHA-256 of the decompressed NAR.
    pub nar_hash: Hash,
    /// Size of the decompressed NAR.
    pub nar_size: u64,
    /// SHA-256 of the stored (compressed) file.
    pub file_hash: Hash,
    /// Size of the stored file.
    pub file_size: u64,
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    size: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Reads a decompressed NAR from `decoder` to its end and checks it (blocking); returns its
/// NarHash and NarSize. A decompression failure is an invalid NAR too. Decompression runs on
/// this thread, the check and the hash on a second one: each costs about a core-second per GiB.
pub fn verify_decompressed(decoder: impl Read) -> Result<(Hash, u64), IngestError> {
    NarVerifier::verify_reader_on_two_threads(decoder).map_err(|e| match e {
        NarError::Io(e) => IngestError::InvalidNar(format!("decompressing: {e}")),
        e => IngestError::InvalidNar(e.to_string()),
    })
}

/// Memory an xz stream may ask for to be decompressed: `xz -9` needs 65 MiB; a stream that
/// declares a larger dictionary is refused instead of taking the server's memory.
pub const XZ_MEMORY_LIMIT: u64 = 96 << 20;

/// Largest zstd window accepted (2^27 = 128 MiB, zstd's own default limit, what `--long`
/// uses): a frame asking for more is refused.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// A zstd decoder over `reader` that refuses windows over [`ZSTD_WINDOW_LOG_MAX`].
pub fn zstd_decoder<R: Read>(reader: R) -> Result<impl Read, IngestError> {
    zstd_decoder_buffered(io::BufReader::with_capacity(zstd::zstd_safe::DCtx::in_size(), reader))
}

/// [`zstd_decoder`] over a reader with its own buffer, which the decoder reads in place.
pub fn zstd_decoder_buffered<R: io::BufRead>(reader: R) -> Result<impl Read, IngestError> {
    let bad = |e: io::Error| IngestError::InvalidNar(e.to_string());
    let mut decoder = zstd::Decoder::with_buffer(reader).map_err(bad)?;
    decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(bad)?;
    Ok(decoder)
}

/// Decompresses and verifies a NAR file read from `reader` (blocking).
pub fn verify_nar_file(reader: impl Read, compression: Compression) -> Result<NarSummary, IngestError> {
    let mut file = HashingReader { inner: reader, hasher: sha2::Sha256::new(), size: 0 };
    let (nar_hash, nar_size) = match compression {
        Compression::None => verify_decompressed(&mut file)?,
        Compression::Zstd => verify_decompressed(zstd_decoder(&mut file)?)?,
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMORY_LIMIT, 0)
                .map_err(|e| IngestError::InvalidNar(format!("xz: {e}")))?;
            verify_decompressed(xz2::read::XzDecoder::new_stream(&mut file, stream))?
        }
        other => return Err(IngestError::UnsupportedCompression(other.name().to_owned())),
    };
    // Anything after the compressed stream ends is not part of the NAR: count it in the file.
    io::copy(&mut file, &mut io::sink()).map_err(|e| IngestError::Body(e.to_string()))?;
    Ok(NarSummary {
        nar_hash,
        nar_size,
        file_hash: Hash::sha256(file.hasher.finalize().into()),
        file_size: file.size,
    })
}

/// Reads a stored NAR file back and verifies it.
async fn verify_stored_nar(
    storage: &dyn Storage,
    key: &Key,
    compression: Compression,
) -> Result<NarSummary, IngestError> {
    let obj = storage.get(key, None).await?.ok_or_else(|| IngestError::NarMissing(key.to_string()))?;
    let reader = SyncIoBridge::new(StreamReader::new(obj.body));
    tokio::task::spawn_blocking(move || verify_nar_file(reader, compression))
        .await
        .map_err(|e| IngestError::Body(format!("verification task failed: {e}")))?
}

fn mismatch(field: &'static str, claimed: impl ToString, actual: impl ToString) -> IngestError {
    IngestError::Mismatch { field, claimed: claimed.to_string(), actual: actual.to_string() }
}

/// Verifies, signs and publishes a narinfo PUT as `<hash_part>.narinfo`. Returns the signed text.
pub async fn ingest_narinfo(
    publisher: Publisher<'_>,
    hash_part: &str,
    body: &[u8],
) -> Result<String, IngestError> {
    let mut info = NarInfo::parse_bytes(body)?;
    if info.store_path.hash_part() != hash_part {
        return Err(IngestError::WrongName {
            store_path: info.store_path.to_string(),
            uploaded_as: hash_part.to_owned(),
        });
    }
    let nar_key = Key::nar_url(&info.url)?;
    let compression = info
        .compression()
        .ok_or_else(|| IngestError::UnsupportedCompression(info.compression.clone().unwrap_or_default()))?;
    if Compression::from_file_name(&info.url) != Some(compression) {
        return Err(IngestError::CompressionMismatch {
            compression: compression.name().to_owned(),
            url: info.url.clone(),
        });
    }

    let found = verify_stored_nar(publisher.storage, &nar_key, compression).await?;
    if found.nar_hash != info.nar_hash {
        return Err(mismatch("NarHash", &info.nar_hash, &found.nar_hash));
    }
    if found.nar_size != info.nar_size {
        return Err(mismatch("NarSize", info.nar_size, found.nar_size));
    }
    match &info.file_hash {
        Some(h) if *h != found.file_hash => return Err(mismatch("FileHash", h, &found.file_hash)),
        _ => info.file_hash = Some(found.file_hash.clone()),
    }
    match info.file_size {
        Some(n) if n != found.file_size => return Err(mismatch("FileSize", n, found.file_size)),
        _ => info.file_size = Some(found.file_size),
    }

    publish(publisher, info).await
}

/// Refuses `references` of `path` that have no narinfo in this cache nor a signed one in an
/// upstream; when an upstream that might have one cannot be asked, says which.
pub(crate) async fn check_references(
    publisher: Publisher<'_>,
    path: &StorePath,
    references: &[StorePath],
) -> Result<(), IngestError> {
    let storage = publisher.storage;
    let checks = references.iter().filter(|r| *r != path).map(|r| async move {
        let key = Key::narinfo(r.hash_part()).expect("a store path's hash part is a valid key");
        storage.head(&key).await.map(|found| (r, found.is_some()))
    });
    let results = futures_util::future::try_join_all(checks).await?;
    let mut absent: Vec<StorePath> =
        results.into_iter().filter(|(_, ok)| !ok).map(|(r, _)| r.clone()).collect();
    absent.sort();
    absent.dedup();
    let mut missing = Vec::new();
    let mut down = None;
    for (r, found) in absent.iter().zip(publisher.upstreams.serving_each(absent.clone()).await) {
        match found {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(r.to_string()),
            Err(e) => down = down.or(Some(e)),
        }
    }
    if !missing.is_empty() {
        return Err(IngestError::MissingReferences(missing));
    }
    match down {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Checks that every reference has a narinfo, signs with every key and writes the narinfo:
/// the last step of every upload. What is written holds only checked fields
/// ([`NarInfo::into_published`]). Returns the signed text.
///
/// A running garbage collection deletes none of what the narinfo relies on (itself, its
/// references, its NAR) once this has checked them, and if it deleted one before, the check
/// sees it missing and the upload is refused ([`crate::gc`]).
pub(crate) async fn publish(publisher: Publisher<'_>, info: NarInfo) -> Result<String, IngestError> {
    let Publisher { storage, keys, gc, .. } = publisher;
    let mut info = info.into_published();
    let narinfo_key = Key::narinfo(info.store_path.hash_part())?;
    let nar_key = Key::nar_url(&info.url)?;
    let publishing = gc.publishing().await;
    let others = info.references.iter().filter(|r| **r != info.store_path);
    // Checked while publishing holds delete batches off: what is not doomed now stays.
    let doomed = gc.doomed(others.map(StorePath::hash_part));
    if !doomed.is_empty() {
        let paths = info.references.iter().filter(|r| doomed.contains(&r.hash_part()));
        return Err(IngestError::MissingReferences(paths.map(|p| p.to_string()).collect()));
    }
    let references =
        info.references.iter().map(|r| Key::narinfo(r.hash_part()).expect("a hash part is a key"));
    publishing.protect(references.chain([narinfo_key.clone(), nar_key.clone()]));
    check_references(publisher, &info.store_path, &info.references).await?;
    if storage.head(&nar_key).await?.is_none() {
        return Err(IngestError::NarMissing(nar_key.to_string()));
    }
    for key in keys {
        info.sign(key);
    }
    let text = info.to_string();
    // Before the write: no reader is told "not here" once it is written.
    publisher.index.insert(info.store_path.hash_part());
    put_bytes(storage, &narinfo_key, Bytes::from(text.clone())).await?;
    drop(publishing);
    Ok(text)
}

/// Stores a NAR file PUT as `nar/<name>`, committing only if its SHA-256 matches the name.
/// Returns its size.
pub async fn ingest_nar_file<S, E>(
    storage: &dyn Storage,
    metrics: &Arc<Metrics>,
    key: &Key,
    body: S,
) -> Result<u64, IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let claimed = key.nar_file_hash().expect("a nar/ key").to_owned();
    let mut upload = storage.begin_put(key).await?;
    let mut hasher = HashingWriter::new(io::sink());
    let mut body = std::pin::pin!(body.map_err(|e| IngestError::Body(e.to_string())));
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        io::Write::write_all(&mut hasher, &chunk).expect("sink");
        upload.write(chunk).await?;
    }
    let (hash, size, _) = hasher.finish();
    let actual = nixbase32::encode(hash.digest());
    if actual != claimed {
        upload.abort().await?;
        return Err(IngestError::FileHashMismatch { claimed, actual });
    }
    upload.commit().await?;
    metrics.ingested(size);
    Ok(size)
}
