//! The state machines' steps. A step looks at one object, does at most one thing to the
//! world (through the provider and wal-rs), and says which state the object is in now. Every
//! step is idempotent: it may be run again after a crash at any point, so it first undoes
//! whatever a half-finished earlier run left (a half-restored folder is wiped, a running
//! server is stopped before its folder is replaced).

pub mod resource;
pub mod server;

use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::provider::local::Local;
use crate::provider::Handle;

/// What a process needs to run steps.
pub struct Ctx {
    /// Settings.
    pub cfg: Config,
    /// State database connection string.
    pub conninfo: String,
    /// The server provider.
    pub provider: Local,
    /// Root of the timelines' stores.
    pub store_root: String,
    /// wal-rs settings (`WALRS_*` in the control plane's environment) passed to the wal-rs
    /// commands workers run (not to archive_command).
    pub walrs_env: Vec<(String, String)>,
    /// The wal-rs binary on the servers.
    pub walrs_path: String,
    /// The encryption key file (absolute path, readable by postgres), also in `walrs_env`;
    /// archive_command gets it as `--set encryption_key_file=...`, like the restore_command
    /// backup-fetch writes, so WAL is sealed with the same keys as the backups.
    pub encryption_key_file: Option<String>,
}

/// Where a step left its object.
#[derive(Debug)]
pub enum Outcome {
    /// Moved to `state`.
    To {
        /// The new state.
        state: &'static str,
        /// A handle to record (provisioning).
        handle: Option<Handle>,
        /// A backup to record (backing up).
        backup: Option<Value>,
    },
    /// Still in the same state, waiting for something: look again after this long.
    Wait(Duration),
    /// Nothing to do.
    Done,
}

impl Outcome {
    /// A plain transition.
    pub fn to(state: &'static str) -> Outcome {
        Outcome::To { state, handle: None, backup: None }
    }
}

/// An error no retry can fix (no backup before the target time, say): the object goes to
/// `failed` and the error is reported.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// An error a retry may or may not fix (wal-rs backup-push exit 3: a bad setting, or
/// PostgreSQL not answering for a moment): the step is retried like after any error, but
/// after `attempts` failures in a row the object goes to `failed` like after a [`Fatal`].
#[derive(Debug)]
pub struct Bounded {
    /// The error.
    pub msg: String,
    /// Consecutive attempts allowed.
    pub attempts: i32,
}

impl std::fmt::Display for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Bounded {}
