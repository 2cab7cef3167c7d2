//! Byte streams in and out of the store: compression, the sha256 of the original bytes,
//! and the integrity trailer that carries it.
//!
//! An object is a plain stream in its format (an lz4 frame, a zstd frame, or the raw
//! bytes), so `lz4 -d` and `zstd -d` open it. wal-rs appends one skippable frame (see
//! [`trailer`]) with the sha256 and length of the original bytes: both formats define
//! skippable frames precisely so that tools like ours can add data the decompressors
//! ignore. Uncompressed objects cannot carry a trailer without changing their bytes, so
//! their sha256 travels in the store's object metadata instead.

pub mod decode;
pub mod encode;
pub(crate) mod hasher;
mod holdback;
mod lz4_blocks;
mod lz4_parallel;
pub mod trailer;

use std::fmt;
use std::str::FromStr;

pub use decode::{decode, decode_with, decompressor, DecodeSummary};
pub use encode::{encode, encode_sealed, sha256_of, Compressor, EncodeError, EncodeSummary};
pub use trailer::Trailer;

/// How an object's bytes are compressed. The store key's extension says which, as in
/// WAL-G's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Stored as is: no extension.
    None,
    /// The lz4 frame format (`.lz4`): the default, fastest to compress and to restore.
    Lz4,
    /// The zstd frame format (`.zst`): smaller objects for more CPU.
    Zstd,
}

/// A compression name that wal-rs does not write.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?}: use lz4, zstd or none")]
pub struct UnknownCompression(pub String);

impl Compression {
    /// Every compression, in the order wal-fetch tries their keys after the configured one.
    pub const ALL: [Compression; 3] = [Compression::Lz4, Compression::Zstd, Compression::None];

    /// The key extension, without the dot; `None` for uncompressed objects.
    pub fn extension(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some("lz4"),
            Compression::Zstd => Some("zst"),
        }
    }

    /// The compression an extension names, for keys written by wal-rs or its peers.
    pub fn from_extension(ext: &str) -> Option<Compression> {
        match ext {
            "lz4" => Some(Compression::Lz4),
            "zst" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Whether objects of this compression carry an integrity trailer.
    pub fn has_trailer(self) -> bool {
        self != Compression::None
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" | "zst" => Ok(Compression::Zstd),
            _ => Err(UnknownCompression(s.to_string())),
        }
    }
}

/// A sha256 digest, shown in lower-case hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256 {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Sha256(out))
    }
}

/// Size of the buffers the codecs read and write with: large enough that syscalls and
/// channel hand-offs cost nothing next to the work, small enough to keep memory flat.
pub const CHUNK_SIZE: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectKey;

    #[test]
    fn compression_names_and_extensions() {
        for c in Compression::ALL {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
            if let Some(ext) = c.extension() {
                assert_eq!(Compression::from_extension(ext), Some(c));
            }
        }
        assert!("gzip".parse::<Compression>().is_err());
        assert_eq!(Compression::from_extension("br"), None);
    }

    #[test]
    fn sealed_objects_round_trip_and_refuse_the_wrong_key_and_tampering() {
        use crate::crypto::{Key, KeyRing};
        let at = ObjectKey::new("wal_005/000000010000000000000003.lz4").unwrap();
        let original: Vec<u8> = (0..400_000u32).flat_map(|i| (i / 5).to_le_bytes()).collect();
        let key = Key::from_bytes([5; 32]);
        let ring = KeyRing::new(vec![key.clone()]).unwrap();
        let wrong = KeyRing::new(vec![Key::from_bytes([6; 32])]).unwrap();
        for c in Compression::ALL {
            let mut stored = Vec::new();
            let enc = encode_sealed(&original[..], c, 1, Some(&key), &at, &mut stored).unwrap();
            assert_eq!(enc.bytes_out, stored.len() as u64);
            assert_eq!(&stored[..8], b"WALRSENC");
            let mut restored = Vec::new();
            let dec = decode_with(&stored[..], c, Some(&ring), &at, &mut restored).unwrap();
            assert_eq!(restored, original, "{c}");
            assert_eq!(dec.sha256, enc.sha256);
            assert_eq!(dec.bytes_in, stored.len() as u64);
            assert!(matches!(
                decode_with(&stored[..], c, Some(&wrong), &at, std::io::sink()),
                Err(decode::DecodeError::Key(_))
            ));
            assert!(matches!(
                decode_with(&stored[..], c, None, &at, std::io::sink()),
                Err(decode::DecodeError::Key(_))
            ));
            let mut flipped = stored.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 1;
            assert!(matches!(
                decode_with(&flipped[..], c, Some(&ring), &at, std::io::sink()),
                Err(decode::DecodeError::Corrupt(_))
            ));
            let cut = &stored[..stored.len() - 20];
            assert!(matches!(
                decode_with(cut, c, Some(&ring), &at, std::io::sink()),
                Err(decode::DecodeError::Corrupt(_))
            ));
        }
    }

    /// An encrypted object copied over another name (timeline 2's history file as timeline
    /// 3's, a segment of another timeline) is damage, not a key problem: the configured key
    /// is the right one, the name is not.
    #[test]
    fn a_sealed_object_read_from_another_key_is_corrupt() {
        use crate::crypto::{Key, KeyRing};
        let key = Key::from_bytes([5; 32]);
        let ring = KeyRing::new(vec![key.clone()]).unwrap();
        let sealed_for = ObjectKey::new("wal_005/00000002.history.lz4").unwrap();
        let read_from = ObjectKey::new("wal_005/00000003.history.lz4").unwrap();
        let history = b"1\t0/5000000\tno recovery target specified\n".repeat(100);
        for c in Compression::ALL {
            let mut stored = Vec::new();
            encode_sealed(&history[..], c, 1, Some(&key), &sealed_for, &mut stored).unwrap();
            let mut restored = Vec::new();
            let refused = decode_with(&stored[..], c, Some(&ring), &read_from, &mut restored);
            assert!(
                matches!(&refused, Err(decode::DecodeError::Corrupt(d)) if d.contains("failed authentication")),
                "{c}: {refused:?}"
            );
            assert!(restored.is_empty(), "{c}: bytes of the other object were written");
            let mut restored = Vec::new();
            decode_with(&stored[..], c, Some(&ring), &sealed_for, &mut restored).unwrap();
            assert_eq!(restored, history, "{c}");
        }
    }

    #[test]
    fn unencrypted_objects_ignore_the_key_they_are_read_from() {
        let original = b"plain bytes".repeat(1000);
        let mut stored = Vec::new();
        let written = ObjectKey::new("wal_005/00000002.history.lz4").unwrap();
        encode_sealed(&original[..], Compression::Lz4, 1, None, &written, &mut stored).unwrap();
        let mut plain = lz4_flex::frame::FrameDecoder::new(&stored[..]);
        let mut via_lz4 = Vec::new();
        std::io::Read::read_to_end(&mut plain, &mut via_lz4).unwrap();
        assert_eq!(via_lz4, original, "an unencrypted object is still a plain lz4 stream");
        let elsewhere = ObjectKey::new("wal_005/00000003.history.lz4").unwrap();
        let mut restored = Vec::new();
        decode_with(&stored[..], Compression::Lz4, None, &elsewhere, &mut restored).unwrap();
        assert_eq!(restored, original);
    }

    #[test]
    fn every_compression_round_trips_with_its_checksum() {
        let at = ObjectKey::new("wal_005/000000010000000000000003.lz4").unwrap();
        let mut original = Vec::new();
        for i in 0..300_000u32 {
            original.extend_from_slice(&(i / 7).to_le_bytes());
        }
        for c in Compression::ALL {
            let mut stored = Vec::new();
            let enc = encode(&original[..], c, 1, &at, &mut stored).unwrap();
            assert_eq!(enc.bytes_in, original.len() as u64);
            assert_eq!(enc.bytes_out, stored.len() as u64);
            let mut restored = Vec::new();
            let dec = decode(&stored[..], c, &at, &mut restored).unwrap();
            assert_eq!(restored, original, "{c}");
            assert_eq!(dec.sha256, enc.sha256);
            assert_eq!(dec.sha256, sha256_of(&original[..]).unwrap());
            match c {
                Compression::None => assert!(dec.trailer.is_none()),
                _ => assert_eq!(dec.trailer.unwrap().sha256, enc.sha256),
            }
        }
    }
}
