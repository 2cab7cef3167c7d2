//! A fresh directory per test, which the postgres user can use, removed when the last handle
//! drops (also when the test panics).
//!
//! PostgreSQL refuses to run as root, and tests run as root on CI. So when the tests run as
//! root, the directory belongs to postgres, clusters run through `runuser -u postgres`, and
//! wal-rs is put in with mode 755: archive_command runs as postgres, and must be able to
//! execute the binary whatever the permissions of the checkout it was built in.
//!
//! wal-rs starts helpers that outlive the command that started them (the prefetcher of
//! `wal-fetch ... RECOVERYXLOG`, the archive daemon of wal-push). Before the directory is
//! removed, every wal-rs process of it is killed: one left running keeps writing into the
//! directory while it is removed, and outlives the test.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether the tests run with effective uid 0 (read from `/proc/self/status`).
pub fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("a Uid line in /proc/self/status");
        // Uid: real, effective, saved, filesystem.
        uid_line.split_whitespace().nth(2) == Some("0")
    })
}

/// The postgres user's uid and gid, from /etc/passwd.
pub fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
        let line = passwd
            .lines()
            .find(|l| l.starts_with("postgres:"))
            .expect("a postgres user (the PostgreSQL packages create it)");
        let fields: Vec<&str> = line.split(':').collect();
        (fields[2].parse().expect("postgres uid"), fields[3].parse().expect("postgres gid"))
    })
}

/// Gives `path` to the postgres user when running as root (a no-op otherwise).
pub fn chown_postgres(path: &Path) {
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
    }
}

/// A test's work directory. Cheap to clone: clusters and servers hold a clone, so the
/// directory outlives them whatever order locals drop in.
#[derive(Clone, Debug)]
pub struct WorkDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    walrs: PathBuf,
}

impl WorkDir {
    /// Creates `/tmp/walrs-it-<tag>-...`, owned by postgres when root, with the wal-rs
    /// binary at `bin/wal-rs` (see [`install_walrs`]).
    pub fn new(tag: &str) -> WorkDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let path = PathBuf::from(format!(
            "/tmp/walrs-it-{tag}-{}-{nanos:08x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod work directory");
        chown_postgres(&path);

        let bin = path.join("bin");
        fs::create_dir(&bin).expect("creating bin/");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod bin/");
        let walrs = bin.join("wal-rs");
        install_walrs(Path::new(env!("CARGO_BIN_EXE_wal-rs")), &walrs)
            .unwrap_or_else(|e| panic!("putting the wal-rs binary at {}: {e}", walrs.display()));
        WorkDir { inner: Arc::new(Inner { path, walrs }) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `path()/rel`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.inner.path.join(rel)
    }

    /// The wal-rs copy that clusters and tests run.
    pub fn walrs(&self) -> &Path {
        &self.inner.walrs
    }

    /// Creates `path()/rel` (and its parents) for the tests' own use.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }

    /// Creates `path()/rel` owned by postgres (mode 700): a store archive_command writes
    /// into, or a data directory.
    pub fn pg_dir(&self, rel: &str) -> PathBuf {
        let p = self.dir(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).expect("chmod");
        chown_postgres(&p);
        p
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Also when the directory is kept: a helper left running would go on changing it.
        if let Err(left) = kill_walrs_processes_in(&self.path, Duration::from_secs(10)) {
            eprintln!("warning: wal-rs processes {left:?} of {} did not end after SIGKILL", self.path.display());
        }
        if std::env::var_os("WALRS_IT_KEEP").is_some() {
            eprintln!("WALRS_IT_KEEP: keeping {}", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// Puts the wal-rs binary `src` at `dest`, executable by the postgres user. A hard link where
/// it can be made (the build and /tmp on one file system) and the binary is already readable
/// and executable by others: a debug build is hundreds of MiB, and a copy per test wrote
/// gigabytes per run. Otherwise a copy with mode 755. The link shares the build's inode,
/// which is never written in place (cargo and the linkers replace the file), so a rebuild
/// during the run leaves the tests' binary as it was, as a copy would.
pub fn install_walrs(src: &Path, dest: &Path) -> io::Result<()> {
    const OTHERS_READ_EXECUTE: u32 = 0o005;
    if fs::metadata(src)?.mode() & OTHERS_READ_EXECUTE == OTHERS_READ_EXECUTE && fs::hard_link(src, dest).is_ok() {
        return Ok(());
    }
    fs::copy(src, dest)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755))
}

/// A running wal-rs process, as /proc shows it.
struct WalRsProcess {
    pid: i32,
    args: Vec<String>,
    /// `None` when it cannot be read (another user's process, to root without
    /// CAP_SYS_PTRACE, as in a default container): the arguments still tell.
    cwd: Option<PathBuf>,
}

/// Every wal-rs process this test process may see (argv[0] named `wal-rs`). Processes that
/// end while being read are left out, as are zombies (they have no command line).
fn walrs_processes() -> Vec<WalRsProcess> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if Path::new(args.first()?).file_name()? != "wal-rs" {
                return None;
            }
            let cwd = fs::read_link(e.path().join("cwd")).ok();
            Some(WalRsProcess { pid, args, cwd })
        })
        .collect()
}

/// PIDs of the wal-rs processes of `dir`: run from a binary in it, given a path in it, or
/// working in it (the prefetcher and the archive daemon inherit the data directory or
/// work directory of the command that started them).
fn walrs_processes_in(dir: &Path) -> Vec<i32> {
    walrs_processes()
        .into_iter()
        .filter(|p| {
            p.cwd.as_ref().is_some_and(|c| c.starts_with(dir)) || p.args.iter().any(|a| Path::new(a).starts_with(dir))
        })
        .map(|p| p.pid)
        .collect()
}

/// PIDs of the wal-prefetch processes working in `data` (restore_command's data directory).
pub fn prefetchers_in(data: &Path) -> Vec<String> {
    walrs_processes()
        .into_iter()
        .filter(|p| p.cwd.as_ref().is_some_and(|c| c.starts_with(data)) && p.args.iter().any(|a| a == "wal-prefetch"))
        .map(|p| p.pid.to_string())
        .collect()
}

/// SIGKILLs the wal-rs processes of `dir` (see [`walrs_processes_in`]) until none is left,
/// polling for up to `timeout`. They are detached (their own session, parent gone), so
/// not ours to wait for: gone means out of /proc or a zombie, which holds no file open.
/// Returns the PIDs still there at the deadline.
pub fn kill_walrs_processes_in(dir: &Path, timeout: Duration) -> Result<(), Vec<i32>> {
    let started = Instant::now();
    loop {
        let left = walrs_processes_in(dir);
        if left.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(left);
        }
        for pid in left {
            // SAFETY: kill takes two integers and touches no memory. A process that has
            // ended since it was listed gets ESRCH, which is what was wanted.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
