//! The non-exclusive base backup API, on one session: `pg_backup_start`/`pg_backup_stop`
//! on PostgreSQL 15 and later, `pg_start_backup(label, fast, false)`/`pg_stop_backup(false)`
//! on 12 to 14.

use tokio_postgres::error::SqlState;
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
    /// `catalog_version_no`, which names each tablespace's version directory
    /// (`PG_15_202209061`, `TABLESPACE_VERSION_DIRECTORY` in catalog.h).
    pub catalog_version: u32,
}

impl ServerInfo {
    /// The folder in each tablespace that belongs to this server (`TABLESPACE_VERSION_DIRECTORY`):
    /// `PG_<major>_<catalog version>`. After `pg_upgrade --link` the old version's folder
    /// sits beside it and is not part of this cluster.
    pub fn tablespace_version_dir(&self) -> String {
        format!("PG_{}_{}", self.version_num / 10000, self.catalog_version)
    }
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

/// A failed query, with advice that fits the cause: the rights the query needs when the
/// server refused it for lack of them, what to look at when the session ended.
fn pg_err(what: &str, e: tokio_postgres::Error, rights: &str) -> Error {
    let advice = if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        rights
    } else if e.is_closed() {
        "the session to PostgreSQL ended: check the server log (a restart, a timeout, the network), then run backup-push again"
    } else {
        "check the server log, then run backup-push again"
    };
    Error::Config(format!("{what} failed: {}: {advice}", one_line(&e)))
}

/// What reading the server's facts needs: `data_directory` is readable only with
/// pg_read_all_settings (or as a superuser).
const SETTINGS_RIGHTS: &str =
    "grant the role pg_read_all_settings (GRANT pg_read_all_settings TO <role>) or connect as a superuser";

/// What starting and stopping a backup needs (PostgreSQL 15's names; 12 to 14:
/// pg_start_backup and pg_stop_backup).
const BACKUP_RIGHTS: &str =
    "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO <role>, or connect as a superuser";

/// The session's own settings for a backup, as pg_dump sets them: the role's or database's
/// timeouts must not end it. pg_backup_start with a spread checkpoint can run for minutes
/// (statement_timeout, and transaction_timeout on 17+, would cancel it), and the session
/// then stays idle through the whole walk and upload (idle_session_timeout, 14+, would end
/// it and with it the backup, which shows only at pg_backup_stop). A setting this server
/// does not have is left alone (`current_setting(name, true)` is null for it).
const SESSION_SETTINGS: &str = "select set_config(name, '0', false)
     from unnest(array['statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout',
                       'idle_session_timeout', 'transaction_timeout']) as name
     where current_setting(name, true) is not null";

/// Turns off, for this session only, the timeouts that would end a long backup.
pub async fn prepare_session(client: &Client) -> Result<(), Error> {
    client.execute(SESSION_SETTINGS, &[]).await.map_err(|e| {
        pg_err("setting the session's timeouts to 0", e, "check the server log, then run backup-push again")
    })?;
    Ok(())
}

/// Reads version, system identifier, data directory and segment size.
pub async fn server_info(client: &Client) -> Result<ServerInfo, Error> {
    let row = client
        .query_one(
            "select current_setting('server_version_num')::int4,
                    (select system_identifier::text from pg_control_system()),
                    (select catalog_version_no from pg_control_system()),
                    current_setting('data_directory'),
                    (select setting::int4 from pg_settings where name = 'wal_segment_size'),
                    (select unit from pg_settings where name = 'wal_segment_size'),
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| {
            pg_err("reading the server's settings (data_directory, pg_control_system())", e, SETTINGS_RIGHTS)
        })?;
    let version_num: i32 = row.get(0);
    if version_num < 120000 {
        return Err(Error::Config(format!("PostgreSQL {version_num} is too old: wal-rs backs up 12 and later")));
    }
    if row.get::<_, bool>(6) {
        return Err(Error::Config("the server is in recovery: take base backups from the primary".into()));
    }
    let sysid: String = row.get(1);
    let catalog_version: i32 = row.get(2);
    let seg: i32 = row.get(4);
    let unit: Option<String> = row.get(5);
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
        data_directory: row.get(3),
        wal_segment_size,
        catalog_version: catalog_version as u32,
    })
}

/// Starts the backup; returns the start LSN and the WAL file holding it (with the timeline).
pub async fn start(client: &Client, version_num: u32, label: &str, fast: bool) -> Result<(Lsn, WalFileName), Error> {
    let sql = if version_num >= 150000 {
        "select lsn::text, pg_walfile_name(lsn) from pg_backup_start($1, $2) as lsn"
    } else {
        "select lsn::text, pg_walfile_name(lsn) from pg_start_backup($1, $2, false) as lsn"
    };
    let row =
        client.query_one(sql, &[&label, &fast]).await.map_err(|e| pg_err("starting the backup", e, BACKUP_RIGHTS))?;
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
    let row = client.query_one(sql, &[]).await.map_err(|e| pg_err("stopping the backup", e, BACKUP_RIGHTS))?;
    let lsn: String = row.get(0);
    Ok(StopResult {
        stop_lsn: lsn.parse::<Lsn>().map_err(|e| Error::Config(e.to_string()))?,
        label: row.get::<_, Option<String>>(1).unwrap_or_default(),
        tablespace_map: row.get::<_, Option<String>>(2).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tablespace_folder_is_the_servers_version_directory() {
        let info = ServerInfo {
            version_num: 150018,
            system_identifier: 1,
            data_directory: "/d".into(),
            wal_segment_size: 16 << 20,
            catalog_version: 202209061,
        };
        assert_eq!(info.tablespace_version_dir(), "PG_15_202209061");
    }
}
