//! Compressing a NAR for upload on several cores: the NAR is cut into segments and each is
//! compressed as a zstd frame of its own by one of the process's compression threads, the
//! frames sent in order. Concatenated frames are one valid zstd stream (the cache-server, Nix
//! 2.8 and 2.34 and `zstd -d` decode them as one).
//!
//! zstd's own multi-threaded mode does the same work but copies every input byte into its job
//! buffers and every output byte out again: ~0.3 of the client's ~1.9 CPU-seconds on
//! scripts/bench-push's entropy fixture. Here a segment is compressed from the buffer the NAR
//! was written to, into the buffer that becomes the HTTP body's chunk. zstd's jobs keep 64 KiB
//! of the previous job as history at level 1; a frame keeps none, which cost 0.03% more bytes
//! on the bench's real fixture.
//!
//! Memory is bounded whatever the number of uploads at once: at most [`THREADS_MAX`] threads
//! for the process, a queue as long, and [`IN_FLIGHT`] segments of any one NAR out at once.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

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
    fn take(&self) -> Vec<u8> {
        let pooled = self.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Copies into `buf` what of `data` fits in the pool's capacity, taking `buf` from the pool
    /// when it has none (so it never grows past the capacity: a reallocation and a copy);
    /// returns how many bytes it took, and whether `buf` is full.
    pub fn fill(&self, buf: &mut Vec<u8>, data: &[u8]) -> (usize, bool) {
        if buf.capacity() == 0 {
            *buf = self.take();
        }
        let n = data.len().min(self.capacity - buf.len());
        buf.extend_from_slice(&data[..n]);
        (n, buf.len() == self.capacity)
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

/// Segments waiting to be filled, and compressed frames waiting to be sent: as many as one
/// NAR's upload cycles through (a segment being filled and those in flight; frames in flight
/// and in the HTTP body's queue), so a second NAR at once allocates its own and frees them.
static SEGMENTS: BufferPool = BufferPool::new(SEGMENT, IN_FLIGHT + 1);
static FRAMES: BufferPool = BufferPool::new(FRAME, 2 * IN_FLIGHT);

/// Threads compressing segments, shared by every upload of the process: eight cores of zstd
/// level 1 (~0.7 GB/s each on scripts/bench-push's entropy fixture here) outrun a 25-Gbit link.
pub const THREADS_MAX: usize = 8;

/// Segments of one NAR being compressed or waiting to be sent at once: with the pool's queue,
/// what bounds the memory of many large uploads at once (each segment and frame 4 MiB).
pub const IN_FLIGHT: usize = 4;

/// A segment to compress, and where its frame goes.
struct Job {
    segment: Vec<u8>,
    level: i32,
    frame: mpsc::SyncSender<io::Result<Vec<u8>>>,
}

/// The compression threads' queue, started on first use; `None` if no thread could start.
fn pool() -> Option<&'static mpsc::SyncSender<Job>> {
    static POOL: OnceLock<Option<mpsc::SyncSender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(THREADS_MAX);
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads);
        let queue = Arc::new(Mutex::new(queue));
        let started = (0..threads)
            .filter(|_| {
                let queue = queue.clone();
                std::thread::Builder::new().name("zstd".into()).spawn(move || compress_jobs(&queue)).is_ok()
            })
            .count();
        (started > 0).then_some(jobs)
    })
    .as_ref()
}

/// A compression thread: takes jobs from the queue for as long as the process lives.
fn compress_jobs(queue: &Mutex<mpsc::Receiver<Job>>) {
    let mut compressor: Option<(i32, zstd::bulk::Compressor<'static>)> = None;
    loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(Job { segment, level, frame }) = next else { return };
        if compressor.as_ref().is_none_or(|(l, _)| *l != level) {
            compressor = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let compressed = match compressor.as_mut() {
            Some((_, c)) => {
                let mut out = FRAMES.take();
                c.compress_to_buffer(&segment[..], &mut out).map(|_| out)
            }
            None => Err(io::Error::other(format!("zstd cannot compress at level {level}"))),
        };
        SEGMENTS.give_back(segment);
        // The encoder is gone when its upload failed: nothing to do with the frame.
        let _ = frame.send(compressed);
    }
}

fn stopped() -> io::Error {
    io::Error::other("the zstd compression threads stopped")
}

/// Compresses what is written to it as zstd frames of [`SEGMENT`] NAR bytes on the shared
/// compression threads, at most [`IN_FLIGHT`] at once, and hands each frame, in order, to
/// `emit`.
pub struct ParallelEncoder<E: FnMut(Bytes) -> io::Result<()>> {
    jobs: &'static mpsc::SyncSender<Job>,
    level: i32,
    emit: E,
    segment: Vec<u8>,
    /// The frames of the segments handed over, oldest first.
    in_flight: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
}

impl<E: FnMut(Bytes) -> io::Result<()>> ParallelEncoder<E> {
    /// An encoder at zstd `level`.
    pub fn new(level: i32, emit: E) -> io::Result<Self> {
        let jobs = pool().ok_or_else(stopped)?;
        Ok(ParallelEncoder { jobs, level, emit, segment: Vec::new(), in_flight: VecDeque::new() })
    }

    /// Waits for the oldest frame in flight and emits it.
    fn emit_oldest(&mut self) -> io::Result<()> {
        let Some(oldest) = self.in_flight.pop_front() else { return Ok(()) };
        let frame = oldest.recv().map_err(|_| stopped())??;
        (self.emit)(FRAMES.chunk(frame))
    }

    /// Hands the filled segment to the compression threads, first emitting the oldest frame
    /// when [`IN_FLIGHT`] are out.
    fn dispatch(&mut self) -> io::Result<()> {
        if self.segment.is_empty() {
            return Ok(());
        }
        if self.in_flight.len() == IN_FLIGHT {
            self.emit_oldest()?;
        }
        let (frame, frame_rx) = mpsc::sync_channel(1);
        let job = Job { segment: std::mem::take(&mut self.segment), level: self.level, frame };
        self.jobs.send(job).map_err(|_| stopped())?;
        self.in_flight.push_back(frame_rx);
        Ok(())
    }

    /// Compresses what is left and emits every frame.
    pub fn finish(mut self) -> io::Result<()> {
        self.dispatch()?;
        while !self.in_flight.is_empty() {
            self.emit_oldest()?;
        }
        Ok(())
    }
}

impl<E: FnMut(Bytes) -> io::Result<()>> Write for ParallelEncoder<E> {
    /// Takes what fits in the segment.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let (n, full) = SEGMENTS.fill(&mut self.segment, data);
        if full {
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

    fn compress(data: &[u8], write_size: usize) -> Vec<Bytes> {
        let mut frames = Vec::new();
        let mut enc = ParallelEncoder::new(1, |b| {
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
        // Not a whole number of segments, more segments than may be in flight, and writes
        // that straddle segment ends.
        let data = sample((2 * IN_FLIGHT + 1) * SEGMENT + 12_345);
        let frames = compress(&data, 1_000_003);
        assert_eq!(frames.len(), 2 * IN_FLIGHT + 2, "a frame a segment");
        assert_eq!(zstd::stream::decode_all(&frames.concat()[..]).unwrap(), data);
    }

    #[test]
    fn uploads_at_once_share_the_threads_and_keep_their_own_order() {
        // More encoders than compression threads, each with its own bytes.
        let inputs: Vec<Vec<u8>> = (0..12).map(|i| sample(3 * SEGMENT + i * 777)).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = inputs.iter().map(|d| scope.spawn(move || compress(d, 65_536))).collect();
            for (data, h) in inputs.iter().zip(handles) {
                let frames = h.join().unwrap();
                assert_eq!(zstd::stream::decode_all(&frames.concat()[..]).unwrap(), *data);
            }
        });
    }

    #[test]
    fn a_short_input_is_one_frame_and_nothing_is_no_frame() {
        let data = sample(1000);
        let frames = compress(&data, 7);
        assert_eq!(frames.len(), 1);
        assert_eq!(zstd::stream::decode_all(&frames[0][..]).unwrap(), data);
        assert!(compress(&[], 1).is_empty());
    }

    #[test]
    fn an_emit_error_stops_the_encoder() {
        let mut enc =
            ParallelEncoder::new(1, |_| Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))).unwrap();
        let data = sample((IN_FLIGHT + 2) * SEGMENT);
        let err =
            data.chunks(SEGMENT).try_for_each(|c| enc.write_all(c)).and_then(|()| enc.finish()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
