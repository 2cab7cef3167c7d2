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
    let data = folder.path.join("data");
    let mut report =
        DrillReport { backup: backup.name.clone(), folder: folder.path.display().to_string(), ..Default::default() };

    // Restore, replaying to the first consistent point and then promoting: a promoted
    // server can install amcheck. Archiving is off so nothing reaches the store.
    let t = Instant::now();
    let fetch = FetchArgs {
        dest: data.clone(),
        backup: Some(backup.name.clone()),
        targets: RecoveryTargets { immediate: true, action: Some("promote".into()), ..Default::default() },
        standby: false,
        tablespace_map: Vec::new(),
        restore_command: None,
    };
    backup_fetch::run(config, &fetch).await?;
    report.restore_ms = t.elapsed().as_millis();
    prepare(&data, &folder.socket, &[&folder.path, &folder.socket])?;

    let server = Server {
        bindir: bindir.clone(),
        data: data.clone(),
        socket: folder.socket.clone(),
        log: folder.path.join("postgres.log"),
        port: free_port(),
    };
    let outcome = drill(&server, args.timeout, &mut report).await;
    server.stop();
    if let Err(failure) = outcome {
        report.failure = Some(failure);
    }
    report.passed = report.failure.is_none();
    report.total_ms = started.elapsed().as_millis();
    drop(folder);
    Ok(report)
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

/// PostgreSQL's binaries for a backup of `pg_version` (e.g. 150004): the given folder, else
/// Debian's /usr/lib/postgresql/<major>/bin, else `pg_config --bindir`.
fn find_bindir(given: Option<&Path>, pg_version: u32) -> Result<PathBuf, Error> {
    let has_pg_ctl = |d: &Path| d.join("pg_ctl").is_file();
    if let Some(d) = given {
        return if has_pg_ctl(d) {
            Ok(d.to_path_buf())
        } else {
            Err(Error::Config(format!("--pg-bindir {}: no pg_ctl there", d.display())))
        };
    }
    let major = pg_version / 10000;
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if major > 0 && has_pg_ctl(&debian) {
        return Ok(debian);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match from_pg_config {
        Some(d) if has_pg_ctl(&d) => Ok(d),
        _ => Err(Error::Config(format!(
            "no PostgreSQL {major} binaries found (looked in {} and pg_config --bindir): give --pg-bindir",
            debian.display()
        ))),
    }
}

/// Settings that make the restored copy safe to start here: no archiving into the store,
/// no TCP, trust on its private socket, small memory. Later lines of postgresql.auto.conf
/// win over anything the backup carried.
///
/// Every file is written without following a link: a backup keeps the links of its data
/// directory (`pg_hba.conf -> /etc/postgresql/...`), and a drill on the primary's host
/// would otherwise rewrite the live cluster's files.
fn prepare(data: &Path, socket: &Path, owned: &[&Path]) -> Result<(), Error> {
    let conf = data.join("postgresql.conf");
    if !conf.exists() {
        // Clusters configured under /etc (Debian) back up no postgresql.conf, or a link to
        // a file this host does not have.
        backup_fetch::write_restored(&conf, b"")?;
    }
    let auto = data.join("postgresql.auto.conf");
    let mut text = backup_fetch::read_restored(&auto, "restore-drill")?.unwrap_or_default();
    text.push_str(&format!(
        "# wal-rs restore drill\narchive_mode = 'off'\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
         shared_buffers = '32MB'\nhot_standby = 'off'\nhba_file = '{}'\nident_file = '{}'\n\
         logging_collector = 'off'\nshared_preload_libraries = ''\n",
        socket.display(),
        data.join("pg_hba.conf").display(),
        data.join("pg_ident.conf").display(),
    ));
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
    #[test]
    fn prepare_never_writes_through_links_from_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let hba = link_to_x(dir.path(), "live_hba", &data.join("pg_hba.conf"));
        let ident = link_to_x(dir.path(), "live_ident", &data.join("pg_ident.conf"));
        let auto = link_to_x(dir.path(), "live_auto", &data.join("postgresql.auto.conf"));
        // A dangling link: the file it names must not be created.
        std::os::unix::fs::symlink(dir.path().join("nowhere.conf"), data.join("postgresql.conf")).unwrap();

        prepare(&data, &dir.path().join("socket"), &[]).unwrap();

        for outside in [&hba, &ident, &auto] {
            assert_eq!(fs::read_to_string(outside).unwrap(), "x", "{} was written through", outside.display());
        }
        assert!(!dir.path().join("nowhere.conf").exists());
        let file = |name: &str| {
            let path = data.join(name);
            assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file(), "{name} is still a link");
            fs::read_to_string(path).unwrap()
        };
        assert_eq!(file("pg_hba.conf"), "local all all trust\n");
        assert_eq!(file("pg_ident.conf"), "");
        assert_eq!(file("postgresql.conf"), "");
        let auto_text = file("postgresql.auto.conf");
        assert!(auto_text.starts_with("# wal-rs restore drill\n"), "{auto_text}");
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
