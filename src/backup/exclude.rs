//! What a base backup leaves out, as `pg_basebackup` does (PostgreSQL 15's
//! `src/backend/backup/basebackup.c`: `excludeDirContents`, `excludeFiles`, temporary files
//! and relations, and the main forks of unlogged relations).

/// Directories kept (empty) but whose contents are left out.
const EXCLUDE_DIR_CONTENTS: &[&str] =
    &["pg_wal", "pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_subtrans"];

/// Files left out wherever they appear at the top of the data directory.
const EXCLUDE_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    // The stop call returns the real ones; stale copies must not come back.
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "standby.signal",
    "recovery.signal",
];

/// Whether a top-level directory's contents are left out (it is kept, empty).
pub fn is_emptied_dir(rel: &str) -> bool {
    EXCLUDE_DIR_CONTENTS.contains(&rel)
}

/// Whether a file or directory at `rel` (relative to the data directory, or to a
/// tablespace's version directory for tablespace files) is left out entirely.
pub fn is_excluded(rel: &str, name: &str, is_top: bool) -> bool {
    if name.starts_with("pgsql_tmp") || name == "pg_internal.init" || name.starts_with("pg_internal.init.") {
        return true;
    }
    if is_top && EXCLUDE_TOP_FILES.contains(&rel) {
        return true;
    }
    is_temp_relation(name)
}

/// `t<backendid>_<relfilenode>[_fork][.segment]`: temporary relations (`looks_like_temp_rel_name`).
fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, rest)) = rest.split_once('_') else {
        return false;
    };
    if backend.is_empty() || !backend.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let node: &str = rest.split(['_', '.']).next().unwrap_or("");
    !node.is_empty() && node.bytes().all(|b| b.is_ascii_digit())
}

/// The relfilenode a relation file belongs to and whether it is an `_init` fork:
/// `16384`, `16384.1`, `16384_fsm`, `16384_init`.
pub fn relation_file(name: &str) -> Option<(&str, bool)> {
    let node_end = name.find(|c: char| !c.is_ascii_digit()).unwrap_or(name.len());
    if node_end == 0 {
        return None;
    }
    let (node, rest) = name.split_at(node_end);
    let fork = rest.split('.').next().unwrap_or("");
    match fork {
        "" | "_fsm" | "_vm" => Some((node, false)),
        "_init" => Some((node, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_out_what_pg_basebackup_leaves_out() {
        assert!(is_excluded("postmaster.pid", "postmaster.pid", true));
        assert!(is_excluded("base/1/pgsql_tmp", "pgsql_tmp", false));
        assert!(is_excluded("global/pg_internal.init", "pg_internal.init", false));
        assert!(is_excluded("base/5/t3_16384", "t3_16384", false));
        assert!(is_excluded("base/5/t3_16384_fsm", "t3_16384_fsm", false));
        assert!(!is_excluded("base/5/16384", "16384", false));
        assert!(!is_excluded("PG_VERSION", "PG_VERSION", true));
        assert!(!is_excluded("base/backup_label", "backup_label", false));
        assert!(is_emptied_dir("pg_wal") && !is_emptied_dir("base"));
    }

    #[test]
    fn relation_files_are_recognised() {
        assert_eq!(relation_file("16384"), Some(("16384", false)));
        assert_eq!(relation_file("16384.2"), Some(("16384", false)));
        assert_eq!(relation_file("16384_init"), Some(("16384", true)));
        assert_eq!(relation_file("16384_vm"), Some(("16384", false)));
        assert_eq!(relation_file("PG_VERSION"), None);
        assert_eq!(relation_file("pg_filenode.map"), None);
    }
}
