//! Why a byte stream is not a NAR.

use std::io;

use thiserror::Error;

use super::{MAGIC, MAX_TOKEN_LEN};

/// Why a byte stream is not a valid NAR. Offsets count bytes from the start of the NAR.
#[derive(Debug, Error)]
pub enum NarError {
    /// The stream does not start with the NAR magic.
    #[error("not a NAR: the stream does not start with \"{MAGIC}\"")]
    BadMagic,
    /// A token other than the one the grammar allows here.
    #[error("invalid NAR at byte {offset}: expected {expected}, found {found:?}")]
    Unexpected {
        /// Where the token starts.
        offset: u64,
        /// What the grammar allows here.
        expected: &'static str,
        /// What was found (shortened).
        found: String,
    },
    /// A name, keyword or symlink target longer than [`MAX_TOKEN_LEN`].
    #[error("invalid NAR at byte {offset}: a {len}-byte token where at most {MAX_TOKEN_LEN} are allowed")]
    TokenTooLong {
        /// Where the token starts.
        offset: u64,
        /// Its declared length.
        len: u64,
    },
    /// Padding bytes that are not zero.
    #[error("invalid NAR at byte {offset}: non-zero padding")]
    NonZeroPadding {
        /// Where the padding starts.
        offset: u64,
    },
    /// An entry name that is empty, `.`, `..`, or contains `/` or NUL.
    #[error("invalid NAR at byte {offset}: invalid entry name {name:?}")]
    InvalidName {
        /// Where the name starts.
        offset: u64,
        /// The name.
        name: String,
    },
    /// Directory entries not in strictly increasing byte order.
    #[error("invalid NAR at byte {offset}: entry {name:?} after {prev:?} (entries must be sorted)")]
    NotSorted {
        /// Where the name starts.
        offset: u64,
        /// The previous entry.
        prev: String,
        /// This entry.
        name: String,
    },
    /// The same name twice in one directory.
    #[error("invalid NAR at byte {offset}: duplicate entry {name:?}")]
    DuplicateEntry {
        /// Where the name starts.
        offset: u64,
        /// The name.
        name: String,
    },
    /// A name, symlink target or path longer than Linux can create.
    #[error("invalid NAR at byte {offset}: a {len}-byte {what}, longer than the {max} bytes Linux allows")]
    TooLong {
        /// Where it starts.
        offset: u64,
        /// `entry name`, `symlink target` or `path`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An empty symlink target or one containing NUL.
    #[error("invalid NAR at byte {offset}: invalid symlink target {target:?}")]
    InvalidSymlinkTarget {
        /// Where the target starts.
        offset: u64,
        /// The target.
        target: String,
    },
    /// The stream ended inside the archive.
    #[error("truncated NAR: the stream ended at byte {offset} inside the archive")]
    Truncated {
        /// Bytes received.
        offset: u64,
    },
    /// Bytes after the end of the root node.
    #[error("invalid NAR: trailing data after the archive ends at byte {offset}")]
    TrailingData {
        /// Where the archive ended.
        offset: u64,
    },
    /// The visitor failed (for example while unpacking).
    #[error("{0}")]
    Visitor(#[source] io::Error),
    /// Reading the input failed.
    #[error("reading NAR: {0}")]
    Io(#[source] io::Error),
}
