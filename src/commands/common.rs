//! What several commands share: opening the store, and learning the sha256 of a stored
//! WAL object.

use std::sync::Arc;

use crate::codec::{self, trailer, Compression, Sha256};
use crate::config::{Config, StoreUrl};
use crate::error::Error;
use crate::store::local::LocalStore;
use crate::store::s3::S3Store;
use crate::store::{ObjectKey, Store, StoreError};
use crate::wal::WalFileName;

/// Metadata key holding the sha256 of an uncompressed object's bytes.
pub(crate) const SHA256_METADATA: &str = "sha256";

/// Runs `attempt` again after transient storage failures (a dropped connection, a cut
/// response, 5xx) with backoff from 100 ms to 5 s, until `deadline` has passed since the
/// first try; any other outcome is returned as is. Each retry is a warning line. The
/// operations retried are idempotent: a create-only upload repeated after a lost answer
/// finds its own object and compares content.
pub(crate) async fn retry_transient<T, F, Fut>(
    op: &str,
    file: &dyn std::fmt::Display,
    deadline: std::time::Duration,
    mut attempt: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    use crate::log::{self, Level};
    let until = std::time::Instant::now() + deadline;
    let mut delay = std::time::Duration::from_millis(100);
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if e.is_transient() && std::time::Instant::now() + delay < until => {
                log::emit(
                    Level::Warn,
                    &[
                        ("op", &op),
                        ("file", &file),
                        ("attempt", &n),
                        ("retry_in_ms", &delay.as_millis()),
                        ("error", &e),
                    ],
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
                n += 1;
            }
            other => return other,
        }
    }
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> Result<Arc<Store>, Error> {
    let store = match config.require_store().map_err(Error::Config)? {
        StoreUrl::File(root) => Store::Local(LocalStore::new(root.clone())),
        StoreUrl::S3 { bucket, prefix } => Store::S3(S3Store::connect(config.s3_settings(bucket, prefix)).await),
    };
    Ok(Arc::new(store))
}

/// What the store holds under `key`, in one request: the object's size and the sha256 of
/// the original bytes it records, from a compressed object's trailer (a small ranged read)
/// or a raw object's metadata. The sha256 is `None` for objects that record none
/// (encrypted, whose trailer is sealed, or written by other tools); the whole answer is
/// `None` when there is no such object.
pub(crate) async fn recorded_sha256(
    store: &Arc<Store>,
    key: &ObjectKey,
    compression: Compression,
) -> Result<Option<(u64, Option<Sha256>)>, Error> {
    if compression.has_trailer() {
        match store.get_tail(key, trailer::LEN as u64).await {
            Ok((tail, size)) => Ok(Some((size, codec::Trailer::decode(&tail).map(|t| t.sha256)))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    } else {
        let meta = store.head(key).await?;
        Ok(meta.map(|m| (m.size, m.metadata.get(SHA256_METADATA).and_then(|s| s.parse().ok()))))
    }
}

/// The sha256 of the original bytes of a stored object: from its trailer, else from its
/// metadata, else (objects written by other tools) by reading it whole.
pub(crate) async fn stored_sha256(
    store: &Arc<Store>,
    key: &ObjectKey,
    compression: Compression,
) -> Result<Sha256, Error> {
    if let Some((_, Some(sha))) = recorded_sha256(store, key, compression).await? {
        return Ok(sha);
    }
    let reader = store.get(key).await?;
    let describe = format!("{}/{key}", store.url());
    let key = key.clone();
    tokio::task::spawn_blocking(move || codec::decode(reader.body, compression, &key, std::io::sink()))
        .await
        .expect("the decode task panicked")
        .map(|s| s.sha256)
        .map_err(|e| match e {
            codec::decode::DecodeError::Corrupt(detail) => Error::Corrupt { key: describe, detail },
            codec::decode::DecodeError::Key(detail) => Error::Key { key: describe, detail },
            codec::decode::DecodeError::Source(e) if crate::store::is_checksum_mismatch(&e) => {
                Error::Corrupt { key: describe, detail: crate::store::error_chain(&e) }
            }
            other => Error::Store(crate::store::StoreError::Unavailable {
                op: "read",
                key: describe,
                detail: other.to_string(),
            }),
        })
}

/// The keys WAL file `name` may be stored under, in any compression.
fn candidate_keys(name: &WalFileName, compression: Compression) -> Vec<ObjectKey> {
    crate::layout::wal_candidates(name, compression).into_iter().map(|(k, _)| k).collect()
}

/// Answers whether WAL files are in the store, in any compression, for many names. On S3
/// (and in memory) from one listing per log (a name's first 16 characters: its timeline and
/// log, 256 segments of 16 MiB), not a request per name; a local store `stat`s each name
/// instead, since a listing there reads the whole wal_005 folder.
pub(crate) struct StoredWal<'a> {
    store: &'a Store,
    compression: Compression,
    /// The keys listed under each log prefix asked about so far.
    listed: std::collections::HashMap<String, std::collections::HashSet<String>>,
}

impl<'a> StoredWal<'a> {
    pub(crate) fn new(store: &'a Store, compression: Compression) -> StoredWal<'a> {
        StoredWal { store, compression, listed: Default::default() }
    }

    /// Whether `name` is stored.
    pub(crate) async fn contains(&mut self, name: &WalFileName) -> Result<bool, Error> {
        let candidates = candidate_keys(name, self.compression);
        if !matches!(self.store, Store::S3(_) | Store::Memory(_)) {
            return Ok(self.store.find_first(&candidates).await?.is_some());
        }
        let text = name.to_string();
        let prefix = format!("{}/{}", crate::layout::WAL_DIR, &text[..text.len().min(16)]);
        if !self.listed.contains_key(&prefix) {
            let keys = self.store.list(&prefix).await?.into_iter().map(|m| m.key.as_str().to_string()).collect();
            self.listed.insert(prefix.clone(), keys);
        }
        let keys = &self.listed[&prefix];
        Ok(candidates.iter().any(|k| keys.contains(k.as_str())))
    }
}

/// The gap records whose WAL file is not in the store after all. The valve can drop a
/// segment an archive daemon is uploading at that moment; once that upload completes, the
/// record names a segment that is there, and is no gap.
pub(crate) async fn open_gaps(store: &Store, compression: Compression) -> Result<Vec<String>, Error> {
    let mut stored = StoredWal::new(store, compression);
    let mut open = Vec::new();
    for name in gap_records(store).await? {
        let filled = match WalFileName::parse(&name) {
            Ok(wal) => stored.contains(&wal).await?,
            Err(_) => false,
        };
        if !filled {
            open.push(name);
        }
    }
    Ok(open)
}

/// The names of the WAL files with a gap record (`walrs/gaps/<name>.json`): acknowledged to
/// PostgreSQL by the safety valve without being archived. A store that cannot be listed is
/// an error, never "no gap".
pub(crate) async fn gap_records(store: &Store) -> Result<Vec<String>, Error> {
    let records = match store.list(crate::layout::GAP_PREFIX).await {
        Ok(r) => r,
        Err(StoreError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(records.iter().map(|r| r.key.file_name().trim_end_matches(".json").to_string()).collect())
}
