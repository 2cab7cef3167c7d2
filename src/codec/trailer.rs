//! The integrity trailer: one skippable frame at the end of every compressed object.
//!
//! Skippable frames (magic `0x184D2A50..=0x184D2A5F`) are defined identically by the lz4
//! and zstd frame formats, and both command-line tools step over them, so `lz4 -d` and
//! `zstd -d` still give back the original bytes exactly. Layout, little-endian:
//!
//! ```text
//! magic u32 = 0x184D2A5E | frame length u32 = 48 |
//! tag [u8; 8] = "WALRS\0\x01\0" | original length u64 | sha256 of the original [u8; 32]
//! ```
//!
//! A trailer at the end, rather than metadata, is what lets a segment stream through
//! compression into a single upload with no second pass over the file, and it travels with
//! the object when an operator copies it between buckets with any tool.

use super::Sha256;

/// The skippable-frame magic wal-rs uses (the lz4/zstd range leaves the choice to us).
pub const MAGIC: u32 = 0x184D_2A5E;
/// Identifies the payload as wal-rs's, version 1.
const TAG: [u8; 8] = *b"WALRS\0\x01\0";
const PAYLOAD_LEN: usize = 8 + 8 + 32;
/// Total bytes the trailer adds to an object.
pub const LEN: usize = 8 + PAYLOAD_LEN;

/// What the trailer records about the original bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Length of the original (uncompressed) file.
    pub original_len: u64,
    /// sha256 of the original file.
    pub sha256: Sha256,
}

impl Trailer {
    /// The trailer's bytes.
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(PAYLOAD_LEN as u32).to_le_bytes());
        out[8..16].copy_from_slice(&TAG);
        out[16..24].copy_from_slice(&self.original_len.to_le_bytes());
        out[24..56].copy_from_slice(&self.sha256.0);
        out
    }

    /// Reads a trailer from the last bytes of an object; `None` when they are not one
    /// (objects written by other tools end with their compressed data).
    pub fn decode(bytes: &[u8]) -> Option<Trailer> {
        if bytes.len() != LEN
            || bytes[0..4] != MAGIC.to_le_bytes()
            || bytes[4..8] != (PAYLOAD_LEN as u32).to_le_bytes()
            || bytes[8..16] != TAG
        {
            return None;
        }
        Some(Trailer {
            original_len: u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
            sha256: Sha256(bytes[24..56].try_into().unwrap()),
        })
    }

    /// Whether a tail that [`Trailer::decode`] refused is still recognisably wal-rs's
    /// trailer: it carries the tag, or the exact magic and frame length. Such a tail is a
    /// damaged (or newer) trailer, not another tool's compressed data. Passing it on as data
    /// would be wrong twice over: a zstd decoder steps over any skippable frame, so the
    /// object would decode with nothing left to check it against. One flipped bit in any of
    /// the three fields leaves the other two intact, so it is always caught here.
    pub fn looks_damaged(bytes: &[u8]) -> bool {
        bytes.len() == LEN
            && Trailer::decode(bytes).is_none()
            && (bytes[8..14] == TAG[..6]
                || (bytes[0..4] == MAGIC.to_le_bytes() && bytes[4..8] == (PAYLOAD_LEN as u32).to_le_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trips_and_rejects_other_bytes() {
        let t = Trailer { original_len: 16 << 20, sha256: Sha256([7; 32]) };
        assert_eq!(Trailer::decode(&t.encode()), Some(t));
        let mut other = t.encode();
        other[10] ^= 1;
        assert_eq!(Trailer::decode(&other), None);
        assert_eq!(Trailer::decode(&t.encode()[1..]), None);
    }

    #[test]
    fn one_flipped_bit_in_the_fixed_fields_reads_as_a_damaged_trailer() {
        let good = Trailer { original_len: 16 << 20, sha256: Sha256([7; 32]) }.encode();
        assert!(!Trailer::looks_damaged(&good));
        for byte in 0..16 {
            for bit in 0..8 {
                let mut flipped = good;
                flipped[byte] ^= 1 << bit;
                assert!(Trailer::looks_damaged(&flipped), "byte {byte} bit {bit}");
            }
        }
        // Another tool's data, even one ending in a skippable frame of its own, is not ours.
        let mut foreign = [0x55u8; LEN];
        assert!(!Trailer::looks_damaged(&foreign));
        foreign[0..4].copy_from_slice(&0x184D_2A50u32.to_le_bytes());
        foreign[4..8].copy_from_slice(&48u32.to_le_bytes());
        assert!(!Trailer::looks_damaged(&foreign));
    }
}
