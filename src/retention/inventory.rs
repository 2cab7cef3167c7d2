//! Reading what the store holds, for `delete` and `wal-verify`: one listing of each folder
//! retention looks at, the complete backups, every `.history` file decoded and parsed, and
//! the WAL segment size.

use std::sync::Arc;

use super::plan::{wal_name_of, Inventory};
use super::timelines::{parse_history, Histories};
use crate::backup::catalog;
use crate::codec::{self, Compression};
use crate::error::Error;
use crate::layout;
use crate::store::{ObjectKey, ObjectMeta, Store, StoreError};
use crate::wal::WalFileName;

/// WAL-G's and PostgreSQL's default segment size, when nothing in the store records one.
pub const DEFAULT_SEGMENT_SIZE: u32 = 16 << 20;

/// Lists the store and reads the backups and timeline histories.
pub async fn read(store: &Arc<Store>) -> Result<Inventory, Error> {
    let mut objects = Vec::new();
    for prefix in [format!("{}/", layout::WAL_DIR), format!("{}/", layout::BACKUP_DIR), layout::GAP_PREFIX.to_string()]
    {
        match store.list(&prefix).await {
            Ok(mut o) => objects.append(&mut o),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let backups = catalog::list(store).await?;
    let histories = read_histories(store, &objects).await?;
    let recorded = backups.iter().rev().find_map(|b| b.sentinel.wal_segment_size);
    let segment_size = match recorded {
        Some(s) => s,
        None => crate::identity::read(store).await?.map(|c| c.wal_segment_size).unwrap_or(DEFAULT_SEGMENT_SIZE),
    };
    Ok(Inventory { objects, backups, histories, segment_size })
}

/// Every `.history` object among `objects`, decoded and parsed. An unreadable one is an
/// error: deciding which timelines matter without it could delete what it protects.
pub async fn read_histories(store: &Arc<Store>, objects: &[ObjectMeta]) -> Result<Histories, Error> {
    let mut out = Histories::new();
    for o in objects {
        let Some(WalFileName::History(tli)) = wal_name_of(o.key.as_str()) else { continue };
        if out.contains_key(&tli) {
            continue; // the same file under two compressions
        }
        let text = read_small_wal_file(store, &o.key).await?;
        let entries = parse_history(&String::from_utf8_lossy(&text)).map_err(|e| Error::Corrupt {
            key: format!("{}/{}", store.url(), o.key),
            detail: format!("not a timeline history file: {e}"),
        })?;
        out.insert(tli, entries);
    }
    Ok(out)
}

/// The original bytes of a small WAL object (a history file), checked against its trailer.
async fn read_small_wal_file(store: &Arc<Store>, key: &ObjectKey) -> Result<Vec<u8>, Error> {
    let describe = format!("{}/{key}", store.url());
    let ext = key.file_name().rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    let compression = match ext {
        "history" => Compression::None,
        e => Compression::from_extension(e).ok_or_else(|| Error::Unsupported { key: describe.clone() })?,
    };
    let reader = store.get(key).await?;
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        codec::decode(reader.body, compression, &mut out).map(|_| out)
    })
    .await
    .expect("the decode task panicked")
    .map_err(|e| Error::Corrupt { key: describe, detail: e.to_string() })
}
