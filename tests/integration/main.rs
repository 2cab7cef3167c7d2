//! Integration tests of the `wal-rs` binary against real PostgreSQL 15 clusters, a real
//! S3-protocol server (s3s-fs) and a store written by another WAL-G-compatible tool.
//!
//! One test binary, as ripgrep does it: `harness` holds the machinery (work directories,
//! clusters, the S3 server, running wal-rs), and each other module is one topic:
//! - `wal_core`: a primary archives through archive_command; a copy restored from a base
//!   backup recovers through restore_command to the same table checksums (both stores).
//! - `timeline`: a promoted copy archives timeline 2; a second recovery follows it.
//! - `bad_input`: over 60 kinds of bad input (arguments, files, configuration, stores,
//!   credentials, backups, another cluster or version), each one logfmt line, its
//!   documented exit code, and nothing lost.
//! - `failures`: direct CLI calls for every documented failure and its exit code.
//! - `backups`: backup-push, backup-list and backup-fetch of real clusters: point-in-time
//!   restores, a follower that forks, tablespaces, a killed backup-push, refusals and
//!   corruption, and a WAL-G base backup.
//! - `faults`: the fault proxy's 500, 503, reset, truncate and black-hole modes against
//!   wal-push and wal-fetch.
//! - `throughput`: pushing ready segments ahead (each archived once, forged records not
//!   trusted) and WAL prefetch (exact names, timeline switches, a vanished folder).
//! - `compat`: fetching from, and recovering a cluster from, a WAL-G-layout store.
//! - `security`: client-side encryption end to end (sealed objects, wrong and missing keys,
//!   rotation, tampering), `backup-verify` and the restore drill on good and damaged backups,
//!   a rerun of backup-fetch into an interrupted restore.
//! - `retention`: `delete retain 2` across a timeline switch removes exactly what the rules
//!   say and both kept backups restore; `wal-verify` names a deleted segment; a permanent
//!   backup survives `delete everything`; a recent unfinished backup is left alone by
//!   `delete garbage`; batched deletes on S3.
//!
//! Run with `cargo test --release --test integration` (`make integration` installs s3s-fs
//! first). Set `WALRS_IT_KEEP=1` to keep each test's work directory for inspection.

mod harness;

mod backups;
mod bad_input;
mod compat;
mod failures;
mod faults;
mod retention;
mod security;
mod throughput;
mod timeline;
mod wal_core;
