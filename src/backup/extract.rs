//! Reading tar partitions back into a data directory: paths checked (nothing escapes the
//! destination), tablespace files sent to their (possibly remapped) locations, every file
//! checked against the manifest's sha256 as it is written.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256 as Sha256Hasher};

use super::manifest::FileEntry;
use crate::codec::encode::read_full;
use crate::codec::hasher::BackgroundHasher;
use crate::codec::{Sha256, CHUNK_SIZE};

/// Where a partition's entries go.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    /// The data directory being restored.
    pub dest: PathBuf,
    /// Tablespace OID to the directory its files go to.
    pub tablespaces: HashMap<String, PathBuf>,
}

/// Why extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The partition is not a valid tar stream, could not be read to its end, or a file
    /// fails its checksum.
    #[error("{0}")]
    Bad(String),
    /// Writing into the destination failed.
    #[error("cannot write {path}: {source}")]
    Local {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What one extraction wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExtractSummary {
    /// Regular files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl ExtractPlan {
    /// Where the entry at `rel` goes; `None` for the tablespace links themselves (made by the
    /// caller) and for entries that are not safe paths.
    pub fn target_of(&self, rel: &str) -> Result<Option<PathBuf>, ExtractError> {
        Ok(self.locate(rel)?.map(|(_, target)| target))
    }

    /// The folder the entry at `rel` goes under (the destination or a tablespace's) and its
    /// path there.
    fn locate<'a>(&'a self, rel: &str) -> Result<Option<(&'a Path, PathBuf)>, ExtractError> {
        let rel = rel.trim_start_matches('/').trim_start_matches("./").trim_end_matches('/');
        if rel.is_empty() {
            return Ok(None);
        }
        let path = Path::new(rel);
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ExtractError::Bad(format!("unsafe path {rel:?} in the backup")));
        }
        if let Some(rest) = rel.strip_prefix("pg_tblspc/") {
            let (oid, inner) = rest.split_once('/').unwrap_or((rest, ""));
            if let Some(dir) = self.tablespaces.get(oid) {
                return Ok(if inner.is_empty() { None } else { Some((dir.as_path(), dir.join(inner))) });
            }
        }
        Ok(Some((self.dest.as_path(), self.dest.join(path))))
    }
}

/// Refuses an entry that would be written through a symbolic link: a link restored earlier
/// (by this partition or another) must never lead a later entry outside `root`. Checks every
/// folder between `root` and `target`; the entry itself is checked by the caller.
fn refuse_links_above(root: &Path, target: &Path, rel: &str) -> Result<(), ExtractError> {
    let Ok(inner) = target.strip_prefix(root) else {
        return Err(ExtractError::Bad(format!("unsafe path {rel:?} in the backup")));
    };
    let mut at = root.to_path_buf();
    let mut parents = inner.components().collect::<Vec<_>>();
    parents.pop();
    for c in parents {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ExtractError::Bad(format!(
                    "{rel:?} lies under the symbolic link {:?} in the backup: refused",
                    at.strip_prefix(root).unwrap_or(&at)
                )))
            }
            Ok(_) => {}
            // Not there yet: it and everything below it is created as plain folders.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Whether `path` is a symbolic link (not followed).
pub fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// The mode of a restored file: owner read-write, plus group read when the backup had it
/// (a cluster initialised with group access, PostgreSQL 11+). The tar's other bits are
/// never kept: a tampered backup must not plant setuid, executable or world-readable files.
fn restored_file_mode(tar_mode: u32) -> u32 {
    0o600 | (tar_mode & 0o040)
}

/// The mode of a restored folder: 0700, or 0750 when the backup had group read.
fn restored_dir_mode(tar_mode: u32) -> u32 {
    if tar_mode & 0o040 != 0 {
        0o750
    } else {
        0o700
    }
}

/// The largest GNU long-name or long-link entry, or PAX extension header, read: the tar
/// crate reads these whole into memory, so a damaged or hostile partition could claim
/// gigabytes. A PostgreSQL path is at most MAXPGPATH (1024) bytes.
const MAX_EXTENSION_ENTRY: u64 = 64 << 10;

/// A pass-through reader under `tar::Archive` that follows the archive's structure (each
/// 512-byte header, then the body it announces) and, when a header announces a body the tar
/// crate would read whole into memory (a GNU long name or link, PAX extensions) larger than
/// [`MAX_EXTENSION_ENTRY`], fails every read after that header, so none of the body is read.
/// It keeps in step with the tar crate (`Archive::entries`): a PAX `size` record sets the
/// size of the next entry that is not itself an extension; GNU sparse entries, which carry
/// further headers and which no data directory backup holds, are refused.
struct BoundedExtensions<R> {
    inner: R,
    at: TarPosition,
    /// The `size` record of the PAX extensions waiting for the entry they describe.
    pax_size: Option<u64>,
    /// Why the archive was refused: every read from then on fails with it.
    refused: Option<String>,
}

enum TarPosition {
    /// In a header: the block and how much of it has been read.
    Header(Box<[u8; 512]>, usize),
    /// In an entry's body (padding included). The records of PAX extensions (`pax_len`
    /// bytes, no more than [`MAX_EXTENSION_ENTRY`]) are kept to read their `size`.
    Body { left: u64, pax: Option<Vec<u8>>, pax_len: usize },
    /// Past the end-of-archive block, where the tar crate stops: passed through.
    End,
}

impl<R> BoundedExtensions<R> {
    fn new(inner: R) -> Self {
        BoundedExtensions { inner, at: TarPosition::Header(Box::new([0; 512]), 0), pax_size: None, refused: None }
    }

    /// Follows `bytes`, just read. Returns how many to pass on: up to the end of a refused
    /// header, so that the reader gets it and fails on the body.
    fn follow(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        while used < bytes.len() && self.refused.is_none() {
            let rest = &bytes[used..];
            match &mut self.at {
                TarPosition::End => return bytes.len(),
                TarPosition::Header(block, filled) => {
                    let n = rest.len().min(512 - *filled);
                    block[*filled..*filled + n].copy_from_slice(&rest[..n]);
                    *filled += n;
                    used += n;
                    if *filled == 512 {
                        let block = std::mem::replace(block, Box::new([0; 512]));
                        if let Err(why) = self.enter(&block) {
                            self.refused = Some(why);
                        }
                    }
                }
                TarPosition::Body { left, pax, pax_len } => {
                    let n = rest.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    if let Some(pax) = pax {
                        let keep = n.min(*pax_len - pax.len());
                        pax.extend_from_slice(&rest[..keep]);
                    }
                    *left -= n as u64;
                    used += n;
                    if *left == 0 {
                        if let Some(records) = pax {
                            self.pax_size = pax_size_of(records);
                        }
                        self.at = TarPosition::Header(Box::new([0; 512]), 0);
                    }
                }
            }
        }
        used
    }

    /// Reads the header `block` and moves into its body, or says why it is refused.
    fn enter(&mut self, block: &[u8; 512]) -> Result<(), String> {
        if block.iter().all(|b| *b == 0) {
            self.at = TarPosition::End;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(block);
        let kind = header.entry_type();
        let header_size = header.entry_size().map_err(|e| format!("a tar header with an unreadable size: {e}"))?;
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        if extension && header_size > MAX_EXTENSION_ENTRY {
            return Err(format!(
                "a tar {kind:?} entry of {header_size} bytes, more than the {MAX_EXTENSION_ENTRY} the paths of a \
                 backup need: refused unread"
            ));
        }
        if kind.is_gnu_sparse() {
            return Err("a GNU sparse tar entry, which no PostgreSQL backup holds: refused".into());
        }
        let size = match self.pax_size {
            Some(pax) if !extension => pax,
            _ => header_size,
        };
        // The tar crate reads a long name, long link or PAX extensions only with a GNU or
        // ustar header, and hands out anything else as an entry, which uses up the PAX
        // extensions read before it.
        let recognised = header.as_gnu().is_some() || header.as_ustar().is_some();
        let is_pax = recognised && kind.is_pax_local_extensions();
        if !(recognised && (kind.is_gnu_longname() || kind.is_gnu_longlink())) {
            self.pax_size = None;
        }
        let padded = size.checked_add(511).ok_or("a tar entry size that overflows")? & !511;
        self.at = if padded == 0 {
            TarPosition::Header(Box::new([0; 512]), 0)
        } else {
            // `size` is at most MAX_EXTENSION_ENTRY for PAX extensions (checked above).
            TarPosition::Body { left: padded, pax: is_pax.then(Vec::new), pax_len: size as usize }
        };
        Ok(())
    }
}

/// The `size` record of PAX extensions, read as the tar crate reads it.
fn pax_size_of(records: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(records) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for BoundedExtensions<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.refused {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let n = self.inner.read(buf)?;
        Ok(self.follow(&buf[..n]))
    }
}

/// Extracts every entry of the tar stream `reader` according to `plan`. With `expected`,
/// every file must be listed there and match its size and sha256.
pub fn extract<R: Read>(
    reader: R,
    plan: &ExtractPlan,
    expected: Option<&HashMap<String, FileEntry>>,
) -> Result<ExtractSummary, ExtractError> {
    let mut archive = tar::Archive::new(BoundedExtensions::new(reader));
    let mut summary = ExtractSummary::default();
    let bad = |what: &str, e: io::Error| ExtractError::Bad(format!("{what}: {e}"));
    let mut buf = vec![0u8; CHUNK_SIZE];
    for entry in archive.entries().map_err(|e| bad("not a tar stream", e))? {
        let mut entry = entry.map_err(|e| bad("unreadable tar entry", e))?;
        let rel = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some((root, target)) = plan.locate(&rel)? else {
            continue;
        };
        let local = |source: io::Error| ExtractError::Local { path: target.display().to_string(), source };
        let mode = entry.header().mode().unwrap_or(0o600);
        refuse_links_above(root, &target, &rel)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if is_symlink(&target) {
                    return Err(ExtractError::Bad(format!(
                        "{rel:?} is both a symbolic link and a folder in the backup: refused"
                    )));
                }
                fs::DirBuilder::new().recursive(true).mode(0o700).create(&target).map_err(local)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(restored_dir_mode(mode))).map_err(local)?;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(|e| bad("bad link", e))?.unwrap_or_default().into_owned();
                make_parent(&target).map_err(local)?;
                let _ = fs::remove_file(&target);
                std::os::unix::fs::symlink(link, &target).map_err(local)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                make_parent(&target).map_err(local)?;
                // A file replaces a link of the same name (as tar does); it never writes
                // through it.
                if is_symlink(&target) {
                    fs::remove_file(&target).map_err(local)?;
                }
                let file_mode = restored_file_mode(mode);
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(file_mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(local)?;
                // Exactly this mode, whatever the umask or a file left by an earlier try.
                file.set_permissions(fs::Permissions::from_mode(file_mode)).map_err(local)?;
                let (got, size) = copy_hashed(&mut entry, &mut file, &mut buf).map_err(|e| match e {
                    CopyError::Read(e) => bad(&format!("reading {rel}"), e),
                    CopyError::Write(e) => local(e),
                })?;
                if let Some(expected) = expected {
                    let clean = rel.trim_start_matches('/');
                    let want = expected
                        .get(clean)
                        .ok_or_else(|| ExtractError::Bad(format!("{clean} is not in the manifest")))?;
                    let got = got.to_string();
                    if want.size != size || want.sha256 != got {
                        return Err(ExtractError::Bad(format!(
                            "{clean}: sha256 {got} ({size} bytes) but the manifest records {} ({} bytes)",
                            want.sha256, want.size
                        )));
                    }
                }
                summary.files += 1;
                summary.bytes += size;
            }
            // Hard links, devices and the like never appear in a data directory backup.
            _ => {}
        }
    }
    Ok(summary)
}

/// What reading a partition without writing it found (`backup-verify`).
#[derive(Debug, Default, Clone)]
pub struct CheckSummary {
    /// Regular files read.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Every file that is not as the manifest records (or missing from the partition).
    pub problems: Vec<String>,
}

/// Reads every entry of the tar stream `reader` to its end, hashing each regular file and,
/// with `expected`, comparing it with the manifest; files listed but absent are problems
/// too. Only an unreadable stream is an error: file mismatches are all collected.
pub fn check<R: Read>(reader: R, expected: Option<&HashMap<String, FileEntry>>) -> Result<CheckSummary, ExtractError> {
    let mut archive = tar::Archive::new(BoundedExtensions::new(reader));
    let mut summary = CheckSummary::default();
    let mut seen = std::collections::HashSet::new();
    let bad = |what: &str, e: io::Error| ExtractError::Bad(format!("{what}: {e}"));
    let mut buf = vec![0u8; CHUNK_SIZE];
    for entry in archive.entries().map_err(|e| bad("not a tar stream", e))? {
        let mut entry = entry.map_err(|e| bad("unreadable tar entry", e))?;
        let rel = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches('/').to_string();
        if !matches!(entry.header().entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous) {
            continue;
        }
        let (got, size) = copy_hashed(&mut entry, &mut io::sink(), &mut buf).map_err(|e| match e {
            CopyError::Read(e) | CopyError::Write(e) => bad(&format!("reading {rel}"), e),
        })?;
        summary.files += 1;
        summary.bytes += size;
        if let Some(expected) = expected {
            match expected.get(&rel) {
                None => summary.problems.push(format!("{rel} is not in the manifest")),
                Some(want) if want.size != size || want.sha256 != got.to_string() => summary.problems.push(format!(
                    "{rel}: sha256 {got} ({size} bytes) but the manifest records {} ({} bytes)",
                    want.sha256, want.size
                )),
                Some(_) => {}
            }
            seen.insert(rel);
        }
    }
    if let Some(expected) = expected {
        let mut missing: Vec<&String> = expected.keys().filter(|k| !seen.contains(*k)).collect();
        missing.sort();
        summary
            .problems
            .extend(missing.into_iter().map(|k| format!("{k} is in the manifest but not in the partition")));
    }
    Ok(summary)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies a tar entry into its file, hashing on the way. A file larger than one chunk
/// continues its digest on a second core while this one decompresses and writes.
fn copy_hashed<R: Read, W: Write>(entry: &mut R, file: &mut W, first: &mut [u8]) -> Result<(Sha256, u64), CopyError> {
    let n = read_full(entry, first).map_err(CopyError::Read)?;
    file.write_all(&first[..n]).map_err(CopyError::Write)?;
    let mut inline = Sha256Hasher::new();
    inline.update(&first[..n]);
    let mut size = n as u64;
    if n < first.len() {
        return Ok((Sha256(inline.finalize().into()), size));
    }
    let mut hasher = BackgroundHasher::continuing(inline);
    loop {
        let mut chunk = hasher.buffer();
        let n = read_full(entry, &mut chunk).map_err(CopyError::Read)?;
        if n == 0 {
            return Ok((hasher.finish(), size));
        }
        file.write_all(&chunk[..n]).map_err(CopyError::Write)?;
        hasher.update(chunk, n);
        size += n as u64;
    }
}

/// Creates the folders above `path` that are missing, owner-only until their own entry (if
/// the backup has one) sets their mode.
fn make_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.exists() => fs::DirBuilder::new().recursive(true).mode(0o700).create(p),
        _ => Ok(()),
    }
}

/// What is at a name wal-rs reads back after extraction.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing.
    Nothing,
    /// A symbolic link, which the backup restored and which is never followed: it may lead
    /// to the live cluster's files on this host.
    Link,
    /// A file, and its text.
    Text(String),
}

/// Reads `path` unless it is a symbolic link.
pub fn read_without_following(path: &Path) -> io::Result<Found> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(e),
        Ok(m) if m.file_type().is_symlink() => return Ok(Found::Link),
        Ok(_) => {}
    }
    let mut file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(Found::Text(text))
}

/// Writes `contents` as the file `path` (mode 0600) without ever writing through what is
/// there: a new file is written beside it and renamed over the name, which replaces a
/// symbolic link itself, not the file it points to.
pub fn replace_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(".walrs-new");
    let temp = path.with_file_name(temp_name);
    // A leftover of an interrupted run, or a link of that name from the backup: removed,
    // so the new file is created (exclusively) and never opened through a link.
    match fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .and_then(|mut file| file.write_all(contents));
    match written.and_then(|()| fs::rename(&temp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Flushes everything written on the filesystem holding `path` (`syncfs`): one call that
/// makes every restored file and directory durable, instead of one fsync per file.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs takes a valid open descriptor and touches no memory of ours.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_and_tablespaces_are_remapped() {
        let plan = ExtractPlan {
            dest: "/restore".into(),
            tablespaces: HashMap::from([("16385".to_string(), PathBuf::from("/new/ts"))]),
        };
        assert_eq!(plan.target_of("/global/pg_control").unwrap(), Some(PathBuf::from("/restore/global/pg_control")));
        assert_eq!(plan.target_of("base/5/1").unwrap(), Some(PathBuf::from("/restore/base/5/1")));
        assert_eq!(plan.target_of("pg_tblspc/16385/PG_15/5/1").unwrap(), Some(PathBuf::from("/new/ts/PG_15/5/1")));
        assert_eq!(plan.target_of("pg_tblspc/16385/").unwrap(), None);
        assert!(plan.target_of("base/../../etc/passwd").is_err());
    }

    fn tar_of(entries: &[(&str, tar::EntryType, u32)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, mode) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(*mode);
            header.set_size(if *kind == tar::EntryType::Regular { 2 } else { 0 });
            let body: &[u8] = if *kind == tar::EntryType::Regular { b"ok" } else { b"" };
            builder.append_data(&mut header, path, body).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// Counts what is read through it.
    struct Counted<R> {
        inner: R,
        read: std::rc::Rc<std::cell::Cell<u64>>,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    /// A GNU long-name ('L'), long-link ('K') or PAX ('x') entry whose header claims 1 GiB:
    /// the tar crate would read it whole into memory. Refused after its header, the body
    /// (zeros, never allocated here) unread.
    #[test]
    fn a_huge_extension_entry_is_refused_unread() {
        for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink, tar::EntryType::XHeader] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_path("././@LongLink").unwrap();
            header.set_size(1 << 30);
            header.set_cksum();
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let stream = || Counted { inner: header.as_bytes().chain(io::repeat(0).take(1 << 30)), read: read.clone() };
            let dir = tempfile::tempdir().unwrap();
            let plan = ExtractPlan { dest: dir.path().to_path_buf(), tablespaces: HashMap::new() };
            let err = extract(stream(), &plan, None).unwrap_err();
            assert!(matches!(&err, ExtractError::Bad(d) if d.contains("65536")), "{kind:?}: {err}");
            assert!(read.get() < 1 << 20, "{kind:?}: {} bytes read", read.get());
            read.set(0);
            let err = check(stream(), None).unwrap_err();
            assert!(matches!(&err, ExtractError::Bad(d) if d.contains("65536")), "{kind:?}: {err}");
            assert!(read.get() < 1 << 20, "{kind:?}: {} bytes read", read.get());
        }
    }

    /// The guard keeps in step with the tar crate through GNU long names and a PAX size that
    /// overrides the header's: the file's content, which looks like a huge long-name
    /// header, is content, and a huge long-name entry after it is still caught.
    #[test]
    fn the_extension_guard_follows_long_names_and_pax_sizes() {
        let mut huge = tar::Header::new_gnu();
        huge.set_entry_type(tar::EntryType::GNULongName);
        huge.set_path("././@LongLink").unwrap();
        huge.set_size(1 << 30);
        huge.set_cksum();
        let content: Vec<u8> = huge.as_bytes().iter().copied().chain(std::iter::repeat_n(7, 88)).collect();
        let long_path = format!("base/{}/1259", "d".repeat(150));

        let mut builder = tar::Builder::new(Vec::new());
        let mut pax = tar::Header::new_ustar();
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_path("PaxHeaders/f").unwrap();
        let records = b"12 size=600\n";
        pax.set_size(records.len() as u64);
        pax.set_cksum();
        builder.append(&pax, &records[..]).unwrap();
        let mut file = tar::Header::new_ustar();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_path("f").unwrap();
        file.set_mode(0o600);
        file.set_size(0);
        file.set_cksum();
        builder.get_mut().extend_from_slice(file.as_bytes());
        builder.get_mut().extend_from_slice(&content);
        let padded = builder.get_ref().len().next_multiple_of(512);
        builder.get_mut().resize(padded, 0);
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(tar::EntryType::Regular);
        long.set_mode(0o600);
        long.set_size(2);
        builder.append_data(&mut long, &long_path, &b"ok"[..]).unwrap();
        let good = builder.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let plan = ExtractPlan { dest: dir.path().to_path_buf(), tablespaces: HashMap::new() };
        let summary = extract(&good[..], &plan, None).unwrap();
        assert_eq!((summary.files, summary.bytes), (2, 602));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), content);
        assert_eq!(fs::read(dir.path().join(&long_path)).unwrap(), b"ok");
        assert_eq!(check(&good[..], None).unwrap().files, 2);

        let mut hostile = good[..good.len() - 1024].to_vec();
        hostile.extend_from_slice(huge.as_bytes());
        let err = check(hostile.as_slice().chain(io::repeat(0).take(1 << 30)), None).unwrap_err();
        assert!(err.to_string().contains("refused unread"), "{err}");
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn restored_modes_are_owner_only_plus_group_read() {
        let dir = tempfile::tempdir().unwrap();
        let plan = ExtractPlan { dest: dir.path().to_path_buf(), tablespaces: HashMap::new() };
        let tar = tar_of(&[
            ("base", tar::EntryType::Directory, 0o2775),
            ("private", tar::EntryType::Directory, 0o1777),
            ("owner_only", tar::EntryType::Directory, 0o700),
            ("base/setuid", tar::EntryType::Regular, 0o4755),
            ("base/world", tar::EntryType::Regular, 0o606),
            ("base/group", tar::EntryType::Regular, 0o640),
            ("base/plain", tar::EntryType::Regular, 0o600),
            ("deep/er/file", tar::EntryType::Regular, 0o600),
        ]);
        extract(&tar[..], &plan, None).unwrap();
        let at = |rel: &str| mode_of(&dir.path().join(rel));
        assert_eq!(at("base"), 0o750);
        assert_eq!(at("private"), 0o750);
        assert_eq!(at("owner_only"), 0o700);
        assert_eq!(at("base/setuid"), 0o640);
        assert_eq!(at("base/world"), 0o600);
        assert_eq!(at("base/group"), 0o640);
        assert_eq!(at("base/plain"), 0o600);
        // Folders the backup has no entry for are made owner-only.
        assert_eq!(at("deep"), 0o700);
        assert_eq!(at("deep/er"), 0o700);
    }

    #[test]
    fn replacing_a_linked_file_leaves_the_link_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, "x").unwrap();
        let inside = dir.path().join("data");
        fs::create_dir(&inside).unwrap();
        let name = inside.join("pg_hba.conf");
        std::os::unix::fs::symlink(&outside, &name).unwrap();
        // Neither read nor written through.
        assert_eq!(read_without_following(&name).unwrap(), Found::Link);
        replace_file(&name, b"local all all trust\n").unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "x");
        assert!(fs::symlink_metadata(&name).unwrap().file_type().is_file());
        assert_eq!(read_without_following(&name).unwrap(), Found::Text("local all all trust\n".into()));
        assert_eq!(mode_of(&name), 0o600);
        // A link where the new file is written first is removed, not followed.
        std::os::unix::fs::symlink(&outside, inside.join(".pg_hba.conf.walrs-new")).unwrap();
        replace_file(&name, b"again").unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "x");
        assert_eq!(fs::read_to_string(&name).unwrap(), "again");
        assert_eq!(fs::read_dir(&inside).unwrap().count(), 1, "no temporary file is left");
        assert_eq!(read_without_following(&inside.join("absent")).unwrap(), Found::Nothing);
    }
}
