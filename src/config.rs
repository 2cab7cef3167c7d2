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
        help: "time one operation may spend retrying transient storage errors",
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
        help: "time backup-push waits for the backup's WAL to reach the store",
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
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        let hint = "expected file:///absolute/dir or s3://bucket/prefix";
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("store {url:?} is not an absolute path: {hint}"));
            }
            let path = path.trim_end_matches('/');
            return Ok(StoreUrl::File(PathBuf::from(if path.is_empty() { "/" } else { path })));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("store {url:?} names no bucket: {hint}"));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(format!("store {url:?} has an invalid prefix: {hint}"));
            }
            return Ok(StoreUrl::S3 { bucket: bucket.to_string(), prefix: prefix.to_string() });
        }
        Err(format!("store {url:?} is not a store URL: {hint}"))
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

/// The resolved configuration.
#[derive(Debug, Clone)]
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

/// S3 settings from the configuration.
#[derive(Debug, Clone)]
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

/// What the command line said, before resolution.
#[derive(Debug, Default, Clone)]
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
        let fetch_mode = match get("fetch_mode").unwrap_or("auto").to_ascii_lowercase().as_str() {
            "auto" => FetchMode::Auto,
            "standby" => FetchMode::Standby,
            "recovery" => FetchMode::Recovery,
            other => return Err(format!("{} is {other:?}: set auto, standby or recovery", named("fetch_mode"))),
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
            encryption: Self::key_ring(get("encryption_key"), get("encryption_key_file"), &named)?
                .map(|r| boolean("encryption_allow_plaintext").map(|allow| Arc::new(r.allow_plaintext(allow))))
                .transpose()?,
            report,
            file,
        })
    }

    /// The key ring from `encryption_key` or `encryption_key_file` (not both: which key seals
    /// would be ambiguous). Errors name the setting, never the key.
    fn key_ring(
        key: Option<&str>,
        file: Option<&str>,
        named: &dyn Fn(&str) -> String,
    ) -> Result<Option<KeyRing>, String> {
        match (key, file) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(format!(
                "{} and {} are both set: keep the keys in the file (the first line seals new objects)",
                named("encryption_key"),
                named("encryption_key_file")
            )),
            (Some(k), None) => {
                let key = Key::parse(k).map_err(|e| format!("{}: {e}", named("encryption_key")))?;
                Ok(KeyRing::new(vec![key]))
            }
            (None, Some(path)) => {
                let what = named("encryption_key_file");
                let text = std::fs::read_to_string(path).map_err(|e| format!("{what}: cannot read {path}: {e}"))?;
                KeyRing::parse_file(&text, &format!("{what} ({path})")).map(Some)
            }
        }
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

/// Hides what must never be printed: URL user-info (`https://user:pass@host`).
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if !userinfo.contains('/') {
                return format!("{scheme}://<redacted>@{host}");
            }
        }
    }
    url.to_string()
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
