//! Walking a data directory and its tablespaces, the way `pg_basebackup` does: what goes
//! into the backup, in what order, and under which path.
//!
//! Entries stream to the caller one at a time, so memory does not grow with the number of
//! files. Files that vanish while the walk runs are skipped, as PostgreSQL's own base
//! backups skip them (a dropped table, a removed temporary file).
//!
//! Of each tablespace only this server's version directory (`PG_15_202209061`) is backed
//! up, as `sendTablespace` does: after `pg_upgrade --link` the old version's folder sits
//! beside it and belongs to the old cluster. A link to a folder at the top of the data
//! directory is followed and stored as a folder (`pg_wal` and the folders whose contents
//! are left out stay empty, as `convert_link_to_directory` makes them), as pgBackRest does
//! by default: a restored copy (a fork, on the same host) then has its own `pg_xact` or
//! `log`, instead of a link that would have it write into the original's. (PostgreSQL 15's
//! base backup skips such links with a warning, and the folder's contents with them.) Other
//! links (a linked `postgresql.conf`) are kept as links.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::exclude;
use super::sentinel::Tablespace;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file, with its size when listed.
    File {
        /// Size at listing time.
        size: u64,
    },
    /// A symbolic link (other than a tablespace link), kept as a link.
    Symlink {
        /// Where it points.
        target: PathBuf,
    },
}

/// One thing to back up.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the backup (relative, '/'-separated; `pg_tblspc/<oid>/...` for tablespaces).
    pub rel: String,
    /// Where it is on disk.
    pub abs: PathBuf,
    /// Its kind.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (seconds).
    pub mtime: u64,
}

/// A walk that failed: what was being done, on which path, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct WalkError {
    /// What was being done ("read", "stat", "read link").
    pub op: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error, or what is wrong with the entry.
    #[source]
    pub source: io::Error,
}

impl WalkError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> WalkError {
        WalkError { op, path: path.to_path_buf(), source }
    }
}

/// The tablespaces linked from `pg_tblspc`.
pub fn tablespaces(pgdata: &Path) -> io::Result<Vec<Tablespace>> {
    let dir = pgdata.join("pg_tblspc");
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A relative link is relative to pg_tblspc, where it is, not to wal-rs's directory.
        let target = match fs::read_link(entry.path()) {
            Ok(t) if t.is_relative() => fs::canonicalize(dir.join(&t)).unwrap_or_else(|_| dir.join(t)),
            Ok(t) => t,
            Err(_) => entry.path(),
        };
        let mut location = target.to_string_lossy().into_owned();
        if !location.ends_with('/') {
            location.push('/');
        }
        out.push(Tablespace { oid: name, location });
    }
    out.sort_by(|a, b| a.oid.cmp(&b.oid));
    Ok(out)
}

/// Walks `pgdata` and the tablespaces, calling `emit` for every entry to back up, except
/// `global/pg_control`, which the caller adds last. Stops early when `emit` returns false.
/// Of each tablespace, only `version_dir` (`PG_15_202209061`: this server's
/// `TABLESPACE_VERSION_DIRECTORY`) is walked.
pub fn walk(
    pgdata: &Path,
    tablespaces: &[Tablespace],
    version_dir: &str,
    emit: &mut dyn FnMut(Entry) -> bool,
) -> Result<(), WalkError> {
    if !walk_dir(pgdata, "", true, emit)? {
        return Ok(());
    }
    for ts in tablespaces {
        let root = PathBuf::from(&ts.location);
        let rel = format!("pg_tblspc/{}", ts.oid);
        let link = pgdata.join(&rel);
        let Some(meta) = stat(&root).map_err(|e| WalkError::new("stat", &root, e))? else {
            // Dropped while the backup ran (its link is gone too), as PostgreSQL's own base
            // backups allow; a link to nothing is a tablespace this backup would lose.
            if fs::symlink_metadata(&link).is_err() {
                continue;
            }
            return Err(WalkError::new(
                "read",
                &link,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "tablespace {} points to {}, which does not exist: mount it, or drop the tablespace",
                        ts.oid, ts.location
                    ),
                ),
            ));
        };
        if !emit(Entry {
            rel: rel.clone(),
            abs: root.clone(),
            kind: EntryKind::Dir,
            mode: meta.mode(),
            mtime: meta.mtime() as u64,
        }) {
            return Ok(());
        }
        let version_root = root.join(version_dir);
        let Some(meta) = stat(&version_root).map_err(|e| WalkError::new("stat", &version_root, e))? else {
            // DROP TABLESPACE removes this folder before the link: dropped while the backup
            // ran, which `sendTablespace` also takes as no error.
            continue;
        };
        let version_rel = format!("{rel}/{version_dir}");
        if !emit(Entry {
            rel: version_rel.clone(),
            abs: version_root.clone(),
            kind: EntryKind::Dir,
            mode: meta.mode(),
            mtime: meta.mtime().max(0) as u64,
        }) {
            return Ok(());
        }
        if !walk_dir(&version_root, &version_rel, false, emit)? {
            return Ok(());
        }
    }
    Ok(())
}

fn stat(path: &Path) -> io::Result<Option<fs::Metadata>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn walk_dir(dir: &Path, rel: &str, is_top: bool, emit: &mut dyn FnMut(Entry) -> bool) -> Result<bool, WalkError> {
    // A directory that cannot be read, or a name that cannot be stored as it is, fails the
    // backup: skipped, its files would be missing from a backup that looks complete.
    let read_err = |e| WalkError::new("read", dir, e);
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                e.map_err(read_err)?.file_name().into_string().map_err(|name| {
                    WalkError::new(
                        "back up",
                        &dir.join(name),
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "its name is not UTF-8, which backups cannot hold: rename or remove it",
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(read_err(e)),
    };
    names.sort();
    // Unlogged relations: only their `_init` fork is backed up (recovery rebuilds the rest).
    let unlogged: HashSet<String> = names
        .iter()
        .filter_map(|n| exclude::relation_file(n))
        .filter(|(_, init)| *init)
        .map(|(node, _)| node.to_string())
        .collect();
    for name in &names {
        let child_rel = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if exclude::is_excluded(&child_rel, name, is_top) || child_rel == "global/pg_control" {
            continue;
        }
        if let Some((node, init)) = exclude::relation_file(name) {
            if !init && unlogged.contains(node) {
                continue;
            }
        }
        let abs = dir.join(name);
        let meta = match fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(WalkError::new("stat", &abs, e)),
        };
        let (mut mode, mut mtime) = (meta.mode(), meta.mtime().max(0) as u64);
        let ft = meta.file_type();
        if is_top && name == "pg_tblspc" {
            // The links become tablespace entries of their own (see `walk`).
            if !emit(Entry { rel: child_rel, abs, kind: EntryKind::Dir, mode, mtime }) {
                return Ok(false);
            }
            continue;
        }
        // At the top, a link to a folder is stored as the folder (see the module's comment).
        let linked_dir = is_top && ft.is_symlink() && abs.is_dir();
        if linked_dir {
            // The folder's own permissions, not the link's 0777.
            if let Ok(target) = fs::metadata(&abs) {
                (mode, mtime) = (target.mode(), target.mtime().max(0) as u64);
            }
        }
        if ft.is_dir() || linked_dir {
            if !emit(Entry { rel: child_rel.clone(), abs: abs.clone(), kind: EntryKind::Dir, mode, mtime }) {
                return Ok(false);
            }
            if is_top && exclude::is_emptied_dir(&child_rel) {
                if child_rel == "pg_wal" {
                    let status = format!("{child_rel}/archive_status");
                    if !emit(Entry { rel: status, abs: abs.join("archive_status"), kind: EntryKind::Dir, mode, mtime })
                    {
                        return Ok(false);
                    }
                }
                continue;
            }
            if !walk_dir(&abs, &child_rel, false, emit)? {
                return Ok(false);
            }
        } else if ft.is_symlink() {
            let target = match fs::read_link(&abs) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(WalkError::new("read link", &abs, e)),
            };
            if !emit(Entry { rel: child_rel, abs, kind: EntryKind::Symlink { target }, mode, mtime }) {
                return Ok(false);
            }
        } else if ft.is_file()
            && !emit(Entry { rel: child_rel, abs, kind: EntryKind::File { size: meta.len() }, mode, mtime })
        {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSION_DIR: &str = "PG_15_202209061";

    #[test]
    fn walks_like_pg_basebackup() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in ["base/5", "global", "pg_wal/archive_status", "pg_stat_tmp", "pg_tblspc"] {
            fs::create_dir_all(p.join(dir)).unwrap();
        }
        for file in [
            "PG_VERSION",
            "postmaster.pid",
            "global/pg_control",
            "global/1262",
            "base/5/16384",
            "base/5/16390",
            "base/5/16390_init",
            "base/5/16390_fsm",
            "base/5/t3_16400",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/global.stat",
        ] {
            fs::write(p.join(file), b"x").unwrap();
        }
        let ts = tempfile::tempdir().unwrap();
        fs::create_dir_all(ts.path().join("PG_15_202209061/5")).unwrap();
        fs::write(ts.path().join("PG_15_202209061/5/16500"), b"y").unwrap();
        // What pg_upgrade --link leaves in a tablespace: the old cluster's version folder.
        fs::create_dir_all(ts.path().join("PG_14_202107181/5")).unwrap();
        fs::write(ts.path().join("PG_14_202107181/5/16500"), b"old").unwrap();
        std::os::unix::fs::symlink(ts.path(), p.join("pg_tblspc/16499")).unwrap();
        // Links at the top: folders elsewhere (logs, PostgreSQL's own moved to another disk)
        // are stored as folders; pg_wal elsewhere stays empty.
        let elsewhere = tempfile::tempdir().unwrap();
        for dir in ["logs", "xact", "wal"] {
            fs::create_dir_all(elsewhere.path().join(dir)).unwrap();
        }
        fs::write(elsewhere.path().join("logs/postgresql.log"), b"log").unwrap();
        fs::write(elsewhere.path().join("xact/0000"), b"x").unwrap();
        fs::write(elsewhere.path().join("wal/000000010000000000000002"), b"w").unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("logs"), p.join("log")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("xact"), p.join("pg_xact")).unwrap();
        fs::remove_dir_all(p.join("pg_wal")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("wal"), p.join("pg_wal")).unwrap();

        let spaces = tablespaces(p).unwrap();
        assert_eq!(spaces.len(), 1);
        let mut seen = Vec::new();
        let mut kinds = std::collections::HashMap::new();
        walk(p, &spaces, VERSION_DIR, &mut |e| {
            kinds.insert(e.rel.clone(), e.kind);
            seen.push(e.rel);
            true
        })
        .unwrap();
        assert_eq!(kinds["log"], EntryKind::Dir);
        assert_eq!(kinds["pg_xact"], EntryKind::Dir);
        assert_eq!(kinds["pg_wal"], EntryKind::Dir);
        for want in [
            "PG_VERSION",
            "global/1262",
            "base/5/16384",
            "base/5/16390_init",
            "pg_wal",
            "pg_wal/archive_status",
            "pg_stat_tmp",
            "pg_tblspc/16499",
            "pg_tblspc/16499/PG_15_202209061",
            "pg_tblspc/16499/PG_15_202209061/5/16500",
            "log/postgresql.log",
            "pg_xact/0000",
        ] {
            assert!(seen.contains(&want.to_string()), "missing {want}: {seen:?}");
        }
        for never in [
            "postmaster.pid",
            "global/pg_control",
            "base/5/16390",
            "base/5/16390_fsm",
            "base/5/t3_16400",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/global.stat",
            "pg_tblspc/16499/PG_14_202107181",
            "pg_tblspc/16499/PG_14_202107181/5/16500",
            "pg_wal/000000010000000000000002",
        ] {
            assert!(!seen.contains(&never.to_string()), "{never} was included");
        }
    }

    fn rels(pgdata: &Path) -> Result<Vec<String>, WalkError> {
        let spaces = tablespaces(pgdata).unwrap();
        let mut seen = Vec::new();
        walk(pgdata, &spaces, VERSION_DIR, &mut |e| {
            seen.push(e.rel);
            true
        })?;
        Ok(seen)
    }

    #[test]
    fn a_relative_tablespace_link_is_followed_from_pg_tblspc() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        fs::create_dir_all(d.path().join("ts/PG_15_202209061/5")).unwrap();
        fs::write(d.path().join("ts/PG_15_202209061/5/16500"), b"y").unwrap();
        std::os::unix::fs::symlink("../../ts", p.join("pg_tblspc/16499")).unwrap();
        let spaces = tablespaces(&p).unwrap();
        assert!(Path::new(&spaces[0].location).is_absolute(), "{spaces:?}");
        assert!(rels(&p).unwrap().contains(&"pg_tblspc/16499/PG_15_202209061/5/16500".to_string()));
    }

    #[test]
    fn what_a_backup_would_silently_lose_fails_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        // A tablespace whose link points to nothing.
        std::os::unix::fs::symlink(p.join("gone"), p.join("pg_tblspc/16499")).unwrap();
        let err = rels(p).unwrap_err();
        assert!(err.to_string().contains("tablespace 16499"), "{err}");
        fs::remove_file(p.join("pg_tblspc/16499")).unwrap();
        // A file name that cannot be stored as it is.
        use std::os::unix::ffi::OsStrExt;
        fs::create_dir_all(p.join("base/5")).unwrap();
        fs::write(p.join("base/5").join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x").unwrap();
        let err = rels(p).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn a_failed_walk_names_the_path_that_failed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        // A tablespace whose version directory cannot be listed (a file stands in its
        // place; root is refused this too).
        let ts = d.path().join("ts");
        fs::create_dir_all(&ts).unwrap();
        fs::write(ts.join(VERSION_DIR), b"").unwrap();
        std::os::unix::fs::symlink(&ts, p.join("pg_tblspc/16499")).unwrap();
        let err = rels(&p).unwrap_err();
        assert_eq!(err.path, ts.join(VERSION_DIR));
        let shown = err.to_string();
        assert!(shown.starts_with(&format!("cannot read {}: ", ts.join(VERSION_DIR).display())), "{shown}");
        // A dangling tablespace link is named by the link.
        fs::remove_file(p.join("pg_tblspc/16499")).unwrap();
        std::os::unix::fs::symlink(d.path().join("gone"), p.join("pg_tblspc/16499")).unwrap();
        assert_eq!(rels(&p).unwrap_err().path, p.join("pg_tblspc/16499"));
    }
}
