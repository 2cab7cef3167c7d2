//! The backups in a store: found by their sentinels, ordered by finish time and LSN (never
//! by name: after a timeline change or an upgrade, name order is not age order).

use std::collections::HashMap;
use std::sync::Arc;

use super::sentinel::{DeltaOrigin, Sentinel};
use crate::error::Error;
use crate::layout;
use crate::log::{self, Level};
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

/// The WAL-G delta backups among the listed ones, by name.
pub type Deltas = HashMap<String, DeltaOrigin>;

/// Every complete backup, oldest first.
pub async fn list(store: &Arc<Store>) -> Result<Vec<BackupInfo>, Error> {
    Ok(list_with_deltas(store).await?.0)
}

/// Every complete backup, oldest first, and which of them are WAL-G delta backups (which
/// only WAL-G restores). A sentinel that does not parse fails the listing: retention and
/// verification must not decide with a backup missing from view (its folder would look like
/// an abandoned backup-push).
pub async fn list_with_deltas(store: &Arc<Store>) -> Result<(Vec<BackupInfo>, Deltas), Error> {
    let (backups, deltas, mut unreadable) = read_all(store).await?;
    match unreadable.pop() {
        Some((_, e)) => Err(e),
        None => Ok((backups, deltas)),
    }
}

/// What restoring needs from the catalog: [`list_with_deltas`], except that a sentinel that
/// does not parse (damaged, or another tool's format) is left out with a warning instead of
/// failing the listing, so that one bad sentinel does not stop the restore of every other
/// backup. Returns the names left out, each with why.
pub async fn list_readable(store: &Arc<Store>) -> Result<(Vec<BackupInfo>, Deltas, Vec<(String, Error)>), Error> {
    let (backups, deltas, unreadable) = read_all(store).await?;
    for (name, e) in &unreadable {
        log::emit(
            Level::Warn,
            &[
                ("op", &"backup-catalog"),
                ("backup", name),
                ("outcome", &"skipped: its sentinel is unreadable"),
                ("error", e),
            ],
        );
    }
    Ok((backups, deltas, unreadable))
}

/// Every sentinel read: the backups, the deltas among them, and the sentinels that did not
/// parse. A failing store fails it.
async fn read_all(store: &Arc<Store>) -> Result<(Vec<BackupInfo>, Deltas, Vec<(String, Error)>), Error> {
    let objects = match store.list(&format!("{}/", layout::BACKUP_DIR)).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let names = sentinel_names(objects.iter().map(|o| o.key.as_str()));
    let reads = names.iter().map(|name| async move {
        let key = layout::sentinel_key(name);
        let bytes = store.get_bytes(&key).await?;
        let parsed = serde_json::from_slice::<Sentinel>(&bytes).map_err(|e| Error::Corrupt {
            key: format!("{}/{key}", store.url()),
            detail: format!("not a backup sentinel: {e}"),
        });
        Ok::<_, Error>((name, parsed.map(|sentinel| (sentinel, DeltaOrigin::of_sentinel(&bytes)))))
    });
    let mut out = Vec::new();
    let mut deltas = Deltas::new();
    let mut unreadable = Vec::new();
    for r in futures_util::future::join_all(reads).await {
        match r? {
            (name, Ok((sentinel, delta))) => {
                if let Some(delta) = delta {
                    deltas.insert(name.clone(), delta);
                }
                out.push(BackupInfo { name: name.clone(), sentinel });
            }
            (name, Err(e)) => unreadable.push((name.clone(), e)),
        }
    }
    sort(&mut out);
    Ok((out, deltas, unreadable))
}

/// The backup names of the sentinels among `keys`. A name that cannot be a folder of its
/// own (`.`, `..`; empty or with a '/' the key parser already refuses) is left out with a
/// warning: the keys of its files would not be valid object keys.
fn sentinel_names<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names = Vec::new();
    for key in keys {
        let Some(name) = layout::backup_name_of_sentinel(key) else {
            continue;
        };
        if is_usable_name(name) {
            names.push(name.to_string());
        } else {
            log::emit(
                Level::Warn,
                &[
                    ("op", &"backup-catalog"),
                    ("key", &key),
                    (
                        "outcome",
                        &"skipped: this sentinel names no usable backup folder; delete the object if it is stray",
                    ),
                ],
            );
        }
    }
    names
}

fn is_usable_name(name: &str) -> bool {
    !matches!(name, "" | "." | "..") && !name.contains('/')
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
    select_among(backups, selector, |_| true)
}

/// The backup `selector` designates among those that can be restored: by name, whichever
/// it is (the caller refuses a delta backup, naming it); otherwise the newest matching
/// backup that is not a WAL-G delta backup.
pub fn select_restorable<'a>(
    backups: &'a [BackupInfo],
    deltas: &Deltas,
    selector: &Selector,
) -> Option<&'a BackupInfo> {
    select_among(backups, selector, |b| !deltas.contains_key(&b.name))
}

fn select_among<'a>(
    backups: &'a [BackupInfo],
    selector: &Selector,
    eligible: impl Fn(&BackupInfo) -> bool,
) -> Option<&'a BackupInfo> {
    let mut newest_first = backups.iter().rev();
    match selector {
        Selector::Named(name) => backups.iter().find(|b| &b.name == name),
        Selector::Latest => newest_first.find(|b| eligible(b)),
        Selector::BeforeTime(t) => {
            newest_first.find(|b| eligible(b) && b.sentinel.finish_timestamp().is_some_and(|f| f <= *t))
        }
        Selector::BeforeLsn(lsn) => newest_first.find(|b| eligible(b) && b.sentinel.finish_lsn <= lsn.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::block_on;

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

    #[test]
    fn latest_and_targets_pass_over_walg_delta_backups() {
        let b = vec![
            backup("base_000000010000000000000005", "2026-11-26T10:00:00Z", 500),
            backup("base_000000010000000000000007", "2026-11-26T11:00:00Z", 700),
        ];
        let deltas = Deltas::from([(
            "base_000000010000000000000007".to_string(),
            DeltaOrigin { from: Some("base_000000010000000000000005".into()), ..Default::default() },
        )]);
        let full = "base_000000010000000000000005";
        assert_eq!(select_restorable(&b, &deltas, &Selector::Latest).unwrap().name, full);
        assert_eq!(select_restorable(&b, &deltas, &Selector::BeforeLsn(Lsn(800))).unwrap().name, full);
        let t = time::OffsetDateTime::parse("2026-11-26T12:00:00Z", &time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(select_restorable(&b, &deltas, &Selector::BeforeTime(t)).unwrap().name, full);
        // Named, it is found (and refused by backup-fetch with the reason).
        let named = Selector::Named("base_000000010000000000000007".into());
        assert_eq!(select_restorable(&b, &deltas, &named).unwrap().name, "base_000000010000000000000007");
        // Listing itself still shows every backup (retention must see the deltas).
        assert_eq!(select(&b, &Selector::Latest).unwrap().name, "base_000000010000000000000007");
    }

    #[test]
    fn a_delta_sentinel_in_the_store_is_listed_as_one() {
        let store = Arc::new(Store::Memory(crate::store::memory::MemoryStore::new()));
        block_on(async {
            put(&store, "basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json", br#"{"LSN":1}"#)
                .await;
            put(
                &store,
                "basebackups_005/base_000000010000000000000004_backup_stop_sentinel.json",
                br#"{"LSN":3,"DeltaFrom":"base_000000010000000000000002","DeltaFromLSN":1,"DeltaFullName":"base_000000010000000000000002","DeltaCount":1}"#,
            )
            .await;
            let (backups, deltas) = list_with_deltas(&store).await.unwrap();
            assert_eq!(backups.len(), 2);
            assert_eq!(deltas.keys().collect::<Vec<_>>(), ["base_000000010000000000000004"]);
        });
    }

    /// One damaged sentinel (here `{}`, no start LSN) fails the strict listing retention
    /// uses, but restores list the other backups and name the damaged one.
    #[test]
    fn one_damaged_sentinel_does_not_hide_the_other_backups_from_a_restore() {
        let store = Arc::new(Store::Memory(crate::store::memory::MemoryStore::new()));
        block_on(async {
            put(&store, "basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json", br#"{"LSN":1}"#)
                .await;
            put(&store, "basebackups_005/base_000000010000000000000004_backup_stop_sentinel.json", b"{}").await;
            assert!(matches!(list_with_deltas(&store).await, Err(Error::Corrupt { .. })));
            let (backups, _, unreadable) = list_readable(&store).await.unwrap();
            assert_eq!(backups.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["base_000000010000000000000002"]);
            assert_eq!(
                unreadable.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                ["base_000000010000000000000004"]
            );
        });
    }

    /// A sentinel named `.._backup_stop_sentinel.json` would make a backup `..`, whose
    /// partition keys are invalid (and building them panicked).
    #[test]
    fn sentinels_naming_dot_folders_are_skipped() {
        let store = Arc::new(Store::Memory(crate::store::memory::MemoryStore::new()));
        block_on(async {
            for name in ["..", ".", "base_000000010000000000000002"] {
                put(&store, &format!("basebackups_005/{name}_backup_stop_sentinel.json"), br#"{"LSN":1}"#).await;
            }
            let names: Vec<String> = list(&store).await.unwrap().into_iter().map(|b| b.name).collect();
            assert_eq!(names, ["base_000000010000000000000002"]);
        });
        assert!(!is_usable_name("") && !is_usable_name("a/b") && is_usable_name("..."));
    }

    async fn put(store: &Arc<Store>, key: &str, bytes: &[u8]) {
        use crate::store::{Metadata, ObjectKey, PutMode, PutOptions};
        let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
        store.put_bytes(&ObjectKey::new(key).unwrap(), bytes.to_vec(), opts).await.unwrap();
    }
}
