//! Where things go in the store: the one place that builds keys.
//!
//! The layout is WAL-E's, as WAL-G and its successors keep it, so the tools can share a
//! bucket (see docs/storage-layout.md):
//! - `wal_005/<WAL file name>[.lz4|.zst]`: WAL segments, timeline history files, backup
//!   history files and `.partial` segments, each one object.
//! - `walrs/cluster.json`: the system identifier of the cluster archiving into this prefix,
//!   recorded by the first wal-push (wal-rs's own addition; other tools ignore it).

use crate::codec::Compression;
use crate::store::ObjectKey;
use crate::wal::WalFileName;

/// The folder of WAL objects.
pub const WAL_DIR: &str = "wal_005";

/// Extensions other tools write that wal-rs cannot decompress. An object with one of them
/// still counts as "the file exists": it must never read as absent to a recovery.
const FOREIGN_EXTENSIONS: &[&str] = &["br", "lzma", "lzo", "gz"];

/// The key of `name` stored with `compression`.
pub fn wal_key(name: &WalFileName, compression: Compression) -> ObjectKey {
    let key = match compression.extension() {
        Some(ext) => format!("{WAL_DIR}/{name}.{ext}"),
        None => format!("{WAL_DIR}/{name}"),
    };
    ObjectKey::new(&key).expect("WAL file names make valid keys")
}

/// Every key `name` may be stored under, `preferred` first, then the other compressions
/// wal-rs reads, then those it cannot read (`None`).
pub fn wal_candidates(name: &WalFileName, preferred: Compression) -> Vec<(ObjectKey, Option<Compression>)> {
    let mut out = vec![(wal_key(name, preferred), Some(preferred))];
    for c in Compression::ALL {
        if c != preferred {
            out.push((wal_key(name, c), Some(c)));
        }
    }
    for ext in FOREIGN_EXTENSIONS {
        out.push((ObjectKey::new(&format!("{WAL_DIR}/{name}.{ext}")).unwrap(), None));
    }
    out
}

/// The folder of base backups.
pub const BACKUP_DIR: &str = "basebackups_005";
const SENTINEL_SUFFIX: &str = "_backup_stop_sentinel.json";

/// `basebackups_005/<name>_backup_stop_sentinel.json`: written last.
pub fn sentinel_key(name: &str) -> ObjectKey {
    ObjectKey::new(&format!("{BACKUP_DIR}/{name}{SENTINEL_SUFFIX}")).expect("backup names make valid keys")
}

/// The backup name a sentinel key belongs to, if `key` is one.
pub fn backup_name_of_sentinel(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(BACKUP_DIR)?.strip_prefix('/')?;
    let name = rest.strip_suffix(SENTINEL_SUFFIX)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// `basebackups_005/<name>/<file>`: metadata.json, walrs_manifest.json.
pub fn backup_file_key(name: &str, file: &str) -> ObjectKey {
    ObjectKey::new(&format!("{BACKUP_DIR}/{name}/{file}")).expect("backup names make valid keys")
}

/// `basebackups_005/<name>/tar_partitions/<partition>`.
pub fn partition_key(name: &str, partition: &str) -> ObjectKey {
    ObjectKey::new(&format!("{BACKUP_DIR}/{name}/tar_partitions/{partition}")).expect("backup names make valid keys")
}

/// The file name of data partition `n` (from 1), as WAL-G numbers them.
pub fn partition_name(n: usize, compression: Compression) -> String {
    match compression.extension() {
        Some(ext) => format!("part_{n:03}.tar.{ext}"),
        None => format!("part_{n:03}.tar"),
    }
}

/// The file name of the partition holding `global/pg_control`, restored last.
pub fn pg_control_partition_name(compression: Compression) -> String {
    match compression.extension() {
        Some(ext) => format!("pg_control.tar.{ext}"),
        None => "pg_control.tar".to_string(),
    }
}

/// The compression a partition's name says it uses.
pub fn partition_compression(name: &str) -> Option<Compression> {
    if name.ends_with(".tar") {
        return Some(Compression::None);
    }
    let ext = name.rsplit('.').next()?;
    Compression::from_extension(ext)
}

/// `walrs/gaps/<name>.json`: a WAL file acknowledged without being archived (the
/// archive_queue_max_bytes valve). Recovery past it is impossible.
pub fn gap_key(name: &str) -> ObjectKey {
    ObjectKey::new(&format!("walrs/gaps/{name}.json")).expect("WAL names make valid keys")
}

/// The folder of gap records.
pub const GAP_PREFIX: &str = "walrs/gaps/";

/// The record of which cluster archives into this prefix.
pub fn cluster_identity_key() -> ObjectKey {
    ObjectKey::new("walrs/cluster.json").unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_keys_follow_the_walg_layout() {
        let name = "base_000000010000000000000002";
        assert_eq!(
            sentinel_key(name).as_str(),
            "basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json"
        );
        assert_eq!(backup_name_of_sentinel(sentinel_key(name).as_str()), Some(name));
        assert_eq!(backup_name_of_sentinel("basebackups_005/base_1/metadata.json"), None);
        assert_eq!(
            partition_key(name, &partition_name(7, Compression::Lz4)).as_str(),
            "basebackups_005/base_000000010000000000000002/tar_partitions/part_007.tar.lz4"
        );
        assert_eq!(partition_compression("pg_control.tar.lz4"), Some(Compression::Lz4));
        assert_eq!(partition_compression("part_001.tar"), Some(Compression::None));
        assert_eq!(partition_compression("part_001.tar.br"), None);
    }

    #[test]
    fn wal_keys_follow_the_walg_layout() {
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        assert_eq!(wal_key(&name, Compression::Lz4).as_str(), "wal_005/000000010000000000000003.lz4");
        assert_eq!(wal_key(&name, Compression::Zstd).as_str(), "wal_005/000000010000000000000003.zst");
        assert_eq!(wal_key(&name, Compression::None).as_str(), "wal_005/000000010000000000000003");
        let h = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(wal_key(&h, Compression::Lz4).as_str(), "wal_005/00000002.history.lz4");
        let c = wal_candidates(&name, Compression::Zstd);
        assert_eq!(c[0].1, Some(Compression::Zstd));
        assert_eq!(c.len(), 3 + FOREIGN_EXTENSIONS.len());
        assert!(c.iter().any(|(k, comp)| k.as_str().ends_with(".br") && comp.is_none()));
    }
}
