//! Full disks, on tmpfs file systems with a size limit (mounted as root, unmounted on drop).
//!
//! wal-fetch into a pg_wal with less and less room: it restores the segment whole or fails
//! with exit 211 and leaves nothing behind. backup-fetch into a file system too small for the
//! backup fails with exit 11, one line naming the problem, and no pg_control; the rerun into
//! room succeeds. wal-push into a full local store fails and exposes no object.

use std::fs;
use std::time::Instant;

use serde_json::json;

use crate::common::{hidden_files, seed, write_results, Tmpfs};
use crate::harness::pg::PgCluster;
use crate::harness::{
    craft_incompressible_segment, files_under, read, segment_name, write_file, StoreEnv, WalRs, WorkDir,
};

const SYSID: u64 = 7_300_000_000_000_000_801;

#[test]
fn full_disk() {
    let scenario = "full_disk";
    let seed = seed(scenario);
    let started = Instant::now();
    let wd = WorkDir::new("soak-disk");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let walrs = WalRs::new(&wd, &store).env("WALRS_PREFETCH_COUNT", "0");
    let name = segment_name(1, 3);
    let bytes = craft_incompressible_segment(1, 3, SYSID, 3);
    walrs.push(&write_file(&wd.dir("src"), &name, &bytes)).expect_code(0, "setup push");

    // --- wal-fetch into a pg_wal of 24 MiB with 0 to 23 MiB taken.
    let pg_wal = Tmpfs::mount(&wd.join("pg_wal"), 24);
    let (mut restored, mut refused, mut trials) = (0u64, 0u64, 0u64);
    for fill_mib in [0usize, 4, 7, 8, 9, 12, 16, 20, 23] {
        trials += 1;
        let filler = pg_wal.dir.join("filler");
        fs::write(&filler, vec![1u8; fill_mib << 20]).unwrap();
        let dest = pg_wal.dir.join("RECOVERYXLOG");
        let run = walrs.fetch(&name, &dest);
        let mut left = files_under(&pg_wal.dir);
        left.retain(|p| p.to_str() != Some("filler"));
        if run.code == 0 {
            assert!(read(&dest) == bytes, "fill {fill_mib} MiB: restored bytes differ");
            assert_eq!(left, [std::path::PathBuf::from("RECOVERYXLOG")]);
            restored += 1;
        } else {
            run.expect_code(211, &format!("wal-fetch into a full pg_wal ({fill_mib} MiB taken)"));
            assert!(run.stderr.contains("No space left"), "{run:#?}");
            assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
            assert!(left.is_empty(), "fill {fill_mib} MiB: a failed wal-fetch left {left:?}");
            refused += 1;
        }
        let _ = fs::remove_file(&dest);
        fs::remove_file(&filler).unwrap();
    }
    assert!(restored > 0 && refused > 0, "restored {restored}, refused {refused}");
    drop(pg_wal);

    // --- wal-push into a full local store.
    let small_store = Tmpfs::mount(&wd.join("small-store"), 8);
    let full = StoreEnv::local(&small_store.dir);
    let run = WalRs::new(&wd, &full).push(&wd.join("src").join(&name));
    assert!([7, 11].contains(&run.code), "wal-push into a full store: {run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    assert!(full.wal_objects().is_empty(), "a failed push exposed {:?}", full.wal_objects());
    let temp_left = hidden_files(&small_store.dir);
    assert!(temp_left.is_empty(), "a failed push left {temp_left:?}");
    let push_code = run.code;
    drop(small_store);

    // --- backup-fetch into a file system too small for the backup.
    let store = StoreEnv::local(&wd.pg_dir("pg-store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.pgbench(&["-i", "-s", "4", "-q"]);
    let dba = WalRs::new(&wd, &store)
        .run_as_postgres()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", &primary.port.to_string())
        .env("PGUSER", "postgres");
    dba.run(&["backup-push", "--fast", primary.data.to_str().unwrap()]).expect_code(0, "backup-push");
    primary.stop();
    let small = Tmpfs::mount(&wd.join("small"), 32);
    let dest = small.dir.join("restore");
    let run = dba.run(&["backup-fetch", dest.to_str().unwrap(), "LATEST"]);
    run.expect_code(11, "backup-fetch into a 32 MiB file system");
    assert_eq!(run.stderr.lines().filter(|l| l.contains("level=error")).count(), 1, "{run:#?}");
    assert!(run.stderr.contains("No space left"), "{run:#?}");
    assert!(!dest.join("global/pg_control").exists(), "a failed restore left pg_control");
    drop(small);
    let roomy = wd.join("roomy");
    dba.run(&["backup-fetch", roomy.to_str().unwrap(), "LATEST"]).expect_code(0, "backup-fetch with room");
    assert!(roomy.join("global/pg_control").exists());
    write_results(
        scenario,
        seed,
        started,
        json!({
            "trials": trials + 2,
            "wal_fetch_restored": restored,
            "wal_fetch_refused_cleanly": refused,
            "wal_push_full_store_exit": push_code,
            "backup_fetch_small_fs_exit": 11,
            "bytes_verified": restored * bytes.len() as u64,
            "failures": 0,
        }),
    );
}
