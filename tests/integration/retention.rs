//! Retention and WAL verification against real PostgreSQL 15: four backups with a promotion
//! to timeline 2 between the second and the third, `delete retain 2` removing exactly the
//! objects the rules say (asserted on the object list), restores of the newest and of the
//! oldest retained backup reaching the same table checksums, `wal-verify` naming a deleted
//! segment, and a permanent backup surviving `delete everything`. One S3 variant checks the
//! batched delete (DeleteObjects) against the S3 server.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use crate::harness::pg::PgCluster;
use crate::harness::s3::S3Server;
use crate::harness::{
    craft_segment, json_of, path_str, segment_name, walrs_for, write_file, StoreEnv, WalRs, WorkDir, SEG_SIZE,
};

/// The exit codes of src/exit.rs these tests expect.
const NOT_FOUND: i32 = 12;
const CONFLICT: i32 = 5;

/// How long a restored cluster may take to replay the archive and promote.
const RECOVERY: Duration = Duration::from_secs(120);

#[track_caller]
fn backup_push(walrs: &WalRs, c: &PgCluster) -> String {
    let run = walrs.run(&["backup-push", "--fast", "--json", path_str(&c.data)]);
    run.expect_code(0, &format!("backup-push of {}", c.name));
    json_of(&run)["name"].as_str().expect("a name").to_string()
}

/// Every object key in the store (hidden temporary files left out), sorted.
fn objects(store: &StoreEnv) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut pending = vec![store.objects_root.clone()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries {
            let e = e.expect("listing the store");
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                pending.push(e.path());
            } else {
                let rel = e.path().strip_prefix(&store.objects_root).unwrap().to_string_lossy().into_owned();
                out.insert(rel);
            }
        }
    }
    out
}

fn t_sum(c: &PgCluster) -> String {
    c.one("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || note, ',' order by id)), '-') from t")
}

/// Segment number of a `X/X` LSN with 16 MiB segments.
fn segno_of_lsn(lsn: &str) -> u64 {
    let (hi, lo) = lsn.split_once('/').unwrap();
    ((u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap()) / SEG_SIZE as u64
}

/// The segment number of a `wal_005/` key's WAL file (segments, `.partial`, `.backup`), or
/// `None` for history files and anything else.
fn segno_of_key(key: &str) -> Option<u64> {
    let file = key.strip_prefix("wal_005/")?;
    let hex = file.get(..24)?;
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(u64::from_str_radix(&hex[8..16], 16).unwrap() * 256 + u64::from_str_radix(&hex[16..24], 16).unwrap())
}

/// backup-fetch NAME into `dest`, then start it and wait for it to recover and promote.
fn restore(wd: &WorkDir, walrs: &WalRs, dest: &str, name: &str) -> PgCluster {
    let dir = wd.join(dest);
    walrs.run(&["backup-fetch", path_str(&dir), name]).expect_code(0, &format!("backup-fetch {name}"));
    let c = PgCluster::adopt(wd, dest);
    c.set(&[("archive_mode", "off")]);
    c.start();
    c.wait_recovery_done(RECOVERY);
    c
}

#[test]
fn local_store_retention_across_a_timeline_switch() {
    let wd = WorkDir::new("retention");
    let store = StoreEnv::local(&wd.pg_dir("store"));

    // Two backups on timeline 1, with WAL between and after them.
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.query("create table t (id int primary key, note text not null)");
    primary.query("insert into t select g, 'first' from generate_series(1, 1000) g");
    let walrs = walrs_for(&wd, &store, &primary);
    let b1 = backup_push(&walrs, &primary);
    primary.query("insert into t select g, 'second' from generate_series(1001, 2000) g");
    primary.switch_wal_and_wait_archived();
    let b2 = backup_push(&walrs, &primary);
    primary.query("insert into t select g, 'third' from generate_series(2001, 3000) g");
    primary.switch_wal_and_wait_archived();
    primary.stop();

    // The newest backup restored and promoted: timeline 2, archiving into the same store
    // (its history file and the partial segment of timeline 1 too).
    let dir = wd.join("promoted");
    walrs.run(&["backup-fetch", path_str(&dir), &b2]).expect_code(0, "backup-fetch of b2");
    let promoted = PgCluster::adopt(&wd, "promoted");
    promoted.archive_to(&store);
    promoted.start();
    promoted.wait_recovery_done(RECOVERY);
    assert!(promoted.current_wal_file().starts_with("00000002"), "{}", promoted.current_wal_file());
    assert_eq!(promoted.one("select count(*) from t"), "3000");
    let walrs = walrs_for(&wd, &store, &promoted);
    // Just promoted, its history file archived: the cluster is on timeline 2, though its
    // last checkpoint (a spread one, still running or just done) may say timeline 1.
    promoted.switch_wal_and_wait_archived();
    let verify = walrs.run(&["wal-verify", "--json"]);
    verify.expect_code(0, "wal-verify against the just-promoted cluster");
    assert_eq!(json_of(&verify)["cluster_timeline"], 2);
    promoted.query("insert into t select g, 'fourth' from generate_series(3001, 4000) g");
    promoted.switch_wal_and_wait_archived();
    let at_b3 = t_sum(&promoted);
    let b3 = backup_push(&walrs, &promoted);
    promoted.query("insert into t select g, 'fifth' from generate_series(4001, 5000) g");
    promoted.switch_wal_and_wait_archived();
    let b4 = backup_push(&walrs, &promoted);
    promoted.query("update t set note = note || ' updated' where id % 7 = 0");
    let expected = t_sum(&promoted);
    promoted.switch_wal_and_wait_archived();
    promoted.stop();
    for b in [&b1, &b2] {
        assert!(b.starts_with("base_00000001"), "{b}");
    }
    for b in [&b3, &b4] {
        assert!(b.starts_with("base_00000002"), "{b}");
    }

    // The archive is whole. The old primary, started again on timeline 1, is behind the
    // store's timeline 2: two primaries archive into one prefix.
    let verify = walrs.run(&["wal-verify", "--json"]);
    verify.expect_code(0, "wal-verify of a whole archive (the cluster is down: a warning)");
    assert_eq!(json_of(&verify)["timeline_path"], serde_json::json!([1, 2]));
    assert!(verify.logged("cluster_check", "skipped"), "{verify:#?}");
    primary.start();
    let run = walrs_for(&wd, &store, &primary).run(&["wal-verify", "--json"]);
    primary.stop();
    run.expect_code(CONFLICT, "wal-verify against the old primary");
    assert_eq!(json_of(&run)["cluster_timeline"], 1);
    assert_eq!(json_of(&run)["store_ahead_of_cluster"], true);

    // Dry run: nothing goes.
    let before = objects(&store);
    let dry = walrs.run(&["delete", "retain", "2", "--json"]);
    dry.expect_code(0, "delete retain 2 (dry run)");
    let plan = json_of(&dry);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["deleted_backups"], serde_json::json!([b1, b2]));
    assert_eq!(objects(&store), before, "a dry run deleted something");

    // The expected deletions, from the rules: both old backups whole, and every WAL file
    // of any timeline before the segment the oldest kept backup (b3) starts in. History
    // files stay.
    let list_run = walrs.run(&["backup-list", "--json"]);
    list_run.expect_code(0, "backup-list");
    let listed = json_of(&list_run);
    let b3_start = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == b3.as_str())
        .map(|r| segno_of_lsn(r["start_lsn"].as_str().unwrap()))
        .unwrap();
    let expected_gone: BTreeSet<String> = before
        .iter()
        .filter(|k| {
            k.starts_with(&format!("basebackups_005/{b1}"))
                || k.starts_with(&format!("basebackups_005/{b2}"))
                || segno_of_key(k).is_some_and(|n| n < b3_start)
        })
        .cloned()
        .collect();
    assert!(expected_gone.iter().any(|k| k.starts_with("wal_005/00000001")));
    assert!(expected_gone.iter().any(|k| k.starts_with("wal_005/00000002")), "timeline 2 began before b3");
    let run = walrs.run(&["delete", "retain", "2", "--confirm"]);
    run.expect_code(0, "delete retain 2 --confirm");
    assert!(run.logged("outcome", "deleted"), "{run:#?}");
    let after = objects(&store);
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(gone, expected_gone, "delete retain 2 removed other objects than the rules say");
    assert!(after.contains("wal_005/00000002.history.lz4"));
    let names: Vec<String> = json_of(&walrs.run(&["backup-list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, [b3.clone(), b4.clone()]);
    walrs.run(&["wal-verify"]).expect_code(0, "wal-verify after retention");

    // Both retained backups restore to the newest state.
    let newest = restore(&wd, &walrs, "newest", "LATEST");
    assert_eq!(t_sum(&newest), expected, "restore of the newest backup");
    newest.stop();
    let oldest = restore(&wd, &walrs, "oldest", &b3);
    assert_eq!(t_sum(&oldest), expected, "restore of the oldest retained backup");
    oldest.stop();

    // A segment deleted from the middle: wal-verify names it, exit 12, b3 unrecoverable.
    let victim_no = b3_start + 1;
    let victim = format!("wal_005/{}.lz4", segment_name(2, victim_no));
    let aside = wd.join("victim.lz4");
    fs::rename(store.object_path(&victim), &aside).expect("moving a segment aside");
    let run = walrs.run(&["wal-verify", "--json"]);
    run.expect_code(NOT_FOUND, "wal-verify with a segment missing");
    let report = json_of(&run);
    let missing = &report["missing"][0];
    assert_eq!(missing["first"], segment_name(2, victim_no).as_str(), "{report}");
    assert_eq!(missing["segments"], 1);
    assert_eq!(report["backups"][0]["recoverable"], false);
    let text = walrs.run(&["wal-verify"]);
    assert!(text.stdout.contains(&segment_name(2, victim_no)), "{text:#?}");
    fs::rename(&aside, store.object_path(&victim)).expect("putting the segment back");
    walrs.run(&["wal-verify"]).expect_code(0, "wal-verify with the segment back");

    // A permanent backup survives `delete everything` (no FORCE), with its WAL.
    walrs.run(&["backup-mark", &b3]).expect_code(0, "backup-mark");
    let listed = json_of(&walrs.run(&["backup-list", "--json"]));
    assert_eq!(listed[0]["is_permanent"], true);
    walrs.run(&["delete", "everything", "--confirm"]).expect_code(0, "delete everything --confirm");
    let names: Vec<String> = json_of(&walrs.run(&["backup-list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, std::slice::from_ref(&b3), "only the permanent backup is left");
    let left = objects(&store);
    assert!(!left.iter().any(|k| k.contains(&b4)), "b4's objects are left: {left:?}");
    let permanent = restore(&wd, &walrs, "permanent", &b3);
    assert_eq!(t_sum(&permanent), at_b3, "restore of the permanent backup to its consistency point");
    permanent.stop();
    // Unmarked, FORCE is no longer needed to delete it.
    walrs.run(&["backup-mark", "--unmark", &b3]).expect_code(0, "backup-mark --unmark");
    walrs.run(&["delete", "everything", "--confirm"]).expect_code(0, "delete everything --confirm");
    assert!(json_of(&walrs.run(&["backup-list", "--json"])).as_array().unwrap().is_empty());
}

/// The batched delete on S3: DeleteObjects removes every WAL object, and a dry run none.
#[test]
fn s3_store_delete_everything_in_batches() {
    let wd = WorkDir::new("retention-s3");
    let s3 = S3Server::start(&wd);
    let store = s3.store("clusters/retention");
    let walrs = WalRs::new(&wd, &store);
    let dir = wd.dir("segments");
    for n in 1..=3 {
        let f = write_file(&dir, &segment_name(1, n), &craft_segment(1, n, 7_000_000_000_000_000_001, n));
        walrs.push(&f).expect_code(0, "wal-push");
    }
    assert_eq!(store.wal_objects().len(), 3);
    let dry = walrs.run(&["delete", "everything"]);
    dry.expect_code(0, "delete everything (dry run)");
    assert!(dry.stdout.contains("dry run"), "{dry:#?}");
    // No backup: garbage has no reference point and deletes nothing.
    walrs.run(&["delete", "garbage", "--confirm"]).expect_code(0, "delete garbage");
    assert_eq!(store.wal_objects().len(), 3);
    let run = walrs.run(&["delete", "everything", "--confirm", "--json"]);
    run.expect_code(0, "delete everything --confirm");
    assert_eq!(json_of(&run)["totals"]["wal"]["objects"], 3);
    assert!(store.wal_objects().is_empty(), "{:?}", store.wal_objects());
}

/// An unfinished backup (objects, no sentinel) is left alone while it was written to within
/// `delete_garbage_min_age_secs`: it may be a backup-push in progress. Past the age it is
/// garbage. WAL is not touched when there is no backup to measure it against.
#[test]
fn local_store_garbage_spares_a_recent_unfinished_backup() {
    let wd = WorkDir::new("retention-garbage");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let walrs = WalRs::new(&wd, &store);
    let dir = wd.dir("segments");
    for n in 1..=3 {
        let f = write_file(&dir, &segment_name(1, n), &craft_segment(1, n, 7_000_000_000_000_000_002, n));
        walrs.push(&f).expect_code(0, "wal-push");
    }
    let part = "basebackups_005/base_000000010000000000000002/tar_partitions/part_001.tar.lz4";
    let part_dir = store.object_path(part).parent().unwrap().to_path_buf();
    fs::create_dir_all(&part_dir).unwrap();
    fs::write(store.object_path(part), b"a partition being written").unwrap();

    let run = walrs.run(&["delete", "garbage", "--confirm"]);
    run.expect_code(0, "delete garbage");
    assert!(run.stdout.contains("base_000000010000000000000002"), "not reported as in progress: {run:#?}");
    assert!(store.object_path(part).exists(), "a recent unfinished backup was deleted");

    let run = walrs.run(&["delete", "garbage", "--confirm", "--json", "--set", "delete_garbage_min_age_secs=0"]);
    run.expect_code(0, "delete garbage with no minimum age");
    let plan = json_of(&run);
    assert_eq!(plan["totals"]["garbage"]["objects"], 1, "{plan}");
    assert!(plan["totals"].get("wal").is_none(), "WAL went with no backup to measure it: {plan}");
    assert!(!store.object_path(part).exists(), "the old unfinished backup is still there");
    assert_eq!(store.wal_objects().len(), 3);
}
