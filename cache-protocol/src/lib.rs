//! fleetcache's own upload protocol, between a builder (`builder::client`) and the cache-server
//! (`cache_server::native`): the messages both sides read and write, and the limits the server
//! holds them to. Nix itself never speaks it; it reads what the server publishes in Nix's
//! binary cache layout.
//!
//! - [`UPLOAD`]: the body is one line of JSON [`UploadMeta`] (at most [`MAX_META_BYTES`]), a
//!   newline, then the zstd-compressed NAR; the answer is an [`UploadResult`].
//! - [`MISSING`]: a [`MissingRequest`] of at most [`MAX_MISSING_PATHS`] paths in, a
//!   [`MissingResponse`] out.

use serde::{Deserialize, Serialize};

/// The route of an upload.
pub const UPLOAD: &str = "/api/v1/upload";

/// The route of "which of these paths are missing?".
pub const MISSING: &str = "/api/v1/missing";

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

/// `{"missing": [...]}`: the requested paths without a narinfo, in request order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingResponse {
    /// Full store paths.
    pub missing: Vec<String>,
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
