//! The non-exclusive base backup API, on one session: `pg_backup_start`/`pg_backup_stop`
//! on PostgreSQL 15 and later, `pg_start_backup(label, fast, false)`/`pg_stop_backup(false)`
//! on 12 to 14.

use tokio_postgres::Client;

use super::conn::one_line;
use crate::error::Error;
use crate::wal::{Lsn, WalFileName};

/// Facts about the server, read before the backup starts.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// `data_directory`.
    pub data_directory: String,
    /// WAL segment size in bytes.
    pub wal_segment_size: u32,
}

/// What `pg_backup_stop` returns.
#[derive(Debug, Clone)]
pub struct StopResult {
    /// The LSN the backup is consistent at.
    pub stop_lsn: Lsn,
    /// Contents of `backup_label`.
    pub label: String,
    /// Contents of `tablespace_map` (empty without tablespaces).
    pub tablespace_map: String,
}

fn pg_err(what: &str, e: tokio_postgres::Error) -> Error {
    Error::Config(format!(
        "{what} failed: {}: check that the role may run backups (superuser or pg_backup_start rights)",
        one_line(&e)
    ))
}

/// Reads version, system identifier, data directory and segment size.
pub async fn server_info(client: &Client) -> Result<ServerInfo, Error> {
    let row = client
        .query_one(
            "select current_setting('server_version_num')::int4,
                    (select system_identifier::text from pg_control_system()),
                    current_setting('data_directory'),
                    (select setting::int4 from pg_settings where name = 'wal_segment_size'),
                    (select unit from pg_settings where name = 'wal_segment_size'),
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| pg_err("reading server settings", e))?;
    let version_num: i32 = row.get(0);
    if version_num < 120000 {
        return Err(Error::Config(format!("PostgreSQL {version_num} is too old: wal-rs backs up 12 and later")));
    }
    if row.get::<_, bool>(5) {
        return Err(Error::Config("the server is in recovery: take base backups from the primary".into()));
    }
    let sysid: String = row.get(1);
    let seg: i32 = row.get(3);
    let unit: Option<String> = row.get(4);
    // wal_segment_size is reported in units of 8 kB blocks on 12+, or bytes ("B").
    let wal_segment_size = match unit.as_deref() {
        Some("B") => seg as u32,
        Some("8kB") => seg as u32 * 8192,
        Some("MB") => seg as u32 * 1024 * 1024,
        _ => seg as u32,
    };
    Ok(ServerInfo {
        version_num: version_num as u32,
        system_identifier: sysid
            .parse()
            .map_err(|_| Error::Config(format!("unexpected system identifier {sysid:?}")))?,
        data_directory: row.get(2),
        wal_segment_size,
    })
}

/// Starts the backup; returns the start LSN and the WAL file holding it (with the timeline).
pub async fn start(client: &Client, version_num: u32, label: &str, fast: bool) -> Result<(Lsn, WalFileName), Error> {
    let sql = if version_num >= 150000 {
        "select lsn::text, pg_walfile_name(lsn) from pg_backup_start($1, $2) as lsn"
    } else {
        "select lsn::text, pg_walfile_name(lsn) from pg_start_backup($1, $2, false) as lsn"
    };
    let row = client.query_one(sql, &[&label, &fast]).await.map_err(|e| pg_err("starting the backup", e))?;
    let lsn: String = row.get(0);
    let file: String = row.get(1);
    let lsn = lsn.parse::<Lsn>().map_err(|e| Error::Config(e.to_string()))?;
    let file = WalFileName::parse(&file).map_err(|e| Error::Config(e.to_string()))?;
    Ok((lsn, file))
}

/// Stops the backup without waiting for archiving: wal-rs checks the store itself.
pub async fn stop(client: &Client, version_num: u32) -> Result<StopResult, Error> {
    let sql = if version_num >= 150000 {
        "select lsn::text, labelfile, spcmapfile from pg_backup_stop(false)"
    } else {
        "select lsn::text, labelfile, spcmapfile from pg_stop_backup(false, false)"
    };
    let row = client.query_one(sql, &[]).await.map_err(|e| pg_err("stopping the backup", e))?;
    let lsn: String = row.get(0);
    Ok(StopResult {
        stop_lsn: lsn.parse::<Lsn>().map_err(|e| Error::Config(e.to_string()))?,
        label: row.get::<_, Option<String>>(1).unwrap_or_default(),
        tablespace_map: row.get::<_, Option<String>>(2).unwrap_or_default(),
    })
}
