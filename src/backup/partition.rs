//! Writing tar partitions: entries go into a tar stream, compressed, hashed and uploaded as
//! they are read, so a partition is never held in memory. Each file's bytes are hashed on
//! the way for the manifest.
//!
//! A file is copied at the size it had when opened: if it shrinks while being read the
//! rest is zeros, if it grows the extra is left out. That is what PostgreSQL's own base
//! backup does; WAL replay from the backup's start repairs such files.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;

use sha2::{Digest, Sha256 as Sha256Hasher};

use super::manifest::{FileEntry, PartitionEntry};
use super::walk::{Entry, EntryKind};
use crate::codec::encode::{read_full, Counting};
use crate::codec::hasher::BackgroundHasher;
use crate::codec::{Compression, Compressor, Sha256, CHUNK_SIZE};
use crate::store::{ObjectKey, ObjectWriter};

/// Why a partition could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading a file from the data directory failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the partition (compression, upload) failed.
    #[error("{0}")]
    Write(#[source] io::Error),
}

/// Counts bytes and hashes them on the way to `inner`.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256Hasher,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256Hasher::new(), count: 0 }
    }
    pub(crate) fn finish(self) -> (W, Sha256, u64) {
        (self.inner, Sha256(self.hasher.finalize().into()), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Sink = Counting<Compressor<HashingWriter<Box<dyn ObjectWriter>>>>;

/// One partition being written.
pub struct PartitionWriter {
    name: String,
    tar: tar::Builder<Sink>,
    files: Vec<FileEntry>,
    /// Reused buffer for small files.
    scratch: Vec<u8>,
    /// Original bytes read from files so far (for progress).
    pub bytes_read: u64,
}

impl PartitionWriter {
    /// A partition named `name` (e.g. `part_001.tar.lz4`) written to `object`, which
    /// publishes it under `key`.
    pub fn new(
        name: String,
        key: &ObjectKey,
        object: Box<dyn ObjectWriter>,
        compression: Compression,
        level: i32,
    ) -> io::Result<Self> {
        let compressor = Compressor::new(compression, level, key, HashingWriter::new(object))?;
        let mut tar = tar::Builder::new(Counting { inner: compressor, count: 0 });
        tar.mode(tar::HeaderMode::Complete);
        Ok(PartitionWriter { name, tar, files: Vec::new(), scratch: Vec::new(), bytes_read: 0 })
    }

    /// Tar bytes written so far, to decide when to start the next partition.
    pub fn tar_size(&self) -> u64 {
        self.tar.get_ref().count
    }

    /// Adds one entry; a file that vanished is skipped.
    pub fn append(&mut self, entry: &Entry) -> Result<(), PartitionError> {
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.mode & 0o7777);
        header.set_mtime(entry.mtime);
        header.set_uid(0);
        header.set_gid(0);
        match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                self.tar.append_data(&mut header, format!("{}/", entry.rel), io::empty()).map_err(PartitionError::Write)
            }
            EntryKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                self.tar.append_link(&mut header, &entry.rel, target).map_err(PartitionError::Write)
            }
            EntryKind::File { .. } => {
                let mut file = match File::open(&entry.abs) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(source) => return Err(PartitionError::Read { path: entry.abs.display().to_string(), source }),
                };
                let read_err = |source| PartitionError::Read { path: entry.abs.display().to_string(), source };
                let size = file.metadata().map_err(read_err)?.size();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                // The tar crate writes the header (and a long-name entry when needed); the
                // data goes straight to the sink in large chunks, not through its 8 KiB copy.
                self.tar.append_data(&mut header, &entry.rel, io::empty()).map_err(PartitionError::Write)?;
                let sha256 =
                    copy_exact(&mut file, size, self.tar.get_mut(), &mut self.scratch).map_err(|e| match e {
                        CopyError::Read(e) => read_err(e),
                        CopyError::Write(e) => PartitionError::Write(e),
                    })?;
                self.bytes_read += size;
                self.files.push(FileEntry { path: entry.rel.clone(), size, sha256: sha256.to_string() });
                Ok(())
            }
        }
    }

    /// Adds a file from memory (backup_label, tablespace_map, pg_control).
    pub fn append_bytes(&mut self, rel: &str, bytes: &[u8], mode: u32) -> Result<(), PartitionError> {
        let mut header = tar::Header::new_gnu();
        header.set_mode(mode);
        header.set_mtime(time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(bytes.len() as u64);
        self.tar.append_data(&mut header, rel, bytes).map_err(PartitionError::Write)?;
        self.files.push(FileEntry {
            path: rel.to_string(),
            size: bytes.len() as u64,
            sha256: Sha256(Sha256Hasher::digest(bytes).into()).to_string(),
        });
        Ok(())
    }

    /// Ends the tar stream and the compression, and hands back the object writer to
    /// publish, with the manifest entry.
    pub fn finish(self) -> Result<(Box<dyn ObjectWriter>, PartitionEntry), PartitionError> {
        let counter = self.tar.into_inner().map_err(PartitionError::Write)?;
        let tar_size = counter.count;
        let hashing = counter.inner.finish().map_err(PartitionError::Write)?;
        let (object, sha, stored) = hashing.finish();
        Ok((
            object,
            PartitionEntry {
                name: self.name,
                stored_size: stored,
                stored_sha256: sha.to_string(),
                tar_size,
                files: self.files,
            },
        ))
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies exactly `size` bytes of `file` into `sink`, then the tar padding: zeros past a
/// shrunk file's end, nothing of what a growing file appends. Returns the sha256 of the
/// bytes copied; for large files it runs on a second core while the sink compresses.
fn copy_exact<W: Write>(file: &mut File, size: u64, sink: &mut W, scratch: &mut Vec<u8>) -> Result<Sha256, CopyError> {
    let mut remaining = size;
    let mut fill = |buf: &mut [u8]| -> Result<(), CopyError> {
        let n = read_full(file, buf).map_err(CopyError::Read)?;
        if let Some(limit) = crate::ratelimit::disk() {
            limit.take(n);
        }
        // The file shrank: pad with zeros, as PostgreSQL's base backup does.
        buf[n..].fill(0);
        sink.write_all(buf).map_err(CopyError::Write)
    };
    let sha = if size > CHUNK_SIZE as u64 {
        let mut hasher = BackgroundHasher::new();
        while remaining > 0 {
            let want = remaining.min(CHUNK_SIZE as u64) as usize;
            let mut buf = hasher.buffer();
            fill(&mut buf[..want])?;
            hasher.update(buf, want);
            remaining -= want as u64;
        }
        hasher.finish()
    } else {
        let mut hasher = Sha256Hasher::new();
        scratch.resize(size as usize, 0);
        fill(&mut scratch[..])?;
        hasher.update(&scratch[..]);
        Sha256(hasher.finalize().into())
    };
    let padding = (512 - size % 512) % 512;
    sink.write_all(&[0u8; 512][..padding as usize]).map_err(CopyError::Write)?;
    Ok(sha)
}
