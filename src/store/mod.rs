//! Where objects live: a small storage interface with a local-directory backend and an S3
//! backend (plus an in-memory one for unit tests).
//!
//! Guarantees every backend gives, and callers rely on:
//! - A put is atomic: no reader ever sees a partly written object, and a put that fails or
//!   is interrupted leaves nothing visible under the key.
//! - A put that returns is durable: fsynced file and directory locally, a confirmed PUT or
//!   multipart completion on S3 (with a checksum the server verifies).
//! - [`PutMode::Create`] never replaces an existing object; it reports
//!   [`PutOutcome::AlreadyExists`] instead. Servers differ in how they honour conditional
//!   writes, so callers still compare content after a conflict.
//! - [`StoreError::NotFound`] means the object is definitely absent: a missing bucket,
//!   refused credentials or an unreachable server are other errors, because
//!   `restore_command` turns "not found" into "end of the archive".

pub mod key;
pub mod local;
pub mod memory;
pub mod s3;

use std::collections::BTreeMap;
use std::io::{Read, Write};

pub use key::ObjectKey;

/// Free-form metadata stored with an object (S3 user metadata, extended attributes locally).
pub type Metadata = BTreeMap<String, String>;

/// How a put treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Store only if nothing is there yet.
    Create,
    /// Replace whatever is there.
    Overwrite,
}

/// Options of one put.
#[derive(Debug, Clone)]
pub struct PutOptions {
    /// Create or overwrite.
    pub mode: PutMode,
    /// Metadata to store with the object.
    pub metadata: Metadata,
}

/// What a finished put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object is stored and durable.
    Stored,
    /// `PutMode::Create` found an object already there; nothing was written.
    AlreadyExists,
}

/// One listed or inspected object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key, relative to the store's root.
    pub key: ObjectKey,
    /// Stored size in bytes.
    pub size: u64,
    /// Its metadata (empty from listings, which do not return it).
    pub metadata: Metadata,
    /// When it was last written, where the backend says (retention uses it to leave a
    /// backup-push in progress alone); `None` when unknown.
    pub modified: Option<std::time::SystemTime>,
}

/// A stored object being read.
pub struct ObjectReader {
    /// Stored size in bytes.
    pub size: u64,
    /// The object's metadata.
    pub metadata: Metadata,
    /// The bytes. Blocking: read it from a blocking thread, never from async code.
    pub body: Box<dyn Read + Send>,
}

/// A put in progress: write the bytes, then `finish` publishes them. Blocking: use it from a
/// blocking thread. Dropping it without `finish` publishes nothing.
pub trait ObjectWriter: Write + Send {
    /// Publishes the object (atomically and durably) and reports what happened.
    fn finish(self: Box<Self>) -> Result<PutOutcome, StoreError>;
}

/// What went wrong in the store. Messages name the object; none carries a secret or a
/// signed URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (and the bucket or directory does).
    #[error("{key} does not exist in the store")]
    NotFound {
        /// The key asked for.
        key: String,
    },
    /// The store itself (bucket or root directory) does not exist.
    #[error("the store {store} does not exist: create it (or mount the file system it is on), or fix WALRS_STORE")]
    StoreMissing {
        /// The store's URL.
        store: String,
    },
    /// Credentials were refused or lack permission.
    #[error("{op} {key} was refused ({detail}): check the credentials and their permissions on the store")]
    Denied {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// The server's error code or message.
        detail: String,
    },
    /// The store could not be reached or kept failing until the retry deadline.
    #[error("{op} {key} failed: {detail}: check that the store is reachable, then retry")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// What the last attempt said.
        detail: String,
    },
    /// A local filesystem operation of the store failed.
    #[error("{op} {path} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else the server answered.
    #[error("{op} {key} failed: {detail}")]
    Other {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// What the server said.
        detail: String,
    },
}

impl StoreError {
    /// Whether trying again later may succeed (the server or network failed, not the request).
    /// A local store's file system can fail that way too when it is a network mount: a stale
    /// NFS handle or a timed-out server, or an I/O error the server's failover clears. Errors
    /// that need someone to act (permissions, a full disk, a read-only mount) are final.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ESTALE | libc::EIO | libc::ETIMEDOUT | libc::EAGAIN | libc::EINTR | libc::ENOLCK)
            ),
            _ => false,
        }
    }
}

/// The configured store: one of the backends. An enum rather than a trait object so each
/// call dispatches statically and backends need no boxing of their futures.
pub enum Store {
    /// A directory on a local or mounted filesystem.
    Local(local::LocalStore),
    /// An S3 bucket and prefix.
    S3(s3::S3Store),
    /// In memory, for unit tests.
    Memory(memory::MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Local($s) => $e,
            Store::S3($s) => $e,
            Store::Memory($s) => $e,
        }
    };
}

impl Store {
    /// A writer for `key`. Call from a blocking thread.
    pub fn writer(&self, key: &ObjectKey, opts: PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        let writer = answered(dispatch!(self, s => s.writer(key, opts)))?;
        Ok(Box::new(Metered::new(writer)))
    }

    /// Opens `key` for reading.
    pub async fn get(&self, key: &ObjectKey) -> Result<ObjectReader, StoreError> {
        let mut reader = answered(dispatch!(self, s => s.get(key).await))?;
        reader.body = Box::new(Metered::new(reader.body));
        Ok(reader)
    }

    /// The whole of a small object (identity records, sentinels, manifests), read without
    /// blocking.
    pub async fn get_bytes(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError> {
        answered(dispatch!(self, s => s.get_bytes(key).await))
    }

    /// Stores a small object from memory. Blocking writers run on a blocking thread.
    pub async fn put_bytes(
        self: &std::sync::Arc<Self>,
        key: &ObjectKey,
        bytes: Vec<u8>,
        opts: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        let store = self.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = store.writer(&key, opts)?;
            w.write_all(&bytes).map_err(|e| into_store_error(e, "write", &key))?;
            w.finish()
        })
        .await
        .expect("the put task panicked")
    }

    /// The last `len` bytes of `key` (fewer if the object is shorter), and the object's whole
    /// size: one request.
    pub async fn get_tail(&self, key: &ObjectKey, len: u64) -> Result<(Vec<u8>, u64), StoreError> {
        answered(dispatch!(self, s => s.get_tail(key, len).await))
    }

    /// Size and metadata of `key`, or `None` when it does not exist.
    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StoreError> {
        answered(dispatch!(self, s => s.head(key).await))
    }

    /// Every object whose key starts with `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        answered(dispatch!(self, s => s.list(prefix).await))
    }

    /// Deletes `key`; deleting a missing object succeeds.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        answered(dispatch!(self, s => s.delete(key).await))
    }

    /// Deletes every key in `keys`, in the order given; missing objects count as deleted.
    /// On S3 one DeleteObjects request per 1000 keys (its limit), so pruning a year of WAL
    /// is a few hundred requests, not a million; elsewhere one delete after another.
    pub async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        match self {
            Store::S3(s) => answered(s.delete_many(keys).await),
            _ => {
                for k in keys {
                    self.delete(k).await?;
                }
                Ok(())
            }
        }
    }

    /// Temporary files of writers that were killed before publishing (local stores only:
    /// S3 never shows an unfinished upload as an object, and its abandoned multipart
    /// uploads are the bucket lifecycle rule's job) untouched for `older_than`: counted, and
    /// removed when `remove`. Returns (files, bytes).
    pub async fn sweep_abandoned(
        &self,
        older_than: std::time::Duration,
        remove: bool,
    ) -> Result<(u64, u64), StoreError> {
        match self {
            Store::Local(s) => answered(s.sweep_abandoned(older_than, remove).await),
            _ => Ok((0, 0)),
        }
    }

    /// Before "not in the archive" is said of `key`: that its folder is there at all. A
    /// local store whose folder is missing is most likely a file system that is not mounted
    /// (its mount point is an empty directory), and a recovery told "not found" would end
    /// there and promote. On S3 the same for a folder with no object in it: a bucket or
    /// prefix that is not the archive (a typo, another environment's settings), where
    /// every name is missing. Transient: a standby asks again, and a recovery aborts after
    /// the retries.
    pub async fn confirm_absent(&self, key: &ObjectKey) -> Result<(), StoreError> {
        answered(match self {
            Store::Local(s) => s.confirm_absent(key).await,
            Store::S3(s) => s.confirm_absent(key).await,
            Store::Memory(_) => Ok(()),
        })
    }

    /// Makes an object that is already there durable before anyone relies on it. Locally a
    /// writer fsyncs its data before it links the object in and fsyncs the directory after:
    /// a writer killed between the two leaves an entry that a crash of the machine can
    /// still take away, though every reader already sees it. On S3 an object that is listed
    /// is durable.
    pub async fn make_durable(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => answered(s.make_durable(key).await),
            _ => Ok(()),
        }
    }

    /// Whether objects named exactly `keys[i]` exist: the first found, in the given order.
    /// Locally a few `stat`s; on S3 one listing of their common prefix, so that probing
    /// every compression costs one request, not one per extension.
    pub async fn find_first(&self, keys: &[ObjectKey]) -> Result<Option<ObjectMeta>, StoreError> {
        match self {
            Store::S3(_) => {
                let prefix = common_prefix(keys);
                let listed = self.list(&prefix).await?;
                Ok(keys.iter().find_map(|k| listed.iter().find(|m| &m.key == k).cloned()))
            }
            _ => {
                for k in keys {
                    if let Some(meta) = self.head(k).await? {
                        return Ok(Some(meta));
                    }
                }
                Ok(None)
            }
        }
    }

    /// The store's URL, for messages and logs.
    pub fn url(&self) -> String {
        dispatch!(self, s => s.url())
    }
}

/// The error and its sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A request the store answered (an object found or definitely absent) is progress for the
/// retry deadline (see [`crate::deadline`]); a failure is not.
fn answered<T>(result: Result<T, StoreError>) -> Result<T, StoreError> {
    if matches!(result, Ok(_) | Err(StoreError::NotFound { .. })) {
        crate::deadline::progress();
    }
    result
}

/// The network rate limit is taken in steps of this many bytes, with progress recorded
/// after each: under a low limit, one large read would otherwise sleep in a single piece
/// for longer than the retry deadline while its bytes have long arrived.
const PACE_STEP: usize = 4 << 10;

/// An object's bytes on their way to or from the store: every read or write records
/// progress for the retry deadline, and is held to the network rate limit when one is set.
struct Metered<T> {
    inner: T,
    limit: Option<&'static crate::ratelimit::Limiter>,
}

impl<T> Metered<T> {
    fn new(inner: T) -> Metered<T> {
        Metered { inner, limit: crate::ratelimit::network() }
    }

    fn moved(&self, n: usize) {
        if n == 0 {
            return;
        }
        crate::deadline::progress();
        if let Some(limit) = self.limit {
            let mut left = n;
            while left > 0 {
                let step = left.min(PACE_STEP);
                limit.take(step);
                left -= step;
                crate::deadline::progress();
            }
        }
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.moved(n);
        Ok(n)
    }
}

impl<W: Write> Write for Metered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.moved(n);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for Metered<Box<dyn ObjectWriter>> {
    fn finish(self: Box<Self>) -> Result<PutOutcome, StoreError> {
        answered(self.inner.finish())
    }
}

/// Whether a read error says the bytes received do not match the checksum the server
/// stored with them (the S3 SDK validates full-object GETs against it). That is a damaged
/// object, not a network failure: retrying would only fetch the same bytes again. The SDK's
/// error type is not public API, so its message is matched.
pub fn is_checksum_mismatch(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.to_string().to_ascii_lowercase().contains("checksum mismatch") {
            return true;
        }
        current = e.source();
    }
    false
}

/// Recovers the [`StoreError`] a writer wrapped into an `io::Error`, or describes the
/// `io::Error` itself.
pub fn into_store_error(err: std::io::Error, op: &'static str, key: &ObjectKey) -> StoreError {
    if err.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        return *err.into_inner().unwrap().downcast::<StoreError>().unwrap();
    }
    StoreError::Io { op, path: key.to_string(), source: err }
}

fn common_prefix(keys: &[ObjectKey]) -> String {
    let mut prefix = keys.first().map(|k| k.as_str()).unwrap_or("");
    for k in keys {
        let same = prefix.bytes().zip(k.as_str().bytes()).take_while(|(a, b)| a == b).count();
        prefix = &prefix[..same];
    }
    prefix.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_of_keys() {
        let keys: Vec<ObjectKey> =
            ["wal_005/A.lz4", "wal_005/A.zst", "wal_005/A"].iter().map(|k| ObjectKey::new(k).unwrap()).collect();
        assert_eq!(common_prefix(&keys), "wal_005/A");
    }

    #[test]
    fn a_network_mounts_passing_failures_are_retried_and_the_rest_are_not() {
        let io = |errno| StoreError::Io {
            op: "read",
            path: "/mnt/store/x".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        for errno in [libc::ESTALE, libc::EIO, libc::ETIMEDOUT] {
            assert!(io(errno).is_transient(), "errno {errno}");
        }
        for errno in [libc::EACCES, libc::ENOSPC, libc::EROFS, libc::ENOENT] {
            assert!(!io(errno).is_transient(), "errno {errno}");
        }
        assert!(!StoreError::Denied { op: "get", key: "k".into(), detail: "403".into() }.is_transient());
    }
}
