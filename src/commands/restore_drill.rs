//! `wal-rs backup-verify --restore-drill NAME|LATEST`: the restore test operators know they
//! should run. Restores the backup into a temporary folder, starts PostgreSQL on it with
//! archiving off and only a Unix socket, replays to consistency and promotes, runs
//! `pg_amcheck` when it is installed and a sanity query on every database, then stops the
//! server and removes the folder, pass or fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use super::backup_fetch::{self, FetchArgs};
use crate::backup::catalog::{self, BackupInfo, Selector};
use crate::config::Config;
use crate::error::Error;
use crate::pg::recovery_conf::RecoveryTargets;
use crate::store::Store;

/// What the drill was asked.
#[derive(Debug, Clone)]
pub(super) struct DrillArgs {
    pub(super) backup: String,
    /// Parent of the temporary folder.
    pub(super) dir: Option<PathBuf>,
    /// PostgreSQL's binaries; found from the backup's version otherwise.
    pub(super) bindir: Option<PathBuf>,
    /// How long the server may take to reach consistency.
    pub(super) timeout: Duration,
    /// Keep the folder (for inspection) instead of removing it.
    pub(super) keep: bool,
}

/// What the drill found, with timings.
#[derive(Debug, Default, serde::Serialize)]
pub(super) struct DrillReport {
    pub(super) backup: String,
    pub(super) passed: bool,
    pub(super) failure: Option<String>,
    pub(super) restore_ms: u128,
    pub(super) recovery_ms: u128,
    pub(super) amcheck: String,
    pub(super) amcheck_ms: u128,
    pub(super) databases: u64,
    /// Prepared transactions the recovery brought back, rolled back in the drill's copy.
    pub(super) prepared_rolled_back: u64,
    pub(super) tables: u64,
    pub(super) bytes: u64,
    pub(super) total_ms: u128,
    pub(super) folder: String,
}

pub(super) async fn run(config: &Config, args: &DrillArgs) -> Result<DrillReport, Error> {
    let started = Instant::now();
    let store = super::common::open_store(config).await?;
    let backup = find_restorable(&store, &args.backup).await?;
    let bindir = find_bindir(args.bindir.as_deref(), backup.sentinel.pg_version)?;
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let folder = Folder::create(&parent, &backup.name, args.keep)?;
    let mut report =
        DrillReport { backup: backup.name.clone(), folder: folder.path.display().to_string(), ..Default::default() };

    let t = Instant::now();
    let fetch = fetch_args(&backup, &folder.path);
    let data = fetch.dest.clone();
    backup_fetch::run(config, &fetch).await?;
    report.restore_ms = t.elapsed().as_millis();

    let outcome = match read_primary_limits(&bindir, &data) {
        Ok(limits) => {
            prepare(&data, &folder.socket, &[&folder.path, &folder.socket], &limits)?;
            let server = Server {
                bindir: bindir.clone(),
                data: data.clone(),
                socket: folder.socket.clone(),
                log: folder.path.join("postgres.log"),
                port: free_port(),
            };
            let outcome = drill(&server, args.timeout, &mut report).await;
            server.stop();
            outcome
        }
        Err(failure) => Err(failure),
    };
    if let Err(failure) = outcome {
        report.failure = Some(failure);
    }
    report.passed = report.failure.is_none();
    report.total_ms = started.elapsed().as_millis();
    drop(folder);
    Ok(report)
}

/// The restore the drill asks of backup-fetch: the data directory in `folder/data` and each
/// tablespace in `folder/tablespaces/<oid>`, never where the primary had it (outside the
/// folder, so never removed; on the primary's own host, in use), replaying to the first
/// consistent point and then promoting (a promoted server can install amcheck).
fn fetch_args(backup: &BackupInfo, folder: &Path) -> FetchArgs {
    let tablespaces = folder.join("tablespaces");
    FetchArgs {
        dest: folder.join("data"),
        backup: Some(backup.name.clone()),
        targets: RecoveryTargets { immediate: true, action: Some("promote".into()), ..Default::default() },
        standby: false,
        tablespace_map: backup
            .sentinel
            .tablespaces()
            .into_iter()
            .map(|t| (t.oid.clone(), tablespaces.join(&t.oid)))
            .collect(),
        restore_command: None,
    }
}

/// NAME, or for LATEST the newest backup wal-rs can restore: a WAL-G delta backup is not
/// one (named, backup-fetch refuses it with the reason).
async fn find_restorable(store: &Arc<Store>, name: &str) -> Result<BackupInfo, Error> {
    if !name.eq_ignore_ascii_case("LATEST") {
        return super::backup_verify::find_backup(store, name).await;
    }
    let (backups, deltas, _) = catalog::list_readable(store).await?;
    catalog::select_restorable(&backups, &deltas, &Selector::Latest).cloned().ok_or_else(|| {
        Error::NotFound(format!(
            "no full backup in {} to drill ({} complete backups, {} of them WAL-G delta backups): see `wal-rs backup-list`",
            store.url(),
            backups.len(),
            deltas.len()
        ))
    })
}

/// Starts the server, waits for promotion, checks. The error is the one-line reason.
async fn drill(server: &Server, timeout: Duration, report: &mut DrillReport) -> Result<(), String> {
    let t = Instant::now();
    server.start(timeout)?;
    let deadline = Instant::now() + timeout;
    loop {
        match server.query_one("postgres", "SELECT pg_is_in_recovery()::text").await {
            Ok(v) if v == "false" => break,
            Ok(_) => {}
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("PostgreSQL did not reach consistency in {} s: {e}", timeout.as_secs()))
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(format!("PostgreSQL was still replaying after {} s: {}", timeout.as_secs(), server.log_tail()));
        }
        if !server.running() {
            return Err(format!("PostgreSQL stopped during recovery: {}", server.log_tail()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.recovery_ms = t.elapsed().as_millis();
    report.prepared_rolled_back = server.roll_back_prepared().await?;

    // The sanity query: every database answers, and its catalog and table sizes read.
    let dbs = server
        .query_column("postgres", "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
        .await
        .map_err(|e| format!("the sanity query failed: {e}"))?;
    report.databases = dbs.len() as u64;
    for db in &dbs {
        let row = server
            .query_one(
                db,
                "SELECT count(*)::text || ' ' || coalesce(sum(pg_total_relation_size(c.oid)), 0)::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            )
            .await
            .map_err(|e| format!("the sanity query failed in database {db}: {e}"))?;
        let (tables, bytes) = row.split_once(' ').unwrap_or(("0", "0"));
        report.tables += tables.parse::<u64>().unwrap_or(0);
        report.bytes += bytes.parse::<u64>().unwrap_or(0);
    }

    let t = Instant::now();
    report.amcheck = server.amcheck()?;
    report.amcheck_ms = t.elapsed().as_millis();
    Ok(())
}

/// The PostgreSQL tools the drill runs from the bindir (with `postgres`, which pg_ctl
/// starts), checked before anything is restored.
const DRILL_TOOLS: &[&str] = &["pg_ctl", "pg_controldata"];

/// PostgreSQL's binaries for a backup of `pg_version` (e.g. 150004): the given folder, else
/// Debian's /usr/lib/postgresql/<major>/bin, else `pg_config --bindir`.
fn find_bindir(given: Option<&Path>, pg_version: u32) -> Result<PathBuf, Error> {
    let has_drill_tools = |d: &Path| DRILL_TOOLS.iter().all(|tool| d.join(tool).is_file());
    if let Some(d) = given {
        return if has_drill_tools(d) {
            Ok(d.to_path_buf())
        } else {
            Err(Error::Config(format!(
                "--pg-bindir {}: no {} there: give the folder of PostgreSQL's binaries",
                d.display(),
                DRILL_TOOLS.join(" and ")
            )))
        };
    }
    let major = pg_version / 10000;
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if major > 0 && has_drill_tools(&debian) {
        return Ok(debian);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match from_pg_config {
        Some(d) if has_drill_tools(&d) => Ok(d),
        _ => Err(Error::Config(format!(
            "no PostgreSQL {major} binaries found (looked in {} and pg_config --bindir): give --pg-bindir",
            debian.display()
        ))),
    }
}

/// Settings that make the restored copy safe to start here: no archiving into the store,
/// no TCP (nor SSL, whose files are the primary's), trust on its private socket, small
/// memory, no `recovery_end_command` (a command of the primary's); and the primary's
/// `limits` (from [`read_primary_limits`]) that recovery needs. Later lines of
/// postgresql.auto.conf win over anything the backup carried, and the backup's settings
/// naming files elsewhere are dropped.
///
/// Every file is written without following a link: a backup keeps the links of its data
/// directory (`pg_hba.conf -> /etc/postgresql/...`), and a drill on the primary's host
/// would otherwise rewrite the live cluster's files. postgresql.conf is always the drill's
/// own: the backup's (or the file its link names, Debian's /etc/postgresql/N/main) may set
/// `data_directory`, and PostgreSQL would then recover and promote that cluster instead.
fn prepare(data: &Path, socket: &Path, owned: &[&Path], limits: &[(&str, u32)]) -> Result<(), Error> {
    backup_fetch::write_restored(&data.join("postgresql.conf"), DRILL_POSTGRESQL_CONF.as_bytes())?;
    let auto = data.join("postgresql.auto.conf");
    let backed_up = backup_fetch::read_restored(&auto, "restore-drill")?.unwrap_or_default();
    let mut text = without_host_paths(&backed_up);
    text.push_str(&format!(
        "# wal-rs restore drill\narchive_mode = 'off'\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
         shared_buffers = '32MB'\nhot_standby = 'off'\nhba_file = '{}'\nident_file = '{}'\n\
         logging_collector = 'off'\nshared_preload_libraries = ''\nssl = 'off'\n\
         recovery_end_command = ''\n",
        socket.display(),
        data.join("pg_hba.conf").display(),
        data.join("pg_ident.conf").display(),
    ));
    text.push_str(&limits_conf(limits));
    backup_fetch::write_restored(&auto, text.as_bytes())?;
    backup_fetch::write_restored(&data.join("pg_hba.conf"), b"local all all trust\n")?;
    backup_fetch::write_restored(&data.join("pg_ident.conf"), b"")?;
    if is_root() {
        // PostgreSQL refuses to run as root: the copy belongs to the postgres user.
        for dir in owned {
            run_tool(Command::new("chown").args(["-R", "postgres:", &dir.display().to_string()]))
                .map_err(|e| Error::Config(format!("cannot give {} to the postgres user: {e}", dir.display())))?;
        }
    }
    Ok(())
}

/// The drill's postgresql.conf: nothing of the backup's; the settings are in
/// postgresql.auto.conf, read after it.
const DRILL_POSTGRESQL_CONF: &str =
    "# wal-rs restore drill: the backup's postgresql.conf is not used; see postgresql.auto.conf\n";

/// Settings that name files on this host outside the drill folder, or other files to read
/// (`include`): the drill's values of those it needs follow the backup's lines, and the
/// others are left at their defaults inside the data directory.
const HOST_PATH_SETTINGS: &[&str] = &[
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "stats_temp_directory",
    "include",
    "include_dir",
    "include_if_exists",
];

/// `postgresql.auto.conf` as backed up, without the lines of `HOST_PATH_SETTINGS`
/// (ALTER SYSTEM writes none of them, but a hand-edited or tampered file may).
fn without_host_paths(conf: &str) -> String {
    let mut out = String::with_capacity(conf.len());
    for line in conf.lines().filter(|l| !HOST_PATH_SETTINGS.contains(&setting_name(l).as_str())) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The name a postgresql.conf line sets (or the directive, `include`), lower-case; empty
/// for a comment or blank line. PostgreSQL allows `name value` as well as `name = value`.
fn setting_name(line: &str) -> String {
    line.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// A setting PostgreSQL records in pg_control when it starts, whose value in recovery must be
/// at least the primary's. `max_prepared_transactions` must hold the prepared transactions
/// the backup carries or its WAL prepares (the default holds none: "maximum number of
/// prepared transactions reached"), and with `max_locks_per_transaction` and
/// `max_connections` it sizes the lock table their locks go in. A hot standby checks all of
/// them; the drill (`hot_standby = off`) takes them all, so a later check cannot fail it.
struct PrimaryLimit {
    /// The label pg_controldata prints (in the C locale).
    label: &'static str,
    /// The setting.
    name: &'static str,
    /// PostgreSQL's default, the floor: the drill's configuration assumes no less (the
    /// primary's small `max_connections` may rest on a small `superuser_reserved_connections`
    /// in the postgresql.conf the drill does not read).
    default: u32,
    /// Whether pg_controldata of every PostgreSQL wal-rs restores prints it; 10 and 11 record
    /// no `max_wal_senders` (WAL senders were then counted in `max_connections`).
    always: bool,
}

const PRIMARY_LIMITS: &[PrimaryLimit] = &[
    PrimaryLimit { label: "max_connections setting", name: "max_connections", default: 100, always: true },
    PrimaryLimit { label: "max_worker_processes setting", name: "max_worker_processes", default: 8, always: true },
    PrimaryLimit { label: "max_wal_senders setting", name: "max_wal_senders", default: 10, always: false },
    PrimaryLimit { label: "max_prepared_xacts setting", name: "max_prepared_transactions", default: 0, always: true },
    PrimaryLimit { label: "max_locks_per_xact setting", name: "max_locks_per_transaction", default: 64, always: true },
];

/// The primary's `PRIMARY_LIMITS` as the restored pg_control records them, read by
/// `pg_controldata` in the C locale (its labels are translated otherwise), as whoever runs
/// the drill: it owns the copy until `prepare` gives it to postgres, and pg_controldata only
/// reads. The error is the drill's one-line failure: a limit is never guessed.
fn read_primary_limits(bindir: &Path, data: &Path) -> Result<Vec<(&'static str, u32)>, String> {
    let control = data.join("global").join("pg_control");
    let out = run_tool(Command::new(bindir.join("pg_controldata")).arg("-D").arg(data).env("LC_ALL", "C"))
        .map_err(|e| format!("pg_controldata could not read the restored {}: {e}", control.display()))?;
    primary_limits(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("cannot take the primary's settings from the restored {}: {e}", control.display()))
}

/// `PRIMARY_LIMITS` in pg_controldata's output, found by label, each raised to its default.
fn primary_limits(controldata: &str) -> Result<Vec<(&'static str, u32)>, String> {
    // pg_controldata warns and prints the values anyway; they cannot be trusted.
    if controldata.contains("Calculated CRC checksum does not match") {
        return Err("its CRC does not match (pg_controldata): the file is damaged".into());
    }
    let value_of = |label: &str| {
        controldata.lines().find_map(|line| {
            let (l, value) = line.split_once(':')?;
            (l.trim() == label).then(|| value.trim())
        })
    };
    let mut limits = Vec::with_capacity(PRIMARY_LIMITS.len());
    for limit in PRIMARY_LIMITS {
        match value_of(limit.label) {
            Some(v) => {
                let n: u32 = v.parse().map_err(|_| format!("pg_controldata printed {:?} for {:?}", v, limit.label))?;
                limits.push((limit.name, n.max(limit.default)));
            }
            None if limit.always => return Err(format!("pg_controldata printed no {:?}", limit.label)),
            None => {}
        }
    }
    Ok(limits)
}

/// The lines of postgresql.auto.conf that set the primary's limits.
fn limits_conf(limits: &[(&str, u32)]) -> String {
    let mut text = String::from("# the primary's settings from pg_control, which recovery needs at least\n");
    for (name, value) in limits {
        text.push_str(&format!("{name} = '{value}'\n"));
    }
    text
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(54329)
}

/// Runs `cmd`; the error is its first line of output.
fn run_tool(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(out)
    } else {
        let text = String::from_utf8_lossy(if out.stderr.is_empty() { &out.stdout } else { &out.stderr }).into_owned();
        Err(text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("failed").trim().to_string())
    }
}

/// The temporary folder, and a short one for the server's socket (a Unix socket path must
/// fit in 107 bytes, which a deep drill folder may not); removed when dropped unless kept.
struct Folder {
    path: PathBuf,
    socket: PathBuf,
    keep: bool,
}

impl Folder {
    fn create(parent: &Path, backup: &str, keep: bool) -> Result<Folder, Error> {
        let path = parent.join(format!("walrs-drill-{backup}-{}", std::process::id()));
        let socket = std::env::temp_dir().join(format!("walrs-drill-{}", std::process::id()));
        for dir in [&path, &socket] {
            let _ = fs::remove_dir_all(dir);
            fs::create_dir_all(dir).map_err(|e| Error::local("create", dir, e))?;
        }
        Ok(Folder { path, socket, keep })
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.socket);
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The drill's PostgreSQL server.
struct Server {
    bindir: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Server {
    /// A PostgreSQL tool, as the postgres user when running as root.
    fn tool(&self, name: &str) -> Command {
        let program = self.bindir.join(name);
        let mut cmd = if is_root() {
            // runuser lives in sbin, which a minimal PATH (cron's, PostgreSQL's) may lack.
            let runuser =
                ["/usr/sbin/runuser", "/sbin/runuser"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("runuser");
            let mut c = Command::new(runuser);
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir(&self.socket);
        cmd
    }

    fn log(&self) -> PathBuf {
        self.log.clone()
    }

    fn start(&self, timeout: Duration) -> Result<(), String> {
        let mut cmd = self.tool("pg_ctl");
        cmd.args(["-D", &self.data.display().to_string(), "-l", &self.log().display().to_string()]).args([
            "-o",
            &format!("-p {}", self.port),
            "-w",
            "-t",
            &timeout.as_secs().max(1).to_string(),
            "start",
        ]);
        run_tool(&mut cmd).map(|_| ()).map_err(|e| match self.log_tail() {
            tail if tail == "(no server log)" => format!("PostgreSQL did not start: {e}"),
            tail => format!("PostgreSQL did not start: {tail}"),
        })
    }

    fn running(&self) -> bool {
        let mut cmd = self.tool("pg_ctl");
        cmd.args(["-D", &self.data.display().to_string(), "status"]);
        run_tool(&mut cmd).is_ok()
    }

    fn stop(&self) {
        let mut cmd = self.tool("pg_ctl");
        cmd.args(["-D", &self.data.display().to_string(), "-m", "immediate", "-w", "stop"]);
        let _ = run_tool(&mut cmd);
    }

    /// The last line of the server log that says something went wrong.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log()).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| l.contains("FATAL") || l.contains("PANIC") || l.contains("ERROR"))
            .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("(no server log)")
            .trim()
            .to_string()
    }

    async fn client(&self, db: &str) -> Result<tokio_postgres::Client, String> {
        let user = std::env::var("PGUSER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "postgres".into());
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.socket)
            .port(self.port)
            .user(&user)
            .dbname(db)
            .application_name("wal-rs restore drill")
            .connect(NoTls)
            .await
            .map_err(|e| crate::pg::conn::one_line(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    async fn query_column(&self, db: &str, sql: &str) -> Result<Vec<String>, String> {
        let client = self.client(db).await?;
        let rows = client.query(sql, &[]).await.map_err(|e| crate::pg::conn::one_line(&e))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    async fn query_one(&self, db: &str, sql: &str) -> Result<String, String> {
        self.query_column(db, sql).await?.into_iter().next().ok_or_else(|| "no row".to_string())
    }

    /// Rolls back the prepared transactions the recovery brought back: they keep their
    /// locks, and one holding a table's (prepared DDL) would block the checks after it for
    /// ever. The copy is thrown away, so nothing is lost. Returns how many there were.
    async fn roll_back_prepared(&self) -> Result<u64, String> {
        let client = self.client("postgres").await?;
        let rows = client
            .query("SELECT database::text, gid FROM pg_prepared_xacts", &[])
            .await
            .map_err(|e| format!("listing prepared transactions failed: {}", crate::pg::conn::one_line(&e)))?;
        for row in &rows {
            let (db, gid): (String, String) = (row.get(0), row.get(1));
            // A utility statement takes no parameters: the gid as a quoted literal.
            let sql = format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"));
            self.client(&db).await?.batch_execute(&sql).await.map_err(|e| {
                format!(
                    "rolling back prepared transaction {gid:?} in database {db} failed: {}",
                    crate::pg::conn::one_line(&e)
                )
            })?;
        }
        Ok(rows.len() as u64)
    }

    /// `pg_amcheck --all --install-missing`, when pg_amcheck and the amcheck extension are
    /// installed. Returns how it went ("passed", or why it was skipped); a failure is an
    /// error.
    fn amcheck(&self) -> Result<String, String> {
        if !self.bindir.join("pg_amcheck").is_file() {
            return Ok("skipped: pg_amcheck is not installed".into());
        }
        let user = std::env::var("PGUSER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "postgres".into());
        let mut cmd = self.tool("pg_amcheck");
        cmd.args(["-h", &self.socket.display().to_string(), "-p", &self.port.to_string(), "-U", &user]).args([
            "--all",
            "--install-missing",
            "--no-strict-names",
        ]);
        match run_tool(&mut cmd) {
            Ok(_) => Ok("passed".into()),
            Err(e) if e.contains("amcheck") && e.contains("not available") => {
                Ok(format!("skipped: the amcheck extension is not installed ({e})"))
            }
            Err(e) => Err(format!("pg_amcheck found problems: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::link_to_x;

    /// A backup of a cluster configured under /etc keeps `pg_hba.conf -> /etc/...`: the
    /// drill must replace the links, never write the live cluster's files through them.
    /// postgresql.conf is a link that dangles (a file this host does not have) or names the
    /// live cluster's configuration, which sets its data directory (Debian's
    /// /etc/postgresql/N/main): either way the drill's own file replaces it.
    #[test]
    fn prepare_never_writes_through_links_from_the_backup() {
        for live_conf in [None, Some("data_directory = '/var/lib/postgresql/15/main'\n")] {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            fs::create_dir(&data).unwrap();
            let hba = link_to_x(dir.path(), "live_hba", &data.join("pg_hba.conf"));
            let ident = link_to_x(dir.path(), "live_ident", &data.join("pg_ident.conf"));
            let auto = link_to_x(dir.path(), "live_auto", &data.join("postgresql.auto.conf"));
            let conf_target = dir.path().join("live.conf");
            if let Some(text) = live_conf {
                fs::write(&conf_target, text).unwrap();
            }
            std::os::unix::fs::symlink(&conf_target, data.join("postgresql.conf")).unwrap();

            prepare(&data, &dir.path().join("socket"), &[], &[]).unwrap();

            for outside in [&hba, &ident, &auto] {
                assert_eq!(fs::read_to_string(outside).unwrap(), "x", "{} was written through", outside.display());
            }
            match live_conf {
                // The file a dangling link names must not be created.
                None => assert!(!conf_target.exists()),
                Some(text) => assert_eq!(fs::read_to_string(&conf_target).unwrap(), text),
            }
            let file = |name: &str| {
                let path = data.join(name);
                assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file(), "{name} is still a link");
                fs::read_to_string(path).unwrap()
            };
            assert_eq!(file("pg_hba.conf"), "local all all trust\n");
            assert_eq!(file("pg_ident.conf"), "");
            assert_eq!(file("postgresql.conf"), DRILL_POSTGRESQL_CONF);
            let auto_text = file("postgresql.auto.conf");
            assert!(auto_text.starts_with("# wal-rs restore drill\n"), "{auto_text}");
        }
    }

    /// A regular postgresql.auto.conf is kept (it holds backup-fetch's restore_command),
    /// but nothing in it may send PostgreSQL to files outside the drill folder.
    #[test]
    fn settings_of_the_backup_naming_files_elsewhere_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let backed_up = "work_mem = '64MB'\n\
                         include '/etc/postgresql/15/main/extra.conf'\n\
                         Include_Dir='conf.d'\n\
                         include_if_exists = '/etc/walrs.conf'\n\
                         data_directory = '/var/lib/postgresql/15/main'\n\
                         hba_file = '/etc/postgresql/15/main/pg_hba.conf'\n\
                         external_pid_file = '/var/run/postgresql/15-main.pid'\n\
                         stats_temp_directory = '/var/run/postgresql/15-main.pg_stat_tmp'\n\
                         # Added by wal-rs backup-fetch\n\
                         restore_command = 'wal-rs wal-fetch %f %p'\n";
        fs::write(data.join("postgresql.auto.conf"), backed_up).unwrap();

        prepare(&data, &dir.path().join("socket"), &[], &[]).unwrap();

        let text = fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        let set: Vec<(String, &str)> = text.lines().map(|l| (setting_name(l), l)).collect();
        for name in HOST_PATH_SETTINGS {
            let lines: Vec<&str> = set.iter().filter(|(n, _)| n == name).map(|(_, l)| *l).collect();
            match *name {
                "hba_file" => assert_eq!(lines, [format!("hba_file = '{}'", data.join("pg_hba.conf").display())]),
                "ident_file" => {
                    assert_eq!(lines, [format!("ident_file = '{}'", data.join("pg_ident.conf").display())])
                }
                _ => assert!(lines.is_empty(), "{name} kept: {text}"),
            }
        }
        assert!(text.starts_with("work_mem = '64MB'\n"), "{text}");
        assert!(text.contains("\nrestore_command = 'wal-rs wal-fetch %f %p'\n"), "{text}");
    }

    /// `pg_controldata` of a PostgreSQL 15 cluster that ran with max_connections = 40,
    /// max_worker_processes = 12, max_wal_senders = 4, max_prepared_transactions = 5 and
    /// max_locks_per_transaction = 128 (C locale).
    const PG15_CONTROLDATA: &str = "\
pg_control version number:            1300\n\
Catalog version number:               202209061\n\
Database system identifier:           7712898774149717867\n\
Database cluster state:               shut down\n\
pg_control last modified:             Fri Nov 27 17:06:29 2026\n\
Latest checkpoint location:           0/15007C8\n\
Latest checkpoint's REDO location:    0/15007C8\n\
Latest checkpoint's REDO WAL file:    000000010000000000000001\n\
Latest checkpoint's TimeLineID:       1\n\
Latest checkpoint's PrevTimeLineID:   1\n\
Latest checkpoint's full_page_writes: on\n\
Latest checkpoint's NextXID:          0:724\n\
Latest checkpoint's NextOID:          13572\n\
Latest checkpoint's NextMultiXactId:  1\n\
Latest checkpoint's NextMultiOffset:  0\n\
Latest checkpoint's oldestXID:        716\n\
Latest checkpoint's oldestXID's DB:   1\n\
Latest checkpoint's oldestActiveXID:  0\n\
Latest checkpoint's oldestMultiXid:   1\n\
Latest checkpoint's oldestMulti's DB: 1\n\
Latest checkpoint's oldestCommitTsXid:0\n\
Latest checkpoint's newestCommitTsXid:0\n\
Time of latest checkpoint:            Fri Nov 27 17:06:29 2026\n\
Fake LSN counter for unlogged rels:   0/3E8\n\
Minimum recovery ending location:     0/0\n\
Min recovery ending loc's timeline:   0\n\
Backup start location:                0/0\n\
Backup end location:                  0/0\n\
End-of-backup record required:        no\n\
wal_level setting:                    replica\n\
wal_log_hints setting:                off\n\
max_connections setting:              40\n\
max_worker_processes setting:         12\n\
max_wal_senders setting:              4\n\
max_prepared_xacts setting:           5\n\
max_locks_per_xact setting:           128\n\
track_commit_timestamp setting:       off\n\
Maximum data alignment:               8\n\
Database block size:                  8192\n\
Blocks per segment of large relation: 131072\n\
WAL block size:                       8192\n\
Bytes per WAL segment:                16777216\n\
Maximum length of identifiers:        64\n\
Maximum columns in an index:          32\n\
Maximum size of a TOAST chunk:        1996\n\
Size of a large-object chunk:         2048\n\
Date/time type storage:               64-bit integers\n\
Float8 argument passing:              by value\n\
Data page checksum version:           0\n\
Mock authentication nonce:            b86429bcbcb59039956611d5bcaf4aafa6e356603046d78c8bb3ffd8516f9276\n\
";

    /// The primary's values by label, none below PostgreSQL's default (here max_connections
    /// and max_wal_senders), wherever the lines are.
    #[test]
    fn primary_limits_are_read_from_pg_controldata_by_label() {
        let expected = [
            ("max_connections", 100),
            ("max_worker_processes", 12),
            ("max_wal_senders", 10),
            ("max_prepared_transactions", 5),
            ("max_locks_per_transaction", 128),
        ];
        assert_eq!(primary_limits(PG15_CONTROLDATA).unwrap(), expected);
        let reversed: String = PG15_CONTROLDATA.lines().rev().map(|l| format!("{l}\n")).collect();
        assert_eq!(primary_limits(&reversed).unwrap(), expected);

        // PostgreSQL 10 and 11 record no max_wal_senders: the others are still taken.
        let pg11: String =
            PG15_CONTROLDATA.lines().filter(|l| !l.starts_with("max_wal_senders")).map(|l| format!("{l}\n")).collect();
        assert_eq!(primary_limits(&pg11).unwrap().len(), 4);
    }

    /// Anything else is a failure naming what is wrong, never a guess.
    #[test]
    fn unreadable_pg_controldata_output_fails_the_drill() {
        let without = |prefix: &str| -> String {
            PG15_CONTROLDATA.lines().filter(|l| !l.starts_with(prefix)).map(|l| format!("{l}\n")).collect()
        };
        let err = primary_limits(&without("max_prepared_xacts")).unwrap_err();
        assert!(err.contains("\"max_prepared_xacts setting\""), "{err}");
        let err = primary_limits(&without("max_locks_per_xact")).unwrap_err();
        assert!(err.contains("\"max_locks_per_xact setting\""), "{err}");
        let garbled =
            PG15_CONTROLDATA.replace("max_prepared_xacts setting:           5", "max_prepared_xacts setting: five");
        let err = primary_limits(&garbled).unwrap_err();
        assert!(err.contains("\"five\"") && err.contains("max_prepared_xacts"), "{err}");
        let damaged = format!(
            "WARNING: Calculated CRC checksum does not match value stored in file.\n\
             Either the file is corrupt, or it has a different layout than this program\n\
             is expecting.  The results below are untrustworthy.\n\n{PG15_CONTROLDATA}"
        );
        assert!(primary_limits(&damaged).unwrap_err().contains("CRC"));
        assert!(primary_limits("").is_err());
    }

    /// The primary's limits are the last lines of postgresql.auto.conf, so they win over the
    /// backup's own (an ALTER SYSTEM waiting for a restart).
    #[test]
    fn prepare_sets_the_primary_limits_over_the_backup_settings() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("postgresql.auto.conf"), "max_prepared_transactions = '0'\nwork_mem = '64MB'\n").unwrap();
        let limits = primary_limits(PG15_CONTROLDATA).unwrap();

        prepare(&data, &dir.path().join("socket"), &[], &limits).unwrap();

        let text = fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        let last_value = |name: &str| {
            text.lines()
                .rev()
                .find(|l| setting_name(l) == name)
                .map(|l| l.split_once('=').unwrap().1.trim().to_string())
        };
        for (name, value) in &limits {
            assert_eq!(last_value(name), Some(format!("'{value}'")), "{name} in {text}");
        }
        assert_eq!(last_value("max_prepared_transactions").as_deref(), Some("'5'"));
        assert_eq!(last_value("work_mem").as_deref(), Some("'64MB'"));
        assert_eq!(fs::read_to_string(data.join("postgresql.conf")).unwrap(), DRILL_POSTGRESQL_CONF);
    }

    /// The primary's tablespaces live outside the drill folder (on its own host, in use):
    /// the drill restores every one of them into the folder, which it removes.
    #[test]
    fn every_tablespace_is_restored_inside_the_drill_folder() {
        let sentinel: crate::backup::sentinel::Sentinel = serde_json::from_str(
            r#"{"LSN":1,"Spec":{"base_prefix":"/var/lib/postgresql/15/main/","tablespaces":["16385","16390"],
                "16385":{"loc":"/srv/ts1/"},"16390":{"loc":"/mnt/fast/ts2/"}}}"#,
        )
        .unwrap();
        let backup = BackupInfo { name: "base_000000010000000000000002".into(), sentinel };
        let folder = Path::new("/tmp/walrs-drill-base_000000010000000000000002-1");

        let args = fetch_args(&backup, folder);

        assert_eq!(args.dest, folder.join("data"));
        let mut oids: Vec<&str> = args.tablespace_map.iter().map(|(oid, _)| oid.as_str()).collect();
        oids.sort();
        assert_eq!(oids, ["16385", "16390"], "every tablespace of the backup is mapped");
        for (oid, dir) in &args.tablespace_map {
            assert_eq!(dir, &folder.join("tablespaces").join(oid));
        }
        assert_eq!(args.backup.as_deref(), Some("base_000000010000000000000002"));
    }

    #[test]
    fn latest_drills_the_newest_full_backup() {
        use crate::store::{memory::MemoryStore, Metadata, ObjectKey, PutMode, PutOptions};
        let store = Arc::new(Store::Memory(MemoryStore::new()));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let sentinels = [
                ("base_000000010000000000000002", r#"{"LSN":1,"FinishTime":"2026-11-26T10:00:00Z"}"#),
                (
                    "base_000000010000000000000004",
                    r#"{"LSN":3,"FinishTime":"2026-11-26T11:00:00Z","DeltaFrom":"base_000000010000000000000002"}"#,
                ),
            ];
            for (name, json) in sentinels {
                let key = ObjectKey::new(&format!("basebackups_005/{name}_backup_stop_sentinel.json")).unwrap();
                let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
                store.put_bytes(&key, json.as_bytes().to_vec(), opts).await.unwrap();
            }
            assert_eq!(find_restorable(&store, "LATEST").await.unwrap().name, "base_000000010000000000000002");
            let named = find_restorable(&store, "base_000000010000000000000004").await.unwrap();
            assert_eq!(named.name, "base_000000010000000000000004");
        });
    }
}
