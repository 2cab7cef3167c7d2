//! wal-rs: continuous archiving for PostgreSQL.
//!
//! The modules, from PostgreSQL's formats outwards:
//! - [`wal`]: WAL file names, LSNs and page headers (no I/O).
//! - [`codec`]: compression, sha256 and the integrity trailer.
//! - [`crypto`]: client-side encryption of stored objects (sealing after compression).
//! - [`store`]: the storage interface and its backends (local directory, S3).
//! - [`layout`]: the WAL-G-compatible key layout.
//! - [`identity`]: which cluster owns a store prefix.
//! - [`config`], [`cli`]: settings and the command line.
//! - [`retention`]: which objects `delete` removes; timeline histories for `wal-verify`.
//! - [`commands`]: one module per command; [`commands::run`] maps outcomes to exit codes.
//! - [`error`], [`exit`], [`log`]: one error type, one exit-code table, logfmt lines.

#![warn(missing_docs, unreachable_pub)]

pub mod backup;
pub mod cli;
pub mod codec;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod deadline;
pub mod error;
pub mod exit;
pub mod identity;
pub mod layout;
pub mod log;
pub mod pg;
pub mod progress;
pub mod ratelimit;
pub mod retention;
pub mod store;
pub mod wal;

#[cfg(test)]
mod test_support;
