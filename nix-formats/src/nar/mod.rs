//! The NAR ("Nix ARchive") format: a canonical serialisation of a file system object.
//!
//! Every token is a string: a little-endian `u64` length, the bytes, and zero padding to a
//! multiple of 8. A node is `( type regular [executable ""] contents <data> )`,
//! `( type symlink target <t> )` or `( type directory (entry ( name <n> node <node> ))* )`,
//! and the archive is the string `nix-archive-1` followed by the root node. Directory entries
//! are sorted by the bytes of their names, so one tree has exactly one NAR.

mod error;
mod parser;
mod unpack;
mod verifier;
mod writer;

pub use error::NarError;
pub use parser::{NarEvent, NarParser, NarVisitor, validate};
pub use unpack::{UnpackError, unpack};
pub use verifier::NarVerifier;
pub use writer::{DumpError, NarEncoder, dump_path};

/// The first token of every NAR.
pub const MAGIC: &str = "nix-archive-1";

/// Longest token other than file contents that the parser reads at all; names and symlink
/// targets are held to the tighter limits below.
pub const MAX_TOKEN_LEN: u64 = 64 * 1024;

/// Longest entry name accepted: Linux's `NAME_MAX`, so every accepted NAR can be unpacked.
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target accepted: Linux's `PATH_MAX` less the terminating NUL.
pub const MAX_TARGET_LEN: usize = 4095;

/// Longest path of an entry inside a NAR (`a/b/c`) accepted: what fits in Linux's `PATH_MAX`
/// behind `/nix/store/<hash>-<name of up to 211 bytes>/`, where Nix unpacks it. It also bounds
/// the depth, and so the parser's memory.
pub const MAX_PATH_LEN: usize = 4096 - 256;

/// One read into `buf`, again when interrupted; 0 at the end of the stream.
pub(crate) fn read_some(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Padding needed after `len` bytes to reach a multiple of 8.
pub(crate) const fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

#[cfg(test)]
mod tests;
