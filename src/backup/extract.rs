//! Reading tar partitions back into a data directory: paths checked (nothing escapes the
//! destination), tablespace files sent to their (possibly remapped) locations, every file
//! checked against the manifest's sha256 as it is written.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Extracts every entry of the tar stream `reader` according to `plan`. With `expected`,
/// every file must be listed there and match its size and sha256.
pub fn extract<R: Read>(
    reader: R,
    plan: &ExtractPlan,
    expected: Option<&HashMap<String, FileEntry>>,
) -> Result<ExtractSummary, ExtractError> {
    let mut archive = tar::Archive::new(reader);
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
        let mode = entry.header().mode().unwrap_or(0o600) & 0o7777;
        refuse_links_above(root, &target, &rel)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if is_symlink(&target) {
                    return Err(ExtractError::Bad(format!(
                        "{rel:?} is both a symbolic link and a folder in the backup: refused"
                    )));
                }
                fs::create_dir_all(&target).map_err(local)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).map_err(local)?;
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
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(if mode == 0 { 0o600 } else { mode })
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(local)?;
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
    let mut archive = tar::Archive::new(reader);
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

fn make_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.exists() => fs::create_dir_all(p),
        _ => Ok(()),
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
}
