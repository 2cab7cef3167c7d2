//! The operating system as the control plane needs it: who we are, the postgres user,
//! PostgreSQL's binaries, and subprocesses that die with the process that started them.
//!
//! PostgreSQL refuses to run as root, so when the control plane runs as root every
//! PostgreSQL tool and every wal-rs command runs through `runuser -u postgres`, with a clean
//! environment (nothing from the operator's shell reaches archive_command).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Whether we run with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The postgres user's uid and gid, from /etc/passwd.
pub fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .context("no postgres user in /etc/passwd: install PostgreSQL, whose packages create it")?;
    let f: Vec<&str> = line.split(':').collect();
    Ok((f[2].parse()?, f[3].parse()?))
}

/// Creates `path` (and parents) and, when root, gives it to postgres with `mode`.
pub fn pg_dir(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    if is_root() {
        let (uid, gid) = postgres_ids()?;
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// PostgreSQL's binaries: `pg_config --bindir`, else Debian's PostgreSQL 15 path.
pub fn bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new("pg_config").arg("--bindir").output().ok().filter(|o| o.status.success());
        match out.map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())) {
            Some(dir) if dir.join("initdb").exists() => dir,
            _ => PathBuf::from("/usr/lib/postgresql/15/bin"),
        }
    })
}

/// The uid PostgreSQL runs as: postgres when we are root, else our own.
fn postgres_uid() -> Result<u32> {
    if is_root() {
        Ok(postgres_ids()?.0)
    } else {
        // SAFETY: geteuid has no preconditions.
        Ok(unsafe { libc::geteuid() })
    }
}

/// Whether the postmaster of the cluster in `pgdata` is alive: the process named by the
/// first line of `postmaster.pid` exists, belongs to the PostgreSQL user and works on
/// `pgdata` ([`works_on`]). After a restart of the machine a stale `postmaster.pid` may name
/// a pid that now belongs to any other process, which a mere `kill(pid, 0)` would take for
/// this cluster.
pub fn postmaster_running(pgdata: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else { return false };
    let Some(pid) = text.lines().next().and_then(|l| l.trim().parse::<u32>().ok()).filter(|p| *p > 0) else {
        return false;
    };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let owned = match (std::fs::metadata(&proc_dir), postgres_uid()) {
        (Ok(m), Ok(uid)) => m.uid() == uid,
        _ => false,
    };
    let Ok(dir) = pgdata.canonicalize() else { return false };
    owned && works_on(std::fs::read_link(proc_dir.join("cwd")), || std::fs::read(proc_dir.join("cmdline")), &dir)
}

/// Whether a process works on the cluster in `pgdata` (canonical), given its working
/// directory `cwd` and, read only if needed, its command line (`/proc/PID/cmdline`).
///
/// The postmaster changes into its data directory at start, so the working directory says
/// it. But reading another user's working directory needs CAP_SYS_PTRACE, which root in a
/// default container lacks (EACCES): then the command line decides, which anyone may read.
/// pg_ctl starts the postmaster as `.../postgres -D <pgdata> ...` with the PGDATA it was
/// given, and the postmaster keeps that command line (only its children retitle
/// themselves). Taking an unreadable working directory for "not running" would be the
/// dangerous mistake: a second start, or a wipe of the folder under a live postmaster.
fn works_on(cwd: std::io::Result<PathBuf>, cmdline: impl FnOnce() -> std::io::Result<Vec<u8>>, pgdata: &Path) -> bool {
    match cwd {
        Ok(cwd) => cwd == pgdata,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            cmdline().is_ok_and(|c| postmaster_data_dir(&c).is_some_and(|d| d == pgdata))
        }
        Err(_) => false,
    }
}

/// The data directory (canonical) in the NUL-separated command line of a postmaster:
/// `postgres ... -D <dir>` or `-D<dir>`. None when the program is not `postgres`, or the
/// directory is missing, relative (it would depend on a working directory we cannot read)
/// or does not exist.
fn postmaster_data_dir(cmdline: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut args = cmdline.split(|b| *b == 0).map(std::ffi::OsStr::from_bytes);
    if Path::new(args.next()?).file_name()? != "postgres" {
        return None;
    }
    let dir = loop {
        let arg = args.next()?.as_bytes();
        match arg.strip_prefix(b"-D") {
            Some([]) => break args.next()?,
            Some(rest) => break std::ffi::OsStr::from_bytes(rest),
            None => {}
        }
    };
    let dir = Path::new(dir);
    if dir.is_absolute() {
        dir.canonicalize().ok()
    } else {
        None
    }
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Ok when the exit code is 0, else an error naming `what`, the code and the last stderr line.
    pub fn ok(self, what: &str) -> Result<Output> {
        if self.code != 0 {
            let last = self.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
            bail!("{what} exited {}: {last}", self.code);
        }
        Ok(self)
    }
}

/// Runs `argv` as the postgres user (when root) with a clean environment plus `env`, and
/// waits for it.
pub async fn run_as_postgres(argv: &[String], env: &[(String, String)]) -> Result<Output> {
    run_as_postgres_with_input(argv, env, None).await
}

/// [`run_as_postgres`], with `input` (if any) written to the command's standard input.
///
/// The command runs in a process group of its own, which is killed whole (SIGKILL) when this
/// future is dropped before the command ends: a step cancelled because its lease was lost, or
/// a process shutting down. Killing runuser alone would not do: it cannot pass SIGKILL on,
/// and its child (a backup-fetch writing into PGDATA, say) would run on beside the worker
/// that takes the job over. If this process itself dies, the parent-death signal (SIGTERM)
/// reaches runuser, which passes it on.
pub async fn run_as_postgres_with_input(
    argv: &[String],
    env: &[(String, String)],
    input: Option<&str>,
) -> Result<Output> {
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", bindir().display());
    let mut cmd = if is_root() {
        let mut c = tokio::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(argv);
        c
    } else {
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    cmd.env_clear().env("PATH", path).env("LC_ALL", "C").envs(env.iter().map(|(k, v)| (k, v))).current_dir("/");
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("running {}", argv[0]))?;
    let mut group = ProcessGroup { child, finished: false };
    group.output(input).await.with_context(|| format!("running {}", argv[0]))
}

/// A child that leads its own process group. Dropped before it was waited for, it kills the
/// whole group; the child itself is then reaped by tokio (`kill_on_drop`).
struct ProcessGroup {
    child: tokio::process::Child,
    /// The child was reaped: its pid, and so the group id, may belong to someone else now.
    finished: bool,
}

impl ProcessGroup {
    /// Feeds `input` to the child's stdin, reads its stdout and stderr to their end, then
    /// reaps it. Reading comes first so that the child stays unreaped (its pid, the group id,
    /// reserved) for as long as the group may still have to be killed.
    async fn output(&mut self, input: Option<&str>) -> std::io::Result<Output> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut out_pipe = self.child.stdout.take().expect("stdout is piped");
        let mut err_pipe = self.child.stderr.take().expect("stderr is piped");
        let stdin_pipe = self.child.stdin.take();
        let feed = async move {
            if let (Some(mut pipe), Some(text)) = (stdin_pipe, input) {
                pipe.write_all(text.as_bytes()).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        tokio::try_join!(feed, out_pipe.read_to_end(&mut stdout), err_pipe.read_to_end(&mut stderr))?;
        let status = self.child.wait().await?;
        self.finished = true;
        Ok(Output {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(pid) = self.child.id() {
            // SAFETY: killpg has no memory preconditions. The group id is the child's pid,
            // which stays ours until the child is reaped, after this.
            unsafe { libc::killpg(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// The path of PostgreSQL tool `name`.
pub fn pg_tool(name: &str) -> String {
    bindir().join(name).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// `argv` as /proc/PID/cmdline shows it: each argument followed by a NUL.
    fn nul_separated(argv: &[&str]) -> Vec<u8> {
        argv.iter().flat_map(|a| a.bytes().chain([0])).collect()
    }

    /// Pids of live processes owned by `uid` whose command line is exactly `argv`.
    fn processes(uid: u32, argv: &[&str]) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt;
        let want = nul_separated(argv);
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let owned = std::fs::metadata(e.path()).is_ok_and(|m| m.uid() == uid);
            if owned && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want) {
                out.push(pid);
            }
        }
        out
    }

    /// A fresh folder under /tmp that the PostgreSQL user can enter.
    fn temp_pgdata(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("walrs-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        pg_dir(&dir, 0o755).unwrap();
        dir.canonicalize().unwrap()
    }

    /// A process of the PostgreSQL user that looks like the postmaster of `pgdata` to /proc:
    /// working in it, with pg_ctl's command line (`.../postgres -D <pgdata>`; it is a shell
    /// waiting on its stdin). Its pid is written to `pgdata/postmaster.pid`. Dropping the
    /// returned stdin ends it.
    fn fake_postmaster(pgdata: &Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sh");
        cmd.arg0(bindir().join("postgres")).args(["-c", "read x", "postgres", "-D"]).arg(pgdata);
        cmd.current_dir(pgdata).stdin(Stdio::piped());
        if is_root() {
            let (uid, gid) = postgres_ids().unwrap();
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().unwrap();
        std::fs::write(pgdata.join("postmaster.pid"), format!("{}\n{}\n", child.id(), pgdata.display())).unwrap();
        child
    }

    /// Ends a [`fake_postmaster`].
    fn end(mut child: std::process::Child) {
        drop(child.stdin.take());
        child.wait().unwrap();
    }

    #[test]
    fn a_stale_postmaster_pid_naming_another_process_is_not_a_running_server() {
        let pgdata = temp_pgdata("stale-pid");
        std::fs::write(pgdata.join("postmaster.pid"), format!("{}\n{}\n", std::process::id(), pgdata.display()))
            .unwrap();
        let running = postmaster_running(&pgdata);
        std::fs::remove_dir_all(&pgdata).unwrap();
        assert!(!running, "this test process was taken for the postmaster of {}", pgdata.display());
    }

    #[test]
    fn a_postgres_process_working_in_the_folder_is_a_running_server() {
        let pgdata = temp_pgdata("live-pid");
        let child = fake_postmaster(&pgdata);
        let running = postmaster_running(&pgdata);
        end(child);
        std::fs::write(pgdata.join("postmaster.pid"), "0\n").unwrap();
        let zero = postmaster_running(&pgdata);
        std::fs::remove_dir_all(&pgdata).unwrap();
        assert!(running, "a postgres-owned process working in {} was not taken for its postmaster", pgdata.display());
        assert!(!zero, "pid 0 was taken for a postmaster");
    }

    #[test]
    fn a_process_whose_working_directory_cannot_be_read_is_judged_by_its_command_line() {
        let pgdata = temp_pgdata("cmdline");
        let other = temp_pgdata("cmdline-other");
        let (dir, other_dir) = (pgdata.display().to_string(), other.display().to_string());
        let pg = "/usr/lib/postgresql/15/bin/postgres";
        let denied = || Err(std::io::Error::from_raw_os_error(libc::EACCES));
        let judge = |cwd: std::io::Result<PathBuf>, argv: &[&str]| works_on(cwd, || Ok(nul_separated(argv)), &pgdata);
        let verdicts = [
            ("cwd unreadable, postgres -D <pgdata>", judge(denied(), &[pg, "-D", &dir, "-p", "5433"]), true),
            (
                "cwd unreadable (EPERM)",
                judge(Err(std::io::Error::from_raw_os_error(libc::EPERM)), &[pg, "-D", &dir]),
                true,
            ),
            ("cwd unreadable, postgres -D<pgdata>", judge(denied(), &[pg, &format!("-D{dir}")]), true),
            ("cwd unreadable, postgres -D <pgdata>/.", judge(denied(), &[pg, "-D", &format!("{dir}/.")]), true),
            ("cwd unreadable, another folder", judge(denied(), &[pg, "-D", &other_dir]), false),
            ("cwd unreadable, not postgres", judge(denied(), &["/bin/sleep", "-D", &dir]), false),
            ("cwd unreadable, no -D", judge(denied(), &[pg, "-p", "5433"]), false),
            ("cwd unreadable, relative -D", judge(denied(), &[pg, "-D", "pgdata"]), false),
            ("cwd unreadable, no command line", works_on(denied(), || Err(denied().unwrap_err()), &pgdata), false),
            ("process gone", judge(Err(std::io::ErrorKind::NotFound.into()), &[pg, "-D", &dir]), false),
            ("cwd is pgdata", judge(Ok(pgdata.clone()), &["sleep", "30"]), true),
            ("cwd elsewhere, whatever the command line", judge(Ok(other.clone()), &[pg, "-D", &dir]), false),
        ];
        std::fs::remove_dir_all(&pgdata).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
        let wrong: Vec<_> = verdicts.iter().filter(|(_, got, want)| got != want).collect();
        assert!(wrong.is_empty(), "wrong verdicts (case, got, want): {wrong:?}");
    }

    /// Runs `f` on a thread of its own whose effective capabilities lack CAP_SYS_PTRACE, as
    /// root in a default Docker container. Capabilities belong to threads, so the other
    /// tests keep theirs.
    fn without_cap_sys_ptrace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_PTRACE: u32 = 19;
        std::thread::spawn(move || {
            let mut header = Header { version: VERSION_3, pid: 0 };
            let mut data = [Data::default(); 2];
            // SAFETY: capget and capset read and write a v3 header and two data structs,
            // which is what they get; pid 0 is the calling thread.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()), 0, "capget");
                data[0].effective &= !(1 << CAP_SYS_PTRACE);
                assert_eq!(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()), 0, "capset");
            }
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_postmaster_whose_working_directory_root_may_not_read_is_a_running_server() {
        if !is_root() {
            eprintln!("skipped: only root reads /proc of another user's process, and only with CAP_SYS_PTRACE");
            return;
        }
        let pgdata = temp_pgdata("no-ptrace");
        let other = temp_pgdata("no-ptrace-other");
        let child = fake_postmaster(&pgdata);
        // Another folder whose postmaster.pid names the same process.
        std::fs::copy(pgdata.join("postmaster.pid"), other.join("postmaster.pid")).unwrap();
        let cwd = PathBuf::from(format!("/proc/{}/cwd", child.id()));
        let (mine, theirs) = (pgdata.clone(), other.clone());
        let (cwd_read, running, other_running) = without_cap_sys_ptrace(move || {
            (std::fs::read_link(&cwd).map_err(|e| e.kind()), postmaster_running(&mine), postmaster_running(&theirs))
        });
        end(child);
        std::fs::remove_dir_all(&pgdata).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
        assert_eq!(cwd_read.map(|_| ()), Err(std::io::ErrorKind::PermissionDenied), "the cwd was readable after all");
        assert!(running, "the postmaster of {} was not seen when its cwd could not be read", pgdata.display());
        assert!(!other_running, "the postmaster of {} was taken for that of {}", pgdata.display(), other.display());
    }

    #[tokio::test]
    async fn a_cancelled_command_leaves_no_process_behind() {
        let uid = postgres_uid().unwrap();
        // A duration no other test uses, so the command line is this test's own.
        let secs = format!("30.{}", std::process::id());
        // sleep is a grandchild (of sh, and as root of runuser too), which only the kill of
        // the whole group reaches: the direct child is killed anyway (kill_on_drop).
        let argv = ["sh".to_string(), "-c".to_string(), format!("sleep {secs} & wait")];
        let cancelled = tokio::time::timeout(Duration::from_secs(1), run_as_postgres(&argv, &[])).await;
        assert!(cancelled.is_err(), "sh running sleep {secs} finished within 1 s: {cancelled:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes(uid, &["sleep", &secs]);
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "sleep {secs} still runs 10 s after it was cancelled: pids {left:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
