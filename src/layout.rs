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
pub fn wal_candidates(
    name: &WalFileName,
    preferred: Compression,
) -> Vec<(ObjectKey, Option<Compression>)> {
    let mut out = vec![(wal_key(name, preferred), Some(preferred))];
    for c in Compression::ALL {
        if c != preferred {
            out.push((wal_key(name, c), Some(c)));
        }
    }
    for ext in FOREIGN_EXTENSIONS {
        out.push((
            ObjectKey::new(&format!("{WAL_DIR}/{name}.{ext}")).unwrap(),
            None,
        ));
    }
    out
}

/// The record of which cluster archives into this prefix.
pub fn cluster_identity_key() -> ObjectKey {
    ObjectKey::new("walrs/cluster.json").unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_keys_follow_the_walg_layout() {
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        assert_eq!(
            wal_key(&name, Compression::Lz4).as_str(),
            "wal_005/000000010000000000000003.lz4"
        );
        assert_eq!(
            wal_key(&name, Compression::Zstd).as_str(),
            "wal_005/000000010000000000000003.zst"
        );
        assert_eq!(
            wal_key(&name, Compression::None).as_str(),
            "wal_005/000000010000000000000003"
        );
        let h = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(
            wal_key(&h, Compression::Lz4).as_str(),
            "wal_005/00000002.history.lz4"
        );
        let c = wal_candidates(&name, Compression::Zstd);
        assert_eq!(c[0].1, Some(Compression::Zstd));
        assert_eq!(c.len(), 3 + FOREIGN_EXTENSIONS.len());
        assert!(c
            .iter()
            .any(|(k, comp)| k.as_str().ends_with(".br") && comp.is_none()));
    }
}
