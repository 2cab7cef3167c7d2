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
/// waits for it. The child gets SIGTERM if this process dies (a killed worker must not leave
/// a restore writing into a folder the next worker wipes); runuser passes it on.
pub async fn run_as_postgres(argv: &[String], env: &[(String, String)]) -> Result<Output> {
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
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let out = cmd.output().await.with_context(|| format!("running {}", argv[0]))?;
    Ok(Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The path of PostgreSQL tool `name`.
pub fn pg_tool(name: &str) -> String {
    bindir().join(name).display().to_string()
}
