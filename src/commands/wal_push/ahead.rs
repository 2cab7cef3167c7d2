//! The records of files pushed ahead, in `pg_wal/walrs_archive_status/<name>.json`, and the
//! safety valve for a backlog that would fill the disk.
//!
//! A record alone never acknowledges anything: the file must have the recorded size and
//! sha256, and the store must hold the recorded object at the recorded size and with the
//! same sha256 in its trailer (or its metadata, for raw objects), before PostgreSQL is told
//! the file is archived. A stale record (another store, a recycled segment with new
//! content, an object replaced since) or a forged one (an object that is not there, or
//! holds other bytes) fails the check and the file is pushed as usual, which reports a
//! conflict where the store holds other bytes.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::common::recorded_sha256;
use super::file::{find_stored, local_sha256, PushContext, PushReport};
use crate::error::Error;
use crate::layout;
use crate::log::{self, Level};
use crate::store::local::fsync_dir;
use crate::store::{Metadata, ObjectKey, PutMode, PutOptions};
use crate::wal::WalFileName;

/// Folder of wal-rs's own archive status, beside PostgreSQL's `archive_status`.
pub(super) const STATUS_DIR: &str = "walrs_archive_status";

/// What was pushed ahead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Record {
    name: String,
    size: u64,
    sha256: String,
    store: String,
    key: String,
    /// The object's stored size, confirmed again before acknowledging.
    stored_size: u64,
    /// The file's identity when it was hashed: same device, inode, size, mtime and ctime
    /// mean the same bytes (ctime changes with any write and cannot be set back), so the
    /// acknowledgement need not hash 16 MiB again.
    file: FileStamp,
}

/// Device, inode and change times of a file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    pub(super) size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    pub(super) fn of(path: &Path) -> Option<FileStamp> {
        fs::metadata(path).ok().map(|m| FileStamp::from_metadata(&m))
    }

    /// The stamp of an open file (its `fstat`).
    pub(super) fn from_metadata(m: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

pub(super) struct StatusDir {
    pg_wal: PathBuf,
    dir: PathBuf,
}

impl StatusDir {
    pub(super) fn new(pg_wal: &Path) -> StatusDir {
        StatusDir { pg_wal: pg_wal.to_path_buf(), dir: pg_wal.join(STATUS_DIR) }
    }

    /// The pg_wal folder.
    pub(super) fn pg_wal(&self) -> &Path {
        &self.pg_wal
    }

    /// The WAL file `name` in pg_wal.
    pub(super) fn file(&self, name: &str) -> PathBuf {
        self.pg_wal.join(name)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Acknowledges `name` from its record if the file and the store both confirm it.
    pub(super) async fn acknowledge(&self, ctx: &PushContext, path: &Path, name: &str) -> Option<PushReport> {
        let record_path = self.path_of(name);
        let record: Record = serde_json::from_slice(&fs::read(&record_path).ok()?).ok()?;
        // Whatever the outcome, the record has served: a failed check falls back to a push.
        let _ = fs::remove_file(&record_path);
        let stamp = FileStamp::of(path)?;
        if record.name != name || record.size != stamp.size || record.store != ctx.store.url() {
            return None;
        }
        // The object must be where this name's objects go, not any object.
        let wal_name = WalFileName::parse(name).ok()?;
        let key = ObjectKey::new(&record.key).ok()?;
        // Only a compression wal-rs reads: a push refuses objects of other tools' formats.
        let (_, compression) =
            layout::wal_candidates(&wal_name, ctx.config.compression).into_iter().find(|(k, _)| *k == key)?;
        let compression = compression?;
        // The same file as hashed at push time, or the same bytes by a new hash.
        let same_file = record.file == stamp;
        let (sha, held) = tokio::join!(
            async {
                if same_file {
                    record.sha256.parse().ok()
                } else {
                    local_sha256(path).await.ok()
                }
            },
            // Bounded as the valve's requests are: a store that never answers must leave
            // the call its time to push the file or drop it (see `drop_if_over_queue_limit`).
            tokio::time::timeout(store_probe_time(&ctx.config.retry), recorded_sha256(&ctx.store, &key, compression))
        );
        let sha: crate::codec::Sha256 = sha?;
        let (stored_size, held_sha) = held.ok()?.ok()??;
        if sha.to_string() != record.sha256 || stored_size != record.stored_size || stored_size == 0 {
            return None;
        }
        // The store's own record of what it holds: the size alone does not tell raw objects
        // apart, all of one segment size. Encrypted objects keep their trailer sealed; for
        // them the recorded size, which includes the sealing, stands. Without encryption a
        // missing checksum means the store did not give back the object's tail: no proof.
        match held_sha {
            Some(held) if held != sha => return None,
            None if crate::crypto::ring().is_none() => return None,
            _ => {}
        }
        Some(PushReport {
            bytes_in: stamp.size,
            bytes_stored: 0,
            outcome: "archived-ahead",
            sha256: Some(sha),
            key: Some(key),
        })
    }

    /// Records a file pushed ahead; `before` is its stamp from before the push, and nothing is
    /// recorded if the file changed meanwhile.
    pub(super) async fn record(&self, ctx: &PushContext, name: &str, report: &PushReport, before: Option<FileStamp>) {
        let (Some(sha), Some(key)) = (report.sha256, &report.key) else { return };
        let Some(stamp) = before.filter(|b| Some(*b) == FileStamp::of(&self.file(name))) else { return };
        // The stored size, for the acknowledgement to compare (a push that found the object
        // already there did not upload it, so ask the store).
        let stored_size = if report.outcome == "stored" {
            report.bytes_stored
        } else {
            match ctx.store.head(key).await {
                Ok(Some(meta)) => meta.size,
                _ => return,
            }
        };
        let record = Record {
            name: name.to_string(),
            size: report.bytes_in,
            sha256: sha.to_string(),
            store: ctx.store.url(),
            key: key.to_string(),
            stored_size,
            file: stamp,
        };
        // A lost record only costs a normal push later, so no fsync.
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(&self.dir)?;
            let temp = self.dir.join(format!(".{name}.{}", std::process::id()));
            fs::write(&temp, serde_json::to_vec(&record).expect("records serialise"))?;
            fs::rename(&temp, self.path_of(name))
        };
        if let Err(e) = write() {
            log::emit(
                Level::Warn,
                &[("op", &"wal-push"), ("file", &name), ("error", &format!("cannot record push-ahead: {e}"))],
            );
        }
    }

    /// Ready files to push ahead of `current`: history files first, then oldest first, at
    /// most `limit`, skipping those already recorded.
    pub(super) fn ready_files(&self, current: &str, limit: usize) -> Vec<String> {
        if limit == 0 {
            return Vec::new();
        }
        let mut ready = self.ready_names();
        ready.retain(|n| n != current && !self.path_of(n).exists());
        ready.truncate(limit);
        ready
    }

    /// The WAL files PostgreSQL has marked ready: history files first, then oldest first.
    pub(super) fn ready_names(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.pg_wal.join("archive_status")) else { return Vec::new() };
        let mut ready: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_string))
            .filter(|n| WalFileName::parse(n).is_ok())
            .collect();
        ready.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
        ready
    }

    /// Where the valve keeps the gap records the store could not take.
    fn local_gaps(&self) -> PathBuf {
        self.dir.join("gaps")
    }

    /// Keeps the gap record of `name` in pg_wal, durably: PostgreSQL may remove the segment
    /// once the call returns, and the record must outlive a crash as the segment would have.
    pub(super) fn keep_gap_locally(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let local = self.local_gaps();
        let record = local.join(format!("{name}.json"));
        // Written whole or not at all: a later push uploads what it finds here.
        let temp = local.join(format!(".{name}.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(&local)?;
            let mut file = fs::File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temp, &record)?;
            // The record's entry, and those of the folders if they were just created.
            for dir in [&local, &self.dir, &self.pg_wal] {
                fsync_dir(dir).map_err(std::io::Error::other)?;
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::local(
                "keep the valve's gap record (the store took none, so nothing was dropped; fix this folder or the store)",
                &record,
                e,
            )
        })
    }

    /// Whether the valve kept any gap record locally: one `read_dir`.
    pub(super) fn has_local_gaps(&self) -> bool {
        fs::read_dir(self.local_gaps()).is_ok_and(|mut entries| {
            entries.any(|e| {
                e.is_ok_and(|e| e.file_name().to_str().is_some_and(|n| !n.starts_with('.') && n.ends_with(".json")))
            })
        })
    }

    /// Uploads the gap records the valve had to keep locally (the store was down when it
    /// dropped), removing each once stored: only records in the store are seen by
    /// backup-list and wal-verify. Costs one `read_dir` when there are none.
    pub(super) async fn upload_local_gaps(&self, ctx: &PushContext) {
        let Ok(entries) = fs::read_dir(self.local_gaps()) else { return };
        for entry in entries.filter_map(|e| e.ok()) {
            let file = entry.file_name();
            // Temporary files start with a dot, which no WAL file name does.
            let Some(name) = file.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
            if WalFileName::parse(name).is_err() {
                continue;
            }
            let Ok(bytes) = fs::read(entry.path()) else { continue };
            let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
            if let Err(e) = ctx.store.put_bytes(&layout::gap_key(name), bytes, opts).await {
                let path = entry.path();
                let error =
                    format!("cannot upload the gap record {}: {e}; a later wal-push tries again", path.display());
                log::emit(Level::Warn, &[("op", &"wal-push"), ("file", &name), ("error", &error)]);
                // The store is failing again: the rest waits for a later call too.
                return;
            }
            let _ = fs::remove_file(entry.path());
        }
    }

    /// Removes records of files PostgreSQL no longer has (archived and recycled).
    pub(super) fn prune(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.filter_map(|e| e.ok()) {
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
            if !self.file(name).exists() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether pg_wal's backlog, counting every file waiting, is over the valve's limit. When
/// it is not, what a daemon holds (which only lowers the count) cannot change the answer,
/// so the daemon need not be asked on every push.
pub(super) fn backlog_over_limit(ctx: &PushContext, status: &StatusDir) -> bool {
    let limit = ctx.config.archive.queue_max_bytes;
    limit > 0 && waiting_bytes(status, &HashSet::new()) > limit
}

/// The safety valve (`archive_queue_max_bytes`, off by default): when more than that many
/// bytes of ready WAL wait in pg_wal, acknowledge `name` without archiving it, loudly, and
/// record the gap in the store (and locally when the store cannot take it), so that
/// verification and backup-list show that recovery past it is impossible; a later push
/// uploads the local records. A segment found stored already is acknowledged instead, and a
/// store of another cluster fails the call as it would without the valve. With no gap
/// record anywhere, nothing is dropped: the call fails.
///
/// Only WAL segments are ever dropped: a timeline history file is a few bytes and recovery
/// cannot follow its timeline without it, and a `.partial` or backup history file is one of
/// a kind. Ready segments already pushed ahead do not count: PostgreSQL's next calls
/// acknowledge them at once. Those are the ones with a record, and `held`: what the archive
/// daemon says it holds stored, which it keeps in memory only. Either can only keep a
/// segment from being dropped, never acknowledge one: a stale or forged record or answer
/// at worst lets the backlog grow as it would without the valve.
///
/// The valve is there for a store that is down, which often means one that takes
/// connections and never answers: each store request here gets [`store_probe_time`], not
/// the command's deadline, and one that does not answer in that time counts as a store that
/// cannot be asked.
pub(super) async fn drop_if_over_queue_limit(
    ctx: &PushContext,
    status: &StatusDir,
    path: &Path,
    name: &str,
    held: &HashSet<String>,
) -> Result<Option<PushReport>, Error> {
    let limit = ctx.config.archive.queue_max_bytes;
    // A segment the daemon holds stored is its to acknowledge, from memory.
    if limit == 0 || held.contains(name) || !matches!(WalFileName::parse(name), Ok(WalFileName::Segment(..))) {
        return Ok(None);
    }
    let waiting = waiting_bytes(status, held);
    if waiting <= limit {
        return Ok(None);
    }
    // Only what is not stored may be dropped: a segment already stored is acknowledged, not
    // reported missing. A store of another cluster (or holding other bytes under this name)
    // is a configuration error, never a reason to write a gap record into it. A store that
    // cannot be asked is what the valve is for: drop, with a local record if need be.
    let probe = store_probe_time(&ctx.config.retry);
    let store_answers = match tokio::time::timeout(probe, find_stored(ctx, path)).await {
        Ok(Ok(Some(report))) => return Ok(Some(report)),
        Ok(Err(e)) if belongs_elsewhere(&e) => return Err(e),
        Ok(Ok(None) | Err(_)) => true,
        Err(_) => false,
    };
    let gap = serde_json::json!({
        "name": name,
        "dropped_at": crate::backup::sentinel::format_time(time::OffsetDateTime::now_utc()),
        "waiting_bytes": waiting,
        "limit_bytes": limit,
    });
    let bytes = serde_json::to_vec_pretty(&gap).expect("gap records serialise");
    // A store that just did not answer is not made to time out again.
    let in_store = store_answers && store_gap(ctx, name, &bytes, probe).await;
    if !in_store {
        status.keep_gap_locally(name, &bytes)?;
    }
    log::emit(
        Level::Error,
        &[
            ("op", &"wal-push"),
            ("file", &name),
            ("outcome", &"dropped"),
            ("waiting_bytes", &waiting),
            ("limit_bytes", &limit),
            (
                "error",
                &"WAL DROPPED UNARCHIVED to keep pg_wal from filling (archive_queue_max_bytes): recovery past this segment is impossible; take a new base backup once archiving keeps up",
            ),
        ],
    );
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(Some(PushReport { bytes_in: size, bytes_stored: 0, outcome: "dropped", sha256: None, key: None }))
}

/// Bytes of ready WAL waiting in pg_wal, leaving out what is pushed ahead (a record) or
/// `held` by the daemon.
fn waiting_bytes(status: &StatusDir, held: &HashSet<String>) -> u64 {
    fs::read_dir(status.pg_wal.join("archive_status"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_string))
                .filter(|n| !held.contains(n) && !status.path_of(n).exists())
                .filter_map(|n| fs::metadata(status.file(&n)).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// How long the valve waits for one answer of the store: one request's time, and at most a
/// quarter of the deadline, so that a lookup and a gap record both fit well within it.
pub(super) fn store_probe_time(retry: &crate::config::RetrySettings) -> Duration {
    retry.request_timeout.min(retry.deadline / 4)
}

/// Puts the gap record of `name` into the store within `wait`; whether it is there.
async fn store_gap(ctx: &PushContext, name: &str, bytes: &[u8], wait: Duration) -> bool {
    let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
    let key = layout::gap_key(name);
    let put = ctx.store.put_bytes(&key, bytes.to_vec(), opts);
    let error = match tokio::time::timeout(wait, put).await {
        Ok(Ok(_)) => return true,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} s", wait.as_secs_f32()),
    };
    let error = format!("cannot store the gap record of {name}: {error}; it is kept in pg_wal for a later wal-push");
    log::emit(Level::Warn, &[("op", &"wal-push"), ("file", &name), ("error", &error)]);
    false
}

/// Whether `e` says the store is not this cluster's archive (or not for this file): a
/// configuration to fix, not a store to write gap records into.
fn belongs_elsewhere(e: &Error) -> bool {
    matches!(e, Error::ClusterMismatch { .. } | Error::VersionMismatch { .. } | Error::Conflict { .. })
}

#[cfg(test)]
mod tests {
    use super::super::file::push_file;
    use super::super::file::tests::{default_config, memory_context, write_segment};
    use super::*;
    use crate::test_support::block_on;

    const NAME: &str = "000000010000000000000007";

    /// A pg_wal with `NAME` of the cluster `sysid` marked ready, and a context whose valve
    /// opens at once.
    fn over_the_limit(sysid: u64) -> (tempfile::TempDir, StatusDir, std::sync::Arc<PushContext>, PathBuf) {
        let pg_wal = tempfile::tempdir().unwrap();
        fs::create_dir(pg_wal.path().join("archive_status")).unwrap();
        fs::write(pg_wal.path().join("archive_status").join(format!("{NAME}.ready")), b"").unwrap();
        let path = write_segment(pg_wal.path(), NAME, sysid, 0);
        let mut config = default_config();
        config.archive.queue_max_bytes = 1;
        let status = StatusDir::new(pg_wal.path());
        (pg_wal, status, memory_context(config), path)
    }

    async fn gaps_in_store(ctx: &PushContext) -> Vec<String> {
        ctx.store.list(layout::GAP_PREFIX).await.unwrap().iter().map(|m| m.key.to_string()).collect()
    }

    #[test]
    fn the_valve_drops_a_segment_not_stored_and_records_the_gap() {
        let (_pg_wal, status, ctx, path) = over_the_limit(1);
        block_on(async {
            let report = drop_if_over_queue_limit(&ctx, &status, &path, NAME, &HashSet::new()).await.unwrap().unwrap();
            assert_eq!(report.outcome, "dropped");
            assert_eq!(gaps_in_store(&ctx).await, [format!("walrs/gaps/{NAME}.json")]);
        });
    }

    #[test]
    fn the_valve_acknowledges_a_segment_already_stored_without_a_gap() {
        let (_pg_wal, status, ctx, path) = over_the_limit(1);
        block_on(async {
            push_file(&ctx, &path).await.unwrap();
            let report = drop_if_over_queue_limit(&ctx, &status, &path, NAME, &HashSet::new()).await.unwrap().unwrap();
            assert_eq!(report.outcome, "already-archived");
            assert!(gaps_in_store(&ctx).await.is_empty());
        });
    }

    #[test]
    fn the_valve_never_records_a_gap_in_another_clusters_store() {
        let (pg_wal, status, ctx, path) = over_the_limit(1);
        block_on(async {
            // The store belongs to cluster 2.
            let theirs = tempfile::tempdir().unwrap();
            push_file(&ctx, &write_segment(theirs.path(), "000000010000000000000001", 2, 0)).await.unwrap();
            let err = drop_if_over_queue_limit(&ctx, &status, &path, NAME, &HashSet::new()).await.unwrap_err();
            assert!(matches!(err, Error::ClusterMismatch { .. }), "{err}");
            assert!(gaps_in_store(&ctx).await.is_empty());
            assert!(!pg_wal.path().join(STATUS_DIR).join("gaps").exists());
        });
    }

    /// A drop must leave a gap record somewhere: PostgreSQL may delete the segment on exit
    /// 0. With the store refusing the record and the local folder unusable (`gaps` a regular
    /// file), the call fails instead of dropping.
    #[test]
    fn the_valve_fails_rather_than_drop_with_no_gap_record_anywhere() {
        let (pg_wal, status, _, path) = over_the_limit(1);
        let root = tempfile::tempdir().unwrap();
        let mut config = default_config();
        config.archive.queue_max_bytes = 1;
        config.store = Some(crate::config::StoreUrl::File(root.path().to_path_buf()));
        // Where the store's gap records and the local ones go: files, not folders.
        fs::create_dir_all(root.path().join("walrs")).unwrap();
        fs::write(root.path().join(layout::GAP_PREFIX.trim_end_matches('/')), b"").unwrap();
        fs::create_dir_all(pg_wal.path().join(STATUS_DIR)).unwrap();
        fs::write(pg_wal.path().join(STATUS_DIR).join("gaps"), b"").unwrap();
        let result = block_on(async {
            let store = super::super::super::common::open_store(&config).await.unwrap();
            let ctx = PushContext::new(store, config.clone());
            drop_if_over_queue_limit(&ctx, &status, &path, NAME, &HashSet::new()).await
        });
        let err = result.map(|r| r.map(|r| r.outcome)).unwrap_err();
        assert!(matches!(err, Error::LocalIo { .. }) && err.to_string().contains(NAME), "{err}");
    }

    #[test]
    fn gap_records_kept_locally_are_uploaded_later_and_then_removed() {
        let (pg_wal, status, ctx, _) = over_the_limit(1);
        let local = pg_wal.path().join(STATUS_DIR).join("gaps");
        fs::create_dir_all(&local).unwrap();
        let record = local.join("000000010000000000000003.json");
        fs::write(&record, br#"{"name":"000000010000000000000003"}"#).unwrap();
        // A writer's temporary file is left alone.
        fs::write(local.join(".000000010000000000000004.123"), b"{").unwrap();
        block_on(async {
            status.upload_local_gaps(&ctx).await;
            let key = layout::gap_key("000000010000000000000003");
            assert_eq!(ctx.store.get_bytes(&key).await.unwrap(), br#"{"name":"000000010000000000000003"}"#);
            assert_eq!(gaps_in_store(&ctx).await.len(), 1);
        });
        assert!(!record.exists());
    }
}
