//! WAL prefetch for recovery: while PostgreSQL replays one segment, the next ones are
//! already downloading.
//!
//! After each successful wal-fetch of a segment, a detached background process
//! (`wal-rs wal-prefetch NAME DIR`) fetches the next `prefetch_count` segments of the same
//! timeline into the prefetch folder (`walrs_prefetch` beside the destination, inside
//! pg_wal, by default): decompressed, verified, fsynced, and only then renamed to the
//! segment's name. A later wal-fetch of exactly that name is a local rename.
//!
//! Rules that keep recovery correct:
//! - a file in the folder under a segment's name is complete and verified (nothing else is
//!   ever renamed there); anything else (temporary files, claims) has a dot prefix;
//! - it is served only for exactly the name asked for, timeline included;
//! - "not in the archive" is never recorded: a prefetcher that meets the end of the archive
//!   just stops, and the next wal-fetch asks the store again;
//! - prefetched files of other timelines or of segments already replayed are removed, and so
//!   are temporary files of prefetchers that died;
//! - if the folder disappears, wal-fetch simply fetches from the store.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::common::open_store;
use super::wal_fetch::{fetch_with_retry, FetchReport, PREFETCH_VERIFIED_XATTR};
use crate::config::Config;
use crate::error::Error;
use crate::log::{self, Level};
use crate::wal::{SegmentId, WalFileName};

/// Default folder name, beside the destination (inside pg_wal).
const DEFAULT_DIR: &str = "walrs_prefetch";
/// Temporary files and claims older than this belong to a prefetcher that died.
const STALE_AFTER: Duration = Duration::from_secs(300);

/// The prefetch folder of one wal-fetch.
pub(super) struct Prefetch {
    dir: PathBuf,
    count: u32,
}

impl Prefetch {
    pub(super) fn new(config: &Config, dest: &Path) -> Prefetch {
        let dir = config.prefetch.dir.clone().unwrap_or_else(|| {
            match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            }
            .join(DEFAULT_DIR)
        });
        Prefetch { dir, count: config.prefetch.count }
    }

    /// Serves `name` from the folder, if it was prefetched. When a prefetcher is fetching it
    /// right now, waits for it (up to `wait`) rather than download the same bytes twice.
    pub(super) fn take(&self, name: &WalFileName, dest: &Path, wait: Duration) -> Option<FetchReport> {
        name.wal_segment()?;
        let path = self.dir.join(name.to_string());
        let claim = self.dir.join(format!(".{name}.claim"));
        let deadline = std::time::Instant::now() + wait;
        while !path.exists() && claim_is_live(&claim) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let size = fs::metadata(&path).ok()?.len();
        let verified = match xattr::get(&path, PREFETCH_VERIFIED_XATTR).ok().flatten().as_deref() {
            Some(b"sha256") => "sha256",
            Some(b"none") => "none",
            _ => "unknown",
        };
        match fs::rename(&path, dest) {
            Ok(()) => Some(FetchReport { bytes_stored: 0, bytes_out: size, verified, prefetched: true }),
            Err(e) => {
                // Another file system, say: fetch from the store instead.
                log::emit(Level::Debug, &[("op", &"wal-fetch"), ("file", name), ("prefetch_error", &e)]);
                None
            }
        }
    }

    /// Removes what can no longer be served after `name`, then starts a background
    /// prefetcher for the segments after it unless they are all there already.
    /// `segment_size` is the size of the segment just served: the cluster's segment size.
    pub(super) fn refill(&self, name: &WalFileName, segment_size: u64, child_args: &[String]) {
        let Some(segment) = name.wal_segment() else { return };
        let Ok(size) = u32::try_from(segment_size) else { return };
        if self.count == 0 || !size.is_power_of_two() {
            return;
        }
        self.clean(name.timeline().0, segment);
        let wanted = next_segments(*name, self.count, size);
        if wanted.iter().all(|n| self.dir.join(n.to_string()).exists()) {
            return;
        }
        let Ok(exe) = std::env::current_exe() else { return };
        let mut cmd = Command::new(exe);
        cmd.args(child_args).arg("wal-prefetch").arg(name.to_string()).arg(&self.dir).arg(size.to_string());
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // Its own session: PostgreSQL's signals to the restore_command's group are not for it.
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        if let Err(e) = cmd.spawn() {
            log::emit(
                Level::Warn,
                &[("op", &"wal-fetch"), ("file", name), ("error", &format!("cannot start prefetch: {e}"))],
            );
        }
    }

    /// Removes prefetched segments of other timelines or before `segment`, and leftovers of
    /// prefetchers that died.
    fn clean(&self, timeline: u32, segment: SegmentId) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.filter_map(|e| e.ok()) {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            let stale = match WalFileName::parse(file) {
                Ok(WalFileName::Segment(t, s)) => t.0 != timeline || s < segment,
                Ok(_) => true,
                Err(_) => entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > STALE_AFTER)
                    .unwrap_or(true),
            };
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether a claim belongs to a prefetcher that is still running (its PID is in the claim):
/// a claim left by a killed prefetcher must not make wal-fetch wait.
fn claim_is_live(claim: &Path) -> bool {
    let Ok(text) = fs::read_to_string(claim) else { return false };
    let Ok(pid) = text.trim().parse::<i32>() else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The `count` segments after `name`, on its timeline.
fn next_segments(name: WalFileName, count: u32, segment_size: u32) -> Vec<WalFileName> {
    let WalFileName::Segment(tli, mut seg) = name else { return Vec::new() };
    (0..count)
        .map(|_| {
            seg = seg.next(segment_size);
            WalFileName::Segment(tli, seg)
        })
        .collect()
}

/// The background prefetcher: `wal-rs wal-prefetch NAME DIR`.
pub(super) async fn run(config: &Config, after: &str, dir: &Path, segment_size: u32) -> Result<u32, Error> {
    let after = WalFileName::parse(after).map_err(|e| Error::Usage(e.to_string()))?;
    if !segment_size.is_power_of_two() {
        return Err(Error::Usage(format!("segment size {segment_size} is not a power of two")));
    }
    fs::create_dir_all(dir).map_err(|e| Error::local("create", dir, e))?;
    let store = open_store(config).await?;
    let names = next_segments(after, config.prefetch.count, segment_size);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.prefetch.concurrency.max(1)));
    let ended = AtomicBool::new(false);
    let fetched = std::sync::atomic::AtomicU32::new(0);
    futures_util::future::join_all(names.iter().map(|name| {
        let (store, permits, ended, fetched) = (&store, &permits, &ended, &fetched);
        async move {
            let _permit = permits.acquire().await.expect("never closed");
            let target = dir.join(name.to_string());
            if ended.load(Ordering::Relaxed) || target.exists() {
                return;
            }
            // One prefetcher per segment: the claim is created exclusively.
            let claim = dir.join(format!(".{name}.claim"));
            if !claim_is_live(&claim) {
                // Left by a prefetcher that died: take it over.
                let _ = fs::remove_file(&claim);
            }
            match OpenOptions::new().write(true).create_new(true).open(&claim) {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                }
                Err(_) => return,
            }
            let result = fetch_with_retry(store, name, &target, config, true).await;
            let _ = fs::remove_file(&claim);
            match result {
                Ok(_) => {
                    fetched.fetch_add(1, Ordering::Relaxed);
                }
                // The end of the archive, for now: stop, remember nothing.
                Err(Error::WalNotFound { .. }) => ended.store(true, Ordering::Relaxed),
                Err(e) => {
                    ended.store(true, Ordering::Relaxed);
                    log::emit(
                        Level::Warn,
                        &[("op", &"wal-prefetch"), ("file", name), ("outcome", &"error"), ("error", &e)],
                    );
                }
            }
        }
    }))
    .await;
    Ok(fetched.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::TimelineId;

    #[test]
    fn prefetch_follows_the_timeline_of_the_segment_asked_for() {
        let n = WalFileName::parse("0000000200000000000000FE").unwrap();
        let next = next_segments(n, 3, 16 << 20);
        let names: Vec<String> = next.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["0000000200000000000000FF", "000000020000000100000000", "000000020000000100000001"]);
        assert!(next.iter().all(|n| n.timeline() == TimelineId(2)));
        assert!(next_segments(WalFileName::parse("00000002.history").unwrap(), 3, 16 << 20).is_empty());
    }

    #[test]
    fn only_servable_files_survive_cleaning() {
        let d = tempfile::tempdir().unwrap();
        for f in ["000000010000000000000005", "000000020000000000000007", "000000020000000000000009", ".x.claim"] {
            fs::write(d.path().join(f), b"x").unwrap();
        }
        let p = Prefetch { dir: d.path().to_path_buf(), count: 8 };
        p.clean(2, SegmentId { log: 0, seg: 8 });
        let mut left: Vec<String> =
            fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        // Another timeline and an older segment go; a fresh claim stays.
        assert_eq!(left, [".x.claim", "000000020000000000000009"]);
    }
}
