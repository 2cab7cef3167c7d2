//! The sealed object format.
//!
//! ```text
//! header (40 bytes):
//!   magic "WALRSENC" | version 2 | log2(chunk size) | 2 reserved zero bytes | key id (8)
//!   | nonce prefix (19 random bytes) | 1 reserved zero byte
//! associated data of every chunk (version 2):
//!   header (40) | binding length (u64 little-endian) | binding (UTF-8): the object's key
//!   relative to the store's root, e.g. `wal_005/000000010000000000000003.lz4`
//! chunks: XChaCha20-Poly1305 STREAM (big-endian 32-bit counter, last-chunk flag):
//!   every chunk but the last holds exactly `chunk size` bytes plus a 16-byte tag; the last
//!   holds 0..=`chunk size` bytes plus its tag and is sealed as the last, so cutting the
//!   object at a chunk boundary fails to open just like cutting it anywhere else.
//! ```
//!
//! The binding ties an object to its name: a sealed object copied or renamed to another key
//! (timeline 2's history file over timeline 3's, a partition of another backup) fails
//! authentication instead of restoring the wrong content. Version 1 objects, written before
//! the binding existed, authenticate the header alone: they are still read, under any key,
//! until rewritten.

use super::keys::KeyId;

/// The first bytes of every sealed object.
pub const MAGIC: [u8; 8] = *b"WALRSENC";
/// Length of the header.
pub const HEADER_LEN: usize = 40;
/// Length of the STREAM nonce prefix for XChaCha20 (24-byte nonce minus 5 bytes of counter
/// and flag).
pub const NONCE_PREFIX_LEN: usize = 19;
/// Bytes of authentication tag per chunk.
pub const TAG_LEN: usize = 16;
/// log2 of the chunk size written: 64 KiB keeps the reader's buffer small and the tag
/// overhead at 0.02%.
pub const CHUNK_LOG2: u8 = 16;
/// The version written: the associated data binds the object's key.
pub const VERSION: u8 = 2;
/// The first version: the associated data is the header alone, with no binding. Read only.
pub const VERSION_UNBOUND: u8 = 1;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format version: [`VERSION`] or [`VERSION_UNBOUND`].
    pub version: u8,
    /// The key that sealed the object.
    pub key_id: KeyId,
    /// log2 of the chunk size.
    pub chunk_log2: u8,
    /// The per-object random nonce prefix.
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl Header {
    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> usize {
        1 << self.chunk_log2
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = self.version;
        out[9] = self.chunk_log2;
        out[12..20].copy_from_slice(&self.key_id.0);
        out[20..20 + NONCE_PREFIX_LEN].copy_from_slice(&self.nonce_prefix);
        out
    }

    /// The associated data of every chunk of an object with this header stored under the key
    /// `binding`: the header, then (from version 2) the binding, prefixed by its length so
    /// that no other header and binding give the same bytes.
    pub fn aad(&self, binding: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(HEADER_LEN + 8 + binding.len());
        aad.extend_from_slice(&self.encode());
        if self.version != VERSION_UNBOUND {
            aad.extend_from_slice(&(binding.len() as u64).to_le_bytes());
            aad.extend_from_slice(binding.as_bytes());
        }
        aad
    }

    /// Parses a header; the error says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Header, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("the encryption header is cut short ({} of {HEADER_LEN} bytes)", bytes.len()));
        }
        if bytes[..8] != MAGIC {
            return Err("not a wal-rs encrypted object".into());
        }
        if bytes[8] != VERSION && bytes[8] != VERSION_UNBOUND {
            return Err(format!("encryption format version {} is not one this wal-rs reads: upgrade wal-rs", bytes[8]));
        }
        // Chunks from 1 KiB to 16 MiB: anything else is damage, and must not make the reader
        // allocate without bound.
        if !(10..=24).contains(&bytes[9]) {
            return Err(format!("chunk size 2^{} is out of range", bytes[9]));
        }
        if bytes[10..12] != [0, 0] || bytes[HEADER_LEN - 1] != 0 {
            return Err("reserved header bytes are not zero".into());
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[12..20]);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(&bytes[20..20 + NONCE_PREFIX_LEN]);
        Ok(Header { version: bytes[8], key_id: KeyId(key_id), chunk_log2: bytes[9], nonce_prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u8) -> Header {
        Header { version, key_id: KeyId([7; 8]), chunk_log2: CHUNK_LOG2, nonce_prefix: [9; NONCE_PREFIX_LEN] }
    }

    #[test]
    fn headers_round_trip_and_damage_is_named() {
        let h = header(VERSION);
        let bytes = h.encode();
        assert_eq!(bytes[8], 2);
        assert_eq!(Header::decode(&bytes), Ok(h));
        assert_eq!(Header::decode(&header(VERSION_UNBOUND).encode()), Ok(header(VERSION_UNBOUND)));
        assert!(Header::decode(&bytes[..30]).unwrap_err().contains("cut short"));
        let mut v = bytes;
        v[8] = 3;
        let refused = Header::decode(&v).unwrap_err();
        assert!(refused.contains("version 3") && refused.contains("upgrade wal-rs"), "{refused}");
        let mut v = bytes;
        v[9] = 40;
        assert!(Header::decode(&v).unwrap_err().contains("out of range"));
    }

    #[test]
    fn the_associated_data_binds_the_key_from_version_2_only() {
        let bound = header(VERSION);
        let aad = bound.aad("wal_005/00000002.history.lz4");
        assert_eq!(&aad[..HEADER_LEN], &bound.encode());
        assert_eq!(&aad[HEADER_LEN..HEADER_LEN + 8], &28u64.to_le_bytes());
        assert_eq!(&aad[HEADER_LEN + 8..], b"wal_005/00000002.history.lz4");
        assert_ne!(aad, bound.aad("wal_005/00000003.history.lz4"));
        assert_ne!(bound.aad("a"), bound.aad("ab"));
        let unbound = header(VERSION_UNBOUND);
        assert_eq!(unbound.aad("anything"), unbound.encode().to_vec());
        assert_eq!(unbound.aad("anything"), unbound.aad("something else"));
    }
}
