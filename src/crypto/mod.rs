//! Client-side encryption: every object wal-rs writes (WAL, partitions, manifests) can be
//! compressed and then sealed with XChaCha20-Poly1305 in the STREAM construction, so that a
//! tampered, truncated or reordered object is detected and never restored. Each object is
//! bound to the key it is stored under, so one copied over another name (another timeline's
//! history file, another backup's partition) is refused the same way. Objects sealed before
//! the binding (format version 1) are still read, and are bound to no name until rewritten.
//!
//! Keys are 32 random bytes. The first key of the ring seals new objects; every key of the
//! ring opens them, which is how keys rotate: put the new key first, keep the old ones
//! after it until nothing sealed with them is retained. Each object names its key by a
//! short id (a hash of the key, not the key), so a missing key is a clear error.
//!
//! The format is in [`format`]; the streaming reader and writer in [`stream`].

pub mod format;
pub mod keys;
pub mod stream;

use std::sync::{Arc, OnceLock};

pub use format::{Header, HEADER_LEN, MAGIC};
pub use keys::{Key, KeyId, KeyRing};
pub use stream::{open_bytes, seal_bytes, OpenError, Opener, Sealer, Sealing};

/// The process's key ring, set once by the command runner from the configuration.
static RING: OnceLock<Option<Arc<KeyRing>>> = OnceLock::new();

/// Sets the key ring for this process (first call wins; later calls are ignored, as the
/// configuration is resolved once per process).
pub fn configure(ring: Option<Arc<KeyRing>>) {
    let _ = RING.set(ring);
}

/// The configured key ring, if any.
pub fn ring() -> Option<Arc<KeyRing>> {
    RING.get().cloned().flatten()
}

/// The key new objects are sealed with, if encryption is configured.
pub fn sealing_key() -> Option<Key> {
    ring().map(|r| r.active().clone())
}
