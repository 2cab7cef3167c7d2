//! Which cluster a store prefix belongs to.
//!
//! Two clusters archiving into one prefix overwrite each other's history without a sound:
//! their segment names collide. The first wal-push of a segment records the cluster's system
//! identifier (from the segment's long page header) in the store; every later push compares
//! against it. Promoted copies and forks of the same cluster share its identifier, so a new
//! timeline in the same prefix is allowed, as PostgreSQL intends.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::layout;
use crate::store::{Metadata, PutMode, PutOptions, PutOutcome, Store, StoreError};
use crate::wal::{SegmentHeader, WalFileName};

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
}

/// Checks that `header`'s cluster owns the store, recording it if nobody does yet.
pub async fn check_or_record(store: &Arc<Store>, name: &WalFileName, header: &SegmentHeader) -> Result<(), Error> {
    check_or_record_cluster(store, &name.to_string(), header.system_identifier, header.pg_major, header.segment_size)
        .await
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
    let key = layout::cluster_identity_key();
    let recorded = match read(store).await? {
        Some(id) => id,
        None => {
            let mine = ClusterIdentity {
                system_identifier: system_identifier.to_string(),
                pg_major,
                wal_segment_size,
                created_by: format!("wal-rs {}", env!("CARGO_PKG_VERSION")),
            };
            let bytes = serde_json::to_vec_pretty(&mine).expect("identity serialises");
            let opts = PutOptions { mode: PutMode::Create, metadata: Metadata::new() };
            match store.put_bytes(&key, bytes, opts).await? {
                PutOutcome::Stored => return Ok(()),
                // Another push recorded one first: compare with that.
                PutOutcome::AlreadyExists => {
                    read(store).await?.ok_or_else(|| Error::Store(StoreError::NotFound { key: key.to_string() }))?
                }
            }
        }
    };
    let store_sysid: u64 = recorded.system_identifier.parse().map_err(|_| Error::Corrupt {
        key: format!("{}/{key}", store.url()),
        detail: format!("system_identifier {:?} is not a number", recorded.system_identifier),
    })?;
    if store_sysid != system_identifier {
        return Err(Error::ClusterMismatch {
            name: what.to_string(),
            segment_sysid: system_identifier,
            store_sysid,
            store: store.url(),
        });
    }
    // Same cluster, other format: a pg_upgrade'd cluster keeps neither, but a crafted or
    // restored copy could; its WAL and backups cannot be replayed with the archive's.
    if recorded.pg_major != pg_major || recorded.wal_segment_size != wal_segment_size {
        let describe = |major: u32, size: u32| format!("PostgreSQL {major} with {} MiB WAL segments", size >> 20);
        return Err(Error::VersionMismatch {
            name: what.to_string(),
            found: describe(pg_major, wal_segment_size),
            recorded: describe(recorded.pg_major, recorded.wal_segment_size),
            store: store.url(),
        });
    }
    Ok(())
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
