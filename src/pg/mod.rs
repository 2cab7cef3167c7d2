//! Talking to a live PostgreSQL server (through tokio-postgres) and writing the files a
//! restored server reads: what the backup commands need from PostgreSQL itself; and what a
//! server's data directory says about how restore_command must answer.

pub mod backup_api;
pub mod conn;
pub mod recovery_conf;
pub mod standby;
