//! Compatibility with the WAL-G layout: a store written by another WAL-G-compatible tool
//! (fixtures/walg-layout-pg15, see its README) serves wal-rs's wal-fetch, and a cluster
//! restored from its base backup recovers through wal-rs to what the README says it holds.
//!
//! The objects are plain lz4 frames without wal-rs's integrity trailer: wal-fetch restores
//! them and says so (`verified=none`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::pg::{as_postgres, run_ok, PgCluster};
use crate::harness::{lz4_cli_decompress, read, sha256_hex, write_file, StoreEnv, WalRs, WorkDir, SEG_SIZE};

/// The base backup in the fixture's store.
const BACKUP: &str = "basebackups_005/base_000000010000000000000002";

fn fixture_store() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/walg-layout-pg15/store")
}

/// A copy of the fixture's store in the work directory: tests never touch the checkout.
fn copy_of_fixture_store(wd: &WorkDir) -> StoreEnv {
    let dest = wd.join("walg-store");
    copy_tree(&fixture_store(), &dest);
    StoreEnv::local(&dest)
}

/// Copies a directory tree, readable by everyone (the postgres user reads it).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display())) {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("copying {}: {e}", entry.path().display()));
        }
    }
}

#[test]
fn walg_objects_are_fetched_byte_for_byte_without_a_trailer() {
    let wd = WorkDir::new("compat-fetch");
    let store = copy_of_fixture_store(&wd);
    let walrs = WalRs::new(&wd, &store);
    let objects = store.wal_objects();
    assert_eq!(
        objects,
        [
            "000000010000000000000001.lz4",
            "000000010000000000000002.00000028.backup.lz4",
            "000000010000000000000002.lz4",
            "000000010000000000000003.lz4",
        ],
        "the fixture's WAL objects"
    );
    let out = wd.dir("out");
    for object in &objects {
        let name = object.strip_suffix(".lz4").unwrap();
        let dest = out.join(name);
        let run = walrs.fetch(name, &dest);
        run.expect_code(0, &format!("wal-fetch of {name} from a WAL-G store"));
        assert!(run.logged("verified", "none"), "{name}: {run:#?}");
        let restored = read(&dest);
        assert!(restored == lz4_cli_decompress(&store.wal_object(name)), "wal-fetch of {name} differs from lz4 -d");
        if name.len() == 24 {
            assert_eq!(restored.len(), SEG_SIZE, "{name}");
        } else {
            let text = String::from_utf8(restored).unwrap();
            assert!(text.contains("START WAL LOCATION: 0/2000028"), "{name}: {text}");
        }
    }

    // Pushing a segment the other tool archived: the same content is already archived
    // (compared by decompressing the foreign object, which has no trailer), and different
    // content is a conflict. The foreign object is left as it was.
    let name = "000000010000000000000002";
    let object = store.wal_object(name);
    let before = read(&object);
    let same = walrs.push(&out.join(name));
    same.expect_code(0, "push of a segment the WAL-G store holds");
    assert!(same.logged("outcome", "already-archived"), "{same:#?}");
    let mut changed = read(&out.join(name));
    changed[SEG_SIZE / 2] ^= 0xFF;
    let changed_path = write_file(&wd.dir("changed"), name, &changed);
    let conflict = walrs.push(&changed_path);
    conflict.expect_code(5, "push of different content under a WAL-G segment's name");
    assert!(conflict.stderr.contains(&sha256_hex(&changed)), "{conflict:#?}");
    assert!(read(&object) == before, "the WAL-G object changed");
}

#[test]
fn walg_base_backup_recovers_through_walrs() {
    let wd = WorkDir::new("compat-restore");
    let store = copy_of_fixture_store(&wd);
    let data = wd.pg_dir("restored");
    // WAL-G's restore order: the data, then backup_label, and pg_control last.
    let partitions = store.object_path(BACKUP).join("tar_partitions");
    for part in ["part_001.tar.lz4", "part_002.tar.lz4", "pg_control.tar.lz4"] {
        let script = format!(
            "set -euo pipefail; lz4 -d -c {} | tar -x -f - -C {}",
            partitions.join(part).display(),
            data.display()
        );
        run_ok(as_postgres("bash").args(["-c", &script]), &format!("extracting {part}"));
    }
    assert!(data.join("backup_label").exists() && data.join("global/pg_control").exists());

    let restored = PgCluster::adopt(&wd, "restored");
    // The backed-up configuration still names the archiver that wrote the store.
    restored.set(&[("archive_mode", "off")]);
    restored.recover_from(&store);
    restored.start();
    restored.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(
        restored.query("select count(*), sum(id), count(*) filter (where note = 'after backup') from t"),
        [[Some("1500".to_string()), Some("1125750".to_string()), Some("500".to_string())]],
        "the table the fixture's README describes"
    );
}
