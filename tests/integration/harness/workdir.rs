//! A fresh directory per test, which the postgres user can use, removed when the last handle
//! drops (also when the test panics).
//!
//! PostgreSQL refuses to run as root, and tests run as root on CI. So when the tests run as
//! root, the directory belongs to postgres, clusters run through `runuser -u postgres`, and
//! wal-rs is copied in with mode 755: archive_command runs as postgres, and must be able to
//! execute the binary whatever the permissions of the checkout it was built in.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// Creates `/tmp/walrs-it-<tag>-...`, owned by postgres when root, with a copy of the
    /// wal-rs binary at `bin/wal-rs`.
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
        fs::copy(env!("CARGO_BIN_EXE_wal-rs"), &walrs).expect("copying the wal-rs binary");
        fs::set_permissions(&walrs, fs::Permissions::from_mode(0o755)).expect("chmod wal-rs");
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
        if std::env::var_os("WALRS_IT_KEEP").is_some() {
            eprintln!("WALRS_IT_KEEP: keeping {}", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}
