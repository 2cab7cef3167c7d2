//! `wal-rs wal-fetch NAME DEST`: restore one WAL file, as restore_command.
//!
//! The object is streamed through decompression and sha256 into a temporary file beside
//! DEST, checked, and renamed into place, so PostgreSQL never sees a short or wrong file.
//! "Not found" is reported only when the store answered that no object of that name
//! exists under any extension; transient errors are retried until the deadline.
//!
//! The restored file is not fsynced: PostgreSQL reads it at once and, when it keeps it
//! (a standby's restored segments), moves it with its own `durable_rename`; after a crash
//! recovery asks for it again.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{select, Either};

use super::background::process_exists;
use super::common::{open_store, retry_transient, SHA256_METADATA};
use super::wal_prefetch::Prefetch;
use crate::codec::{self, decode::DecodeError, Compression, Sha256};
use crate::config::Config;
use crate::error::Error;
use crate::layout;

use crate::store::{error_chain, is_checksum_mismatch, ObjectKey, ObjectMeta, ObjectReader, Store, StoreError};
use crate::wal::page::LONG_HEADER_SIZE;
use crate::wal::{SegmentHeader, WalFileName};

/// Extended attribute recording how a prefetched file was verified.
pub(crate) const PREFETCH_VERIFIED_XATTR: &str = "user.walrs.verified";

/// What one fetch did, for the log line.
pub(crate) struct FetchReport {
    pub(super) bytes_stored: u64,
    pub(super) bytes_out: u64,
    /// How the content was checked: `sha256`, or `none` for objects that carry no checksum
    /// (written by other tools).
    pub(super) verified: &'static str,
    /// Served from the prefetch folder.
    pub(super) prefetched: bool,
}

/// `standby`: failures answer "ask again" (`FetchMode::is_standby`), decided once by the caller.
pub(super) async fn run(
    config: &Config,
    name: &str,
    dest: &Path,
    standby: bool,
    child_args: &[String],
) -> Result<FetchReport, Error> {
    let name = WalFileName::parse(name).map_err(|e| Error::Usage(e.to_string()))?;
    refuse_special_destination(dest)?;
    let prefetch = Prefetch::new(config, dest);
    // At most half the deadline: this wait is no progress for it, and the store may still
    // have to be asked.
    let wait = config.retry.request_timeout.min(Duration::from_secs(10)).min(config.retry.deadline / 2);
    if let Some(report) = prefetch.take(&name, dest, wait) {
        prefetch.refill(&name, report.bytes_out, child_args);
        return Ok(report);
    }
    remove_leftovers(dest);
    let store = open_store(config).await?;
    // "Not in the archive" needs proof only where it ends a recovery: not in a standby,
    // where every failure is "ask again".
    let report = fetch_with_retry(&store, &name, dest, config, None, !standby).await?;
    prefetch.refill(&name, report.bytes_out, child_args);
    Ok(report)
}

/// A prefetcher's download: how the file is marked, and the flag that stops it.
#[derive(Clone)]
pub(crate) struct ForPrefetch {
    /// The fingerprint of the configuration fetching it.
    pub(crate) fingerprint: String,
    /// Set when the prefetcher exits: the download stops at its next chunk and removes its
    /// temporary file, and no new attempt starts.
    pub(crate) stop: Arc<AtomicBool>,
}

/// Fetches `name` into `dest`, retrying transient failures until the deadline. With
/// `prefetched`, the file is marked with the configuration's fingerprint and with how it was
/// verified, and fsynced before it is renamed into place (prefetched files must be whole
/// after a crash, since their presence alone says they are complete). With
/// `prove_absence`, "not in the archive" is said only of a location that holds an archive
/// at all (see [`Store::confirm_absent`]).
pub(crate) async fn fetch_with_retry(
    store: &Arc<Store>,
    name: &WalFileName,
    dest: &Path,
    config: &Config,
    prefetched: Option<&ForPrefetch>,
    prove_absence: bool,
) -> Result<FetchReport, Error> {
    retry_transient("wal-fetch", name, config.retry.deadline, || {
        fetch_once(store, name, dest, config.compression, prefetched.cloned(), prove_absence)
    })
    .await
}

async fn fetch_once(
    store: &Arc<Store>,
    name: &WalFileName,
    dest: &Path,
    preferred: Compression,
    prefetched: Option<ForPrefetch>,
    prove_absence: bool,
) -> Result<FetchReport, Error> {
    if prefetched.as_ref().is_some_and(|p| p.stop.load(Ordering::Relaxed)) {
        return Err(stopped(dest));
    }
    let candidates = layout::wal_candidates(name, preferred);
    let keys: Vec<ObjectKey> = candidates.iter().map(|(k, _)| k.clone()).collect();
    // The configured compression first: one request in the usual case. A timeline history
    // file, though, is mostly asked for to learn that it is not there (PostgreSQL probes the
    // timelines after its own at the start and at the end of every recovery), so its listing
    // and proof of absence go out with the read: one round trip instead of three.
    let listing = matches!(name, WalFileName::History(_)).then(|| {
        let (store, keys) = (store.clone(), keys.clone());
        tokio::spawn(async move { look_further(&store, &keys, prove_absence).await })
    });
    let (key, compression, mut reader) = match store.get(&candidates[0].0).await {
        Ok(reader) => {
            // Found, as a history file being followed is: the listing is not needed.
            if let Some(listing) = &listing {
                listing.abort();
            }
            (candidates[0].0.clone(), preferred, reader)
        }
        Err(StoreError::NotFound { .. }) => {
            let further = match listing {
                Some(listing) => listing.await.expect("the listing task panicked"),
                None => look_further(store, &keys, prove_absence).await,
            };
            let Some(found) = further? else {
                return Err(Error::WalNotFound { name: name.to_string(), store: store.url() });
            };
            if found.key == candidates[0].0 {
                return Err(listed_but_missing(format!("{}/{}", store.url(), found.key)));
            }
            let compression = candidates
                .iter()
                .find(|(k, _)| *k == found.key)
                .and_then(|(_, c)| *c)
                .ok_or_else(|| Error::Unsupported { key: format!("{}/{}", store.url(), found.key) })?;
            match store.get(&found.key).await {
                Ok(reader) => (found.key, compression, reader),
                Err(StoreError::NotFound { key }) => return Err(listed_but_missing(key)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let describe = format!("{}/{key}", store.url());
    let dest = dest.to_path_buf();
    let name = *name;
    if let Some(stop) = prefetched.as_ref().map(|p| p.stop.clone()) {
        reader.body = Box::new(Stoppable { inner: reader.body, stop });
    }
    tokio::task::spawn_blocking(move || restore(reader, &key, compression, &name, &dest, &describe, prefetched))
        .await
        .expect("the restore task panicked")
}

/// Where the first key's read found nothing: the first of `keys` the store lists (the first
/// key too: a store that lists an object its read just called missing, a replica behind or a
/// request routed wrongly, is not saying "not in the archive"), or `None` when it lists none.
/// With `prove_absence`, `None` also needs proof that the store holds an archive at all
/// ([`Store::confirm_absent`]). The listing and the proof go out together, one round trip;
/// an object found is an answer at once, without waiting for the proof.
async fn look_further(store: &Store, keys: &[ObjectKey], prove_absence: bool) -> Result<Option<ObjectMeta>, Error> {
    let listing = std::pin::pin!(store.find_first(keys));
    if !prove_absence {
        return Ok(listing.await?);
    }
    let proof = std::pin::pin!(store.confirm_absent(&keys[0]));
    // The listing's answer comes first, and its error before the proof's, as when the two
    // were asked one after the other.
    let (found, proof) = match select(listing, proof).await {
        Either::Left((found, proof)) => (found?, Either::Left(proof)),
        Either::Right((proof, listing)) => (listing.await?, Either::Right(proof)),
    };
    if found.is_some() {
        return Ok(found);
    }
    match proof {
        Either::Left(pending) => pending.await?,
        Either::Right(answered) => answered?,
    }
    Ok(None)
}

/// A store that listed an object and then answered a read of it with "no such object":
/// deleted in between, or reads that lag listings (a replica behind, a request routed
/// wrongly). Transient, so the next attempt lists again and tells which; never "not in the
/// archive" on the strength of the read alone.
fn listed_but_missing(key: String) -> Error {
    Error::Store(StoreError::Unavailable {
        op: "get",
        key,
        detail: "the store lists the object but its read answered that there is none".into(),
    })
}

/// A prefetcher's download stopped because the prefetcher is exiting. Not transient: no
/// attempt follows.
fn stopped(dest: &Path) -> Error {
    Error::local("prefetch into", dest, std::io::Error::other("the prefetcher is exiting"))
}

/// A body that fails its next read once `stop` is set.
struct Stoppable {
    inner: Box<dyn Read + Send>,
    stop: Arc<AtomicBool>,
}

impl Read for Stoppable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            // Not `Interrupted`, which readers retry.
            return Err(std::io::Error::other("the prefetcher is exiting"));
        }
        self.inner.read(buf)
    }
}

/// The temporary file this process restores `dest` through.
pub(super) fn temp_path(dest: &Path) -> PathBuf {
    dest_folder(dest).join(format!("{}{}", temp_prefix(dest), std::process::id()))
}

/// Decodes into a temporary file beside `dest`, checks it, and renames it into place.
/// Blocking.
fn restore(
    reader: ObjectReader,
    key: &ObjectKey,
    compression: Compression,
    name: &WalFileName,
    dest: &Path,
    describe: &str,
    prefetched: Option<ForPrefetch>,
) -> Result<FetchReport, Error> {
    let stop = prefetched.as_ref().map(|p| p.stop.clone());
    let temp = TempFile(temp_path(dest));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp.0)
        .map_err(|e| Error::local("create", &temp.0, e))?;
    let corrupt = |detail: String| Error::Corrupt { key: describe.to_string(), detail };
    let expected_size = reader.size;
    // A checksum that is there but unreadable is damage, not an object without one.
    let metadata_sha: Option<Sha256> = match reader.metadata.get(SHA256_METADATA) {
        Some(text) => {
            Some(text.parse().map_err(|_| corrupt(format!("its {SHA256_METADATA} metadata is not a sha256")))?)
        }
        None => None,
    };
    // Decoded as the object of the key it was read from: a sealed object copied there from
    // another name (another timeline's) fails authentication, as damage.
    let summary = codec::decode(reader.body, compression, key, &file).map_err(|e| match e {
        // Whatever the error says, the reader was told to stop.
        _ if stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) => stopped(dest),
        DecodeError::Source(e) if is_checksum_mismatch(&e) => corrupt(error_chain(&e)),
        DecodeError::Source(e) => {
            Error::Store(StoreError::Unavailable { op: "read", key: describe.to_string(), detail: error_chain(&e) })
        }
        DecodeError::Corrupt(detail) => corrupt(detail),
        DecodeError::Key(detail) => Error::Key { key: describe.to_string(), detail },
        DecodeError::Sink(e) => Error::local("write", dest, e),
    })?;
    if summary.bytes_in != expected_size {
        // A body cut short without an error from the transport: try again.
        return Err(Error::Store(StoreError::Unavailable {
            op: "read",
            key: describe.to_string(),
            detail: format!("received {} of {expected_size} bytes", summary.bytes_in),
        }));
    }
    let verified = match (summary.trailer, metadata_sha) {
        (Some(_), _) => "sha256",
        (None, Some(sha)) if sha == summary.sha256 => "sha256",
        (None, Some(sha)) => {
            return Err(corrupt(format!(
                "sha256 of the restored bytes is {} but the object records {sha}",
                summary.sha256
            )))
        }
        (None, None) => "none",
    };
    if name.wal_segment().is_none() && summary.bytes_out == 0 {
        // History and backup-history files have no size to check against. wal-push never
        // archives an empty one, so an empty result is an empty or cut object (a foreign
        // lz4 frame cut after its header decodes to nothing), never the file.
        return Err(corrupt("restored 0 bytes: no file wal-push archives is empty".into()));
    }
    if let Some(segment) = name.wal_segment() {
        // A last check that costs one read: the bytes are the segment the name promises.
        let mut first = [0u8; LONG_HEADER_SIZE];
        let n = file.read_at(&mut first, 0).map_err(|e| Error::local("read", &temp.0, e))?;
        let header = SegmentHeader::parse(&first[..n], name.timeline(), segment)
            .map_err(|e| corrupt(format!("restored bytes are not segment {name}: {e}")))?;
        if header.segment_size as u64 != summary.bytes_out {
            return Err(corrupt(format!(
                "restored {} bytes for a segment of {}",
                summary.bytes_out, header.segment_size
            )));
        }
    }
    if let Some(ForPrefetch { fingerprint, .. }) = prefetched {
        // A prefetched file says how it was checked, for the log line of the fetch that
        // serves it, and with which configuration, so that it is not served to another
        // (best effort: without extended attributes it says "unknown").
        let _ = xattr::set(&temp.0, PREFETCH_VERIFIED_XATTR, format!("{verified} {fingerprint}").as_bytes());
        file.sync_all().map_err(|e| Error::local("fsync", &temp.0, e))?;
    }
    drop(file);
    fs::rename(&temp.0, dest).map_err(|e| Error::local("rename into", dest, e))?;
    std::mem::forget(temp);
    Ok(FetchReport { bytes_stored: summary.bytes_in, bytes_out: summary.bytes_out, verified, prefetched: false })
}

/// DEST is replaced by a rename: that must never swap out a device, a directory or a
/// symbolic link someone pointed elsewhere (`wal-fetch X /dev/null` run as root would
/// replace the device node). PostgreSQL's own destinations are regular files or absent.
fn refuse_special_destination(dest: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(dest) {
        Ok(m) if !m.file_type().is_file() => Err(Error::InvalidInput {
            path: dest.display().to_string(),
            reason: "the destination exists and is not a regular file: give a path in pg_wal, as PostgreSQL's %p"
                .into(),
        }),
        _ => Ok(()),
    }
}

/// Between a temporary file's destination name and the PID of the wal-fetch writing it.
const PARTIAL: &str = ".walrs-partial.";

/// The folder `dest` is in (`.` for a bare file name).
pub(super) fn dest_folder(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The name of a temporary file for `dest`, beside it, without the PID of the wal-fetch
/// writing it, which ends it.
fn temp_prefix(dest: &Path) -> String {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "wal".into());
    format!(".{name}{PARTIAL}")
}

/// Removes temporary files for `dest` left by wal-fetch processes that are gone: one stopped
/// at its deadline, or by a signal at shutdown, while its restore ran. Nothing else removes
/// them from pg_wal, and a standby that keeps retrying a slow download would fill it. A file
/// whose process still runs (or whose PID was reused) is left alone. Once per wal-fetch that
/// goes to the store; the prefetcher's own leftovers are its cleaning's job.
fn remove_leftovers(dest: &Path) {
    let prefix = temp_prefix(dest);
    let Ok(entries) = fs::read_dir(dest_folder(dest)) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|pid| pid > 0 && !process_exists(pid)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes the temporary file unless it was renamed into place.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
