//! What wal-rs's two long-lived helpers share: the prefetcher that wal-fetch starts for a
//! recovery, and the archive daemon that wal-push starts for a primary. Each is a detached
//! process that one call starts and later calls talk to over a Unix socket in a folder
//! inside pg_wal. Each serves only calls made with the same configuration (a digest of it,
//! never the text), and exits when its server stops, when its socket is taken away, or
//! after a spell with nothing to do.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::net::UnixListener;

/// Whether a process with this PID exists: the owner of a prefetch claim, or of a
/// temporary file named after it. One that exists but is not ours to signal still counts.
pub(super) fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

/// A digest of the configuration a helper was started with: a call from another
/// configuration (another store, say) must not be served by it. Never printed; secrets are
/// included, so that a changed key counts as a change.
pub(super) fn fingerprint(config: &crate::config::Config) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(format!("{config:?}").as_bytes())[..12])
}

/// Starts `wal-rs ARGS` detached: in its own session (PostgreSQL's signals to the
/// command's process group are not for it), at `nice`, with no stdin or stdout.
pub(super) fn spawn_detached(args: &[OsString], nice: libc::c_int) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    if stderr_is_a_pipe() {
        // The helper outlives this process by up to its idle time: holding a pipe open that
        // long would make whoever reads our stderr to its end (a script, a test harness)
        // wait for it. Its warnings are lost there; the calls report any failure that
        // matters themselves.
        cmd.stderr(Stdio::null());
    }
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and setpriority are async-signal-safe and touch no memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if nice != 0 {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            }
            Ok(())
        });
    }
    cmd.spawn().map(|_| ())
}

/// Whether this process's stderr is a pipe or socket (rather than a file or terminal).
fn stderr_is_a_pipe() -> bool {
    // SAFETY: fstat only writes the struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
}

/// The PostgreSQL server whose data directory is the current directory (where PostgreSQL
/// runs archive_command and restore_command), by the first line of `postmaster.pid`.
pub(super) struct ServerWatch(Option<String>);

impl ServerWatch {
    pub(super) fn new() -> Self {
        ServerWatch(Self::postmaster_pid())
    }

    fn postmaster_pid() -> Option<String> {
        let text = fs::read_to_string("postmaster.pid").ok()?;
        text.lines().next().map(str::to_owned)
    }

    /// The server that was running at the start has stopped (or another one runs).
    pub(super) fn has_stopped(&self) -> bool {
        self.0.is_some() && Self::postmaster_pid() != self.0
    }
}

/// A helper's listening socket, removed when the helper ends unless another took its place.
pub(super) struct Socket {
    pub(super) listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl Socket {
    /// Still the socket at its path: a deleted folder, or a newer helper, ends this one.
    pub(super) fn is_ours(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(&self.path).map(|m| m.ino() == self.inode).unwrap_or(false)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads the one request line a call sends to a helper (briefly: a call writes it at once),
/// and gives the stream back for the answer; `None` for a call that sent nothing usable.
pub(super) async fn read_request(stream: tokio::net::UnixStream) -> Option<(tokio::net::UnixStream, String)> {
    read_line(stream, 256, std::time::Duration::from_millis(500)).await
}

/// Reads one line of at most `limit` bytes within `wait`, and gives the stream back; `None`
/// when the other side sent nothing, closed, or took too long.
pub(super) async fn read_line(
    stream: tokio::net::UnixStream,
    limit: u64,
    wait: std::time::Duration,
) -> Option<(tokio::net::UnixStream, String)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stream).take(limit);
    let read = tokio::time::timeout(wait, reader.read_line(&mut line)).await.ok()?.ok()?;
    (read > 0).then(|| (reader.into_inner().into_inner(), line))
}

pub(super) enum Bound {
    Listening(Socket),
    /// A helper answers at that path already.
    OtherIsRunning,
    /// No socket can be made there (a path too long, a read-only folder).
    Unavailable,
}

/// Listens at `path`. A socket file left by a helper that died is replaced; one that a live
/// helper answers on (`answers` returns true) is left to it.
pub(super) fn bind(path: &Path, answers: impl Fn() -> bool) -> Bound {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..2 {
        match std::os::unix::net::UnixListener::bind(path) {
            Ok(l) => {
                let inode = fs::symlink_metadata(path).map(|m| m.ino()).unwrap_or(0);
                if l.set_nonblocking(true).is_err() {
                    return Bound::Unavailable;
                }
                return match UnixListener::from_std(l) {
                    Ok(listener) => Bound::Listening(Socket { listener, path: path.to_path_buf(), inode }),
                    Err(_) => Bound::Unavailable,
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if answers() {
                    return Bound::OtherIsRunning;
                }
                let _ = fs::remove_file(path);
            }
            Err(_) => return Bound::Unavailable,
        }
    }
    Bound::Unavailable
}
