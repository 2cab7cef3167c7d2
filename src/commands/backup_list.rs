//! `wal-rs backup-list [--json] [--detail]`: the complete backups, oldest first (by finish
//! time and LSN), including those written by WAL-G-compatible tools.

use serde_json::json;

use super::common::{open_gaps, open_store};
use crate::backup::catalog::{self, BackupInfo};
use crate::config::Config;
use crate::error::Error;
use crate::wal::{Lsn, WalFileName};

pub(super) async fn run(config: &Config, as_json: bool, detail: bool) -> Result<usize, Error> {
    let store = open_store(config).await?;
    // A damaged sentinel is listed as a warning, not a failure of the whole list.
    let (backups, _, _) = catalog::list_readable(&store).await?;
    // WAL dropped by the archive queue valve: say so wherever backups are listed.
    for name in open_gaps(&store, config.compression).await? {
        crate::log::emit(
            crate::log::Level::Warn,
            &[
                ("op", &"backup-list"),
                ("wal_gap", &name),
                ("error", &"this WAL file was dropped unarchived (archive_queue_max_bytes): recovery past it is impossible from backups older than it"),
            ],
        );
    }
    if as_json {
        let rows: Vec<_> = backups.iter().map(|b| row(b, detail)).collect();
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(backups.len());
    }
    println!(
        "{:<40} {:<25} {:<25} {:>12} {:>12} {:>4} {:>12} {:>12} {:>8} {:>20}",
        "name",
        "start_time",
        "finish_time",
        "start_lsn",
        "finish_lsn",
        "tli",
        "size",
        "stored",
        "pg",
        "system_identifier"
    );
    for b in &backups {
        let s = &b.sentinel;
        println!(
            "{:<40} {:<25} {:<25} {:>12} {:>12} {:>4} {:>12} {:>12} {:>8} {:>20}",
            b.name,
            short_time(&s.start_time),
            short_time(&s.finish_time),
            Lsn(s.start_lsn).to_string(),
            Lsn(s.finish_lsn).to_string(),
            timeline(b).map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
            s.uncompressed_size,
            s.compressed_size,
            s.pg_version,
            s.system_identifier.map(|v| v.to_string()).unwrap_or_default(),
        );
        if detail {
            println!(
                "    host={} data_dir={} permanent={} tablespaces={}",
                s.hostname,
                s.data_dir,
                s.is_permanent,
                s.tablespaces().iter().map(|t| format!("{}:{}", t.oid, t.location)).collect::<Vec<_>>().join(",")
            );
        }
    }
    Ok(backups.len())
}

/// The WAL files named by gap records. A listing that fails is an error, not "no gaps":
/// the listing would then hide that recovery past a dropped file is impossible.
fn short_time(t: &str) -> String {
    t.chars().take(19).collect::<String>().replace('T', " ")
}

/// The backup's timeline: recorded by wal-rs, else read from the name (`base_<WAL file>`).
fn timeline(b: &BackupInfo) -> Option<u32> {
    b.sentinel.timeline.or_else(|| {
        let file = b.name.strip_prefix("base_")?.get(..24)?;
        WalFileName::parse(file).ok().map(|n| n.timeline().0)
    })
}

fn row(b: &BackupInfo, detail: bool) -> serde_json::Value {
    let s = &b.sentinel;
    let mut v = json!({
        "name": b.name,
        "start_time": s.start_time,
        "finish_time": s.finish_time,
        "start_lsn": Lsn(s.start_lsn).to_string(),
        "finish_lsn": Lsn(s.finish_lsn).to_string(),
        "timeline": timeline(b),
        "uncompressed_size": s.uncompressed_size,
        "stored_size": s.compressed_size,
        "pg_version": s.pg_version,
        "system_identifier": s.system_identifier.map(|v| v.to_string()),
        "is_permanent": s.is_permanent,
    });
    if detail {
        v["hostname"] = json!(s.hostname);
        v["data_dir"] = json!(s.data_dir);
        v["tablespaces"] =
            json!(s.tablespaces().iter().map(|t| json!({"oid": t.oid, "location": t.location})).collect::<Vec<_>>());
        v["verified_by_manifest"] = json!(s.manifest.is_some());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Compression;
    use crate::commands::common::gap_records;
    use crate::store::local::LocalStore;
    use crate::store::Store;

    #[test]
    fn a_failed_listing_of_gap_records_is_an_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("walrs/gaps")).unwrap();
        std::fs::write(dir.path().join("walrs/gaps/000000010000000000000003.json"), b"{}").unwrap();
        let store = Store::Local(LocalStore::new(dir.path().to_path_buf()));
        assert_eq!(rt.block_on(gap_records(&store)).unwrap(), ["000000010000000000000003"]);
        // `walrs/gaps` cannot be read as a folder (here: a file stands in its place).
        std::fs::remove_dir_all(dir.path().join("walrs/gaps")).unwrap();
        std::fs::write(dir.path().join("walrs/gaps"), b"").unwrap();
        let err = rt.block_on(gap_records(&store)).unwrap_err();
        assert!(matches!(err, Error::Store(_)), "{err}");
        // No gap ever recorded: no folder, no gaps.
        std::fs::remove_file(dir.path().join("walrs/gaps")).unwrap();
        assert!(rt.block_on(gap_records(&store)).unwrap().is_empty());
    }

    #[test]
    fn a_gap_record_of_a_segment_stored_after_all_is_not_listed() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("walrs/gaps")).unwrap();
        std::fs::create_dir_all(dir.path().join("wal_005")).unwrap();
        for n in ["000000010000000000000003", "000000010000000000000004"] {
            std::fs::write(dir.path().join(format!("walrs/gaps/{n}.json")), b"{}").unwrap();
        }
        // Segment 3 reached the store after the valve dropped it (in another compression).
        std::fs::write(dir.path().join("wal_005/000000010000000000000003.zst"), b"x").unwrap();
        let store = Store::Local(LocalStore::new(dir.path().to_path_buf()));
        let open = rt.block_on(crate::commands::common::open_gaps(&store, Compression::Lz4)).unwrap();
        assert_eq!(open, ["000000010000000000000004"]);
    }

    /// Thousands of gap records (a long outage behind the valve) cost one listing per log of
    /// WAL on S3, not a request per record: backup-list runs in the control plane's loop.
    #[test]
    fn gap_records_are_checked_from_one_listing_per_log() {
        use crate::store::memory::MemoryStore;
        use crate::store::{Metadata, ObjectKey, PutMode, PutOptions};
        let put = || PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let memory = MemoryStore::new();
        let store = std::sync::Arc::new(Store::Memory(memory.clone()));
        rt.block_on(async {
            for seg in 0..300u32 {
                let name = format!("0000000100000{:03X}000000{:02X}", seg / 256, seg % 256);
                let record = ObjectKey::new(&format!("{}{name}.json", crate::layout::GAP_PREFIX)).unwrap();
                store.put_bytes(&record, b"{}".to_vec(), put()).await.unwrap();
                if seg % 2 == 0 {
                    let wal = ObjectKey::new(&format!("wal_005/{name}.lz4")).unwrap();
                    store.put_bytes(&wal, b"x".to_vec(), put()).await.unwrap();
                }
            }
        });
        let before = memory.listings();
        let open = rt.block_on(crate::commands::common::open_gaps(&store, Compression::Lz4)).unwrap();
        assert_eq!(open.len(), 150);
        assert!(open.iter().all(|n| u32::from_str_radix(&n[22..], 16).unwrap() % 2 == 1), "{open:?}");
        // The gap records, then logs 0 and 1.
        assert_eq!(memory.listings() - before, 3);
    }
}
