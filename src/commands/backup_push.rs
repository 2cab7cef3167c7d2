//! `wal-rs backup-push PGDATA`: a base backup through the non-exclusive backup API, streamed
//! into tar partitions that are compressed and uploaded concurrently.
//!
//! Phases: start the backup; walk the data directory and tablespaces into partitions
//! (several at once, each read -> tar -> compress -> upload); stop the backup; write the
//! backup_label partition and then `pg_control` last; wait until every WAL segment from the
//! start to the stop LSN is in the store (checked in the store itself); write metadata and
//! manifest; write the sentinel last, once every object written is found still there. A
//! backup interrupted anywhere before the sentinel is not listed and leaves only garbage
//! for `delete garbage`; while it runs, its writer record is rewritten every minute or so,
//! so that `delete garbage` never takes its folder for a dead run's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{open_store, StoredWal};
use crate::backup::manifest::{Manifest, PartitionEntry};
use crate::backup::partition::{PartitionError, PartitionWriter};
use crate::backup::sentinel::{format_time, BackupMetadata, Sentinel, Tablespace};
use crate::backup::walk::{self, EntryKind, WalkError};
use crate::codec::Compression;
use crate::config::Config;
use crate::error::Error;
use crate::identity;
use crate::layout;
use crate::log::{self, Level};
use crate::pg::{backup_api, conn};
use crate::progress::Progress;
use crate::store::{into_store_error, Metadata, ObjectKey, PutMode, PutOptions, PutOutcome, Store, StoreError};
use crate::wal::{Lsn, SegmentId, TimelineId, WalFileName};

/// What one backup-push did.
#[derive(Debug, serde::Serialize)]
pub(super) struct PushedBackup {
    pub(super) name: String,
    pub(super) start_lsn: String,
    pub(super) finish_lsn: String,
    pub(super) partitions: usize,
    pub(super) files: usize,
    pub(super) uncompressed_bytes: u64,
    pub(super) stored_bytes: u64,
    pub(super) wal_wait_ms: u128,
}

pub(super) async fn run(
    config: &Config,
    pgdata: &Path,
    fast: bool,
    pg_url: Option<&str>,
) -> Result<PushedBackup, Error> {
    let client = conn::connect(pg_url).await?;
    backup_api::prepare_session(&client).await?;
    let info = backup_api::server_info(&client).await?;
    let pgdata = std::fs::canonicalize(pgdata).map_err(|e| Error::local("open", pgdata, e))?;
    let server_dir =
        std::fs::canonicalize(&info.data_directory).unwrap_or_else(|_| PathBuf::from(&info.data_directory));
    if server_dir != pgdata {
        return Err(Error::Config(format!(
            "{} is not the data directory of the server connected to ({}): run backup-push on the database host with its PGDATA",
            pgdata.display(),
            info.data_directory
        )));
    }
    let version_dir = info.tablespace_version_dir();
    // Sizes first (a stat-only walk): the progress bar's total, and the largest file, which
    // sets the part size before the store is opened.
    let sizes = measure(&pgdata, &walk::tablespaces(&pgdata).unwrap_or_default(), &version_dir);
    // Memory is parts: each partition written at once holds the part it fills plus the parts
    // in flight. So s3_upload_concurrency is the budget of the whole backup, shared by the
    // partitions, and partitions go up in the smallest parts that keep the largest possible
    // partition within S3's 10,000 (5 MiB up to partitions of about 40 GiB): about 30 MiB of
    // buffers with the defaults, whatever the database size.
    let mut shared = config.clone();
    shared.s3.upload_concurrency = (config.s3.upload_concurrency / config.backup.concurrency.max(1)).max(1);
    shared.s3.part_size = partition_part_size(config.backup.partition_size, sizes.largest);
    let config = &shared;
    let store = open_store(config).await?;
    identity::check_or_record_cluster(
        &store,
        "this backup",
        info.system_identifier,
        info.version_num / 10000,
        info.wal_segment_size,
    )
    .await?;

    let started = time::OffsetDateTime::now_utc();
    let label = format!("wal-rs {}", format_time(started));
    let (start_lsn, start_file) = backup_api::start(&client, info.version_num, &label, fast).await?;
    let Reservation { name, record } =
        reserve_backup_name(&store, &start_file, start_lsn, info.wal_segment_size).await?;
    // Until the sentinel is written (or this run fails), the folder stays recent for
    // `delete garbage`, however long the WAL takes to arrive.
    let _keep_alive =
        WriterKeepAlive::start(store.clone(), &name, record, writer_refresh_interval(config.retention.garbage_min_age));
    let tablespaces = walk::tablespaces(&pgdata).map_err(|e| Error::local("read", &pgdata.join("pg_tblspc"), e))?;
    log::emit(
        Level::Info,
        &[("op", &"backup-push"), ("backup", &name), ("start_lsn", &start_lsn), ("outcome", &"started")],
    );

    let progress = Arc::new(Progress::new("backup-push", sizes.total));
    let job = DataJob {
        store: store.clone(),
        name: name.clone(),
        pgdata: pgdata.clone(),
        tablespaces: tablespaces.clone(),
        version_dir,
        compression: config.compression,
        level: config.zstd_level,
        partition_size: config.backup.partition_size,
        concurrency: config.backup.concurrency,
        progress: progress.clone(),
    };
    let mut partitions = tokio::task::spawn_blocking(move || job.run()).await.expect("the backup task panicked")?;
    progress.finish();

    let stop = backup_api::stop(&client, info.version_num).await?;
    let next = partitions.len() + 1;
    let label_part = layout::partition_name(next, config.compression);
    let mut files: Vec<(&str, Vec<u8>)> = vec![("backup_label", stop.label.clone().into_bytes())];
    if !stop.tablespace_map.is_empty() {
        files.push(("tablespace_map", stop.tablespace_map.clone().into_bytes()));
    }
    partitions.push(write_small_partition(&store, &name, label_part, files, config).await?);
    // pg_control after everything else, as PostgreSQL's own base backup sends it.
    let control = read_pg_control(&pgdata.join("global/pg_control"), info.system_identifier).await?;
    let control_part = layout::pg_control_partition_name(config.compression);
    partitions
        .push(write_small_partition(&store, &name, control_part, vec![("global/pg_control", control)], config).await?);

    let wal_started = Instant::now();
    let timeline = start_file.timeline();
    let first = start_file.wal_segment().expect("the start file is a segment");
    let last = SegmentId::containing(Lsn(stop.stop_lsn.0.saturating_sub(1).max(start_lsn.0)), info.wal_segment_size);
    // An upload the safety valve overtook may still complete within retry_deadline_secs.
    let gap_grace = config.retry.deadline.min(config.backup.wal_timeout);
    wait_for_wal(
        &store,
        timeline,
        first,
        last,
        info.wal_segment_size,
        config.compression,
        Waits { timeout: config.backup.wal_timeout, gap_grace },
    )
    .await?;
    let wal_wait_ms = wal_started.elapsed().as_millis();

    let finished = time::OffsetDateTime::now_utc();
    let uncompressed: u64 = partitions.iter().map(|p| p.tar_size).sum();
    let stored: u64 = partitions.iter().map(|p| p.stored_size).sum();
    let file_count: usize = partitions.iter().map(|p| p.files.len()).sum();
    let partition_count = partitions.len();
    let hostname = hostname();
    let data_dir = pgdata.display().to_string();
    // Moved, not copied: the file list (one entry per file) is the one thing here that
    // grows with the database, and it is held once, plus its JSON while that is stored.
    let manifest =
        Manifest { version: 1, backup: name.clone(), compression: config.compression.to_string(), partitions };
    let metadata = BackupMetadata {
        start_time: format_time(started),
        finish_time: format_time(finished),
        date_fmt: "%Y-%m-%dT%H:%M:%S.%fZ".into(),
        hostname: hostname.clone(),
        data_dir: data_dir.clone(),
        pg_version: info.version_num,
        start_lsn: start_lsn.0,
        finish_lsn: stop.stop_lsn.0,
        is_permanent: false,
        system_identifier: Some(info.system_identifier),
        uncompressed_size: uncompressed,
        compressed_size: stored,
        user_data: None,
    };
    let sentinel = Sentinel {
        start_lsn: start_lsn.0,
        finish_lsn: stop.stop_lsn.0,
        pg_version: info.version_num,
        system_identifier: Some(info.system_identifier),
        uncompressed_size: uncompressed,
        compressed_size: stored,
        data_catalog_size: Some(progress.done()),
        spec: (!tablespaces.is_empty()).then(|| Sentinel::make_spec(&data_dir, &tablespaces)),
        user_data: None,
        version: 2,
        start_time: format_time(started),
        finish_time: format_time(finished),
        date_fmt: "%Y-%m-%dT%H:%M:%S.%fZ".into(),
        hostname,
        data_dir,
        is_permanent: false,
        timeline: Some(timeline.0),
        wal_segment_size: Some(info.wal_segment_size),
        manifest: Some(crate::backup::manifest::MANIFEST_FILE.into()),
    };
    write_documents(&store, &name, manifest, &metadata, &sentinel).await?;
    Ok(PushedBackup {
        name,
        start_lsn: start_lsn.to_string(),
        finish_lsn: stop.stop_lsn.to_string(),
        partitions: partition_count,
        files: file_count,
        uncompressed_bytes: uncompressed,
        stored_bytes: stored,
        wal_wait_ms,
    })
}

/// Writes metadata.json, the manifest and, last, the sentinel, which lists the backup as
/// complete: only once every object this run put into the folder is still there.
async fn write_documents(
    store: &Arc<Store>,
    name: &str,
    manifest: Manifest,
    metadata: &BackupMetadata,
    sentinel: &Sentinel,
) -> Result<(), Error> {
    let written: Vec<ObjectKey> = std::iter::once(layout::backup_file_key(name, WRITER_FILE))
        .chain(manifest.partitions.iter().map(|p| layout::partition_key(name, &p.name)))
        .collect();
    let overwrite = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
    store.put_bytes(&layout::backup_file_key(name, "metadata.json"), to_json(metadata), overwrite).await?;
    crate::backup::manifest::store_manifest(store, name, &manifest).await?;
    drop(manifest);
    require_still_stored(store, name, &written).await?;
    if !create_or_find_own(store, &layout::sentinel_key(name), to_json(sentinel)).await? {
        return Err(Error::AlreadyExists(format!(
            "backup {name} already exists in {} with another sentinel: run backup-push again",
            store.url()
        )));
    }
    Ok(())
}

/// Fails when an object this run wrote into the backup's folder is gone. `delete garbage`
/// takes a folder with no sentinel and nothing written for `delete_garbage_min_age_secs`
/// for a dead run's; a sentinel over what is left would list a backup without its data as
/// complete, and retention would then keep it in place of a good one.
async fn require_still_stored(store: &Store, name: &str, written: &[ObjectKey]) -> Result<(), Error> {
    let folder = format!("{}/{name}/", layout::BACKUP_DIR);
    let listed: HashSet<String> = store.list(&folder).await?.into_iter().map(|m| m.key.as_str().to_string()).collect();
    let missing: Vec<&ObjectKey> = written.iter().filter(|k| !listed.contains(k.as_str())).collect();
    let Some(first) = missing.first() else {
        return Ok(());
    };
    let others = match missing.len() - 1 {
        0 => String::new(),
        n => format!(" and {n} other objects"),
    };
    Err(Error::NotFound(format!(
        "{first}{others} of backup {name} were deleted from {} while backup-push ran (`wal-rs delete garbage` with a delete_garbage_min_age_secs shorter than the backup's pauses?); no sentinel was written: run backup-push again",
        store.url()
    )))
}

/// Keeps this run's writer record recent: rewrites it every `interval` until dropped.
/// `delete garbage` deletes a folder with no sentinel once nothing in it was written for
/// `delete_garbage_min_age_secs`, and a backup waiting for its WAL writes nothing else.
struct WriterKeepAlive(tokio::task::JoinHandle<()>);

impl WriterKeepAlive {
    fn start(store: Arc<Store>, name: &str, record: Vec<u8>, interval: Duration) -> WriterKeepAlive {
        let key = layout::backup_file_key(name, WRITER_FILE);
        WriterKeepAlive(tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let overwrite = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
                // A failed refresh is not the backup's failure: the check before the
                // sentinel finds anything deleted meanwhile.
                if let Err(e) = store.put_bytes(&key, record.clone(), overwrite).await {
                    log::emit(
                        Level::Warn,
                        &[
                            ("op", &"backup-push"),
                            ("key", &key),
                            ("outcome", &"writer record not refreshed"),
                            ("error", &e),
                        ],
                    );
                }
            }
        }))
    }
}

impl Drop for WriterKeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the writer record is rewritten: a tenth of the garbage age this host's
/// configuration gives `delete` (the default's 24 h gives once a minute), and no more than
/// once every 5 s. An age below a minute or so cannot be kept to; the check before the
/// sentinel then fails the backup rather than list it without its data.
fn writer_refresh_interval(garbage_min_age: Duration) -> Duration {
    (garbage_min_age / 10).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("backup documents serialise")
}

/// Puts `bytes` under `key` unless something is there already; returns whether the object
/// now holds exactly `bytes`. A create whose answer was lost (a timeout, a reset connection)
/// is sent again by the S3 SDK, and the second try finds the object the first one stored
/// (412, so `AlreadyExists`): that is this run's own object, and success. Anything else
/// under the key is another writer's.
async fn create_or_find_own(store: &Arc<Store>, key: &ObjectKey, bytes: Vec<u8>) -> Result<bool, Error> {
    let create = PutOptions { mode: PutMode::Create, metadata: Metadata::new() };
    if store.put_bytes(key, bytes.clone(), create).await? == PutOutcome::Stored {
        return Ok(true);
    }
    match store.get_bytes(key).await {
        Ok(stored) => Ok(stored == bytes),
        // There a moment ago and gone now (`delete garbage`): not this run's.
        Err(StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A name for this backup, reserved: `base_<start WAL file>`, as WAL-G names backups. When
/// that name is taken, the start offset is added, as WAL-E did, and then a count. A name is
/// taken by a complete backup (two backups with no WAL between them), and by any backup-push
/// that wrote there, running or dead: each one first puts its writer record into its folder,
/// create-only, so two runs that start in the same segment never write into one folder, and
/// no run writes over a dead one's partitions.
async fn reserve_backup_name(
    store: &Arc<Store>,
    start_file: &WalFileName,
    start_lsn: Lsn,
    seg_size: u32,
) -> Result<Reservation, Error> {
    let plain = format!("base_{start_file}");
    let offset = format!("{plain}_{:08X}", start_lsn.0 % seg_size as u64);
    let writer = to_json(&serde_json::json!({
        "hostname": hostname(),
        "pid": std::process::id(),
        "started": format_time(time::OffsetDateTime::now_utc()),
    }));
    for n in 0..MAX_NAME_TRIES {
        let name = match n {
            0 => plain.clone(),
            1 => offset.clone(),
            n => format!("{offset}_{n}"),
        };
        if store.head(&layout::sentinel_key(&name)).await?.is_some() {
            continue;
        }
        // The record names this process (host, pid, start time), so
        // finding the same bytes there means this run's own earlier try stored it.
        let record = layout::backup_file_key(&name, WRITER_FILE);
        if create_or_find_own(store, &record, writer.clone()).await? {
            return Ok(Reservation { name, record: writer });
        }
    }
    Err(Error::AlreadyExists(format!(
        "{MAX_NAME_TRIES} backup names starting {plain} are taken in {}: `wal-rs delete garbage` removes the folders of backup-push runs that died",
        store.url()
    )))
}

/// pg_control, whole. The checkpointer rewrites it in place with one 8 KiB write, and a read
/// at that moment can get part old, part new bytes, which PostgreSQL refuses to start from
/// ("incorrect checksum in control file"). So it is read until its CRC matches, as
/// pgBackRest does, and the backup fails rather than store a torn copy.
async fn read_pg_control(path: &Path, system_identifier: u64) -> Result<Vec<u8>, Error> {
    for _ in 0..PG_CONTROL_READS {
        let bytes = std::fs::read(path).map_err(|e| Error::local("read", path, e))?;
        if pg_control_is_whole(&bytes, system_identifier) {
            return Ok(bytes);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(Error::InvalidInput {
        path: path.display().to_string(),
        reason: format!(
            "its CRC did not match in {PG_CONTROL_READS} reads, or it is another cluster's: the control file is damaged; check the server (pg_controldata) before taking a backup"
        ),
    })
}

/// A backup name this run holds, and the bytes of the writer record that holds it.
struct Reservation {
    name: String,
    record: Vec<u8>,
}

/// Reads of pg_control before a torn copy is taken for a damaged file.
const PG_CONTROL_READS: usize = 10;

/// Whether `bytes` are a whole control file of the cluster `system_identifier`: its first
/// field, and a CRC-32C of the bytes before it where ControlFileData ends. Where that is
/// depends on the major version, so every 4-byte-aligned place in the first 512 bytes (the
/// part PostgreSQL keeps atomic) is tried; a torn file matching at one of them by chance has
/// odds of about 1 in 30 million.
fn pg_control_is_whole(bytes: &[u8], system_identifier: u64) -> bool {
    const ATOMIC_PART: usize = 512;
    if bytes.len() < ATOMIC_PART || bytes[..8] != system_identifier.to_ne_bytes() {
        return false;
    }
    let mut crc = crc32c::crc32c(&bytes[..8]);
    let mut end = 8;
    while end + 4 <= ATOMIC_PART {
        if crc == u32::from_ne_bytes(bytes[end..end + 4].try_into().unwrap()) {
            return true;
        }
        crc = crc32c::crc32c_append(crc, &bytes[end..end + 4]);
        end += 4;
    }
    false
}

/// The record of the backup-push writing a backup's folder (which also reserves the name).
const WRITER_FILE: &str = "walrs_writer.json";
/// Names tried for one backup before giving up.
const MAX_NAME_TRIES: usize = 20;

/// What a stat-only walk finds. Best effort: the real walk reports what fails.
#[derive(Debug, Default)]
struct Sizes {
    /// Sum of the file sizes to back up, for the progress bar.
    total: u64,
    /// The largest file, which a partition may hold beyond its size.
    largest: u64,
}

fn measure(pgdata: &Path, tablespaces: &[Tablespace], version_dir: &str) -> Sizes {
    let mut sizes = Sizes::default();
    let _ = walk::walk(pgdata, tablespaces, version_dir, &mut |e| {
        if let EntryKind::File { size } = e.kind {
            sizes.total += size;
            sizes.largest = sizes.largest.max(size);
        }
        true
    });
    sizes
}

/// Parts an S3 object may have.
const S3_MAX_PARTS: u64 = 10_000;

/// The multipart part size for partitions: the smallest (5 MiB, S3's minimum, for memory)
/// that keeps the largest partition within S3's 10,000 parts. A partition is closed once
/// past its size, so it can hold `partition_size` plus one whole file: a relation segment
/// (up to 1 GiB, and it may grow to that while the backup runs) or any larger file found,
/// which goes up whole. Compression (lz4's worst case on incompressible data is under 1%)
/// and sealing add a little: 2% and 64 MiB are allowed for. And only 90% of the parts are
/// planned for, the rest in reserve for files that grew after they were measured.
fn partition_part_size(partition_size: u64, largest_file: u64) -> usize {
    const RELATION_SEGMENT: u64 = 1 << 30;
    const MIN_PART: u64 = 5 << 20;
    const MAX_PART: u64 = 5 << 30;
    let largest = partition_size.saturating_add(largest_file.max(RELATION_SEGMENT));
    let stored = largest.saturating_add(largest / 50).saturating_add(64 << 20);
    let part = stored.div_ceil(S3_MAX_PARTS / 10 * 9);
    // Whole MiB, within S3's limits.
    (part.div_ceil(1 << 20) << 20).clamp(MIN_PART, MAX_PART) as usize
}

/// A failed walk as the command's error: which path, and why.
fn walk_error(e: WalkError) -> Error {
    Error::LocalIo { op: e.op, path: e.path.display().to_string(), source: e.source }
}

/// The data partitions: a walker thread feeds entries to `concurrency` workers, each filling
/// its own partition and starting a new one past the size limit.
struct DataJob {
    store: Arc<Store>,
    name: String,
    pgdata: PathBuf,
    tablespaces: Vec<Tablespace>,
    /// Each tablespace's folder of this server version (`PG_15_202209061`).
    version_dir: String,
    compression: Compression,
    level: i32,
    partition_size: u64,
    concurrency: usize,
    progress: Arc<Progress>,
}

impl DataJob {
    fn run(self) -> Result<Vec<PartitionEntry>, Error> {
        let (tx, rx) = sync_channel(256);
        // The receiver is dropped once the workers stop, so a walker blocked on a full
        // channel after a failure gets an error instead of waiting forever.
        let rx = Mutex::new(Some(rx));
        let next_number = AtomicUsize::new(1);
        let failed = AtomicBool::new(false);
        let done = Mutex::new(Vec::new());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            failed.store(true, Ordering::Relaxed);
            first_error.lock().unwrap().get_or_insert(e);
        };
        std::thread::scope(|s| {
            let walker = s.spawn(|| {
                let result = walk::walk(&self.pgdata, &self.tablespaces, &self.version_dir, &mut |e| {
                    !failed.load(Ordering::Relaxed) && tx.send(e).is_ok()
                });
                drop(tx);
                if let Err(e) = result {
                    fail(walk_error(e));
                }
            });
            let workers: Vec<_> = (0..self.concurrency.max(1))
                .map(|_| {
                    s.spawn(|| {
                        if let Err(e) = self.worker(&rx, &next_number, &failed, &done) {
                            fail(e);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.join();
            }
            // Workers stopped early: unblock the walker.
            drop(rx.lock().unwrap().take());
            let _ = walker.join();
        });
        if let Some(e) = first_error.into_inner().unwrap() {
            return Err(e);
        }
        let mut parts = done.into_inner().unwrap();
        parts.sort_by(|a: &PartitionEntry, b| a.name.cmp(&b.name));
        Ok(parts)
    }

    fn worker(
        &self,
        rx: &Mutex<Option<std::sync::mpsc::Receiver<walk::Entry>>>,
        next_number: &AtomicUsize,
        failed: &AtomicBool,
        done: &Mutex<Vec<PartitionEntry>>,
    ) -> Result<(), Error> {
        let mut current: Option<PartitionWriter> = None;
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let entry = match rx.lock().unwrap().as_ref().map(|r| r.recv()) {
                Some(Ok(e)) => e,
                _ => break,
            };
            if current.is_none() {
                let number = next_number.fetch_add(1, Ordering::Relaxed);
                let part = layout::partition_name(number, self.compression);
                let key = layout::partition_key(&self.name, &part);
                let object =
                    self.store.writer(&key, PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() })?;
                current = Some(
                    PartitionWriter::new(part, &key, object, self.compression, self.level)
                        .map_err(|e| into_store_error(e, "write", &key))?,
                );
            }
            let p = current.as_mut().unwrap();
            let before = p.bytes_read;
            p.append(&entry).map_err(|e| partition_error(e, &self.name))?;
            self.progress.add(p.bytes_read - before);
            if p.tar_size() >= self.partition_size {
                // Published outside the lock: partitions upload in parallel.
                let entry = publish(current.take().unwrap(), &self.name)?;
                done.lock().unwrap().push(entry);
            }
        }
        if let Some(p) = current.take() {
            let entry = publish(p, &self.name)?;
            done.lock().unwrap().push(entry);
        }
        Ok(())
    }
}

fn partition_error(e: PartitionError, backup: &str) -> Error {
    match e {
        PartitionError::Read { path, source } => Error::LocalIo { op: "read", path, source },
        PartitionError::Write(e) => {
            let key = crate::store::ObjectKey::new(&format!("{}/{backup}", layout::BACKUP_DIR)).unwrap();
            Error::Store(into_store_error(e, "write partition of", &key))
        }
    }
}

/// Ends a partition and publishes its object. Blocking.
fn publish(p: PartitionWriter, backup: &str) -> Result<PartitionEntry, Error> {
    let (object, entry) = p.finish().map_err(|e| partition_error(e, backup))?;
    object.finish()?;
    Ok(entry)
}

/// A partition of a few files from memory (backup_label, pg_control).
async fn write_small_partition(
    store: &Arc<Store>,
    backup: &str,
    part: String,
    files: Vec<(&'static str, Vec<u8>)>,
    config: &Config,
) -> Result<PartitionEntry, Error> {
    let store = store.clone();
    let backup = backup.to_string();
    let (compression, level) = (config.compression, config.zstd_level);
    tokio::task::spawn_blocking(move || {
        let key = layout::partition_key(&backup, &part);
        let object = store.writer(&key, PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() })?;
        let mut p = PartitionWriter::new(part, &key, object, compression, level)
            .map_err(|e| into_store_error(e, "write", &key))?;
        for (rel, bytes) in &files {
            p.append_bytes(rel, bytes, 0o600).map_err(|e| partition_error(e, &backup))?;
        }
        publish(p, &backup)
    })
    .await
    .expect("the partition task panicked")
}

/// Waits until every segment from `first` to `last` on `timeline` is in the store.
///
/// `timeout` counts time without progress: it starts again whenever a segment is found, so
/// a long backup's many segments (checked one after another) never use it up before the
/// last one, still being archived, gets its time. A segment that the archive's safety valve
/// dropped (a gap record) can never arrive: that fails, naming it, once the record has stood
/// with the segment absent for `gap_grace`. Not at once: the valve can drop a segment an
/// archive daemon is uploading at that moment, and that upload may still complete.
async fn wait_for_wal(
    store: &Arc<Store>,
    timeline: TimelineId,
    first: SegmentId,
    last: SegmentId,
    seg_size: u32,
    compression: Compression,
    waits: Waits,
) -> Result<(), Error> {
    let Waits { timeout, gap_grace } = waits;
    let mut waiting_for = first;
    let mut since = Instant::now();
    let mut delay = Duration::from_millis(100);
    // The gap record found with its segment absent, and since when.
    let mut gap_seen: Option<(WalFileName, Instant)> = None;
    loop {
        let Some(missing) = first_missing(store, timeline, waiting_for, last, seg_size, compression).await? else {
            return Ok(());
        };
        if missing != waiting_for {
            (waiting_for, since, delay) = (missing, Instant::now(), Duration::from_millis(100));
        }
        let gap = gap_between(store, timeline, missing, last, compression).await?;
        if gap != gap_seen.map(|(seen, _)| seen) {
            gap_seen = gap.map(|g| (g, Instant::now()));
        }
        if let Some((gap, _)) = gap_seen.filter(|(_, since)| since.elapsed() >= gap_grace) {
            return Err(Error::NotFound(format!(
                "WAL segment {gap} of the backup was dropped unarchived by archive_queue_max_bytes (gap record {} in {}): this backup can never be restored; take a new backup once archiving keeps up",
                layout::gap_key(&gap.to_string()),
                store.url()
            )));
        }
        if since.elapsed() + delay > timeout {
            return Err(Error::Timeout(format!(
                "WAL segment {} of the backup did not reach {} in {} s in which no segment arrived (backup_wal_timeout_secs): check archive_command (wal-rs wal-push %p) and pg_stat_archiver, then run backup-push again",
                WalFileName::Segment(timeline, missing),
                store.url(),
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// How long [`wait_for_wal`] waits: `timeout` without a new segment, and `gap_grace` for a
/// gap record whose segment is absent.
#[derive(Clone, Copy)]
struct Waits {
    timeout: Duration,
    gap_grace: Duration,
}

/// The first segment from `from` to `last` that is not in the store, or `None` when all
/// are. On S3 (and in memory) one listing per 4 GiB of WAL (one "log": 256 segments of
/// 16 MiB), not a request per segment; a local store `stat`s each name instead, since a
/// listing there reads the whole wal_005 folder.
async fn first_missing(
    store: &Arc<Store>,
    timeline: TimelineId,
    from: SegmentId,
    last: SegmentId,
    seg_size: u32,
    compression: Compression,
) -> Result<Option<SegmentId>, Error> {
    let mut stored = StoredWal::new(store, compression);
    let mut segment = from;
    loop {
        if !stored.contains(&WalFileName::Segment(timeline, segment)).await? {
            return Ok(Some(segment));
        }
        if segment == last {
            return Ok(None);
        }
        segment = segment.next(seg_size);
    }
}

/// The first segment from `from` to `last` on `timeline` with a gap record and no object:
/// acknowledged to PostgreSQL without being archived (see `backup-list`'s and
/// `wal-verify`'s reading of the same records). A record whose segment is stored after all
/// (the valve dropped it while an archive daemon's upload of it was under way) is no gap.
async fn gap_between(
    store: &Store,
    timeline: TimelineId,
    from: SegmentId,
    last: SegmentId,
    compression: Compression,
) -> Result<Option<WalFileName>, Error> {
    let mut gaps: Vec<WalFileName> = super::common::gap_records(store)
        .await?
        .iter()
        .filter_map(|name| WalFileName::parse(name).ok())
        .filter(|n| matches!(n, WalFileName::Segment(t, s) if *t == timeline && (from..=last).contains(s)))
        .collect();
    gaps.sort_by_key(|n| n.wal_segment());
    let mut stored = StoredWal::new(store, compression);
    for gap in gaps {
        if !stored.contains(&gap).await? {
            return Ok(Some(gap));
        }
    }
    Ok(None)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// A control file of `sysid` whose ControlFileData ends (with its CRC) at `crc_at`.
    fn control_file(sysid: u64, crc_at: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; 8192];
        bytes[..8].copy_from_slice(&sysid.to_ne_bytes());
        for (i, b) in bytes[8..crc_at].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let crc = crc32c::crc32c(&bytes[..crc_at]);
        bytes[crc_at..crc_at + 4].copy_from_slice(&crc.to_ne_bytes());
        bytes
    }

    #[test]
    fn only_a_whole_control_file_of_this_cluster_is_backed_up() {
        for crc_at in [256, 288, 296] {
            let whole = control_file(7, crc_at);
            assert!(pg_control_is_whole(&whole, 7), "CRC at {crc_at}");
            assert!(!pg_control_is_whole(&whole, 8), "another cluster's");
            let mut torn = whole.clone();
            torn[100] ^= 0x40;
            assert!(!pg_control_is_whole(&torn, 7), "torn, CRC at {crc_at}");
        }
        assert!(!pg_control_is_whole(&control_file(7, 296)[..300], 7), "short");
    }

    #[test]
    fn a_backup_name_in_use_by_any_backup_push_is_never_written_into() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            let start = WalFileName::parse("000000010000000000000028").unwrap();
            let lsn = Lsn(0x28_0000_0028);
            let reserve = || async { reserve_backup_name(&store, &start, lsn, 16 << 20).await.map(|r| r.name) };
            // The first run takes the plain name; one starting in the same segment while it
            // runs (or after it died) gets the offset, a third a count.
            assert_eq!(reserve().await.unwrap(), "base_000000010000000000000028");
            assert_eq!(reserve().await.unwrap(), "base_000000010000000000000028_00000028");
            assert_eq!(reserve().await.unwrap(), "base_000000010000000000000028_00000028_2");
            // A complete backup of another tool (a sentinel, no writer record) is skipped too.
            let create = PutOptions { mode: PutMode::Create, metadata: Metadata::new() };
            let other = WalFileName::parse("000000010000000000000030").unwrap();
            store
                .put_bytes(&layout::sentinel_key("base_000000010000000000000030"), b"{}".to_vec(), create)
                .await
                .unwrap();
            let name = reserve_backup_name(&store, &other, Lsn(0x30_0000_0100), 16 << 20).await.unwrap().name;
            assert_eq!(name, "base_000000010000000000000030_00000100");
        });
    }

    fn memory_store() -> Arc<Store> {
        Arc::new(Store::Memory(MemoryStore::new()))
    }

    async fn put(store: &Arc<Store>, key: &ObjectKey, bytes: &[u8]) {
        let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
        store.put_bytes(key, bytes.to_vec(), opts).await.unwrap();
    }

    fn segment_key(timeline: u32, segment: SegmentId) -> ObjectKey {
        layout::wal_key(&WalFileName::Segment(TimelineId(timeline), segment), Compression::Lz4)
    }

    fn waits(timeout_ms: u64, gap_grace_ms: u64) -> Waits {
        Waits { timeout: Duration::from_millis(timeout_ms), gap_grace: Duration::from_millis(gap_grace_ms) }
    }

    #[test]
    fn a_segment_dropped_by_the_safety_valve_fails_the_wait_once_its_record_stands() {
        crate::test_support::block_on(async {
            let store = memory_store();
            let first = SegmentId { log: 0, seg: 5 };
            let last = SegmentId { log: 0, seg: 7 };
            let gap = WalFileName::Segment(TimelineId(1), first);
            put(&store, &layout::gap_key(&gap.to_string()), b"{}").await;
            // A gap on another timeline or outside the range is not this backup's.
            put(&store, &layout::gap_key("000000020000000000000005"), b"{}").await;
            let started = Instant::now();
            let wait = wait_for_wal(&store, TimelineId(1), first, last, 16 << 20, Compression::Lz4, waits(30_000, 300));
            let err = wait.await.unwrap_err();
            let waited = started.elapsed();
            assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "waited {waited:?}");
            assert!(matches!(err, Error::NotFound(_)), "{err:?}");
            let shown = err.to_string();
            assert!(shown.contains("000000010000000000000005") && shown.contains("walrs/gaps/"), "{shown}");
        });
    }

    /// The valve can drop a segment an archive daemon is uploading: its gap record then
    /// stands beside the stored segment, and names no gap. The wait goes on for the
    /// segment still on its way instead of failing the backup.
    #[test]
    fn a_gap_record_of_a_stored_segment_is_no_gap() {
        crate::test_support::block_on(async {
            let store = memory_store();
            let (late, stored) = (SegmentId { log: 0, seg: 5 }, SegmentId { log: 0, seg: 6 });
            put(&store, &segment_key(1, stored), b"segment").await;
            put(&store, &layout::gap_key(&WalFileName::Segment(TimelineId(1), stored).to_string()), b"{}").await;
            let arriving = store.clone();
            let arrival = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                put(&arriving, &segment_key(1, late), b"segment").await;
            });
            let wait = wait_for_wal(&store, TimelineId(1), late, stored, 16 << 20, Compression::Lz4, waits(30_000, 0));
            wait.await.expect("the wait ends once the late segment arrives");
            arrival.await.unwrap();
        });
    }

    /// The valve dropped a segment while an archive daemon was uploading it, and backup-push
    /// looks before that upload completes: the gap record stands with the segment absent for
    /// a moment. The backup waits for it rather than fail.
    #[test]
    fn a_gap_record_whose_segment_arrives_within_the_grace_is_no_gap() {
        crate::test_support::block_on(async {
            let store = memory_store();
            let late = SegmentId { log: 0, seg: 5 };
            put(&store, &layout::gap_key(&WalFileName::Segment(TimelineId(1), late).to_string()), b"{}").await;
            let arriving = store.clone();
            let arrival = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                put(&arriving, &segment_key(1, late), b"segment").await;
            });
            let wait =
                wait_for_wal(&store, TimelineId(1), late, late, 16 << 20, Compression::Lz4, waits(30_000, 10_000));
            wait.await.expect("the wait ends once the segment the valve overtook arrives");
            arrival.await.unwrap();
        });
    }

    #[test]
    fn the_wal_timeout_counts_time_without_a_new_segment() {
        crate::test_support::block_on(async {
            let store = memory_store();
            // 1 GiB segments: four to a "log", so the wait crosses from one listing to the next.
            let seg_size = 1 << 30;
            let mut segments = vec![SegmentId { log: 0, seg: 2 }];
            for _ in 0..4 {
                segments.push(segments.last().unwrap().next(seg_size));
            }
            assert_eq!(segments[4], SegmentId { log: 1, seg: 2 });
            // The first is there; the others arrive one every 600 ms: 2.4 s in all, each
            // within the 1 s timeout of the one before.
            put(&store, &segment_key(1, segments[0]), b"wal").await;
            let arriving = {
                let (store, later) = (store.clone(), segments[1..].to_vec());
                tokio::spawn(async move {
                    for s in later {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        put(&store, &segment_key(1, s), b"wal").await;
                    }
                })
            };
            let started = Instant::now();
            wait_for_wal(
                &store,
                TimelineId(1),
                segments[0],
                segments[4],
                seg_size,
                Compression::Zstd,
                waits(1000, 1000),
            )
            .await
            .unwrap();
            assert!(started.elapsed() >= Duration::from_millis(2000), "{:?}", started.elapsed());
            arriving.await.unwrap();
            // One that never comes fails after the timeout, named.
            let next = segments[4].next(seg_size);
            let started = Instant::now();
            let err =
                wait_for_wal(&store, TimelineId(1), segments[0], next, seg_size, Compression::Lz4, waits(1000, 1000))
                    .await
                    .unwrap_err();
            assert!(matches!(err, Error::Timeout(_)), "{err:?}");
            assert!(err.to_string().contains(&WalFileName::Segment(TimelineId(1), next).to_string()), "{err}");
            assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        });
    }

    fn metadata() -> BackupMetadata {
        serde_json::from_value(serde_json::json!({
            "start_time": "2026-11-27T10:00:00Z", "finish_time": "2026-11-27T11:00:00Z",
            "date_fmt": "%Y-%m-%dT%H:%M:%S.%fZ", "hostname": "db1", "data_dir": "/var/lib/postgresql/15/main",
            "pg_version": 150004, "start_lsn": 1, "finish_lsn": 2, "is_permanent": false,
            "system_identifier": 7, "uncompressed_size": 3, "compressed_size": 3
        }))
        .unwrap()
    }

    /// `delete garbage` deleted a partition while the push waited for its WAL: the push
    /// fails, naming it, and writes no sentinel, which would list a backup without its data.
    #[test]
    fn a_partition_deleted_before_the_sentinel_fails_the_push_without_a_sentinel() {
        crate::test_support::block_on(async {
            let store = memory_store();
            let name = "base_000000010000000000000028";
            put(&store, &layout::backup_file_key(name, WRITER_FILE), b"{}").await;
            let parts = [
                layout::partition_name(1, Compression::Lz4),
                layout::partition_name(2, Compression::Lz4),
                layout::pg_control_partition_name(Compression::Lz4),
            ];
            for part in &parts {
                put(&store, &layout::partition_key(name, part), b"tar").await;
            }
            let manifest = Manifest {
                version: 1,
                backup: name.into(),
                compression: "lz4".into(),
                partitions: parts.iter().map(|p| PartitionEntry { name: p.clone(), ..Default::default() }).collect(),
            };
            let sentinel: Sentinel = serde_json::from_str(r#"{"LSN":1,"FinishLSN":2}"#).unwrap();
            let deleted = layout::partition_key(name, &parts[1]);
            store.delete(&deleted).await.unwrap();

            let err = write_documents(&store, name, manifest.clone(), &metadata(), &sentinel).await.unwrap_err();

            assert!(matches!(err, Error::NotFound(_)), "{err:?}");
            assert!(err.to_string().starts_with(&format!("{deleted} of backup {name} were deleted")), "{err}");
            assert!(store.head(&layout::sentinel_key(name)).await.unwrap().is_none(), "a sentinel was written");
            // The writer record gone too (the whole folder deleted): the same.
            put(&store, &deleted, b"tar").await;
            store.delete(&layout::backup_file_key(name, WRITER_FILE)).await.unwrap();
            let err = write_documents(&store, name, manifest.clone(), &metadata(), &sentinel).await.unwrap_err();
            assert!(err.to_string().contains(WRITER_FILE), "{err}");
            assert!(store.head(&layout::sentinel_key(name)).await.unwrap().is_none(), "a sentinel was written");
            // Everything there: the sentinel is written.
            put(&store, &layout::backup_file_key(name, WRITER_FILE), b"{}").await;
            write_documents(&store, name, manifest, &metadata(), &sentinel).await.unwrap();
            let stored = store.get_bytes(&layout::sentinel_key(name)).await.unwrap();
            assert_eq!(serde_json::from_slice::<Sentinel>(&stored).unwrap(), sentinel);
        });
    }

    /// A push waiting for its WAL writes nothing else into its folder: the writer record is
    /// rewritten (same bytes, new write time) so `delete garbage` finds the folder recent.
    #[test]
    fn the_writer_record_is_kept_recent_while_the_push_runs() {
        crate::test_support::block_on(async {
            let store = memory_store();
            let name = "base_000000010000000000000028";
            let key = layout::backup_file_key(name, WRITER_FILE);
            put(&store, &key, b"{\"pid\":1}").await;
            let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
            let Store::Memory(memory) = &*store else { unreachable!() };
            memory.set_modified(&key, two_days_ago);

            let _keep_alive =
                WriterKeepAlive::start(store.clone(), name, b"{\"pid\":1}".to_vec(), Duration::from_millis(10));
            let refreshed = async {
                loop {
                    let meta = store.head(&key).await.unwrap().unwrap();
                    if meta.modified.unwrap() > two_days_ago {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), refreshed).await.expect("the record was never rewritten");
            assert_eq!(store.get_bytes(&key).await.unwrap(), b"{\"pid\":1}");
            // With the default garbage age (24 h), once a minute; never more than every 5 s.
            assert_eq!(writer_refresh_interval(Duration::from_secs(86400)), Duration::from_secs(60));
            assert_eq!(writer_refresh_interval(Duration::from_secs(120)), Duration::from_secs(12));
            assert_eq!(writer_refresh_interval(Duration::ZERO), Duration::from_secs(5));
        });
    }

    #[test]
    fn parts_keep_any_partition_within_s3s_10000() {
        const GIB: u64 = 1 << 30;
        for (partition, largest) in [(64 * GIB, 1 << 20), (64 * GIB, 5 * GIB), (1 << 40, 1 << 20), (GIB, 100 * GIB)] {
            let part = partition_part_size(partition, largest) as u64;
            // The worst: the partition, one relation segment or the largest file beyond it,
            // and incompressible data growing by 1% on its way through lz4.
            let worst = (partition + largest.max(GIB)) / 100 * 101;
            assert!(part * S3_MAX_PARTS > worst, "{partition} + {largest}: {part}-byte parts");
            assert_eq!(part % (1 << 20), 0, "whole MiB");
        }
        // The default partitions keep S3's smallest parts, so memory stays as it was.
        assert_eq!(partition_part_size(256 << 20, 1 << 30), 5 << 20);
        assert_eq!(partition_part_size(64 * GIB, 1 << 20), 8 << 20);
    }

    #[test]
    fn a_create_whose_answer_was_lost_is_found_as_this_runs_own() {
        crate::test_support::block_on(async {
            let store = memory_store();
            let key = layout::sentinel_key("base_000000010000000000000028");
            // The first try stored it; the answer was lost, and the resend finds it.
            put(&store, &key, b"{\"FinishLSN\":1}").await;
            assert!(create_or_find_own(&store, &key, b"{\"FinishLSN\":1}".to_vec()).await.unwrap());
            // Another writer's object is not this run's.
            assert!(!create_or_find_own(&store, &key, b"{\"FinishLSN\":2}".to_vec()).await.unwrap());
            assert_eq!(store.get_bytes(&key).await.unwrap(), b"{\"FinishLSN\":1}");
            // Nothing there: stored.
            let fresh = layout::sentinel_key("base_000000010000000000000030");
            assert!(create_or_find_own(&store, &fresh, b"{}".to_vec()).await.unwrap());
        });
    }
}
