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
/// configuration (another store, say) must not be served by it. Never printed or logged.
pub(super) fn fingerprint(config: &crate::config::Config) -> String {
    fingerprint_in(config, std::env::vars_os())
}

/// [`fingerprint`] in the environment `vars`. The S3 client takes its endpoint, region and
/// credentials not only from the configuration but from `AWS_*` variables and the profile
/// files they name: a helper started under `AWS_PROFILE=a` would otherwise keep serving
/// (and answering "stored" for) calls that now point at another server or account. So
/// every `AWS_*` variable counts (secrets included: a rotated key is a change too, and the
/// digest is never shown), and so do the size and modification time of the profile files.
fn fingerprint_in(config: &crate::config::Config, vars: impl IntoIterator<Item = (OsString, OsString)>) -> String {
    use sha2::{Digest, Sha256};
    use std::collections::BTreeMap;
    use std::os::unix::ffi::OsStrExt;
    let vars: BTreeMap<OsString, OsString> =
        vars.into_iter().filter(|(name, _)| name.as_bytes().starts_with(b"AWS_") || name == "HOME").collect();
    let mut digest = Sha256::new();
    // Each part length-prefixed, so that no two environments run together into one text.
    let mut part = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    };
    part(format!("{config:?}").as_bytes());
    for (name, value) in &vars {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    for (var, default) in [("AWS_CONFIG_FILE", ".aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")] {
        part(&profile_file_stamp(&vars, var, default));
    }
    hex::encode(&digest.finalize()[..12])
}

/// Size and modification time of the profile file the SDK reads (named by `var`, else
/// `default` under HOME), or nothing when there is none: a profile edited in place (another
/// endpoint_url, other keys) is a change though no variable changed.
fn profile_file_stamp(vars: &std::collections::BTreeMap<OsString, OsString>, var: &str, default: &str) -> Vec<u8> {
    use std::os::unix::fs::MetadataExt;
    let home = vars.get(std::ffi::OsStr::new("HOME")).map(PathBuf::from);
    let path = match vars.get(std::ffi::OsStr::new(var)) {
        // The SDK expands a leading `~/` to HOME.
        Some(named) => match (named.to_str().and_then(|n| n.strip_prefix("~/")), &home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(named),
        },
        None => match home {
            Some(home) => home.join(default),
            None => return Vec::new(),
        },
    };
    match fs::metadata(&path) {
        Ok(m) => [m.ino(), m.len(), m.mtime() as u64, m.mtime_nsec() as u64].map(u64::to_le_bytes).concat(),
        Err(_) => Vec::new(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};
    use crate::test_support::NoEnv;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    #[test]
    fn the_fingerprint_follows_what_the_s3_client_reads_from_the_environment() {
        let config = Config::resolve(&Overrides::default(), &NoEnv).unwrap();
        let of = |pairs: &[(&str, &str)]| fingerprint_in(&config, vars(pairs));
        let base = of(&[("AWS_PROFILE", "a"), ("PATH", "/bin")]);
        assert_eq!(base, of(&[("PATH", "/usr/bin"), ("AWS_PROFILE", "a")]), "only AWS_* and HOME count");
        assert_ne!(base, of(&[("AWS_PROFILE", "b"), ("PATH", "/bin")]));
        assert_ne!(base, of(&[("AWS_PROFILE", "a"), ("AWS_ENDPOINT_URL_S3", "http://b:9000")]));
        assert_ne!(base, of(&[("AWS_PROFILE", "a"), ("AWS_ACCESS_KEY_ID", "AKB")]));
        // No two environments run together: a value moved into the name is still a change.
        assert_ne!(of(&[("AWS_A", "BC")]), of(&[("AWS_AB", "C")]));
    }

    #[test]
    fn the_fingerprint_follows_an_edit_of_the_profile_file() {
        let config = Config::resolve(&Overrides::default(), &NoEnv).unwrap();
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join(".aws/config");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        let of = || fingerprint_in(&config, vars(&[("HOME", home.path().to_str().unwrap())]));
        let none = of();
        fs::write(&file, "[default]\nendpoint_url = http://a:9000\n").unwrap();
        let a = of();
        assert_ne!(none, a);
        fs::write(&file, "[default]\nendpoint_url = http://bb:9000\n").unwrap();
        assert_ne!(a, of());
        // Named by AWS_CONFIG_FILE, with `~/` for HOME, it is the same file.
        let named = fingerprint_in(
            &config,
            vars(&[("HOME", home.path().to_str().unwrap()), ("AWS_CONFIG_FILE", "~/.aws/config")]),
        );
        let moved = home.path().join("elsewhere");
        fs::rename(&file, &moved).unwrap();
        assert_ne!(
            named,
            fingerprint_in(
                &config,
                vars(&[("HOME", home.path().to_str().unwrap()), ("AWS_CONFIG_FILE", "~/.aws/config")])
            )
        );
    }
}
