//! The backups in a store: found by their sentinels, ordered by finish time and LSN (never
//! by name: after a timeline change or an upgrade, name order is not age order).

use std::sync::Arc;

use super::sentinel::Sentinel;
use crate::error::Error;
use crate::layout;
use crate::store::{Store, StoreError};
use crate::wal::Lsn;

/// One complete backup.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    /// Its name, e.g. `base_000000010000000000000002`.
    pub name: String,
    /// Its sentinel.
    pub sentinel: Sentinel,
}

/// Which backup to use.
#[derive(Debug, Clone)]
pub enum Selector {
    /// By name.
    Named(String),
    /// The newest.
    Latest,
    /// The newest that finished before this time.
    BeforeTime(time::OffsetDateTime),
    /// The newest that is consistent at or before this LSN.
    BeforeLsn(Lsn),
}

/// Every complete backup, oldest first.
pub async fn list(store: &Arc<Store>) -> Result<Vec<BackupInfo>, Error> {
    let objects = match store.list(&format!("{}/", layout::BACKUP_DIR)).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let names: Vec<String> =
        objects.iter().filter_map(|o| layout::backup_name_of_sentinel(o.key.as_str()).map(str::to_string)).collect();
    let reads = names.iter().map(|name| async move {
        let key = layout::sentinel_key(name);
        let bytes = store.get_bytes(&key).await?;
        let sentinel: Sentinel = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            key: format!("{}/{key}", store.url()),
            detail: format!("not a backup sentinel: {e}"),
        })?;
        Ok::<_, Error>(BackupInfo { name: name.clone(), sentinel })
    });
    let mut out = Vec::new();
    for r in futures_util::future::join_all(reads).await {
        out.push(r?);
    }
    sort(&mut out);
    Ok(out)
}

/// Oldest first, by finish time, then finish LSN, then name as the last tie-break.
pub fn sort(backups: &mut [BackupInfo]) {
    backups.sort_by(|a, b| {
        (a.sentinel.finish_timestamp(), a.sentinel.finish_lsn, &a.name).cmp(&(
            b.sentinel.finish_timestamp(),
            b.sentinel.finish_lsn,
            &b.name,
        ))
    });
}

/// The backup `selector` designates among `backups` (sorted oldest first).
pub fn select<'a>(backups: &'a [BackupInfo], selector: &Selector) -> Option<&'a BackupInfo> {
    match selector {
        Selector::Named(name) => backups.iter().find(|b| &b.name == name),
        Selector::Latest => backups.last(),
        Selector::BeforeTime(t) => {
            backups.iter().rev().find(|b| b.sentinel.finish_timestamp().is_some_and(|f| f <= *t))
        }
        Selector::BeforeLsn(lsn) => backups.iter().rev().find(|b| b.sentinel.finish_lsn <= lsn.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(name: &str, finish: &str, lsn: u64) -> BackupInfo {
        let mut s: Sentinel = serde_json::from_str(r#"{"LSN":1}"#).unwrap();
        s.finish_time = finish.to_string();
        s.finish_lsn = lsn;
        BackupInfo { name: name.into(), sentinel: s }
    }

    #[test]
    fn order_is_by_finish_time_not_name() {
        // After a timeline change, the newest backup's name sorts first.
        let mut b = vec![
            backup("base_000000020000000000000009", "2026-11-26T12:00:00Z", 900),
            backup("base_000000010000000000000005", "2026-11-26T10:00:00Z", 500),
            backup("base_00000001000000000000000A", "2026-11-26T11:00:00Z", 1000),
        ];
        sort(&mut b);
        let names: Vec<&str> = b.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            ["base_000000010000000000000005", "base_00000001000000000000000A", "base_000000020000000000000009"]
        );
        assert_eq!(select(&b, &Selector::Latest).unwrap().name, "base_000000020000000000000009");
        let t = time::OffsetDateTime::parse("2026-11-26T11:30:00Z", &time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(select(&b, &Selector::BeforeTime(t)).unwrap().name, "base_00000001000000000000000A");
        assert_eq!(select(&b, &Selector::BeforeLsn(Lsn(600))).unwrap().name, "base_000000010000000000000005");
        assert!(select(&b, &Selector::BeforeLsn(Lsn(10))).is_none());
    }
}
