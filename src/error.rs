//! The crate's error: what failed, on which object, and what to do. Each variant maps to
//! one documented exit code in [`crate::exit`]; messages are one line.

use std::io;

use crate::codec::Sha256;
use crate::store::StoreError;

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The configuration is missing or malformed.
    #[error("{0}")]
    Config(String),
    /// The file handed to wal-push is not something wal-rs archives.
    #[error("refusing {path}: {reason}")]
    InvalidInput {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Different content is already stored under the name; nothing was overwritten.
    #[error("{name} is already archived with different content (stored sha256 {stored}, this file's {local}); the stored object was left as is: check whether two clusters archive into {store}")]
    Conflict {
        /// The WAL file name.
        name: String,
        /// sha256 of what is stored.
        stored: Sha256,
        /// sha256 of the file being pushed.
        local: Sha256,
        /// The store.
        store: String,
    },
    /// The segment belongs to another cluster than the one the store records.
    #[error("{name} comes from cluster {segment_sysid} but {store} belongs to cluster {store_sysid}: give each cluster its own store prefix")]
    ClusterMismatch {
        /// The WAL file name.
        name: String,
        /// The segment's system identifier.
        segment_sysid: u64,
        /// The store's.
        store_sysid: u64,
        /// The store.
        store: String,
    },
    /// The cluster is the store's, but its PostgreSQL major version or WAL segment size is
    /// not the one the store records (a pg_upgrade'd cluster archiving into the old prefix).
    #[error("{name} comes from {found} but {store} holds the archive of {recorded}: archive each PostgreSQL major version into its own store prefix")]
    VersionMismatch {
        /// The WAL file name, or "this backup".
        name: String,
        /// "PostgreSQL 16, 16 MiB segments".
        found: String,
        /// The same, as recorded in the store.
        recorded: String,
        /// The store.
        store: String,
    },
    /// The WAL file is not in the archive (the only error wal-fetch reports as exit 1
    /// outside a standby).
    #[error("{name} is not in the archive {store}")]
    WalNotFound {
        /// The WAL file name.
        name: String,
        /// The store.
        store: String,
    },
    /// Something else asked for does not exist (a backup, for instance).
    #[error("{0}")]
    NotFound(String),
    /// A storage operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored object is damaged or fails its checksum.
    #[error("{key} is corrupt: {detail}: it cannot be used; restore it from another copy or take a new backup")]
    Corrupt {
        /// The object.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The object uses a compression wal-rs cannot read.
    #[error("{key} uses a compression wal-rs cannot read: recompress it as lz4 or zstd")]
    Unsupported {
        /// The object.
        key: String,
    },
    /// An encrypted object cannot be opened with the configured keys (or an object is not
    /// encrypted when encryption is required).
    #[error("cannot open {key}: {detail}")]
    Key {
        /// The object.
        key: String,
        /// What is wrong, naming key ids (never keys).
        detail: String,
    },
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Something did not happen within its deadline.
    #[error("{0}")]
    Timeout(String),
    /// A local file could not be read or written.
    #[error("cannot {op} {path}: {source}")]
    LocalIo {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Whether retrying the whole operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_transient())
    }

    /// A local I/O error on `path`.
    pub fn local(op: &'static str, path: &std::path::Path, source: io::Error) -> Error {
        Error::LocalIo { op, path: path.display().to_string(), source }
    }
}
