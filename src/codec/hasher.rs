//! sha256 on a second core: the caller fills and uses a buffer, then hands it over to be
//! hashed while it fills the next one. Buffers come back for reuse, so a whole segment
//! costs a handful of allocations and memory stays at a few chunks whatever the file size.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256 as Sha256Hasher};

use super::{Sha256, CHUNK_SIZE};

/// Bytes waiting to be hashed; with one chunk being hashed and one being filled, this bounds
/// the memory at `IN_FLIGHT_BYTES + 2 * chunk size`.
const IN_FLIGHT_BYTES: usize = 2 * CHUNK_SIZE;

pub(crate) struct BackgroundHasher {
    to_hash: Option<SyncSender<(Vec<u8>, usize)>>,
    returned: Receiver<Vec<u8>>,
    worker: Option<JoinHandle<Sha256>>,
    chunk: usize,
}

impl BackgroundHasher {
    pub(crate) fn new() -> Self {
        Self::continuing(Sha256Hasher::new())
    }

    /// Continues a digest already fed with the start of the stream.
    pub(crate) fn continuing(start: Sha256Hasher) -> Self {
        Self::with_chunk(start, CHUNK_SIZE)
    }

    /// Hands over buffers of `chunk` bytes. Smaller chunks start the hash sooner and leave
    /// less of it to finish after the last chunk, which matters when the hash is the
    /// longest stage (wal-fetch).
    pub(crate) fn with_chunk(start: Sha256Hasher, chunk: usize) -> Self {
        let (to_hash, chunks) = mpsc::sync_channel::<(Vec<u8>, usize)>((IN_FLIGHT_BYTES / chunk).max(2));
        let (give_back, returned) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("sha256".into())
            .spawn(move || {
                let mut hasher = start;
                for (buf, len) in chunks {
                    hasher.update(&buf[..len]);
                    // The receiver is gone only when the caller stopped early; nothing to do.
                    let _ = give_back.send(buf);
                }
                Sha256(hasher.finalize().into())
            })
            .expect("spawning the sha256 thread");
        BackgroundHasher { to_hash: Some(to_hash), returned, worker: Some(worker), chunk }
    }

    /// A buffer of the chunk size to fill: a returned one when there is one.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        let chunk = self.chunk;
        self.returned.try_recv().unwrap_or_else(|_| vec![0; chunk])
    }

    /// Hashes `buf[..len]` in the background; the buffer comes back through [`Self::buffer`].
    pub(crate) fn update(&mut self, buf: Vec<u8>, len: usize) {
        if let Some(tx) = &self.to_hash {
            tx.send((buf, len)).expect("the sha256 thread ended early");
        }
    }

    /// The sha256 of everything handed over.
    pub(crate) fn finish(mut self) -> Sha256 {
        self.to_hash.take();
        self.worker.take().unwrap().join().expect("the sha256 thread panicked")
    }
}

impl Drop for BackgroundHasher {
    fn drop(&mut self) {
        // On an early return, close the channel so the thread ends instead of waiting.
        self.to_hash.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
