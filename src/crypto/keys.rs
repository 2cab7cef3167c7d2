//! Keys and key rings: parsing, ids, and keeping key bytes out of logs.

use std::fmt;

use sha2::{Digest, Sha256};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;

/// A key's public name: the first 8 bytes of a hash of the key. Safe to log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One 32-byte key. Its bytes are never printed (`Debug` shows the id only) and are zeroed
/// when dropped.
#[derive(Clone)]
pub struct Key {
    bytes: [u8; KEY_LEN],
    id: KeyId,
}

impl Key {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        let digest = Sha256::new().chain_update(b"wal-rs key id v1\0").chain_update(bytes).finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Key { bytes, id: KeyId(id) }
    }

    /// Parses a key written as 64 hex digits or as base64 of 32 bytes. The error never
    /// repeats the input (it is a secret, even when malformed).
    pub fn parse(text: &str) -> Result<Key, String> {
        let text = text.trim();
        let mut bytes = [0u8; KEY_LEN];
        if text.len() == 2 * KEY_LEN && hex::decode_to_slice(text, &mut bytes).is_ok() {
            return Ok(Key::from_bytes(bytes));
        }
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(v) if v.len() == KEY_LEN => {
                bytes.copy_from_slice(&v);
                Ok(Key::from_bytes(bytes))
            }
            Ok(v) => Err(format!(
                "an encryption key must be 32 bytes (64 hex digits or base64), this one has {} bytes: \
                 generate one with `openssl rand -hex 32`",
                v.len()
            )),
            Err(_) => Err(format!(
                "an encryption key must be 64 hex digits or base64 of 32 bytes (got {} characters): \
                 generate one with `openssl rand -hex 32`",
                text.len()
            )),
        }
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.id)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // Volatile writes so the compiler cannot drop the wipe of memory about to be freed.
        for b in self.bytes.iter_mut() {
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// The keys of a store: the first seals new objects, all of them open objects.
#[derive(Clone, Debug)]
pub struct KeyRing {
    keys: Vec<Key>,
    /// Whether objects that are not sealed are read (stored before encryption was turned
    /// on). Off by default: otherwise whoever can write the bucket could swap a sealed
    /// object for a plain one.
    plaintext_allowed: bool,
}

impl KeyRing {
    /// A ring of `keys`, the first one active. `None` when empty.
    pub fn new(keys: Vec<Key>) -> Option<KeyRing> {
        (!keys.is_empty()).then_some(KeyRing { keys, plaintext_allowed: false })
    }

    /// The same ring, reading objects that are not sealed when `allowed`.
    pub fn allow_plaintext(mut self, allowed: bool) -> KeyRing {
        self.plaintext_allowed = allowed;
        self
    }

    /// Whether objects that are not sealed are read.
    pub fn plaintext_allowed(&self) -> bool {
        self.plaintext_allowed
    }

    /// Parses a key file: one key per line, the first for new objects; blank lines and
    /// lines starting with `#` are ignored. `what` names the source in errors.
    pub fn parse_file(text: &str, what: &str) -> Result<KeyRing, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(Key::parse(line).map_err(|e| format!("{what} line {}: {e}", n + 1))?);
        }
        KeyRing::new(keys).ok_or_else(|| format!("{what} holds no key: put one per line (`openssl rand -hex 32`)"))
    }

    /// The key that seals new objects.
    pub fn active(&self) -> &Key {
        &self.keys[0]
    }

    /// The key with this id.
    pub fn find(&self, id: KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The ids of every key, active first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn keys_parse_from_hex_and_base64_to_the_same_id() {
        let a = Key::parse(HEX).unwrap();
        let b = Key::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.bytes(), b.bytes());
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        for bad in ["secretsecret", &HEX[..62], "c2hvcnQ="] {
            let e = Key::parse(bad).unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
        assert!(!format!("{:?}", Key::parse(HEX).unwrap()).contains("0102"));
    }

    #[test]
    fn a_key_file_lists_keys_active_first() {
        let other = "ff".repeat(32);
        let ring = KeyRing::parse_file(&format!("# new\n{other}\n\n{HEX}\n"), "keys").unwrap();
        assert_eq!(ring.active().id(), Key::parse(&other).unwrap().id());
        assert!(ring.find(Key::parse(HEX).unwrap().id()).is_some());
        assert!(KeyRing::parse_file("# nothing\n", "keys").is_err());
        assert!(KeyRing::parse_file("zz\n", "keys").unwrap_err().contains("keys line 1"));
    }
}
