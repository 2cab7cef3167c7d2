//! `wal-rs backup-verify NAME|LATEST`: re-reads every object of a backup and checks every
//! checksum, without writing anything: each partition's stored sha256 and size, each
//! file's sha256 and size inside it, and that the WAL the backup needs to be consistent is
//! in the store. Every problem is collected and reported, not just the first. A store that
//! fails (unreachable, refused credentials, missing bucket) fails the command with the
//! store's exit code: that says nothing about the backup.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;

use super::backup_fetch::{
    get_with_retry, missing_partitions, open_partition, size_mismatch, walg_tar_sets, SharedReader,
};
use super::common::open_store;
use crate::backup::catalog::{self, BackupInfo, Selector};
use crate::backup::extract;
use crate::backup::manifest::{FileEntry, PartitionEntry};
use crate::codec::Sha256;
use crate::config::Config;
use crate::error::Error;
use crate::layout;
use crate::retention::inventory;
use crate::retention::plan::{backup_timeline, wal_name_of, PlanError};
use crate::store::{Store, StoreError};
use crate::wal::{Lsn, SegmentId, TimelineId, WalFileName};

/// Attempts per partition when the download breaks off. Each attempt's GET retries an
/// unavailable store itself, with backoff, within the deadline.
const ATTEMPTS: usize = 3;

/// One thing found wrong.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Problem {
    /// The object (store key) or WAL range.
    pub(super) object: String,
    /// What is wrong.
    pub(super) detail: String,
}

/// What backup-verify found.
#[derive(Debug, serde::Serialize)]
pub(super) struct VerifyReport {
    pub(super) backup: String,
    pub(super) ok: bool,
    /// Whether the backup has a manifest (wal-rs backups do; WAL-G's do not, and are only
    /// checked to decompress and read as tar).
    pub(super) manifest: bool,
    pub(super) partitions: usize,
    pub(super) files: u64,
    pub(super) bytes_stored: u64,
    pub(super) bytes_original: u64,
    pub(super) wal_segments: u64,
    pub(super) problems: Vec<Problem>,
    pub(super) ms: u128,
}

/// Resolves NAME or LATEST to a complete backup.
pub(super) async fn find_backup(store: &Arc<Store>, name: &str) -> Result<BackupInfo, Error> {
    let backups = catalog::list(store).await?;
    let selector =
        if name.eq_ignore_ascii_case("LATEST") { Selector::Latest } else { Selector::Named(name.to_string()) };
    catalog::select(&backups, &selector).cloned().ok_or_else(|| {
        Error::NotFound(format!(
            "no backup {name} in {} ({} complete backups): see `wal-rs backup-list`",
            store.url(),
            backups.len()
        ))
    })
}

pub(super) async fn run(config: &Config, name: &str) -> Result<VerifyReport, Error> {
    let started = Instant::now();
    let store = open_store(config).await?;
    let backup = find_backup(&store, name).await?;
    let (manifest, parts) = super::backup_fetch::partitions_of(&store, &backup).await?;
    let has_manifest = manifest.is_some();
    let mut problems =
        if has_manifest { Vec::new() } else { walg_partition_problems(&store, &backup.name, &parts).await? };
    let (files, bytes_stored, bytes_original) = {
        let store = store.clone();
        let backup_name = backup.name.clone();
        let concurrency = config.backup.concurrency;
        let deadline = config.retry.deadline;
        let handle = tokio::runtime::Handle::current();
        let parts = parts.clone();
        let checked = tokio::task::spawn_blocking(move || {
            check_all(&store, &backup_name, &parts, has_manifest, concurrency, deadline, &handle)
        })
        .await
        .expect("the verify task panicked")?;
        problems.extend(checked.problems);
        (checked.files, checked.bytes_stored, checked.bytes_original)
    };
    let (wal_segments, wal_problems) = check_wal(&store, &backup).await?;
    problems.extend(wal_problems);
    Ok(VerifyReport {
        backup: backup.name,
        ok: problems.is_empty(),
        manifest: has_manifest,
        partitions: parts.len(),
        files,
        bytes_stored,
        bytes_original,
        wal_segments,
        problems,
        ms: started.elapsed().as_millis(),
    })
}

/// A backup without a wal-rs manifest: the partitions WAL-G's `files_metadata.json` lists
/// that the store does not hold (or that file's own damage).
async fn walg_partition_problems(
    store: &Arc<Store>,
    backup: &str,
    parts: &[PartitionEntry],
) -> Result<Vec<Problem>, Error> {
    let sets = match walg_tar_sets(store, backup).await {
        Ok(Some(sets)) => sets,
        Ok(None) => return Ok(Vec::new()),
        Err(Error::Corrupt { key, detail }) => return Ok(vec![Problem { object: key, detail }]),
        Err(e) => return Err(e),
    };
    Ok(missing_partitions(&sets, parts)
        .into_iter()
        .map(|name| Problem {
            object: layout::partition_key(backup, name).to_string(),
            detail: "listed in files_metadata.json but missing from the store: the backup cannot be restored".into(),
        })
        .collect())
}

#[derive(Debug, Default)]
struct Checked {
    files: u64,
    bytes_stored: u64,
    bytes_original: u64,
    problems: Vec<Problem>,
}

/// Checks every partition on `concurrency` threads; the first store failure stops the
/// check and is returned. Blocking.
fn check_all(
    store: &Arc<Store>,
    backup: &str,
    parts: &[PartitionEntry],
    has_manifest: bool,
    concurrency: usize,
    deadline: Duration,
    handle: &tokio::runtime::Handle,
) -> Result<Checked, Error> {
    let next = AtomicUsize::new(0);
    let total = Mutex::new(Checked::default());
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, parts.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(part) = parts.get(i) else { return };
                if failed.lock().unwrap().is_some() {
                    return;
                }
                let one = match check_partition(store, backup, part, has_manifest, deadline, handle) {
                    Ok(one) => one,
                    Err(e) => {
                        failed.lock().unwrap().get_or_insert(e);
                        return;
                    }
                };
                let mut t = total.lock().unwrap();
                t.files += one.files;
                t.bytes_stored += one.bytes_stored;
                t.bytes_original += one.bytes_original;
                t.problems.extend(one.problems);
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let mut total = total.into_inner().unwrap();
    total.problems.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(total)
}

/// Reads one partition to its end: stored bytes hashed, opened, decompressed, every file
/// hashed. Retries a broken download; damage is a problem of the backup, while a store that
/// keeps failing (or refuses) is an error of the command.
fn check_partition(
    store: &Arc<Store>,
    backup: &str,
    part: &PartitionEntry,
    has_manifest: bool,
    deadline: Duration,
    handle: &tokio::runtime::Handle,
) -> Result<Checked, Error> {
    let key = layout::partition_key(backup, &part.name);
    let object = key.to_string();
    let describe = format!("{}/{key}", store.url());
    let problem = |detail: String| {
        Ok(Checked { problems: vec![Problem { object: object.clone(), detail }], ..Default::default() })
    };
    let Some(compression) = layout::partition_compression(&part.name) else {
        return problem("a compression wal-rs cannot read".into());
    };
    let expected: Option<HashMap<String, FileEntry>> =
        has_manifest.then(|| part.files.iter().map(|f| (f.path.clone(), f.clone())).collect());
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let reader = match handle.block_on(get_with_retry("backup-verify", store, &key, &describe, deadline)) {
            Ok(r) => r,
            // Listed in the manifest (or the listing) and gone: the backup is damaged.
            Err(Error::Store(StoreError::NotFound { .. })) => return problem("missing from the store".into()),
            Err(e) => return Err(e),
        };
        if has_manifest && reader.size != part.stored_size {
            return problem(size_mismatch(reader.size, part.stored_size));
        }
        let source = SharedReader::new(reader.body);
        let hashed = source.0.clone();
        // The configured keys refusing the partition is a problem of the configuration, not
        // of the backup, which says nothing about it.
        let stream = open_partition(compression, &key, &describe, source)?;
        let result = stream.and_then(|mut stream| {
            let summary =
                extract::check(&mut stream, expected.as_ref()).map_err(|e| io::Error::other(e.to_string()))?;
            io::copy(&mut stream, &mut io::sink())?;
            Ok(summary)
        });
        let (hasher, stored, source_failure) = {
            let mut s = hashed.lock().unwrap();
            (s.hasher.clone(), s.count, s.failure.take())
        };
        match (result, source_failure) {
            // The store's checksum caught damaged bytes: a problem of the backup.
            (Err(_), Some(f)) if f.checksum_mismatch => return problem(format!("cannot be read: {}", f.detail)),
            // The download broke off: try again; the store's error if it keeps breaking.
            (Err(_), Some(f)) => last = Some(f.into_error(&describe)),
            (Err(e), None) => return problem(format!("cannot be read: {e}")),
            (Ok(summary), _) => {
                let mut out = Checked {
                    files: summary.files,
                    bytes_stored: stored,
                    bytes_original: summary.bytes,
                    problems: summary
                        .problems
                        .into_iter()
                        .map(|detail| Problem { object: object.clone(), detail })
                        .collect(),
                };
                let sha = Sha256(hasher.finalize().into()).to_string();
                if has_manifest && (sha != part.stored_sha256 || stored != part.stored_size) {
                    out.problems.push(Problem {
                        object: object.clone(),
                        detail: format!(
                            "stored sha256 {sha} ({stored} bytes) but the manifest records {} ({} bytes)",
                            part.stored_sha256, part.stored_size
                        ),
                    });
                }
                return Ok(out);
            }
        }
    }
    Err(last.expect("ATTEMPTS is at least one"))
}

/// Checks that every WAL segment from the backup's start to its finish is in the store:
/// without them the backup cannot be made consistent.
async fn check_wal(store: &Arc<Store>, backup: &BackupInfo) -> Result<(u64, Vec<Problem>), Error> {
    let Some(timeline) = backup_timeline(backup) else { return Ok((0, Vec::new())) };
    let Some(segment_size) = wal_segment_size(store, backup).await? else {
        let problem = Problem {
            object: layout::sentinel_key(&backup.name).to_string(),
            detail: format!("its WAL cannot be checked: {}", PlanError::UnknownSegmentSize),
        };
        return Ok((0, vec![problem]));
    };
    let listed = match store.list(&format!("{}/", layout::WAL_DIR)).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let stored = whole_segments(listed.iter().map(|o| o.key.as_str()));
    Ok(missing_wal(backup, timeline, segment_size, &stored))
}

/// The backup's WAL segment size: its sentinel's, `walrs/cluster.json`'s, or read off the
/// backups' names and start LSNs (`retention::inventory`); never assumed.
async fn wal_segment_size(store: &Arc<Store>, backup: &BackupInfo) -> Result<Option<u32>, Error> {
    if let Some(size) = inventory::segment_size(store, std::slice::from_ref(backup)).await? {
        return Ok(Some(size));
    }
    // Its own name and LSN fit several sizes (segment 0 of a log): ask the other backups.
    Ok(inventory::infer_segment_size(&catalog::list(store).await?))
}

/// The whole segments among `keys` (under `wal_005/`): a `.partial` or `.backup` file of a
/// segment is not the segment, and recovery cannot replay it in its place.
fn whole_segments<'a>(keys: impl Iterator<Item = &'a str>) -> HashSet<(TimelineId, SegmentId)> {
    keys.filter_map(wal_name_of)
        .filter_map(|n| match n {
            WalFileName::Segment(t, s) => Some((t, s)),
            _ => None,
        })
        .collect()
}

/// The segments from the backup's start to the record that ends it, and a problem naming
/// those not in `stored`.
fn missing_wal(
    backup: &BackupInfo,
    timeline: TimelineId,
    segment_size: u32,
    stored: &HashSet<(TimelineId, SegmentId)>,
) -> (u64, Vec<Problem>) {
    let s = &backup.sentinel;
    // The record that ends the backup is the byte before its finish LSN.
    let first = SegmentId::containing(Lsn(s.start_lsn), segment_size);
    let last = SegmentId::containing(Lsn(s.finish_lsn.saturating_sub(1).max(s.start_lsn)), segment_size);
    let mut missing = Vec::new();
    let mut needed = 0u64;
    let mut segment = first;
    loop {
        needed += 1;
        if !stored.contains(&(timeline, segment)) {
            missing.push(WalFileName::Segment(timeline, segment).to_string());
        }
        if segment >= last || needed > 1 << 20 {
            break;
        }
        segment = segment.next(segment_size);
    }
    let problems = match (missing.first(), missing.last()) {
        (Some(first), Some(last)) => vec![Problem {
            object: format!("{}/{first}..{last}", layout::WAL_DIR),
            detail: format!(
                "{} of the {} WAL segments the backup needs to be consistent are missing: it cannot be restored",
                missing.len(),
                needed
            ),
        }],
        _ => Vec::new(),
    };
    (needed, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Metadata, ObjectKey, PutMode, PutOptions};
    use std::path::PathBuf;

    fn walg_backup(name: &str, start_lsn: u64, finish_lsn: u64) -> BackupInfo {
        let json = format!(r#"{{"LSN":{start_lsn},"FinishLSN":{finish_lsn},"FinishTime":"2026-11-20T10:00:00Z"}}"#);
        BackupInfo { name: name.into(), sentinel: serde_json::from_str(&json).unwrap() }
    }

    /// A store that fails (a download that breaks off each time, a store that is gone)
    /// fails the command with the store's exit code; it is no problem of the backup.
    #[test]
    fn a_failing_store_fails_the_command_not_the_backup() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let backup = "base_000000010000000000000002";
        let check = |root: PathBuf, part: &str| {
            let store = Arc::new(Store::Local(crate::store::local::LocalStore::new(root)));
            let parts = [PartitionEntry { name: part.into(), ..Default::default() }];
            check_all(&store, backup, &parts, false, 1, Duration::from_secs(1), rt.handle())
        };
        // A folder where the partition should be: it opens, and every read of it fails.
        std::fs::create_dir_all(dir.path().join(layout::partition_key(backup, "part_001.tar").as_str())).unwrap();
        let broken = check(dir.path().to_path_buf(), "part_001.tar").unwrap_err();
        assert!(matches!(broken, Error::Store(StoreError::Unavailable { .. })), "{broken}");
        assert_eq!(crate::exit::code_of(&broken), crate::exit::STORAGE);

        let gone = check(dir.path().join("no-store"), "part_001.tar").unwrap_err();
        assert_eq!(crate::exit::code_of(&gone), crate::exit::STORE_MISSING, "{gone}");

        // Damaged or missing partitions are problems of the backup.
        let key = layout::partition_key(backup, "part_002.tar.lz4");
        std::fs::write(dir.path().join(key.as_str()), b"not lz4").unwrap();
        let damaged = check(dir.path().to_path_buf(), "part_002.tar.lz4").unwrap();
        assert_eq!(damaged.problems.len(), 1, "{:?}", damaged.problems);
        let missing = check(dir.path().to_path_buf(), "part_003.tar.lz4").unwrap();
        assert_eq!(missing.problems[0].detail, "missing from the store");
    }

    /// The configured keys refuse a partition (sealed, no key configured): the command fails
    /// with the key error (exit 14); the backup may well be sound.
    #[test]
    fn a_partition_no_configured_key_opens_fails_the_command() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let backup = "base_000000010000000000000002";
        let key = layout::partition_key(backup, "part_001.tar");
        std::fs::create_dir_all(dir.path().join(key.as_str()).parent().unwrap()).unwrap();
        let sealed =
            crate::crypto::seal_bytes(Some(&crate::crypto::Key::from_bytes([7; 32])), key.as_str(), b"a tar").unwrap();
        std::fs::write(dir.path().join(key.as_str()), sealed).unwrap();
        let store = Arc::new(Store::Local(crate::store::local::LocalStore::new(dir.path().to_path_buf())));
        let parts = [PartitionEntry { name: "part_001.tar".into(), ..Default::default() }];
        let err = check_all(&store, backup, &parts, false, 1, Duration::from_secs(1), rt.handle()).unwrap_err();
        assert_eq!(crate::exit::code_of(&err), crate::exit::KEY, "{err}");
    }

    /// A WAL-G backup whose files_metadata.json lists a partition the store lacks.
    #[test]
    fn a_walg_partition_missing_from_the_store_is_a_problem() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            let backup = "base_000000010000000000000002";
            let metadata =
                br#"{"Files":{},"TarFileSets":{"part_001.tar":["base/1/1259"],"part_002.tar":["backup_label"]}}"#;
            let key = layout::backup_file_key(backup, "files_metadata.json");
            let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
            store.put_bytes(&key, metadata.to_vec(), opts).await.unwrap();
            let part = |name: &str| PartitionEntry { name: name.into(), ..Default::default() };
            let stored = [part("part_002.tar.lz4"), part("pg_control.tar.lz4")];
            let problems = walg_partition_problems(&store, backup, &stored).await.unwrap();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].object, format!("basebackups_005/{backup}/tar_partitions/part_001.tar"));
            let all = [part("part_001.tar.lz4"), part("part_002.tar.lz4"), part("pg_control.tar.lz4")];
            assert!(walg_partition_problems(&store, backup, &all).await.unwrap().is_empty());
            // No files_metadata.json (older WAL-G): nothing to compare with.
            assert!(walg_partition_problems(&store, "base_000000010000000000000004", &stored)
                .await
                .unwrap()
                .is_empty());
        });
    }

    #[test]
    fn backup_and_partial_files_are_not_the_segment() {
        // Segment 3 itself is lost; its .backup and .partial files are there.
        let keys = [
            "wal_005/000000010000000000000002.lz4",
            "wal_005/000000010000000000000003.00000028.backup.lz4",
            "wal_005/000000010000000000000003.partial.zst",
            "wal_005/000000010000000000000004.br",
        ];
        let stored = whole_segments(keys.into_iter());
        let b = walg_backup("base_000000010000000000000002", 0x200_0028, 0x400_0100);
        let (needed, problems) = missing_wal(&b, TimelineId(1), 16 << 20, &stored);
        assert_eq!(needed, 3);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, "wal_005/000000010000000000000003..000000010000000000000003");
        let whole = whole_segments(keys.into_iter().chain(["wal_005/000000010000000000000003.lz4"]));
        assert!(missing_wal(&b, TimelineId(1), 16 << 20, &whole).1.is_empty());
    }

    #[test]
    fn the_wal_check_uses_the_recorded_segment_size() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            let put = |key: &str, bytes: Vec<u8>| {
                let store = store.clone();
                let key = ObjectKey::new(key).unwrap();
                async move {
                    let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
                    store.put_bytes(&key, bytes, opts).await.unwrap();
                }
            };
            let cluster = br#"{"system_identifier":"1","pg_major":15,"wal_segment_size":67108864,"created_by":"t"}"#;
            put("walrs/cluster.json", cluster.to_vec()).await;
            for n in 5..=7 {
                put(&format!("wal_005/00000001000000000000000{n}.lz4"), vec![1]).await;
            }
            // A WAL-G backup from 0/14000028 to 0/1C000100: segments 5 to 7 of 64 MiB.
            let b = walg_backup("base_000000010000000000000005", 0x1400_0028, 0x1C00_0100);
            let (needed, problems) = check_wal(&store, &b).await.unwrap();
            assert_eq!((needed, problems.len()), (3, 0), "{problems:?}");
            // No record, and a name that fits every size: a problem, not a guess.
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            let first = walg_backup("base_000000010000000000000000", 0x28, 0x100);
            let (needed, problems) = check_wal(&store, &first).await.unwrap();
            assert_eq!(needed, 0);
            assert!(problems[0].detail.contains("segment size is unknown"), "{problems:?}");
        });
    }
}
