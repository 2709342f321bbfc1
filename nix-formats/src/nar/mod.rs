//! The NAR ("Nix ARchive") format: a canonical serialisation of a file system object.
//!
//! Every token is a string: a little-endian `u64` length, the bytes, and zero padding to a
//! multiple of 8. A node is `( type regular [executable ""] contents <data> )`,
//! `( type symlink target <t> )` or `( type directory (entry ( name <n> node <node> ))* )`,
//! and the archive is the string `nix-archive-1` followed by the root node. Directory entries
//! are sorted by the bytes of their names, so one tree has exactly one NAR.

mod parser;
mod unpack;
mod verifier;
mod writer;

pub use parser::{NarError, NarEvent, NarParser, NarVisitor, validate};
pub use unpack::{UnpackError, unpack};
pub use verifier::NarVerifier;
pub use writer::{DumpError, NarEncoder, dump_path};

/// The first token of every NAR.
pub const MAGIC: &str = "nix-archive-1";

/// Longest token other than file contents that the parser accepts (names, symlink targets).
/// Linux limits names to 255 bytes and symlink targets to 4095; this leaves room and bounds
/// memory whatever a client sends.
pub const MAX_TOKEN_LEN: u64 = 64 * 1024;

/// Padding needed after `len` bytes to reach a multiple of 8.
pub(crate) const fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

#[cfg(test)]
mod tests;
