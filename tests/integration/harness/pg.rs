//! PostgreSQL 15 clusters for tests: initdb, configuration, start and stop, queries, base
//! backups and recovery, each cluster on its own port inside the test's work directory.
//!
//! PostgreSQL tools run as the postgres user when the tests run as root (`runuser -u
//! postgres --`), directly otherwise, always with a clean environment so that nothing from
//! the developer's shell (a `WALRS_COMPRESSION`, say) reaches archive_command. Queries go
//! over TCP to 127.0.0.1 with trust authentication, through tokio-postgres.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::workdir::is_root;
use super::{free_port, wait_until, StoreEnv, WorkDir};

/// PostgreSQL's binaries: `pg_config --bindir`, else Debian's PostgreSQL 15 path.
pub fn bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        match from_pg_config {
            Some(dir) if dir.join("initdb").exists() => dir,
            _ => PathBuf::from("/usr/lib/postgresql/15/bin"),
        }
    })
}

/// `program ARGS...` as the postgres user (when root), with a clean environment. `program`
/// is looked up in PostgreSQL's bindir first, then the usual PATH.
pub fn as_postgres(program: &str) -> Command {
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", bindir().display());
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    };
    cmd.env_clear().env("PATH", path).env("LC_ALL", "C").current_dir("/");
    cmd
}

/// Runs `cmd`; panics with its output unless it succeeds. Returns stdout.
#[track_caller]
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -c SCRIPT` as the postgres user.
#[track_caller]
pub fn pg_shell(script: &str, what: &str) -> String {
    run_ok(as_postgres("sh").args(["-c", script]), what)
}

/// Rows of a simple query, every value as text (`None` for NULL).
pub type Rows = Vec<Vec<Option<String>>>;

/// A cluster in `WorkDir/<name>`, listening on 127.0.0.1:`port`.
pub struct PgCluster {
    /// Its name, also its directory in the work directory.
    pub name: String,
    /// The data directory.
    pub data: PathBuf,
    /// Its TCP port.
    pub port: u16,
    log: PathBuf,
    wd: WorkDir,
}

impl PgCluster {
    /// A new cluster (`initdb`), set up as a primary with WAL for archiving, not started.
    pub fn init(wd: &WorkDir, name: &str) -> PgCluster {
        let data = wd.join(name);
        run_ok(
            as_postgres("initdb").arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]),
            &format!("initdb {name}"),
        );
        let c = PgCluster::adopt(wd, name);
        c.set(&[
            ("wal_level", "replica"),
            // The tests check recovery, not crash safety of the test machine.
            ("fsync", "off"),
            ("shared_buffers", "32MB"),
            // No checkpoint recycles segments while a test still reads them from pg_wal.
            ("max_wal_size", "4GB"),
            ("checkpoint_timeout", "30min"),
            ("archive_mode", "off"),
        ]);
        c
    }

    /// A cluster restored from the base backup in `backup` (copied, so one backup can seed
    /// several clusters), not started.
    pub fn from_backup(wd: &WorkDir, name: &str, backup: &Path) -> PgCluster {
        run_ok(
            as_postgres("cp").arg("-a").arg(backup).arg(wd.join(name)),
            &format!("copying the base backup into {name}"),
        );
        PgCluster::adopt(wd, name)
    }

    /// The data directory already at `WorkDir/<name>`, given its own port, listening on
    /// 127.0.0.1 and with its socket in the work directory. Later settings win over
    /// earlier ones in postgresql.conf, so this overrides whatever a backup carried.
    pub fn adopt(wd: &WorkDir, name: &str) -> PgCluster {
        let c = PgCluster {
            name: name.to_string(),
            data: wd.join(name),
            port: free_port(),
            log: wd.join(&format!("{name}.log")),
            wd: wd.clone(),
        };
        let port = c.port.to_string();
        let sockets = wd.path().display().to_string();
        c.set(&[
            ("port", &port),
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", &sockets),
            ("log_line_prefix", "%m [%p] "),
        ]);
        c
    }

    /// Appends `name = 'value'` lines to postgresql.conf.
    pub fn set(&self, settings: &[(&str, &str)]) {
        let conf = self.data.join("postgresql.conf");
        let mut text = String::from("\n# wal-rs integration test\n");
        for (name, value) in settings {
            assert!(!value.contains('\''), "{name} = {value:?} needs quoting");
            text.push_str(&format!("{name} = '{value}'\n"));
        }
        // Appending keeps the file's owner (postgres).
        let mut f =
            OpenOptions::new().append(true).open(&conf).unwrap_or_else(|e| panic!("opening {}: {e}", conf.display()));
        f.write_all(text.as_bytes()).expect("appending to postgresql.conf");
    }

    /// Archives every WAL file into `store` with wal-rs (the copy in the work directory).
    /// A new cluster archiving into `store` with wal-rs, started.
    pub fn archiving(wd: &WorkDir, name: &str, store: &StoreEnv) -> PgCluster {
        let cluster = PgCluster::init(wd, name);
        cluster.archive_to(store);
        cluster.start();
        cluster
    }

    pub fn archive_to(&self, store: &StoreEnv) {
        self.set(&[("archive_mode", "on"), ("archive_command", &store.archive_command(self.wd.walrs()))]);
    }

    /// Sets up archive recovery from `store` (restore_command and `recovery.signal`).
    pub fn recover_from(&self, store: &StoreEnv) {
        self.set(&[("restore_command", &store.restore_command(self.wd.walrs()))]);
        pg_shell(&format!("touch {}/recovery.signal", self.data.display()), "creating recovery.signal");
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start(&self) {
        self.start_with_env(&[]);
    }

    /// `pg_ctl start` with `env` in the server's environment (and so in archive_command's
    /// and restore_command's): credentials that a restore_command written by backup-fetch
    /// leaves to the environment.
    pub fn start_with_env(&self, env: &[(String, String)]) {
        let out = as_postgres("pg_ctl")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "120", "start"])
            .output()
            .expect("running pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start {} failed: {}\n--- last lines of {}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.log.display(),
            self.log_tail(40)
        );
    }

    /// `pg_ctl stop -m fast`: a clean shutdown.
    pub fn stop(&self) {
        run_ok(
            as_postgres("pg_ctl").arg("-D").arg(&self.data).args(["-m", "fast", "-w", "stop"]),
            &format!("stopping {}", self.name),
        );
    }

    /// Whether the postmaster is running (its pid file exists).
    pub fn is_running(&self) -> bool {
        self.data.join("postmaster.pid").exists()
    }

    /// Runs `sql` (one or more statements) and returns the rows of all of them.
    pub fn try_query(&self, sql: &str) -> Result<Rows, String> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let conninfo = format!("host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10", self.port);
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.name))?;
            let driver = tokio::spawn(connection);
            let result = client.simple_query(sql).await;
            drop(client);
            let _ = driver.await;
            let messages = result.map_err(|e| match e.as_db_error() {
                Some(db) => format!("{}: {}: {}", self.name, db.code().code(), db.message()),
                None => format!("{}: {e}", self.name),
            })?;
            Ok(messages
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
                    }
                    _ => None,
                })
                .collect())
        })
    }

    /// Runs `sql`, panicking on error.
    #[track_caller]
    pub fn query(&self, sql: &str) -> Rows {
        self.try_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The single value `sql` returns (NULL as "").
    #[track_caller]
    pub fn one(&self, sql: &str) -> String {
        let rows = self.query(sql);
        assert!(rows.len() == 1 && rows[0].len() == 1, "{sql}: expected one value, got {rows:?}");
        rows[0][0].clone().unwrap_or_default()
    }

    /// `pgbench ARGS... postgres` against this cluster.
    pub fn pgbench(&self, args: &[&str]) -> String {
        run_ok(
            as_postgres("pgbench")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .args(args)
                .arg("postgres"),
            &format!("pgbench {args:?} on {}", self.name),
        )
    }

    /// `pg_basebackup -X none` into `WorkDir/<rel>`: a backup without WAL, usable only
    /// with the archive.
    pub fn base_backup(&self, rel: &str) -> PathBuf {
        let dest = self.wd.join(rel);
        run_ok(
            as_postgres("pg_basebackup")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-D"])
                .arg(&dest)
                .args(["-X", "none", "--checkpoint=fast", "--no-sync"]),
            &format!("pg_basebackup of {}", self.name),
        );
        dest
    }

    /// Completes the current segment (`pg_switch_wal()`) and waits until the archiver has
    /// archived it (`pg_stat_archiver.last_archived_wal`). Returns its name.
    pub fn switch_wal_and_wait_archived(&self) -> String {
        let name = self.one("select pg_walfile_name(pg_switch_wal())");
        self.wait_archived(&name);
        name
    }

    /// Waits until segment `name`, or a later one, is archived.
    pub fn wait_archived(&self, name: &str) {
        wait_until(&format!("{} to archive {name}", self.name), Duration::from_secs(120), || {
            let last = self.try_query("select last_archived_wal from pg_stat_archiver").ok();
            let last = last.and_then(|r| r.first().and_then(|row| row[0].clone())).unwrap_or_default();
            // History files ("00000002.history") say nothing about segments; .backup and
            // .partial names start with their segment's.
            last.len() >= 24 && last[..24].chars().all(|c| c.is_ascii_hexdigit()) && &last[..24] >= name
        });
    }

    /// Waits until archive recovery has ended and the cluster accepts writes.
    pub fn wait_recovery_done(&self, timeout: Duration) {
        wait_until(&format!("{} to finish recovery", self.name), timeout, || {
            assert!(
                self.is_running(),
                "{} stopped during recovery\n--- last lines of {}\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
            self.try_query("select pg_is_in_recovery()")
                .is_ok_and(|r| r.first().and_then(|row| row[0].as_deref()) == Some("f"))
        });
    }

    /// The WAL file being written now: its first 8 hex digits are the timeline.
    pub fn current_wal_file(&self) -> String {
        self.one("select pg_walfile_name(pg_current_wal_lsn())")
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log at {}: {e})", self.log.display()));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- last lines of {} ({})\n{}\n---", self.log.display(), self.name, self.log_tail(40));
        }
        if self.is_running() {
            let _ = as_postgres("pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]).output();
        }
    }
}
