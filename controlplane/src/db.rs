//! The state database: where it is (given, or a private cluster under `--data/state` that
//! the first process to need it starts), its schema, and connections.
//!
//! Semi-structured parts (server specs, provider handles, observations, resource
//! attributes, backup rows) are jsonb, so a new fact or attribute needs no migration.

use std::path::Path;

use anyhow::{Context, Result};
use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::sys::{self, pg_tool, run_as_postgres};

/// The schema, applied (idempotently) by every process at start, under an advisory lock.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS timelines (
    id text PRIMARY KEY,
    parent_id text REFERENCES timelines (id),
    store text NOT NULL,
    branch_time timestamptz,
    branch_lsn text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS resources (
    id text PRIMARY KEY,
    name text NOT NULL,
    desired text NOT NULL DEFAULT 'available',
    state text NOT NULL,
    plan text NOT NULL DEFAULT 'local',
    attrs jsonb NOT NULL DEFAULT '{}',
    leader_id text,
    timeline_id text NOT NULL REFERENCES timelines (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS resources_live_name ON resources (name) WHERE state <> 'destroyed';
CREATE TABLE IF NOT EXISTS servers (
    id text PRIMARY KEY,
    resource_id text NOT NULL REFERENCES resources (id),
    role text NOT NULL,
    desired text NOT NULL DEFAULT 'running',
    state text NOT NULL,
    timeline_id text NOT NULL REFERENCES timelines (id),
    spec jsonb NOT NULL,
    handle jsonb,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Bumped whenever something other than the server's own step changes what the server is
-- (rollback re-pointing a follower, unfollow, destroy): a step that started before commits
-- its result only if the generation it read is still the server's.
ALTER TABLE servers ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;
-- Times the server was sent back to `restoring` because `starting` or `recovering` kept
-- failing; reset when it becomes available. Bounds the restores (worker::RESTORE_CYCLES).
ALTER TABLE servers ADD COLUMN IF NOT EXISTS restore_restarts int NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS backups (
    timeline_id text NOT NULL REFERENCES timelines (id),
    name text NOT NULL,
    info jsonb NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (timeline_id, name)
);
CREATE TABLE IF NOT EXISTS observations (
    id bigserial PRIMARY KEY,
    server_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    facts jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_server_at ON observations (server_id, at DESC);
CREATE TABLE IF NOT EXISTS jobs (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    target text NOT NULL,
    run_after timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    locked_by text,
    attempts int NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, target)
);
"#;

/// How to reach the state database: the configured URL, else the private cluster (started
/// if it is not running).
pub async fn locate(cfg: &Config) -> Result<String> {
    if let Some(url) = &cfg.database_url {
        return Ok(url.clone());
    }
    let data = &cfg.data;
    sys::pg_dir(&data.join("run"), 0o755)?;
    // One process at a time bootstraps: a file lock, held until this function returns.
    let lock_path = data.join("state.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&lock);
    tokio::task::spawn_blocking(move || {
        // SAFETY: fd is open for the whole call; flock only blocks.
        unsafe { libc::flock(fd, libc::LOCK_EX) }
    })
    .await?;
    let result = start_private(cfg, data).await;
    drop(lock);
    result?;
    Ok(format!("host={} port=5432 user=postgres dbname=postgres", data.join("run").display()))
}

async fn start_private(cfg: &Config, data: &Path) -> Result<()> {
    let pgdata = data.join("state");
    let pgdata_s = pgdata.display().to_string();
    if !pgdata.join("PG_VERSION").exists() || !pgdata.join("walrs_control_ready").exists() {
        // A half-made cluster (a process killed during initdb) is made again.
        let _ = std::fs::remove_dir_all(&pgdata);
        sys::pg_dir(&pgdata, 0o700)?;
        let argv: Vec<String> =
            [pg_tool("initdb"), "-D".into(), pgdata_s.clone(), "-U".into(), "postgres".into(), "--auth=trust".into()]
                .into_iter()
                .chain(["--encoding=UTF8", "--locale=C", "--no-sync"].map(String::from))
                .collect();
        run_as_postgres(&argv, &[]).await?.ok("initdb of the state database")?;
        let mut conf = format!(
            "\n# wal-rs-control state database\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nshared_buffers = 32MB\nmax_connections = 200\n",
            data.join("run").display()
        );
        if cfg.unsafe_no_fsync {
            conf.push_str("fsync = off\n");
        }
        let argv = vec![
            "sh".into(),
            "-c".into(),
            format!("cat >> '{pgdata_s}/postgresql.conf' && touch '{pgdata_s}/walrs_control_ready'"),
        ];
        sys::run_as_postgres_with_input(&argv, &[], Some(&conf)).await?.ok("configuring the state database")?;
    }
    if !sys::postmaster_running(&pgdata) {
        let log = data.join("state.log").display().to_string();
        let argv: Vec<String> =
            [pg_tool("pg_ctl"), "-D".into(), pgdata_s, "-l".into(), log, "-w".into(), "-t".into(), "60".into()]
                .into_iter()
                .chain(["start".to_string()])
                .collect();
        run_as_postgres(&argv, &[]).await?.ok("starting the state database")?;
        crate::info!("event" = "state_db_started", "data" = data.display());
    }
    Ok(())
}

/// A new connection to the state database. Short-lived connections keep every process
/// indifferent to a restart of the state database.
pub async fn connect(conninfo: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await.context("connecting to the state database")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Applies the schema.
pub async fn migrate(conninfo: &str) -> Result<()> {
    let mut c = connect(conninfo).await?;
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7007)", &[]).await?;
    tx.batch_execute(SCHEMA).await.context("applying the state schema")?;
    tx.commit().await?;
    Ok(())
}

/// A fresh id: `prefix-` and 12 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}
