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
use std::time::{Duration, Instant};

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
    let started = Instant::now();
    let store = open_store(config).await?;
    let ctx = PushContext::new(store, config.clone());
    let pg_wal = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let status = ahead::StatusDir::new(&pg_wal);
    let result = push(&ctx, &status, path, child_args, started).await;
    // Gap records the valve kept locally while the store was down go up once a push has
    // reached the store again (and proved it this cluster's): after the file PostgreSQL
    // waits for, never delaying it, and never into a store that just failed.
    if result.as_ref().is_ok_and(|report| report.outcome != "dropped") {
        status.upload_local_gaps(&ctx).await;
    }
    result
}

/// Archives the file at `path` (or has the daemon do it), pushing ready files ahead.
async fn push(
    ctx: &PushContext,
    status: &ahead::StatusDir,
    path: &Path,
    child_args: &[String],
    started: Instant,
) -> Result<PushReport, Error> {
    let config = &ctx.config;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let pg_wal = status.pg_wal();

    // Pushed ahead by an earlier call: answer at once if the record proves out.
    if let Some(report) = status.acknowledge(ctx, path, &name).await {
        return Ok(report);
    }
    let mut budget = if WalFileName::parse(&name).is_ok() { config.archive.ahead } else { 0 };
    // A daemon serves a running server: PostgreSQL runs archive_command in its data
    // directory, where postmaster.pid is, and the daemon exits when that file changes.
    if budget > 0 && config.archive.daemon && Path::new("postmaster.pid").exists() {
        match daemon::ask(ctx, pg_wal, path, &name, child_args).await {
            daemon::Asked::Stored(report) => return Ok(report),
            // The daemon pushes the others ahead; this call uploads only its own file.
            daemon::Asked::NotStored => budget = 0,
            daemon::Asked::NoDaemon => {}
        }
    }
    // Only what is not stored already may be dropped.
    if let Some(report) = ahead::drop_if_over_queue_limit(ctx, status, path, &name).await? {
        return Ok(report);
    }
    let others = status.ready_files(&name, budget);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.archive.concurrency.max(1)));
    let main = async {
        let _permit = permits.acquire().await.expect("the semaphore is never closed");
        // PostgreSQL would retry a failed archive_command too, but only after a pause and
        // with a failure in its log: a cut response or a 5xx is retried here first.
        super::common::retry_transient("wal-push", &name, config.retry.deadline, || push_file(ctx, path)).await
    };
    let name = &name;
    let ahead_pushes = futures_util::future::join_all(others.iter().map(|other| {
        let permits = &permits;
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
    let mut ahead_pushes = std::pin::pin!(ahead_pushes);
    let mut ahead_done = false;
    let mut main = std::pin::pin!(main);
    let result = loop {
        tokio::select! {
            // Main first: polled first, it takes the first upload permit, before the batch
            // queues for all of them (the semaphore is fair).
            biased;
            result = &mut main => break result,
            _ = &mut ahead_pushes, if !ahead_done => ahead_done = true,
        }
    };
    if !ahead_done {
        let grace = ahead_grace(config.retry.deadline, started.elapsed());
        if tokio::time::timeout(grace, &mut ahead_pushes).await.is_err() {
            log::emit(
                Level::Warn,
                &[
                    ("op", &"wal-push"),
                    ("file", name),
                    ("outcome", &"ahead-unfinished"),
                    ("error", &"pushing ready files ahead did not finish within the deadline; PostgreSQL asks for them in turn"),
                ],
            );
        }
    }
    status.prune();
    result
}

/// How long a wal-push still waits for its push-ahead uploads once the file asked for is
/// done: what is left of the command's deadline, less a margin to answer in. On a slow or
/// throttled store a batch of ready files can take longer than the deadline; waiting for
/// all of it would turn the durable push of the file asked for into a timeout (a failure
/// PostgreSQL retries). The uploads cut off publish nothing: objects are published only
/// once whole.
fn ahead_grace(deadline: Duration, elapsed: Duration) -> Duration {
    let margin = (deadline / 10).min(Duration::from_secs(5));
    deadline.saturating_sub(elapsed).saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::file::tests::{default_config, write_segment};
    use super::*;
    use crate::config::StoreUrl;
    use crate::test_support::block_on;

    #[test]
    fn push_ahead_is_given_what_is_left_of_the_deadline_less_a_margin() {
        let s = Duration::from_secs;
        assert_eq!(ahead_grace(s(120), s(20)), s(95));
        assert_eq!(ahead_grace(s(10), s(2)), s(7));
        assert_eq!(ahead_grace(s(10), s(9)), Duration::ZERO);
        assert_eq!(ahead_grace(s(10), s(30)), Duration::ZERO);
    }

    #[test]
    fn a_push_that_reaches_the_store_uploads_the_gap_records_kept_locally() {
        let (pg_wal, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut config = default_config();
        config.store = Some(StoreUrl::File(root.path().to_path_buf()));
        config.archive.daemon = false;
        let local = pg_wal.path().join(ahead::STATUS_DIR).join("gaps");
        std::fs::create_dir_all(&local).unwrap();
        let dropped = "000000010000000000000003";
        std::fs::write(local.join(format!("{dropped}.json")), br#"{"name":"000000010000000000000003"}"#).unwrap();
        let path = write_segment(pg_wal.path(), "000000010000000000000004", 1, 0);
        block_on(async {
            assert_eq!(run(&config, &path, &[]).await.unwrap().outcome, "stored");
            let store = open_store(&config).await.unwrap();
            assert!(store.head(&crate::layout::gap_key(dropped)).await.unwrap().is_some());
        });
        assert!(!local.join(format!("{dropped}.json")).exists());
    }
}
