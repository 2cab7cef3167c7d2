//! Throughput features, checked for correctness: pushing ready segments ahead (each
//! archived exactly once, acknowledgements only for stored segments, forged records not
//! trusted) and WAL prefetch (served only for the exact name, across a timeline switch,
//! surviving the prefetch folder's removal).
//!
//! The segments are crafted (see `harness::craft_segment`) in a pg_wal laid out as
//! PostgreSQL lays it out, with `archive_status/*.ready` files; a test plays PostgreSQL's
//! archiver: call wal-push for the oldest ready file, then rename `.ready` to `.done`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::s3::S3Server;
use crate::harness::{
    craft_incompressible_segment, craft_segment, prefetchers_in, read, segment_name, sha256_hex, wait_until, StoreEnv,
    WalRs, WorkDir,
};

const SYSID: u64 = 7_300_000_000_000_000_042;

/// A data directory with `pg_wal/` holding crafted segments, each marked ready.
fn pg_wal_with_ready(wd: &WorkDir, tli: u32, segnos: std::ops::Range<u64>) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let data = wd.dir("data");
    let pg_wal = data.join("pg_wal");
    fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    let mut segments = Vec::new();
    for segno in segnos {
        let name = segment_name(tli, segno);
        let bytes = craft_segment(tli, segno, SYSID, segno);
        fs::write(pg_wal.join(&name), &bytes).unwrap();
        fs::write(pg_wal.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
        segments.push((name, bytes));
    }
    (data, segments)
}

/// Plays PostgreSQL's archiver over every ready file, oldest first; returns the runs.
fn archive_all(walrs: &WalRs, data: &Path) -> Vec<crate::harness::Run> {
    let status = data.join("pg_wal/archive_status");
    let mut runs = Vec::new();
    loop {
        let mut ready: Vec<String> = fs::read_dir(&status)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_string))
            .collect();
        ready.sort();
        let Some(next) = ready.first() else { return runs };
        let run = walrs.clone().cwd(data).run(&["wal-push", &format!("pg_wal/{next}")]);
        run.expect_code(0, &format!("wal-push {next}"));
        fs::rename(status.join(format!("{next}.ready")), status.join(format!("{next}.done"))).unwrap();
        runs.push(run);
    }
}

fn push_ahead_archives_every_ready_segment_once(store: StoreEnv, wd: &WorkDir) {
    let (data, segments) = pg_wal_with_ready(wd, 1, 1..56);
    let walrs = WalRs::new(wd, &store).env("WALRS_ARCHIVE_AHEAD", "8");
    let runs = archive_all(&walrs, &data);
    assert_eq!(runs.len(), segments.len());

    // Every segment is in the store, with its own content.
    let objects = store.wal_objects();
    for (name, bytes) in &segments {
        assert!(objects.contains(&format!("{name}.lz4")), "{name} missing from {objects:?}");
        let out = wd.join(&format!("fetched-{name}"));
        walrs.fetch(name, &out).expect_code(0, "fetch back");
        assert_eq!(sha256_hex(&read(&out)), sha256_hex(bytes), "{name}");
        fs::remove_file(&out).unwrap();
    }
    // Each uploaded exactly once: one `outcome=stored` line per segment over all runs
    // (the file asked for, or pushed ahead of it), never two.
    let stored: Vec<String> = runs
        .iter()
        .flat_map(|r| r.stderr.lines().filter(|l| l.contains(" outcome=stored")).map(str::to_string))
        .collect();
    assert_eq!(stored.len(), segments.len(), "uploads: {stored:#?}");
    // Most calls were answered from a push-ahead record.
    let ahead = runs.iter().filter(|r| r.logged("outcome", "archived-ahead")).count();
    assert!(ahead >= segments.len() / 2, "only {ahead} of {} answered from records", segments.len());
    // PostgreSQL's own status files were never touched by wal-rs: all are `.done` because the
    // test renamed them, none vanished.
    let done = fs::read_dir(data.join("pg_wal/archive_status")).unwrap().count();
    assert_eq!(done, segments.len());
}

#[test]
fn push_ahead_archives_every_ready_segment_once_local() {
    let wd = WorkDir::new("ahead-local");
    let store = StoreEnv::local(&wd.dir("store"));
    push_ahead_archives_every_ready_segment_once(store, &wd);
}

#[test]
fn push_ahead_archives_every_ready_segment_once_s3() {
    let wd = WorkDir::new("ahead-s3");
    let s3 = S3Server::start(&wd);
    push_ahead_archives_every_ready_segment_once(s3.store("ahead"), &wd);
}

/// The archive daemon, which wal-push uses where it runs in a server's data directory
/// (beside `postmaster.pid`): every ready segment arrives with its own content, the calls
/// are answered by the daemon (no records on disk), an answer holds only for the file as it
/// was uploaded, and the daemon goes when its server does.
fn daemon_archives_every_ready_segment(store: StoreEnv, wd: &WorkDir) {
    let (data, segments) = pg_wal_with_ready(wd, 1, 1..41);
    // What wal-push takes for a running server; its first line is the server's PID.
    fs::write(data.join("postmaster.pid"), "4242\n/data\n").unwrap();
    let walrs = WalRs::new(wd, &store);
    let status = data.join("pg_wal/walrs_archive_status");
    let ready = data.join("pg_wal/archive_status");

    // The first call starts the daemon, which uploads the ready files without being asked,
    // up to `archive_ahead` (16) stored or in flight, the first one included.
    let first = &segments[0].0;
    walrs.clone().cwd(&data).run(&["wal-push", &format!("pg_wal/{first}")]).expect_code(0, "first push");
    assert!(status.join(".daemon.sock").exists(), "no daemon listening");
    wait_until("the daemon to upload ahead", Duration::from_secs(30), || store.wal_objects().len() >= 16);
    fs::rename(ready.join(format!("{first}.ready")), ready.join(format!("{first}.done"))).unwrap();
    // So the next call is answered from what the daemon stored, without uploading.
    let runs = archive_all(&walrs, &data);
    assert!(runs[0].logged("outcome", "archived-ahead"), "not answered from the daemon: {:#?}", runs[0]);
    assert_eq!(runs.len() + 1, segments.len());
    for (name, bytes) in &segments {
        assert_eq!(lz4_bytes(&store, name), *bytes, "{name}");
    }
    assert_eq!(store.wal_objects().len(), segments.len());
    let records: Vec<_> = fs::read_dir(&status)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .collect();
    assert!(records.is_empty(), "records written beside the daemon: {records:?}");

    // A segment the daemon stored, then rewritten with other bytes of the same size before
    // PostgreSQL asks: the daemon's answer no longer holds, and the call finds the conflict.
    let name = segment_name(1, 41);
    let pg_wal = data.join("pg_wal");
    fs::write(pg_wal.join(&name), craft_segment(1, 41, SYSID, 41)).unwrap();
    fs::write(pg_wal.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
    wait_until("the daemon to store the new ready segment", Duration::from_secs(30), || {
        store.wal_objects().contains(&format!("{name}.lz4"))
    });
    let other = craft_segment(1, 41, SYSID, 9041);
    fs::write(pg_wal.join(&name), &other).unwrap();
    let run = walrs.clone().cwd(&data).run(&["wal-push", &format!("pg_wal/{name}")]);
    assert_eq!(run.code, 5, "a changed file was acknowledged: {run:#?}");
    assert_eq!(lz4_bytes(&store, &name), craft_segment(1, 41, SYSID, 41), "the stored object was overwritten");

    // The server stops (a new postmaster.pid): the daemon exits and takes its socket along.
    fs::write(data.join("postmaster.pid"), "4343\n/data\n").unwrap();
    wait_until("the daemon to exit after its server", Duration::from_secs(10), || {
        !status.join(".daemon.sock").exists()
    });
}

#[test]
fn daemon_archives_every_ready_segment_local() {
    let wd = WorkDir::new("daemon-local");
    let store = StoreEnv::local(&wd.dir("store"));
    daemon_archives_every_ready_segment(store, &wd);
}

#[test]
fn daemon_archives_every_ready_segment_s3() {
    let wd = WorkDir::new("daemon-s3");
    let s3 = S3Server::start(&wd);
    daemon_archives_every_ready_segment(s3.store("daemon"), &wd);
}

#[test]
fn a_forged_or_stale_record_never_acknowledges() {
    let wd = WorkDir::new("forged");
    let store = StoreEnv::local(&wd.dir("store"));
    let (data, segments) = pg_wal_with_ready(&wd, 1, 1..3);
    let walrs = WalRs::new(&wd, &store).env("WALRS_ARCHIVE_AHEAD", "0").cwd(&data);
    let records = data.join("pg_wal/walrs_archive_status");
    fs::create_dir_all(&records).unwrap();

    // Forged: every field right (size, sha256, the file's own inode and times), but nothing
    // in the store: only the store's answer can catch it.
    let (name, bytes) = &segments[0];
    let forged = serde_json::json!({
        "name": name, "size": bytes.len(), "sha256": sha256_hex(bytes),
        "store": store.url, "key": format!("wal_005/{name}.lz4"),
        "stored_size": 1000, "file": stamp(&data.join("pg_wal").join(name)),
    });
    fs::write(records.join(format!("{name}.json")), forged.to_string()).unwrap();
    assert!(store.wal_objects().is_empty());
    let run = walrs.run(&["wal-push", &format!("pg_wal/{name}")]);
    run.expect_code(0, "push with a forged record");
    assert!(run.logged("outcome", "stored"), "the forged record was trusted: {run:#?}");
    assert!(store.wal_objects().contains(&format!("{name}.lz4")));

    // Stale: written when the file held other bytes of the same size, which the store
    // holds under this name's own key, at the recorded size and with the recorded sha256.
    // The file has been replaced since (a new inode): only hashing it again tells.
    let (name2, bytes2) = &segments[1];
    let file2 = data.join("pg_wal").join(name2);
    let other = craft_segment(1, 2, SYSID, 9002);
    assert_eq!(other.len(), bytes2.len());
    let replacement = data.join("pg_wal").join(format!(".{name2}.new"));
    fs::rename(&file2, &replacement).unwrap();
    fs::write(&file2, &other).unwrap();
    walrs.run(&["wal-push", &format!("pg_wal/{name2}")]).expect_code(0, "store the other bytes under the name");
    let key = format!("wal_005/{name2}.lz4");
    let stale = serde_json::json!({
        "name": name2, "size": other.len(), "sha256": sha256_hex(&other),
        "store": store.url, "key": key,
        "stored_size": fs::metadata(store.object_path(&key)).unwrap().len(), "file": stamp(&file2),
    });
    fs::rename(&replacement, &file2).unwrap();
    fs::write(records.join(format!("{name2}.json")), stale.to_string()).unwrap();
    let run = walrs.run(&["wal-push", &format!("pg_wal/{name2}")]);
    assert!(!run.logged("outcome", "archived-ahead"), "the stale record was trusted: {run:#?}");
    run.expect_code(5, "push of a file whose name holds other bytes in the store (conflict)");
    assert_eq!(lz4_bytes(&store, name2), other, "the stored object changed");
}

/// A record that is right about the file (its stamp and sha256) and about the object's key
/// and size, for a store that holds other bytes under the name. Raw objects are all one
/// segment in size, so only the store's own sha256 can tell: the push must report the
/// conflict, not acknowledge the file.
#[test]
fn a_record_is_not_trusted_over_the_stores_own_checksum() {
    let wd = WorkDir::new("record-vs-store");
    let store = StoreEnv::local(&wd.dir("store"));
    let (data, segments) = pg_wal_with_ready(&wd, 1, 1..2);
    let walrs = WalRs::new(&wd, &store).env("WALRS_ARCHIVE_AHEAD", "0").env("WALRS_COMPRESSION", "none").cwd(&data);
    let (name, bytes) = &segments[0];
    let other = craft_segment(1, 1, SYSID, 999);
    assert_eq!(other.len(), bytes.len());
    let elsewhere = wd.dir("elsewhere").join(name);
    fs::write(&elsewhere, &other).unwrap();
    walrs.push(&elsewhere).expect_code(0, "store other bytes under the name");

    let records = data.join("pg_wal/walrs_archive_status");
    fs::create_dir_all(&records).unwrap();
    let record = serde_json::json!({
        "name": name, "size": bytes.len(), "sha256": sha256_hex(bytes),
        "store": store.url, "key": format!("wal_005/{name}"),
        "stored_size": other.len(), "file": stamp(&data.join("pg_wal").join(name)),
    });
    fs::write(records.join(format!("{name}.json")), record.to_string()).unwrap();
    let run = walrs.run(&["wal-push", &format!("pg_wal/{name}")]);
    assert!(!run.logged("outcome", "archived-ahead"), "the record was trusted over the store: {run:#?}");
    run.expect_code(5, "push of a file whose name holds other bytes in the store (conflict)");
    assert_eq!(read(&store.object_path(&format!("wal_005/{name}"))), other, "the stored object changed");
}

/// On a slow or throttled store, the file PostgreSQL asked for is acknowledged once it is
/// durable, even when its batch of ready files pushed ahead cannot finish: the batch gets
/// what is left of the deadline, and what it did not finish PostgreSQL asks for in turn.
/// Before, the call waited for the whole batch and timed out, the file asked for stored.
#[test]
fn a_slow_push_ahead_batch_never_fails_the_file_asked_for() {
    let wd = WorkDir::new("ahead-slow");
    let store = StoreEnv::local(&wd.dir("store"));
    let data = wd.dir("data");
    let pg_wal = data.join("pg_wal");
    fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    let segments: Vec<(String, Vec<u8>)> = (1..9)
        .map(|segno| {
            let name = segment_name(1, segno);
            let bytes = craft_incompressible_segment(1, segno, SYSID, segno);
            fs::write(pg_wal.join(&name), &bytes).unwrap();
            fs::write(pg_wal.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
            (name, bytes)
        })
        .collect();
    // 16 MiB/s to the store, two uploads at once: the first segment takes about 2 s, all
    // eight about 8 s, beyond the 6 s deadline.
    let walrs = WalRs::new(&wd, &store)
        .env("WALRS_ARCHIVE_DAEMON", "false")
        .env("WALRS_ARCHIVE_AHEAD", "7")
        .env("WALRS_ARCHIVE_CONCURRENCY", "2")
        .env("WALRS_NETWORK_RATE_LIMIT", &(16u64 << 20).to_string())
        .env("WALRS_RETRY_DEADLINE_SECS", "6");
    let (first, bytes) = &segments[0];
    let run = walrs.clone().cwd(&data).run(&["wal-push", &format!("pg_wal/{first}")]);
    run.expect_code(0, "wal-push of the file asked for, its batch unfinished");
    assert!(run.logged("outcome", "ahead-unfinished"), "the batch finished after all: {run:#?}");
    let unfinished = segments.iter().filter(|(n, _)| !store.wal_objects().contains(&format!("{n}.lz4"))).count();
    assert!(unfinished > 0, "every segment was stored: {:?}", store.wal_objects());
    // What is stored is whole: the file asked for, and each segment pushed ahead.
    let out = wd.join("fetched");
    for (name, content) in segments.iter().filter(|(n, _)| store.wal_objects().contains(&format!("{n}.lz4"))) {
        walrs.fetch(name, &out).expect_code(0, "fetch back");
        assert_eq!(sha256_hex(&read(&out)), sha256_hex(content), "{name}");
        fs::remove_file(&out).unwrap();
    }
    walrs.fetch(first, &out).expect_code(0, "fetch of the file asked for");
    assert_eq!(sha256_hex(&read(&out)), sha256_hex(bytes));
}

/// The safety valve (`WALRS_ARCHIVE_QUEUE_MAX`) drops only what would otherwise pile up: a
/// segment already pushed ahead is not part of the backlog, and a timeline history file is
/// never dropped.
#[test]
fn the_queue_valve_drops_only_unarchived_segments() {
    let wd = WorkDir::new("valve");
    let store = StoreEnv::local(&wd.dir("store"));
    let (data, segments) = pg_wal_with_ready(&wd, 1, 1..5);
    let status = data.join("pg_wal/archive_status");
    let archived = |name: &str| {
        fs::rename(status.join(format!("{name}.ready")), status.join(format!("{name}.done"))).unwrap();
    };
    let name = |i: usize| segments[i].0.as_str();

    // Segment 1, and segment 2 pushed ahead of it.
    let ahead = WalRs::new(&wd, &store).env("WALRS_ARCHIVE_AHEAD", "1").cwd(&data);
    ahead.run(&["wal-push", &format!("pg_wal/{}", name(0))]).expect_code(0, "push with one ahead");
    archived(name(0));
    assert!(store.wal_objects().contains(&format!("{}.lz4", name(1))), "{:?}", store.wal_objects());

    // 2, 3 and 4 are ready (48 MiB), but 2 is stored: 32 MiB wait, under a 40 MiB valve.
    let valve = |bytes: u64| {
        WalRs::new(&wd, &store)
            .env("WALRS_ARCHIVE_AHEAD", "0")
            .env("WALRS_ARCHIVE_QUEUE_MAX", &bytes.to_string())
            .cwd(&data)
    };
    let run = valve(40 << 20).run(&["wal-push", &format!("pg_wal/{}", name(2))]);
    run.expect_code(0, "push under the valve's limit");
    assert!(run.logged("outcome", "stored"), "a segment was dropped with no backlog: {run:#?}");
    archived(name(2));

    // A timeline history file is archived whatever the backlog.
    fs::write(data.join("pg_wal/00000002.history"), b"1\t0/5000000\tno recovery target specified\n").unwrap();
    fs::write(status.join("00000002.history.ready"), b"").unwrap();
    let run = valve(1).run(&["wal-push", "pg_wal/00000002.history"]);
    run.expect_code(0, "push of a history file over the valve's limit");
    assert!(run.logged("outcome", "stored"), "the history file was dropped: {run:#?}");
    archived("00000002.history");

    // Over the limit, an unarchived segment is dropped, loudly, with a gap record.
    let run = valve(1).run(&["wal-push", &format!("pg_wal/{}", name(3))]);
    run.expect_code(0, "push over the valve's limit");
    assert!(run.logged("outcome", "dropped"), "{run:#?}");
    assert!(!store.wal_objects().contains(&format!("{}.lz4", name(3))), "{:?}", store.wal_objects());
    assert!(store.object_path(&format!("walrs/gaps/{}.json", name(3))).exists(), "no gap record");
}

/// Gap records the valve kept locally go up after the file asked for, in what is left of
/// the deadline: a store too slow for them (here, throttled) never fails a file already
/// durable, and what is not uploaded waits for a later call. Before, the call waited for
/// every record and timed out (exit 7), call after call, and archiving stopped.
#[test]
fn slow_gap_record_uploads_never_fail_the_file_asked_for() {
    let wd = WorkDir::new("gaps-slow");
    let store = StoreEnv::local(&wd.dir("store"));
    let (data, segments) = pg_wal_with_ready(&wd, 1, 1..2);
    let local = data.join("pg_wal/walrs_archive_status/gaps");
    fs::create_dir_all(&local).unwrap();
    // Ten records of 4 MiB: about 10 s at 4 MiB/s, past the 6 s deadline.
    let gaps: Vec<String> = (100..110).map(|segno| segment_name(1, segno)).collect();
    for name in &gaps {
        let record = format!("{{\"name\":\"{name}\"}}{}", " ".repeat(4 << 20));
        fs::write(local.join(format!("{name}.json")), record).unwrap();
    }
    let left = || fs::read_dir(&local).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some()).count();
    let (name, bytes) = &segments[0];
    let run = WalRs::new(&wd, &store)
        .env("WALRS_ARCHIVE_AHEAD", "0")
        .env("WALRS_NETWORK_RATE_LIMIT", &(4u64 << 20).to_string())
        .env("WALRS_RETRY_DEADLINE_SECS", "6")
        .cwd(&data)
        .run(&["wal-push", &format!("pg_wal/{name}")]);
    run.expect_code(0, "wal-push of the file asked for, its gap records unfinished");
    assert!(run.logged("outcome", "gaps-unfinished"), "every record went up after all: {run:#?}");
    assert!(left() > 0, "no record left locally");
    assert_eq!(lz4_bytes(&store, name), *bytes);

    // The store fast again: the next call uploads the rest.
    let run = WalRs::new(&wd, &store)
        .env("WALRS_ARCHIVE_AHEAD", "0")
        .cwd(&data)
        .run(&["wal-push", &format!("pg_wal/{name}")]);
    run.expect_code(0, "wal-push again");
    assert_eq!(left(), 0, "records left locally: {run:#?}");
    for gap in &gaps {
        assert!(store.object_path(&format!("walrs/gaps/{gap}.json")).exists(), "{gap} not in the store");
    }
}

/// The file identity a push-ahead record keeps (see src/commands/wal_push/ahead.rs).
fn stamp(path: &Path) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap();
    serde_json::json!({
        "dev": m.dev(), "ino": m.ino(), "size": m.size(),
        "mtime_ns": m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        "ctime_ns": m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
    })
}

fn lz4_bytes(store: &StoreEnv, name: &str) -> Vec<u8> {
    crate::harness::lz4_cli_decompress(&store.wal_object(name))
}

/// A store holding timeline 1 segments 1..=6 and timeline 2 segments 4..=8 (a switch at 4).
fn store_with_two_timelines(wd: &WorkDir) -> (StoreEnv, Vec<(String, Vec<u8>)>) {
    let store = StoreEnv::local(&wd.dir("store"));
    let src = wd.dir("src");
    let walrs = WalRs::new(wd, &store);
    let mut all = Vec::new();
    for (tli, range) in [(1u32, 1u64..7), (2, 4..9)] {
        for segno in range {
            let name = segment_name(tli, segno);
            let bytes = craft_segment(tli, segno, SYSID, segno * 10 + tli as u64);
            let path = src.join(&name);
            fs::write(&path, &bytes).unwrap();
            walrs.push(&path).expect_code(0, "seed the store");
            all.push((name, bytes));
        }
    }
    (store, all)
}

fn content<'a>(all: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &all.iter().find(|(n, _)| n == name).unwrap().1
}

fn prefetched(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|e| e.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| !n.starts_with('.'));
    names.sort();
    names
}

/// A store with two timelines, and a data directory (the current directory of `walrs`,
/// with prefetch of `count` segments) whose recovery fetches from it.
fn recovering_from_two_timelines(wd: &WorkDir, count: u32) -> (Vec<(String, Vec<u8>)>, PathBuf, WalRs) {
    let (store, all) = store_with_two_timelines(wd);
    let data = wd.dir("data");
    fs::create_dir_all(data.join("pg_wal")).unwrap();
    let walrs = WalRs::new(wd, &store).env("WALRS_PREFETCH_COUNT", &count.to_string()).cwd(&data);
    (all, data, walrs)
}

#[test]
fn prefetch_serves_exact_names_across_a_timeline_switch() {
    let wd = WorkDir::new("prefetch-tli");
    let (all, data, walrs) = recovering_from_two_timelines(&wd, 4);
    let dir = data.join("pg_wal/walrs_prefetch");
    let fetch = |name: &str| {
        let run = walrs.run(&["wal-fetch", name, "pg_wal/RECOVERYXLOG"]);
        run.expect_code(0, &format!("fetch {name}"));
        let got = read(&data.join("pg_wal/RECOVERYXLOG"));
        assert_eq!(sha256_hex(&got), sha256_hex(content(&all, name)), "{name}: wrong bytes served");
        fs::remove_file(data.join("pg_wal/RECOVERYXLOG")).unwrap();
        run
    };

    fetch(&segment_name(1, 1));
    let want: Vec<String> = (2..6).map(|s| segment_name(1, s)).collect();
    wait_until("timeline 1 segments 2-5 prefetched", Duration::from_secs(30), || {
        want.iter().all(|n| dir.join(n).exists())
    });
    let run = fetch(&segment_name(1, 2));
    assert!(run.logged("outcome", "prefetched"), "not served from prefetch: {run:#?}");
    fetch(&segment_name(1, 3));

    // The switch: timeline 2 from segment 4. Timeline 1's segment 4 sits prefetched under
    // its own name; it must not be what is served for timeline 2's. (Let timeline 1's
    // prefetcher finish first, so nothing of it lands after the switch.)
    wait_until("timeline 1 prefetcher done", Duration::from_secs(30), || {
        fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".claim"))
    });
    assert!(dir.join(segment_name(1, 4)).exists());
    let run = fetch(&segment_name(2, 4));
    assert!(!run.logged("outcome", "prefetched"), "{run:#?}");
    wait_until("timeline 2 prefetched and timeline 1 cleaned", Duration::from_secs(30), || {
        let names = prefetched(&dir);
        names.iter().all(|n| n.starts_with("00000002")) && dir.join(segment_name(2, 5)).exists()
    });
    let run = fetch(&segment_name(2, 5));
    assert!(run.logged("outcome", "prefetched"), "{run:#?}");
    // The end of the archive is not cached: after timeline 2's last segment, a fetch of the
    // next one says "not found", and once it is archived, it is found.
    for s in 6..9 {
        fetch(&segment_name(2, s));
    }
    let next = segment_name(2, 9);
    walrs.run(&["wal-fetch", &next, "pg_wal/RECOVERYXLOG"]).expect_code(1, "past the end");
    let path = wd.dir("late").join(&next);
    fs::write(&path, craft_segment(2, 9, SYSID, 99)).unwrap();
    walrs.push(&path).expect_code(0, "archive the next segment");
    walrs.run(&["wal-fetch", &next, "pg_wal/RECOVERYXLOG"]).expect_code(0, "found once archived");
}

#[test]
fn prefetch_folder_deleted_mid_recovery() {
    let wd = WorkDir::new("prefetch-gone");
    let (all, data, walrs) = recovering_from_two_timelines(&wd, 3);
    let dir = data.join("pg_wal/walrs_prefetch");
    walrs.run(&["wal-fetch", &segment_name(1, 1), "pg_wal/RECOVERYXLOG"]).expect_code(0, "first");
    wait_until("prefetch of segment 2", Duration::from_secs(30), || dir.join(segment_name(1, 2)).exists());
    // Wait for the prefetcher to finish its window before pulling the folder away.
    // (A segment is renamed into place just before its claim goes: wait for both.)
    wait_until("prefetcher done", Duration::from_secs(30), || {
        (2..5).all(|s| dir.join(segment_name(1, s)).exists())
            && fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".claim"))
    });
    fs::remove_dir_all(&dir).unwrap();
    for s in 2..5 {
        let name = segment_name(1, s);
        let run = walrs.run(&["wal-fetch", &name, "pg_wal/RECOVERYXLOG"]);
        run.expect_code(0, "fetch after the folder vanished");
        assert_eq!(sha256_hex(&read(&data.join("pg_wal/RECOVERYXLOG"))), sha256_hex(content(&all, &name)));
    }
    // Nothing partial was left anywhere in pg_wal.
    let leftovers: Vec<String> = fs::read_dir(data.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("walrs-partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The recovery's prefetcher (started again after the folder went) stops once its folder
    // is gone, instead of running on in the background.
    assert!(!prefetchers_in(&data).is_empty(), "no prefetcher running in {}", data.display());
    fs::remove_dir_all(&dir).unwrap();
    wait_until("the prefetcher to exit", Duration::from_secs(10), || prefetchers_in(&data).is_empty());
}

/// Prefetch is for PostgreSQL's recovery, which restores every segment as RECOVERYXLOG.
/// pg_rewind --restore-target-wal names the segment itself, and rewrites the data directory
/// while it reads: no prefetcher may add and remove files beside it.
#[test]
fn only_postgresqls_recovery_starts_a_prefetcher() {
    let wd = WorkDir::new("prefetch-rewind");
    let (all, data, walrs) = recovering_from_two_timelines(&wd, 3);
    for s in 1..3 {
        let name = segment_name(1, s);
        walrs.run(&["wal-fetch", &name, &format!("pg_wal/{name}")]).expect_code(0, "fetch as pg_rewind does");
        assert_eq!(sha256_hex(&read(&data.join("pg_wal").join(&name))), sha256_hex(content(&all, &name)));
    }
    // The prefetcher is started before wal-fetch exits: none now means none at all.
    assert!(prefetchers_in(&data).is_empty(), "a prefetcher runs in {}", data.display());
    assert!(!data.join("pg_wal/walrs_prefetch").exists());
    // The same fetch as recovery does starts one.
    walrs.run(&["wal-fetch", &segment_name(1, 3), "pg_wal/RECOVERYXLOG"]).expect_code(0, "fetch as recovery does");
    assert!(!prefetchers_in(&data).is_empty(), "no prefetcher for PostgreSQL's recovery");
    let dir = data.join("pg_wal/walrs_prefetch");
    wait_until("prefetch of segment 4", Duration::from_secs(30), || dir.join(segment_name(1, 4)).exists());
    fs::remove_dir_all(&dir).unwrap();
    wait_until("the prefetcher to exit", Duration::from_secs(10), || prefetchers_in(&data).is_empty());
}

#[test]
fn prefetch_is_not_served_to_another_configuration() {
    // An operator points restore_command at another store mid-recovery: what the running
    // prefetcher fetched from the old one must not be served, and a prefetcher with the new
    // configuration takes over.
    let wd = WorkDir::new("prefetch-config");
    let (old_store, _) = store_with_two_timelines(&wd);
    let new_store = StoreEnv::local(&wd.dir("new-store"));
    let src = wd.dir("new-src");
    let mut new_content = Vec::new();
    for segno in 1..7u64 {
        let name = segment_name(1, segno);
        let bytes = craft_segment(1, segno, SYSID, segno * 1000);
        fs::write(src.join(&name), &bytes).unwrap();
        WalRs::new(&wd, &new_store).push(&src.join(&name)).expect_code(0, "seed the new store");
        new_content.push((name, bytes));
    }
    let data = wd.dir("data");
    fs::create_dir_all(data.join("pg_wal")).unwrap();
    let dir = data.join("pg_wal/walrs_prefetch");
    let old = WalRs::new(&wd, &old_store).env("WALRS_PREFETCH_COUNT", "3").cwd(&data);
    let new = WalRs::new(&wd, &new_store).env("WALRS_PREFETCH_COUNT", "3").cwd(&data);

    old.run(&["wal-fetch", &segment_name(1, 1), "pg_wal/RECOVERYXLOG"]).expect_code(0, "old store");
    wait_until("the old store's segment 2 prefetched", Duration::from_secs(30), || {
        dir.join(segment_name(1, 2)).exists()
    });
    for s in 2..5 {
        let name = segment_name(1, s);
        fs::remove_file(data.join("pg_wal/RECOVERYXLOG")).unwrap();
        let run = new.run(&["wal-fetch", &name, "pg_wal/RECOVERYXLOG"]);
        run.expect_code(0, "new store");
        let got = read(&data.join("pg_wal/RECOVERYXLOG"));
        assert_eq!(sha256_hex(&got), sha256_hex(content(&new_content, &name)), "{name}: the old store's bytes served");
        if s == 2 {
            assert!(!run.logged("outcome", "prefetched"), "{run:#?}");
        }
    }
}
