//! `wal-rs backup-push PGDATA`: a base backup through the non-exclusive backup API, streamed
//! into tar partitions that are compressed and uploaded concurrently.
//!
//! Phases: start the backup; walk the data directory and tablespaces into partitions
//! (several at once, each read -> tar -> compress -> upload); stop the backup; write the
//! backup_label partition and then `pg_control` last; wait until every WAL segment from the
//! start to the stop LSN is in the store (checked in the store itself); write metadata and
//! manifest; write the sentinel last. A backup interrupted anywhere before the sentinel is
//! not listed and leaves only garbage for `delete garbage`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::open_store;
use crate::backup::manifest::{Manifest, PartitionEntry};
use crate::backup::partition::{PartitionError, PartitionWriter};
use crate::backup::sentinel::{format_time, BackupMetadata, Sentinel, Tablespace};
use crate::backup::walk::{self, EntryKind};
use crate::codec::Compression;
use crate::config::Config;
use crate::error::Error;
use crate::identity;
use crate::layout;
use crate::log::{self, Level};
use crate::pg::{backup_api, conn};
use crate::progress::Progress;
use crate::store::{into_store_error, Metadata, PutMode, PutOptions, PutOutcome, Store};
use crate::wal::{Lsn, SegmentId, WalFileName};

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
    // Memory is parts: each partition written at once holds the part it fills plus the parts
    // in flight. So s3_upload_concurrency is the budget of the whole backup, shared by the
    // partitions, and partitions go up in S3's smallest parts (5 MiB; a partition stays far
    // below 10,000 of them): about 30 MiB of buffers whatever the database size.
    let mut shared = config.clone();
    shared.s3.upload_concurrency = (config.s3.upload_concurrency / config.backup.concurrency.max(1)).max(1);
    shared.s3.part_size = config.s3.part_size.min(5 << 20);
    let config = &shared;
    let store = open_store(config).await?;
    let client = conn::connect(pg_url).await?;
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
    let name = reserve_backup_name(&store, &start_file, start_lsn, info.wal_segment_size).await?;
    let tablespaces = walk::tablespaces(&pgdata).map_err(|e| Error::local("read", &pgdata.join("pg_tblspc"), e))?;
    log::emit(
        Level::Info,
        &[("op", &"backup-push"), ("backup", &name), ("start_lsn", &start_lsn), ("outcome", &"started")],
    );

    let total = total_size(&pgdata, &tablespaces);
    let progress = Arc::new(Progress::new("backup-push", total));
    let job = DataJob {
        store: store.clone(),
        name: name.clone(),
        pgdata: pgdata.clone(),
        tablespaces: tablespaces.clone(),
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
    wait_for_wal(&store, timeline, first, last, info.wal_segment_size, config).await?;
    let wal_wait_ms = wal_started.elapsed().as_millis();

    let finished = time::OffsetDateTime::now_utc();
    let uncompressed: u64 = partitions.iter().map(|p| p.tar_size).sum();
    let stored: u64 = partitions.iter().map(|p| p.stored_size).sum();
    let file_count: usize = partitions.iter().map(|p| p.files.len()).sum();
    let hostname = hostname();
    let data_dir = pgdata.display().to_string();
    let manifest = Manifest {
        version: 1,
        backup: name.clone(),
        compression: config.compression.to_string(),
        partitions: partitions.clone(),
    };
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
    let overwrite = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
    store.put_bytes(&layout::backup_file_key(&name, "metadata.json"), to_json(&metadata), overwrite.clone()).await?;
    crate::backup::manifest::store_manifest(&store, &name, &manifest).await?;
    let create = PutOptions { mode: PutMode::Create, metadata: Metadata::new() };
    if store.put_bytes(&layout::sentinel_key(&name), to_json(&sentinel), create).await? == PutOutcome::AlreadyExists {
        return Err(Error::AlreadyExists(format!(
            "backup {name} already exists in {}: run backup-push again",
            store.url()
        )));
    }
    Ok(PushedBackup {
        name,
        start_lsn: start_lsn.to_string(),
        finish_lsn: stop.stop_lsn.to_string(),
        partitions: partitions.len(),
        files: file_count,
        uncompressed_bytes: uncompressed,
        stored_bytes: stored,
        wal_wait_ms,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("backup documents serialise")
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
) -> Result<String, Error> {
    let plain = format!("base_{start_file}");
    let offset = format!("{plain}_{:08X}", start_lsn.0 % seg_size as u64);
    let writer = to_json(&serde_json::json!({
        "hostname": hostname(),
        "pid": std::process::id(),
        "started": format_time(time::OffsetDateTime::now_utc()),
    }));
    let create = PutOptions { mode: PutMode::Create, metadata: Metadata::new() };
    for n in 0..MAX_NAME_TRIES {
        let name = match n {
            0 => plain.clone(),
            1 => offset.clone(),
            n => format!("{offset}_{n}"),
        };
        if store.head(&layout::sentinel_key(&name)).await?.is_some() {
            continue;
        }
        let record = layout::backup_file_key(&name, WRITER_FILE);
        if store.put_bytes(&record, writer.clone(), create.clone()).await? == PutOutcome::Stored {
            return Ok(name);
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

/// Sum of the file sizes to back up, for the progress bar (a stat-only walk).
fn total_size(pgdata: &Path, tablespaces: &[Tablespace]) -> u64 {
    let mut total = 0;
    let _ = walk::walk(pgdata, tablespaces, &mut |e| {
        if let EntryKind::File { size } = e.kind {
            total += size;
        }
        true
    });
    total
}

/// The data partitions: a walker thread feeds entries to `concurrency` workers, each filling
/// its own partition and starting a new one past the size limit.
struct DataJob {
    store: Arc<Store>,
    name: String,
    pgdata: PathBuf,
    tablespaces: Vec<Tablespace>,
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
                let result = walk::walk(&self.pgdata, &self.tablespaces, &mut |e| {
                    !failed.load(Ordering::Relaxed) && tx.send(e).is_ok()
                });
                drop(tx);
                if let Err(e) = result {
                    fail(Error::local("read", &self.pgdata, e));
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
                    PartitionWriter::new(part, object, self.compression, self.level)
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
        let mut p =
            PartitionWriter::new(part, object, compression, level).map_err(|e| into_store_error(e, "write", &key))?;
        for (rel, bytes) in &files {
            p.append_bytes(rel, bytes, 0o600).map_err(|e| partition_error(e, &backup))?;
        }
        publish(p, &backup)
    })
    .await
    .expect("the partition task panicked")
}

/// Waits until every segment from `first` to `last` on `timeline` is in the store.
async fn wait_for_wal(
    store: &Arc<Store>,
    timeline: crate::wal::TimelineId,
    first: SegmentId,
    last: SegmentId,
    seg_size: u32,
    config: &Config,
) -> Result<(), Error> {
    let deadline = Instant::now() + config.backup.wal_timeout;
    let mut segment = first;
    loop {
        let name = WalFileName::Segment(timeline, segment);
        let keys: Vec<_> = layout::wal_candidates(&name, config.compression).into_iter().map(|(k, _)| k).collect();
        let mut delay = Duration::from_millis(100);
        while store.find_first(&keys).await?.is_none() {
            if Instant::now() + delay > deadline {
                return Err(Error::Timeout(format!(
                    "WAL segment {name} of the backup did not reach {} within {} s: check archive_command (wal-rs wal-push %p) and pg_stat_archiver, then run backup-push again",
                    store.url(),
                    config.backup.wal_timeout.as_secs()
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        if segment == last {
            return Ok(());
        }
        segment = segment.next(seg_size);
    }
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
            let reserve = || reserve_backup_name(&store, &start, lsn, 16 << 20);
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
            let name = reserve_backup_name(&store, &other, Lsn(0x30_0000_0100), 16 << 20).await.unwrap();
            assert_eq!(name, "base_000000010000000000000030_00000100");
        });
    }
}
