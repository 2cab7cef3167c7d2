//! Configuration: command-line flags over environment variables over a TOML file over
//! defaults, resolved in this one place. Commands receive a finished [`Config`]; nothing
//! else reads the environment.
//!
//! Every setting is a row of [`SETTINGS`]: its TOML key, its environment variables, its
//! default. `--set KEY=VALUE` sets any of them from the command line; the common ones also
//! have their own flags (`--store`, `--compression`, `--log-level`). `wal-rs config` shows
//! each value and where it came from, with secrets redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Compression;
use crate::crypto::{Key, KeyRing};
use crate::log::Level;
use crate::store::s3::S3Settings;

/// One setting: where it can come from and what it defaults to.
#[derive(Debug)]
pub struct Setting {
    /// Key in the TOML file and in `--set`.
    pub key: &'static str,
    /// Environment variables, first found wins.
    pub env: &'static [&'static str],
    /// Value when nothing sets it.
    pub default: Option<&'static str>,
    /// What it does, for `wal-rs config` and the docs.
    pub help: &'static str,
}

/// Every setting wal-rs reads. The README's configuration reference mirrors this table.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "store",
        env: &["WALRS_STORE"],
        default: None,
        help: "where objects go: file:///absolute/dir or s3://bucket/prefix",
    },
    Setting { key: "compression", env: &["WALRS_COMPRESSION"], default: Some("lz4"), help: "lz4, zstd or none" },
    Setting { key: "zstd_level", env: &["WALRS_ZSTD_LEVEL"], default: Some("3"), help: "zstd level, 1 to 19" },
    Setting { key: "log_level", env: &["WALRS_LOG_LEVEL"], default: Some("info"), help: "error, warn, info or debug" },
    Setting {
        key: "fetch_mode",
        env: &["WALRS_FETCH_MODE"],
        default: Some("auto"),
        help: "how wal-fetch reports failures: auto (standby if ./standby.signal exists), standby, or recovery",
    },
    Setting {
        key: "retry_deadline_secs",
        env: &["WALRS_RETRY_DEADLINE_SECS"],
        default: Some("120"),
        help: "time a WAL command may go without progress (no bytes moved to or from the store, no request answered) before it fails",
    },
    Setting {
        key: "retry_attempts",
        env: &["WALRS_RETRY_ATTEMPTS"],
        default: Some("8"),
        help: "attempts per storage request, the first included",
    },
    Setting {
        key: "request_timeout_secs",
        env: &["WALRS_REQUEST_TIMEOUT_SECS"],
        default: Some("30"),
        help: "time one attempt of one storage request may take",
    },
    Setting {
        key: "backup_partition_size_mib",
        env: &["WALRS_BACKUP_PARTITION_SIZE_MIB"],
        default: Some("256"),
        help: "tar bytes per backup partition before compression",
    },
    Setting {
        key: "backup_concurrency",
        env: &["WALRS_BACKUP_CONCURRENCY"],
        default: Some("2"),
        help: "partitions written (backup-push) or restored (backup-fetch) at once",
    },
    Setting {
        key: "backup_wal_timeout_secs",
        env: &["WALRS_BACKUP_WAL_TIMEOUT_SECS"],
        default: Some("600"),
        help: "time backup-push waits for the next segment of the backup's WAL to reach the store (counted from the last one that arrived)",
    },
    Setting {
        key: "archive_concurrency",
        env: &["WALRS_ARCHIVE_CONCURRENCY"],
        default: Some("4"),
        help: "files uploaded at once, by the archive daemon or one wal-push (the one asked for and those pushed ahead)",
    },
    Setting {
        key: "archive_ahead",
        env: &["WALRS_ARCHIVE_AHEAD"],
        default: Some("16"),
        help: "ready files one wal-push also uploads, oldest first (0: only the file asked for)",
    },
    Setting {
        key: "archive_daemon",
        env: &["WALRS_ARCHIVE_DAEMON"],
        default: Some("true"),
        help: "push ahead from a long-lived archive daemon that wal-push starts and asks over a socket (false: from each wal-push)",
    },
    Setting {
        key: "archive_queue_max_bytes",
        env: &["WALRS_ARCHIVE_QUEUE_MAX"],
        default: Some("0"),
        help: "safety valve, off at 0: past this many bytes of ready WAL, acknowledge without archiving and record the gap",
    },
    Setting {
        key: "prefetch_count",
        env: &["WALRS_PREFETCH_COUNT"],
        default: Some("8"),
        help: "segments wal-fetch fetches ahead in the background (0: off)",
    },
    Setting {
        key: "prefetch_concurrency",
        env: &["WALRS_PREFETCH_CONCURRENCY"],
        default: Some("4"),
        help: "segments the prefetcher downloads at once",
    },
    Setting {
        key: "prefetch_dir",
        env: &["WALRS_PREFETCH_DIR"],
        default: None,
        help: "folder for prefetched segments (default: walrs_prefetch beside the destination, inside pg_wal)",
    },
    Setting {
        key: "network_rate_limit_bytes",
        env: &["WALRS_NETWORK_RATE_LIMIT"],
        default: Some("0"),
        help: "bytes per second one process may send to or receive from the store (0: unlimited)",
    },
    Setting {
        key: "disk_rate_limit_bytes",
        env: &["WALRS_DISK_RATE_LIMIT"],
        default: Some("0"),
        help: "bytes per second one process may read from the data directory or pg_wal (0: unlimited)",
    },
    Setting {
        key: "s3_region",
        env: &["AWS_REGION", "AWS_DEFAULT_REGION"],
        default: None,
        help: "S3 region (else the AWS profile's, else us-east-1)",
    },
    Setting {
        key: "s3_endpoint",
        env: &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"],
        default: None,
        help: "endpoint URL of an S3-compatible server",
    },
    Setting {
        key: "s3_path_style",
        env: &["WALRS_S3_PATH_STYLE"],
        default: Some("false"),
        help: "path-style addressing (true for most S3-compatible servers)",
    },
    Setting {
        key: "s3_storage_class",
        env: &["WALRS_S3_STORAGE_CLASS"],
        default: None,
        help: "storage class of new objects, such as STANDARD_IA",
    },
    Setting { key: "s3_sse", env: &["WALRS_S3_SSE"], default: None, help: "server-side encryption: AES256 or aws:kms" },
    Setting {
        key: "s3_sse_kms_key_id",
        env: &["WALRS_S3_SSE_KMS_KEY_ID"],
        default: None,
        help: "KMS key id for aws:kms",
    },
    Setting {
        key: "encryption_key",
        env: &["WALRS_ENCRYPTION_KEY"],
        default: None,
        help: "client-side encryption key, 64 hex digits or base64 of 32 bytes (`openssl rand -hex 32`); never shown",
    },
    Setting {
        key: "encryption_key_file",
        env: &["WALRS_ENCRYPTION_KEY_FILE"],
        default: None,
        help: "file of encryption keys, one per line: the first seals new objects, all open them (rotation)",
    },
    Setting {
        key: "encryption_allow_plaintext",
        env: &["WALRS_ENCRYPTION_ALLOW_PLAINTEXT"],
        default: Some("false"),
        help: "with a key set, also read objects that are not encrypted (stored before encryption was turned on)",
    },
    Setting {
        key: "s3_part_size_mib",
        env: &["WALRS_S3_PART_SIZE_MIB"],
        default: Some("8"),
        help: "multipart part size in MiB (5 or more); smaller objects go up in one PUT",
    },
    Setting {
        key: "s3_upload_concurrency",
        env: &["WALRS_S3_UPLOAD_CONCURRENCY"],
        default: Some("2"),
        help: "parts of one object uploaded at once",
    },
    Setting {
        key: "delete_garbage_min_age_secs",
        env: &["WALRS_DELETE_GARBAGE_MIN_AGE_SECS"],
        default: Some("86400"),
        help: "delete leaves an unfinished backup's objects alone until nothing was written to them for this long (a backup-push may be running)",
    },
];

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// An environment variable.
    Env(&'static str),
    /// The config file.
    File(PathBuf),
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(v) => write!(f, "env {v}"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Default => f.write_str("default"),
        }
    }
}

/// Where objects are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory (absolute).
    File(PathBuf),
    /// An S3 bucket and key prefix (no leading or trailing '/').
    S3 {
        /// Bucket.
        bucket: String,
        /// Prefix, possibly empty.
        prefix: String,
    },
}

impl StoreUrl {
    /// Parses `file:///abs/dir` or `s3://bucket/prefix`.
    /// Errors show the URL with any user-info redacted: a mistyped URL may hold credentials.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        let hint = "expected file:///absolute/dir or s3://bucket/prefix";
        let shown = redact_url(url);
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("store {shown:?} is not an absolute path: {hint}"));
            }
            let path = path.trim_end_matches('/');
            return Ok(StoreUrl::File(PathBuf::from(if path.is_empty() { "/" } else { path })));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("store {shown:?} names no bucket: {hint}"));
            }
            // S3 bucket names never hold ':' or '@': such a "bucket" is user-info
            // (`s3://AK:SK@bucket`), and credentials do not belong in the store URL.
            if bucket.contains([':', '@']) {
                return Err(format!(
                    "store {shown:?} has ':' or '@' in its bucket name: remove any credentials from the URL \
                     (give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile): {hint}"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(format!("store {shown:?} has an invalid prefix: {hint}"));
            }
            return Ok(StoreUrl::S3 { bucket: bucket.to_string(), prefix: prefix.to_string() });
        }
        Err(format!("store {shown:?} is not a store URL: {hint}"))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(p) => write!(f, "file://{}", p.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// How wal-fetch reports a failure that is not "the file does not exist".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchMode {
    /// Decide per call: standby if `standby.signal` is in the current directory.
    Auto,
    /// Exit 1: a standby asks again later.
    Standby,
    /// Exit above 125: recovery aborts rather than ending early.
    Recovery,
}

impl FetchMode {
    /// Parses a `fetch_mode` value, in any case.
    fn parse(text: &str) -> Option<FetchMode> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Some(FetchMode::Auto),
            "standby" => Some(FetchMode::Standby),
            "recovery" => Some(FetchMode::Recovery),
            _ => None,
        }
    }

    /// Whether wal-fetch answers failures as a standby ("ask again", exit 1); `Auto` asks
    /// the data directory (the current directory).
    pub fn is_standby(self) -> bool {
        match self {
            FetchMode::Standby => true,
            FetchMode::Recovery => false,
            FetchMode::Auto => crate::pg::standby::signalled(),
        }
    }
}

/// wal-fetch's failure mode when the configuration did not resolve (or has not yet, or the
/// command line did not parse: `overrides` is then `None`). A bad key file must not turn
/// `fetch_mode = standby` into a recovery abort, so this follows [`Config::resolve`]'s
/// precedence (flag, environment, config file) over whatever still reads; a value that does
/// not is `auto`.
pub fn fetch_mode_without_config(overrides: Option<&Overrides>, env: &dyn Env) -> FetchMode {
    let from_flag = || overrides.and_then(|o| o.values.get("fetch_mode").cloned());
    let from_env = || setting("fetch_mode").env.iter().find_map(|name| env.var(name));
    let from_file = || {
        let path =
            overrides.and_then(|o| o.config_file.clone()).or_else(|| env.var("WALRS_CONFIG").map(PathBuf::from))?;
        read_file(&path).ok()?.remove("fetch_mode")
    };
    from_flag().or_else(from_env).or_else(from_file).and_then(|v| FetchMode::parse(&v)).unwrap_or(FetchMode::Auto)
}

/// The row of [`SETTINGS`] for `key`, which must be one.
fn setting(key: &str) -> &'static Setting {
    SETTINGS.iter().find(|s| s.key == key).expect("a known setting")
}

/// Retry limits for storage operations.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// Attempts per request.
    pub attempts: u32,
    /// Time for one attempt.
    pub request_timeout: Duration,
    /// Time for one operation, retries included.
    pub deadline: Duration,
}

/// The resolved configuration. `Debug` redacts secrets (see [`printable`]).
#[derive(Clone)]
pub struct Config {
    /// The store; `None` when unset (only `wal-rs config` runs without one).
    pub store: Option<StoreUrl>,
    /// Compression of new objects.
    pub compression: Compression,
    /// zstd level.
    pub zstd_level: i32,
    /// Log level.
    pub log_level: Level,
    /// wal-fetch's failure mode.
    pub fetch_mode: FetchMode,
    /// Retry limits.
    pub retry: RetrySettings,
    /// S3 settings other than the bucket and prefix.
    pub s3: S3Options,
    /// Base backup settings.
    pub backup: BackupSettings,
    /// Archiving settings.
    pub archive: ArchiveSettings,
    /// Prefetch settings.
    pub prefetch: PrefetchSettings,
    /// Rate limits.
    pub rate: RateSettings,
    /// Retention settings.
    pub retention: RetentionSettings,
    /// Client-side encryption keys; `None` when objects are stored in clear.
    pub encryption: Option<Arc<KeyRing>>,
    /// Every setting's raw value and source, for `wal-rs config`.
    pub report: Vec<(&'static Setting, Option<String>, Source)>,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
}

/// Base backup settings.
#[derive(Debug, Clone, Copy)]
pub struct BackupSettings {
    /// Tar bytes per partition.
    pub partition_size: u64,
    /// Partitions in progress at once.
    pub concurrency: usize,
    /// How long backup-push waits for its WAL.
    pub wal_timeout: Duration,
}

/// Archiving throughput settings.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveSettings {
    /// Uploads at once per wal-push.
    pub concurrency: usize,
    /// Ready files pushed ahead per wal-push.
    pub ahead: usize,
    /// Push ahead from the archive daemon rather than from each wal-push.
    pub daemon: bool,
    /// The safety valve; 0 is off.
    pub queue_max_bytes: u64,
}

/// WAL prefetch settings.
#[derive(Debug, Clone)]
pub struct PrefetchSettings {
    /// Segments to fetch ahead.
    pub count: u32,
    /// Downloads at once.
    pub concurrency: usize,
    /// Folder; `None` for the default beside the destination.
    pub dir: Option<PathBuf>,
}

/// Retention (`wal-rs delete`) settings.
#[derive(Debug, Clone, Copy)]
pub struct RetentionSettings {
    /// How long after its last write an unfinished backup counts as garbage.
    pub garbage_min_age: Duration,
}

/// Rate limits, in bytes per second; 0 is unlimited.
#[derive(Debug, Clone, Copy)]
pub struct RateSettings {
    /// To and from the store.
    pub network: u64,
    /// Reading the data directory and pg_wal.
    pub disk: u64,
}

/// S3 settings from the configuration. `Debug` redacts the endpoint's user-info.
#[derive(Clone)]
pub struct S3Options {
    /// Region.
    pub region: Option<String>,
    /// Endpoint URL.
    pub endpoint: Option<String>,
    /// Path-style addressing.
    pub path_style: bool,
    /// Storage class.
    pub storage_class: Option<String>,
    /// Server-side encryption.
    pub sse: Option<String>,
    /// KMS key id.
    pub sse_kms_key_id: Option<String>,
    /// Part size in bytes.
    pub part_size: usize,
    /// Parts in flight per object.
    pub upload_concurrency: usize,
}

/// What the command line said, before resolution. `Debug` redacts secrets.
#[derive(Default, Clone)]
pub struct Overrides {
    /// `--config`.
    pub config_file: Option<PathBuf>,
    /// Flag values by setting key.
    pub values: BTreeMap<String, String>,
}

impl Overrides {
    /// The same overrides as command-line arguments, for a child process of ours.
    pub fn as_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(f) = &self.config_file {
            args.push("--config".to_string());
            args.push(f.display().to_string());
        }
        for (k, v) in &self.values {
            args.push("--set".to_string());
            args.push(format!("{k}={v}"));
        }
        args
    }
}

/// A setting's value as it may be printed: never the encryption key, URLs without
/// user-info. Raw values sit in [`Config::report`] and [`Overrides`], so their `Debug` goes
/// through here: one `{config:?}` in a log line must not leak a key.
pub fn printable(key: &str, value: &str) -> String {
    match key {
        "encryption_key" => "<redacted>".to_string(),
        "store" | "s3_endpoint" => redact_url(value),
        _ => value.to_string(),
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report: Vec<(&str, Option<String>, &Source)> = self
            .report
            .iter()
            .map(|(setting, value, source)| (setting.key, value.as_deref().map(|v| printable(setting.key, v)), source))
            .collect();
        f.debug_struct("Config")
            .field("store", &self.store)
            .field("compression", &self.compression)
            .field("zstd_level", &self.zstd_level)
            .field("log_level", &self.log_level)
            .field("fetch_mode", &self.fetch_mode)
            .field("retry", &self.retry)
            .field("s3", &self.s3)
            .field("backup", &self.backup)
            .field("archive", &self.archive)
            .field("prefetch", &self.prefetch)
            .field("rate", &self.rate)
            .field("retention", &self.retention)
            .field("encryption", &self.encryption)
            .field("report", &report)
            .field("file", &self.file)
            .finish()
    }
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("path_style", &self.path_style)
            .field("storage_class", &self.storage_class)
            .field("sse", &self.sse)
            .field("sse_kms_key_id", &self.sse_kms_key_id)
            .field("part_size", &self.part_size)
            .field("upload_concurrency", &self.upload_concurrency)
            .finish()
    }
}

impl fmt::Debug for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: BTreeMap<&str, String> = self.values.iter().map(|(k, v)| (k.as_str(), printable(k, v))).collect();
        f.debug_struct("Overrides").field("config_file", &self.config_file).field("values", &values).finish()
    }
}

/// The environment, injectable for tests.
pub trait Env {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Config {
    /// Resolves the configuration from flags, the environment and the config file.
    pub fn resolve(overrides: &Overrides, env: &dyn Env) -> Result<Config, String> {
        for key in overrides.values.keys() {
            if !SETTINGS.iter().any(|s| s.key == key) {
                return Err(format!("unknown setting {key:?} in --set: see `wal-rs config` for the list"));
            }
        }
        let file = overrides.config_file.clone().or_else(|| env.var("WALRS_CONFIG").map(PathBuf::from));
        let file_values = match &file {
            Some(path) => read_file(path)?,
            None => BTreeMap::new(),
        };
        let mut report = Vec::new();
        for setting in SETTINGS {
            let (value, source) = if let Some(v) = overrides.values.get(setting.key) {
                (Some(v.clone()), Source::Flag)
            } else if let Some((name, v)) = setting.env.iter().find_map(|n| env.var(n).map(|v| (*n, v))) {
                (Some(v), Source::Env(name))
            } else if let Some(v) = file_values.get(setting.key) {
                (Some(v.clone()), Source::File(file.clone().unwrap()))
            } else {
                (setting.default.map(str::to_string), Source::Default)
            };
            report.push((setting, value, source));
        }
        let get = |key: &str| -> Option<&str> {
            report.iter().find(|(s, _, _)| s.key == key).and_then(|(_, v, _)| v.as_deref())
        };
        let named = |key: &str| -> String {
            let (s, _, source) = report.iter().find(|(s, _, _)| s.key == key).unwrap();
            match source {
                Source::Env(v) => v.to_string(),
                Source::Flag => format!("--set {key}"),
                Source::File(p) => format!("{key} in {}", p.display()),
                Source::Default => s.env.first().map(|e| e.to_string()).unwrap_or_else(|| key.to_string()),
            }
        };
        let number = |key: &str, min: u64, max: u64| -> Result<u64, String> {
            let raw = get(key).unwrap_or("");
            raw.parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{} is {raw:?}: set a whole number from {min} to {max}", named(key)))
        };
        let boolean = |key: &str| -> Result<bool, String> {
            match get(key).unwrap_or("").to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                other => Err(format!("{} is {other:?}: set true or false", named(key))),
            }
        };
        let store = get("store").map(StoreUrl::parse).transpose().map_err(|e| format!("{}: {e}", named("store")))?;
        let compression = get("compression")
            .unwrap_or("lz4")
            .parse::<Compression>()
            .map_err(|e| format!("{}: {e}", named("compression")))?;
        let log_level =
            get("log_level").unwrap_or("info").parse::<Level>().map_err(|e| format!("{}: {e}", named("log_level")))?;
        let fetch_mode = {
            let raw = get("fetch_mode").unwrap_or("auto");
            FetchMode::parse(raw)
                .ok_or_else(|| format!("{} is {raw:?}: set auto, standby or recovery", named("fetch_mode")))?
        };
        // Checked with or without a key: a typo here must not wait for the day a key is set.
        let allow_plaintext = boolean("encryption_allow_plaintext")?;
        let value_and_source = |key: &str| {
            report.iter().find(|(s, _, _)| s.key == key).and_then(|(_, v, source)| v.as_deref().map(|v| (v, source)))
        };
        let encryption =
            match key_source(value_and_source("encryption_key"), value_and_source("encryption_key_file"), &named)? {
                None => None,
                Some(source) => Some(Arc::new(source.key_ring(&named)?.allow_plaintext(allow_plaintext))),
            };
        let sse = get("s3_sse").map(str::to_string);
        if let Some(v) = &sse {
            if v != "AES256" && v != "aws:kms" {
                return Err(format!("{} is {v:?}: set AES256 or aws:kms", named("s3_sse")));
            }
        }
        Ok(Config {
            store,
            compression,
            zstd_level: number("zstd_level", 1, 19)? as i32,
            log_level,
            fetch_mode,
            retry: RetrySettings {
                attempts: number("retry_attempts", 1, 100)? as u32,
                request_timeout: Duration::from_secs(number("request_timeout_secs", 1, 3600)?),
                deadline: Duration::from_secs(number("retry_deadline_secs", 1, 86400)?),
            },
            s3: S3Options {
                region: get("s3_region").map(str::to_string),
                endpoint: get("s3_endpoint").map(str::to_string),
                path_style: boolean("s3_path_style")?,
                storage_class: get("s3_storage_class").map(str::to_string),
                sse,
                sse_kms_key_id: get("s3_sse_kms_key_id").map(str::to_string),
                part_size: (number("s3_part_size_mib", 5, 5120)? as usize) << 20,
                upload_concurrency: number("s3_upload_concurrency", 1, 64)? as usize,
            },
            backup: BackupSettings {
                partition_size: number("backup_partition_size_mib", 1, 1 << 20)? << 20,
                concurrency: number("backup_concurrency", 1, 64)? as usize,
                wal_timeout: Duration::from_secs(number("backup_wal_timeout_secs", 1, 86400)?),
            },
            archive: ArchiveSettings {
                concurrency: number("archive_concurrency", 1, 256)? as usize,
                ahead: number("archive_ahead", 0, 10_000)? as usize,
                daemon: boolean("archive_daemon")?,
                queue_max_bytes: number("archive_queue_max_bytes", 0, u64::MAX)?,
            },
            prefetch: PrefetchSettings {
                count: number("prefetch_count", 0, 1024)? as u32,
                concurrency: number("prefetch_concurrency", 1, 64)? as usize,
                dir: get("prefetch_dir").map(PathBuf::from),
            },
            rate: RateSettings {
                network: number("network_rate_limit_bytes", 0, u64::MAX)?,
                disk: number("disk_rate_limit_bytes", 0, u64::MAX)?,
            },
            retention: RetentionSettings {
                garbage_min_age: Duration::from_secs(number("delete_garbage_min_age_secs", 0, 10 * 365 * 86400)?),
            },
            encryption,
            report,
            file,
        })
    }

    /// The store URL, or the one-line error saying how to set it.
    pub fn require_store(&self) -> Result<&StoreUrl, String> {
        self.store.as_ref().ok_or_else(|| {
            "WALRS_STORE is not set: set it to file:///absolute/dir or s3://bucket/prefix (or pass --store, or set store in the config file)".to_string()
        })
    }

    /// S3 settings for `bucket` and `prefix`.
    pub fn s3_settings(&self, bucket: &str, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: self.s3.region.clone(),
            endpoint: self.s3.endpoint.clone(),
            path_style: self.s3.path_style,
            storage_class: self.s3.storage_class.clone(),
            sse: self.s3.sse.clone(),
            sse_kms_key_id: self.s3.sse_kms_key_id.clone(),
            part_size: self.s3.part_size,
            upload_concurrency: self.s3.upload_concurrency,
            max_attempts: self.retry.attempts,
            request_timeout: self.retry.request_timeout,
            deadline: self.retry.deadline,
        }
    }
}

/// Where the encryption keys come from.
enum KeySource<'a> {
    /// `encryption_key`: one key.
    Inline(&'a str),
    /// `encryption_key_file`: the path of a key file.
    File(&'a str),
}

/// How strongly a source binds: flags over the environment over the file over defaults.
fn precedence(source: &Source) -> u8 {
    match source {
        Source::Flag => 3,
        Source::Env(_) => 2,
        Source::File(_) => 1,
        Source::Default => 0,
    }
}

/// Which of `encryption_key` and `encryption_key_file` (each a value and its source) holds
/// the keys. Like any setting, the one from the stronger source wins (a key in the
/// environment over a key file named in the config file); both from one source are an
/// error, as which key seals new objects would be ambiguous.
fn key_source<'a>(
    key: Option<(&'a str, &Source)>,
    file: Option<(&'a str, &Source)>,
    named: &dyn Fn(&str) -> String,
) -> Result<Option<KeySource<'a>>, String> {
    use std::cmp::Ordering;
    match (key, file) {
        (None, None) => Ok(None),
        (Some((key, _)), None) => Ok(Some(KeySource::Inline(key))),
        (None, Some((path, _))) => Ok(Some(KeySource::File(path))),
        (Some((key, key_from)), Some((path, path_from))) => match precedence(key_from).cmp(&precedence(path_from)) {
            Ordering::Greater => Ok(Some(KeySource::Inline(key))),
            Ordering::Less => Ok(Some(KeySource::File(path))),
            Ordering::Equal => Err(format!(
                "{} and {} are both set: keep the keys in the file (the first line seals new objects)",
                named("encryption_key"),
                named("encryption_key_file")
            )),
        },
    }
}

impl KeySource<'_> {
    /// The key ring. Errors name the setting, never a key.
    fn key_ring(&self, named: &dyn Fn(&str) -> String) -> Result<KeyRing, String> {
        match self {
            KeySource::Inline(text) => {
                let key = Key::parse(text).map_err(|e| format!("{}: {e}", named("encryption_key")))?;
                Ok(KeyRing::new(vec![key]).expect("one key"))
            }
            KeySource::File(path) => read_key_file(path, &named("encryption_key_file")),
        }
    }
}

/// The key ring in the file at `path`, set by the setting `what`.
fn read_key_file(path: &str, what: &str) -> Result<KeyRing, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        // A key pasted where its path belongs must not reach the log through this error.
        if looks_like_a_key(path) {
            format!(
                "{what}: the encryption key file setting holds what looks like a key, not a path: \
                 write the key to a file only the PostgreSQL user can read and set its path"
            )
        } else {
            format!("{what}: cannot read {path}: {e}: fix the path or the file's permissions")
        }
    })?;
    KeyRing::parse_file(&text, &format!("{what} ({path})"))
}

/// Whether a value meant to be a path looks like a key instead: 32 or more hex digits and
/// nothing else (a path has a '/' or a name), or anything [`Key::parse`] takes (base64).
fn looks_like_a_key(value: &str) -> bool {
    let value = value.trim();
    (value.len() >= 32 && value.chars().all(|c| c.is_ascii_hexdigit())) || Key::parse(value).is_ok()
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read config file {}: {e}: fix the path given by --config or WALRS_CONFIG", path.display())
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {} is not valid TOML: {}", path.display(), e.message()))?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        if !SETTINGS.iter().any(|s| s.key == key) {
            return Err(format!(
                "config file {} has unknown setting {key:?}: see `wal-rs config` for the list",
                path.display()
            ));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "config file {}: {key} must be a string, number or boolean, not {}",
                    path.display(),
                    other.type_str()
                ))
            }
        };
        out.insert(key, text);
    }
    Ok(out)
}

/// Hides what must never be printed: URL user-info (`https://user:pass@host`). Everything
/// from `://` to the last '@' goes, since a secret may itself hold '/' or '@'; a path with
/// an '@' loses more than it needs to, which is the safe way to be wrong.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_userinfo, host)) => format!("{scheme}://<redacted>@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn source_of(c: &Config, key: &str) -> Source {
        c.report.iter().find(|(s, _, _)| s.key == key).unwrap().2.clone()
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wal-rs.toml");
        std::fs::write(
            &file,
            "store = \"s3://from-file/p\"\ncompression = \"zstd\"\nzstd_level = 7\ns3_path_style = true\n",
        )
        .unwrap();
        let env = FakeEnv(HashMap::from([("WALRS_COMPRESSION", "none"), ("WALRS_ZSTD_LEVEL", "5")]));
        let mut o = Overrides { config_file: Some(file.clone()), ..Default::default() };
        o.values.insert("zstd_level".into(), "9".into());
        let c = Config::resolve(&o, &env).unwrap();
        assert_eq!(c.store, Some(StoreUrl::S3 { bucket: "from-file".into(), prefix: "p".into() }));
        assert_eq!(source_of(&c, "store"), Source::File(file));
        assert_eq!(c.compression, Compression::None);
        assert_eq!(source_of(&c, "compression"), Source::Env("WALRS_COMPRESSION"));
        assert_eq!(c.zstd_level, 9);
        assert_eq!(source_of(&c, "zstd_level"), Source::Flag);
        assert!(c.s3.path_style);
        assert_eq!(c.retry.attempts, 8);
        assert_eq!(source_of(&c, "retry_attempts"), Source::Default);
    }

    #[test]
    fn the_config_file_comes_from_walrs_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "store = \"file:///srv/wal\"\n").unwrap();
        let path: &'static str = Box::leak(file.to_str().unwrap().to_string().into_boxed_str());
        let c = Config::resolve(&Overrides::default(), &FakeEnv(HashMap::from([("WALRS_CONFIG", path)]))).unwrap();
        assert_eq!(c.store, Some(StoreUrl::File("/srv/wal".into())));
    }

    #[test]
    fn bad_values_name_what_to_fix() {
        let env = |k, v| FakeEnv(HashMap::from([(k, v)]));
        let err = Config::resolve(&Overrides::default(), &env("WALRS_STORE", "/no/scheme")).unwrap_err();
        assert!(err.contains("WALRS_STORE") && err.contains("file:///absolute/dir"), "{err}");
        let err = Config::resolve(&Overrides::default(), &env("WALRS_COMPRESSION", "gzip")).unwrap_err();
        assert!(err.contains("WALRS_COMPRESSION"), "{err}");
        let err = Config::resolve(&Overrides::default(), &env("WALRS_S3_PART_SIZE_MIB", "1")).unwrap_err();
        assert!(err.contains("from 5"), "{err}");
        let mut o = Overrides::default();
        o.values.insert("nonsense".into(), "1".into());
        assert!(Config::resolve(&o, &env("X", "y")).unwrap_err().contains("unknown setting"));
        let c = Config::resolve(&Overrides::default(), &env("X", "y")).unwrap();
        assert!(c.require_store().unwrap_err().contains("WALRS_STORE is not set"));
    }

    #[test]
    fn store_urls() {
        assert_eq!(StoreUrl::parse("file:///a/b/").unwrap(), StoreUrl::File("/a/b".into()));
        assert_eq!(StoreUrl::parse("s3://b").unwrap(), StoreUrl::S3 { bucket: "b".into(), prefix: "".into() });
        assert_eq!(StoreUrl::parse("s3://b/x/y/").unwrap(), StoreUrl::S3 { bucket: "b".into(), prefix: "x/y".into() });
        for bad in ["file://rel", "s3:///p", "http://x", "", "s3://b/../x"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(StoreUrl::parse("s3://b/x").unwrap().to_string(), "s3://b/x");
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(redact_url("http://ak:sk@127.0.0.1:9000"), "http://<redacted>@127.0.0.1:9000");
        assert_eq!(redact_url("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
    }

    #[test]
    fn urls_lose_passwords_holding_slashes_and_ats() {
        assert_eq!(redact_url("http://ak:se/cret@h"), "http://<redacted>@h");
        assert_eq!(redact_url("http://ak:p@ss@h:9000/x"), "http://<redacted>@h:9000/x");
    }

    #[test]
    fn store_urls_with_credentials_are_refused_without_echoing_them() {
        for url in ["s3://AKIDX:s3cr3t@bucket/p", "s3://AKIDX:s3/cr3t@bucket/p", "s3://AKIDX@bucket"] {
            let err = StoreUrl::parse(url).unwrap_err();
            assert!(err.contains("':' or '@'"), "{err}");
            assert!(!err.contains("AKIDX") && !err.contains("s3cr3t") && !err.contains("cr3t"), "{err}");
        }
    }

    const HEX_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn debug_output_never_holds_the_key() {
        let env = FakeEnv(HashMap::from([("WALRS_ENCRYPTION_KEY", HEX_KEY)]));
        let config = Config::resolve(&Overrides::default(), &env).unwrap();
        assert!(config.encryption.is_some());
        let shown = format!("{config:?}");
        assert!(!shown.contains(HEX_KEY) && shown.contains("encryption_key"), "{shown}");
        let mut o = Overrides::default();
        o.values.insert("encryption_key".into(), HEX_KEY.into());
        o.values.insert("s3_endpoint".into(), "http://ak:s3cr3t@h".into());
        let config = Config::resolve(&o, &FakeEnv(HashMap::new())).unwrap();
        for shown in [format!("{o:?}"), format!("{config:?}")] {
            assert!(!shown.contains(HEX_KEY) && !shown.contains("s3cr3t"), "{shown}");
        }
    }

    #[test]
    fn a_key_from_a_stronger_source_beats_a_key_file_from_a_weaker_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wal-rs.toml");
        std::fs::write(&file, "encryption_key_file = \"/nonexistent/keys\"\n").unwrap();
        let key_id = Key::parse(HEX_KEY).unwrap().id();
        let from_file = Overrides { config_file: Some(file.clone()), ..Default::default() };
        let env = FakeEnv(HashMap::from([("WALRS_ENCRYPTION_KEY", HEX_KEY)]));
        let c = Config::resolve(&from_file, &env).unwrap();
        assert_eq!(c.encryption.unwrap().active().id(), key_id);
        let mut with_flag = from_file.clone();
        with_flag.values.insert("encryption_key".into(), HEX_KEY.into());
        let c = Config::resolve(&with_flag, &FakeEnv(HashMap::new())).unwrap();
        assert_eq!(c.encryption.unwrap().active().id(), key_id);
        // A key file flag beats a key in the environment.
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{}\n", "ab".repeat(32))).unwrap();
        let mut file_flag = Overrides::default();
        file_flag.values.insert("encryption_key_file".into(), keys.display().to_string());
        let c = Config::resolve(&file_flag, &env).unwrap();
        assert_eq!(c.encryption.unwrap().active().id(), Key::parse(&"ab".repeat(32)).unwrap().id());
    }

    #[test]
    fn a_key_and_a_key_file_from_one_source_are_refused() {
        let env = FakeEnv(HashMap::from([
            ("WALRS_ENCRYPTION_KEY", HEX_KEY),
            ("WALRS_ENCRYPTION_KEY_FILE", "/nonexistent/keys"),
        ]));
        let err = Config::resolve(&Overrides::default(), &env).unwrap_err();
        assert!(err.contains("both set") && !err.contains(HEX_KEY), "{err}");
    }

    #[test]
    fn allow_plaintext_is_checked_without_a_key() {
        let env = FakeEnv(HashMap::from([("WALRS_ENCRYPTION_ALLOW_PLAINTEXT", "maybe")]));
        let err = Config::resolve(&Overrides::default(), &env).unwrap_err();
        assert!(err.contains("WALRS_ENCRYPTION_ALLOW_PLAINTEXT") && err.contains("true or false"), "{err}");
    }

    #[test]
    fn a_key_pasted_as_the_key_file_is_not_echoed() {
        let env = FakeEnv(HashMap::from([("WALRS_ENCRYPTION_KEY_FILE", HEX_KEY)]));
        let err = Config::resolve(&Overrides::default(), &env).unwrap_err();
        assert!(err.contains("looks like a key, not a path") && !err.contains(HEX_KEY), "{err}");
        let env = FakeEnv(HashMap::from([("WALRS_ENCRYPTION_KEY_FILE", "/nonexistent/keys")]));
        let err = Config::resolve(&Overrides::default(), &env).unwrap_err();
        assert!(err.contains("cannot read /nonexistent/keys"), "{err}");
    }

    #[test]
    fn wal_fetch_keeps_its_fetch_mode_when_the_config_fails() {
        let env = FakeEnv(HashMap::from([
            ("WALRS_FETCH_MODE", "standby"),
            ("WALRS_ENCRYPTION_KEY_FILE", "/nonexistent/keys"),
        ]));
        assert!(Config::resolve(&Overrides::default(), &env).is_err());
        assert_eq!(fetch_mode_without_config(None, &env), FetchMode::Standby);
        assert!(fetch_mode_without_config(None, &env).is_standby());
        // Read like the resolved setting: any case, a flag over the environment.
        let upper = FakeEnv(HashMap::from([("WALRS_FETCH_MODE", "RECOVERY")]));
        assert_eq!(fetch_mode_without_config(None, &upper), FetchMode::Recovery);
        let mut o = Overrides::default();
        o.values.insert("fetch_mode".into(), "recovery".into());
        assert_eq!(fetch_mode_without_config(Some(&o), &env), FetchMode::Recovery);
        // The config file counts too, even when another of its settings is what fails.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wal-rs.toml");
        std::fs::write(&file, "fetch_mode = \"standby\"\nencryption_key_file = \"/nonexistent/keys\"\n").unwrap();
        let o = Overrides { config_file: Some(file), ..Default::default() };
        assert_eq!(fetch_mode_without_config(Some(&o), &FakeEnv(HashMap::new())), FetchMode::Standby);
        let junk = FakeEnv(HashMap::from([("WALRS_FETCH_MODE", "sometimes")]));
        assert_eq!(fetch_mode_without_config(None, &junk), FetchMode::Auto);
    }
}

#[cfg(test)]
mod docs_tests {
    use super::SETTINGS;

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../README.md");
        for s in SETTINGS {
            assert!(readme.contains(&format!("`{}`", s.key)), "README lacks setting {}", s.key);
            for env in s.env {
                assert!(readme.contains(&format!("`{env}`")), "README lacks {env}");
            }
        }
    }
}
