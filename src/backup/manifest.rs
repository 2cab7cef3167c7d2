//! `walrs_manifest.json`: the sha256 of every file and every partition of a backup, so a
//! restore (and `backup-verify`) can check each byte. WAL-G-written backups have none; they
//! restore without per-file checks.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use crate::crypto;
use crate::error::Error;
use crate::layout;
use crate::store::{Metadata, PutMode, PutOptions, Store};

/// The manifest's file name inside the backup's folder.
pub const MANIFEST_FILE: &str = "walrs_manifest.json";

/// Stores `manifest` for `backup`, sealed when encryption is configured (it lists every
/// file name of the database).
pub async fn store_manifest(store: &Arc<Store>, backup: &str, manifest: &Manifest) -> Result<(), Error> {
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    let key = layout::backup_file_key(backup, MANIFEST_FILE);
    let bytes = crypto::seal_bytes(crypto::sealing_key().as_ref(), key.as_str(), &json)
        .map_err(|e| Error::local("encrypt", std::path::Path::new(key.as_str()), e))?;
    store.put_bytes(&key, bytes, PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() }).await?;
    Ok(())
}

/// Reads and opens the manifest of `backup`.
pub async fn load_manifest(store: &Arc<Store>, backup: &str) -> Result<Manifest, Error> {
    let key = layout::backup_file_key(backup, MANIFEST_FILE);
    let describe = format!("{}/{key}", store.url());
    let stored = store.get_bytes(&key).await?;
    let bytes = crypto::open_bytes(crypto::ring().as_deref(), key.as_str(), &stored).map_err(|e| match e {
        crypto::OpenError::BadHeader(detail) => Error::Corrupt { key: describe.clone(), detail },
        other => Error::Key { key: describe.clone(), detail: other.to_string() },
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Corrupt { key: describe, detail: format!("not a wal-rs manifest: {e}") })
}

/// The manifest of one backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// The backup's name.
    pub backup: String,
    /// Compression of the partitions.
    pub compression: String,
    /// Every partition, data partitions first, `pg_control` last.
    pub partitions: Vec<PartitionEntry>,
}

/// One tar partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartitionEntry {
    /// Object name inside `tar_partitions/`, e.g. `part_001.tar.lz4`: a plain file name,
    /// checked as the manifest is read (it becomes part of a store key).
    #[serde(deserialize_with = "partition_name")]
    pub name: String,
    /// Bytes stored.
    pub stored_size: u64,
    /// sha256 of the stored object's bytes.
    pub stored_sha256: String,
    /// Bytes of the tar stream before compression.
    pub tar_size: u64,
    /// The files in it.
    pub files: Vec<FileEntry>,
}

/// One regular file in a partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Path inside the data directory (`pg_tblspc/<oid>/...` for tablespaces).
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// sha256 of the bytes as backed up.
    pub sha256: String,
}

/// A partition name must name a file in the backup's `tar_partitions/` folder: not empty,
/// not `.` or `..`, no `/` and no NUL. A damaged manifest is then refused when read, instead
/// of naming an object elsewhere in the store (or no valid key at all).
fn partition_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(serde::de::Error::custom(format!("{name:?} is not a partition file name")));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_must_be_file_names() {
        let with = |name: &str| {
            serde_json::json!({"version": 1, "backup": "b", "compression": "lz4", "partitions": [
                {"name": name, "stored_size": 1, "stored_sha256": "", "tar_size": 1, "files": []}]})
        };
        assert!(serde_json::from_value::<Manifest>(with("part_001.tar.lz4")).is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "a\0b"] {
            assert!(serde_json::from_value::<Manifest>(with(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
