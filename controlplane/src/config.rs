//! Command line and environment of `wal-rs-control`: which process types to run and the
//! settings they share. Only parsing here; `main.rs` turns it into running tasks.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The wal-rs control plane: databases, followers, forks and rollback, kept converging.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Cli {
    /// Process type to run.
    #[command(subcommand)]
    pub process: Process,
    /// Settings shared by every process type.
    #[command(flatten)]
    pub config: Config,
}

/// The process types of the Procfile; each can run (and scale) on its own.
#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// Everything in one process: web, observer, clock and `--workers` workers.
    All,
    /// The HTTP JSON API.
    Web,
    /// One worker: runs the jobs of the queue (state-machine steps).
    Worker,
    /// Records each server's facts every `--observe-every-ms`.
    Observer,
    /// Enqueues a converge job for every object that is not where it should be.
    Clock,
    /// Stops every PostgreSQL cluster under `--data` (servers and the private state database).
    StopAll,
}

/// Settings shared by all process types.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Folder for the private state database, the servers of the local provider and the
    /// local store.
    #[arg(long, env = "WALRS_CONTROL_DATA", default_value = "walrs-control", global = true)]
    pub data: PathBuf,
    /// State database (tokio-postgres connection string). Unset: a private PostgreSQL cluster
    /// under `--data`/state, started on demand.
    #[arg(long, env = "WALRS_CONTROL_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Address the web process listens on.
    #[arg(long, env = "WALRS_CONTROL_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: String,
    /// The wal-rs binary (copied under `--data` so the postgres user can run it).
    #[arg(long, env = "WALRS_BIN", default_value = default_walrs_bin(), global = true)]
    pub walrs_bin: PathBuf,
    /// Store root: each timeline gets `<root>/<timeline-id>`. Default `file://<data>/store`.
    #[arg(long, env = "WALRS_CONTROL_STORE", global = true)]
    pub store: Option<String>,
    /// Workers in `all`.
    #[arg(long, env = "WALRS_CONTROL_WORKERS", default_value_t = 2, global = true)]
    pub workers: usize,
    /// Observer period.
    #[arg(long, env = "WALRS_CONTROL_OBSERVE_MS", default_value_t = 3000, global = true)]
    pub observe_every_ms: u64,
    /// Clock period.
    #[arg(long, env = "WALRS_CONTROL_CLOCK_MS", default_value_t = 3000, global = true)]
    pub clock_every_ms: u64,
    /// How often an idle worker looks at the queue.
    #[arg(long, env = "WALRS_CONTROL_POLL_MS", default_value_t = 500, global = true)]
    pub poll_ms: u64,
    /// A job's lease: a worker that stops renewing it (killed) loses the job after this long.
    #[arg(long, env = "WALRS_CONTROL_LEASE_SECS", default_value_t = 60, global = true)]
    pub lease_secs: u64,
    /// Runs servers with fsync off: for tests and demos only.
    #[arg(long, env = "WALRS_CONTROL_UNSAFE_NO_FSYNC", global = true)]
    pub unsafe_no_fsync: bool,
}

/// `<workspace>/target/release/wal-rs`, as built by `cargo build --release -p wal-rs`.
fn default_walrs_bin() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/wal-rs")
}

impl Config {
    /// Observer period.
    pub fn observe_every(&self) -> Duration {
        Duration::from_millis(self.observe_every_ms.max(100))
    }
    /// Clock period.
    pub fn clock_every(&self) -> Duration {
        Duration::from_millis(self.clock_every_ms.max(100))
    }
    /// Idle worker poll period.
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(50))
    }
    /// Lease of a job.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(2))
    }
}
