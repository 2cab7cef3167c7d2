//! `wal-rs backup-fetch DEST NAME|LATEST`: restore a base backup and set up its recovery.
//!
//! DEST must be absent or empty (and so must every tablespace location): nothing already
//! there is ever touched. Partitions are downloaded, decompressed and unpacked in parallel,
//! each file checked against the manifest's sha256; then the recovery settings are written,
//! everything is flushed to disk (`syncfs`), and `global/pg_control` is put in place last,
//! so an interrupted restore can never be started.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256 as Sha256Hasher};

use super::common::{open_store, retry_transient};
use crate::backup::catalog::{self, BackupInfo, Selector};
use crate::backup::extract::{self, ExtractError, ExtractPlan, Found};
use crate::backup::manifest::{FileEntry, Manifest, PartitionEntry};
use crate::codec::{self, Compression, Sha256};
use crate::config::{Config, Source};
use crate::crypto::OpenError;
use crate::error::Error;
use crate::layout;
use crate::log::{self, Level};
use crate::pg::recovery_conf::{self, RecoveryTargets};
use crate::progress::Progress;
use crate::store::{error_chain, is_checksum_mismatch, ObjectKey, ObjectReader, Store, StoreError};
use crate::wal::Lsn;

/// Attempts per partition: a dropped connection mid-partition restarts that partition. Each
/// attempt's GET retries an unavailable store itself, with backoff, within the deadline.
const PARTITION_ATTEMPTS: usize = 3;

/// What backup-fetch was asked.
#[derive(Debug, Clone)]
pub(super) struct FetchArgs {
    pub(super) dest: PathBuf,
    pub(super) backup: Option<String>,
    pub(super) targets: RecoveryTargets,
    pub(super) standby: bool,
    pub(super) tablespace_map: Vec<(String, PathBuf)>,
    pub(super) restore_command: Option<String>,
}

/// What one backup-fetch did.
#[derive(Debug, serde::Serialize)]
pub(super) struct FetchedBackup {
    pub(super) name: String,
    pub(super) partitions: usize,
    pub(super) files: u64,
    pub(super) bytes: u64,
    pub(super) verified: bool,
}

pub(super) async fn run(config: &Config, args: &FetchArgs) -> Result<FetchedBackup, Error> {
    // Refused before the store is asked anything; decided again below, under the lock.
    interrupted_or_empty(&args.dest)?;
    let store = open_store(config).await?;
    let (backups, deltas, unreadable) = catalog::list_readable(&store).await?;
    let selector = selector(args)?;
    if let Selector::Named(name) = &selector {
        // The backup asked for by name is the one whose sentinel is damaged: say that.
        if let Some((_, e)) = unreadable.into_iter().find(|(n, _)| n == name) {
            return Err(e);
        }
    }
    let backup = catalog::select_restorable(&backups, &deltas, &selector)
        .cloned()
        .ok_or_else(|| Error::NotFound(nothing_to_restore(&selector, &store.url(), deltas.len())))?;
    refuse_delta(&backup.name, &deltas)?;
    let (manifest, partitions) = partitions_of(&store, &backup).await?;
    let walg_sets = match &manifest {
        Some(_) => None,
        None => walg_tar_sets(&store, &backup.name).await?,
    };
    match &walg_sets {
        Some(sets) => {
            let missing = missing_partitions(sets, &partitions);
            refuse_missing_partitions(&missing, WALG_FILES_METADATA, &backup.name, &store.url())?
        }
        None if manifest.is_some() => {
            let missing = unstored_partitions(&store, &backup.name, &partitions).await?;
            refuse_missing_partitions(&missing, "the backup's manifest", &backup.name, &store.url())?
        }
        None => {}
    }

    // Tablespace locations are checked before DEST is created for the lock, so that a
    // refused run leaves nothing behind; and again under the lock, which decides.
    tablespace_dirs(&backup, args, interrupted_or_empty(&args.dest)?)?;
    // Held to the end: a second backup-fetch into DEST would take this run's marker for an
    // interrupted restore's and clear the folder under it.
    let _lock = lock_dest(&args.dest)?;
    // A rerun after an interrupted restore starts over in the same folders; anything else
    // already there is never touched.
    let resuming = interrupted_or_empty(&args.dest)?;
    let tablespaces = tablespace_dirs(&backup, args, resuming)?;
    if resuming {
        for dir in std::iter::once(&args.dest).chain(tablespaces.values()) {
            log::emit(
                Level::Warn,
                &[("op", &"backup-fetch"), ("dir", &dir.display()), ("outcome", &"clearing an interrupted restore")],
            );
            clear_dir(dir)?;
        }
    }
    // DEST itself was created by `lock_dest`.
    mark_incomplete(&args.dest)?;
    let tblspc = args.dest.join("pg_tblspc");
    create_dir(&tblspc)?;
    for (oid, dir) in &tablespaces {
        create_dir(dir)?;
        mark_incomplete(dir)?;
        std::os::unix::fs::symlink(dir, tblspc.join(oid)).map_err(|e| Error::local("link", &tblspc.join(oid), e))?;
    }
    let plan = ExtractPlan { dest: args.dest.clone(), tablespaces: tablespaces.clone() };

    let control_name = partitions.iter().position(|p| p.name.starts_with("pg_control.tar"));
    let (control, data): (Vec<_>, Vec<_>) =
        partitions.iter().cloned().enumerate().partition(|(i, _)| Some(*i) == control_name);
    let data: Vec<PartitionEntry> = data.into_iter().map(|(_, p)| p).collect();
    let total: u64 = data.iter().map(|p| p.tar_size).sum();
    let progress = Arc::new(Progress::new("backup-fetch", total));
    let job = RestoreJob {
        store: store.clone(),
        backup: backup.name.clone(),
        plan: plan.clone(),
        verify: manifest.is_some(),
        progress: progress.clone(),
        handle: tokio::runtime::Handle::current(),
        deadline: config.retry.deadline,
    };
    let concurrency = config.backup.concurrency;
    let (job, summary) = tokio::task::spawn_blocking(move || {
        let r = job.restore_all(&data, concurrency);
        (job, r)
    })
    .await
    .expect("the restore task panicked");
    let (files, bytes) = summary?;
    progress.finish();
    require_backup_label(&args.dest, &backup.name, &store.url())?;
    if let Some(sets) = &walg_sets {
        require_listed_files(sets, &plan, &backup.name, &store.url())?;
    }

    rewrite_tablespace_map(&args.dest, &tablespaces)?;
    write_recovery_settings(config, args)?;
    for dir in std::iter::once(&args.dest).chain(tablespaces.values()) {
        extract::sync_filesystem(dir).map_err(|e| Error::local("sync", dir, e))?;
    }
    // pg_control last: until it is there, PostgreSQL refuses to start this directory.
    if let Some((_, control)) = control.into_iter().next() {
        tokio::task::spawn_blocking(move || job.place_pg_control(&control))
            .await
            .expect("the pg_control task panicked")?;
        // Complete: from here on the folders are a restored cluster, never cleared.
        for dir in std::iter::once(&args.dest).chain(tablespaces.values()) {
            let marker = dir.join(INCOMPLETE_MARKER);
            fs::remove_file(&marker).map_err(|e| Error::local("remove", &marker, e))?;
        }
    } else {
        return Err(Error::Corrupt {
            key: format!("{}/{}", store.url(), layout::backup_file_key(&backup.name, "tar_partitions")),
            detail: "the backup has no pg_control partition".into(),
        });
    }
    Ok(FetchedBackup { name: backup.name, partitions: partitions.len(), files, bytes, verified: manifest.is_some() })
}

/// Why no backup matches `selector`. Delta backups, which LATEST and the targets pass over,
/// are counted so that a store holding only deltas is not called empty.
fn nothing_to_restore(selector: &Selector, store: &impl std::fmt::Display, deltas: usize) -> String {
    let passed_over = match deltas {
        0 => String::new(),
        n => format!(" other than WAL-G delta backups ({n}, restored only by WAL-G)"),
    };
    match selector {
        Selector::Named(n) => format!("no complete backup named {n} in {store}: see wal-rs backup-list"),
        Selector::Latest => format!("no complete backup in {store}{passed_over}: run backup-push first"),
        _ => format!(
            "no backup in {store}{passed_over} finished before the recovery target: choose a later target or an older archive"
        ),
    }
}

/// A WAL-G delta backup holds page increments on an earlier backup: unpacked as it is, it
/// would be a damaged cluster that PostgreSQL may well start.
fn refuse_delta(name: &str, deltas: &catalog::Deltas) -> Result<(), Error> {
    match deltas.get(name) {
        None => Ok(()),
        Some(origin) => Err(Error::Usage(format!(
            "{name} is a WAL-G delta backup (delta from {}): restore it with WAL-G, or fetch a full backup",
            origin.base()
        ))),
    }
}

/// A base backup restores into a cluster only with its `backup_label`: without it PostgreSQL
/// would start replay from pg_control's (later) checkpoint and silently miss changes. It is
/// missing when the partition holding it is (another tool's backups are restored from the
/// store listing) or ends early (tar takes an end of stream at a header for the end of the
/// archive). WAL-G writes it into its last partition: a missing data partition is caught by
/// [`refuse_missing_partitions`] instead.
fn require_backup_label(dest: &Path, name: &str, store_url: &str) -> Result<(), Error> {
    let label = dest.join("backup_label");
    let present = fs::symlink_metadata(&label).is_ok_and(|m| m.file_type().is_file() && m.len() > 0);
    if present {
        return Ok(());
    }
    Err(Error::Corrupt {
        key: format!("{store_url}/{}/{name}", layout::BACKUP_DIR),
        detail: format!(
            "the restore of {name} has no backup_label (a partition is missing or cut short), so {} was left unstartable",
            dest.display()
        ),
    })
}

fn selector(args: &FetchArgs) -> Result<Selector, Error> {
    match args.backup.as_deref() {
        Some(name) if name != "LATEST" => return Ok(Selector::Named(name.to_string())),
        _ => {}
    }
    if let Some(t) = &args.targets.time {
        return parse_target_time(t).map(Selector::BeforeTime);
    }
    if let Some(l) = &args.targets.lsn {
        return l.parse::<Lsn>().map(Selector::BeforeLsn).map_err(|e| Error::Usage(format!("--target-lsn: {e}")));
    }
    Ok(Selector::Latest)
}

/// Parses a recovery target time: RFC 3339, or PostgreSQL's `YYYY-MM-DD HH:MM:SS[.f][+TZ]`
/// (UTC when no zone is given).
pub(super) fn parse_target_time(text: &str) -> Result<time::OffsetDateTime, Error> {
    let mut s = text.trim().replacen(' ', "T", 1);
    let tail = s.rfind(['+', '-']).filter(|i| *i > 10).map(|i| s[i..].to_string());
    match tail {
        Some(zone) if zone.len() == 3 => s.push_str(":00"),
        Some(_) => {}
        None if s.ends_with('Z') => {}
        None => s.push('Z'),
    }
    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| Error::Usage(format!("--target-time {text:?}: use 'YYYY-MM-DD HH:MM:SS+00' or RFC 3339")))
}

/// `YYYY-MM-DD HH:MM:SS.ffffff+00`, in UTC, as PostgreSQL reads a timestamptz.
fn postgres_utc_time(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// The manifest (wal-rs backups) and the partitions to restore, `pg_control` last.
pub(super) async fn partitions_of(
    store: &Arc<Store>,
    backup: &BackupInfo,
) -> Result<(Option<Manifest>, Vec<PartitionEntry>), Error> {
    if backup.sentinel.manifest.is_some() {
        let manifest = crate::backup::manifest::load_manifest(store, &backup.name).await?;
        let parts = manifest.partitions.clone();
        return Ok((Some(manifest), parts));
    }
    // Written by another tool: restore what is there, unverified.
    let mut parts = stored_partitions(store, &backup.name).await?;
    parts.sort_by_key(|p| (p.name.starts_with("pg_control"), p.name.clone()));
    Ok((None, parts))
}

/// The partitions the store holds for backup `name` (names and stored sizes), in no order.
async fn stored_partitions(store: &Arc<Store>, name: &str) -> Result<Vec<PartitionEntry>, Error> {
    let prefix = format!("{}/{name}/tar_partitions/", layout::BACKUP_DIR);
    Ok(store
        .list(&prefix)
        .await?
        .into_iter()
        .map(|o| PartitionEntry { name: o.key.file_name().to_string(), stored_size: o.size, ..Default::default() })
        .collect())
}

/// The partitions a wal-rs backup's manifest lists (`listed`) that the store does not hold.
async fn unstored_partitions<'a>(
    store: &Arc<Store>,
    backup: &str,
    listed: &'a [PartitionEntry],
) -> Result<Vec<&'a str>, Error> {
    let stored: std::collections::HashSet<String> =
        stored_partitions(store, backup).await?.into_iter().map(|p| p.name).collect();
    Ok(listed.iter().map(|p| p.name.as_str()).filter(|n| !stored.contains(*n)).collect())
}

/// WAL-G's record of what went into each partition: `TarFileSets` of `files_metadata.json`,
/// each partition's name (without its compression extension) and the paths in it.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct WalgTarSets {
    #[serde(rename = "TarFileSets", default)]
    pub(super) sets: std::collections::BTreeMap<String, Vec<String>>,
    /// `Files`: the files WAL-G opened and packed. A file is put in `TarFileSets` before it
    /// is opened, and one deleted in between (a table dropped during the backup) stays
    /// listed there but not here, and is rightly not in the partition.
    #[serde(rename = "Files", default)]
    pub(super) files: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

/// The file WAL-G writes beside a backup's partitions.
const WALG_FILES_METADATA: &str = "files_metadata.json";

/// `files_metadata.json` of a backup without a wal-rs manifest; `None` when the backup has
/// none (older WAL-G versions).
pub(super) async fn walg_tar_sets(store: &Arc<Store>, backup: &str) -> Result<Option<WalgTarSets>, Error> {
    let key = layout::backup_file_key(backup, WALG_FILES_METADATA);
    let bytes = match store.get_bytes(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Corrupt {
        key: format!("{}/{key}", store.url()),
        detail: format!("not WAL-G's {WALG_FILES_METADATA}: {e}"),
    })
}

/// The partitions `sets` lists that are not among `stored` (`part_001.tar` stored as
/// `part_001.tar.lz4`, say), by their listed name.
pub(super) fn missing_partitions<'a>(sets: &'a WalgTarSets, stored: &[PartitionEntry]) -> Vec<&'a str> {
    let is_stored = |listed: &str| {
        stored.iter().any(|p| match p.name.strip_prefix(listed) {
            Some(ext) => ext.is_empty() || (ext.starts_with('.') && !ext[1..].contains('.')),
            None => false,
        })
    };
    sets.sets.keys().map(String::as_str).filter(|listed| !is_stored(listed)).collect()
}

/// Fails when partitions the backup records (in `listed_by`: WAL-G's `files_metadata.json`
/// or wal-rs's manifest) are `missing` from the store: the backup is damaged (exit 10), and
/// this is known before anything is written. Restored without them, a WAL-G cluster would
/// lack its files and still start (its `backup_label` is elsewhere).
fn refuse_missing_partitions(missing: &[&str], listed_by: &str, backup: &str, store_url: &str) -> Result<(), Error> {
    let Some(first) = missing.first() else { return Ok(()) };
    Err(Error::Corrupt {
        key: format!("{store_url}/{}", layout::partition_key(backup, first)),
        detail: format!(
            "{listed_by} lists {} partition(s) the store does not hold ({}): nothing was restored; restore another backup",
            missing.len(),
            missing.join(", ")
        ),
    })
}

/// Fails when a file WAL-G packed into a data partition was not restored (a partition cut
/// short at an end-of-archive block). Only files in both `TarFileSets` and `Files` count:
/// folders are not in `Files`, nor are files that vanished before WAL-G could open them.
/// `pg_control`'s partition is placed later and skipped.
fn require_listed_files(sets: &WalgTarSets, plan: &ExtractPlan, backup: &str, store_url: &str) -> Result<(), Error> {
    let data_sets = sets.sets.iter().filter(|(name, _)| !name.starts_with("pg_control"));
    for (partition, paths) in data_sets {
        for path in paths.iter().filter(|p| sets.files.contains_key(p.as_str())) {
            let Some(target) = plan.target_of(path).ok().flatten() else { continue };
            if fs::symlink_metadata(&target).is_err() {
                return Err(Error::Corrupt {
                    key: format!("{store_url}/{}", layout::partition_key(backup, partition)),
                    detail: format!(
                        "{path}, which {WALG_FILES_METADATA} lists in {partition}, was not restored (the partition is missing or cut short)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Where each tablespace of `backup` is restored: as backed up, or remapped by
/// `--tablespace-map`. Each must be absent or empty, or, when `resuming`, hold an
/// interrupted restore's marker. Touches nothing.
fn tablespace_dirs(backup: &BackupInfo, args: &FetchArgs, resuming: bool) -> Result<HashMap<String, PathBuf>, Error> {
    let remap: HashMap<&str, &PathBuf> = args.tablespace_map.iter().map(|(o, p)| (o.as_str(), p)).collect();
    let mut tablespaces = HashMap::new();
    for ts in backup.sentinel.tablespaces() {
        // WAL-G's spec records locations with a trailing '/'; the link must be the path as
        // the primary had it, since pg_tablespace_location (and pg_dumpall) report it.
        let original = match ts.location.trim_end_matches('/') {
            "" => "/",
            trimmed => trimmed,
        };
        let dir = remap.get(ts.oid.as_str()).map(|p| (*p).clone()).unwrap_or_else(|| PathBuf::from(original));
        if !(resuming && dir.join(INCOMPLETE_MARKER).exists()) {
            refuse_non_empty(&dir)?;
        }
        tablespaces.insert(ts.oid.clone(), dir);
    }
    for oid in remap.keys() {
        if !tablespaces.contains_key(*oid) {
            return Err(Error::Usage(format!(
                "--tablespace-map {oid}=...: backup {} has no tablespace {oid}",
                backup.name
            )));
        }
    }
    Ok(tablespaces)
}

/// Written into DEST (and each tablespace folder) before anything else, removed once
/// `global/pg_control` is in place: it marks folders a rerun may clear and restore again.
const INCOMPLETE_MARKER: &str = ".walrs-restore-incomplete";

/// Whether DEST holds a restore by wal-rs that never finished: the marker, and no
/// `global/pg_control` (a folder with pg_control is a cluster and is never cleared).
fn is_interrupted_restore(dest: &Path) -> bool {
    dest.join(INCOMPLETE_MARKER).is_file() && !dest.join("global/pg_control").exists()
}

/// Whether DEST holds an interrupted restore to clear; refuses a folder with anything else.
fn interrupted_or_empty(dest: &Path) -> Result<bool, Error> {
    if is_interrupted_restore(dest) {
        return Ok(true);
    }
    refuse_non_empty(dest)?;
    Ok(false)
}

/// Creates DEST if need be and locks it (`flock` on the folder itself: it outlives a clear,
/// adds nothing to the data directory, and is released when the process ends, however).
/// A second backup-fetch into DEST is refused at once.
fn lock_dest(dest: &Path) -> Result<fs::File, Error> {
    create_dir(dest)?;
    let dir = fs::File::open(dest).map_err(|e| Error::local("open", dest, e))?;
    match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(dir),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::InvalidInput {
            path: dest.display().to_string(),
            reason: "another backup-fetch is restoring into this folder; nothing was touched: wait for it to \
                     finish, or stop it and run again"
                .into(),
        }),
        Err(e) => Err(Error::local("lock", dest, e.into())),
    }
}

fn mark_incomplete(dir: &Path) -> Result<(), Error> {
    let marker = dir.join(INCOMPLETE_MARKER);
    fs::write(&marker, b"a wal-rs backup-fetch that has not finished; a rerun clears this folder\n")
        .map_err(|e| Error::local("write", &marker, e))
}

/// Removes everything inside `dir` (not `dir` itself, which may be a mount point) but the
/// marker, which stays: a clear killed halfway leaves a folder a rerun still clears.
fn clear_dir(dir: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::local("read", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::local("read", dir, e))?;
        if entry.file_name() == INCOMPLETE_MARKER {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(|e| Error::local("remove", &path, e))?;
    }
    Ok(())
}

fn refuse_non_empty(dir: &Path) -> Result<(), Error> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                Err(Error::InvalidInput {
                    path: dir.display().to_string(),
                    reason:
                        "the directory is not empty; nothing in it was touched: restore into an empty or new directory"
                            .into(),
                })
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(Error::InvalidInput { path: dir.display().to_string(), reason: "exists and is not a directory".into() })
        }
        Err(e) => Err(Error::local("read", dir, e)),
    }
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::local("create", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::local("chmod", dir, e))
}

struct RestoreJob {
    store: Arc<Store>,
    backup: String,
    plan: ExtractPlan,
    verify: bool,
    progress: Arc<Progress>,
    handle: tokio::runtime::Handle,
    /// How long one GET may keep retrying an unavailable store (`retry_deadline_secs`).
    deadline: Duration,
}

impl RestoreJob {
    /// Restores the data partitions with `concurrency` threads. Blocking.
    fn restore_all(&self, parts: &[PartitionEntry], concurrency: usize) -> Result<(u64, u64), Error> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let totals = Mutex::new((0u64, 0u64));
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..concurrency.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= parts.len() || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    match self.restore_partition(&parts[i], &self.plan) {
                        Ok(s) => {
                            let mut t = totals.lock().unwrap();
                            t.0 += s.files;
                            t.1 += s.bytes;
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap() {
            Some(e) => Err(e),
            None => Ok(totals.into_inner().unwrap()),
        }
    }

    /// Downloads and unpacks one partition, retrying when the download breaks off.
    fn restore_partition(&self, part: &PartitionEntry, plan: &ExtractPlan) -> Result<extract::ExtractSummary, Error> {
        let key = layout::partition_key(&self.backup, &part.name);
        let describe = format!("{}/{key}", self.store.url());
        let compression =
            layout::partition_compression(&part.name).ok_or_else(|| Error::Unsupported { key: describe.clone() })?;
        let expected: Option<HashMap<String, FileEntry>> =
            self.verify.then(|| part.files.iter().map(|f| (f.path.clone(), f.clone())).collect());
        let mut last = None;
        for attempt in 1..=PARTITION_ATTEMPTS {
            // An unreachable store is retried with backoff; what is still failing at the
            // deadline is the store's error as it is (exit 7, 8, 9...), never "corrupt".
            let get = get_with_retry("backup-fetch", &self.store, &key, &describe, self.deadline);
            let reader = self.handle.block_on(get)?;
            if self.verify && reader.size != part.stored_size {
                return Err(Error::Corrupt { key: describe, detail: size_mismatch(reader.size, part.stored_size) });
            }
            let source = SharedReader::new(reader.body);
            let shared = source.0.clone();
            let stream = open_partition(compression, &key, &describe, source)?;
            let result = stream.map_err(|e| ExtractError::Bad(e.to_string())).and_then(|mut stream| {
                let summary = extract::extract(&mut stream, plan, expected.as_ref())?;
                // Read to the end so the stored bytes are hashed whole.
                io::copy(&mut stream, &mut io::sink()).map_err(|e| ExtractError::Bad(e.to_string()))?;
                Ok(summary)
            });
            match result {
                Ok(summary) => {
                    let h = shared.lock().unwrap();
                    let sha = Sha256(h.hasher.clone().finalize().into()).to_string();
                    if self.verify && (sha != part.stored_sha256 || h.count != part.stored_size) {
                        return Err(Error::Corrupt {
                            key: describe,
                            detail: format!(
                                "stored sha256 {sha} ({} bytes) but the manifest records {} ({} bytes)",
                                h.count, part.stored_sha256, part.stored_size
                            ),
                        });
                    }
                    self.progress.add(part.tar_size);
                    return Ok(summary);
                }
                Err(ExtractError::Local { path, source }) => return Err(Error::LocalIo { op: "write", path, source }),
                Err(ExtractError::Bad(detail)) => {
                    let error = match shared.lock().unwrap().failure.take() {
                        // The store's checksum caught damaged bytes: another read gets the same.
                        Some(f) if f.checksum_mismatch => return Err(f.into_error(&describe)),
                        // The download broke off: the store failed, not the content.
                        Some(f) => f.into_error(&describe),
                        None => Error::Corrupt { key: describe.clone(), detail },
                    };
                    log::emit(
                        Level::Warn,
                        &[("op", &"backup-fetch"), ("partition", &part.name), ("attempt", &attempt), ("error", &error)],
                    );
                    last = Some(error);
                }
            }
        }
        Err(last.expect("PARTITION_ATTEMPTS is at least one"))
    }

    /// Unpacks the pg_control partition beside DEST, then moves `global/pg_control` into
    /// place durably. Blocking.
    fn place_pg_control(&self, part: &PartitionEntry) -> Result<(), Error> {
        let staging = self.plan.dest.join(".walrs-pg_control");
        let _ = fs::remove_dir_all(&staging);
        let staged_plan = ExtractPlan { dest: staging.clone(), tablespaces: HashMap::new() };
        self.restore_partition(part, &staged_plan)?;
        let from = staging.join("global/pg_control");
        let global = real_global_dir(&self.plan.dest)?;
        let to = global.join("pg_control");
        let file = fs::File::open(&from).map_err(|e| Error::local("open", &from, e))?;
        file.sync_all().map_err(|e| Error::local("fsync", &from, e))?;
        fs::rename(&from, &to).map_err(|e| Error::local("rename into", &to, e))?;
        for dir in [global, self.plan.dest.clone()] {
            fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::local("fsync", &dir, e))?;
        }
        fs::remove_dir_all(&staging).map_err(|e| Error::local("remove", &staging, e))?;
        Ok(())
    }
}

/// What a stored size that is not the manifest's says (checked before the download).
pub(super) fn size_mismatch(stored: u64, recorded: u64) -> String {
    format!("the store holds {stored} bytes but the manifest records {recorded}")
}

/// `codec::decompressor` over a partition's stored bytes. The configured keys refusing the
/// partition (no key opens it, or it is not encrypted while encryption is required), which
/// the decompressor passes on inside its io::Error, is the command's error: exit 14 as for
/// wal-fetch, not damage, and not worth another attempt. Any other failure is returned for
/// the caller to judge.
pub(super) fn open_partition<R: Read + Send + 'static>(
    compression: Compression,
    key: &ObjectKey,
    describe: &str,
    source: R,
) -> Result<io::Result<Box<dyn Read + Send>>, Error> {
    let stream = codec::decompressor(compression, key, source);
    let refused = stream.as_ref().err().and_then(|e| e.get_ref()?.downcast_ref::<OpenError>());
    match refused {
        Some(OpenError::Source(_) | OpenError::BadHeader(_)) | None => Ok(stream),
        Some(refused) => Err(Error::Key { key: describe.to_string(), detail: refused.to_string() }),
    }
}

/// `key` from the store, retried with backoff (`retry_transient`, as wal-fetch does) while
/// the store is unavailable, within `deadline`; any other failure is returned at once.
pub(super) async fn get_with_retry(
    op: &str,
    store: &Arc<Store>,
    key: &ObjectKey,
    describe: &str,
    deadline: Duration,
) -> Result<ObjectReader, Error> {
    retry_transient(op, &describe, deadline, || async move { store.get(key).await.map_err(Error::from) }).await
}

/// How the store's side of a read failed, kept by the reader that hashes the stored bytes:
/// the decompressor above it passes on only a message, which cannot tell a download that
/// broke off from damaged content.
#[derive(Debug)]
pub(super) struct ReadFailure {
    pub(super) detail: String,
    /// The S3 SDK found the bytes differ from the checksum stored with them.
    pub(super) checksum_mismatch: bool,
}

impl ReadFailure {
    pub(super) fn of(e: &io::Error) -> ReadFailure {
        ReadFailure { detail: error_chain(e), checksum_mismatch: is_checksum_mismatch(e) }
    }

    /// A damaged object when the store's checksum caught it, else the store failing (exit 7).
    pub(super) fn into_error(self, describe: &str) -> Error {
        if self.checksum_mismatch {
            Error::Corrupt { key: describe.to_string(), detail: self.detail }
        } else {
            Error::Store(StoreError::Unavailable { op: "read", key: describe.to_string(), detail: self.detail })
        }
    }
}

/// Hashes and counts the stored bytes as the decompressor reads them, and keeps how the
/// store's side of a read failed (backup-fetch and backup-verify).
pub(super) struct HashingReader {
    inner: Box<dyn Read + Send>,
    pub(super) hasher: Sha256Hasher,
    pub(super) count: u64,
    pub(super) failure: Option<ReadFailure>,
}

/// A [`HashingReader`] the decompressor owns while the caller keeps a handle to its result.
pub(super) struct SharedReader(pub(super) Arc<Mutex<HashingReader>>);

impl SharedReader {
    pub(super) fn new(inner: Box<dyn Read + Send>) -> SharedReader {
        SharedReader(Arc::new(Mutex::new(HashingReader {
            inner,
            hasher: Sha256Hasher::new(),
            count: 0,
            failure: None,
        })))
    }
}

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut h = self.0.lock().unwrap();
        let n = match h.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    h.failure.get_or_insert_with(|| ReadFailure::of(&e));
                }
                return Err(e);
            }
        };
        h.hasher.update(&buf[..n]);
        h.count += n as u64;
        Ok(n)
    }
}

/// `DEST/global`, made when the backup had none, which must be a real folder: pg_control
/// moved through a link restored from the backup would land outside DEST (in the live
/// cluster's `global`, on the primary's host).
fn real_global_dir(dest: &Path) -> Result<PathBuf, Error> {
    let global = dest.join("global");
    match fs::symlink_metadata(&global) {
        Ok(m) if m.file_type().is_dir() => Ok(global),
        Ok(_) => Err(Error::InvalidInput {
            path: global.display().to_string(),
            reason: "the backup restored it as a link or a file, not a folder: pg_control was not put in place; \
                     restore another backup"
                .into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new().mode(0o700).create(&global).map_err(|e| Error::local("create", &global, e))?;
            Ok(global)
        }
        Err(e) => Err(Error::local("inspect", &global, e)),
    }
}

/// Reads a file DEST's restore carries, never through a symbolic link: a link is logged,
/// treated as absent, and later replaced by the file wal-rs writes.
pub(super) fn read_restored(path: &Path, op: &str) -> Result<Option<String>, Error> {
    match extract::read_without_following(path).map_err(|e| Error::local("read", path, e))? {
        Found::Text(text) => Ok(Some(text)),
        Found::Nothing => Ok(None),
        Found::Link => {
            log::emit(
                Level::Warn,
                &[
                    ("op", &op),
                    ("file", &path.display()),
                    (
                        "outcome",
                        &"a symbolic link in the backup: not read through; replaced or removed, never followed",
                    ),
                ],
            );
            Ok(None)
        }
    }
}

/// Writes a file into DEST's restore without following a link there.
pub(super) fn write_restored(path: &Path, contents: &[u8]) -> Result<(), Error> {
    extract::replace_file(path, contents).map_err(|e| Error::local("write", path, e))
}

/// Points `tablespace_map` at the restored locations: PostgreSQL recreates the links from
/// it when it starts from a backup label. A linked map is removed: PostgreSQL would read
/// it through the link, and the links wal-rs made in `pg_tblspc` are the right ones.
fn rewrite_tablespace_map(dest: &Path, tablespaces: &HashMap<String, PathBuf>) -> Result<(), Error> {
    let path = dest.join("tablespace_map");
    let Some(text) = read_restored(&path, "backup-fetch")? else {
        if extract::is_symlink(&path) {
            fs::remove_file(&path).map_err(|e| Error::local("remove", &path, e))?;
        }
        return Ok(());
    };
    let mut out = String::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some((oid, _)) if tablespaces.contains_key(oid) => {
                out.push_str(&format!("{oid} {}\n", tablespaces[oid].display()));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    write_restored(&path, out.as_bytes())
}

/// `restore_command` and the targets in postgresql.auto.conf, and the signal file.
fn write_recovery_settings(config: &Config, args: &FetchArgs) -> Result<(), Error> {
    let command = args.restore_command.clone().unwrap_or_else(|| restore_command(config));
    let mut targets = args.targets.clone();
    if let Some(text) = &targets.time {
        // As the backup was chosen: a time without a zone is UTC here, and PostgreSQL would
        // read it in the server's TimeZone, another moment.
        targets.time = Some(postgres_utc_time(parse_target_time(text)?));
    }
    if args.standby {
        // A standby follows the archive; targets end recovery, which a standby never does.
        targets = RecoveryTargets { timeline: targets.timeline, ..Default::default() };
    }
    let auto = args.dest.join("postgresql.auto.conf");
    let current = read_restored(&auto, "backup-fetch")?.unwrap_or_default();
    let text = recovery_conf::rewrite_auto_conf(&current, &command, &targets);
    write_restored(&auto, text.as_bytes())?;
    let (wanted, other) =
        if args.standby { ("standby.signal", "recovery.signal") } else { ("recovery.signal", "standby.signal") };
    write_restored(&args.dest.join(wanted), b"")?;
    remove_other_signal(&args.dest.join(other))
}

/// Removes the signal file not asked for (the link itself if it is one, never its target):
/// one from the backup (older WAL-G versions keep `standby.signal`) would win over the one
/// written, and `standby.signal` keeps PostgreSQL a standby for good.
fn remove_other_signal(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => {
            log::emit(
                Level::Warn,
                &[("op", &"backup-fetch"), ("file", &path.display()), ("outcome", &"from the backup: removed")],
            );
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::local("remove", path, e)),
    }
}

/// `wal-rs wal-fetch %f %p` with the same store settings as this run. Credentials are never
/// written: the server finds them the way wal-rs did (environment, profile, instance role).
/// Every `%` of a path or value is doubled: PostgreSQL replaces `%f`, `%p` and `%r` anywhere
/// in the command, and from version 16 refuses any other `%` (a store URL with `%20`).
fn restore_command(config: &Config) -> String {
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "wal-rs".into());
    let literal = |s: &str| shell_quote(s).replace('%', "%%");
    let mut parts = vec![literal(&exe)];
    if let Some(file) = &config.file {
        parts.push("--config".into());
        parts.push(literal(&absolute(file).display().to_string()));
    }
    const CARRIED: &[&str] = &[
        "store",
        "s3_region",
        "s3_endpoint",
        "s3_path_style",
        "retry_deadline_secs",
        "retry_attempts",
        "request_timeout_secs",
        "log_level",
        // Where the keys are, never a key: WALRS_ENCRYPTION_KEY must be in the server's
        // environment.
        "encryption_key_file",
        "encryption_allow_plaintext",
    ];
    for (setting, value, source) in &config.report {
        let Some(value) = value else {
            continue;
        };
        let is_path = PATH_SETTINGS.contains(&setting.key);
        let relative_path = is_path && Path::new(value).is_relative();
        // The config file, carried above, gives its own settings, except a relative path,
        // which wal-fetch would resolve from the data directory.
        let carried_by_file = matches!(source, Source::File(_)) && !relative_path;
        if !CARRIED.contains(&setting.key) || matches!(source, Source::Default) || carried_by_file {
            continue;
        }
        let value = if is_path { absolute(Path::new(value)).display().to_string() } else { value.clone() };
        parts.push(format!("--set {}", literal(&format!("{}={value}", setting.key))));
    }
    parts.push("wal-fetch %f %p".into());
    parts.join(" ")
}

/// Settings that are paths on this host.
const PATH_SETTINGS: &[&str] = &["encryption_key_file"];

/// `path` from the current directory: PostgreSQL runs restore_command in the data
/// directory, where a relative path means something else.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn shell_quote(s: &str) -> String {
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::link_to_x;

    #[test]
    fn target_times_in_postgres_and_rfc3339_forms() {
        let a = parse_target_time("2026-11-26 10:00:00+00").unwrap();
        let b = parse_target_time("2026-11-26T10:00:00Z").unwrap();
        let c = parse_target_time("2026-11-26 10:00:00").unwrap();
        let d = parse_target_time("2026-11-26 12:00:00.5+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(d > a);
        assert!(parse_target_time("yesterday").is_err());
        // Written for PostgreSQL in UTC, whatever the server's TimeZone.
        assert_eq!(postgres_utc_time(c), "2026-11-26 10:00:00.000000+00");
        assert_eq!(postgres_utc_time(d), "2026-11-26 10:00:00.500000+00");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/usr/bin/wal-rs"), "/usr/bin/wal-rs");
        assert_eq!(shell_quote("store=s3://b/p"), "store=s3://b/p");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
    }

    #[test]
    fn a_percent_in_the_restore_command_reaches_wal_fetch_as_it_is() {
        let mut overrides = crate::config::Overrides::default();
        overrides.values.insert("store".into(), "s3://bucket/with%20space/%p".into());
        let config = Config::resolve(&overrides, &crate::config::ProcessEnv).unwrap();
        let command = restore_command(&config);
        assert!(command.contains("'store=s3://bucket/with%%20space/%%p'"), "{command}");
        // Only PostgreSQL's own placeholders stay single.
        assert_eq!(command.replace("%%", "").matches('%').count(), 2, "{command}");
        assert!(command.ends_with(" wal-fetch %f %p"), "{command}");
    }

    fn fetch_args(dest: &Path) -> FetchArgs {
        FetchArgs {
            dest: dest.to_path_buf(),
            backup: None,
            targets: RecoveryTargets::default(),
            standby: false,
            tablespace_map: Vec::new(),
            restore_command: Some("wal-rs wal-fetch %f %p".into()),
        }
    }

    fn is_regular(path: &Path) -> bool {
        fs::symlink_metadata(path).unwrap().file_type().is_file()
    }

    /// Links the backup restored (or a tampered store planted) are replaced, never written
    /// or read through.
    #[test]
    fn recovery_settings_replace_links_from_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("data");
        fs::create_dir(&dest).unwrap();
        let signal = link_to_x(dir.path(), "outside_signal", &dest.join("recovery.signal"));
        let auto = link_to_x(dir.path(), "outside_auto", &dest.join("postgresql.auto.conf"));
        let map = link_to_x(dir.path(), "outside_map", &dest.join("tablespace_map"));
        let config = Config::resolve(&crate::config::Overrides::default(), &crate::config::ProcessEnv).unwrap();

        rewrite_tablespace_map(&dest, &HashMap::from([("16385".to_string(), PathBuf::from("/ts"))])).unwrap();
        write_recovery_settings(&config, &fetch_args(&dest)).unwrap();

        for outside in [&signal, &auto, &map] {
            assert_eq!(fs::read_to_string(outside).unwrap(), "x", "{} was written through", outside.display());
        }
        assert!(is_regular(&dest.join("recovery.signal")));
        assert_eq!(fs::read_to_string(dest.join("recovery.signal")).unwrap(), "");
        assert!(is_regular(&dest.join("postgresql.auto.conf")));
        let text = fs::read_to_string(dest.join("postgresql.auto.conf")).unwrap();
        assert!(text.contains("restore_command = 'wal-rs wal-fetch %f %p'"), "{text}");
        assert!(!text.lines().any(|l| l.trim() == "x"), "read through the link: {text}");
        assert!(fs::symlink_metadata(dest.join("tablespace_map")).is_err(), "a linked tablespace_map stays");
    }

    /// PostgreSQL stays a standby while `standby.signal` is there, whatever else is: one
    /// carried in the backup (older WAL-G keeps it) must not outlive a restore asked to end
    /// recovery, nor the other way round. A link is removed itself, never followed.
    #[test]
    fn the_signal_not_asked_for_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("data");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("standby.signal"), "").unwrap();
        let config = Config::resolve(&crate::config::Overrides::default(), &crate::config::ProcessEnv).unwrap();

        write_recovery_settings(&config, &fetch_args(&dest)).unwrap();
        assert!(fs::symlink_metadata(dest.join("standby.signal")).is_err(), "standby.signal was left");
        assert!(is_regular(&dest.join("recovery.signal")));

        fs::remove_file(dest.join("recovery.signal")).unwrap();
        let outside = link_to_x(dir.path(), "outside_signal", &dest.join("recovery.signal"));
        write_recovery_settings(&config, &FetchArgs { standby: true, ..fetch_args(&dest) }).unwrap();
        assert!(fs::symlink_metadata(dest.join("recovery.signal")).is_err(), "the linked recovery.signal was left");
        assert_eq!(fs::read_to_string(&outside).unwrap(), "x", "removed through the link");
        assert!(is_regular(&dest.join("standby.signal")));
    }

    /// The marker is what lets a rerun clear the folder: a clear that is killed halfway
    /// must leave it, or the folder is refused for good.
    #[test]
    fn clearing_an_interrupted_restore_keeps_its_marker() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "z", INCOMPLETE_MARKER] {
            fs::write(dir.path().join(name), "x").unwrap();
        }
        fs::create_dir_all(dir.path().join("base/1")).unwrap();
        fs::write(dir.path().join("base/1/1259"), "x").unwrap();
        clear_dir(dir.path()).unwrap();
        let left: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, [INCOMPLETE_MARKER]);
        assert!(is_interrupted_restore(dir.path()));
    }

    #[test]
    fn a_regular_tablespace_map_is_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tablespace_map"), "16385 /old/ts\n16390 /kept\n").unwrap();
        rewrite_tablespace_map(dir.path(), &HashMap::from([("16385".to_string(), PathBuf::from("/new/ts"))])).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("tablespace_map")).unwrap(), "16385 /new/ts\n16390 /kept\n");
    }

    #[test]
    fn pg_control_goes_only_into_a_real_global_folder() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("data");
        fs::create_dir(&dest).unwrap();
        // Absent: made. A folder: used.
        assert_eq!(real_global_dir(&dest).unwrap(), dest.join("global"));
        assert_eq!(real_global_dir(&dest).unwrap(), dest.join("global"));
        // A link (to the live cluster's global, say): refused.
        fs::remove_dir(dest.join("global")).unwrap();
        let live = dir.path().join("live_global");
        fs::create_dir(&live).unwrap();
        std::os::unix::fs::symlink(&live, dest.join("global")).unwrap();
        let err = real_global_dir(&dest).unwrap_err().to_string();
        assert!(err.contains("global") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn a_restore_without_backup_label_fails() {
        let dir = tempfile::tempdir().unwrap();
        let label = dir.path().join("backup_label");
        let check = || require_backup_label(dir.path(), "base_000000010000000000000002", "file:///store");
        let err = check().unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("the restore of base_000000010000000000000002 has no backup_label"), "{err}");
        // Empty (cut short), or a link: no label either.
        fs::write(&label, "").unwrap();
        assert!(check().is_err());
        fs::remove_file(&label).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "START WAL LOCATION: 0/2000028\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &label).unwrap();
        assert!(check().is_err());
        fs::remove_file(&label).unwrap();
        fs::write(&label, "START WAL LOCATION: 0/2000028\n").unwrap();
        check().unwrap();
    }

    #[test]
    fn a_walg_delta_backup_is_refused_by_name() {
        let deltas = catalog::Deltas::from([(
            "base_000000010000000000000004".to_string(),
            crate::backup::sentinel::DeltaOrigin {
                from: Some("base_000000010000000000000002".into()),
                ..Default::default()
            },
        )]);
        refuse_delta("base_000000010000000000000002", &deltas).unwrap();
        let err = refuse_delta("base_000000010000000000000004", &deltas).unwrap_err().to_string();
        assert_eq!(
            err,
            "base_000000010000000000000004 is a WAL-G delta backup (delta from base_000000010000000000000002): \
             restore it with WAL-G, or fetch a full backup"
        );
        let none = nothing_to_restore(&Selector::Latest, &"file:///s", 1);
        assert!(none.contains("other than WAL-G delta backups (1,"), "{none}");
    }

    /// A partition the store cannot deliver (a download that breaks off each time, a store
    /// that is gone) fails with the store's error and exit code; only damaged content is
    /// "corrupt" (exit 10), which would send someone to discard a good backup.
    #[test]
    fn a_failing_store_is_not_a_corrupt_backup() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let backup = "base_000000010000000000000002";
        let job = |root: PathBuf| RestoreJob {
            store: Arc::new(Store::Local(crate::store::local::LocalStore::new(root))),
            backup: backup.into(),
            plan: ExtractPlan { dest: dir.path().join("data"), tablespaces: HashMap::new() },
            verify: false,
            progress: Arc::new(Progress::new("backup-fetch", 0)),
            handle: rt.handle().clone(),
            deadline: Duration::from_secs(1),
        };
        let fetch = |root: &Path, part: &str| {
            let job = job(root.to_path_buf());
            job.restore_partition(&PartitionEntry { name: part.into(), ..Default::default() }, &job.plan).unwrap_err()
        };
        // A folder where the partition should be: it opens, and every read of it fails.
        fs::create_dir_all(root.join(layout::partition_key(backup, "part_001.tar").as_str())).unwrap();
        let broken = fetch(&root, "part_001.tar");
        assert!(matches!(broken, Error::Store(StoreError::Unavailable { .. })), "{broken}");
        assert_eq!(crate::exit::code_of(&broken), crate::exit::STORAGE);

        let gone = fetch(&dir.path().join("no-store"), "part_001.tar");
        assert_eq!(crate::exit::code_of(&gone), crate::exit::STORE_MISSING, "{gone}");

        // Bytes that are not lz4: corrupt.
        fs::write(root.join(layout::partition_key(backup, "part_002.tar.lz4").as_str()), b"not lz4").unwrap();
        let damaged = fetch(&root, "part_002.tar.lz4");
        assert!(matches!(damaged, Error::Corrupt { .. }), "{damaged}");
    }

    /// A copy of the WAL-G-layout fixture's store (one backup: part_001 the data, part_002
    /// backup_label, pg_control) and a configuration using it.
    fn walg_fixture(dir: &Path) -> (PathBuf, Config) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/walg-layout-pg15/store");
        let copy = dir.join("store");
        let copied = std::process::Command::new("cp").arg("-r").arg(&fixture).arg(&copy).status().unwrap();
        assert!(copied.success(), "copying {}", fixture.display());
        let mut overrides = crate::config::Overrides::default();
        overrides.values.insert("store".into(), format!("file://{}", copy.display()));
        overrides.values.insert("retry_deadline_secs".into(), "1".into());
        (copy, Config::resolve(&overrides, &crate::config::ProcessEnv).unwrap())
    }

    fn fetch_now(config: &Config, dest: &Path) -> Result<FetchedBackup, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(config, &fetch_args(dest)))
    }

    const WALG_BACKUP: &str = "base_000000010000000000000002";

    /// WAL-G writes backup_label into its last partition: without files_metadata.json's
    /// list, a lost data partition restored as a cluster that starts, with no data.
    #[test]
    fn a_walg_backup_missing_a_partition_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, config) = walg_fixture(dir.path());
        let part = store.join(layout::partition_key(WALG_BACKUP, "part_001.tar.lz4").as_str());
        fs::remove_file(part).unwrap();
        let dest = dir.path().join("data");
        let err = fetch_now(&config, &dest).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("tar_partitions/part_001.tar is corrupt"), "{text}");
        assert!(text.contains("lists 1 partition(s) the store does not hold (part_001.tar)"), "{text}");
        assert!(!dest.exists(), "the refused restore created {}", dest.display());
    }

    /// A file that vanished between WAL-G's walk and its open (a table dropped during the
    /// backup) stays in `TarFileSets` but not in `Files`, and is not in the partition: the
    /// backup is sound and restores. A file in both that did not come back is refused.
    #[test]
    fn a_file_walg_listed_but_never_packed_is_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, config) = walg_fixture(dir.path());
        let metadata = store.join(layout::backup_file_key(WALG_BACKUP, WALG_FILES_METADATA).as_str());
        let original: serde_json::Value = serde_json::from_slice(&fs::read(&metadata).unwrap()).unwrap();
        let with_phantom = |in_files: bool| {
            let mut doc = original.clone();
            doc["TarFileSets"]["part_001.tar"].as_array_mut().unwrap().push("base/5/99999".into());
            if in_files {
                doc["Files"]["base/5/99999"] = serde_json::json!({"IsSkipped": false});
            }
            fs::write(&metadata, serde_json::to_vec(&doc).unwrap()).unwrap();
        };
        with_phantom(false);
        let dest = dir.path().join("data");
        assert_eq!(fetch_now(&config, &dest).unwrap().name, WALG_BACKUP);
        with_phantom(true);
        let dest = dir.path().join("data2");
        let err = fetch_now(&config, &dest).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }) && err.to_string().contains("base/5/99999"), "{err}");
    }

    /// Another backup-fetch restoring into DEST (its marker there, its lock held): refused at
    /// once, and nothing of its restore is cleared. Once it is gone, the folder is an
    /// interrupted restore a run clears and restores.
    #[test]
    fn a_second_backup_fetch_into_the_same_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, config) = walg_fixture(dir.path());
        let dest = dir.path().join("data");
        fs::create_dir_all(dest.join("base/1")).unwrap();
        fs::write(dest.join(INCOMPLETE_MARKER), "").unwrap();
        fs::write(dest.join("base/1/1259"), "restored by the other run").unwrap();
        let other = fs::File::open(&dest).unwrap();
        rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();

        let err = fetch_now(&config, &dest).unwrap_err();
        assert_eq!(crate::exit::code_of(&err), crate::exit::INVALID_INPUT, "{err}");
        assert!(err.to_string().contains("another backup-fetch is restoring into this folder"), "{err}");
        assert_eq!(fs::read_to_string(dest.join("base/1/1259")).unwrap(), "restored by the other run");

        drop(other);
        let done = fetch_now(&config, &dest).unwrap();
        assert_eq!(done.name, WALG_BACKUP);
        assert!(dest.join("global/pg_control").is_file() && !dest.join(INCOMPLETE_MARKER).exists());
        assert_ne!(fs::read(dest.join("base/1/1259")).unwrap(), b"restored by the other run");
    }

    /// A partition the configured keys refuse (here: sealed, and no key configured) is a
    /// key error, exit 14 as for wal-fetch, not a corrupt backup (exit 10).
    #[test]
    fn a_partition_no_configured_key_opens_is_a_key_error() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let key = layout::partition_key(WALG_BACKUP, "part_001.tar");
        fs::create_dir_all(root.join(key.as_str()).parent().unwrap()).unwrap();
        let sealed =
            crate::crypto::seal_bytes(Some(&crate::crypto::Key::from_bytes([7; 32])), key.as_str(), b"a tar").unwrap();
        fs::write(root.join(key.as_str()), sealed).unwrap();
        let job = RestoreJob {
            store: Arc::new(Store::Local(crate::store::local::LocalStore::new(root))),
            backup: WALG_BACKUP.into(),
            plan: ExtractPlan { dest: dir.path().join("data"), tablespaces: HashMap::new() },
            verify: false,
            progress: Arc::new(Progress::new("backup-fetch", 0)),
            handle: rt.handle().clone(),
            deadline: Duration::from_secs(1),
        };
        let part = PartitionEntry { name: "part_001.tar".into(), ..Default::default() };
        let err = job.restore_partition(&part, &job.plan).unwrap_err();
        assert!(matches!(err, Error::Key { .. }), "{err}");
        assert_eq!(crate::exit::code_of(&err), crate::exit::KEY);
        assert!(err.to_string().contains("no encryption key is configured"), "{err}");
    }

    /// PostgreSQL runs restore_command in the data directory: a relative path given to
    /// backup-fetch would name another file there.
    #[test]
    fn paths_in_the_restore_command_are_absolute() {
        let mut config = Config::resolve(&crate::config::Overrides::default(), &crate::config::ProcessEnv).unwrap();
        config.file = Some(PathBuf::from("conf/walrs.toml"));
        let cwd = std::env::current_dir().unwrap();
        let key_file = config.report.iter_mut().find(|(s, _, _)| s.key == "encryption_key_file").unwrap();
        key_file.1 = Some("keys/walrs.keys".into());
        key_file.2 = Source::File(PathBuf::from("conf/walrs.toml"));
        let command = restore_command(&config);
        let config_file = cwd.join("conf/walrs.toml").display().to_string();
        assert!(command.contains(&format!("--config {}", shell_quote(&config_file).replace('%', "%%"))), "{command}");
        let key = format!("encryption_key_file={}", cwd.join("keys/walrs.keys").display());
        assert!(command.contains(&format!("--set {}", shell_quote(&key).replace('%', "%%"))), "{command}");
        // An absolute path from the file stays with the file.
        let key_file = config.report.iter_mut().find(|(s, _, _)| s.key == "encryption_key_file").unwrap();
        key_file.1 = Some("/etc/walrs.keys".into());
        assert!(!restore_command(&config).contains("encryption_key_file"));
    }
}
