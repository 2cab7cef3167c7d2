//! `retry_deadline_secs` bounds time without progress, not a whole command: a 1 GiB segment
//! on a slow link, or under a low `network_rate_limit_bytes`, must be allowed to take as long
//! as it takes while its bytes move, and a store that answers nothing must still fail in time.
//!
//! One process-wide [`Clock`] says when anything last moved to or from the store: the
//! store's readers and writers tick it as bytes go through, and each request that completes
//! ticks it too. Two things watch it:
//! - [`stalled`], on the async runtime, ends a command whose clock stood still for the
//!   deadline (the ordinary failure, with its log line);
//! - a [`Watchdog`], a plain thread, ends the process when the clock stood still for the
//!   deadline plus [`WATCHDOG_MARGIN`]: the runtime's timers do not fire while its only
//!   thread is blocked in a system call that never returns (a hard-mounted NFS share whose
//!   server is gone), and PostgreSQL waits for archive_command and restore_command forever.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How much longer than the deadline the watchdog waits: the ordinary deadline fires first
/// and logs the failure; the watchdog only acts when that could not happen.
pub const WATCHDOG_MARGIN: Duration = Duration::from_secs(5);

/// When something last moved. Ticking is one clock read and one relaxed store, so it can be
/// done for every read and write of a transfer.
pub struct Clock {
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last tick.
    last: AtomicU64,
}

impl Clock {
    /// A clock that last ticked now.
    pub fn new() -> Clock {
        Clock { epoch: Instant::now(), last: AtomicU64::new(0) }
    }

    /// Records progress now.
    pub fn tick(&self) {
        let now = self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        // A later tick may have landed first (another thread): keep the latest.
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since the last tick.
    pub fn idle(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.last.load(Ordering::Relaxed)))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

static CLOCK: LazyLock<Clock> = LazyLock::new(Clock::new);

/// The process's clock.
pub fn clock() -> &'static Clock {
    &CLOCK
}

/// Records progress on the process's clock: bytes moved to or from the store, or a request
/// it answered.
pub fn progress() {
    CLOCK.tick();
}

/// Resolves once `clock` has stood still for `limit`, with how long it stood still. Sleeps
/// until the earliest moment that can happen, never polls.
pub async fn stalled(clock: &Clock, limit: Duration) -> Duration {
    loop {
        let idle = clock.idle();
        if idle >= limit {
            return idle;
        }
        tokio::time::sleep(limit - idle).await;
    }
}

/// A thread that ends the process when its clock stands still for too long. See the module
/// documentation.
pub struct Watchdog {
    /// The exit code the command settled on, or -1 while it runs.
    settled: Arc<AtomicI32>,
}

/// How long the watchdog waits for its log line to be written.
const REPORT_WAIT: Duration = Duration::from_secs(2);

impl Watchdog {
    /// Starts watching `clock`. When it stands still for `limit`, `report` runs (it logs the
    /// failure) and the process exits at once with `code`, running no exit handler: a stuck
    /// thread may hold a lock any of them needs. `None` when the thread cannot be started (a
    /// process limit): the command then runs without this safety net.
    pub fn start(
        clock: &'static Clock,
        limit: Duration,
        code: u8,
        report: impl FnOnce() + Send + 'static,
    ) -> Option<Watchdog> {
        // SAFETY: _exit ends the process; it touches no memory of ours.
        Self::start_with(clock, limit, code, report, |code| unsafe { libc::_exit(code.into()) })
    }

    fn start_with(
        clock: &'static Clock,
        limit: Duration,
        code: u8,
        report: impl FnOnce() + Send + 'static,
        exit: impl FnOnce(u8) + Send + 'static,
    ) -> Option<Watchdog> {
        let settled = Arc::new(AtomicI32::new(-1));
        let outcome = settled.clone();
        std::thread::Builder::new()
            .name("walrs-watchdog".into())
            .spawn(move || {
                loop {
                    let idle = clock.idle();
                    if idle >= limit {
                        break;
                    }
                    std::thread::sleep(limit - idle);
                }
                // The command decided already (its line is logged or being logged) and then
                // got stuck on the way out: its answer stands.
                if let Ok(settled) = u8::try_from(outcome.load(Ordering::Relaxed)) {
                    return exit(settled);
                }
                // Logged from a thread of its own, waited for a bounded time: stderr itself
                // may be what blocks (a full pipe), and the process must end regardless.
                let (done, wait) = std::sync::mpsc::channel();
                let report = Arc::new(Mutex::new(Some(report)));
                let run_report = move || {
                    if let Some(report) = report.lock().ok().and_then(|mut r| r.take()) {
                        report();
                    }
                    let _ = done.send(());
                };
                match std::thread::Builder::new().name("walrs-watchdog-log".into()).spawn(run_report.clone()) {
                    Ok(_) => {
                        let _ = wait.recv_timeout(REPORT_WAIT);
                    }
                    // No thread for it (a process limit): log from here.
                    Err(_) => run_report(),
                }
                exit(code)
            })
            .ok()
            .map(|_| Watchdog { settled })
    }

    /// The command has its answer: should the process get stuck after this, it exits with
    /// `code` and logs nothing more.
    pub fn settle(&self, code: u8) {
        self.settled.store(code.into(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    fn leaked_clock() -> &'static Clock {
        Box::leak(Box::new(Clock::new()))
    }

    #[test]
    fn the_deadline_counts_from_the_last_progress_not_from_the_start() {
        let clock = leaked_clock();
        // Ticks 100 ms apart against a limit of a second: a loaded test machine may delay a
        // tick by several hundred ms without making this fail.
        let limit = Duration::from_secs(1);
        crate::test_support::block_on(async {
            let started = Instant::now();
            // Progress every 100 ms for 2.5 s: well past the limit, never stalled.
            let work = async {
                for _ in 0..25 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    clock.tick();
                }
            };
            tokio::select! {
                biased;
                _ = work => {}
                idle = stalled(clock, limit) => panic!("stalled after {:?} while making progress", idle),
            }
            assert!(started.elapsed() >= Duration::from_millis(2500));
            // Then nothing moves: it fires one limit after the last tick.
            let quiet = Instant::now();
            let idle = stalled(clock, limit).await;
            assert!(idle >= limit, "{idle:?}");
            assert!(quiet.elapsed() < limit + Duration::from_secs(2), "{:?}", quiet.elapsed());
        });
    }

    #[test]
    fn the_watchdog_ends_a_process_that_stopped_moving_and_only_then() {
        let clock = leaked_clock();
        let (exited, exit_code) = mpsc::channel();
        let reported = Arc::new(AtomicBool::new(false));
        let r = reported.clone();
        let limit = Duration::from_secs(1);
        let _dog = Watchdog::start_with(
            clock,
            limit,
            207,
            move || r.store(true, Ordering::SeqCst),
            move |code| exited.send(code).unwrap(),
        )
        .unwrap();
        // Steady progress for 2.5 times the limit: it stays quiet.
        for _ in 0..25 {
            std::thread::sleep(Duration::from_millis(100));
            clock.tick();
        }
        assert!(exit_code.try_recv().is_err(), "the watchdog fired while bytes moved");
        let still = Instant::now();
        assert_eq!(exit_code.recv_timeout(Duration::from_secs(5)).unwrap(), 207);
        assert!(still.elapsed() >= limit - Duration::from_millis(50), "{:?}", still.elapsed());
        assert!(reported.load(Ordering::SeqCst), "no log line before the exit");
    }

    #[test]
    fn a_settled_command_that_gets_stuck_exits_with_its_own_code_and_no_second_line() {
        let clock = leaked_clock();
        let (exited, exit_code) = mpsc::channel();
        let reported = Arc::new(AtomicBool::new(false));
        let r = reported.clone();
        let dog = Watchdog::start_with(
            clock,
            Duration::from_millis(200),
            7,
            move || r.store(true, Ordering::SeqCst),
            move |code| exited.send(code).unwrap(),
        )
        .unwrap();
        dog.settle(0);
        assert_eq!(exit_code.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert!(!reported.load(Ordering::SeqCst));
    }
}
