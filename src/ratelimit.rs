//! Rate limits for operators who must keep a backup or a burst of archiving from starving
//! the production database: bytes per second to and from the store (`network_rate_limit_bytes`)
//! and read from the data directory and pg_wal (`disk_rate_limit_bytes`). Per process.
//!
//! A token bucket with one second of burst; callers are blocking threads (uploads, reads and
//! decompression all run off the async runtime), so waiting is a plain sleep.

use std::io::{self, Read, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One limit, shared by every thread of the process.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    /// A limit of `bytes_per_sec`.
    pub fn new(bytes_per_sec: u64) -> Limiter {
        Limiter { rate: bytes_per_sec as f64, state: Mutex::new((bytes_per_sec as f64, Instant::now())) }
    }

    /// Takes `n` bytes' worth of tokens, sleeping while the bucket is in debt.
    pub fn take(&self, n: usize) {
        let wait = {
            let mut state = self.state.lock().unwrap();
            let now = Instant::now();
            let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
            state.0 = (state.0 + refill).min(self.rate) - n as f64;
            state.1 = now;
            if state.0 < 0.0 {
                Duration::from_secs_f64(-state.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

static NETWORK: OnceLock<Option<Limiter>> = OnceLock::new();
static DISK: OnceLock<Option<Limiter>> = OnceLock::new();

/// Sets the process's limits (0 = unlimited). Called once, at start-up.
pub fn configure(network: u64, disk: u64) {
    let _ = NETWORK.set((network > 0).then(|| Limiter::new(network)));
    let _ = DISK.set((disk > 0).then(|| Limiter::new(disk)));
}

/// The store limit, if any.
pub fn network() -> Option<&'static Limiter> {
    NETWORK.get().and_then(Option::as_ref)
}

/// The disk limit, if any.
pub fn disk() -> Option<&'static Limiter> {
    DISK.get().and_then(Option::as_ref)
}

/// A reader or writer held to a limit.
pub struct Limited<T> {
    inner: T,
    limiter: Option<&'static Limiter>,
}

impl<T> Limited<T> {
    /// Wraps `inner`; a no-op when `limiter` is `None`.
    pub fn new(inner: T, limiter: Option<&'static Limiter>) -> Limited<T> {
        Limited { inner, limiter }
    }

    /// The wrapped value.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(l) = self.limiter {
            l.take(n);
        }
        Ok(n)
    }
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(l) = self.limiter {
            l.take(n);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_holds_over_a_second() {
        let l = Limiter::new(1 << 20);
        let start = Instant::now();
        // One second of burst, then 1 MiB more must take about a second.
        for _ in 0..16 {
            l.take(128 << 10);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
