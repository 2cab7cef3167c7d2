//! `wal-rs wal-push PATH`: archive one WAL file, as archive_command.
//!
//! PostgreSQL calls archive_command one file at a time, and against S3 every request costs
//! tens of milliseconds, so a busy primary would pile WAL up in pg_wal. So each call also
//! pushes the files PostgreSQL has already marked ready (`archive_status/*.ready`), oldest
//! first, up to `archive_ahead` files with `archive_concurrency` at once, and records each
//! success in wal-rs's own status folder (never touching PostgreSQL's `.ready` files, which
//! other archivers chained in archive_command rely on). When PostgreSQL later asks for such a
//! file, the record is checked against the file and the store before answering at once.
//!
//! By default (`archive_daemon`), the pushing ahead is done by one long-lived daemon instead
//! (`daemon.rs`), which each call starts if needed and asks; the per-call push-ahead above
//! is what runs where no daemon can.
//!
//! Exit 0 means the file asked for is durable in the store; anything else leaves it in place
//! for PostgreSQL to retry. Failures of files pushed ahead only cost a warning: PostgreSQL
//! asks for them in turn.

mod ahead;
mod daemon;
mod file;

use std::path::Path;
use std::sync::Arc;

pub(crate) use daemon::run as run_daemon;
pub(crate) use file::PushReport;
use file::{push_file, PushContext};

use super::common::open_store;
use crate::config::Config;
use crate::error::Error;
use crate::log::{self, Level};
use crate::wal::WalFileName;

/// `child_args`: the command-line settings, for a daemon this call starts.
pub(super) async fn run(config: &Config, path: &Path, child_args: &[String]) -> Result<PushReport, Error> {
    let store = open_store(config).await?;
    let ctx = PushContext::new(store, config.clone());
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let pg_wal = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let status = ahead::StatusDir::new(&pg_wal);

    // Pushed ahead by an earlier call: answer at once if the record proves out.
    if let Some(report) = status.acknowledge(&ctx, path, &name).await {
        return Ok(report);
    }
    let mut budget = if WalFileName::parse(&name).is_ok() { config.archive.ahead } else { 0 };
    // A daemon serves a running server: PostgreSQL runs archive_command in its data
    // directory, where postmaster.pid is, and the daemon exits when that file changes.
    if budget > 0 && config.archive.daemon && Path::new("postmaster.pid").exists() {
        match daemon::ask(&ctx, &pg_wal, path, &name, child_args).await {
            daemon::Asked::Stored(report) => return Ok(report),
            // The daemon pushes the others ahead; this call uploads only its own file.
            daemon::Asked::NotStored => budget = 0,
            daemon::Asked::NoDaemon => {}
        }
    }
    // Only what is not stored already may be dropped.
    if let Some(report) = ahead::drop_if_over_queue_limit(&ctx, &status, path, &name).await? {
        return Ok(report);
    }
    let others = status.ready_files(&name, budget);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.archive.concurrency.max(1)));
    let main = async {
        let _permit = permits.acquire().await.expect("the semaphore is never closed");
        // PostgreSQL would retry a failed archive_command too, but only after a pause and
        // with a failure in its log: a cut response or a 5xx is retried here first.
        super::common::retry_transient("wal-push", &name, config.retry.deadline, || push_file(&ctx, path)).await
    };
    let (pg_wal, name) = (&pg_wal, &name);
    let ahead_pushes = futures_util::future::join_all(others.iter().map(|other| {
        let ctx = &ctx;
        let permits = &permits;
        let status = &status;
        async move {
            let _permit = permits.acquire().await.expect("the semaphore is never closed");
            let other_path = pg_wal.join(other);
            let before = ahead::FileStamp::of(&other_path);
            match push_file(ctx, &other_path).await {
                Ok(report) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &"wal-push"),
                            ("file", other),
                            ("ahead_of", name),
                            ("bytes_in", &report.bytes_in),
                            ("bytes_stored", &report.bytes_stored),
                            ("outcome", &report.outcome),
                        ],
                    );
                    status.record(ctx, other, &report, before).await
                }
                Err(e) => log::emit(
                    Level::Warn,
                    &[("op", &"wal-push"), ("file", other), ("ahead_of", name), ("outcome", &"error"), ("error", &e)],
                ),
            }
        }
    }));
    let (result, _) = tokio::join!(main, ahead_pushes);
    status.prune();
    result
}
