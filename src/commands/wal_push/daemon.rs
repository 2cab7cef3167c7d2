//! The archive daemon (`wal-rs daemon PG_WAL`): one long-lived process per primary that
//! uploads ready WAL as soon as PostgreSQL marks it ready, and answers wal-push over a Unix
//! socket (`walrs_archive_status/.daemon.sock`).
//!
//! Why: PostgreSQL calls archive_command one file at a time and waits for each. Pushing
//! ahead from each wal-push (see `mod.rs`) already overlaps uploads, but every call still
//! starts cold, and a call that finds its file pushed ahead must ask the store before it
//! may trust the record on disk (a record can be stale or forged; see `ahead.rs`). The
//! daemon keeps one store client with warm connections, starts each upload the moment a
//! `.ready` file appears, and holds what it stored in memory: no file can forge that, and
//! it dies with the process.
//!
//! What a wal-push call gets: the daemon's answer for exactly that name, only for the
//! same configuration, and only while the file is the one uploaded (same device, inode,
//! size, mtime and ctime as before and after the upload). Anything else (no daemon, no
//! answer, an upload that failed, a file that changed) and wal-push uploads the file itself,
//! so the daemon can make archiving faster but never acknowledge what is not stored.
//!
//! It exits when the server whose data directory it runs in stops (`postmaster.pid`), when
//! its socket is removed or replaced, when a call comes from another configuration, or
//! after `IDLE_EXIT` with nothing ready and nobody asking.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{FutureExt, LocalBoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use super::ahead::{FileStamp, StatusDir, STATUS_DIR};
use super::file::{push_file, PushContext, PushReport};
use crate::codec::Compression;
use crate::commands::background::{self, fingerprint, Bound, ServerWatch};
use crate::commands::common::{open_store, retry_transient};
use crate::config::Config;
use crate::error::Error;
use crate::layout;
use crate::log::{self, Level};
use crate::store::ObjectKey;
use crate::wal::WalFileName;

const SOCKET: &str = ".daemon.sock";
/// With nothing ready and no call for this long, the daemon exits; the next wal-push
/// starts another.
const IDLE_EXIT: Duration = Duration::from_secs(60);
/// How often `archive_status` is read for new `.ready` files.
const SCAN_EVERY: Duration = Duration::from_millis(20);
/// A failed upload is not started again by the scan before this (a call still may).
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long the first wal-push waits for a daemon it started to listen.
const START_WAIT: Duration = Duration::from_secs(1);
/// Longest socket path a Unix socket takes (`sun_path`, less the terminating zero).
const MAX_SOCKET_PATH: usize = 107;

/// What the daemon stored for one name, as it tells wal-push.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ack {
    name: String,
    sha256: String,
    key: String,
    bytes_in: u64,
    bytes_stored: u64,
    outcome: String,
    /// Stored before the call came (pushed ahead), rather than while it waited.
    ahead: bool,
    /// The file as it was throughout the upload.
    file: FileStamp,
}

#[derive(Debug, Serialize, Deserialize)]
// Externally tagged: serde's internally tagged enums cannot carry the i128 times.
#[serde(rename_all = "kebab-case")]
enum Reply {
    Stored(Ack),
    Failed {
        error: String,
    },
    OtherConfig,
    /// The ready files it holds stored, PostgreSQL not having asked for them yet.
    Held {
        names: Vec<String>,
    },
}

/// How long a call waits for the list of what the daemon holds: it answers from memory.
const HELD_WAIT: Duration = Duration::from_secs(1);
/// Longest answer to `held` taken: `archive_ahead` (at most 10,000) names of 24 characters.
const HELD_REPLY_LIMIT: u64 = 1 << 20;

/// What asking the daemon came to.
pub(super) enum Asked {
    /// The file is stored: acknowledge it.
    Stored(PushReport),
    /// A daemon answers but did not store this file: upload it here, and only it.
    NotStored,
    /// No daemon can run here: push as without one.
    NoDaemon,
}

/// Asks the daemon of `pg_wal` (starting one if none answers) to confirm that the file at
/// `path` is stored, waiting while it uploads it.
pub(super) async fn ask(ctx: &PushContext, pg_wal: &Path, path: &Path, name: &str, child_args: &[String]) -> Asked {
    let socket = pg_wal.join(STATUS_DIR).join(SOCKET);
    let stream = match UnixStream::connect(&socket).await {
        Ok(stream) => stream,
        Err(_) => match start(pg_wal, &socket, child_args).await {
            Some(stream) => stream,
            None => return Asked::NoDaemon,
        },
    };
    let request = format!("push {name} {}\n", ctx.fingerprint());
    // Half the command's deadline at most: a daemon stuck on a slow store must leave this
    // call the time to upload the file itself, not use it all up waiting. No answer (the
    // daemon died or stopped answering): this call uploads the file itself.
    match exchange(stream, &request, 64 << 10, ctx.config.retry.deadline / 2).await {
        Some(Reply::Stored(ack)) => {
            confirm(ctx.config.compression, path, name, &ack).map_or(Asked::NotStored, Asked::Stored)
        }
        Some(Reply::Failed { error }) => {
            log::emit(Level::Debug, &[("op", &"wal-push"), ("file", &name), ("daemon_error", &error)]);
            Asked::NotStored
        }
        Some(Reply::OtherConfig | Reply::Held { .. }) | None => Asked::NotStored,
    }
}

/// The ready files the daemon of `pg_wal` holds stored ahead (still as it uploaded them),
/// for the safety valve to leave out of the backlog: the daemon writes no records, so
/// without this the valve would count up to `archive_ahead` stored segments and drop the
/// one asked for before the backlog really passed the limit. Empty when no daemon of this
/// configuration answers at once. The names never acknowledge anything: a wrong list can
/// only keep the valve from dropping.
pub(super) async fn held(ctx: &PushContext, pg_wal: &Path) -> HashSet<String> {
    let socket = pg_wal.join(STATUS_DIR).join(SOCKET);
    let Ok(stream) = UnixStream::connect(&socket).await else { return HashSet::new() };
    let request = format!("held {}\n", ctx.fingerprint());
    let wait = HELD_WAIT.min(ctx.config.retry.deadline / 10);
    match exchange(stream, &request, HELD_REPLY_LIMIT, wait).await {
        Some(Reply::Held { names }) => names.into_iter().filter(|n| WalFileName::parse(n).is_ok()).collect(),
        _ => HashSet::new(),
    }
}

/// Sends one request line and reads the one reply line, of at most `limit` bytes, within
/// `wait`; `None` if the daemon closed, sent something else, or took too long.
async fn exchange(mut stream: UnixStream, request: &str, limit: u64, wait: Duration) -> Option<Reply> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let (_, line) = background::read_line(stream, limit, wait).await?;
    serde_json::from_str(&line).ok()
}

/// The daemon's answer holds for this call only for this name, an object where this
/// name's objects go, and the file as it was uploaded.
fn confirm(compression: Compression, path: &Path, name: &str, ack: &Ack) -> Option<PushReport> {
    let stamp = FileStamp::of(path)?;
    if ack.name != name || ack.file != stamp {
        return None;
    }
    let key = ObjectKey::new(&ack.key).ok()?;
    let wal_name = WalFileName::parse(name).ok()?;
    if !layout::wal_candidates(&wal_name, compression).iter().any(|(k, _)| *k == key) {
        return None;
    }
    let outcome = match (ack.ahead, ack.outcome.as_str()) {
        (true, _) => "archived-ahead",
        (false, "already-archived") => "already-archived",
        (false, _) => "stored",
    };
    Some(PushReport {
        bytes_in: stamp.size,
        bytes_stored: if ack.ahead { 0 } else { ack.bytes_stored },
        outcome,
        sha256: Some(ack.sha256.parse().ok()?),
        key: Some(key),
    })
}

/// Starts a daemon and waits for it to listen; `None` where none can run.
async fn start(pg_wal: &Path, socket: &Path, child_args: &[String]) -> Option<UnixStream> {
    let absolute = std::env::current_dir().ok()?.join(socket);
    if absolute.as_os_str().len() > MAX_SOCKET_PATH || fs::create_dir_all(pg_wal.join(STATUS_DIR)).is_err() {
        return None;
    }
    let mut args: Vec<OsString> = child_args.iter().map(Into::into).collect();
    args.extend(["daemon".into(), pg_wal.as_os_str().to_owned()]);
    if let Err(e) = background::spawn_detached(&args, 0) {
        log::emit(Level::Warn, &[("op", &"wal-push"), ("error", &format!("cannot start the archive daemon: {e}"))]);
        return None;
    }
    let deadline = Instant::now() + START_WAIT;
    while Instant::now() < deadline {
        if let Ok(stream) = UnixStream::connect(socket).await {
            return Some(stream);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// `wal-rs daemon PG_WAL`: serves until its server stops or nothing happens for a while;
/// returns how many files it stored.
pub(crate) async fn run(config: &Config, pg_wal: &Path) -> Result<u32, Error> {
    let dir = pg_wal.join(STATUS_DIR);
    fs::create_dir_all(&dir).map_err(|e| Error::local("create", &dir, e))?;
    let socket_path = dir.join(SOCKET);
    let socket = match background::bind(&socket_path, || std::os::unix::net::UnixStream::connect(&socket_path).is_ok())
    {
        Bound::Listening(socket) => socket,
        Bound::OtherIsRunning | Bound::Unavailable => return Ok(0),
    };
    let store = open_store(config).await?;
    let mut daemon = Daemon {
        ctx: PushContext::new(store, config.clone()),
        status: StatusDir::new(pg_wal),
        fingerprint: fingerprint(config),
        stored: HashMap::new(),
        in_flight: HashSet::new(),
        waiting: HashMap::new(),
        failed: HashMap::new(),
        uploads: FuturesUnordered::new(),
        pushed: 0,
        last_activity: Instant::now(),
    };
    let server = ServerWatch::new();
    let mut requests = FuturesUnordered::new();
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = Instant::now();
    loop {
        tokio::select! {
            accepted = socket.listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    requests.push(background::read_request(stream).boxed_local());
                }
            }
            Some(request) = requests.next(), if !requests.is_empty() => {
                if let Some((stream, line)) = request {
                    if !daemon.on_request(stream, &line) {
                        break;
                    }
                }
            }
            Some((name, file, result)) = daemon.uploads.next(), if !daemon.uploads.is_empty() => {
                daemon.on_uploaded(name, file, result);
                daemon.schedule();
            }
            _ = scan.tick() => {
                daemon.schedule();
                if checked.elapsed() >= Duration::from_secs(1) {
                    checked = Instant::now();
                    let idle = daemon.in_flight.is_empty() && daemon.last_activity.elapsed() >= IDLE_EXIT;
                    if !socket.is_ours() || server.has_stopped() || idle {
                        break;
                    }
                }
            }
        }
    }
    // Callers still waiting see the socket close and upload their file themselves.
    Ok(daemon.pushed)
}

type Upload = LocalBoxFuture<'static, (String, Option<FileStamp>, Result<PushReport, Error>)>;

struct Daemon {
    ctx: Arc<PushContext>,
    status: StatusDir,
    fingerprint: String,
    /// Stored, with the file as it was uploaded, until PostgreSQL marks it done.
    stored: HashMap<String, Ack>,
    in_flight: HashSet<String>,
    /// Calls waiting for an upload in flight.
    waiting: HashMap<String, Vec<UnixStream>>,
    /// Failed uploads, not started again by the scan before `RETRY_AFTER`.
    failed: HashMap<String, Instant>,
    uploads: FuturesUnordered<Upload>,
    pushed: u32,
    last_activity: Instant,
}

impl Daemon {
    /// Answers (or queues) one call; false when the daemon must exit.
    fn on_request(&mut self, stream: UnixStream, line: &str) -> bool {
        self.last_activity = Instant::now();
        let mut words = line.split_whitespace();
        // `push NAME FINGERPRINT`, or `held FINGERPRINT`.
        let (name, theirs) = match (words.next(), words.next(), words.next()) {
            (Some("push"), Some(name), Some(theirs)) => (Some(name), theirs),
            (Some("held"), Some(theirs), None) => (None, theirs),
            _ => return true,
        };
        if theirs != self.fingerprint {
            // A new configuration (another store, say): this daemon's uploads are not for
            // it. Exit, so the next call starts a daemon with the new configuration.
            reply(stream, &Reply::OtherConfig);
            return false;
        }
        let Some(name) = name else {
            reply(stream, &Reply::Held { names: self.held() });
            return true;
        };
        if WalFileName::parse(name).is_err() {
            reply(stream, &Reply::Failed { error: format!("{name:?} is not a WAL file name") });
            return true;
        }
        // Kept after answering, until PostgreSQL marks the file done: the scan must not
        // upload it again meanwhile.
        if let Some(ack) = self.stored.get(name) {
            if FileStamp::of(&self.status.file(name)) == Some(ack.file) {
                reply(stream, &Reply::Stored(Ack { ahead: true, ..ack.clone() }));
                return true;
            }
            self.stored.remove(name);
        }
        if !self.in_flight.contains(name) {
            // The file PostgreSQL waits for goes first, whatever else is in flight.
            self.failed.remove(name);
            self.start(name.to_string());
        }
        self.waiting.entry(name.to_string()).or_default().push(stream);
        true
    }

    /// The ready files stored and not yet asked for, each still the file it uploaded.
    fn held(&self) -> Vec<String> {
        let unchanged = |(name, ack): (&String, &Ack)| FileStamp::of(&self.status.file(name)) == Some(ack.file);
        self.stored.iter().filter(|&entry| unchanged(entry)).map(|(name, _)| name.clone()).collect()
    }

    fn on_uploaded(&mut self, name: String, file: Option<FileStamp>, result: Result<PushReport, Error>) {
        self.in_flight.remove(&name);
        let waiting = self.waiting.remove(&name).unwrap_or_default();
        let stored = match (result, file) {
            (Ok(PushReport { sha256: Some(sha), key: Some(key), bytes_in, bytes_stored, outcome }), Some(file)) => {
                Ok(Ack {
                    name: name.clone(),
                    sha256: sha.to_string(),
                    key: key.to_string(),
                    bytes_in,
                    bytes_stored,
                    outcome: outcome.to_string(),
                    ahead: false,
                    file,
                })
            }
            (Ok(_), None) => Err("the file changed while it was uploaded".to_string()),
            (Ok(_), Some(_)) => Err("the push named no stored object".to_string()),
            (Err(e), _) => Err(e.to_string()),
        };
        match stored {
            Ok(ack) => {
                self.pushed += 1;
                log::emit(
                    Level::Info,
                    &[
                        ("op", &"wal-push"),
                        ("file", &name),
                        ("by", &"daemon"),
                        ("bytes_in", &ack.bytes_in),
                        ("bytes_stored", &ack.bytes_stored),
                        ("outcome", &ack.outcome),
                    ],
                );
                for stream in waiting {
                    reply(stream, &Reply::Stored(ack.clone()));
                }
                self.stored.insert(name, ack);
            }
            Err(error) => {
                log::emit(
                    Level::Warn,
                    &[
                        ("op", &"wal-push"),
                        ("file", &name),
                        ("by", &"daemon"),
                        ("outcome", &"error"),
                        ("error", &error),
                    ],
                );
                for stream in waiting {
                    reply(stream, &Reply::Failed { error: error.clone() });
                }
                self.failed.insert(name, Instant::now());
            }
        }
    }

    /// Forgets what PostgreSQL no longer waits for, and starts uploads of ready files,
    /// oldest first, up to `archive_concurrency` at once and `archive_ahead` stored ahead.
    fn schedule(&mut self) {
        let ready: Vec<String> = self.status.ready_names();
        if !ready.is_empty() {
            self.last_activity = Instant::now();
        }
        let still_ready: HashSet<&String> = ready.iter().collect();
        self.stored.retain(|name, _| still_ready.contains(name));
        self.failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
        let archive = self.ctx.config.archive;
        for name in ready {
            if self.in_flight.len() >= archive.concurrency.max(1)
                || self.in_flight.len() + self.stored.len() >= archive.ahead.max(1)
            {
                break;
            }
            if !self.stored.contains_key(&name) && !self.in_flight.contains(&name) && !self.failed.contains_key(&name) {
                self.start(name);
            }
        }
    }

    fn start(&mut self, name: String) {
        self.in_flight.insert(name.clone());
        let (ctx, path) = (self.ctx.clone(), self.status.file(&name));
        self.uploads.push(
            async move {
                let before = FileStamp::of(&path);
                let deadline = ctx.config.retry.deadline;
                let result = retry_transient("wal-push", &name, deadline, || push_file(&ctx, &path)).await;
                // Only a file that did not change during the upload is known to be stored.
                let file = before.filter(|b| Some(*b) == FileStamp::of(&path));
                (name, file, result)
            }
            .boxed_local(),
        );
    }
}

/// Writes one reply line. A fresh socket's buffer takes it at once; a caller that has gone
/// away simply misses it.
fn reply(stream: UnixStream, reply: &Reply) {
    let Ok(mut stream) = stream.into_std() else { return };
    if stream.set_nonblocking(false).is_err() || stream.set_write_timeout(Some(Duration::from_millis(200))).is_err() {
        return;
    }
    let mut line = serde_json::to_vec(reply).expect("replies serialise");
    line.push(b'\n');
    let _ = stream.write_all(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "000000010000000000000005";

    fn ack_for(path: &Path) -> Ack {
        Ack {
            name: NAME.into(),
            sha256: "ab".repeat(32),
            key: format!("wal_005/{NAME}.lz4"),
            bytes_in: 5,
            bytes_stored: 3,
            outcome: "stored".into(),
            ahead: true,
            file: FileStamp::of(path).unwrap(),
        }
    }

    #[test]
    fn an_answer_holds_only_for_its_name_its_objects_and_the_file_as_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        fs::write(&path, b"bytes").unwrap();
        let ack = ack_for(&path);
        let report = confirm(Compression::Lz4, &path, NAME, &ack).expect("a good answer");
        assert_eq!((report.outcome, report.bytes_in, report.bytes_stored), ("archived-ahead", 5, 0));
        let waited = Ack { ahead: false, ..ack.clone() };
        assert_eq!(confirm(Compression::Lz4, &path, NAME, &waited).unwrap().bytes_stored, 3);

        // Another name's answer, or an object where this name's objects do not go.
        assert!(confirm(Compression::Lz4, &path, "000000010000000000000006", &ack).is_none());
        let elsewhere = Ack { key: "wal_005/000000010000000000000006.lz4".into(), ..ack.clone() };
        assert!(confirm(Compression::Lz4, &path, NAME, &elsewhere).is_none());
        let garbage = Ack { sha256: "not a checksum".into(), ..ack.clone() };
        assert!(confirm(Compression::Lz4, &path, NAME, &garbage).is_none());

        // The file rewritten since the upload, even with the same size (its modification
        // time set apart explicitly: the clock may not have ticked since the stamp).
        fs::write(&path, b"BYTES").unwrap();
        let earlier = std::time::SystemTime::now() - Duration::from_secs(60);
        fs::File::options().write(true).open(&path).unwrap().set_modified(earlier).unwrap();
        assert!(confirm(Compression::Lz4, &path, NAME, &ack).is_none());
    }

    #[test]
    fn replies_round_trip_with_their_file_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        fs::write(&path, b"bytes").unwrap();
        let line = serde_json::to_string(&Reply::Stored(ack_for(&path))).unwrap();
        let Reply::Stored(back) = serde_json::from_str(&line).unwrap() else { panic!("{line}") };
        assert_eq!(back.file, FileStamp::of(&path).unwrap());
    }
}
