//! Sealing and opening streams chunk by chunk, with memory bounded by one chunk.

use std::io::{self, Cursor, Read, Write};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;

use super::format::{Header, CHUNK_LOG2, HEADER_LEN, MAGIC, NONCE_PREFIX_LEN, TAG_LEN, VERSION};
use super::keys::{Key, KeyId, KeyRing};
use crate::codec::encode::read_full;

/// Why a sealed object cannot be opened before reading its body.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Reading the stored bytes failed.
    #[error("reading failed: {0}")]
    Source(#[source] io::Error),
    /// The object is sealed but no key is configured.
    #[error("the object is encrypted (key id {0}) but no encryption key is configured: set WALRS_ENCRYPTION_KEY_FILE")]
    NoKey(KeyId),
    /// The object is sealed with a key that is not in the ring.
    #[error("the object is encrypted with key id {found}, which is not among the configured keys ({have}): add that key to the key file")]
    UnknownKey {
        /// The object's key id.
        found: KeyId,
        /// The configured ids.
        have: String,
    },
    /// The header is damaged.
    #[error("{0}")]
    BadHeader(String),
    /// Encryption is configured and the object is not sealed: it may have been replaced.
    #[error("the object is not encrypted but encryption is configured, so it may have been replaced: if it was stored before encryption was turned on, set encryption_allow_plaintext = true")]
    NotSealed,
}

fn cipher(key: &Key) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.bytes().into())
}

/// A writer that seals what it is given into `inner`: the header first, then full chunks as
/// they fill, then the last chunk at [`Sealer::finish`]. Dropping it without `finish`
/// leaves an object that will not open, never one that opens short.
pub struct Sealer<W: Write> {
    inner: W,
    encryptor: Option<EncryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    buf: Vec<u8>,
    chunk: usize,
}

impl<W: Write> Sealer<W> {
    /// Starts a sealed object in `inner` with `key` and a fresh random nonce prefix, bound to
    /// `binding`: the key the object is published under, relative to the store's root (the
    /// final key, not a temporary one). Opened under any other binding, it fails
    /// authentication.
    pub fn new(key: &Key, binding: &str, inner: W) -> io::Result<Self> {
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        getrandom::getrandom(&mut nonce_prefix).map_err(|e| io::Error::other(e.to_string()))?;
        let header = Header { version: VERSION, key_id: key.id(), chunk_log2: CHUNK_LOG2, nonce_prefix };
        Self::with_header(key, header, binding, inner)
    }

    /// Starts a sealed object with `header` as given (its version decides whether `binding`
    /// is authenticated).
    fn with_header(key: &Key, header: Header, binding: &str, mut inner: W) -> io::Result<Self> {
        inner.write_all(&header.encode())?;
        let encryptor = EncryptorBE32::from_aead(cipher(key), (&header.nonce_prefix).into());
        let chunk = header.chunk_size();
        let aad = header.aad(binding);
        Ok(Sealer { inner, encryptor: Some(encryptor), aad, buf: Vec::with_capacity(chunk + TAG_LEN), chunk })
    }

    /// Seals the last chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let encryptor = self.encryptor.take().ok_or_else(|| io::Error::other("sealer already failed"))?;
        encryptor.encrypt_last_in_place(&self.aad, &mut self.buf).map_err(|_| io::Error::other("sealing failed"))?;
        self.inner.write_all(&self.buf)?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn seal_full_chunk(&mut self) -> io::Result<()> {
        let encryptor = self.encryptor.as_mut().ok_or_else(|| io::Error::other("sealer already finished"))?;
        encryptor.encrypt_next_in_place(&self.aad, &mut self.buf).map_err(|_| io::Error::other("sealing failed"))?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            // A full chunk is sealed only once more data arrives: the last chunk must be
            // sealed as the last, which only `finish` knows.
            if self.buf.len() == self.chunk {
                self.seal_full_chunk()?;
            }
            let take = (self.chunk - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that seals when a key is given and passes bytes through otherwise.
pub enum Sealing<W: Write> {
    /// No encryption.
    Plain(W),
    /// Sealed with a key.
    Sealed(Sealer<W>),
}

impl<W: Write> Sealing<W> {
    /// Seals into `inner` with `key`, bound to `binding` (see [`Sealer::new`]), or passes
    /// through unchanged when `key` is `None`.
    pub fn new(key: Option<&Key>, binding: &str, inner: W) -> io::Result<Self> {
        Ok(match key {
            Some(k) => Sealing::Sealed(Sealer::new(k, binding, inner)?),
            None => Sealing::Plain(inner),
        })
    }

    /// Ends the object and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealing::Plain(w) => Ok(w),
            Sealing::Sealed(s) => s.finish(),
        }
    }
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Plain(w) => w.write(data),
            Sealing::Sealed(s) => s.write(data),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Plain(w) => w.flush(),
            Sealing::Sealed(s) => s.flush(),
        }
    }
}

/// The error a damaged or cut sealed body reads as: `InvalidData`, never a short success.
fn tampered(detail: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "encrypted object failed authentication ({detail}): it was altered, cut short, or copied from another key"
        ),
    )
}

/// A reader that opens a sealed body chunk by chunk. Each chunk is authenticated before any
/// of its bytes are returned; the end of the input is accepted only after a chunk sealed
/// as the last.
pub struct Opener<R: Read> {
    src: R,
    decryptor: Option<DecryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    chunk: usize,
    /// Ciphertext being read, then the plaintext of the current chunk after opening.
    buf: Vec<u8>,
    /// Read position in `buf` once it holds plaintext.
    pos: usize,
    /// One byte read past a full chunk: it proves that chunk was not the last.
    carry: Option<u8>,
    done: bool,
    /// A chunk failed to read or to open: `buf` may hold ciphertext and the source sits
    /// mid-chunk, so every later read fails too rather than return those bytes.
    failed: bool,
}

impl<R: Read> Opener<R> {
    fn new(key: &Key, header: Header, binding: &str, src: R) -> Self {
        let decryptor = DecryptorBE32::from_aead(cipher(key), (&header.nonce_prefix).into());
        let chunk = header.chunk_size();
        Opener {
            src,
            decryptor: Some(decryptor),
            aad: header.aad(binding),
            chunk,
            buf: Vec::with_capacity(chunk + TAG_LEN + 1),
            pos: 0,
            carry: None,
            done: false,
            failed: false,
        }
    }

    /// Enters the failed state for good, dropping whatever `buf` holds.
    fn fail(&mut self) {
        self.failed = true;
        self.buf.clear();
        self.pos = 0;
        self.decryptor = None;
    }

    /// Reads and opens the next chunk into `buf`.
    fn next_chunk(&mut self) -> io::Result<()> {
        let sealed_len = self.chunk + TAG_LEN;
        self.buf.clear();
        self.pos = 0;
        self.buf.extend(self.carry.take());
        // Read one byte more than a full chunk: whether it comes says if this is the last.
        let want = sealed_len + 1;
        let start = self.buf.len();
        self.buf.resize(want, 0);
        let filled = start + read_full(&mut self.src, &mut self.buf[start..])?;
        self.buf.truncate(filled);
        if filled == want {
            self.carry = self.buf.pop();
            let d = self.decryptor.as_mut().ok_or_else(|| tampered("read past the end"))?;
            d.decrypt_next_in_place(&self.aad, &mut self.buf).map_err(|_| tampered("a chunk does not authenticate"))
        } else {
            if filled < TAG_LEN {
                return Err(tampered("the last chunk is missing"));
            }
            let d = self.decryptor.take().ok_or_else(|| tampered("read past the end"))?;
            d.decrypt_last_in_place(&self.aad, &mut self.buf)
                .map_err(|_| tampered("the last chunk does not authenticate"))?;
            self.done = true;
            Ok(())
        }
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.failed {
                return Err(tampered("an earlier read of this object failed"));
            }
            if self.done {
                return Ok(0);
            }
            if let Err(e) = self.next_chunk() {
                // read_full retries Interrupted itself, so any error here left the chunk
                // half-read: nothing after it can be trusted.
                self.fail();
                return Err(e);
            }
        }
        let n = (self.buf.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Stored bytes, opened when sealed and passed through when not.
pub enum Unsealed<R: Read> {
    /// Not sealed: the bytes as stored (the peeked bytes put back in front).
    Plain(io::Chain<Cursor<Vec<u8>>, R>),
    /// Sealed: the opened bytes.
    Sealed(Box<Opener<R>>),
}

impl<R: Read> Unsealed<R> {
    /// Whether the object was sealed.
    pub fn was_sealed(&self) -> bool {
        matches!(self, Unsealed::Sealed(_))
    }
}

impl<R: Read> Read for Unsealed<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Unsealed::Plain(r) => r.read(out),
            Unsealed::Sealed(r) => r.read(out),
        }
    }
}

/// Looks at the first bytes of `src`: a sealed object is opened with the matching key of
/// `ring`, anything else passes through unchanged. `binding` is the key the object was read
/// from, relative to the store's root: a version 2 object sealed under another key fails
/// authentication as its first chunk is read (version 1 objects carry no binding).
pub fn unseal<R: Read>(mut src: R, ring: Option<&KeyRing>, binding: &str) -> Result<Unsealed<R>, OpenError> {
    let mut head = vec![0u8; MAGIC.len()];
    let n = read_full(&mut src, &mut head).map_err(OpenError::Source)?;
    head.truncate(n);
    if head != MAGIC {
        return match ring {
            Some(r) if !r.plaintext_allowed() => Err(OpenError::NotSealed),
            _ => Ok(Unsealed::Plain(Cursor::new(head).chain(src))),
        };
    }
    head.resize(HEADER_LEN, 0);
    let n = read_full(&mut src, &mut head[MAGIC.len()..]).map_err(OpenError::Source)?;
    let header = Header::decode(&head[..MAGIC.len() + n]).map_err(OpenError::BadHeader)?;
    let ring = ring.ok_or(OpenError::NoKey(header.key_id))?;
    let key = ring.find(header.key_id).ok_or_else(|| OpenError::UnknownKey {
        found: header.key_id,
        have: ring.ids().iter().map(|id| id.to_string()).collect::<Vec<_>>().join(", "),
    })?;
    Ok(Unsealed::Sealed(Box::new(Opener::new(key, header, binding, src))))
}

/// Seals a small object held in memory (a manifest) when `key` is given, bound to `binding`
/// (see [`Sealer::new`]).
pub fn seal_bytes(key: Option<&Key>, binding: &str, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = Sealing::new(key, binding, Vec::with_capacity(bytes.len() + HEADER_LEN + TAG_LEN))?;
    s.write_all(bytes)?;
    s.finish()
}

/// Opens a small object held in memory, sealed or not, read from the key `binding` (see
/// [`unseal`]). The error is one line; a body that fails authentication is `BadHeader`.
pub fn open_bytes(ring: Option<&KeyRing>, binding: &str, bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
    let mut out = Vec::with_capacity(bytes.len());
    unseal(bytes, ring, binding)?.read_to_end(&mut out).map_err(|e| OpenError::BadHeader(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes([b; 32])
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// The key the tests' objects are stored under.
    const AT: &str = "wal_005/000000010000000000000003.lz4";

    fn seal(k: &Key, data: &[u8]) -> Vec<u8> {
        seal_bytes(Some(k), AT, data).unwrap()
    }

    /// `data` sealed as wal-rs before the binding did (format version 1).
    fn seal_unbound(k: &Key, data: &[u8]) -> Vec<u8> {
        let header = Header {
            version: crate::crypto::format::VERSION_UNBOUND,
            key_id: k.id(),
            chunk_log2: CHUNK_LOG2,
            nonce_prefix: [4; NONCE_PREFIX_LEN],
        };
        let mut s = Sealer::with_header(k, header, "ignored by version 1", Vec::new()).unwrap();
        s.write_all(data).unwrap();
        s.finish().unwrap()
    }

    #[test]
    fn round_trips_at_every_chunk_boundary() {
        let k = key(1);
        let ring = KeyRing::new(vec![k.clone()]).unwrap();
        let c = 1 << CHUNK_LOG2;
        for len in [0, 1, c - 1, c, c + 1, 3 * c, 3 * c + 7] {
            let data = sample(len);
            let sealed = seal(&k, &data);
            assert_eq!(sealed.len(), HEADER_LEN + len + TAG_LEN * len.div_ceil(c).max(1), "len {len}");
            if len > 0 {
                assert_ne!(&sealed[HEADER_LEN..HEADER_LEN + len.min(64)], &data[..len.min(64)]);
            }
            assert_eq!(open_bytes(Some(&ring), AT, &sealed).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn two_seals_of_the_same_bytes_differ() {
        let k = key(1);
        assert_ne!(seal(&k, b"same"), seal(&k, b"same"));
    }

    #[test]
    fn plain_bytes_pass_through_only_when_allowed() {
        let strict = KeyRing::new(vec![key(1)]).unwrap();
        let lenient = strict.clone().allow_plaintext(true);
        for data in [&b""[..], b"abc", b"WALRSEN", &sample(100_000)] {
            assert_eq!(open_bytes(Some(&lenient), AT, data).unwrap(), data);
            assert_eq!(open_bytes(None, AT, data).unwrap(), data);
            assert!(matches!(open_bytes(Some(&strict), AT, data), Err(OpenError::NotSealed)));
        }
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_refused() {
        let k = key(2);
        let ring = KeyRing::new(vec![k.clone()]).unwrap();
        let c = 1 << CHUNK_LOG2;
        let sealed = seal(&k, &sample(2 * c + 100));
        let sealed_len = c + TAG_LEN;
        // Cuts at chunk boundaries (the dangerous ones) and elsewhere.
        for cut in [HEADER_LEN, HEADER_LEN + 5, HEADER_LEN + sealed_len, HEADER_LEN + 2 * sealed_len, sealed.len() - 1]
        {
            assert!(open_bytes(Some(&ring), AT, &sealed[..cut]).is_err(), "cut at {cut}");
        }
        for pos in [0usize, 9, 15, 25, HEADER_LEN, HEADER_LEN + c, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x10;
            assert!(open_bytes(Some(&ring), AT, &bad).is_err(), "flip at {pos}");
        }
        // Chunks swapped.
        let mut swapped = sealed[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&sealed[HEADER_LEN + sealed_len..HEADER_LEN + 2 * sealed_len]);
        swapped.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + sealed_len]);
        swapped.extend_from_slice(&sealed[HEADER_LEN + 2 * sealed_len..]);
        assert!(open_bytes(Some(&ring), AT, &swapped).is_err());
    }

    #[test]
    fn reads_after_a_failed_chunk_keep_failing() {
        let k = key(5);
        let ring = KeyRing::new(vec![k.clone()]).unwrap();
        let c = 1 << CHUNK_LOG2;
        let mut sealed = seal(&k, &sample(2 * c));
        sealed[HEADER_LEN + 3] ^= 0x01;
        let mut opened = unseal(&sealed[..], Some(&ring), AT).unwrap();
        let mut out = vec![0u8; 4 * c];
        assert!(opened.read(&mut out).is_err());
        for _ in 0..3 {
            let again = opened.read(&mut out);
            assert!(again.is_err(), "a read after a failure returned {again:?}");
        }
    }

    #[test]
    fn missing_and_wrong_keys_are_named_by_id() {
        let sealed = seal(&key(3), b"secret rows");
        let e = open_bytes(None, AT, &sealed).unwrap_err();
        assert!(matches!(e, OpenError::NoKey(id) if id == key(3).id()), "{e}");
        let other = KeyRing::new(vec![key(4)]).unwrap();
        let e = open_bytes(Some(&other), AT, &sealed).unwrap_err();
        assert!(e.to_string().contains(&key(3).id().to_string()) && e.to_string().contains(&key(4).id().to_string()));
        // Rotation: the old key after the new one still opens old objects.
        let rotated = KeyRing::new(vec![key(4), key(3)]).unwrap();
        assert_eq!(open_bytes(Some(&rotated), AT, &sealed).unwrap(), b"secret rows");
    }

    #[test]
    fn an_object_opens_only_under_the_key_it_was_sealed_for() {
        let k = key(6);
        let ring = KeyRing::new(vec![k.clone()]).unwrap();
        let c = 1 << CHUNK_LOG2;
        for len in [0, 10, 2 * c + 5] {
            let data = sample(len);
            let sealed = seal(&k, &data);
            assert_eq!(sealed[8], 2, "new objects are written in version 2");
            assert_eq!(open_bytes(Some(&ring), AT, &sealed).unwrap(), data);
            for other in ["wal_005/000000020000000000000003.lz4", "wal_005/000000010000000000000003", ""] {
                // Authentication fails (damage), not the key lookup: the key is right.
                let e = open_bytes(Some(&ring), other, &sealed).unwrap_err();
                assert!(matches!(e, OpenError::BadHeader(_)), "len {len} under {other:?}: {e}");
                assert!(e.to_string().contains("failed authentication"), "{e}");
            }
        }
    }

    #[test]
    fn version_1_objects_still_open_under_any_key() {
        let k = key(7);
        let ring = KeyRing::new(vec![k.clone()]).unwrap();
        let data = sample(3 * (1 << CHUNK_LOG2) + 11);
        let sealed = seal_unbound(&k, &data);
        assert_eq!(sealed[8], 1);
        for binding in [AT, "basebackups_005/base_x/tar_partitions/part_001.tar.lz4", ""] {
            assert_eq!(open_bytes(Some(&ring), binding, &sealed).unwrap(), data, "under {binding:?}");
        }
        // Still authenticated: a flipped byte is refused.
        let mut bad = sealed.clone();
        bad[HEADER_LEN + 1] ^= 1;
        assert!(matches!(open_bytes(Some(&ring), AT, &bad), Err(OpenError::BadHeader(_))));
    }

    #[test]
    fn a_newer_format_version_asks_for_an_upgrade() {
        let k = key(8);
        let ring = KeyRing::new(vec![k.clone()]).unwrap();
        let mut sealed = seal(&k, b"from the future");
        sealed[8] = 3;
        let e = open_bytes(Some(&ring), AT, &sealed).unwrap_err();
        assert!(matches!(e, OpenError::BadHeader(_)) && e.to_string().contains("upgrade wal-rs"), "{e}");
    }
}
