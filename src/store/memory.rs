//! An in-memory store for unit tests. Integration tests never use it.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{Metadata, ObjectKey, ObjectMeta, ObjectReader, ObjectWriter, PutMode, PutOptions, PutOutcome, StoreError};

/// Each object: bytes, metadata, when it was written.
type Objects = Arc<Mutex<BTreeMap<ObjectKey, (Vec<u8>, Metadata, SystemTime)>>>;

/// Objects in a map, with the same guarantees as the real backends.
#[derive(Default, Clone)]
pub struct MemoryStore {
    objects: Objects,
    /// Listings made, for tests of how many requests a command sends.
    lists: Arc<std::sync::atomic::AtomicUsize>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// How many listings were made.
    pub fn listings(&self) -> usize {
        self.lists.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store's URL.
    pub fn url(&self) -> String {
        "memory://".to_string()
    }

    pub(super) fn writer(&self, key: &ObjectKey, opts: PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        Ok(Box::new(MemoryWriter { objects: self.objects.clone(), key: key.clone(), opts, buf: Vec::new() }))
    }

    pub(super) async fn get(&self, key: &ObjectKey) -> Result<ObjectReader, StoreError> {
        let objects = self.objects.lock().unwrap();
        let (bytes, metadata, _) = objects.get(key).ok_or_else(|| StoreError::NotFound { key: key.to_string() })?;
        Ok(ObjectReader {
            size: bytes.len() as u64,
            metadata: metadata.clone(),
            body: Box::new(io::Cursor::new(bytes.clone())),
        })
    }

    pub(super) async fn get_bytes(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError> {
        let objects = self.objects.lock().unwrap();
        let (bytes, _, _) = objects.get(key).ok_or_else(|| StoreError::NotFound { key: key.to_string() })?;
        Ok(bytes.clone())
    }

    pub(super) async fn get_tail(&self, key: &ObjectKey, len: u64) -> Result<(Vec<u8>, u64), StoreError> {
        let objects = self.objects.lock().unwrap();
        let (bytes, _, _) = objects.get(key).ok_or_else(|| StoreError::NotFound { key: key.to_string() })?;
        Ok((bytes[bytes.len().saturating_sub(len as usize)..].to_vec(), bytes.len() as u64))
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StoreError> {
        let objects = self.objects.lock().unwrap();
        Ok(objects.get(key).map(|(bytes, metadata, modified)| ObjectMeta {
            key: key.clone(),
            size: bytes.len() as u64,
            metadata: metadata.clone(),
            modified: Some(*modified),
        }))
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.lists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .iter()
            .filter(|(k, _)| k.as_str().starts_with(prefix))
            .map(|(k, (bytes, _, modified))| ObjectMeta {
                key: k.clone(),
                size: bytes.len() as u64,
                metadata: Metadata::new(),
                modified: Some(*modified),
            })
            .collect())
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }

    /// Backdates `key`, for tests of age-dependent decisions (retention's garbage age).
    pub fn set_modified(&self, key: &ObjectKey, when: SystemTime) {
        if let Some(entry) = self.objects.lock().unwrap().get_mut(key) {
            entry.2 = when;
        }
    }
}

struct MemoryWriter {
    objects: Objects,
    key: ObjectKey,
    opts: PutOptions,
    buf: Vec<u8>,
}

impl Write for MemoryWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for MemoryWriter {
    fn finish(self: Box<Self>) -> Result<PutOutcome, StoreError> {
        let mut objects = self.objects.lock().unwrap();
        if self.opts.mode == PutMode::Create && objects.contains_key(&self.key) {
            return Ok(PutOutcome::AlreadyExists);
        }
        objects.insert(self.key, (self.buf, self.opts.metadata, SystemTime::now()));
        Ok(PutOutcome::Stored)
    }
}
