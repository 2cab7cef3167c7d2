//! Base backups: what a backup is in the store (sentinel, metadata, manifest, tar
//! partitions), how one is written from a data directory and read back into one.
//!
//! Layout, compatible with WAL-G's (see docs/storage-layout.md):
//! `basebackups_005/<name>/walrs_writer.json` first (it reserves the name), then
//! `basebackups_005/<name>/tar_partitions/part_NNN.tar.lz4`, then `pg_control.tar.lz4`,
//! `basebackups_005/<name>/metadata.json`, `basebackups_005/<name>/walrs_manifest.json`, and
//! `basebackups_005/<name>_backup_stop_sentinel.json` written last: a backup exists only once
//! its sentinel does.

pub mod catalog;
pub mod exclude;
pub mod extract;
pub mod manifest;
pub mod partition;
pub mod sentinel;
pub mod walk;
