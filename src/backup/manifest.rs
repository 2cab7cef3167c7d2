//! `walrs_manifest.json`: the sha256 of every file and every partition of a backup, so a
//! restore (and `backup-verify`) can check each byte. WAL-G-written backups have none; they
//! restore without per-file checks.

use serde::{Deserialize, Serialize};

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
    /// Object name inside `tar_partitions/`, e.g. `part_001.tar.lz4`.
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
