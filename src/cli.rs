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
    /// Take a base backup of a running server: backup-push PGDATA.
    ///
    /// Connects with libpq's environment (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD) or
    /// --pg-url. The backup is complete (and listed) only once every WAL segment it needs is
    /// in the store.
    BackupPush {
        /// The server's data directory.
        pgdata: PathBuf,
        /// Ask for an immediate checkpoint instead of a spread one.
        #[arg(long)]
        fast: bool,
        /// Connection string, instead of the PG* environment.
        #[arg(long, value_name = "URL")]
        pg_url: Option<String>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Restore a base backup into DEST and set up its recovery.
    ///
    /// NAME is a backup name or LATEST; with --target-time or --target-lsn and no name, the
    /// newest backup that finished before the target is chosen.
    BackupFetch {
        /// Where to restore: absent or empty.
        dest: PathBuf,
        /// Backup name or LATEST.
        name: Option<String>,
        /// recovery_target_time, e.g. '2026-11-26 10:00:00+00'.
        #[arg(long, value_name = "TIME")]
        target_time: Option<String>,
        /// recovery_target_lsn, e.g. 0/16B3748.
        #[arg(long, value_name = "LSN")]
        target_lsn: Option<String>,
        /// recovery_target_xid.
        #[arg(long, value_name = "XID")]
        target_xid: Option<String>,
        /// recovery_target_name (a restore point).
        #[arg(long, value_name = "NAME")]
        target_name: Option<String>,
        /// recovery_target = 'immediate': stop as soon as consistent.
        #[arg(long)]
        target_immediate: bool,
        /// recovery_target_action.
        #[arg(long, value_name = "ACTION", value_parser = ["promote", "pause", "shutdown"])]
        target_action: Option<String>,
        /// recovery_target_timeline (a number, 'current' or 'latest').
        #[arg(long, value_name = "TLI")]
        target_timeline: Option<String>,
        /// Restore as a standby (standby.signal): keeps replaying the archive.
        #[arg(long)]
        standby: bool,
        /// Restore tablespace OID into PATH instead of its original location; repeatable.
        #[arg(long = "tablespace-map", value_name = "OID=PATH")]
        tablespace_map: Vec<String>,
        /// restore_command to write instead of wal-rs wal-fetch with this run's settings.
        #[arg(long, value_name = "COMMAND")]
        restore_command: Option<String>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the complete backups, oldest first.
    BackupList {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Add host, data directory, tablespaces.
        #[arg(long)]
        detail: bool,
    },
    /// Retention: delete old backups and the WAL nothing kept needs. A dry run unless --confirm.
    ///
    /// `retain N` keeps the N newest backups; `before NAME` deletes the backups older than
    /// NAME; `before TIME` (RFC 3339) keeps the newest backup finished by TIME and later ones;
    /// `everything` deletes every backup but permanent ones (`everything FORCE`: those too);
    /// `garbage` deletes unfinished backups and WAL older than the oldest backup. Backups are
    /// ordered by finish time, never by name; permanent backups (backup-mark) and their WAL stay.
    Delete {
        /// retain N | before NAME|TIME | everything [FORCE] | garbage
        #[arg(required = true, num_args = 1..=2, value_name = "WHAT")]
        what: Vec<String>,
        /// Delete: without it, only list what would go.
        #[arg(long)]
        confirm: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a backup permanent (never deleted by retention, nor its WAL), or --unmark it.
    BackupMark {
        /// The backup's name (see backup-list).
        name: String,
        /// Make it ordinary again.
        #[arg(long)]
        unmark: bool,
    },
    /// Check that the archive holds every WAL segment recovery needs, across timelines.
    ///
    /// Walks from the oldest backup's start to the newest segment along the timelines leading
    /// to the newest one and reports missing ranges; exit 12 when recovery from some backup to
    /// the newest WAL is impossible. With --pg-url or PG* environment, also checks that the
    /// store holds no newer timeline than the cluster's (exit 5).
    WalVerify {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Connection string of the cluster, instead of the PG* environment.
        #[arg(long, value_name = "URL")]
        pg_url: Option<String>,
    },
    /// Re-read every object of a backup and check every checksum; or rehearse a restore.
    ///
    /// Checks each partition's stored sha256 and size, each file's sha256 inside it, and
    /// that the WAL the backup needs is stored; writes nothing. Exit 10 when anything is
    /// wrong, every problem listed. With --restore-drill: restores into a temporary folder,
    /// starts PostgreSQL there (archiving off, Unix socket only), replays to consistency,
    /// runs pg_amcheck when installed and a sanity query on every database, then removes
    /// everything and reports pass or fail with timings.
    BackupVerify {
        /// Backup name or LATEST.
        name: String,
        /// Restore, start and check the backup instead of reading its objects.
        #[arg(long)]
        restore_drill: bool,
        /// Folder to hold the drill's temporary copy (default: the system's temp folder).
        #[arg(long, value_name = "DIR", requires = "restore_drill")]
        drill_dir: Option<PathBuf>,
        /// PostgreSQL binaries for the drill (default: found from the backup's version).
        #[arg(long, value_name = "DIR", requires = "restore_drill")]
        pg_bindir: Option<PathBuf>,
        /// Seconds the drill's server may take to reach consistency.
        #[arg(long, value_name = "SECS", default_value_t = 600, requires = "restore_drill")]
        drill_timeout_secs: u64,
        /// Keep the drill's folder for inspection.
        #[arg(long, requires = "restore_drill")]
        keep: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Archive daemon of a primary: uploads WAL as soon as it is ready (wal-push starts it)
    ///
    /// Uploads each file as soon as PostgreSQL marks it ready in PG_WAL/archive_status, and
    /// answers wal-push over a socket in PG_WAL/walrs_archive_status. wal-push starts it
    /// when it runs in a running server's data directory (archive_daemon = true); it exits
    /// when that server stops or after a minute with nothing to do.
    Daemon {
        /// The pg_wal folder, as wal-push sees it (relative to the data directory).
        pg_wal: PathBuf,
    },
    /// Background prefetcher started by wal-fetch (internal).
    #[command(hide = true)]
    WalPrefetch {
        /// The segment just fetched.
        after: String,
        /// The prefetch folder.
        dir: PathBuf,
        /// The cluster's WAL segment size.
        segment_size: u32,
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
        let mut o = Overrides { config_file: self.config.clone(), ..Default::default() };
        for pair in &self.set {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("--set {pair:?} is not KEY=VALUE"))?;
            o.values.insert(k.trim().to_string(), v.to_string());
        }
        for (key, value) in [("store", &self.store), ("compression", &self.compression), ("log_level", &self.log_level)]
        {
            if let Some(v) = value {
                o.values.insert(key.to_string(), v.clone());
            }
        }
        Ok(o)
    }
}

/// A command line clap refused, reported like every other failure: one logfmt line on
/// stderr (PostgreSQL puts it in its log) naming the problem and the usage, and the
/// documented exit code. `--help` and `--version` print as usual and exit 0.
///
/// wal-fetch keeps its contract here too: a restore_command with a missing or extra
/// argument must not exit 2, which PostgreSQL would take for "not in the archive" and end
/// a recovery early; outside a standby it exits 202, in a standby 1 (`args` are the
/// process's arguments, to find the subcommand clap could not finish parsing).
pub fn usage_failure(err: clap::Error, args: &[String]) -> u8 {
    use clap::error::ErrorKind;
    if matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = err.print();
        return crate::exit::OK;
    }
    let (op, overrides) = scan_unparsed(args);
    let op = op.as_deref().unwrap_or("wal-rs");
    let rendered = err.render().to_string();
    let mut problem = Vec::new();
    let mut usage = None;
    for line in rendered.lines() {
        let line = line.trim();
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = Some(u.to_string());
        } else if usage.is_none() && !line.is_empty() && !line.starts_with("tip:") && !line.starts_with("For more") {
            problem.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    let mut message = match err.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => "no command given".to_string(),
        _ => problem.join(" "),
    };
    if let Some(u) = usage {
        message.push_str(&format!("; usage: {u}"));
    }
    let help = if op == "wal-rs" { "wal-rs --help".to_string() } else { format!("wal-rs {op} --help") };
    message.push_str(&format!("; see {help}"));
    let code = if op == "wal-fetch" {
        // The flags that could be read still come first, then the environment and the
        // config file, as they would once the configuration resolves.
        let standby =
            crate::config::fetch_mode_without_config(Some(&overrides), &crate::config::ProcessEnv).is_standby();
        crate::exit::wal_fetch_code(&crate::error::Error::Usage(message.clone()), standby)
    } else {
        crate::exit::USAGE
    };
    crate::log::emit(
        crate::log::Level::Error,
        &[("op", &op), ("outcome", &"error"), ("exit", &code), ("error", &message)],
    );
    code
}

/// What can still be read from a command line clap refused: the subcommand, and the
/// global `--config` and `--set` flags (which decide wal-fetch's exit code). The value of an
/// option is never taken for the subcommand: in `wal-rs --config config wal-fetch X` the
/// file is called "config" and the command is wal-fetch.
fn scan_unparsed(args: &[String]) -> (Option<String>, Overrides) {
    use clap::CommandFactory;
    let cli = Cli::command();
    let takes_value =
        |long: &str| cli.get_arguments().any(|a| a.get_long() == Some(long) && a.get_action().takes_values());
    let mut op = None;
    let mut overrides = Overrides::default();
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--" {
            break;
        }
        if let Some(flag) = arg.strip_prefix("--") {
            let (long, inline) = match flag.split_once('=') {
                Some((long, value)) => (long, Some(value.to_string())),
                None => (flag, None),
            };
            let value = match inline {
                Some(v) => Some(v),
                None if takes_value(long) => rest.next().cloned(),
                None => None,
            };
            match (long, value) {
                ("config", Some(file)) => overrides.config_file = Some(PathBuf::from(file)),
                ("set", Some(pair)) => {
                    if let Some((k, v)) = pair.split_once('=') {
                        overrides.values.insert(k.trim().to_string(), v.to_string());
                    }
                }
                _ => {}
            }
        } else if op.is_none() && cli.find_subcommand(arg).is_some() {
            op = Some(arg.clone());
        }
    }
    (op, overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(String::from).collect()
    }

    #[test]
    fn an_option_value_is_not_taken_for_the_subcommand() {
        let (op, o) = scan_unparsed(&args("wal-rs --config config wal-fetch X"));
        assert_eq!(op.as_deref(), Some("wal-fetch"));
        assert_eq!(o.config_file, Some(PathBuf::from("config")));
        let (op, _) = scan_unparsed(&args("wal-rs --store=file:///x wal-verify --bogus"));
        assert_eq!(op.as_deref(), Some("wal-verify"), "every subcommand is known, not a fixed list");
    }

    #[test]
    fn a_broken_wal_fetch_line_follows_the_fetch_mode_flag() {
        // No standby.signal in the test's directory: only the flag makes this a standby.
        let err = Cli::try_parse_from(args("wal-rs --set fetch_mode=standby wal-fetch X")).unwrap_err();
        assert_eq!(usage_failure(err, &args("wal-rs --set fetch_mode=standby wal-fetch X")), 1);
        let err = Cli::try_parse_from(args("wal-rs --set fetch_mode=recovery wal-fetch X")).unwrap_err();
        assert_eq!(usage_failure(err, &args("wal-rs --set fetch_mode=recovery wal-fetch X")), 202);
    }
}
