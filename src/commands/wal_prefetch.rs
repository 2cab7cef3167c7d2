//! WAL prefetch for recovery: while PostgreSQL replays one segment, the next ones are
//! already downloading.
//!
//! The first successful wal-fetch of a segment starts a detached background process
//! (`wal-rs wal-prefetch NAME DIR SIZE`) that keeps the next `prefetch_count` segments of the
//! same timeline in the prefetch folder (`walrs_prefetch` beside the destination, inside
//! pg_wal, by default): decompressed, verified, fsynced, and only then renamed to the
//! segment's name. A later wal-fetch of exactly that name is a local rename, and tells the
//! prefetcher (through `.prefetcher.sock` in the folder) to move its window on. One
//! prefetcher serves the whole recovery.
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

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::{FutureExt, LocalBoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};

use super::background::{self, fingerprint, Bound, ServerWatch};
use super::common::open_store;
use super::wal_fetch::{dest_folder, fetch_with_retry, temp_path, FetchReport, ForPrefetch, PREFETCH_VERIFIED_XATTR};
use crate::config::Config;
use crate::error::Error;
use crate::log::{self, Level};
use crate::store::Store;
use crate::wal::{SegmentId, WalFileName};

/// Suffix (after a dot and the segment's name) of a prefetched file already served: a second
/// link to what PostgreSQL got, for the prefetcher to drop (see [`Prefetch::take`]).
const SERVED: &str = ".served";
/// The prefetcher's nice value (0 is normal priority, 19 the lowest).
const PREFETCH_NICE: libc::c_int = 10;
/// The name PostgreSQL's recovery restores every segment to, in pg_wal.
const RECOVERY_DEST: &str = "RECOVERYXLOG";
/// Default folder name, beside the destination (inside pg_wal).
const DEFAULT_DIR: &str = "walrs_prefetch";
/// Temporary files and claims older than this belong to a prefetcher that died.
const STALE_AFTER: Duration = Duration::from_secs(300);

/// The prefetch folder of one wal-fetch.
pub(super) struct Prefetch {
    dir: PathBuf,
    /// False when the caller is not PostgreSQL's recovery, or the folder is the
    /// destination's own (see [`Prefetch::new`]).
    usable: bool,
    count: u32,
    /// Which configuration the prefetcher must have to serve this call.
    fingerprint: String,
}

impl Prefetch {
    pub(super) fn new(config: &Config, dest: &Path) -> Prefetch {
        let dir = config.prefetch.dir.clone().unwrap_or_else(|| dest_folder(dest).join(DEFAULT_DIR));
        // PostgreSQL's recovery restores every segment as RECOVERYXLOG. Other callers, such
        // as pg_rewind --restore-target-wal (which names the segment itself), read a few
        // files while they rewrite the data directory, where a prefetcher adding and
        // removing files beside them can make them fail halfway.
        if dest.file_name().is_none_or(|n| n != RECOVERY_DEST) {
            return Prefetch { dir, usable: false, count: 0, fingerprint: String::new() };
        }
        let usable = !is_destination_folder(&dir, dest);
        if !usable {
            log::emit(
                Level::Warn,
                &[
                    ("op", &"wal-fetch"),
                    ("prefetch_dir", &dir.display()),
                    ("error", &"prefetch_dir is the destination's own folder (pg_wal): prefetch is off, since the prefetcher would take and remove PostgreSQL's files there; give it a folder of its own"),
                ],
            );
        }
        Prefetch { dir, usable, count: config.prefetch.count, fingerprint: fingerprint(config) }
    }

    /// Serves `name` from the folder, if it was prefetched. When a prefetcher is fetching it
    /// right now, waits for it (up to `wait`) rather than download the same bytes twice.
    pub(super) fn take(&self, name: &WalFileName, dest: &Path, wait: Duration) -> Option<FetchReport> {
        name.wal_segment()?;
        if !self.usable {
            return None;
        }
        let path = self.dir.join(name.to_string());
        let claim = self.dir.join(format!(".{name}.claim"));
        let deadline = std::time::Instant::now() + wait;
        while !path.exists() && claim_is_live(&claim) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // Out of the servable names first, so it is never served twice (PostgreSQL may keep
        // the file it gets, and later recycle it by writing over it), and so that the file
        // whose mark is read below is the one served: another prefetcher sharing the folder
        // may rename its own file onto the name at any moment.
        let served = self.dir.join(format!(".{name}{SERVED}"));
        fs::rename(&path, &served).ok()?;
        let size = fs::metadata(&served).ok()?.len();
        let mark = xattr::get(&served, PREFETCH_VERIFIED_XATTR).ok().flatten().unwrap_or_default();
        let mark = String::from_utf8_lossy(&mark);
        let (verified, fetched_by) = mark.split_once(' ').unwrap_or((&mark, ""));
        if fetched_by != self.fingerprint {
            // Fetched under another configuration (another store, say), or with no mark to
            // say which: not for this call, nor for any other now.
            let _ = fs::remove_file(&served);
            return None;
        }
        let verified = match verified {
            "sha256" => "sha256",
            "none" => "none",
            _ => "unknown",
        };
        // Then a second link as DEST. PostgreSQL deletes the restored file before it asks
        // for the next one; dropping the last link of a 16 MiB file (freeing its pages and
        // blocks) takes milliseconds of replay's time, so the prefetcher drops this one
        // later, in the background. Where links cannot be made, the file itself is renamed
        // into place.
        match fs::hard_link(&served, dest).or_else(|_| fs::rename(&served, dest)) {
            Ok(()) => Some(FetchReport { bytes_stored: 0, bytes_out: size, verified, prefetched: true }),
            Err(e) => {
                log::emit(
                    Level::Warn,
                    &[
                        ("op", &"wal-fetch"),
                        ("file", name),
                        ("prefetch_dir", &self.dir.display()),
                        ("error", &format!("cannot move a prefetched file to the destination ({e}); fetching from the store instead: put prefetch_dir on the file system of pg_wal")),
                    ],
                );
                let _ = fs::remove_file(&served);
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
        if !self.usable || self.count == 0 || !size.is_power_of_two() {
            return;
        }
        // The recovery's prefetcher moves its window on (and cleans up, in the background);
        // only without one is the folder cleaned here and a prefetcher started.
        if tell_prefetcher(&self.dir, name, size, &self.fingerprint) {
            return;
        }
        clean(&self.dir, name.timeline().0, segment);
        let wanted = next_segments(*name, self.count, size);
        if wanted.iter().all(|n| self.dir.join(n.to_string()).exists()) {
            return;
        }
        let mut args: Vec<std::ffi::OsString> = child_args.iter().map(Into::into).collect();
        args.extend(["wal-prefetch".into(), name.to_string().into(), self.dir.clone().into(), size.to_string().into()]);
        // A lower CPU priority: replay is one process on one core, and the prefetcher's
        // decompression and hashing should use only what replay leaves idle, not take turns
        // with it.
        if let Err(e) = background::spawn_detached(&args, PREFETCH_NICE) {
            log::emit(
                Level::Warn,
                &[("op", &"wal-fetch"), ("file", name), ("error", &format!("cannot start prefetch: {e}"))],
            );
        }
    }
}

/// Removes prefetched (and served) segments of other timelines or before `segment`, and
/// leftovers of prefetchers that died: at once when the process named in them is gone, after
/// [`STALE_AFTER`] otherwise (its PID may have been reused). Nothing else: only segments
/// are ever prefetched, and a folder set by hand may hold files that are not ours.
fn clean(dir: &Path, timeline: u32, segment: SegmentId) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let served = file.strip_prefix('.').and_then(|f| f.strip_suffix(SERVED));
        let name = served.unwrap_or(file);
        let stale = match WalFileName::parse(name) {
            Ok(WalFileName::Segment(t, s)) => t.0 != timeline || s < segment,
            Ok(_) => false,
            Err(_) => {
                is_leftover(file)
                    && (owner_is_gone(&entry.path(), file)
                        || entry
                            .metadata()
                            .and_then(|m| m.modified())
                            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > STALE_AFTER)
                            .unwrap_or(true))
            }
        };
        if stale {
            if served.is_some() {
                drop_cached_pages(&entry.path());
            }
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether files in `dir` can carry the mark a prefetched file is served by.
fn keeps_marks(dir: &Path) -> bool {
    const PROBE: &str = "user.walrs.probe";
    let kept = xattr::set(dir, PROBE, b"1").is_ok();
    let _ = xattr::remove(dir, PROBE);
    kept
}

/// Whether `dir` is the folder `dest` is in: a segment there is PostgreSQL's, not ours.
fn is_destination_folder(dir: &Path, dest: &Path) -> bool {
    match (fs::canonicalize(dir), fs::canonicalize(dest_folder(dest))) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether the process that made a leftover is known to be gone: the PID ending a temporary
/// file's name, or written in a claim. A claim not written yet (its maker is between
/// creating and writing it) names no one: not gone.
fn owner_is_gone(path: &Path, file: &str) -> bool {
    let pid = match file.rsplit_once(".walrs-partial.") {
        Some((_, pid)) => pid.parse::<i32>().ok(),
        None => fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<i32>().ok()),
    };
    pid.is_some_and(|pid| pid > 0 && !background::process_exists(pid))
}

/// A claim or a download's temporary file (`.<name>.claim`, `.<name>.walrs-partial.<pid>`).
fn is_leftover(file: &str) -> bool {
    file.starts_with('.') && (file.ends_with(".claim") || file.contains(".walrs-partial."))
}

/// Drops a served segment's pages from the page cache. The file is PostgreSQL's now (the
/// same inode as `pg_wal/<name>`), and PostgreSQL has read past it: it asked for a later
/// segment. Without this a recovery fills memory with WAL it never reads again (16 MiB a
/// segment, gigabytes in a long replay), pushing out the relation pages replay works on;
/// and each new prefetched file takes fresh pages instead of the ones just freed, which on
/// a VM that returns free memory to its host costs a host fault per page. PostgreSQL does
/// the same with WAL it will not archive (`XLogFileClose`). Only clean pages go (the kernel
/// starts writing dirty ones and keeps them), so nothing is lost: a later read comes from
/// disk.
fn drop_cached_pages(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(file) = fs::File::open(path) {
        // SAFETY: posix_fadvise reads nothing from our memory; the descriptor is open.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Whether a claim belongs to a prefetcher that is still running (its PID is in the claim):
/// a claim left by a killed prefetcher must not make wal-fetch wait.
fn claim_is_live(claim: &Path) -> bool {
    let Ok(text) = fs::read_to_string(claim) else { return false };
    text.trim().parse::<i32>().is_ok_and(background::process_exists)
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

/// The background prefetcher: `wal-rs wal-prefetch NAME DIR SIZE`.
///
/// It keeps the `prefetch_count` segments after the last one served in the folder, for as
/// long as the recovery goes on: each wal-fetch that is served tells it, through the
/// socket in the folder, which segment PostgreSQL took, and the window moves on. One
/// process for the whole recovery, with its store connections kept warm, instead of one per
/// segment. It exits once no wal-fetch has called for `IDLE_EXIT`, when the server it
/// works for has stopped, or when its folder or socket is gone (a new prefetcher took over).
/// Where the socket cannot be made (a path too long for a Unix socket), it fetches one
/// window and exits, as a one-shot helper.
pub(super) async fn run(config: &Config, after: &str, dir: &Path, segment_size: u32) -> Result<u32, Error> {
    let after = WalFileName::parse(after).map_err(|e| Error::Usage(e.to_string()))?;
    if !segment_size.is_power_of_two() {
        return Err(Error::Usage(format!("segment size {segment_size} is not a power of two")));
    }
    fs::create_dir_all(dir).map_err(|e| Error::local("create", dir, e))?;
    if !keeps_marks(dir) {
        // A file is served only with the mark that says which configuration fetched it.
        log::emit(
            Level::Warn,
            &[
                ("op", &"wal-prefetch"),
                ("prefetch_dir", &dir.display()),
                ("error", &"the prefetch folder's file system keeps no user extended attributes, which mark what was verified and by which configuration: prefetch is off; set prefetch_dir to a folder on a file system that does (ext4, xfs)"),
            ],
        );
        return Ok(0);
    }
    let ours = fingerprint(config);
    let socket = match bind(dir, &after, segment_size, &ours) {
        Bound::Listening(socket) => Some(socket),
        Bound::OtherIsRunning => return Ok(0),
        Bound::Unavailable => None,
    };
    // What a prefetcher that was killed left (its claims and temporary files): at once, not
    // only when a later call moves the window.
    if let Some(segment) = after.wal_segment() {
        clean(dir, after.timeline().0, segment);
    }
    let store = open_store(config).await?;
    let mut window = Window {
        position: after,
        segment_size,
        count: config.prefetch.count,
        concurrency: config.prefetch.concurrency.max(1),
        stopped: false,
        in_flight: HashSet::new(),
        tasks: FuturesUnordered::new(),
        elsewhere: HashSet::new(),
        fetched: 0,
        warned_full: false,
        prefetch: ForPrefetch { fingerprint: ours, stop: Arc::new(AtomicBool::new(false)) },
    };
    window.schedule(&store, dir, config);
    let Some(socket) = socket else {
        while window.next_done(dir).await {
            window.schedule(&store, dir, config);
        }
        return Ok(window.fetched);
    };
    let server = ServerWatch::new();
    let mut last_call = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Whether to remove what was fetched and not served, on the way out: yes, unless the
    // folder is no longer ours (deleted, or another prefetcher's).
    let drop_unserved = loop {
        tokio::select! {
            accepted = socket.listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let call = read_call(stream, segment_size, &window.prefetch.fingerprint).await;
                    if let Some(Call::OtherConfig) = call {
                        // Make way: the next wal-fetch starts a prefetcher with its own.
                        break true;
                    }
                    if let Some(Call::Took(name)) = call {
                        last_call = Instant::now();
                        window.move_to(name);
                        window.schedule(&store, dir, config);
                        if let Some(segment) = name.wal_segment() {
                            clean(dir, name.timeline().0, segment);
                        }
                    }
                }
            }
            true = window.next_done(dir) => window.schedule(&store, dir, config),
            _ = tick.tick() => {
                if !socket.is_ours() {
                    break false;
                }
                if server.has_stopped() || (window.in_flight.is_empty() && last_call.elapsed() >= IDLE_EXIT) {
                    break true;
                }
            }
        }
    };
    // Downloads under way run on blocking threads, which the process's exit would cut off
    // mid-file, leaving their temporary files and claims in pg_wal: stopped and waited for.
    window.stop(dir).await;
    if drop_unserved {
        window.drop_unserved(dir);
    }
    Ok(window.fetched)
}

/// How long an exiting prefetcher waits for its downloads to stop: each checks at its next
/// chunk, or before its next attempt (at most the 5 s between retries).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A prefetcher with no wal-fetch calling for this long exits (and removes what it fetched
/// that was never served): the recovery has ended, or is paused.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// The prefetcher's socket, in the prefetch folder (dot prefix: never served).
const SOCKET: &str = ".prefetcher.sock";

/// The segments a prefetcher keeps ready, and the downloads under way.
struct Window {
    /// The segment PostgreSQL took last: the window is the `count` after it.
    position: WalFileName,
    segment_size: u32,
    count: u32,
    concurrency: usize,
    /// The end of the archive (or an error) was met: nothing more until the next call.
    stopped: bool,
    in_flight: HashSet<WalFileName>,
    /// Not spawned: the store's futures are not `Send`, and one thread is plenty.
    tasks: FuturesUnordered<LocalBoxFuture<'static, (WalFileName, Result<Fetched, Error>)>>,
    /// The configuration's fingerprint, marked on each file fetched, and the flag that stops
    /// the downloads.
    prefetch: ForPrefetch,
    /// Segments another process is fetching: not tried again until the next call.
    elsewhere: HashSet<WalFileName>,
    fetched: u32,
    /// A full file system was reported once already.
    warned_full: bool,
}

/// Free space the prefetcher always leaves on its folder's file system, so that PostgreSQL
/// never meets a full disk because of it (a standby's WAL receiver stops the server at
/// ENOSPC): this many segments, and at least [`RESERVE_PER_MILLE`] of the file system.
const RESERVE_SEGMENTS: u64 = 4;
const RESERVE_PER_MILLE: u64 = 10;

/// Whether `downloads` more segments fit in `dir`'s file system above the reserve. When
/// the file system cannot say, yes: prefetching stays as it was.
fn room_for(dir: &Path, downloads: usize, segment_size: u32) -> bool {
    let Ok(fs) = rustix::fs::statvfs(dir) else { return true };
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    let segment = u64::from(segment_size);
    let reserve = (RESERVE_SEGMENTS * segment).max(total / 1000 * RESERVE_PER_MILLE);
    free >= reserve.saturating_add(downloads as u64 * segment)
}

impl Window {
    fn wanted(&self) -> Vec<WalFileName> {
        next_segments(self.position, self.count, self.segment_size)
    }

    fn move_to(&mut self, name: WalFileName) {
        self.position = name;
        // "Not in the archive" is never remembered past the next call.
        self.stopped = false;
        self.elsewhere.clear();
    }

    /// Starts downloads of missing segments of the window, oldest first, up to the
    /// concurrency.
    fn schedule(&mut self, store: &Arc<Store>, dir: &Path, config: &Config) {
        if self.stopped {
            return;
        }
        for name in self.wanted() {
            if self.in_flight.len() >= self.concurrency {
                break;
            }
            // Present, or already served (taken before its wal-fetch's call reached us).
            let here = dir.join(name.to_string()).exists() || dir.join(format!(".{name}{SERVED}")).exists();
            if here || self.in_flight.contains(&name) || self.elsewhere.contains(&name) {
                continue;
            }
            // Asked only before a download starts, not for every name of the window.
            if !room_for(dir, self.in_flight.len() + 1, self.segment_size) {
                if !self.warned_full {
                    self.warned_full = true;
                    log::emit(
                        Level::Warn,
                        &[
                            ("op", &"wal-prefetch"),
                            ("prefetch_dir", &dir.display()),
                            ("error", &"too little free space to prefetch more: prefetching waits until there is room again (wal-fetch still fetches what PostgreSQL asks for)"),
                        ],
                    );
                }
                break;
            }
            self.in_flight.insert(name);
            let (store, dir, config, prefetch) =
                (store.clone(), dir.to_path_buf(), config.clone(), self.prefetch.clone());
            self.tasks.push(
                async move {
                    let result = fetch_claimed(&store, &name, &dir, &config, &prefetch).await;
                    (name, result)
                }
                .boxed_local(),
            );
        }
    }

    /// Waits for a download to end and records it; false when none is under way.
    async fn next_done(&mut self, dir: &Path) -> bool {
        let Some((name, result)) = self.tasks.next().await else { return false };
        self.in_flight.remove(&name);
        match result {
            Ok(Fetched::ClaimedElsewhere) => {
                self.elsewhere.insert(name);
            }
            Ok(Fetched::Done) => {
                self.fetched += 1;
                // Fetched for a window that has moved on (PostgreSQL went past it, or to
                // another timeline): it will never be asked for.
                if !self.wanted().contains(&name) {
                    let _ = fs::remove_file(dir.join(name.to_string()));
                }
            }
            // The end of the archive, for now: stop, remember nothing.
            Err(Error::WalNotFound { .. }) => self.stopped = true,
            Err(e) => {
                self.stopped = true;
                log::emit(
                    Level::Warn,
                    &[("op", &"wal-prefetch"), ("file", &name), ("outcome", &"error"), ("error", &e)],
                );
            }
        }
        true
    }

    /// Stops the downloads under way and waits for them (at most [`STOP_WAIT`]), so each
    /// removes its temporary file and claim. One stuck in a call that does not return (a
    /// hung mount) has both removed for it: nothing else would before they are stale.
    async fn stop(&mut self, dir: &Path) {
        self.prefetch.stop.store(true, Ordering::Relaxed);
        self.stopped = true;
        let wanted = self.wanted();
        let _ = tokio::time::timeout(STOP_WAIT, async {
            while let Some((name, result)) = self.tasks.next().await {
                self.in_flight.remove(&name);
                // Finished just before it saw the flag, for a window that moved on.
                if matches!(result, Ok(Fetched::Done)) && !wanted.contains(&name) {
                    let _ = fs::remove_file(dir.join(name.to_string()));
                }
            }
        })
        .await;
        for name in self.in_flight.drain() {
            let segment = dir.join(name.to_string());
            let _ = fs::remove_file(temp_path(&segment));
            let _ = fs::remove_file(dir.join(format!(".{name}.claim")));
        }
    }

    /// Removes the window's prefetched segments that no wal-fetch took, and the last one
    /// served.
    fn drop_unserved(&self, dir: &Path) {
        for name in self.wanted() {
            let _ = fs::remove_file(dir.join(name.to_string()));
        }
        let _ = fs::remove_file(dir.join(format!(".{}{SERVED}", self.position)));
    }
}

/// How a download of the window ended, when it did not fail.
enum Fetched {
    Done,
    /// Another process holds the segment's claim and is fetching it.
    ClaimedElsewhere,
}

/// Downloads `name` into the folder under an exclusive claim (so that two prefetchers never
/// fetch the same segment, and wal-fetch waits for it instead of fetching it twice).
async fn fetch_claimed(
    store: &Arc<Store>,
    name: &WalFileName,
    dir: &Path,
    config: &Config,
    prefetch: &ForPrefetch,
) -> Result<Fetched, Error> {
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
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(Fetched::ClaimedElsewhere),
        // The folder is gone, say.
        Err(e) => return Err(Error::local("create", &claim, e)),
    }
    // No proof of absence: a prefetcher that meets the end of the archive just stops.
    let result = fetch_with_retry(store, name, &dir.join(name.to_string()), config, Some(prefetch), false).await;
    let _ = fs::remove_file(&claim);
    result.map(|_| Fetched::Done)
}

/// Listens in the folder; where a live prefetcher answers there already, it is told the
/// position instead.
fn bind(dir: &Path, after: &WalFileName, segment_size: u32, fingerprint: &str) -> Bound {
    background::bind(&dir.join(SOCKET), || tell_prefetcher(dir, after, segment_size, fingerprint))
}

/// Tells the folder's live prefetcher that `name` was taken; false when there is none.
fn tell_prefetcher(dir: &Path, name: &WalFileName, segment_size: u32, fingerprint: &str) -> bool {
    use std::io::Write;
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(dir.join(SOCKET)) else { return false };
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    stream.write_all(format!("{name} {segment_size} {fingerprint}\n").as_bytes()).is_ok()
}

/// What a wal-fetch said.
enum Call {
    /// It took this segment.
    Took(WalFileName),
    /// It runs with another configuration: this prefetcher should make way.
    OtherConfig,
}

/// Reads one "NAME SIZE FINGERPRINT" line from a wal-fetch; `None` for anything else.
async fn read_call(stream: tokio::net::UnixStream, segment_size: u32, fingerprint: &str) -> Option<Call> {
    let (_, line) = background::read_request(stream).await?;
    let mut words = line.split_whitespace();
    let (name, size, theirs) = (words.next()?, words.next()?, words.next()?);
    if theirs != fingerprint {
        return Some(Call::OtherConfig);
    }
    let name = WalFileName::parse(name).ok()?;
    (name.wal_segment().is_some() && size.parse::<u32>().ok()? == segment_size).then_some(Call::Took(name))
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

    /// A scratch pg_wal with an empty `walrs_prefetch` in it, under target/: on the build's
    /// disk, which keeps user extended attributes and, unlike a tmpfs /tmp, a page cache
    /// apart from the files.
    fn scratch_pg_wal() -> (tempfile::TempDir, PathBuf) {
        let under = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        fs::create_dir_all(&under).unwrap();
        let pg_wal = tempfile::tempdir_in(under).unwrap();
        let dir = pg_wal.path().join("walrs_prefetch");
        fs::create_dir(&dir).unwrap();
        (pg_wal, dir)
    }

    #[test]
    fn only_a_file_marked_by_this_configuration_is_served() {
        let (pg_wal, dir) = scratch_pg_wal();
        assert!(keeps_marks(&dir), "the test needs a file system with user extended attributes");
        let prefetch = Prefetch { dir: dir.clone(), usable: true, count: 8, fingerprint: "ours".into() };
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let file = dir.join(name.to_string());
        let dest = pg_wal.path().join("RECOVERYXLOG");
        for mark in [None, Some("sha256 theirs"), Some("sha256")] {
            fs::write(&file, b"segment").unwrap();
            if let Some(m) = mark {
                xattr::set(&file, PREFETCH_VERIFIED_XATTR, m.as_bytes()).unwrap();
            }
            assert!(prefetch.take(&name, &dest, Duration::ZERO).is_none(), "served with mark {mark:?}");
            // The mark is read once the file is out of the servable names, so that it is the
            // mark of the file served; a file not ours is then not left for anyone.
            assert!(!dest.exists());
            let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert!(left.is_empty(), "left in the folder: {left:?}");
        }
        fs::write(&file, b"segment").unwrap();
        xattr::set(&file, PREFETCH_VERIFIED_XATTR, b"sha256 ours").unwrap();
        let report = prefetch.take(&name, &dest, Duration::ZERO).expect("served with our mark");
        assert_eq!(report.verified, "sha256");
        assert_eq!(fs::read(&dest).unwrap(), b"segment");
        assert!(!file.exists(), "a served file stays servable");
    }

    #[test]
    fn prefetching_leaves_room_on_the_file_system() {
        let d = tempfile::tempdir().unwrap();
        assert!(room_for(d.path(), 1, 16 << 20), "the test needs a few hundred MiB free");
        // A petabyte of downloads fits on no disk here.
        assert!(!room_for(d.path(), 1 << 20, 1 << 30));
    }

    #[test]
    fn the_destinations_own_folder_is_never_a_prefetch_folder() {
        let d = tempfile::tempdir().unwrap();
        let pg_wal = d.path().join("pg_wal");
        fs::create_dir_all(pg_wal.join("walrs_prefetch")).unwrap();
        let dest = pg_wal.join("RECOVERYXLOG");
        assert!(is_destination_folder(&pg_wal, &dest));
        assert!(is_destination_folder(&pg_wal.join("walrs_prefetch/.."), &dest));
        assert!(!is_destination_folder(&pg_wal.join("walrs_prefetch"), &dest));
        assert!(!is_destination_folder(&d.path().join("not-yet"), &dest));
    }

    #[test]
    fn only_servable_files_survive_cleaning() {
        let d = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - STALE_AFTER - Duration::from_secs(60);
        // A process that has exited, and this one.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let alive = std::process::id();
        let (dead_partial, live_partial) = (
            format!(".000000020000000000000009.walrs-partial.{dead}"),
            format!(".000000020000000000000009.walrs-partial.{alive}"),
        );
        fs::write(d.path().join(".000000020000000000000010.claim"), dead.to_string()).unwrap();
        fs::write(d.path().join(".000000020000000000000011.claim"), alive.to_string()).unwrap();
        for (f, aged) in [
            // Fresh, but their process is gone: a prefetcher that was killed.
            (dead_partial.as_str(), false),
            // Fresh, and their process runs: a download under way.
            (live_partial.as_str(), false),
            ("000000010000000000000005", false),
            ("000000020000000000000007", false),
            ("000000020000000000000009", false),
            (".x.claim", false),
            (".y.claim", true),
            (".000000020000000000000009.walrs-partial.77", true),
            (".000000020000000000000007.served", false),
            (".000000020000000000000008.served", false),
            (SOCKET, true),
            // Not ours: a folder set by hand may hold them. They stay, however old.
            ("00000002.history", true),
            ("postgresql.conf", true),
            (".hidden", true),
        ] {
            let path = d.path().join(f);
            fs::write(&path, b"x").unwrap();
            if aged {
                fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
            }
        }
        clean(d.path(), 2, SegmentId { log: 0, seg: 8 });
        let mut left: Vec<String> =
            fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        // Another timeline and older segments go, served or not, and so do old claims and
        // temporary files; a fresh claim, the segment just served, the socket and files
        // that are not the prefetcher's stay.
        let live_partial = live_partial.as_str();
        assert_eq!(
            left,
            [
                ".000000020000000000000008.served",
                live_partial,
                ".000000020000000000000011.claim",
                ".hidden",
                ".prefetcher.sock",
                ".x.claim",
                "00000002.history",
                "000000020000000000000009",
                "postgresql.conf"
            ]
        );
    }

    /// How many of `path`'s pages are in the page cache (mincore(2)).
    fn cached_pages(path: &Path) -> usize {
        use std::os::fd::AsRawFd;
        let file = fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared mapping of an open file, unmapped before returning;
        // mincore writes one byte per page into a buffer with room for every page.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(addr, libc::MAP_FAILED);
            let mut pages = vec![0u8; len.div_ceil(page)];
            let rc = libc::mincore(addr, len, pages.as_mut_ptr());
            libc::munmap(addr, len);
            assert_eq!(rc, 0);
            pages.iter().filter(|p| *p & 1 == 1).count()
        }
    }

    #[test]
    fn a_served_segment_leaves_the_page_cache_and_stays_whole_in_pg_wal() {
        let (pg_wal, dir) = scratch_pg_wal();
        // PostgreSQL's name for the segment, and the prefetcher's link to the same file.
        let kept = pg_wal.path().join("000000010000000000000003");
        let served = dir.join(".000000010000000000000003.served");
        let content: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(&kept, &content).unwrap();
        fs::File::open(&kept).unwrap().sync_all().unwrap();
        fs::hard_link(&kept, &served).unwrap();
        assert_eq!(fs::read(&kept).unwrap(), content);
        assert!(cached_pages(&kept) > 0, "the file just read is in the page cache");

        clean(&dir, 1, SegmentId { log: 0, seg: 4 });

        assert!(!served.exists());
        assert_eq!(cached_pages(&kept), 0);
        assert_eq!(fs::read(&kept).unwrap(), content);
    }
}
