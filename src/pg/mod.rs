//! Talking to a live PostgreSQL server (through tokio-postgres) and writing the files a
//! restored server reads: what the backup commands need from PostgreSQL itself.

pub mod backup_api;
pub mod conn;
pub mod recovery_conf;
