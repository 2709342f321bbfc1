//! Compressing a NAR for upload on several cores: the NAR is cut into segments and each is
//! compressed as a zstd frame of its own by a worker thread, the frames sent in order.
//! Concatenated frames are one valid zstd stream (the cache-server, Nix and `zstd -d` decode
//! them as one).
//!
//! zstd's own multi-threaded mode does the same work but copies every input byte into its job
//! buffers and every output byte out again: a fifth of the push's CPU on scripts/bench-push's
//! entropy fixture. Here a segment is compressed from the buffer the NAR was written to, into
//! the buffer that becomes the HTTP body's chunk. Its jobs keep 64 KiB of the previous job as
//! history (level 1's overlap); a frame keeps none, which costs under 1% of the bytes at
//! [`SEGMENT`] bytes a frame.

use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;

/// NAR bytes per frame.
pub const SEGMENT: usize = 4 * 1024 * 1024;

/// Buffers of one size, kept for reuse once their bytes are sent: a fresh buffer per chunk
/// meant new pages to fault in, as the allocator hands freed ones back to the kernel.
pub struct BufferPool {
    buffers: Mutex<Vec<Vec<u8>>>,
    capacity: usize,
    keep: usize,
}

impl BufferPool {
    /// An empty pool of buffers of `capacity` bytes that keeps at most `keep` of them.
    pub const fn new(capacity: usize, keep: usize) -> Self {
        BufferPool { buffers: Mutex::new(Vec::new()), capacity, keep }
    }

    /// An empty buffer of the pool's capacity, from the pool when one is there.
    pub fn take(&'static self) -> Vec<u8> {
        let pooled = self.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// `buf` as the bytes of a chunk, its buffer back to this pool when the chunk is dropped.
    pub fn chunk(&'static self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self })
    }

    /// The length and capacity of each buffer held now.
    #[cfg(test)]
    pub fn held(&self) -> Vec<(usize, usize)> {
        self.buffers.lock().unwrap().iter().map(|b| (b.len(), b.capacity())).collect()
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != self.capacity {
            return;
        }
        buf.clear();
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < self.keep {
            pool.push(buf);
        }
    }
}

/// A chunk's buffer, back to its pool once sent.
struct Pooled {
    buf: Vec<u8>,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// The largest frame of a segment: zstd's `ZSTD_COMPRESSBOUND` for inputs over 128 KiB.
const FRAME: usize = SEGMENT + SEGMENT / 256;

/// Segments waiting to be filled and compressed frames waiting to be sent.
static SEGMENTS: BufferPool = BufferPool::new(SEGMENT, 8);
static FRAMES: BufferPool = BufferPool::new(FRAME, 16);

struct Worker {
    segments: mpsc::SyncSender<Vec<u8>>,
    frames: mpsc::Receiver<io::Result<Vec<u8>>>,
    thread: JoinHandle<()>,
}

/// Compresses what is written to it as zstd frames of [`SEGMENT`] NAR bytes on worker
/// threads and hands each frame, in order, to `emit`.
pub struct ParallelEncoder<E: FnMut(Bytes) -> io::Result<()>> {
    workers: Vec<Worker>,
    emit: E,
    segment: Vec<u8>,
    sent: usize,
    done: usize,
}

impl<E: FnMut(Bytes) -> io::Result<()>> ParallelEncoder<E> {
    /// An encoder at zstd `level` with `threads` workers (at least one).
    pub fn new(level: i32, threads: usize, emit: E) -> io::Result<Self> {
        let workers = (0..threads.max(1))
            .map(|_| {
                let (segments, segments_rx) = mpsc::sync_channel::<Vec<u8>>(1);
                let (frames_tx, frames) = mpsc::sync_channel(1);
                let mut compressor = zstd::bulk::Compressor::new(level)?;
                let thread = std::thread::Builder::new().name("zstd".into()).spawn(move || {
                    for segment in segments_rx {
                        let mut frame = FRAMES.take();
                        let compressed =
                            compressor.compress_to_buffer(&segment[..], &mut frame).map(|_| frame);
                        SEGMENTS.give_back(segment);
                        if frames_tx.send(compressed).is_err() {
                            break;
                        }
                    }
                })?;
                Ok(Worker { segments, frames, thread })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ParallelEncoder { workers, emit, segment: Vec::new(), sent: 0, done: 0 })
    }

    /// Receives the oldest frame in flight and emits it.
    fn emit_oldest(&mut self) -> io::Result<()> {
        let worker = &self.workers[self.done % self.workers.len()];
        let frame = worker.frames.recv().map_err(|_| io::Error::other("a zstd worker stopped"))??;
        self.done += 1;
        (self.emit)(FRAMES.chunk(frame))
    }

    /// Hands the filled segment to the next worker, first emitting the oldest frame when every
    /// worker has one of its own in flight.
    fn dispatch(&mut self) -> io::Result<()> {
        if self.segment.is_empty() {
            return Ok(());
        }
        // Each worker holds one segment and one finished frame at most; the next worker's
        // frame is the oldest, and emitting it lets that worker take this segment.
        if self.sent - self.done == 2 * self.workers.len() {
            self.emit_oldest()?;
        }
        let segment = std::mem::take(&mut self.segment);
        let worker = &self.workers[self.sent % self.workers.len()];
        worker.segments.send(segment).map_err(|_| io::Error::other("a zstd worker stopped"))?;
        self.sent += 1;
        Ok(())
    }

    /// Compresses what is left, emits every frame and stops the workers.
    pub fn finish(mut self) -> io::Result<()> {
        self.dispatch()?;
        while self.done < self.sent {
            self.emit_oldest()?;
        }
        for worker in std::mem::take(&mut self.workers) {
            drop(worker.segments);
            let _ = worker.thread.join();
        }
        Ok(())
    }
}

impl<E: FnMut(Bytes) -> io::Result<()>> Write for ParallelEncoder<E> {
    /// Takes what fits in the segment, so a segment never grows past [`SEGMENT`].
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.segment.capacity() == 0 {
            self.segment = SEGMENTS.take();
        }
        let n = data.len().min(SEGMENT - self.segment.len());
        self.segment.extend_from_slice(&data[..n]);
        if self.segment.len() == SEGMENT {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that compress partly: runs of a repeated pattern between pseudo-random stretches.
    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|i| {
                if (i / 10_000) % 2 == 0 {
                    (i % 97) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    fn compress(data: &[u8], threads: usize, write_size: usize) -> Vec<Bytes> {
        let mut frames = Vec::new();
        let mut enc = ParallelEncoder::new(1, threads, |b| {
            frames.push(b);
            Ok(())
        })
        .unwrap();
        for piece in data.chunks(write_size) {
            enc.write_all(piece).unwrap();
        }
        enc.finish().unwrap();
        frames
    }

    #[test]
    fn a_frame_buffer_holds_any_segment() {
        assert!(FRAME >= zstd::zstd_safe::compress_bound(SEGMENT));
    }

    #[test]
    fn frames_decode_as_one_stream_in_order() {
        // Not a whole number of segments, more segments than workers can hold at once, and
        // writes that straddle segment ends.
        let data = sample(9 * SEGMENT + 12_345);
        for threads in [1, 2, 3] {
            let frames = compress(&data, threads, 1_000_003);
            assert_eq!(frames.len(), 10, "{threads} threads: a frame a segment");
            let stream = frames.concat();
            assert_eq!(zstd::stream::decode_all(&stream[..]).unwrap(), data, "{threads} threads");
        }
    }

    #[test]
    fn a_short_input_is_one_frame_and_nothing_is_no_frame() {
        let data = sample(1000);
        let frames = compress(&data, 2, 7);
        assert_eq!(frames.len(), 1);
        assert_eq!(zstd::stream::decode_all(&frames[0][..]).unwrap(), data);
        assert!(compress(&[], 2, 1).is_empty());
    }

    #[test]
    fn an_emit_error_stops_the_encoder() {
        let mut enc =
            ParallelEncoder::new(1, 2, |_| Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))).unwrap();
        let data = sample(6 * SEGMENT);
        let err =
            data.chunks(SEGMENT).try_for_each(|c| enc.write_all(c)).and_then(|()| enc.finish()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
