//! Soak scenarios of issue 6: the long, random, counted versions of the integration tests'
//! fault, crash, hang and full-disk cases. Not run by `cargo test --workspace` (the test
//! target has `test = false`); `make soak` runs them one at a time:
//!
//! ```text
//! cargo test --release --test soak -- --test-threads=1
//! WALRS_SOAK_SEED=1234 cargo test --release --test soak crash::crash_wal_push -- --exact --test-threads=1
//! ```
//!
//! - `faults`: a live primary archives 300+ segments through 10% injected faults (500, 503
//!   SlowDown, resets, truncated responses); a point-in-time restore through faults on
//!   wal-fetch stops exactly at its target.
//! - `crash`: kill -9 at random moments of wal-push (100 trials), backup-push and
//!   backup-fetch (10 each).
//! - `hang`: black holes; every command ends within its deadline.
//! - `full_disk`: restores into small tmpfs file systems.
//!
//! Each scenario prints its seed and writes its figures to
//! `target/soak-results/<scenario>.json`, with the command that replays it (the test's full
//! name, `--exact`); `scripts/soak-report.py` renders them into docs/reliability.md. Sizes
//! are chosen to finish in minutes on a 2-core machine; set `WALRS_SOAK_SCALE=N` to
//! multiply the trial counts. `cargo test --test soak checks` runs the checks of this
//! machinery, in seconds.

#[path = "../integration/harness/mod.rs"]
#[allow(dead_code)]
mod harness;

mod common;

mod crash;
mod faults;
mod full_disk;
mod hang;
