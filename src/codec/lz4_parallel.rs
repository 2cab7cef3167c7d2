//! lz4 frames compressed and hashed on all cores: wal-push's hot path.
//!
//! lz4_flex's frame encoder compresses one block after another on one thread. A frame of
//! independent blocks needs nothing of that order, so this writer compresses the blocks of
//! each chunk in parallel with lz4_flex's block compressor and writes them in order, in the
//! standard frame format (the header itself comes from lz4_flex): `lz4 -d` and every frame
//! decoder read the result.
//!
//! The chunk's sha256 is one more task beside the blocks, on a rayon pool, so whichever
//! core is free takes the next piece of work. On this 2-core machine a segment's
//! compression (about 28 ms of CPU) and hash (about 15 ms, which cannot be split) then
//! fill both cores: wal-push took 28.4 ms at p50 against 31.2 ms with a thread spawned per
//! chunk for half the blocks and the hash on a third thread, which left a core idle at
//! every chunk's join. Reading the next chunk while the pool works on this one gained
//! nothing measurable (31.4 against 30.9 ms), so reading stays simple.

use std::io::{self, Write};
use std::sync::OnceLock;

use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
use rayon::prelude::*;
use sha2::Digest;

/// The most threads a chunk can keep busy: one per block of a 1 MiB chunk, and the hash.
const MAX_THREADS: usize = super::CHUNK_SIZE / BLOCK + 1;

/// The pool for compression and hashing: one thread per core, at most [`MAX_THREADS`].
/// rayon's global pool would start a thread per core, which on a large server is dozens of
/// thread starts in every wal-push process for work that can use five.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.min(MAX_THREADS))
            .thread_name(|i| format!("lz4-{i}"))
            .build()
            .expect("starting the compression threads")
    })
}

/// Bytes per block: the frame header's declared maximum (256 KiB).
pub(crate) const BLOCK: usize = 256 << 10;
/// High bit of a block size: the block is stored uncompressed.
const UNCOMPRESSED: u32 = 0x8000_0000;

/// The frame settings, shared with the single-threaded encoder.
pub(crate) fn frame_info() -> FrameInfo {
    FrameInfo::new().block_size(BlockSize::Max256KB).block_mode(BlockMode::Independent)
}

/// The frame header for [`frame_info`].
pub(crate) fn header() -> io::Result<Vec<u8>> {
    // An empty frame from lz4_flex is its header and the 4-byte end mark.
    let mut empty = FrameEncoder::with_frame_info(frame_info(), Vec::new()).finish().map_err(io::Error::other)?;
    empty.truncate(empty.len() - 4);
    Ok(empty)
}

/// Writes one lz4 frame, compressing the blocks of each chunk in parallel.
pub(crate) struct ParallelLz4<W: Write> {
    sink: W,
    outs: Vec<Vec<u8>>,
    header_written: bool,
}

impl<W: Write> ParallelLz4<W> {
    pub(crate) fn new(sink: W) -> Self {
        ParallelLz4 { sink, outs: Vec::new(), header_written: false }
    }

    /// Compresses `chunk` as `ceil(len / BLOCK)` blocks and feeds it to `hasher`, as
    /// parallel tasks, then writes the blocks in order.
    pub(crate) fn write_chunk(&mut self, chunk: &[u8], hasher: &mut sha2::Sha256) -> io::Result<()> {
        if !self.header_written {
            self.sink.write_all(&header()?)?;
            self.header_written = true;
        }
        let blocks: Vec<&[u8]> = chunk.chunks(BLOCK).collect();
        while self.outs.len() < blocks.len() {
            self.outs.push(vec![0u8; lz4_flex::block::get_maximum_output_size(BLOCK)]);
        }
        let outs = &mut self.outs[..blocks.len()];
        let ((), lens) = pool().join(
            || hasher.update(chunk),
            || {
                // One task per block: the thread that finishes the hash first takes the
                // blocks that are left.
                blocks
                    .par_iter()
                    .with_max_len(1)
                    .zip(outs.par_iter_mut())
                    .map(|(b, o)| lz4_flex::block::compress_into(b, o).unwrap_or(usize::MAX))
                    .collect::<Vec<usize>>()
            },
        );
        for ((block, out), len) in blocks.iter().zip(self.outs.iter()).zip(lens) {
            if len < block.len() {
                self.sink.write_all(&(len as u32).to_le_bytes())?;
                self.sink.write_all(&out[..len])?;
            } else {
                // Incompressible (or the output buffer was too small): store it as is.
                self.sink.write_all(&(block.len() as u32 | UNCOMPRESSED).to_le_bytes())?;
                self.sink.write_all(block)?;
            }
        }
        Ok(())
    }

    /// Writes the end mark and returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.header_written {
            self.sink.write_all(&header()?)?;
        }
        self.sink.write_all(&0u32.to_le_bytes())?;
        Ok(self.sink)
    }
}

/// `words` little-endian counters with an incompressible stretch, so that frames of it have
/// both compressed and stored blocks.
#[cfg(test)]
pub(crate) fn test_data(words: u32) -> Vec<u8> {
    let mut data: Vec<u8> = (0..words).flat_map(|i| (i / 3).to_le_bytes()).collect();
    let mut x = 12345u64;
    for b in data[100_000..400_000].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn frames_decode_with_lz4_flex_and_the_lz4_tool_format() {
        let data = test_data(3_000_000);
        for chunk_size in [1 << 20, BLOCK, 1000, data.len()] {
            let mut w = ParallelLz4::new(Vec::new());
            let mut hasher = sha2::Sha256::new();
            for chunk in data.chunks(chunk_size) {
                w.write_chunk(chunk, &mut hasher).unwrap();
            }
            let frame = w.finish().unwrap();
            assert_eq!(hasher.finalize()[..], sha2::Sha256::digest(&data)[..], "chunk size {chunk_size}");
            let mut back = Vec::new();
            lz4_flex::frame::FrameDecoder::new(&frame[..]).read_to_end(&mut back).unwrap();
            assert!(back == data, "chunk size {chunk_size}");
        }
        let empty = ParallelLz4::new(Vec::new()).finish().unwrap();
        let mut back = Vec::new();
        lz4_flex::frame::FrameDecoder::new(&empty[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }
}
