//! Archiving one WAL file: the unit of work of wal-push, for the file PostgreSQL asked for
//! and for the ready files pushed ahead of it.
//!
//! Order of work: validate the file (name, size, page header) before touching the store;
//! then, at once, check the cluster identity and look for an object already under the name;
//! then stream read -> compress -> hash -> upload, and publish only if nothing is there.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::super::common::{stored_sha256, SHA256_METADATA};
use crate::codec::{self, Compression, EncodeError, EncodeSummary, Sha256};
use crate::config::Config;
use crate::error::Error;
use crate::identity;
use crate::layout;
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

/// What pushes in one process share: the store, and the cluster-identity check, made once.
pub(crate) struct PushContext {
    pub(crate) store: Arc<Store>,
    pub(crate) config: Config,
    identity_checked: tokio::sync::OnceCell<()>,
}

impl PushContext {
    pub(crate) fn new(store: Arc<Store>, config: Config) -> Arc<PushContext> {
        Arc::new(PushContext { store, config, identity_checked: tokio::sync::OnceCell::new() })
    }

    async fn check_identity(&self, name: &WalFileName, header: &SegmentHeader) -> Result<(), Error> {
        self.identity_checked.get_or_try_init(|| identity::check_or_record(&self.store, name, header)).await.map(|_| ())
    }
}

/// Archives the file at `path`.
pub(crate) async fn push_file(ctx: &PushContext, path: &Path) -> Result<PushReport, Error> {
    let config = &ctx.config;
    let invalid = |reason: String| Error::InvalidInput { path: path.display().to_string(), reason };
    let file_name =
        path.file_name().and_then(|n| n.to_str()).ok_or_else(|| invalid("the path has no file name".into()))?;
    let name = WalFileName::parse(file_name).map_err(|e| invalid(e.to_string()))?;
    let file = File::open(path).map_err(|e| Error::local("open", path, e))?;
    let size = file.metadata().map_err(|e| Error::local("stat", path, e))?.len();
    let header = check_file(&file, path, &name, size)?;

    let store = ctx.store.clone();
    let candidates = layout::wal_candidates(&name, config.compression);
    let keys: Vec<ObjectKey> = candidates.iter().map(|(k, _)| k.clone()).collect();
    let (identity, existing) = tokio::join!(
        async {
            match &header {
                Some(h) => ctx.check_identity(&name, h).await,
                None => Ok(()),
            }
        },
        store.find_first(&keys),
    );
    identity?;
    if let Some(found) = existing? {
        let compression = candidates
            .iter()
            .find(|(k, _)| *k == found.key)
            .and_then(|(_, c)| *c)
            .ok_or_else(|| Error::Unsupported { key: format!("{}/{}", store.url(), found.key) })?;
        let local = local_sha256(path).await?;
        same_content_or_conflict(&store, &name, &found.key, compression, local).await?;
        // Another writer may have been killed between linking it in and its directory
        // fsync: PostgreSQL recycles the segment on our exit 0.
        store.make_durable(&found.key).await?;
        return Ok(PushReport {
            bytes_in: size,
            bytes_stored: 0,
            outcome: "already-archived",
            sha256: Some(local),
            key: Some(found.key),
        });
    }

    let key = layout::wal_key(&name, config.compression);
    let (compression, level) = (config.compression, config.zstd_level);
    let upload_store = store.clone();
    let upload_key = key.clone();
    let upload_path = path.to_path_buf();
    let (summary, outcome) = tokio::task::spawn_blocking(move || {
        upload(&upload_store, &upload_key, file, &upload_path, size, compression, level)
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
            if head[..n].contains(&0) || std::str::from_utf8(&head[..n]).is_err() && n == size as usize {
                return Err(invalid(format!("a {} file must be text", kind(name))));
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

/// Streams the file into a new object. Blocking.
fn upload(
    store: &Store,
    key: &ObjectKey,
    mut file: File,
    path: &Path,
    size: u64,
    compression: Compression,
    level: i32,
) -> Result<(EncodeSummary, PutOutcome), Error> {
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
    let summary = codec::encode(source, compression, level, &mut writer).map_err(|e| match e {
        EncodeError::Source(e) => Error::local("read", path, e),
        EncodeError::Sink(e) => Error::Store(into_store_error(e, "write", key)),
    })?;
    if summary.bytes_in != size {
        // The file changed under us; publish nothing (dropping the writer discards it).
        return Err(Error::InvalidInput {
            path: path.display().to_string(),
            reason: format!("file changed while being read ({size} bytes, then {})", summary.bytes_in),
        });
    }
    let outcome = writer.finish()?;
    Ok((summary, outcome))
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
