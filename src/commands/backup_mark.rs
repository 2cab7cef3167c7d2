//! `wal-rs backup-mark NAME` / `backup-mark --unmark NAME`: makes a backup permanent (never
//! deleted by retention, nor the WAL from its start to its finish), or ordinary again.
//!
//! The mark is WAL-G's: `IsPermanent` in the sentinel (and `is_permanent` in
//! `metadata.json`), so WAL-G-compatible tools see it too. The sentinel is rewritten in
//! place (an atomic overwrite on both stores) as JSON with every other field kept exactly,
//! including fields wal-rs does not know.

use serde_json::Value;

use super::common::open_store;
use crate::backup::catalog;
use crate::config::Config;
use crate::error::Error;
use crate::layout;
use crate::store::{Metadata, PutMode, PutOptions, StoreError};

/// Marks (or unmarks) `name`; returns whether anything changed.
pub(super) async fn run(config: &Config, name: &str, permanent: bool) -> Result<bool, Error> {
    let store = open_store(config).await?;
    let backups = catalog::list(&store).await?;
    if !backups.iter().any(|b| b.name == name) {
        return Err(Error::NotFound(format!(
            "no complete backup is named {name} in {}: see `wal-rs backup-list`",
            store.url()
        )));
    }
    let overwrite = || PutOptions { mode: PutMode::Overwrite, metadata: Metadata::new() };
    // metadata.json first: the sentinel is what retention reads, so it changes last.
    let meta_key = layout::backup_file_key(name, "metadata.json");
    match store.get_bytes(&meta_key).await {
        Ok(bytes) => {
            if let Some(updated) = set_flag(&bytes, "is_permanent", permanent) {
                store.put_bytes(&meta_key, updated, overwrite()).await?;
            }
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let key = layout::sentinel_key(name);
    let bytes = store.get_bytes(&key).await?;
    match set_flag(&bytes, "IsPermanent", permanent) {
        Some(updated) => {
            store.put_bytes(&key, updated, overwrite()).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The JSON object `bytes` with `field` set to `value`, or `None` when it already is (or
/// `bytes` is not a JSON object, which the catalogue would have refused already).
fn set_flag(bytes: &[u8], field: &str, value: bool) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object_mut()?;
    if obj.get(field).and_then(Value::as_bool).unwrap_or(false) == value && obj.contains_key(field) {
        return None;
    }
    obj.insert(field.to_string(), Value::Bool(value));
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_flag_changes() {
        let text = br#"{"LSN":33554472,"ChkpNum":null,"DeltaFrom":"x","IsPermanent":false}"#;
        let out: Value = serde_json::from_slice(&set_flag(text, "IsPermanent", true).unwrap()).unwrap();
        assert_eq!(out["IsPermanent"], true);
        assert_eq!(out["DeltaFrom"], "x", "fields wal-rs does not know are kept");
        assert!(out.as_object().unwrap().contains_key("ChkpNum"));
        assert!(set_flag(br#"{"IsPermanent":true}"#, "IsPermanent", true).is_none());
        assert!(set_flag(br#"{"LSN":1}"#, "IsPermanent", false).is_some(), "an absent flag is written");
    }
}
