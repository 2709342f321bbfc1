//! Checking a NAR stream and computing its NarHash and NarSize in one pass.

use std::io::Read;
use std::sync::mpsc;

use sha2::Digest as _;

use super::error::NarError;
use super::parser::{NarParser, read_chunks};
use super::read_some;
use crate::hash::Hash;

/// Bytes per chunk handed from the reading thread to the checking one in
/// [`NarVerifier::verify_reader_on_two_threads`].
pub const PIPELINE_CHUNK: usize = 256 * 1024;

/// Chunks queued between the two threads at most.
pub const PIPELINE_CHUNKS: usize = 8;

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

    /// Like [`NarVerifier::verify_reader`], with the reading on this thread and the checking
    /// and hashing on a second one: when reading costs as much as hashing (decompressing an
    /// upload), a NAR is verified at the speed of the slower of the two instead of their sum.
    /// At most [`PIPELINE_CHUNKS`] chunks of [`PIPELINE_CHUNK`] bytes are in flight.
    pub fn verify_reader_on_two_threads(mut reader: impl Read) -> Result<(Hash, u64), NarError> {
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(PIPELINE_CHUNKS);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|scope| {
            let checker = scope.spawn(move || {
                let mut v = NarVerifier::new();
                for (buf, n) in full_rx {
                    v.update(&buf[..n])?;
                    // The reader may have stopped already; the buffer is then just dropped.
                    let _ = empty_tx.send(buf);
                }
                Ok::<_, NarError>(v)
            });
            let read = (|| {
                loop {
                    let mut buf = empty_rx.try_recv().unwrap_or_else(|_| vec![0u8; PIPELINE_CHUNK]);
                    let n = match read_some(&mut reader, &mut buf).map_err(NarError::Io)? {
                        0 => return Ok(()),
                        n => n,
                    };
                    // A closed channel means the checker failed: its error is the answer.
                    if full_tx.send((buf, n)).is_err() {
                        return Ok(());
                    }
                }
            })();
            drop(full_tx);
            let checked = checker.join().expect("the NAR checker does not panic");
            read?;
            checked?.finish()
        })
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
