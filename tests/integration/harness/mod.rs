//! What the tests share: polling with deadlines, free ports, stores as seen from a test,
//! running the wal-rs binary, crafted WAL segments, and small file helpers.
//!
//! Submodules: [`workdir`] (a fresh directory per test, removed on drop), [`pg`] (PostgreSQL
//! clusters run as the postgres user), [`s3`] (an s3s-fs server).

pub mod pg;
pub mod s3;
pub mod workdir;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use workdir::{prefetchers_in, WorkDir};

use workdir::{is_root, postgres_ids};

/// Bytes in a WAL segment of a default PostgreSQL build (`--wal-segsize` 16).
pub const SEG_SIZE: usize = 16 << 20;

/// Polls `cond` until it holds; panics naming `what` when `timeout` passes first. The only
/// way tests wait for anything: no fixed sleeps as synchronisation.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    loop {
        if cond() {
            return;
        }
        if started.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now and that no other test has been
/// given. The servers bind it later, after this returns, so the port is taken where nothing
/// else takes ports unasked:
/// - below the kernel's ephemeral range (`ip_local_port_range`), from which every outgoing
///   connection (a test's client, wal-rs's S3 requests) takes its local port: a port from
///   that range could be some connection's by the time PostgreSQL binds it;
/// - never twice in this process (tests run in parallel threads);
/// - never in two test processes at once (people run suites side by side): each port given
///   is locked (`flock`) in [`PORT_LOCKS`] until this process exits.
pub fn free_port() -> u16 {
    /// The ports given, and the open lock files that hold them.
    static GIVEN: Mutex<Vec<(u16, fs::File)>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (first, end) = unclaimed_port_range();
    let span = u32::from(end - first);
    // Processes start at different places, so side-by-side runs rarely meet.
    let start = std::process::id().wrapping_mul(7919) % span;
    for i in 0..span {
        let port = first + ((start + i) % span) as u16;
        if given.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let Some(lock) = lock_port(port) else { continue };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push((port, lock));
            return port;
        }
    }
    panic!("no free port in {first}..{end}: every one is in use, or locked in {PORT_LOCKS}");
}

/// Where [`free_port`] keeps a lock file per port it gave out.
pub const PORT_LOCKS: &str = "/tmp/walrs-test-ports";

/// The ports [`free_port`] picks from, `first..end`: those outside the kernel's ephemeral
/// range (`ip_local_port_range`, 32768-60999 by default), from 20000 up to it, else above it.
fn unclaimed_port_range() -> (u16, u16) {
    const FIRST: u16 = 20_000;
    const ENOUGH: u16 = 1000;
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (low, high) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(low), Some(high)) => (low, high),
        _ => (32_768, 60_999),
    };
    if low >= FIRST + ENOUGH {
        (FIRST, low)
    } else if high < u16::MAX - ENOUGH {
        (high + 1, u16::MAX)
    } else {
        panic!("net.ipv4.ip_local_port_range is {low}-{high}: the tests need {ENOUGH} ports outside it")
    }
}

/// Locks `port` for this process: an exclusive `flock` on its file in [`PORT_LOCKS`], held
/// for as long as the file returned stays open (the kernel drops it when the process exits,
/// however it ends). None when another process holds it.
fn lock_port(port: u16) -> Option<fs::File> {
    let dir = Path::new(PORT_LOCKS);
    if fs::create_dir(dir).is_ok() {
        // Root and non-root runs share it; the sticky bit keeps each to its own files.
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o1777));
    }
    // Another user's lock file cannot be opened for writing: that user's run may hold it.
    let file = fs::File::options().create(true).truncate(false).write(true).open(dir.join(port.to_string())).ok()?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(file)
}

/// A store as a test sees it: its URL, the environment wal-rs needs to reach it, and the
/// directory on this machine where its objects are plain files (the local store's root, or
/// s3s-fs's `DATA_DIR/bucket/prefix`), so tests can inspect and damage objects directly.
#[derive(Clone, Debug)]
pub struct StoreEnv {
    /// `file:///...` or `s3://bucket/prefix`.
    pub url: String,
    /// Environment for wal-rs, `WALRS_STORE` included.
    pub vars: Vec<(String, String)>,
    /// Where object `key` lives: `objects_root/key`.
    pub objects_root: PathBuf,
}

impl StoreEnv {
    /// A local-directory store at `dir` (which the caller creates, or not).
    pub fn local(dir: &Path) -> StoreEnv {
        let url = format!("file://{}", dir.display());
        StoreEnv { vars: vec![("WALRS_STORE".into(), url.clone())], url, objects_root: dir.to_path_buf() }
    }

    /// The same store with `name` set to `value` (replacing any earlier value).
    pub fn with(&self, name: &str, value: &str) -> StoreEnv {
        let mut out = self.clone();
        out.vars.retain(|(k, _)| k != name);
        out.vars.push((name.to_string(), value.to_string()));
        out
    }

    /// `K=V K=V ...`, to prefix a shell command in archive_command or restore_command.
    /// Values are written by the harness (paths, URLs, hex keys): no quoting is needed.
    fn shell_prefix(&self) -> String {
        for (k, v) in &self.vars {
            assert!(
                v.chars().all(|c| c.is_ascii_alphanumeric() || "/:._-".contains(c)),
                "{k}={v:?} needs quoting in a shell command"
            );
        }
        self.vars.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }

    /// `archive_command` pushing into this store with the wal-rs copy at `walrs`.
    pub fn archive_command(&self, walrs: &Path) -> String {
        format!("{} {} wal-push %p", self.shell_prefix(), walrs.display())
    }

    /// `restore_command` fetching from this store.
    pub fn restore_command(&self, walrs: &Path) -> String {
        format!("{} {} wal-fetch %f %p", self.shell_prefix(), walrs.display())
    }

    /// The file holding object `key`.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.objects_root.join(key)
    }

    /// The file of WAL file `name` stored with lz4 (the default compression).
    pub fn wal_object(&self, name: &str) -> PathBuf {
        self.object_path(&format!("wal_005/{name}.lz4"))
    }

    /// Names of the objects under `wal_005/`, sorted (hidden temporary files left out).
    pub fn wal_objects(&self) -> Vec<String> {
        let dir = self.objects_root.join("wal_005");
        let mut out: Vec<String> = match fs::read_dir(&dir) {
            Ok(entries) => entries
                .map(|e| e.expect("listing wal_005").file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("listing {}: {e}", dir.display()),
        };
        out.sort();
        out
    }
}

/// What one run of wal-rs did.
#[derive(Debug)]
pub struct Run {
    /// Exit code (a signal is a test failure).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error: wal-rs's logfmt lines.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// Panics with the whole run unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32, what: &str) -> &Run {
        assert_eq!(self.code, code, "{what}: expected exit {code}, got {self:#?}");
        self
    }

    /// Whether a logfmt line on stderr carries `key=value`.
    pub fn logged(&self, key: &str, value: &str) -> bool {
        let field = format!("{key}={value}");
        self.stderr.lines().any(|l| l.split(' ').any(|f| f == field))
    }
}

/// The wal-rs binary, run directly by a test (as whoever runs the tests) with a clean,
/// explicit environment: nothing from the developer's shell leaks in.
#[derive(Clone, Debug)]
pub struct WalRs {
    bin: PathBuf,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    as_postgres: bool,
    /// `RLIMIT_NPROC` for the child: with 1, it cannot start a thread.
    max_processes: Option<u64>,
}

impl WalRs {
    /// wal-rs using `store`, run in the work directory (which holds no `standby.signal`).
    pub fn new(wd: &WorkDir, store: &StoreEnv) -> WalRs {
        let mut w = WalRs::without_store(wd);
        w.env.extend(store.vars.iter().cloned());
        w
    }

    /// wal-rs with no store configured.
    pub fn without_store(wd: &WorkDir) -> WalRs {
        WalRs {
            bin: wd.walrs().to_path_buf(),
            env: vec![
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                ("HOME".into(), wd.path().display().to_string()),
                ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
                // A failing test fails in seconds, not after the 120 s default.
                ("WALRS_RETRY_DEADLINE_SECS".into(), "10".into()),
            ],
            cwd: wd.path().to_path_buf(),
            as_postgres: false,
            max_processes: None,
        }
    }

    /// The same, with `name=value` in the environment (replacing any earlier value).
    pub fn env(mut self, name: &str, value: &str) -> WalRs {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// The same, run in `dir` (wal-fetch looks for `standby.signal` there).
    pub fn cwd(mut self, dir: &Path) -> WalRs {
        self.cwd = dir.to_path_buf();
        self
    }

    /// The same, run as the postgres user when the tests run as root (as a DBA runs
    /// backup-push and backup-fetch: the files restored belong to postgres). The uid and gid
    /// are switched in the child itself, with no `runuser` in between, so the process a test
    /// spawns is wal-rs and a signal sent to it reaches wal-rs.
    pub fn run_as_postgres(mut self) -> WalRs {
        self.as_postgres = true;
        self
    }

    /// The same, with at most `n` processes and threads for its user (`RLIMIT_NPROC`), as a
    /// container at its process limit. Root is exempt: use with [`Self::run_as_postgres`].
    pub fn max_processes(mut self, n: u64) -> WalRs {
        self.max_processes = Some(n);
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env_clear().envs(self.env.iter().map(|(k, v)| (k, v))).current_dir(&self.cwd);
        if self.as_postgres && is_root() {
            let (uid, gid) = postgres_ids();
            cmd.uid(uid).gid(gid);
        }
        if let Some(n) = self.max_processes {
            let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: setrlimit is async-signal-safe and reads only `limit`, copied in.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NPROC, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    /// Starts `wal-rs ARGS...` without waiting, its output going to `log` (a file that must
    /// not exist yet).
    pub fn spawn(&self, args: &[&str], log: &Path) -> Child {
        let out = fs::File::create_new(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out.try_clone().expect("log handle");
        self.command(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()))
    }

    /// Runs `wal-rs ARGS...`.
    pub fn run(&self, args: &[&str]) -> Run {
        let started = Instant::now();
        let out = self.command(args).output().unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()));
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        };
        assert!(out.status.code().is_some(), "wal-rs {args:?} was killed by a signal: {run:#?}");
        run
    }

    /// `wal-rs wal-push PATH`.
    pub fn push(&self, path: &Path) -> Run {
        self.run(&["wal-push", path.to_str().expect("UTF-8 path")])
    }

    /// `wal-rs wal-fetch NAME DEST`.
    pub fn fetch(&self, name: &str, dest: &Path) -> Run {
        self.run(&["wal-fetch", name, dest.to_str().expect("UTF-8 path")])
    }
}

/// The file name of segment number `segno` on timeline `tli`, with 16 MiB segments.
pub fn segment_name(tli: u32, segno: u64) -> String {
    let per_log = 0x1_0000_0000 / SEG_SIZE as u64;
    format!("{tli:08X}{:08X}{:08X}", segno / per_log, segno % per_log)
}

/// A 16 MiB segment that passes wal-push's checks: the long page header PostgreSQL 15
/// writes at the start of every segment (see src/wal/page.rs), then filler that depends
/// on `salt`, so two salts give two contents under one name.
pub fn craft_segment(tli: u32, segno: u64, sysid: u64, salt: u64) -> Vec<u8> {
    let mut seg = vec![0u8; SEG_SIZE];
    seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes()); // XLOG_PAGE_MAGIC of PostgreSQL 15
    seg[2..4].copy_from_slice(&0x0002u16.to_le_bytes()); // XLP_LONG_HEADER
    seg[4..8].copy_from_slice(&tli.to_le_bytes());
    seg[8..16].copy_from_slice(&(segno * SEG_SIZE as u64).to_le_bytes()); // page address
    seg[24..32].copy_from_slice(&sysid.to_le_bytes());
    seg[32..36].copy_from_slice(&(SEG_SIZE as u32).to_le_bytes());
    seg[36..40].copy_from_slice(&8192u32.to_le_bytes());
    // Compressible but not trivial: a counter every 64 bytes, as record-ish data.
    for (i, chunk) in seg[8192..].chunks_mut(64).enumerate() {
        chunk[..8].copy_from_slice(&(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
    }
    seg
}

/// A segment like [`craft_segment`]'s whose filler is pseudo-random: lz4 cannot shrink it,
/// so its object is larger than one S3 part (8 MiB) and goes up as a multipart upload.
pub fn craft_incompressible_segment(tli: u32, segno: u64, sysid: u64, seed: u64) -> Vec<u8> {
    let mut seg = craft_segment(tli, segno, sysid, seed);
    let mut x = seed | 1;
    for chunk in seg[8192..].chunks_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    seg
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Reads a whole file, naming it on failure.
pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Lower-case hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `lz4 -d -c FILE`: what the standard lz4 tool makes of a stored object.
pub fn lz4_cli_decompress(path: &Path) -> Vec<u8> {
    let out = Command::new("lz4")
        .args(["-d", "-c"])
        .arg(path)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .output()
        .expect("running lz4 (the lz4 command-line tool must be installed)");
    assert!(out.status.success(), "lz4 -d {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Inverts one byte in the middle of a file, in place.
pub fn flip_middle_byte(path: &Path) {
    let mut bytes = read(path);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Every regular file under `dir`, recursively (hidden ones included), relative to it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("listing a directory");
            let ft = entry.file_type().expect("file type");
            if ft.is_dir() {
                pending.push(entry.path());
            } else {
                out.push(entry.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A path as a command-line argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// What a `--json` run printed on stdout.
#[track_caller]
pub fn json_of(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {run:#?}"))
}

/// wal-rs as a DBA runs the backup commands: the postgres user, `store`, and libpq's
/// environment pointing at `c`.
pub fn walrs_for(wd: &WorkDir, store: &StoreEnv, c: &pg::PgCluster) -> WalRs {
    WalRs::new(wd, store)
        .run_as_postgres()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", &c.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
}

/// Checks of the harness itself: no PostgreSQL, no S3, a few seconds.
#[cfg(test)]
mod checks {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_locked_and_never_given_twice() {
        let (first, end) = unclaimed_port_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was given twice: {ports:?}");
        for port in ports {
            assert!((first..end).contains(&port), "port {port} is in the ephemeral range (outside {first}..{end})");
            assert!(lock_port(port).is_none(), "port {port} is not locked against other test processes");
        }
    }

    #[test]
    fn the_binary_is_linked_when_it_can_be_and_postgres_can_run_it() {
        let wd = WorkDir::new("harness-bin");
        let built = fs::metadata(env!("CARGO_BIN_EXE_wal-rs")).unwrap();
        let installed = fs::metadata(wd.walrs()).unwrap();
        if built.dev() == installed.dev() && built.mode() & 0o005 == 0o005 {
            assert_eq!(installed.ino(), built.ino(), "{} is a copy: a link would do", wd.walrs().display());
        }
        assert_eq!(installed.mode() & 0o755, 0o755, "{} is not mode 755", wd.walrs().display());
        let run = WalRs::without_store(&wd).run_as_postgres().run(&["--help"]);
        run.expect_code(0, "wal-rs --help as postgres");
        assert!(run.stdout.contains("wal-push"), "{run:#?}");
    }

    /// A process that has neither ended nor become a zombie (which has no command line).
    fn is_running(pid: &str) -> bool {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    }

    #[test]
    fn dropping_a_workdir_ends_its_prefetcher_then_removes_it() {
        let wd = WorkDir::new("harness-prefetch");
        let store = StoreEnv::local(&wd.dir("store"));
        let src = wd.dir("src");
        for segno in 1..4 {
            let name = segment_name(1, segno);
            let path = write_file(&src, &name, &craft_segment(1, segno, 7_300_000_000_000_000_901, segno));
            WalRs::new(&wd, &store).push(&path).expect_code(0, "pushing a segment");
        }
        let data = wd.dir("data");
        fs::create_dir(data.join("pg_wal")).unwrap();
        WalRs::new(&wd, &store)
            .env("WALRS_PREFETCH_COUNT", "2")
            .cwd(&data)
            .run(&["wal-fetch", &segment_name(1, 1), "pg_wal/RECOVERYXLOG"])
            .expect_code(0, "wal-fetch as recovery runs it");
        // Started before wal-fetch exits; idle, it lives on for tens of seconds.
        let prefetchers = prefetchers_in(&data);
        assert!(!prefetchers.is_empty(), "no prefetcher runs in {}", data.display());
        let path = wd.path().to_path_buf();
        drop(wd);
        let running: Vec<_> = prefetchers.iter().filter(|p| is_running(p)).collect();
        assert!(running.is_empty(), "prefetchers {running:?} outlived {}", path.display());
        assert!(!path.exists(), "{} was not removed", path.display());
    }
}
