//! Checking a NAR stream and computing its NarHash and NarSize in one pass.

use std::io::Read;

use sha2::Digest as _;

use super::error::NarError;
use super::parser::{NarParser, read_chunks};
use crate::hash::Hash;

/// Feeds bytes to a validating [`NarParser`] and SHA-256 at once: what a cache needs to accept
/// an upload. Memory is bounded whatever the NAR's size.
pub struct NarVerifier {
    parser: NarParser,
    hasher: sha2::Sha256,
}

impl Default for NarVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl NarVerifier {
    /// A verifier at the start of a NAR.
    pub fn new() -> Self {
        NarVerifier { parser: NarParser::new(), hasher: sha2::Sha256::new() }
    }

    /// Reads a whole NAR from `reader`, checks it and returns its NarHash and NarSize.
    pub fn verify_reader(reader: impl Read) -> Result<(Hash, u64), NarError> {
        let mut v = NarVerifier::new();
        read_chunks(reader, |chunk| v.update(chunk))?;
        v.finish()
    }

    /// Checks and hashes the next chunk.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), NarError> {
        self.parser.feed(chunk, &mut ())?;
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.parser.offset()
    }

    /// Checks that the NAR is complete and returns its NarHash and NarSize.
    pub fn finish(self) -> Result<(Hash, u64), NarError> {
        self.parser.finish()?;
        Ok((Hash::sha256(self.hasher.finalize().into()), self.parser.offset()))
    }
}
