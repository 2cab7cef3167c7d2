//! Archiving one WAL file: the unit of work of wal-push, for the file PostgreSQL asked for
//! and for the ready files pushed ahead of it.
//!
//! Order of work: validate the file (name, size, page header) before touching the store;
//! then, at once, check the cluster identity (a history or backup history file's by the
//! cluster of the folder it is pushed from) and look for an object already under the name;
//! then stream read -> compress -> hash -> upload, and publish only if nothing is there and
//! the file is still the one opened, untouched.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::super::common::{stored_sha256, SHA256_METADATA};
use super::ahead::FileStamp;
use crate::codec::{self, Compression, EncodeError, EncodeSummary, Sha256};
use crate::config::Config;
use crate::error::Error;
use crate::identity::{self, Owner};
use crate::layout;
use crate::log::{self, Level};
use crate::store::{into_store_error, Metadata, ObjectKey, PutMode, PutOptions, PutOutcome, Store};
use crate::wal::page::LONG_HEADER_SIZE;
use crate::wal::{SegmentHeader, WalFileName};

/// History and backup history files are a few lines of text; anything this big is not one.
const MAX_TEXT_FILE: u64 = 16 << 20;

/// What one push did, for the log line.
#[derive(Debug, Clone)]
pub(crate) struct PushReport {
    pub(crate) bytes_in: u64,
    pub(crate) bytes_stored: u64,
    pub(crate) outcome: &'static str,
    /// sha256 of the file, when this push computed it.
    pub(crate) sha256: Option<Sha256>,
    /// The object holding the file.
    pub(crate) key: Option<ObjectKey>,
}

/// What pushes in one process share: the store, and the cluster that owns it, read (or
/// recorded) once and compared with every segment's page header.
pub(crate) struct PushContext {
    pub(crate) store: Arc<Store>,
    pub(crate) config: Config,
    owner: tokio::sync::OnceCell<Owner>,
    /// The configuration's digest for the daemon's socket, computed once (it reads the
    /// environment and stats the AWS profile files) however many requests a call sends.
    fingerprint: std::sync::OnceLock<String>,
}

impl PushContext {
    pub(crate) fn new(store: Arc<Store>, config: Config) -> Arc<PushContext> {
        Arc::new(PushContext {
            store,
            config,
            owner: tokio::sync::OnceCell::new(),
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    /// See [`crate::commands::background::fingerprint`].
    pub(crate) fn fingerprint(&self) -> &str {
        self.fingerprint.get_or_init(|| crate::commands::background::fingerprint(&self.config))
    }

    /// Checks that the store belongs to the cluster of this segment. Only the first segment
    /// costs a store request: a daemon pushes for hours with one context, and each of its
    /// segments must still be compared, not just whichever came first.
    async fn check_identity(&self, name: &WalFileName, header: &SegmentHeader) -> Result<(), Error> {
        let owner = self.owner.get_or_try_init(|| identity::check_or_record(&self.store, name, header)).await?;
        owner.check(&name.to_string(), Owner::of(header), &self.store.url())
    }

    /// Checks that a timeline or backup history file at `path`, which names no cluster,
    /// comes from the store's: another cluster's history file would lead a recovery to
    /// 'latest' onto its timeline. Its cluster is that of its WAL folder; when that cannot
    /// be read, the file is pushed unchecked, as it always was, with a warning. A store
    /// with no owner yet has nothing to compare with, and none is recorded from a file
    /// that carries no page header.
    async fn check_folder_identity(&self, name: &WalFileName, path: &Path) -> Result<(), Error> {
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // archive_command runs in the data directory.
        let Some(system_identifier) = identity::cluster_of_wal_folder(Path::new("."), folder) else {
            log::emit(
                Level::Warn,
                &[
                    ("op", &"wal-push"),
                    ("file", &name),
                    (
                        "error",
                        &format!(
                            "cannot tell which cluster {} comes from (no global/pg_control for its folder in the working directory, no readable segment beside it): pushed without comparing it with the store's cluster; run wal-push from the data directory",
                            path.display()
                        ),
                    ),
                ],
            );
            return Ok(());
        };
        // Read, not cached in `owner`: a segment's first check also checks the encryption
        // mark (see `identity::check_or_record`), which must not be skipped.
        let owner = match self.owner.get() {
            Some(owner) => Some(*owner),
            None => identity::recorded_owner(&self.store).await?,
        };
        match owner {
            Some(owner) => owner.check_system_identifier(&name.to_string(), system_identifier, &self.store.url()),
            None => Ok(()),
        }
    }
}

/// A WAL file checked against its name and kept open, with its stamp from when it was
/// opened: the upload must read exactly that file.
struct Opened {
    name: WalFileName,
    file: File,
    size: u64,
    stamp: FileStamp,
    /// The segment's page header; `None` for history and backup history files.
    header: Option<SegmentHeader>,
}

/// Opens the file at `path` and checks that it is what its name says.
fn open_checked(path: &Path) -> Result<Opened, Error> {
    let invalid = |reason: String| Error::InvalidInput { path: path.display().to_string(), reason };
    let file_name =
        path.file_name().and_then(|n| n.to_str()).ok_or_else(|| invalid("the path has no file name".into()))?;
    let name = WalFileName::parse(file_name).map_err(|e| invalid(e.to_string()))?;
    let file = File::open(path).map_err(|e| Error::local("open", path, e))?;
    let metadata = file.metadata().map_err(|e| Error::local("stat", path, e))?;
    let size = metadata.len();
    let header = check_file(&file, path, &name, size)?;
    Ok(Opened { name, file, size, stamp: FileStamp::from_metadata(&metadata), header })
}

/// Archives the file at `path`.
pub(crate) async fn push_file(ctx: &PushContext, path: &Path) -> Result<PushReport, Error> {
    let opened = open_checked(path)?;
    if let Some(report) = stored_copy(ctx, path, &opened).await? {
        return Ok(report);
    }
    store_new(ctx, path, opened).await
}

/// The report of a push, if the file at `path` is archived already with the same bytes;
/// uploads nothing. A store of another cluster, or holding other bytes under the name, is
/// an error.
pub(super) async fn find_stored(ctx: &PushContext, path: &Path) -> Result<Option<PushReport>, Error> {
    let opened = open_checked(path)?;
    stored_copy(ctx, path, &opened).await
}

/// Checks the cluster identity and, at once, looks for an object already under the name:
/// `None` if there is none.
async fn stored_copy(ctx: &PushContext, path: &Path, opened: &Opened) -> Result<Option<PushReport>, Error> {
    let store = &ctx.store;
    let name = &opened.name;
    let candidates = layout::wal_candidates(name, ctx.config.compression);
    let keys: Vec<ObjectKey> = candidates.iter().map(|(k, _)| k.clone()).collect();
    let (identity, existing) = tokio::join!(
        async {
            match &opened.header {
                Some(h) => ctx.check_identity(name, h).await,
                None => ctx.check_folder_identity(name, path).await,
            }
        },
        store.find_first(&keys),
    );
    identity?;
    let Some(found) = existing? else { return Ok(None) };
    let compression = candidates
        .iter()
        .find(|(k, _)| *k == found.key)
        .and_then(|(_, c)| *c)
        .ok_or_else(|| Error::Unsupported { key: format!("{}/{}", store.url(), found.key) })?;
    let local = local_sha256(path).await?;
    same_content_or_conflict(store, name, &found.key, compression, local).await?;
    // Another writer may have been killed between linking it in and its directory
    // fsync: PostgreSQL recycles the segment on our exit 0.
    store.make_durable(&found.key).await?;
    Ok(Some(PushReport {
        bytes_in: opened.size,
        bytes_stored: 0,
        outcome: "already-archived",
        sha256: Some(local),
        key: Some(found.key),
    }))
}

/// Streams the file into a new object, published only if nothing is there yet.
async fn store_new(ctx: &PushContext, path: &Path, opened: Opened) -> Result<PushReport, Error> {
    let config = &ctx.config;
    let store = ctx.store.clone();
    let name = opened.name;
    let key = layout::wal_key(&name, config.compression);
    let (compression, level) = (config.compression, config.zstd_level);
    let upload_store = store.clone();
    let upload_key = key.clone();
    let upload_path = path.to_path_buf();
    let (summary, outcome) = tokio::task::spawn_blocking(move || {
        upload(&upload_store, &upload_key, opened, &upload_path, compression, level)
    })
    .await
    .expect("the upload task panicked")?;
    match outcome {
        PutOutcome::Stored => Ok(PushReport {
            bytes_in: summary.bytes_in,
            bytes_stored: summary.bytes_out,
            outcome: "stored",
            sha256: Some(summary.sha256),
            key: Some(key),
        }),
        // Someone stored it between our look and our write.
        PutOutcome::AlreadyExists => {
            same_content_or_conflict(&store, &name, &key, compression, summary.sha256).await?;
            Ok(PushReport {
                bytes_in: summary.bytes_in,
                bytes_stored: 0,
                outcome: "already-archived",
                sha256: Some(summary.sha256),
                key: Some(key),
            })
        }
    }
}

/// Checks that the file is what its name says; returns the segment header for segments.
fn check_file(file: &File, path: &Path, name: &WalFileName, size: u64) -> Result<Option<SegmentHeader>, Error> {
    let invalid = |reason: String| Error::InvalidInput { path: path.display().to_string(), reason };
    match name.wal_segment() {
        Some(segment) => {
            let mut first = [0u8; LONG_HEADER_SIZE];
            let n = read_at_most(file, &mut first).map_err(|e| Error::local("read", path, e))?;
            let header =
                SegmentHeader::parse(&first[..n], name.timeline(), segment).map_err(|e| invalid(e.to_string()))?;
            if size != header.segment_size as u64 {
                return Err(invalid(format!(
                    "file is {size} bytes but its header says segments are {} bytes: a truncated or damaged segment",
                    header.segment_size
                )));
            }
            Ok(Some(header))
        }
        None => {
            // History and backup history files are short text written by PostgreSQL.
            if size == 0 || size > MAX_TEXT_FILE {
                return Err(invalid(format!("a {} file of {size} bytes is not one PostgreSQL writes", kind(name))));
            }
            let mut head = vec![0u8; size.min(4096) as usize];
            let n = read_at_most(file, &mut head).map_err(|e| Error::local("read", path, e))?;
            // Text in the server encoding, not necessarily UTF-8: a LATIN1 backup label or
            // restore point name is written as is, and refusing it would stall archiving
            // (and pg_backup_stop) for good. A NUL byte, as in any WAL segment's first
            // bytes, is what tells a binary file misnamed as one of these.
            if head[..n].contains(&0) {
                return Err(invalid(format!(
                    "a {} file is text, and this one holds NUL bytes: check that it is not a segment under the wrong name",
                    kind(name)
                )));
            }
            Ok(None)
        }
    }
}

fn kind(name: &WalFileName) -> &'static str {
    match name {
        WalFileName::History(_) => "timeline history",
        _ => "backup history",
    }
}

fn read_at_most(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Streams the opened file into a new object. Blocking.
fn upload(
    store: &Store,
    key: &ObjectKey,
    opened: Opened,
    path: &Path,
    compression: Compression,
    level: i32,
) -> Result<(EncodeSummary, PutOutcome), Error> {
    let mut file = opened.file;
    let mut metadata = Metadata::new();
    if !compression.has_trailer() {
        // No trailer for raw objects: the checksum travels as metadata, which must be
        // known before the upload starts.
        let sha = codec::sha256_of(&mut file).map_err(|e| Error::local("read", path, e))?;
        file.seek(SeekFrom::Start(0)).map_err(|e| Error::local("read", path, e))?;
        metadata.insert(SHA256_METADATA.to_string(), sha.to_string());
    }
    let mut writer = store.writer(key, PutOptions { mode: PutMode::Create, metadata })?;
    let source = crate::ratelimit::Limited::new(&mut file as &mut dyn Read, crate::ratelimit::disk());
    let summary = codec::encode(source, compression, level, key, &mut writer).map_err(|e| match e {
        EncodeError::Source(e) => Error::local("read", path, e),
        EncodeError::Sink(e) => Error::Store(into_store_error(e, "write", key)),
    })?;
    // Dropping the writer on this error publishes nothing.
    unchanged_since_opened(path, opened.stamp, summary.bytes_in)?;
    let outcome = writer.finish()?;
    Ok((summary, outcome))
}

/// Fails unless the file at `path` is still the one opened, as it was, after all of it has
/// been read. A segment PostgreSQL no longer waits for (acknowledged by the safety valve)
/// can be recycled meanwhile: renamed to a future name and overwritten in place, same inode
/// and size, while the open descriptor still reads it. Its object would mix two segments'
/// bytes under a checksum of that mix, so nothing may be published then.
fn unchanged_since_opened(path: &Path, opened: FileStamp, bytes_read: u64) -> Result<(), Error> {
    let changed = |what: String| Error::InvalidInput {
        path: path.display().to_string(),
        reason: format!(
            "file {what} while being read, so nothing was stored; PostgreSQL retries it if it still needs it"
        ),
    };
    if bytes_read != opened.size {
        return Err(changed(format!("changed size ({} bytes, then {bytes_read})", opened.size)));
    }
    if FileStamp::of(path) != Some(opened) {
        return Err(changed("was renamed, rewritten or replaced".to_string()));
    }
    Ok(())
}

pub(crate) async fn local_sha256(path: &Path) -> Result<Sha256, Error> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        File::open(&path).and_then(codec::sha256_of).map_err(|e| Error::local("read", &path, e))
    })
    .await
    .expect("the hash task panicked")
}

async fn same_content_or_conflict(
    store: &Arc<Store>,
    name: &WalFileName,
    key: &ObjectKey,
    compression: Compression,
    local: Sha256,
) -> Result<(), Error> {
    let stored = stored_sha256(store, key, compression).await?;
    if stored == local {
        Ok(())
    } else {
        Err(Error::Conflict { name: name.to_string(), stored, local, store: store.url() })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Overrides;
    use crate::store::memory::MemoryStore;
    use crate::test_support::block_on;
    use crate::test_support::NoEnv;
    use crate::wal::page::tests::pg15_first_page;

    /// The smallest segment size PostgreSQL allows, to keep test files small.
    const SEGMENT_SIZE: u32 = 1 << 20;

    /// The default configuration, with no store (tests pass theirs).
    pub(crate) fn default_config() -> Config {
        Config::resolve(&Overrides::default(), &NoEnv).expect("the defaults resolve")
    }

    /// A push context on an empty in-memory store.
    pub(crate) fn memory_context(config: Config) -> Arc<PushContext> {
        PushContext::new(Arc::new(Store::Memory(MemoryStore::new())), config)
    }

    /// Writes segment `name` of the cluster `sysid` into `dir`; `fill` sets its bytes past the
    /// page header, so that two segments of one name can differ.
    pub(crate) fn write_segment(dir: &Path, name: &str, sysid: u64, fill: u8) -> PathBuf {
        let wal = WalFileName::parse(name).unwrap();
        let start = wal.wal_segment().unwrap().start_lsn(SEGMENT_SIZE);
        let mut bytes = pg15_first_page(wal.timeline().0, start.0, sysid, SEGMENT_SIZE);
        bytes.resize(SEGMENT_SIZE as usize, fill);
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    async fn is_stored(ctx: &PushContext, name: &str) -> bool {
        let name = WalFileName::parse(name).unwrap();
        ctx.store.head(&layout::wal_key(&name, ctx.config.compression)).await.unwrap().is_some()
    }

    #[test]
    fn every_segment_is_compared_with_the_stores_cluster_not_only_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = memory_context(default_config());
        block_on(async {
            let first = write_segment(dir.path(), "000000010000000000000001", 1, 0);
            assert_eq!(push_file(&ctx, &first).await.unwrap().outcome, "stored");
            // Same context, as a daemon keeps for its whole life: another cluster's segment.
            let other = write_segment(dir.path(), "000000010000000000000002", 2, 0);
            let err = push_file(&ctx, &other).await.unwrap_err();
            assert!(matches!(err, Error::ClusterMismatch { segment_sysid: 2, store_sysid: 1, .. }), "{err}");
            assert!(!is_stored(&ctx, "000000010000000000000002").await);
            // The same cluster's next segment still goes through.
            let next = write_segment(dir.path(), "000000010000000000000003", 1, 0);
            assert_eq!(push_file(&ctx, &next).await.unwrap().outcome, "stored");
        });
    }

    /// Cluster B pointed at cluster A's prefix by mistake: its segments are refused, and so
    /// must be the history file it writes when promoted (recovery of A to 'latest' would
    /// follow it) and its backup history files, which carry no identifier of their own.
    /// Each is pushed by a fresh process, as archive_command does.
    #[test]
    fn history_and_backup_files_of_another_cluster_are_refused() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        let ctx = memory_context(default_config());
        let fresh = || PushContext::new(ctx.store.clone(), ctx.config.clone());
        block_on(async {
            // The store belongs to cluster 1; each pg_wal holds a segment of its cluster.
            let first = write_segment(ours.path(), "000000010000000000000001", 1, 0);
            assert_eq!(push_file(&ctx, &first).await.unwrap().outcome, "stored");
            write_segment(theirs.path(), "000000010000000000000001", 2, 0);
            for file in ["00000002.history", "000000010000000000000001.00000028.backup"] {
                let text = b"1\t0/3000000\tno recovery target specified\n";
                std::fs::write(theirs.path().join(file), text).unwrap();
                let err = push_file(&fresh(), &theirs.path().join(file)).await.unwrap_err();
                assert!(matches!(err, Error::ClusterMismatch { segment_sysid: 2, store_sysid: 1, .. }), "{err}");
                assert!(!is_stored(&ctx, file).await, "{file} of cluster 2 was stored");
                // The store's own cluster's file of that name still goes through.
                std::fs::write(ours.path().join(file), text).unwrap();
                assert_eq!(push_file(&fresh(), &ours.path().join(file)).await.unwrap().outcome, "stored");
            }
            // Pushed from a folder that tells no cluster (a manual push from elsewhere): as
            // before, stored unchecked (with a warning).
            let elsewhere = tempfile::tempdir().unwrap();
            let path = elsewhere.path().join("00000003.history");
            std::fs::write(&path, b"2\t0/4000000\tno recovery target specified\n").unwrap();
            assert_eq!(push_file(&fresh(), &path).await.unwrap().outcome, "stored");
        });
    }

    #[test]
    fn history_and_backup_files_in_any_server_encoding_are_archived_but_binary_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = memory_context(default_config());
        block_on(async {
            // pg_backup_start('sauvegarde journalière') on a LATIN1 server: 0xE8 is 'è'.
            let backup = dir.path().join("000000010000000000000002.00000028.backup");
            std::fs::write(&backup, b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: x\xE8\n")
                .unwrap();
            assert_eq!(push_file(&ctx, &backup).await.unwrap().outcome, "stored");
            // A segment under a history file's name is still refused, by its NUL bytes.
            let segment = write_segment(dir.path(), "000000010000000000000004", 1, 0);
            let history = dir.path().join("00000002.history");
            std::fs::rename(&segment, &history).unwrap();
            let err = push_file(&ctx, &history).await.unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
        });
    }

    #[test]
    fn a_file_recycled_or_rewritten_while_being_read_is_not_published() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = memory_context(default_config());
        let name = "000000010000000000000005";
        let key = layout::wal_key(&WalFileName::parse(name).unwrap(), ctx.config.compression);
        let (compression, level) = (ctx.config.compression, ctx.config.zstd_level);
        let earlier = std::time::SystemTime::now() - std::time::Duration::from_secs(60);

        // Recycled: renamed to a future segment's name (same inode) and overwritten in place.
        // The check runs after the last byte is read, so when during the read PostgreSQL
        // does this makes no difference to it; here it happens right after the open.
        let path = write_segment(dir.path(), name, 1, 0);
        let opened = open_checked(&path).unwrap();
        let future = dir.path().join("000000010000000000000009");
        std::fs::rename(&path, &future).unwrap();
        std::fs::write(&future, vec![7u8; SEGMENT_SIZE as usize]).unwrap();
        let err = upload(&ctx.store, &key, opened, &path, compression, level).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err}");

        // Rewritten in place, same size, under its own name (its modification time set apart
        // explicitly: the clock may not have ticked since the open).
        let path = write_segment(dir.path(), name, 1, 0);
        let opened = open_checked(&path).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.write_all_at(&[9u8; 4096], 8192).unwrap();
        file.set_modified(earlier).unwrap();
        let err = upload(&ctx.store, &key, opened, &path, compression, level).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err}");

        assert!(!block_on(is_stored(&ctx, name)), "nothing may be published");
        // Untouched, the same file is published.
        let opened = open_checked(&path).unwrap();
        let (_, outcome) = upload(&ctx.store, &key, opened, &path, compression, level).unwrap();
        assert_eq!(outcome, PutOutcome::Stored);
    }
}
