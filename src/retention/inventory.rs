//! Reading what the store holds, for `delete` and `wal-verify`: one listing of each folder
//! retention looks at, the complete backups, every `.history` file decoded and parsed, and
//! the WAL segment size.
//!
//! The segment size is the one wal-rs's sentinels (`WalrsWalSegmentSize`) or
//! `walrs/cluster.json` record. A store written only by WAL-G records none, and its
//! clusters may use any size from 1 MiB to 1 GiB: then it is read off the backups, whose
//! names give their start segment (`base_<TLI><LOG><SEG>`) and whose sentinels give their
//! start LSN; only one size puts that LSN in that segment. Never guessed: a wrong size
//! numbers segments wrongly, and retention would delete WAL kept backups need.

use std::sync::Arc;

use super::plan::{start_segment_name, wal_name_of, Inventory};
use super::timelines::{parse_history, Histories};
use crate::backup::catalog::{self, BackupInfo};
use crate::codec::{self, Compression};
use crate::error::Error;
use crate::layout;
use crate::store::{ObjectKey, ObjectMeta, Store, StoreError};
use crate::wal::{Lsn, SegmentId, WalFileName};

/// WAL-G's and PostgreSQL's default segment size, used only where the size makes no
/// difference (a store with no backup).
pub const DEFAULT_SEGMENT_SIZE: u32 = 16 << 20;

/// The segment sizes PostgreSQL allows (`--wal-segsize`): powers of two, 1 MiB to 1 GiB.
const SEGMENT_SIZES: [u32; 11] =
    [1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20, 128 << 20, 256 << 20, 512 << 20, 1 << 30];

/// Lists the store and reads the backups and timeline histories.
pub async fn read(store: &Arc<Store>) -> Result<Inventory, Error> {
    let mut objects = Vec::new();
    for prefix in [format!("{}/", layout::WAL_DIR), format!("{}/", layout::BACKUP_DIR), layout::GAP_PREFIX.to_string()]
    {
        match store.list(&prefix).await {
            Ok(mut o) => objects.append(&mut o),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (listed, deltas) = catalog::list_with_deltas(store).await?;
    let backups = only_listed(listed, &objects);
    let histories = read_histories(store, &objects).await?;
    let segment_size = match segment_size(store, &backups).await? {
        Some(size) => Some(size),
        None => segment_size_of_oldest_segment(store, &objects).await?,
    };
    Ok(Inventory { objects, backups, deltas, histories, segment_size })
}

/// The backups whose sentinel is among `objects`. The catalog lists the store again: a
/// backup-push that finished between the two listings has a sentinel there and not here,
/// and planning with it would delete its listed objects and leave its sentinel, a complete
/// backup with no data. Left out, its folder reads as a backup in progress, left alone.
fn only_listed(backups: Vec<BackupInfo>, objects: &[ObjectMeta]) -> Vec<BackupInfo> {
    let listed: std::collections::HashSet<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    backups.into_iter().filter(|b| listed.contains(layout::sentinel_key(&b.name).as_str())).collect()
}

/// The segment size in the page header of the oldest segment among `objects`: what a store
/// only WAL-G wrote, with no backup that settles it, still says of itself. Reads the
/// object's first bytes only. `None` when there is no segment, or its first bytes are not a
/// valid header for its name (damaged: then the size stays unknown, never guessed); a
/// failing store is an error.
async fn segment_size_of_oldest_segment(store: &Arc<Store>, objects: &[ObjectMeta]) -> Result<Option<u32>, Error> {
    let oldest = objects
        .iter()
        .filter_map(|o| wal_name_of(o.key.as_str()).filter(|n| matches!(n, WalFileName::Segment(..))).map(|n| (n, o)))
        .min_by_key(|(n, _)| (n.wal_segment(), n.timeline()));
    let Some((name, object)) = oldest else { return Ok(None) };
    let compression = match object.key.file_name().rsplit_once('.') {
        Some((_, ext)) => match Compression::from_extension(ext) {
            Some(c) => c,
            None => return Ok(None),
        },
        None => Compression::None,
    };
    let reader = store.get(&object.key).await?;
    let segment = name.wal_segment().expect("a segment");
    let key = object.key.clone();
    let size = tokio::task::spawn_blocking(move || {
        let mut header = [0u8; crate::wal::page::LONG_HEADER_SIZE];
        let mut original = codec::decode::decompressor(compression, &key, reader.body).ok()?;
        std::io::Read::read_exact(&mut original, &mut header).ok()?;
        crate::wal::SegmentHeader::parse(&header, name.timeline(), segment).ok().map(|h| h.segment_size)
    })
    .await
    .expect("the header task panicked");
    Ok(size)
}

/// The store's WAL segment size: recorded by the newest wal-rs sentinel among `backups`,
/// else by `walrs/cluster.json`, else inferred from `backups`' names and start LSNs.
/// `None` when none of them tells.
pub async fn segment_size(store: &Store, backups: &[BackupInfo]) -> Result<Option<u32>, Error> {
    if let Some(s) = backups.iter().rev().find_map(|b| b.sentinel.wal_segment_size) {
        return Ok(Some(s));
    }
    if let Some(cluster) = crate::identity::read(store).await? {
        return Ok(Some(cluster.wal_segment_size));
    }
    Ok(infer_segment_size(backups))
}

/// The one segment size under which every backup's start LSN lies in the segment its name
/// starts with. `None` when no backup tells (no name with a segment, or every one fits
/// several sizes, as segment 0 of a log does) or when they disagree (no size fits all).
pub fn infer_segment_size(backups: &[BackupInfo]) -> Option<u32> {
    let mut candidates: Vec<u32> = SEGMENT_SIZES.to_vec();
    let mut told = false;
    for b in backups {
        let Some(named) = start_segment_name(&b.name).and_then(|n| n.wal_segment()) else { continue };
        told = true;
        let start = Lsn(b.sentinel.start_lsn);
        candidates.retain(|&size| SegmentId::containing(start, size) == named);
    }
    match candidates.as_slice() {
        [only] if told => Some(*only),
        _ => None,
    }
}

/// Every `.history` object among `objects`, decoded and parsed. An unreadable one is an
/// error: deciding which timelines matter without it could delete what it protects.
pub async fn read_histories(store: &Arc<Store>, objects: &[ObjectMeta]) -> Result<Histories, Error> {
    let mut out = Histories::new();
    for o in objects {
        let Some(WalFileName::History(tli)) = wal_name_of(o.key.as_str()) else { continue };
        if out.contains_key(&tli) {
            continue; // the same file under two compressions
        }
        let text = read_small_wal_file(store, &o.key).await?;
        let entries = parse_history(&String::from_utf8_lossy(&text)).map_err(|e| Error::Corrupt {
            key: format!("{}/{}", store.url(), o.key),
            detail: format!("not a timeline history file: {e}"),
        })?;
        out.insert(tli, entries);
    }
    Ok(out)
}

/// The original bytes of a small WAL object (a history file), checked against its trailer.
async fn read_small_wal_file(store: &Arc<Store>, key: &ObjectKey) -> Result<Vec<u8>, Error> {
    let describe = format!("{}/{key}", store.url());
    let ext = key.file_name().rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    let compression = match ext {
        "history" => Compression::None,
        e => Compression::from_extension(e).ok_or_else(|| Error::Unsupported { key: describe.clone() })?,
    };
    let reader = store.get(key).await?;
    let key = key.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        codec::decode(reader.body, compression, &key, &mut out).map(|_| out)
    })
    .await
    .expect("the decode task panicked")
    .map_err(|e| Error::Corrupt { key: describe, detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::retention::{plan, Kind, PlanError, Policy, Request};
    use crate::store::memory::MemoryStore;
    use crate::store::{Metadata, PutMode, PutOptions};
    use crate::test_support::block_on;

    const MIB: u32 = 1 << 20;

    async fn put(store: &Arc<Store>, key: &str, bytes: Vec<u8>) {
        let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
        store.put_bytes(&ObjectKey::new(key).unwrap(), bytes, opts).await.unwrap();
    }

    /// A sentinel as WAL-G writes it: no segment size recorded.
    fn walg_sentinel(start_lsn: u64, finish_lsn: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "LSN": start_lsn,
            "FinishLSN": finish_lsn,
            "StartTime": "2026-11-20T10:00:00.000000Z",
            "FinishTime": "2026-11-20T10:05:00.000000Z",
            "IsPermanent": false,
            "Version": 2,
        }))
        .unwrap()
    }

    fn walg_backup(name: &str, start_lsn: u64) -> BackupInfo {
        BackupInfo { name: name.into(), sentinel: serde_json::from_slice(&walg_sentinel(start_lsn, 0)).unwrap() }
    }

    #[test]
    fn a_walg_store_with_64_mib_segments_keeps_the_wal_its_backup_needs() {
        block_on(async {
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            // Starts at 0/14000028: segment 5 with 64 MiB segments (it would be 0x14 with 16).
            let sentinel = walg_sentinel(0x1400_0028, 0x1C00_0100);
            put(&store, "basebackups_005/base_000000010000000000000005_backup_stop_sentinel.json", sentinel).await;
            for n in 5..=8 {
                put(&store, &format!("wal_005/00000001000000000000000{n}.lz4"), vec![1]).await;
            }
            let inv = read(&store).await.unwrap();
            assert_eq!(inv.segment_size, Some(64 * MIB));
            let policy = Policy { now: SystemTime::now(), garbage_min_age: Duration::from_secs(86400) };
            let p = plan(&inv, &Request::Retain(1), &policy).unwrap();
            let wal: Vec<&str> = p.delete.iter().filter(|d| d.kind == Kind::Wal).map(|d| d.key.as_str()).collect();
            assert!(wal.is_empty(), "the kept backup's WAL would go: {wal:?}");

            // Nothing tells the size (a backup in segment 0 fits every size): no plan.
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            let sentinel = walg_sentinel(0x28, 0x100);
            put(&store, "basebackups_005/base_000000010000000000000000_backup_stop_sentinel.json", sentinel).await;
            let inv = read(&store).await.unwrap();
            assert_eq!(inv.segment_size, None);
            assert_eq!(plan(&inv, &Request::Retain(1), &policy).unwrap_err(), PlanError::UnknownSegmentSize);
        });
    }

    /// A store only WAL-G wrote, with no backup: the size is read from the oldest segment's
    /// page header; a segment whose first bytes are not its header leaves it unknown.
    #[test]
    fn the_segment_size_is_read_off_the_oldest_segments_header() {
        use crate::wal::page::tests::pg15_first_page;
        block_on(async {
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            // Segment 5 with 64 MiB segments starts at 0/14000000.
            put(&store, "wal_005/000000010000000000000005", pg15_first_page(1, 0x1400_0000, 1, 64 * MIB)).await;
            put(&store, "wal_005/000000010000000000000006", vec![7; 8192]).await;
            assert_eq!(read(&store).await.unwrap().segment_size, Some(64 * MIB));

            let store = Arc::new(Store::Memory(MemoryStore::new()));
            put(&store, "wal_005/000000010000000000000005", vec![7; 8192]).await;
            assert_eq!(read(&store).await.unwrap().segment_size, None);
        });
    }

    /// A backup whose sentinel the catalog read but the store's listing did not show (it
    /// finished in between) is left out: planned on, its sentinel would outlive its data.
    #[test]
    fn a_backup_finished_between_the_listings_is_left_out() {
        let meta = |key: &str| ObjectMeta {
            key: ObjectKey::new(key).unwrap(),
            size: 1,
            modified: None,
            metadata: Default::default(),
        };
        let objects = [
            meta("basebackups_005/base_000000010000000000000005_backup_stop_sentinel.json"),
            meta("basebackups_005/base_000000010000000000000005/tar_partitions/part_1.tar.lz4"),
            meta("basebackups_005/base_000000010000000000000009/tar_partitions/part_1.tar.lz4"),
        ];
        let backups = vec![
            walg_backup("base_000000010000000000000005", 0x500_0028),
            walg_backup("base_000000010000000000000009", 0x900_0028),
        ];
        let kept: Vec<String> = only_listed(backups, &objects).into_iter().map(|b| b.name).collect();
        assert_eq!(kept, ["base_000000010000000000000005"]);
    }

    #[test]
    fn a_recorded_segment_size_wins_over_the_names() {
        block_on(async {
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            let cluster = br#"{"system_identifier":"1","pg_major":15,"wal_segment_size":33554432,"created_by":"t"}"#;
            put(&store, "walrs/cluster.json", cluster.to_vec()).await;
            let backups = [walg_backup("base_000000010000000000000005", 0x1400_0028)];
            assert_eq!(segment_size(&store, &backups).await.unwrap(), Some(32 * MIB));
        });
    }

    #[test]
    fn the_segment_size_is_read_off_names_and_start_lsns() {
        let b64 = walg_backup("base_000000010000000000000005", 0x1400_0028);
        assert_eq!(infer_segment_size(std::slice::from_ref(&b64)), Some(64 * MIB));
        let b16 = walg_backup("base_000000010000000000000014_D_000000010000000000000010", 0x1400_0028);
        assert_eq!(
            infer_segment_size(std::slice::from_ref(&b16)),
            Some(16 * MIB),
            "a delta backup's name starts the same way"
        );
        let high = walg_backup("base_000000020000000100000003", 0x1_0300_0028);
        assert_eq!(infer_segment_size(&[high]), Some(16 * MIB), "past the first 4 GiB");
        // Segment 0 fits every size; with a backup that tells, the size is settled.
        let first = walg_backup("base_000000010000000000000000", 0x28);
        assert_eq!(infer_segment_size(std::slice::from_ref(&first)), None);
        assert_eq!(infer_segment_size(&[first, b64.clone()]), Some(64 * MIB));
        // Disagreeing sentinels, or names that say nothing: no size.
        assert_eq!(infer_segment_size(&[b64, b16]), None);
        assert_eq!(infer_segment_size(&[walg_backup("base_nope", 0x1400_0028)]), None);
        assert_eq!(infer_segment_size(&[]), None);
    }
}
