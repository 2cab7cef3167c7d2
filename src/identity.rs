//! Which cluster a store prefix belongs to.
//!
//! Two clusters archiving into one prefix overwrite each other's history without a sound:
//! their segment names collide. The first wal-push of a segment records the cluster's system
//! identifier (from the segment's long page header) in the store; every later push compares
//! against it. A process that pushes many segments (the daemon, a push-ahead batch) reads
//! the record once and compares each segment's header with it in memory: one check per
//! process would let a wrong segment through after the first. Promoted copies and forks of
//! the same cluster share its identifier, so a new timeline in the same prefix is allowed,
//! as PostgreSQL intends.
//!
//! Timeline history and backup history files carry no identifier, yet another cluster's
//! history file in the archive can end a recovery to 'latest' early, on its timeline: they
//! are compared by the cluster whose WAL folder they are pushed from
//! ([`cluster_of_wal_folder`]).

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::layout;
use crate::store::{Metadata, PutMode, PutOptions, PutOutcome, Store, StoreError};
use crate::wal::page::LONG_HEADER_SIZE;
use crate::wal::{SegmentHeader, WalFileName};

/// Size of `global/pg_control` (`PG_CONTROL_FILE_SIZE`): PostgreSQL always writes it whole.
const PG_CONTROL_FILE_SIZE: usize = 8192;
/// Segments of a WAL folder tried for a long page header before giving up: recycled ones
/// (renamed ahead, still holding an older segment's header) fail the name check.
const SEGMENTS_TRIED: usize = 16;

/// The identity record, `walrs/cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterIdentity {
    /// The system identifier, as a decimal string (JSON numbers lose precision past 2^53).
    pub system_identifier: String,
    /// PostgreSQL major version of the first segment pushed.
    pub pg_major: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u32,
    /// What wrote the record.
    pub created_by: String,
    /// Set once a process with an encryption key has pushed: from then on, a wal-push or
    /// backup-push without a key is refused instead of quietly storing plaintext beside the
    /// sealed objects (a key file left out of one archive_command, say).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// The cluster a store's record names, parsed: what every segment pushed is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The system identifier.
    pub system_identifier: u64,
    /// PostgreSQL major version.
    pub pg_major: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u32,
}

impl Owner {
    /// The cluster that wrote the segment with this long page header.
    pub fn of(header: &SegmentHeader) -> Owner {
        Owner {
            system_identifier: header.system_identifier,
            pg_major: header.pg_major,
            wal_segment_size: header.segment_size,
        }
    }

    fn from_record(recorded: &ClusterIdentity, store: &Store) -> Result<Owner, Error> {
        let system_identifier = recorded.system_identifier.parse().map_err(|_| Error::Corrupt {
            key: format!("{}/{}", store.url(), layout::cluster_identity_key()),
            detail: format!("system_identifier {:?} is not a number", recorded.system_identifier),
        })?;
        Ok(Owner { system_identifier, pg_major: recorded.pg_major, wal_segment_size: recorded.wal_segment_size })
    }

    /// Checks that `found` (the cluster of `what`) is this owner, without asking the store:
    /// a long-lived process reads the record once and compares every segment with it.
    pub fn check(&self, what: &str, found: Owner, store_url: &str) -> Result<(), Error> {
        self.check_system_identifier(what, found.system_identifier, store_url)?;
        // Same cluster, other format: a pg_upgrade'd cluster keeps neither, but a crafted or
        // restored copy could; its WAL and backups cannot be replayed with the archive's.
        if self.pg_major != found.pg_major || self.wal_segment_size != found.wal_segment_size {
            let describe = |major: u32, size: u32| format!("PostgreSQL {major} with {} MiB WAL segments", size >> 20);
            return Err(Error::VersionMismatch {
                name: what.to_string(),
                found: describe(found.pg_major, found.wal_segment_size),
                recorded: describe(self.pg_major, self.wal_segment_size),
                store: store_url.to_string(),
            });
        }
        Ok(())
    }

    /// Checks that `system_identifier` (the cluster of `what`) is this owner's.
    pub fn check_system_identifier(&self, what: &str, system_identifier: u64, store_url: &str) -> Result<(), Error> {
        if self.system_identifier != system_identifier {
            return Err(Error::ClusterMismatch {
                name: what.to_string(),
                segment_sysid: system_identifier,
                store_sysid: self.system_identifier,
                store: store_url.to_string(),
            });
        }
        Ok(())
    }
}

/// The cluster the store's record names, if it has one; records nothing.
pub async fn recorded_owner(store: &Store) -> Result<Option<Owner>, Error> {
    match read(store).await? {
        Some(recorded) => Owner::from_record(&recorded, store).map(Some),
        None => Ok(None),
    }
}

/// The system identifier of the cluster whose WAL folder `pg_wal` is: from
/// `data/global/pg_control` when `data/pg_wal` is that folder (archive_command runs in the
/// data directory), else from the long page header of a segment in the folder. `None` when
/// neither can be read (a file pushed by hand from a folder of its own).
pub fn cluster_of_wal_folder(data: &Path, pg_wal: &Path) -> Option<u64> {
    control_file_system_identifier(data, pg_wal).or_else(|| segment_system_identifier(pg_wal))
}

/// The system identifier in `data/global/pg_control`, if `data/pg_wal` is `pg_wal` (the
/// working directory may be another cluster's data directory than the file's).
fn control_file_system_identifier(data: &Path, pg_wal: &Path) -> Option<u64> {
    let (ours, theirs) = (fs::canonicalize(data.join("pg_wal")).ok()?, fs::canonicalize(pg_wal).ok()?);
    if ours != theirs {
        return None;
    }
    let control = fs::read(data.join("global").join("pg_control")).ok()?;
    if control.len() != PG_CONTROL_FILE_SIZE {
        return None;
    }
    // ControlFileData starts with the system identifier, in the server's byte order:
    // little-endian, as the page headers are read (`SegmentHeader::parse`).
    let system_identifier = u64::from_le_bytes(control[..8].try_into().expect("8 bytes"));
    (system_identifier != 0).then_some(system_identifier)
}

/// The system identifier in the long page header of a segment in `pg_wal` whose header
/// agrees with its name.
fn segment_system_identifier(pg_wal: &Path) -> Option<u64> {
    fs::read_dir(pg_wal)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = WalFileName::parse(entry.file_name().to_str()?).ok()?;
            let segment = name.wal_segment()?;
            Some((entry.path(), name, segment))
        })
        .take(SEGMENTS_TRIED)
        .find_map(|(path, name, segment)| {
            let mut first = [0u8; LONG_HEADER_SIZE];
            File::open(path).and_then(|mut f| f.read_exact(&mut first)).ok()?;
            SegmentHeader::parse(&first, name.timeline(), segment).ok().map(|h| h.system_identifier)
        })
}

/// Checks that `header`'s cluster owns the store, recording it if nobody does yet; returns
/// the owner, for later segments to be compared with in memory ([`Owner::check`]).
pub async fn check_or_record(store: &Arc<Store>, name: &WalFileName, header: &SegmentHeader) -> Result<Owner, Error> {
    owner_checked(store, &name.to_string(), Owner::of(header)).await
}

/// Checks that the cluster `system_identifier` owns the store, recording it if nobody does
/// yet; `what` names the file or backup in the error.
pub async fn check_or_record_cluster(
    store: &Arc<Store>,
    what: &str,
    system_identifier: u64,
    pg_major: u32,
    wal_segment_size: u32,
) -> Result<(), Error> {
    let mine = Owner { system_identifier, pg_major, wal_segment_size };
    owner_checked(store, what, mine).await.map(|_| ())
}

/// The store's owner, recording `mine` as the owner if the store has none yet, once `mine`
/// (the cluster of `what`) is checked to be it.
async fn owner_checked(store: &Arc<Store>, what: &str, mine: Owner) -> Result<Owner, Error> {
    owner_checked_sealing(store, what, mine, crate::crypto::sealing_key().is_some()).await
}

/// [`owner_checked`] for a process that seals what it stores (`sealing`) or not. The
/// encryption mark is read and written only after the cluster check: a keyed process of
/// another cluster pointed at this store by mistake must fail without marking it.
async fn owner_checked_sealing(store: &Arc<Store>, what: &str, mine: Owner, sealing: bool) -> Result<Owner, Error> {
    let recorded = match read(store).await? {
        Some(id) => id,
        None => {
            let record = ClusterIdentity {
                system_identifier: mine.system_identifier.to_string(),
                pg_major: mine.pg_major,
                wal_segment_size: mine.wal_segment_size,
                created_by: format!("wal-rs {}", env!("CARGO_PKG_VERSION")),
                encrypted: sealing,
            };
            let bytes = serde_json::to_vec_pretty(&record).expect("identity serialises");
            let opts = PutOptions { mode: PutMode::Create, metadata: Metadata::new() };
            let key = layout::cluster_identity_key();
            match store.put_bytes(&key, bytes, opts).await? {
                // Recorded just now, as this process's own cluster, sealing or not.
                PutOutcome::Stored => return Ok(mine),
                // Another push recorded one first: compare with that.
                PutOutcome::AlreadyExists => {
                    read(store).await?.ok_or_else(|| Error::Store(StoreError::NotFound { key: key.to_string() }))?
                }
            }
        }
    };
    let owner = Owner::from_record(&recorded, store)?;
    owner.check(what, mine, &store.url())?;
    match (recorded.encrypted, sealing) {
        (true, false) => Err(Error::Config(format!(
            "{} holds encrypted objects ({} says so) but this process has no encryption key and would \
             store plaintext: set encryption_key_file as the store's other wal-rs commands have it (to \
             stop encrypting on purpose, remove \"encrypted\" from that record)",
            store.url(),
            layout::cluster_identity_key()
        ))),
        (false, true) => {
            mark_encrypted(store, recorded).await;
            Ok(owner)
        }
        _ => Ok(owner),
    }
}

/// Marks the store's record as encrypted, the first time a process with a key pushes to a
/// store that was created without one. Best effort: the object being pushed is sealed
/// either way, and the next keyed push tries again.
async fn mark_encrypted(store: &Arc<Store>, recorded: ClusterIdentity) {
    let record = ClusterIdentity { encrypted: true, ..recorded };
    let bytes = serde_json::to_vec_pretty(&record).expect("identity serialises");
    let opts = PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
    let key = layout::cluster_identity_key();
    if let Err(e) = store.put_bytes(&key, bytes, opts).await {
        crate::log::emit(
            crate::log::Level::Warn,
            &[("op", &"identity"), ("key", &key), ("outcome", &"not marked encrypted"), ("error", &e)],
        );
    }
}

/// The recorded identity, if any.
pub async fn read(store: &Store) -> Result<Option<ClusterIdentity>, Error> {
    let key = layout::cluster_identity_key();
    match store.get_bytes(&key).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Corrupt {
            key: format!("{}/{key}", store.url()),
            detail: format!("not a cluster identity record: {e}"),
        }),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::test_support::block_on;

    #[test]
    fn a_store_once_encrypted_refuses_a_push_without_a_key() {
        block_on(async {
            let owner = Owner { system_identifier: 7, pg_major: 15, wal_segment_size: 16 << 20 };
            // Created without a key: plaintext pushes go on as before.
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            owner_checked_sealing(&store, "a", owner, false).await.unwrap();
            owner_checked_sealing(&store, "a", owner, false).await.unwrap();
            assert!(!read(&store).await.unwrap().unwrap().encrypted);
            // The first keyed push marks it; from then on a push without a key is refused.
            owner_checked_sealing(&store, "a", owner, true).await.unwrap();
            assert!(read(&store).await.unwrap().unwrap().encrypted);
            let err = owner_checked_sealing(&store, "a", owner, false).await.unwrap_err();
            assert!(matches!(&err, Error::Config(m) if m.contains("no encryption key")), "{err}");
            owner_checked_sealing(&store, "a", owner, true).await.unwrap();

            // A keyed process of another cluster is refused as such and marks nothing.
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            owner_checked_sealing(&store, "a", owner, false).await.unwrap();
            let other = Owner { system_identifier: 8, ..owner };
            let err = owner_checked_sealing(&store, "b", other, true).await.unwrap_err();
            assert!(matches!(err, Error::ClusterMismatch { .. }), "{err}");
            assert!(!read(&store).await.unwrap().unwrap().encrypted, "another cluster marked the store");
            owner_checked_sealing(&store, "a", owner, false).await.unwrap();

            // Created with a key: marked from the start.
            let store = Arc::new(Store::Memory(MemoryStore::new()));
            owner_checked_sealing(&store, "a", owner, true).await.unwrap();
            assert!(owner_checked_sealing(&store, "a", owner, false).await.is_err());
        });
    }

    #[test]
    fn a_wal_folders_cluster_is_read_from_pg_control_or_a_segment_beside_it() {
        let data = tempfile::tempdir().unwrap();
        let pg_wal = data.path().join("pg_wal");
        fs::create_dir_all(data.path().join("global")).unwrap();
        fs::create_dir(&pg_wal).unwrap();
        // Nothing to go by: an empty folder.
        assert_eq!(cluster_of_wal_folder(data.path(), &pg_wal), None);
        // A segment of cluster 5 beside the file.
        let segment = crate::wal::page::tests::pg15_first_page(1, 3 << 20, 5, 1 << 20);
        fs::write(pg_wal.join("000000010000000000000003"), &segment).unwrap();
        assert_eq!(cluster_of_wal_folder(data.path(), &pg_wal), Some(5));
        // pg_control of the data directory whose pg_wal this is comes first.
        let mut control = vec![0u8; PG_CONTROL_FILE_SIZE];
        control[..8].copy_from_slice(&7712412929493074945u64.to_le_bytes());
        fs::write(data.path().join("global/pg_control"), &control).unwrap();
        assert_eq!(cluster_of_wal_folder(data.path(), &pg_wal), Some(7712412929493074945));
        // Another data directory's pg_control says nothing about this folder.
        let elsewhere = tempfile::tempdir().unwrap();
        fs::create_dir(elsewhere.path().join("pg_wal")).unwrap();
        assert_eq!(cluster_of_wal_folder(data.path(), elsewhere.path()), None);
        assert_eq!(cluster_of_wal_folder(elsewhere.path(), &pg_wal), Some(5));
    }

    #[test]
    fn an_owner_refuses_another_cluster_version_or_segment_size() {
        let owner = Owner { system_identifier: 1, pg_major: 15, wal_segment_size: 16 << 20 };
        assert!(owner.check("a", owner, "memory://").is_ok());
        let other_cluster = Owner { system_identifier: 2, ..owner };
        assert!(matches!(owner.check("a", other_cluster, "memory://"), Err(Error::ClusterMismatch { .. })));
        let other_major = Owner { pg_major: 16, ..owner };
        assert!(matches!(owner.check("a", other_major, "memory://"), Err(Error::VersionMismatch { .. })));
        let other_size = Owner { wal_segment_size: 64 << 20, ..owner };
        assert!(matches!(owner.check("a", other_size, "memory://"), Err(Error::VersionMismatch { .. })));
    }
}
