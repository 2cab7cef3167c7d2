//! The exit codes, in one table. `docs/exit-codes.md` mirrors it; scripts may rely on it.
//!
//! wal-fetch follows PostgreSQL's restore_command contract: 1 means "this file is not in the
//! archive" (or, in a standby, "not now, ask again"). Any other failure outside a standby
//! exits with 200 plus the code below, above 125, so that PostgreSQL aborts the recovery
//! instead of taking the failure for the end of the archive.

use crate::error::Error;
use crate::store::StoreError;

/// Success.
pub const OK: u8 = 0;
/// wal-fetch: the file is not in the archive; in a standby, also any failure.
pub const NOT_IN_ARCHIVE: u8 = 1;
/// Wrong command line.
pub const USAGE: u8 = 2;
/// Missing or malformed configuration.
pub const CONFIG: u8 = 3;
/// The input file is not a WAL file wal-rs archives (bad name, size or page header).
pub const INVALID_INPUT: u8 = 4;
/// Different content already stored under this name; nothing overwritten.
pub const CONFLICT: u8 = 5;
/// The segment belongs to another cluster than the store's.
pub const CLUSTER_MISMATCH: u8 = 6;
/// The store failed: unreachable, timed out, throttled past the retry deadline.
pub const STORAGE: u8 = 7;
/// The store refused the credentials or lacks permission.
pub const DENIED: u8 = 8;
/// The store (bucket or directory) does not exist.
pub const STORE_MISSING: u8 = 9;
/// A stored object is corrupt, fails its checksum, or uses an unreadable compression.
pub const CORRUPT: u8 = 10;
/// A local file could not be read or written (permissions, full disk).
pub const LOCAL_IO: u8 = 11;
/// Something asked for does not exist (other than a WAL file in wal-fetch).
pub const NOT_FOUND: u8 = 12;
/// Something did not happen in time (a backup's WAL never reached the store).
pub const TIMEOUT: u8 = 13;
/// An encrypted object cannot be opened: no key configured, or not the key that sealed it.
pub const KEY: u8 = 14;
/// Every failure code below 126, for the tests that check the table and its docs.
#[cfg(test)]
const FAILURE_CODES: [u8; 13] = [
    USAGE,
    CONFIG,
    INVALID_INPUT,
    CONFLICT,
    CLUSTER_MISMATCH,
    STORAGE,
    DENIED,
    STORE_MISSING,
    CORRUPT,
    LOCAL_IO,
    NOT_FOUND,
    TIMEOUT,
    KEY,
];

/// Added to a wal-fetch failure's code outside a standby, to make PostgreSQL abort recovery.
pub const RECOVERY_ABORT_BASE: u8 = 200;

/// The exit code of a failed command.
pub fn code_of(err: &Error) -> u8 {
    match err {
        Error::Usage(_) => USAGE,
        Error::Config(_) => CONFIG,
        Error::InvalidInput { .. } => INVALID_INPUT,
        Error::Conflict { .. } | Error::AlreadyExists(_) => CONFLICT,
        Error::ClusterMismatch { .. } | Error::VersionMismatch { .. } => CLUSTER_MISMATCH,
        Error::WalNotFound { .. } => NOT_IN_ARCHIVE,
        Error::NotFound(_) => NOT_FOUND,
        Error::Store(e) => match e {
            StoreError::NotFound { .. } => NOT_FOUND,
            StoreError::StoreMissing { .. } => STORE_MISSING,
            StoreError::Denied { .. } => DENIED,
            StoreError::Unavailable { .. } | StoreError::Other { .. } => STORAGE,
            StoreError::Io { .. } => LOCAL_IO,
        },
        Error::Corrupt { .. } | Error::Unsupported { .. } => CORRUPT,
        Error::LocalIo { .. } => LOCAL_IO,
        Error::Timeout(_) => TIMEOUT,
        Error::Key { .. } => KEY,
    }
}

/// The exit code of a failed wal-fetch: 1 for a file not in the archive, and for any failure
/// in a standby (which asks again); otherwise above 125 so recovery aborts.
pub fn wal_fetch_code(err: &Error, standby: bool) -> u8 {
    match (err, standby) {
        (Error::WalNotFound { .. }, _) | (_, true) => NOT_IN_ARCHIVE,
        (e, false) => RECOVERY_ABORT_BASE + code_of(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_fetch_never_reports_a_failure_as_end_of_archive() {
        let missing = Error::WalNotFound { name: "x".into(), store: "s".into() };
        let down = Error::Store(StoreError::Unavailable { op: "get", key: "k".into(), detail: "reset".into() });
        let corrupt = Error::Corrupt { key: "k".into(), detail: "d".into() };
        let config = Error::Config("WALRS_STORE is not set".into());
        assert_eq!(wal_fetch_code(&missing, false), 1);
        assert_eq!(wal_fetch_code(&missing, true), 1);
        for e in [&down, &corrupt, &config] {
            assert!(wal_fetch_code(e, false) > 125, "{e}");
            assert_eq!(wal_fetch_code(e, true), 1, "{e}");
        }
        assert_eq!(wal_fetch_code(&down, false), 207);
        assert_eq!(wal_fetch_code(&corrupt, false), 210);
    }

    #[test]
    fn other_codes_stay_below_126() {
        // archive_command exits above 125 make PostgreSQL's archiver process exit.
        for code in FAILURE_CODES {
            assert!(code > 1 && code < 126);
        }
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    #[test]
    fn every_exit_code_is_documented() {
        let doc = include_str!("../docs/exit-codes.md");
        for code in [OK, NOT_IN_ARCHIVE].into_iter().chain(FAILURE_CODES) {
            assert!(doc.contains(&format!("| {code} |")), "docs/exit-codes.md lacks code {code}");
        }
        assert!(doc.contains("200 + code"));
    }
}
