//! The exit codes, in one table. `docs/exit-codes.md` mirrors it; scripts may rely on it.
//!
//! wal-fetch follows PostgreSQL's restore_command contract: 1 means "this file is not in the
//! archive" (or, in a standby, "not now, ask again"). Any other failure outside a standby
//! exits with 200 plus the code below, above 125, so that PostgreSQL aborts the recovery
//! instead of taking the failure for the end of the archive.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

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
/// wal-rs itself failed (a panic: a bug, or a thread that could not be started).
pub const INTERNAL: u8 = 15;
/// Every failure code below 126, for the tests that check the table and its docs.
#[cfg(test)]
const FAILURE_CODES: [u8; 14] = [
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
    INTERNAL,
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

/// The exit code of a panic in this process: [`INTERNAL`] unless the command set another.
static PANIC_CODE: AtomicU8 = AtomicU8::new(INTERNAL);
/// The command running, for the panic's log line.
static PANIC_OP: OnceLock<&'static str> = OnceLock::new();

/// Names the command in the log line of a panic.
pub fn set_panic_op(op: &'static str) {
    let _ = PANIC_OP.set(op);
}

/// Makes a panic exit with `code`. wal-fetch sets its failure code: Rust's own 101 would
/// read to PostgreSQL as "not in the archive" and end a recovery early.
pub fn set_panic_code(code: u8) {
    PANIC_CODE.store(code, Ordering::Relaxed);
}

/// The exit code of a failed wal-fetch that failed inside wal-rs itself.
pub fn wal_fetch_internal_code(standby: bool) -> u8 {
    if standby {
        NOT_IN_ARCHIVE
    } else {
        RECOVERY_ABORT_BASE + INTERNAL
    }
}

/// A panic, in any thread, ends the process at once with the command's panic code and one
/// log line, instead of unwinding into Rust's exit 101.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let code = PANIC_CODE.load(Ordering::Relaxed);
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        crate::log::emit(
            crate::log::Level::Error,
            &[
                ("op", &PANIC_OP.get().copied().unwrap_or("wal-rs")),
                ("outcome", &"error"),
                ("exit", &code),
                ("error", &format!("internal error: {message}{place}; report this as a bug with the log line")),
            ],
        );
        std::process::exit(code.into());
    }));
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
        // A panic must not look like the end of the archive either.
        assert!(wal_fetch_internal_code(false) > 125);
        assert_eq!(wal_fetch_internal_code(true), NOT_IN_ARCHIVE);
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
