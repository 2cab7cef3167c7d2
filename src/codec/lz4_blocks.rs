//! lz4 frames decoded straight into the caller's buffer: wal-fetch's hot path.
//!
//! lz4_flex's frame decoder decompresses each block into a buffer of its own and copies it
//! out, and on a 16 MiB segment that copy, with the page faults of the buffers it fills, is
//! a tenth of a fetch. The frames wal-rs writes are the simplest the format allows
//! (independent 256 KiB blocks, no checksums, no dictionary: see `lz4_parallel`), so this
//! reader decodes them block by block with lz4_flex's block decompressor directly into the
//! output, and hands any other frame (another tool's, linked blocks, checksums, legacy
//! format) to lz4_flex's frame decoder from its first byte. Both read the same format; this
//! one only skips a copy.

use std::io::{self, Cursor, Read};
use std::sync::OnceLock;

use lz4_flex::frame::FrameDecoder;

use super::encode::read_full;
use super::lz4_parallel::{self, BLOCK};

/// High bit of a block size: the block is stored uncompressed.
const UNCOMPRESSED: u32 = 0x8000_0000;

/// The frame header wal-rs's encoders write: magic, flags, block size and header checksum.
fn own_header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(|| lz4_parallel::header().expect("encoding an empty lz4 frame"))
}

enum State<R: Read> {
    /// Before a frame header (at the start, or after a frame's end mark).
    Between(R),
    /// Inside one of wal-rs's own frames.
    Blocks(R),
    /// Another kind of frame: lz4_flex decodes the rest of the stream.
    Delegated(Box<FrameDecoder<io::Chain<Cursor<Vec<u8>>, R>>>),
    /// The input has ended after a whole frame.
    Done(R),
    /// Only while switching states.
    Empty,
}

/// A reader of lz4 frames that decodes wal-rs's own frames without an intermediate copy.
pub(crate) struct Lz4Blocks<R: Read> {
    state: State<R>,
    /// One compressed block.
    compressed: Vec<u8>,
    /// A block decoded for a caller whose buffer was smaller than a block.
    spill: Vec<u8>,
    spill_pos: usize,
}

impl<R: Read> Lz4Blocks<R> {
    pub(crate) fn new(src: R) -> Self {
        Lz4Blocks { state: State::Between(src), compressed: Vec::new(), spill: Vec::new(), spill_pos: 0 }
    }

    /// The underlying reader.
    pub(crate) fn get_ref(&self) -> &R {
        match &self.state {
            State::Between(r) | State::Blocks(r) | State::Done(r) => r,
            State::Delegated(d) => d.get_ref().get_ref().1,
            State::Empty => unreachable!("Lz4Blocks left between states"),
        }
    }

    /// Reads the next frame's header: continues with our own frames, hands anything else
    /// (put back in front of the rest) to lz4_flex, and notes a clean end of input.
    fn start_frame(&mut self) -> io::Result<()> {
        let State::Between(mut src) = std::mem::replace(&mut self.state, State::Empty) else {
            unreachable!("start_frame outside a frame boundary")
        };
        let header = own_header();
        let mut peeked = vec![0u8; header.len()];
        let n = match read_full(&mut src, &mut peeked) {
            Ok(n) => n,
            Err(e) => {
                self.state = State::Between(src);
                return Err(e);
            }
        };
        peeked.truncate(n);
        if n > 0 && n < header.len() {
            // Too short to be any frame: a cut object, or bytes after the last frame.
            self.state = State::Done(src);
            return Err(invalid(format!("{n} stray bytes where an lz4 frame should start")));
        }
        self.state = if n == 0 {
            State::Done(src)
        } else if peeked == header {
            State::Blocks(src)
        } else {
            State::Delegated(Box::new(FrameDecoder::new(Cursor::new(peeked).chain(src))))
        };
        Ok(())
    }

    /// Decodes the next block of the current frame into `out` (at least `BLOCK` long);
    /// `None` at the frame's end mark, after which the next frame (if any) is looked for.
    fn next_block(&mut self, out: &mut [u8]) -> io::Result<Option<usize>> {
        let State::Blocks(src) = &mut self.state else { unreachable!("next_block outside a frame") };
        let mut word = [0u8; 4];
        src.read_exact(&mut word).map_err(truncated)?;
        let word = u32::from_le_bytes(word);
        if word == 0 {
            let State::Blocks(src) = std::mem::replace(&mut self.state, State::Empty) else { unreachable!() };
            self.state = State::Between(src);
            return Ok(None);
        }
        let len = (word & !UNCOMPRESSED) as usize;
        if len > BLOCK {
            return Err(invalid(format!("lz4 block of {len} bytes in a frame of {BLOCK}-byte blocks")));
        }
        if word & UNCOMPRESSED != 0 {
            src.read_exact(&mut out[..len]).map_err(truncated)?;
            return Ok(Some(len));
        }
        self.compressed.resize(len, 0);
        src.read_exact(&mut self.compressed).map_err(truncated)?;
        lz4_flex::block::decompress_into(&self.compressed, &mut out[..BLOCK])
            .map(Some)
            .map_err(|e| invalid(format!("lz4 block does not decompress: {e}")))
    }
}

impl<R: Read> Read for Lz4Blocks<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.spill_pos < self.spill.len() {
            let n = (self.spill.len() - self.spill_pos).min(out.len());
            out[..n].copy_from_slice(&self.spill[self.spill_pos..self.spill_pos + n]);
            self.spill_pos += n;
            return Ok(n);
        }
        let mut filled = 0;
        loop {
            match &mut self.state {
                State::Between(_) => self.start_frame()?,
                State::Done(_) => return Ok(filled),
                State::Delegated(d) => {
                    if filled > 0 {
                        return Ok(filled);
                    }
                    return d.read(out);
                }
                State::Blocks(_) if out.len() - filled >= BLOCK => {
                    filled += self.next_block(&mut out[filled..])?.unwrap_or(0);
                }
                State::Blocks(_) if filled > 0 => return Ok(filled),
                State::Blocks(_) => {
                    // A buffer smaller than a block: decode into our own and copy.
                    let mut spill = std::mem::take(&mut self.spill);
                    spill.resize(BLOCK, 0);
                    let n = self.next_block(&mut spill)?.unwrap_or(0);
                    spill.truncate(n);
                    self.spill = spill;
                    self.spill_pos = 0;
                    if n > 0 {
                        return self.read(out);
                    }
                }
                State::Empty => unreachable!("Lz4Blocks left between states"),
            }
        }
    }
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

/// Input that ends inside a frame is a damaged object, not a short read to retry here.
fn truncated(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        invalid("the lz4 stream ends inside a frame".into())
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::lz4_parallel::{frame_info, test_data, ParallelLz4};
    use std::io::Write;

    fn sample() -> Vec<u8> {
        test_data(1_500_000)
    }

    fn own_frame(data: &[u8]) -> Vec<u8> {
        let mut w = ParallelLz4::new(Vec::new());
        for chunk in data.chunks(1 << 20) {
            w.write_chunk(chunk, &mut sha2::Sha256::default()).unwrap();
        }
        w.finish().unwrap()
    }

    /// Reads everything with buffers of `size` bytes.
    fn read_all<R: Read>(mut r: R, size: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; size];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn own_frames_decode_with_any_buffer_size() {
        let data = sample();
        let frame = own_frame(&data);
        for size in [1, 1000, BLOCK - 1, BLOCK, BLOCK + 7, 1 << 20, 8 << 20] {
            let back = read_all(Lz4Blocks::new(&frame[..]), size).unwrap();
            assert!(back == data, "buffer of {size}");
        }
        // Two frames back to back, and an empty frame.
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let back = read_all(Lz4Blocks::new(&two[..]), 1 << 20).unwrap();
        assert!(back[..data.len()] == data[..] && back[data.len()..] == data[..]);
        let empty = ParallelLz4::new(Vec::new()).finish().unwrap();
        assert!(read_all(Lz4Blocks::new(&empty[..]), 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn other_frames_are_handed_to_lz4_flex() {
        let data = sample();
        for info in [
            frame_info().content_checksum(true),
            frame_info().block_mode(lz4_flex::frame::BlockMode::Linked),
            lz4_flex::frame::FrameInfo::new(),
        ] {
            let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            enc.write_all(&data).unwrap();
            let frame = enc.finish().unwrap();
            let back = read_all(Lz4Blocks::new(&frame[..]), 1 << 20).unwrap();
            assert!(back == data);
        }
        // Ours followed by another tool's frame.
        let mut enc = lz4_flex::frame::FrameEncoder::new(own_frame(&data));
        enc.write_all(&data).unwrap();
        let mixed = enc.finish().unwrap();
        let mut back = Vec::new();
        let mut r = Lz4Blocks::new(&mixed[..]);
        // lz4_flex returns 0 at the end of each of its frames; read to the true end.
        for _ in 0..3 {
            back.extend(read_all(&mut r, 1 << 20).unwrap());
        }
        assert_eq!(back.len(), 2 * data.len());
    }

    #[test]
    fn damage_is_an_error_never_short_data() {
        let data = sample();
        let frame = own_frame(&data);
        assert!(read_all(Lz4Blocks::new(&frame[..5]), 1 << 20).is_err());
        for cut in [9, 100, frame.len() / 2, frame.len() - 1] {
            let e = read_all(Lz4Blocks::new(&frame[..cut]), 1 << 20).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "cut at {cut}");
        }
        let mut bad = frame.clone();
        bad[own_header().len() + 1] ^= 0x40; // a block size word beyond the maximum
        assert!(read_all(Lz4Blocks::new(&bad[..]), 1 << 20).is_err());
        let mut garbage = frame.clone();
        garbage.extend_from_slice(b"xyz!");
        assert!(read_all(Lz4Blocks::new(&garbage[..]), 1 << 20).is_err());
    }
}
