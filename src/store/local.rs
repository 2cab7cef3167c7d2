//! The local-directory store (`file:///absolute/dir`): one file per object, under the same
//! key layout as a bucket, so a directory store can be synced to S3 as is.
//!
//! Durability follows PostgreSQL's own rules for files it must not lose: write a temporary
//! file beside the target, fsync it, publish it with a hard link (create, fails if the
//! target exists) or a rename (overwrite), then fsync the directory. Temporary files start
//! with a dot so listings never show them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Metadata, ObjectKey, ObjectMeta, ObjectReader, ObjectWriter, PutMode, PutOptions, PutOutcome, StoreError};

/// Prefix of the extended attributes that hold object metadata.
const XATTR_PREFIX: &str = "user.walrs.";

/// A store rooted at a local directory.
///
/// The async methods make their file system calls on the calling thread. On a network
/// mount whose server is gone a call may not return for minutes, or ever, and it then
/// holds the async runtime's only thread, timers included: the WAL commands' watchdog
/// thread ends such a command 5 s after its deadline, with the same exit code
/// ([`crate::deadline`]). Handing every call to a blocking thread instead would let the
/// ordinary deadline fire 5 s sooner, but costs every wal-fetch and wal-push about 0.5 ms
/// (threads started and woken; 3.3 against 3.8 ms for a wal-fetch of a missing name,
/// interleaved, 150 runs each), which PostgreSQL pays on every segment.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store at `root`, which must be absolute. The directory need not exist yet for
    /// reads to answer "store missing"; writes require it.
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    /// The store's URL.
    pub fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io { op, path: path.display().to_string(), source }
    }

    /// NotFound for a missing object, StoreMissing when the root itself is gone: "not in
    /// the archive" must never be said about an archive that is not there.
    fn not_found(&self, key: &ObjectKey) -> StoreError {
        if self.root.is_dir() {
            StoreError::NotFound { key: key.to_string() }
        } else {
            StoreError::StoreMissing { store: self.url() }
        }
    }

    pub(super) fn writer(&self, key: &ObjectKey, opts: PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        if !self.root.is_dir() {
            return Err(StoreError::StoreMissing { store: self.url() });
        }
        let target = self.path_of(key);
        let dir = target.parent().expect("keys have a parent under the root").to_path_buf();
        create_dirs_durably(&self.root, &dir)?;
        let (temp, file) = create_temp_beside(&dir, key.file_name())?;
        Ok(Box::new(LocalWriter {
            file: Some(BufWriter::with_capacity(super::super::codec::CHUNK_SIZE, file)),
            written: 0,
            flushed_to: 0,
            temp,
            temp_gone: false,
            target,
            dir,
            opts,
        }))
    }

    pub(super) async fn get(&self, key: &ObjectKey) -> Result<ObjectReader, StoreError> {
        let path = self.path_of(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(key)),
            Err(e) => return Err(Self::io_err("open", &path, e)),
        };
        let size = file.metadata().map_err(|e| Self::io_err("stat", &path, e))?.len();
        let metadata = read_metadata(&path)?;
        Ok(ObjectReader { size, metadata, body: Box::new(file) })
    }

    pub(super) async fn get_bytes(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(key);
        match fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.not_found(key)),
            Err(e) => Err(Self::io_err("read", &path, e)),
        }
    }

    pub(super) async fn get_tail(&self, key: &ObjectKey, len: u64) -> Result<(Vec<u8>, u64), StoreError> {
        let path = self.path_of(key);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(key)),
            Err(e) => return Err(Self::io_err("open", &path, e)),
        };
        let size = file.metadata().map_err(|e| Self::io_err("stat", &path, e))?.len();
        let mut out = Vec::with_capacity(len.min(size) as usize);
        file.seek(SeekFrom::Start(size.saturating_sub(len)))
            .and_then(|_| file.read_to_end(&mut out))
            .map_err(|e| Self::io_err("read", &path, e))?;
        Ok((out, size))
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path_of(key);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.clone(),
                size: m.len(),
                metadata: read_metadata(&path)?,
                modified: m.modified().ok(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.not_found(key) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
            Err(e) => Err(Self::io_err("stat", &path, e)),
        }
    }

    /// Writers' temporary files (`.<name>.tmp.<pid>.<n>`) not modified for `older_than`, in
    /// the whole store; removed when `remove`. A writer still running touches its file as it
    /// writes, so an old one belongs to a killed process.
    pub(super) async fn sweep_abandoned(
        &self,
        older_than: std::time::Duration,
        remove: bool,
    ) -> Result<(u64, u64), StoreError> {
        let mut found = (0u64, 0u64);
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Self::io_err("list", &dir, e)),
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                let name = entry.file_name().to_string_lossy().into_owned();
                if ft.is_dir() {
                    pending.push(entry.path());
                    continue;
                }
                if !(ft.is_file() && name.starts_with('.') && name.contains(".tmp.")) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
                if age < older_than {
                    continue;
                }
                if remove {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Self::io_err("delete", &entry.path(), e)),
                    }
                }
                found.0 += 1;
                found.1 += meta.len();
            }
        }
        Ok(found)
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        if !self.root.is_dir() {
            return Err(StoreError::StoreMissing { store: self.url() });
        }
        // Walk only the deepest directory the prefix names, not the whole store.
        let start_rel = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        let mut pending = vec![start_rel.to_string()];
        while let Some(rel) = pending.pop() {
            let dir = if rel.is_empty() { self.root.clone() } else { self.root.join(&rel) };
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Self::io_err("list", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| Self::io_err("list", &dir, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
                let ft = entry.file_type().map_err(|e| Self::io_err("stat", &entry.path(), e))?;
                if ft.is_dir() {
                    if prefix.starts_with(&format!("{key}/")) || key.starts_with(prefix) {
                        pending.push(key);
                    }
                } else if ft.is_file() && key.starts_with(prefix) {
                    let stat = entry.metadata().map_err(|e| Self::io_err("stat", &entry.path(), e))?;
                    let (size, modified) = (stat.len(), stat.modified().ok());
                    let key = ObjectKey::new(&key).map_err(|e| StoreError::Other {
                        op: "list",
                        key: key.clone(),
                        detail: e.to_string(),
                    })?;
                    out.push(ObjectMeta { key, size, metadata: Metadata::new(), modified });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// See [`super::Store::confirm_absent`].
    pub(super) async fn confirm_absent(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let folder = self.path_of(key).parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        if folder.is_dir() {
            return Ok(());
        }
        Err(StoreError::Unavailable {
            op: "get",
            key: format!("{}/{key}", self.url()),
            detail: format!(
                "{} is missing: nothing was ever archived there, or the file system that holds the store is not mounted; check WALRS_STORE and the mount",
                folder.display()
            ),
        })
    }

    /// fsyncs the object and its directory (see [`super::Store::make_durable`]).
    pub(super) async fn make_durable(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path_of(key);
        File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Self::io_err("fsync", &path, e))?;
        fsync_dir(path.parent().unwrap_or(&self.root))
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => fsync_dir(path.parent().unwrap()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io_err("delete", &path, e)),
        }
    }
}

struct LocalWriter {
    file: Option<BufWriter<File>>,
    /// Bytes handed to `write`.
    written: u64,
    /// Bytes whose writeback to disk has been started.
    flushed_to: u64,
    temp: PathBuf,
    /// The temporary name is removed (published, or cleaned up): nothing for `Drop` to do.
    temp_gone: bool,
    target: PathBuf,
    dir: PathBuf,
    opts: PutOptions,
}

/// Writeback is started every this many bytes (see [`LocalWriter::start_writeback`]).
const WRITEBACK_EVERY: u64 = 1 << 20;

impl LocalWriter {
    /// Starts writing what has been written so far to disk, without waiting for it: the
    /// fsync at the end then has only the tail left to wait for, instead of the whole object
    /// (a few milliseconds of a WAL push). Best effort: the fsync is what makes it durable.
    fn start_writeback(&mut self) -> io::Result<()> {
        let file = self.file.as_mut().expect("write after finish");
        file.flush()?;
        use std::os::fd::AsRawFd;
        let (from, len) = (self.flushed_to, self.written - self.flushed_to);
        // SAFETY: sync_file_range reads nothing from our memory; the descriptor is open.
        unsafe {
            libc::sync_file_range(file.get_ref().as_raw_fd(), from as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
        self.flushed_to = self.written;
        Ok(())
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("write after finish").write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed_to >= WRITEBACK_EVERY {
            self.start_writeback()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("flush after finish").flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn finish(mut self: Box<Self>) -> Result<PutOutcome, StoreError> {
        let temp = self.temp.clone();
        let io_err = |op, e| LocalStore::io_err(op, &temp, e);
        let file =
            self.file.take().expect("finish called once").into_inner().map_err(|e| io_err("write", e.into_error()))?;
        for (name, value) in &self.opts.metadata {
            xattr::set(&temp, format!("{XATTR_PREFIX}{name}"), value.as_bytes())
                .map_err(|e| io_err("set metadata on", e))?;
        }
        file.sync_all().map_err(|e| io_err("fsync", e))?;
        drop(file);
        let outcome = match self.opts.mode {
            PutMode::Create => match fs::hard_link(&self.temp, &self.target) {
                Ok(()) => PutOutcome::Stored,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
                Err(e) => return Err(LocalStore::io_err("publish", &self.target, e)),
            },
            PutMode::Overwrite => {
                fs::rename(&self.temp, &self.target).map_err(|e| LocalStore::io_err("publish", &self.target, e))?;
                PutOutcome::Stored
            }
        };
        // The temporary name goes (a no-op after a rename) before the directory fsync, so
        // the fsync also makes its removal durable.
        let _ = fs::remove_file(&self.temp);
        self.temp_gone = true;
        fsync_dir(&self.dir)?;
        Ok(outcome)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Not finished, or finish failed part way (setting metadata, fsync, publishing): an
        // error or an early return. Leave nothing behind; a retry writes a new temporary.
        if !self.temp_gone {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// The last part of temporary names, unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a new temporary file for `file_name` in `dir`: `.<file_name>.tmp.<pid>.<n>`.
/// A name left by a crash before a reboot can come back with the same process id (PIDs
/// repeat, in containers especially), so a name in use is skipped, never reused: it may
/// also be a live writer's.
fn create_temp_beside(dir: &Path, file_name: &str) -> Result<(PathBuf, File), StoreError> {
    const TRIES: usize = 64;
    let mut last = None;
    for _ in 0..TRIES {
        let temp = dir.join(format!(
            ".{file_name}.tmp.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new().write(true).create_new(true).open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((temp, e)),
            Err(e) => return Err(LocalStore::io_err("create", &temp, e)),
        }
    }
    let (temp, e) = last.expect("at least one try");
    Err(LocalStore::io_err("create", &temp, e))
}

/// The object's metadata, from its extended attributes. A file system without them has
/// none to give; any other failure to read them is an error, never "no metadata": an
/// uncompressed object's sha256 is there, and without it the object would be restored
/// unchecked.
fn read_metadata(path: &Path) -> Result<Metadata, StoreError> {
    let mut out = Metadata::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) => return metadata_failure(path, e).map(|()| out),
    };
    for name in names {
        let Some(name) = name.to_str() else { continue };
        if let Some(short) = name.strip_prefix(XATTR_PREFIX) {
            // `None`: removed since it was listed.
            match xattr::get(path, name) {
                Ok(Some(value)) => {
                    out.insert(short.to_string(), String::from_utf8_lossy(&value).into_owned());
                }
                Ok(None) => {}
                Err(e) => metadata_failure(path, e)?,
            }
        }
    }
    Ok(out)
}

/// What a failure to read extended attributes means: `Ok` for a file system that keeps none
/// (ENOTSUP, such as NFSv3); a final error for refused permission, which someone must fix;
/// otherwise a transient one (EIO, ESTALE, a timeout of a network mount), retried.
fn metadata_failure(path: &Path, e: io::Error) -> Result<(), StoreError> {
    match e.raw_os_error() {
        Some(errno) if errno == libc::ENOTSUP || errno == libc::EOPNOTSUPP => Ok(()),
        None if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        Some(libc::EACCES | libc::EPERM) => Err(LocalStore::io_err("read metadata of", path, e)),
        _ => Err(StoreError::Unavailable {
            op: "read metadata of",
            key: path.display().to_string(),
            detail: format!("{e}; without it the object's sha256 cannot be checked"),
        }),
    }
}

/// fsyncs a directory, so that entries created or removed in it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| LocalStore::io_err("fsync", dir, e))
}

/// Creates `dir` and any missing parents below `root`, fsyncing each parent whose entries
/// changed, so a published object's directory cannot vanish in a crash.
fn create_dirs_durably(root: &Path, dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent != root {
            create_dirs_durably(root, parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(dir.parent().unwrap_or(root)),
        // Another process created it a moment ago and may be killed before its own fsync of
        // the parent: do it here too (this happens once per new directory, not per object).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fsync_dir(dir.parent().unwrap_or(root)),
        Err(e) => Err(LocalStore::io_err("create directory", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn abandoned_temporary_files_are_swept_once_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        fs::create_dir_all(dir.path().join("wal_005")).unwrap();
        let old = dir.path().join("wal_005/.000000010000000000000001.lz4.tmp.77.0");
        let fresh = dir.path().join("wal_005/.000000010000000000000002.lz4.tmp.78.0");
        let object = dir.path().join("wal_005/000000010000000000000001.lz4");
        for p in [&old, &fresh, &object] {
            fs::write(p, b"12345").unwrap();
        }
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options().write(true).open(&old).unwrap().set_modified(hour_ago).unwrap();
        fs::File::options().write(true).open(&object).unwrap().set_modified(hour_ago).unwrap();
        let minute = Duration::from_secs(60);
        assert_eq!(crate::test_support::block_on(store.sweep_abandoned(minute, false)).unwrap(), (1, 5));
        assert!(old.exists(), "a dry run removed a file");
        assert_eq!(crate::test_support::block_on(store.sweep_abandoned(minute, true)).unwrap(), (1, 5));
        assert!(!old.exists() && fresh.exists() && object.exists());
    }

    #[test]
    fn only_a_file_system_without_extended_attributes_has_no_metadata() {
        let path = Path::new("/mnt/store/wal_005/000000010000000000000003");
        let failure = |errno| metadata_failure(path, io::Error::from_raw_os_error(errno));
        assert!(failure(libc::ENOTSUP).is_ok());
        assert!(failure(libc::EOPNOTSUPP).is_ok());
        for errno in [libc::EIO, libc::ESTALE, libc::ETIMEDOUT, libc::ENOMEM] {
            let e = failure(errno).unwrap_err();
            assert!(e.is_transient(), "errno {errno}: {e}");
            assert!(e.to_string().contains("000000010000000000000003"), "{e}");
        }
        let denied = failure(libc::EACCES).unwrap_err();
        assert!(!denied.is_transient(), "{denied}");
    }

    fn temporaries_in(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect()
    }

    /// A put that fails inside `finish` (here setting metadata: an attribute name longer
    /// than the 255 bytes Linux allows) removes its temporary file, as one that fails
    /// before `finish` does: repeated failures must not fill the disk.
    #[test]
    fn a_put_that_fails_while_finishing_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let key = ObjectKey::new("wal_005/000000010000000000000001").unwrap();
        let metadata = Metadata::from([("x".repeat(300), "v".to_string())]);
        let mut writer = store.writer(&key, PutOptions { mode: PutMode::Create, metadata }).unwrap();
        writer.write_all(b"segment").unwrap();
        assert!(writer.finish().is_err());
        assert_eq!(temporaries_in(&dir.path().join("wal_005")), Vec::<String>::new());
        assert!(!dir.path().join("wal_005/000000010000000000000001").exists());
    }

    /// A temporary name left by a crash before a reboot, that this process's id and counter
    /// would give again, is stepped over: the put succeeds and the leftover is not touched.
    #[test]
    fn a_leftover_temporary_name_is_stepped_over() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("wal_005");
        fs::create_dir_all(&wal).unwrap();
        let name = "000000010000000000000002";
        // Plant the next names this process would pick (other tests may take some first).
        let pid = std::process::id();
        let next = TEMP_COUNTER.load(Ordering::Relaxed);
        let planted: Vec<PathBuf> = (next..next + 8).map(|n| wal.join(format!(".{name}.tmp.{pid}.{n}"))).collect();
        for p in &planted {
            fs::write(p, b"left by a crash").unwrap();
        }
        let (temp, _file) = create_temp_beside(&wal, name).unwrap();
        assert!(!planted.contains(&temp), "{temp:?} was in use");
        for p in &planted {
            assert_eq!(fs::read(p).unwrap(), b"left by a crash");
        }
    }
}
