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
    // A daemon serves a running server: PostgreSQL runs archive_command in its data
    // directory, where postmaster.pid is, and the daemon exits when that file changes.
    let server_runs_here = Path::new("postmaster.pid").exists();
    let result = push(&ctx, &status, path, child_args, started, server_runs_here).await;
    // Gap records the valve kept locally while the store was down go up once a push has
    // reached the store again (and proved it this cluster's): after the file PostgreSQL
    // waits for, never delaying it, and never into a store that just failed. Their time is
    // what is left before the deadline, which counts time without progress, would end the
    // call: a slow but moving push of the file must not leave them no time at all, call
    // after call, and a stalled upload of them is cut before it could fail the call.
    if result.as_ref().is_ok_and(|report| report.outcome != "dropped") {
        let grace = ahead_grace(ctx.config.retry.deadline, crate::deadline::clock().idle());
        upload_local_gaps_within(&status, &ctx, grace).await;
    }
    result
}

/// Uploads the gap records kept locally, for at most `grace`. The file asked for is
/// durable by now: a store slow or stalling again (each put may take the whole deadline)
/// must not turn that into a timeout, exit 7, call after call, which would stop archiving
/// as surely as the full disk the valve is there to prevent. What is not uploaded in time
/// stays on disk for a later call; a put cut off publishes nothing or the whole record.
async fn upload_local_gaps_within(status: &ahead::StatusDir, ctx: &PushContext, grace: Duration) {
    if !status.has_local_gaps() {
        return;
    }
    if grace.is_zero() || tokio::time::timeout(grace, status.upload_local_gaps(ctx)).await.is_err() {
        log::emit(
            Level::Warn,
            &[
                ("op", &"wal-push"),
                ("outcome", &"gaps-unfinished"),
                ("error", &"the gap records kept locally were not all uploaded within the deadline; a later wal-push tries again"),
            ],
        );
    }
}

/// Archives the file at `path` (or has the daemon do it), pushing ready files ahead.
async fn push(
    ctx: &PushContext,
    status: &ahead::StatusDir,
    path: &Path,
    child_args: &[String],
    started: Instant,
    server_runs_here: bool,
) -> Result<PushReport, Error> {
    let config = &ctx.config;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let pg_wal = status.pg_wal();

    // Pushed ahead by an earlier call: answer at once if the record proves out.
    if let Some(report) = status.acknowledge(ctx, path, &name).await {
        return Ok(report);
    }
    let mut budget = if WalFileName::parse(&name).is_ok() { config.archive.ahead } else { 0 };
    let daemon_serves = budget > 0 && config.archive.daemon && server_runs_here;
    // The valve decides first, before waiting on the daemon: it is there for a store that
    // is down, and one that takes connections but never answers would keep the daemon
    // from answering for half the deadline, then the call's own lookup for the rest (exit
    // 7, call after call, nothing ever dropped, pg_wal filling up).
    if ahead::backlog_over_limit(ctx, status) {
        // What a running daemon holds stored ahead, from its memory at once: it writes no
        // records, so the valve must ask. Only what is not stored already may be dropped.
        let held = if daemon_serves { daemon::held(ctx, pg_wal).await } else { Default::default() };
        if let Some(report) = ahead::drop_if_over_queue_limit(ctx, status, path, &name, &held).await? {
            return Ok(report);
        }
    }
    if daemon_serves {
        match daemon::ask(ctx, pg_wal, path, &name, child_args).await {
            daemon::Asked::Stored(report) => return Ok(report),
            // The daemon pushes the others ahead; this call uploads only its own file.
            daemon::Asked::NotStored => budget = 0,
            daemon::Asked::NoDaemon => {}
        }
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

    #[test]
    fn gap_records_not_uploaded_in_time_stay_for_a_later_call() {
        let pg_wal = tempfile::tempdir().unwrap();
        let ctx = super::file::tests::memory_context(default_config());
        let local = pg_wal.path().join(ahead::STATUS_DIR).join("gaps");
        std::fs::create_dir_all(&local).unwrap();
        let record = local.join("000000010000000000000003.json");
        std::fs::write(&record, br#"{"name":"000000010000000000000003"}"#).unwrap();
        let status = ahead::StatusDir::new(pg_wal.path());
        block_on(async {
            // No time left: nothing is tried, and the record stays.
            upload_local_gaps_within(&status, &ctx, Duration::ZERO).await;
            assert!(ctx.store.list(crate::layout::GAP_PREFIX).await.unwrap().is_empty());
            assert!(record.exists());
            upload_local_gaps_within(&status, &ctx, Duration::from_secs(10)).await;
            assert_eq!(ctx.store.list(crate::layout::GAP_PREFIX).await.unwrap().len(), 1);
        });
        assert!(!record.exists());
    }

    /// The archive daemon keeps what it stored ahead in memory, with no record on disk: the
    /// valve must still leave it out of the backlog. A limit of 3 segments, segments 1 to 4
    /// ready, the daemon holding 2 to 4 stored, and segment 1 failing to store: the call
    /// fails (PostgreSQL retries) rather than drop segment 1 with 1 segment waiting. (The
    /// daemon runs in this process; no test here may have "daemon" in its name, since a
    /// call that found none would start this test binary with that argument.)
    #[test]
    fn the_valve_leaves_out_what_is_held_stored_ahead() {
        let (pg_wal, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut config = default_config();
        config.store = Some(StoreUrl::File(root.path().to_path_buf()));
        config.archive.queue_max_bytes = 3 << 20; // the test segments are 1 MiB
        config.retry.deadline = Duration::from_secs(4);
        let ready = pg_wal.path().join("archive_status");
        std::fs::create_dir(&ready).unwrap();
        let names: Vec<String> = (1..=4).map(|segno| format!("{:016X}{segno:08X}", 1u64 << 32)).collect();
        for name in &names {
            write_segment(pg_wal.path(), name, 1, 0);
            std::fs::write(ready.join(format!("{name}.ready")), b"").unwrap();
        }
        // A folder where segment 1's object goes: the store cannot take it.
        let first = WalFileName::parse(&names[0]).unwrap();
        std::fs::create_dir_all(root.path().join(crate::layout::wal_key(&first, config.compression).as_str())).unwrap();
        let path = pg_wal.path().join(&names[0]);
        let result = block_on(async {
            let ctx = PushContext::new(open_store(&config).await.unwrap(), config.clone());
            let status = ahead::StatusDir::new(pg_wal.path());
            let call = async {
                let until = Instant::now() + Duration::from_secs(30);
                while daemon::held(&ctx, pg_wal.path()).await.len() < 3 {
                    assert!(Instant::now() < until, "the daemon never held segments 2 to 4");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                push(&ctx, &status, &path, &[], Instant::now(), true).await
            };
            tokio::select! {
                _ = daemon::run(&config, pg_wal.path()) => panic!("the daemon exited"),
                result = call => result,
            }
        });
        assert!(result.is_err(), "segment 1 was acknowledged: {:?}", result.map(|r| r.outcome));
        assert!(!root.path().join("walrs/gaps").exists(), "a gap was recorded in the store");
        assert!(!pg_wal.path().join(ahead::STATUS_DIR).join("gaps").exists(), "a gap was recorded locally");
    }
}
