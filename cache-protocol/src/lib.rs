//! fleetcache's own upload protocol, between a builder (`builder::client`) and the cache-server
//! (`cache_server::native`): the messages both sides read and write, and the limits the server
//! holds them to. Nix itself never speaks it; it reads what the server publishes in Nix's
//! binary cache layout.
//!
//! - [`UPLOAD`]: the body is one line of JSON [`UploadMeta`] (at most [`MAX_META_BYTES`]), a
//!   newline, then the zstd-compressed NAR; the answer is an [`UploadResult`].
//! - [`MISSING`]: a [`MissingRequest`] of at most [`MAX_MISSING_PATHS`] paths in, a
//!   [`MissingResponse`] out.
//!
//! With the `http` feature, [`http`] is the HTTP client every part of fleetcache talks through.

use serde::{Deserialize, Serialize};

#[cfg(feature = "http")]
pub mod http;

/// The route of an upload.
pub const UPLOAD: &str = "/api/v1/upload";

/// The route of "which of these paths are missing?".
pub const MISSING: &str = "/api/v1/missing";

/// The route of a garbage collection (admin tokens only): a [`GcRequest`] in, a [`GcReport`]
/// out.
pub const GC: &str = "/api/v1/gc";

/// The route of the cache's public keys (`GET`, readers): a [`CacheKeys`].
pub const KEYS: &str = "/api/v1/keys";

/// The public halves of the keys that sign the cache's narinfos, in Nix's `name:base64` form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheKeys {
    /// Every signing key's public half.
    pub public_keys: Vec<String>,
}

/// Longest metadata line accepted.
pub const MAX_META_BYTES: usize = 4 * 1024 * 1024;

/// Most paths one [`MISSING`] request may ask about (a client asks in batches of this many).
pub const MAX_MISSING_PATHS: usize = 100_000;

/// What a builder says about the path it uploads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UploadMeta {
    /// Full store path.
    pub store_path: String,
    /// Full store paths it refers to.
    pub references: Vec<String>,
    /// Full path of its derivation, if known.
    #[serde(default)]
    pub deriver: Option<String>,
    /// Content address, if content-addressed.
    #[serde(default)]
    pub ca: Option<String>,
    /// NarHash as Nix knows it (any of Nix's hash formats).
    pub nar_hash: String,
    /// NarSize as Nix knows it.
    pub nar_size: u64,
}

/// The answer to an upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UploadResult {
    /// The signed narinfo now published.
    pub narinfo: String,
    /// Compressed bytes stored.
    pub file_size: u64,
}

/// `{"paths": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingRequest {
    /// Full store paths.
    pub paths: Vec<String>,
}

/// `{"missing": [...], "upstream": [...]}`: of the requested paths, in request order, those the
/// uploader must send and those the cache lacks but one of its upstream caches serves (signed by
/// that upstream's key; the cache accepts references to them). A path is in at most one list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingResponse {
    /// Full store paths to upload.
    pub missing: Vec<String>,
    /// Full store paths an upstream serves (absent from servers older than this field).
    #[serde(default)]
    pub upstream: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_line_reads_as_the_server_expects() {
        let line = r#"{"store_path":"/nix/store/0000000000000000000000000000000a-x","references":[],"nar_hash":"sha256:00","nar_size":8}"#;
        let meta: UploadMeta = serde_json::from_str(line).unwrap();
        assert_eq!((meta.deriver, meta.ca, meta.nar_size), (None, None, 8));
        let unknown = line.replace("\"nar_size\"", "\"size\":1,\"nar_size\"");
        assert!(
            serde_json::from_str::<UploadMeta>(&unknown).is_err(),
            "a field the server does not know is refused"
        );
    }
}

/// Collect garbage: keep what `roots` reach through narinfo references, delete the rest that is
/// older than the grace period.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Full store paths to keep, with everything they refer to.
    pub roots: Vec<String>,
    /// Only say what would go.
    #[serde(default)]
    pub dry_run: bool,
    /// Objects written less than this many seconds ago stay whatever they are (default: the
    /// server's, an hour).
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

/// How many objects of each kind, and their bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tally {
    /// `<hash>.narinfo`.
    pub narinfos: u64,
    /// `nar/…`.
    pub nars: u64,
    /// `<hash>.ls`.
    pub listings: u64,
    /// `log/…`.
    pub logs: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Tally {
    /// Objects of every kind.
    pub fn objects(&self) -> u64 {
        self.narinfos + self.nars + self.listings + self.logs
    }
}

/// What a collection did (or, on a dry run, would do).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GcReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Roots asked for.
    pub roots: u64,
    /// Roots this cache does not hold (nothing to keep for them).
    pub roots_absent: u64,
    /// Narinfos reached from the roots.
    pub reachable: u64,
    /// What stays.
    pub kept: Tally,
    /// What went (or would go).
    pub deleted: Tally,
    /// Of what stays, objects kept only because they are younger than the grace period.
    pub young: u64,
    /// Objects an upload used while the collection ran, so kept.
    pub protected: u64,
    /// Uploads that never ended (their server was stopped mid-upload), begun before the grace
    /// period, dropped (not counted in a dry run).
    #[serde(default)]
    pub abandoned_uploads: u64,
    /// The grace period used.
    pub grace_seconds: u64,
    /// Storage requests made: narinfos read, listings, delete batches.
    pub requests: u64,
    /// Wall time.
    pub seconds: f64,
    /// The first deleted keys (at most [`GC_SAMPLE`]), for people to see what went.
    pub sample: Vec<String>,
}

/// Most deleted keys a [`GcReport`] names.
pub const GC_SAMPLE: usize = 1000;
