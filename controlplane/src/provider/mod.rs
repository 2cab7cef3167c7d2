//! Where servers come from. A provider creates, starts, stops and destroys servers and runs
//! commands on them; everything else (restores, backups, promotion) is built from those
//! verbs by the state machines, so a new provider (docs/aws-provider.md) changes no step.
//!
//! Every verb is idempotent: starting a running server, stopping a stopped one or destroying
//! a destroyed one succeeds, because a step may be run again after a crash at any point.

pub mod local;

use std::future::Future;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::sys::Output;

/// What a provider says about a server it created; stored in the server row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handle {
    /// The provider's own id (local: the server's folder; AWS: the instance id).
    pub provider_id: String,
    /// Host PostgreSQL listens on.
    pub host: String,
    /// Port PostgreSQL listens on.
    pub port: u16,
    /// PGDATA on the server.
    pub pgdata: String,
}

impl Handle {
    /// A libpq URL for the postgres user (trust authentication inside the private network).
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.host, self.port)
    }
    /// A tokio-postgres connection string.
    pub fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres connect_timeout=3", self.host, self.port)
    }
}

/// The verbs of a server provider.
pub trait Provider: Send + Sync {
    /// Makes a new server for `server_id` (not started, empty PGDATA). Calling it again for
    /// the same id returns the same server.
    fn create(&self, server_id: &str) -> impl Future<Output = Result<Handle>> + Send;
    /// Starts PostgreSQL and waits until it accepts connections (or fails).
    fn start(&self, h: &Handle) -> impl Future<Output = Result<()>> + Send;
    /// Stops PostgreSQL (`immediate`: no checkpoint, as after a crash).
    fn stop(&self, h: &Handle, immediate: bool) -> impl Future<Output = Result<()>> + Send;
    /// Whether the PostgreSQL postmaster is alive.
    fn is_running(&self, h: &Handle) -> impl Future<Output = Result<bool>> + Send;
    /// Stops PostgreSQL and removes the server and its data.
    fn destroy(&self, h: &Handle) -> impl Future<Output = Result<()>> + Send;
    /// Removes whatever `create(server_id)` may have made when no handle of it was recorded:
    /// a server destroyed while `provisioning`, whose `create` ran but whose step did not
    /// commit. Succeeds when there is nothing.
    fn forget(&self, server_id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Runs `argv` on the server as the database's OS user. `argv[0] == "wal-rs"` runs the
    /// wal-rs installed on the server.
    fn run(&self, h: &Handle, argv: &[String], env: &[(String, String)])
        -> impl Future<Output = Result<Output>> + Send;
    /// Replaces the file `rel` (relative to PGDATA) with `content`, atomically.
    fn write_file(&self, h: &Handle, rel: &str, content: &str) -> impl Future<Output = Result<()>> + Send;
    /// Bytes used by PGDATA.
    fn disk_used(&self, h: &Handle) -> impl Future<Output = Result<u64>> + Send;
    /// Stops every server this provider knows (shutdown of a whole installation).
    fn stop_all(&self) -> impl Future<Output = Result<()>> + Send;
}
