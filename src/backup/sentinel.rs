//! The backup sentinel (WAL-G's version-2 format, plus wal-rs's own fields, which other
//! tools ignore) and `metadata.json`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `<name>_backup_stop_sentinel.json`: written last; its presence means the backup is
/// complete and its WAL is in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sentinel {
    /// Start LSN (the checkpoint's redo point), as a number.
    #[serde(rename = "LSN")]
    pub start_lsn: u64,
    /// The LSN the backup is consistent at.
    #[serde(rename = "FinishLSN", default)]
    pub finish_lsn: u64,
    /// `server_version_num`.
    #[serde(rename = "PgVersion", default)]
    pub pg_version: u32,
    /// The cluster's system identifier.
    #[serde(rename = "SystemIdentifier", default)]
    pub system_identifier: Option<u64>,
    /// Bytes of the tar partitions before compression.
    #[serde(rename = "UncompressedSize", default)]
    pub uncompressed_size: u64,
    /// Bytes stored.
    #[serde(rename = "CompressedSize", default)]
    pub compressed_size: u64,
    /// Bytes of the data files.
    #[serde(rename = "DataCatalogSize", default, skip_serializing_if = "Option::is_none")]
    pub data_catalog_size: Option<u64>,
    /// Tablespaces: `{"base_prefix": ..., "tablespaces": ["16385"], "16385": {"loc": ..., "link": ...}}`.
    #[serde(rename = "Spec", default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Value>,
    /// Free-form user data.
    #[serde(rename = "UserData", default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Value>,
    /// Sentinel format version (2).
    #[serde(rename = "Version", default)]
    pub version: u32,
    /// When the backup started (RFC 3339).
    #[serde(rename = "StartTime", default)]
    pub start_time: String,
    /// When it finished (RFC 3339).
    #[serde(rename = "FinishTime", default)]
    pub finish_time: String,
    /// strftime format of the times, for WAL-G.
    #[serde(rename = "DateFmt", default)]
    pub date_fmt: String,
    /// Host the backup was taken on.
    #[serde(rename = "Hostname", default)]
    pub hostname: String,
    /// The data directory backed up.
    #[serde(rename = "DataDir", default)]
    pub data_dir: String,
    /// A permanent backup is never deleted by retention.
    #[serde(rename = "IsPermanent", default)]
    pub is_permanent: bool,
    /// wal-rs: the timeline the backup started on.
    #[serde(rename = "WalrsTimeline", default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// wal-rs: the WAL segment size.
    #[serde(rename = "WalrsWalSegmentSize", default, skip_serializing_if = "Option::is_none")]
    pub wal_segment_size: Option<u32>,
    /// wal-rs: the manifest object, relative to the backup's folder.
    #[serde(rename = "WalrsManifest", default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// `metadata.json`, as WAL-G writes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupMetadata {
    /// Start time.
    pub start_time: String,
    /// Finish time.
    pub finish_time: String,
    /// strftime format of the times.
    pub date_fmt: String,
    /// Host.
    pub hostname: String,
    /// Data directory.
    pub data_dir: String,
    /// `server_version_num`.
    pub pg_version: u32,
    /// Start LSN.
    pub start_lsn: u64,
    /// Finish LSN.
    pub finish_lsn: u64,
    /// Permanent.
    pub is_permanent: bool,
    /// System identifier.
    pub system_identifier: Option<u64>,
    /// Bytes before compression.
    pub uncompressed_size: u64,
    /// Bytes stored.
    pub compressed_size: u64,
    /// Free-form user data.
    #[serde(default)]
    pub user_data: Option<Value>,
}

/// Where a WAL-G delta backup comes from (`DeltaFrom`, `DeltaFullName`, `DeltaFromLSN`,
/// `DeltaCount` in its sentinel). A delta backup's partitions hold page increments, not
/// relation files: restored as they are, they would be a damaged cluster. wal-rs lists
/// such backups but never restores them.
///
/// Read from the sentinel's JSON beside [`Sentinel`], not as fields of it: the sentinel is
/// rewritten by other commands and its shape is WAL-G's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaOrigin {
    /// `DeltaFrom`: the backup this one is an increment on.
    pub from: Option<String>,
    /// `DeltaFullName`: the full backup at the root of the chain.
    pub full_name: Option<String>,
    /// `DeltaFromLSN`: the LSN the increments start at.
    pub from_lsn: Option<u64>,
    /// `DeltaCount`: how many deltas lie between this one and the full backup.
    pub count: Option<u64>,
}

impl DeltaOrigin {
    /// The delta fields of a sentinel, or `None` for a full backup. Any of them present
    /// (WAL-G writes them all, or none) makes a delta: a half-written set is not taken for
    /// a full backup.
    pub fn of_sentinel(json: &[u8]) -> Option<DeltaOrigin> {
        let value: Value = serde_json::from_slice(json).ok()?;
        let text = |field: &str| value.get(field).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        let number = |field: &str| value.get(field).and_then(Value::as_u64);
        let present = |field: &str| value.get(field).is_some_and(|v| !v.is_null());
        let is_delta = ["DeltaFrom", "DeltaFullName", "DeltaFromLSN"].into_iter().any(present)
            || number("DeltaCount").is_some_and(|n| n > 0);
        is_delta.then(|| DeltaOrigin {
            from: text("DeltaFrom"),
            full_name: text("DeltaFullName"),
            from_lsn: number("DeltaFromLSN"),
            count: number("DeltaCount"),
        })
    }

    /// The backup it is a delta from: `DeltaFrom`, else the chain's full backup.
    pub fn base_name(&self) -> Option<&str> {
        self.from.as_deref().or(self.full_name.as_deref())
    }

    /// [`DeltaOrigin::base_name`] for messages: "an unnamed backup" when there is none.
    pub fn base(&self) -> &str {
        self.base_name().unwrap_or("an unnamed backup")
    }
}

/// A tablespace in a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    /// Its OID, the name of its link in `pg_tblspc`.
    pub oid: String,
    /// Where it was (absolute, with a trailing '/').
    pub location: String,
}

impl Sentinel {
    /// The tablespaces the spec records. Only those PostgreSQL could have made are kept: a
    /// decimal OID (it names the link made in `pg_tblspc`) and an absolute location (where
    /// the files go); anything else in a damaged or forged sentinel is left out.
    pub fn tablespaces(&self) -> Vec<Tablespace> {
        let Some(spec) = &self.spec else {
            return Vec::new();
        };
        let Some(list) = spec.get("tablespaces").and_then(Value::as_array) else {
            return Vec::new();
        };
        list.iter()
            .filter_map(Value::as_str)
            .filter_map(|oid| {
                let loc = spec.get(oid)?.get("loc")?.as_str()?;
                let safe = !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) && loc.starts_with('/');
                safe.then(|| Tablespace { oid: oid.to_string(), location: loc.to_string() })
            })
            .collect()
    }

    /// A spec for `data_dir` and `tablespaces`, in WAL-G's shape.
    pub fn make_spec(data_dir: &str, tablespaces: &[Tablespace]) -> Value {
        let mut spec = serde_json::Map::new();
        spec.insert("base_prefix".into(), Value::String(format!("{}/", data_dir.trim_end_matches('/'))));
        spec.insert(
            "tablespaces".into(),
            Value::Array(tablespaces.iter().map(|t| Value::String(t.oid.clone())).collect()),
        );
        for t in tablespaces {
            spec.insert(
                t.oid.clone(),
                serde_json::json!({ "loc": t.location, "link": format!("pg_tblspc/{}", t.oid) }),
            );
        }
        Value::Object(spec)
    }

    /// The finish time as a timestamp, for ordering; `None` when unparseable.
    pub fn finish_timestamp(&self) -> Option<time::OffsetDateTime> {
        parse_time(&self.finish_time)
    }

    /// The start time as a timestamp.
    pub fn start_timestamp(&self) -> Option<time::OffsetDateTime> {
        parse_time(&self.start_time)
    }
}

/// Parses RFC 3339 times as Go and wal-rs write them.
pub fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Formats a time as RFC 3339 in UTC.
pub fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_walg_sentinel() {
        let text = r#"{"LSN":33554472,"PgVersion":150018,"FinishLSN":33554688,"SystemIdentifier":7712412929493074945,"UncompressedSize":23639552,"CompressedSize":4535097,"ChkpNum":null,"Version":2,"StartTime":"2026-11-26T09:41:07.061721687Z","FinishTime":"2026-11-26T09:41:07.223029391Z","DateFmt":"%Y-%m-%dT%H:%M:%S.%fZ","Hostname":"vm","DataDir":"/var/lib/postgresql/15/fixture","IsPermanent":false}"#;
        let s: Sentinel = serde_json::from_str(text).unwrap();
        assert_eq!(s.start_lsn, 33554472);
        assert_eq!(s.system_identifier, Some(7712412929493074945));
        assert!(s.finish_timestamp().unwrap() > s.start_timestamp().unwrap());
        assert!(s.tablespaces().is_empty());
    }

    #[test]
    fn walg_delta_backups_are_told_from_full_ones() {
        let delta = br#"{"LSN":50331688,"DeltaFromLSN":33554472,"DeltaFrom":"base_000000010000000000000002","DeltaFullName":"base_000000010000000000000002","DeltaCount":1,"FinishLSN":50331904,"Version":2}"#;
        let origin = DeltaOrigin::of_sentinel(delta).expect("a delta backup");
        assert_eq!(origin.from.as_deref(), Some("base_000000010000000000000002"));
        assert_eq!(origin.full_name.as_deref(), Some("base_000000010000000000000002"));
        assert_eq!((origin.from_lsn, origin.count), (Some(33554472), Some(1)));
        assert_eq!(origin.base(), "base_000000010000000000000002");
        // Only part of the set still marks a delta.
        assert!(DeltaOrigin::of_sentinel(br#"{"LSN":1,"DeltaFromLSN":5}"#).is_some());
        // Full backups: no delta fields, or empty ones.
        assert_eq!(DeltaOrigin::of_sentinel(br#"{"LSN":1,"FinishLSN":2}"#), None);
        assert_eq!(DeltaOrigin::of_sentinel(br#"{"LSN":1,"DeltaFrom":null,"DeltaCount":0}"#), None);
    }

    #[test]
    fn tablespace_specs_round_trip() {
        let ts = vec![Tablespace { oid: "16385".into(), location: "/srv/ts/".into() }];
        let s = Sentinel {
            spec: Some(Sentinel::make_spec("/pgdata", &ts)),
            ..serde_json::from_str(r#"{"LSN":1}"#).unwrap()
        };
        assert_eq!(s.tablespaces(), ts);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""link":"pg_tblspc/16385""#), "{json}");
    }

    #[test]
    fn tablespaces_that_would_escape_pg_tblspc_are_left_out() {
        let s: Sentinel = serde_json::from_str(
            r#"{"LSN":1,"Spec":{"tablespaces":["../x","/etc","","16390","16391"],
                "../x":{"loc":"/a/"},"/etc":{"loc":"/b/"},"":{"loc":"/c/"},
                "16390":{"loc":"relative/"},"16391":{"loc":"/d/"}}}"#,
        )
        .unwrap();
        assert_eq!(s.tablespaces(), vec![Tablespace { oid: "16391".into(), location: "/d/".into() }]);
    }
}
