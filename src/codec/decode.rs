//! Stored bytes back to the original: strip and check the trailer, decompress, hash.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use super::encode::read_full;
use super::hasher::BackgroundHasher;
use super::holdback::HoldBack;
use super::lz4_blocks::Lz4Blocks;
use super::{Compression, Sha256, Trailer};
use crate::crypto::{self, KeyRing, OpenError};
use crate::store::ObjectKey;

/// What one decode did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSummary {
    /// Stored bytes read, trailer included.
    pub bytes_in: u64,
    /// Original bytes written to the sink.
    pub bytes_out: u64,
    /// sha256 of the bytes written.
    pub sha256: Sha256,
    /// The trailer, already checked against `sha256` and `bytes_out`; `None` for objects
    /// without one (uncompressed, or written by another tool).
    pub trailer: Option<Trailer>,
}

/// Why a decode failed, split by whose fault it is: the caller retries `Source`, reports
/// `Corrupt` as a damaged object, and `Sink` as a local write failure.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Reading the stored bytes failed (a dropped connection, a read error).
    #[error("reading the stored object failed: {0}")]
    Source(#[source] io::Error),
    /// The stored bytes are not a valid stream, or do not match their trailer.
    #[error("{0}")]
    Corrupt(String),
    /// Writing the original bytes failed.
    #[error("writing failed: {0}")]
    Sink(#[source] io::Error),
    /// The object is encrypted and no configured key opens it (or it is not encrypted and
    /// encryption is required).
    #[error("{0}")]
    Key(String),
}

impl DecodeError {
    fn from_open(e: OpenError) -> DecodeError {
        match e {
            OpenError::Source(e) => DecodeError::Source(e),
            OpenError::BadHeader(d) => DecodeError::Corrupt(d),
            other => DecodeError::Key(other.to_string()),
        }
    }
}

/// Reads a stored object from `src` and writes the original bytes to `sink`, checking the
/// trailer when there is one. Encrypted objects are opened with the configured keys, and
/// must have been sealed for `object`, the key `src` was read from: one sealed for another
/// key is `Corrupt`.
pub fn decode<R: Read, W: Write>(
    src: R,
    hint: Compression,
    object: &ObjectKey,
    sink: W,
) -> Result<DecodeSummary, DecodeError> {
    decode_with(src, hint, crypto::ring().as_deref(), object, sink)
}

/// [`decode`] with the keys in `ring` instead of the configured ones.
pub fn decode_with<R: Read, W: Write>(
    src: R,
    hint: Compression,
    ring: Option<&KeyRing>,
    object: &ObjectKey,
    mut sink: W,
) -> Result<DecodeSummary, DecodeError> {
    let source_failed = Rc::new(Cell::new(false));
    let bytes_in = Rc::new(Cell::new(0u64));
    let tagged = Tagged { inner: src, failed: source_failed.clone(), count: bytes_in.clone() };
    let mut opened = crypto::stream::unseal(tagged, ring, object.as_str()).map_err(DecodeError::from_open)?;
    let (compression, magic) = detect(&mut opened, hint).map_err(|e| {
        if source_failed.get() {
            DecodeError::Source(e)
        } else {
            DecodeError::Corrupt(e.to_string())
        }
    })?;
    let tagged = io::Cursor::new(magic).chain(opened);
    let mut decoder = Decoder::new(compression, tagged).map_err(|e| {
        if source_failed.get() {
            DecodeError::Source(e)
        } else {
            DecodeError::Corrupt(e.to_string())
        }
    })?;

    // One lz4 block per chunk: see `BackgroundHasher::with_chunk`.
    let mut hasher = BackgroundHasher::with_chunk(Default::default(), DECODE_CHUNK);
    let mut bytes_out = 0u64;
    loop {
        let mut buf = hasher.buffer();
        let n = read_full(&mut decoder, &mut buf).map_err(|e| {
            if source_failed.get() {
                DecodeError::Source(e)
            } else {
                DecodeError::Corrupt(format!("not a valid {compression} stream: {e}"))
            }
        })?;
        if n == 0 {
            break;
        }
        sink.write_all(&buf[..n]).map_err(DecodeError::Sink)?;
        hasher.update(buf, n);
        bytes_out += n as u64;
    }
    sink.flush().map_err(DecodeError::Sink)?;
    let sha256 = hasher.finish();
    let trailer = decoder.trailer();
    if let Some(t) = trailer {
        if t.original_len != bytes_out {
            return Err(DecodeError::Corrupt(format!(
                "decompressed to {bytes_out} bytes but the trailer records {}",
                t.original_len
            )));
        }
        if t.sha256 != sha256 {
            return Err(DecodeError::Corrupt(format!(
                "sha256 of the restored bytes is {sha256} but the trailer records {}",
                t.sha256
            )));
        }
    }
    Ok(DecodeSummary { bytes_in: bytes_in.get(), bytes_out, sha256, trailer })
}

/// Bytes decoded at a time: one lz4 block, which `Lz4Blocks` decodes in place.
const DECODE_CHUNK: usize = super::lz4_parallel::BLOCK;

/// A streaming decompressor over `src`, read from `object`, for readers that need the
/// original bytes as a stream (tar partitions). A trailer, when present, is stepped over.
/// An encrypted object sealed for another key fails its first read as `InvalidData`.
pub fn decompressor<R: Read + Send + 'static>(
    hint: Compression,
    object: &ObjectKey,
    src: R,
) -> io::Result<Box<dyn Read + Send>> {
    let ring = crypto::ring();
    let mut src = crypto::stream::unseal(src, ring.as_deref(), object.as_str()).map_err(|e| match e {
        OpenError::Source(e) => e,
        // The OpenError itself, so that callers can tell a key refusal (exit 14) from damage.
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    })?;
    let (compression, magic) = detect(&mut src, hint)?;
    Ok(Box::new(Decoder::new(compression, io::Cursor::new(magic).chain(src))?))
}

/// lz4 frame magic, little-endian.
const LZ4_MAGIC: [u8; 4] = 0x184D_2204u32.to_le_bytes();
/// zstd frame magic, little-endian.
const ZSTD_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// The compression the object's first bytes show; `hint` (from the key's extension) when
/// they show neither format. Returns the bytes read, to be put back in front.
fn detect<R: Read>(src: &mut R, hint: Compression) -> io::Result<(Compression, Vec<u8>)> {
    let mut magic = vec![0u8; 4];
    let n = read_full(src, &mut magic)?;
    magic.truncate(n);
    let found = if magic == LZ4_MAGIC {
        Compression::Lz4
    } else if magic == ZSTD_MAGIC {
        Compression::Zstd
    } else {
        hint
    };
    Ok((found, magic))
}

/// Marks errors that come from the source, so they are not mistaken for corruption.
struct Tagged<R> {
    inner: R,
    failed: Rc<Cell<bool>>,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Tagged<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count.set(self.count.get() + n as u64);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed.set(true);
                }
                Err(e)
            }
        }
    }
}

enum Decoder<R: Read> {
    Plain(R),
    Lz4(Lz4Blocks<HoldBack<R>>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<HoldBack<R>>>),
}

impl<R: Read> Decoder<R> {
    fn new(compression: Compression, src: R) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Decoder::Plain(src),
            Compression::Lz4 => Decoder::Lz4(Lz4Blocks::new(HoldBack::new(src))),
            Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::new(HoldBack::new(src))?),
        })
    }

    fn trailer(&self) -> Option<Trailer> {
        match self {
            Decoder::Plain(_) => None,
            Decoder::Lz4(d) => d.get_ref().trailer(),
            Decoder::Zstd(d) => d.get_ref().get_ref().trailer(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Lz4(d) => {
                // lz4_flex returns 0 at the end of each frame. More input may follow: another
                // frame, or the trailer, which the next read judges. Keep reading until the
                // input itself has ended.
                for _ in 0..3 {
                    let n = d.read(buf)?;
                    if n > 0 || d.get_ref().at_end() {
                        return Ok(n);
                    }
                }
                Err(io::Error::new(io::ErrorKind::InvalidData, "data after the end of the lz4 stream"))
            }
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;

    /// The key the tests' objects are stored under.
    pub(super) fn at() -> ObjectKey {
        ObjectKey::new("wal_005/000000010000000000000003.lz4").unwrap()
    }

    fn sample() -> Vec<u8> {
        (0..500_000u32).flat_map(|i| (i % 1000).to_le_bytes()).collect()
    }

    #[test]
    fn damaged_objects_are_reported_as_corrupt() {
        for c in [Compression::Lz4, Compression::Zstd] {
            let mut stored = Vec::new();
            encode(&sample()[..], c, 1, &at(), &mut stored).unwrap();
            // A flipped byte in the trailer's hash, and a cut in the middle.
            let mut flipped = stored.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 0xff;
            assert!(matches!(decode(&flipped[..], c, &at(), io::sink()), Err(DecodeError::Corrupt(_))), "{c}");
            let cut = &stored[..stored.len() / 2];
            assert!(matches!(decode(cut, c, &at(), io::sink()), Err(DecodeError::Corrupt(_))), "{c}");
        }
    }

    #[test]
    fn a_damaged_trailer_is_corrupt_not_an_object_without_one() {
        for c in [Compression::Lz4, Compression::Zstd] {
            let mut stored = Vec::new();
            encode(&sample()[..], c, 1, &at(), &mut stored).unwrap();
            // One bit of the tag: zstd would otherwise step over the whole skippable frame
            // and return the data with nothing to check it against.
            let tag = stored.len() - crate::codec::trailer::LEN + 8;
            let mut flipped = stored.clone();
            flipped[tag] ^= 1;
            assert!(matches!(decode(&flipped[..], c, &at(), io::sink()), Err(DecodeError::Corrupt(_))), "{c}");
            // And a second fault in the data: still refused.
            let middle = flipped.len() / 2;
            flipped[middle] ^= 0x10;
            assert!(matches!(decode(&flipped[..], c, &at(), io::sink()), Err(DecodeError::Corrupt(_))), "{c}");
        }
    }

    #[test]
    fn compression_is_detected_from_the_object() {
        let original = sample();
        for stored_as in [Compression::Lz4, Compression::Zstd] {
            let mut stored = Vec::new();
            encode(&original[..], stored_as, 1, &at(), &mut stored).unwrap();
            for hint in Compression::ALL {
                let mut out = Vec::new();
                let s = decode(&stored[..], hint, &at(), &mut out).unwrap();
                assert_eq!(out, original, "{stored_as} read with hint {hint}");
                assert!(s.trailer.is_some());
            }
        }
    }

    #[test]
    fn objects_without_a_trailer_still_decode() {
        // What `lz4` and other tools write: a frame and nothing after it.
        let original = sample();
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        enc.write_all(&original).unwrap();
        let foreign = enc.finish().unwrap();
        let mut out = Vec::new();
        let s = decode(&foreign[..], Compression::Lz4, &at(), &mut out).unwrap();
        assert_eq!(out, original);
        assert!(s.trailer.is_none());
    }

    #[test]
    fn source_errors_are_not_corruption() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            }
        }
        for c in Compression::ALL {
            assert!(matches!(decode(Broken, c, &at(), io::sink()), Err(DecodeError::Source(_))), "{c}");
        }
    }
}

#[cfg(test)]
mod frame_end_tests {
    use super::tests::at;
    use super::*;
    use crate::codec::encode;

    /// A reader that hands out exactly the sizes asked for, so the lz4 decoder ends its
    /// frame without the trailer having been looked at: the case a real file showed.
    #[test]
    fn the_trailer_is_found_whatever_the_read_sizes() {
        let original: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Compression::Lz4, Compression::Zstd] {
            let mut stored = Vec::new();
            encode(&original[..], c, 1, &at(), &mut stored).unwrap();
            for chunk in [1usize, 4096, 1 << 20, stored.len()] {
                struct Chunked<'a>(&'a [u8], usize);
                impl Read for Chunked<'_> {
                    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                        let n = self.0.len().min(out.len()).min(self.1);
                        out[..n].copy_from_slice(&self.0[..n]);
                        self.0 = &self.0[n..];
                        Ok(n)
                    }
                }
                let s = decode(Chunked(&stored, chunk), c, &at(), io::sink()).unwrap();
                assert!(s.trailer.is_some(), "{c} chunk {chunk}");
                assert_eq!(s.bytes_in, stored.len() as u64);
            }
        }
    }
}
