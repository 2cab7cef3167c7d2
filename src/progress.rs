//! Progress of long operations: an indicatif bar (bytes done, rate, time left) when stderr
//! is a terminal, a logfmt line every few seconds otherwise (cron, the control plane).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::log::{self, Level};

/// How often the non-terminal form writes a line.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Shared by the threads doing the work.
pub struct Progress {
    op: &'static str,
    total: u64,
    done: AtomicU64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Mutex<Instant>,
}

impl Progress {
    /// Progress of `op` over `total` bytes.
    pub fn new(op: &'static str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(op);
            bar
        });
        Progress {
            op,
            total,
            done: AtomicU64::new(0),
            bar,
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
        }
    }

    /// Records `bytes` more done.
    pub fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_line.lock().unwrap();
        if last.elapsed() >= LOG_EVERY {
            *last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            log::emit(
                Level::Info,
                &[
                    ("op", &self.op),
                    ("progress_bytes", &done),
                    ("total_bytes", &self.total),
                    ("mb_per_s", &format!("{:.1}", done as f64 / secs / 1e6)),
                ],
            );
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
