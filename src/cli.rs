//! The command line, as typed: clap parses it, nothing more. Resolution into a
//! [`crate::config::Config`] happens in `config.rs`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Overrides;

/// Continuous archiving for PostgreSQL: WAL segments and base backups to S3 or a local
/// directory, compressed and checksummed.
///
/// In postgresql.conf:
///   archive_command = 'wal-rs wal-push %p'
///   restore_command = 'wal-rs wal-fetch %f %p'
///
/// Settings come from flags, then environment (WALRS_STORE, WALRS_COMPRESSION, ...), then
/// the TOML file given by --config or WALRS_CONFIG. `wal-rs config` lists them all.
#[derive(Debug, Parser)]
#[command(name = "wal-rs", version, verbatim_doc_comment)]
pub struct Cli {
    /// TOML configuration file (overrides WALRS_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store URL: file:///absolute/dir or s3://bucket/prefix (overrides WALRS_STORE).
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// Compression of new objects: lz4, zstd or none (overrides WALRS_COMPRESSION).
    #[arg(long, global = true, value_name = "NAME")]
    pub compression: Option<String>,
    /// Log level: error, warn, info or debug (overrides WALRS_LOG_LEVEL).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Any setting, as KEY=VALUE (see `wal-rs config`); repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive one WAL file: archive_command = 'wal-rs wal-push %p'.
    ///
    /// Exits 0 only once the file is durable in the store. Pushing the same content again
    /// succeeds without rewriting; different content under the same name is refused.
    WalPush {
        /// The file, as PostgreSQL passes it (%p, relative to the data directory).
        path: PathBuf,
    },
    /// Restore one WAL file: restore_command = 'wal-rs wal-fetch %f %p'.
    ///
    /// Exit 1 means the file is not in the archive. Other failures exit 1 in a standby
    /// (standby.signal in the current directory) and above 125 otherwise, so a recovery
    /// aborts instead of stopping early.
    WalFetch {
        /// The WAL file name PostgreSQL asks for (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// Show the effective configuration and where each value came from (secrets redacted).
    Config {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// The flag values, keyed by setting name.
    pub fn overrides(&self) -> Result<Overrides, String> {
        let mut o = Overrides {
            config_file: self.config.clone(),
            ..Default::default()
        };
        for pair in &self.set {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("--set {pair:?} is not KEY=VALUE"))?;
            o.values.insert(k.trim().to_string(), v.to_string());
        }
        for (key, value) in [
            ("store", &self.store),
            ("compression", &self.compression),
            ("log_level", &self.log_level),
        ] {
            if let Some(v) = value {
                o.values.insert(key.to_string(), v.clone());
            }
        }
        Ok(o)
    }
}
