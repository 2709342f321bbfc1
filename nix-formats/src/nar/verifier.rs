//! Checking a NAR stream and computing its NarHash and NarSize in one pass.

use std::io::Read;
use std::sync::{Mutex, mpsc};

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

/// Chunks of a NAR checked on the reading thread before a second thread takes over (4 MiB):
/// most store paths are smaller, and for them a thread of their own costs more than it saves.
pub const INLINE_CHUNKS: usize = 16;

/// Chunk buffers kept for the next NAR. A new buffer is pages the kernel faults in and zeroes
/// as the NAR is written to it, and freed ones go back to the kernel: for a closure of a
/// thousand small NARs that was ~250 page faults a NAR, most of a cache-server's CPU.
static SPARE_CHUNKS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Spare chunks kept at most: what two NARs verified at once cycle through (5 MiB).
const SPARE_CHUNKS_KEPT: usize = 2 * (PIPELINE_CHUNKS + 2);

/// A chunk buffer, a spare one when there is one.
fn take_chunk() -> Vec<u8> {
    let spare = SPARE_CHUNKS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    spare.unwrap_or_else(|| vec![0; PIPELINE_CHUNK])
}

/// Keeps a chunk buffer for the next NAR, if fewer than [`SPARE_CHUNKS_KEPT`] are kept.
fn keep_chunk(buf: Vec<u8>) {
    let mut spare = SPARE_CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < SPARE_CHUNKS_KEPT {
        spare.push(buf);
    }
}

/// Reads into `buf` until it is full or the stream ends; returns how many bytes it holds.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match read_some(reader, &mut buf[n..])? {
            0 => break,
            read => n += read,
        }
    }
    Ok(n)
}

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
    /// At most [`PIPELINE_CHUNKS`] chunks of [`PIPELINE_CHUNK`] bytes are in flight. The first
    /// [`INLINE_CHUNKS`] are checked on this thread, so a NAR shorter than that never starts a
    /// second one.
    pub fn verify_reader_on_two_threads(mut reader: impl Read) -> Result<(Hash, u64), NarError> {
        let mut v = NarVerifier::new();
        let mut first = take_chunk();
        let first_len = loop {
            let n = fill(&mut reader, &mut first).map_err(NarError::Io)?;
            if n < first.len() {
                v.update(&first[..n])?;
                keep_chunk(first);
                return v.finish();
            }
            if v.size() >= (INLINE_CHUNKS * PIPELINE_CHUNK) as u64 {
                break n;
            }
            v.update(&first)?;
        };
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(PIPELINE_CHUNKS);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        let verified = std::thread::scope(|scope| {
            let checker = scope.spawn(move || {
                for (buf, n) in full_rx {
                    v.update(&buf[..n])?;
                    // The reader may have stopped already; the buffer is then just dropped.
                    let _ = empty_tx.send(buf);
                }
                Ok::<_, NarError>(v)
            });
            let read = (|| {
                let mut next = Some((first, first_len));
                loop {
                    let (buf, n) = match next.take() {
                        Some(first) => first,
                        None => {
                            let mut buf = empty_rx.try_recv().unwrap_or_else(|_| take_chunk());
                            match read_some(&mut reader, &mut buf).map_err(NarError::Io)? {
                                0 => {
                                    keep_chunk(buf);
                                    return Ok(());
                                }
                                n => (buf, n),
                            }
                        }
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
        });
        empty_rx.try_iter().for_each(keep_chunk);
        verified
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
