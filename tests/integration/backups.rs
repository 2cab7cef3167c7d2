//! Base backups end to end: `backup-push` of a running PostgreSQL 15 primary that archives
//! into the same store, `backup-list`, and `backup-fetch` into a directory that PostgreSQL
//! then recovers through the restore_command backup-fetch wrote.
//!
//! wal-rs runs as the postgres user ([`WalRs::run_as_postgres`]), as a DBA runs it on the
//! database host: backup-push reads the server's own data directory, and the files
//! backup-fetch restores must belong to postgres for the server to start. Restored clusters
//! get `archive_mode = off` (their postgresql.conf is the primary's, which archives into the
//! primary's store) unless a test gives them a store of their own.
//!
//! Every restore is checked on the data: a row count and an md5 over every row in key
//! order, taken on the primary at the moment the restore must reproduce.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::pg::{as_postgres, run_ok, PgCluster, Rows};
use crate::harness::s3::S3Server;
use crate::harness::workdir::chown_postgres;
use crate::harness::{
    files_under, flip_middle_byte, json_of, lz4_cli_decompress, path_str, read, segment_name, wait_until, walrs_for,
    StoreEnv, WalRs, WorkDir,
};

/// The exit codes of src/exit.rs the tests expect.
mod code {
    pub const USAGE: i32 = 2;
    pub const CONFIG: i32 = 3;
    pub const INVALID_INPUT: i32 = 4;
    pub const CORRUPT: i32 = 10;
    pub const NOT_FOUND: i32 = 12;
    pub const TIMEOUT: i32 = 13;
    pub const KEY: i32 = 14;
}

/// How long a restored cluster may take to replay the archive and promote.
const RECOVERY: Duration = Duration::from_secs(120);

// --- helpers ---------------------------------------------------------------------------------

/// What the PostgreSQL server of a restored copy needs in its environment for the
/// restore_command backup-fetch wrote: the S3 credentials, which wal-rs never writes into
/// postgresql.auto.conf. Nothing else: the store URL, endpoint, region and path style must
/// come from the written command itself.
fn server_env(store: &StoreEnv) -> Vec<(String, String)> {
    store
        .vars
        .iter()
        .filter(|(k, _)| {
            ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"].contains(&k.as_str())
        })
        .cloned()
        .collect()
}

/// `backup-push --fast --json PGDATA`; returns the backup's name.
#[track_caller]
fn backup_push(walrs: &WalRs, c: &PgCluster) -> String {
    backup_push_json(walrs, c)["name"].as_str().expect("a name").to_string()
}

/// `backup-push --fast --json PGDATA`; returns what it printed (`name`, `partitions`, ...).
#[track_caller]
fn backup_push_json(walrs: &WalRs, c: &PgCluster) -> Value {
    let run = walrs.run(&["backup-push", "--fast", "--json", path_str(&c.data)]);
    run.expect_code(0, &format!("backup-push of {}", c.name));
    let out = json_of(&run);
    let name = out["name"].as_str().unwrap_or_else(|| panic!("no name in {out}"));
    assert!(name.starts_with("base_000000"), "backup name {name}");
    assert!(run.logged("outcome", "stored"), "{run:#?}");
    out
}

/// `backup-list --json`, which must succeed.
#[track_caller]
fn backup_list(walrs: &WalRs, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["backup-list", "--json"];
    args.extend_from_slice(extra);
    let run = walrs.run(&args);
    run.expect_code(0, "backup-list");
    match json_of(&run) {
        Value::Array(rows) => rows,
        other => panic!("backup-list --json printed {other}, not an array"),
    }
}

fn names(rows: &[Value]) -> Vec<String> {
    rows.iter().map(|r| r["name"].as_str().expect("a name").to_string()).collect()
}

/// `backup-fetch WorkDir/<dest> ARGS... --json`, then the restored directory as a cluster
/// (not started, `archive_mode = off`). Returns what backup-fetch printed (`name`,
/// `verified`, ...).
#[track_caller]
fn fetch(wd: &WorkDir, walrs: &WalRs, dest: &str, args: &[&str]) -> (Value, PgCluster) {
    let dir = wd.join(dest);
    let mut full = vec!["backup-fetch", path_str(&dir)];
    full.extend_from_slice(args);
    full.push("--json");
    let run = walrs.run(&full);
    run.expect_code(0, &format!("backup-fetch {args:?} into {dest}"));
    assert!(run.logged("outcome", "restored"), "{run:#?}");
    let out = json_of(&run);
    assert!(out["name"].is_string(), "backup-fetch printed no name: {out}");
    assert!(dir.join("global/pg_control").exists(), "{dest}: no global/pg_control after a successful restore");
    let c = PgCluster::adopt(wd, dest);
    c.set(&[("archive_mode", "off")]);
    (out, c)
}

/// Asserts what backup-fetch wrote into postgresql.auto.conf: a restore_command running the
/// wal-rs that restored (the work directory's copy) on the same store, the given target
/// settings, and no secret.
#[track_caller]
fn check_recovery_settings(wd: &WorkDir, c: &PgCluster, store: &StoreEnv, expect: &[&str]) {
    let auto = fs::read_to_string(c.data.join("postgresql.auto.conf")).expect("reading postgresql.auto.conf");
    let command = auto
        .lines()
        .rfind(|l| l.starts_with("restore_command"))
        .unwrap_or_else(|| panic!("{}: no restore_command in postgresql.auto.conf:\n{auto}", c.name));
    assert!(command.contains(path_str(wd.walrs())), "restore_command does not run {}: {command}", wd.walrs().display());
    assert!(command.contains(&format!("store={}", store.url)), "restore_command does not name the store: {command}");
    assert!(command.contains("wal-fetch %f %p"), "{command}");
    for line in expect {
        assert!(auto.lines().any(|l| l == *line), "{}: no line {line:?} in postgresql.auto.conf:\n{auto}", c.name);
    }
    for (k, v) in &store.vars {
        if k.contains("SECRET") {
            assert!(!auto.contains(v.as_str()), "{k} was written into postgresql.auto.conf:\n{auto}");
        }
    }
}

/// Row count and md5 of every row in key order of the test table `t`.
fn t_sum(c: &PgCluster) -> String {
    c.one("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || note, ',' order by id)), '-') from t")
}

/// Row count, a sum and an md5 over every row in key order, for each pgbench table.
fn pgbench_sums(c: &PgCluster) -> Rows {
    c.query(
        "select 'accounts', count(*), sum(abalance), \
                md5(string_agg(aid || ':' || bid || ':' || abalance, ',' order by aid)) from pgbench_accounts \
         union all select 'branches', count(*), sum(bbalance), \
                md5(string_agg(bid || ':' || bbalance, ',' order by bid)) from pgbench_branches \
         union all select 'tellers', count(*), sum(tbalance), \
                md5(string_agg(tid || ':' || bid || ':' || tbalance, ',' order by tid)) from pgbench_tellers \
         union all select 'history', count(*), sum(delta), \
                md5(string_agg(tid || ':' || bid || ':' || aid || ':' || delta || ':' || mtime, ',' \
                               order by mtime, tid, bid, aid, delta)) from pgbench_history",
    )
}

/// Row count and md5 over the md5 of every row of the incompressible table `noise`.
fn noise_sum(c: &PgCluster) -> String {
    c.one("select count(*) || ' ' || md5(string_agg(id || ':' || md5(b), ',' order by id)) from noise")
}

/// The current time on `c`'s clock, in UTC, as a recovery_target_time.
fn clock_utc(c: &PgCluster) -> String {
    c.one("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
}

/// Starts the restored cluster and waits for the end of its recovery (it promotes), then
/// checks it writes a timeline of its own.
fn start_and_recover(c: &PgCluster, env: &[(String, String)]) {
    c.start_with_env(env);
    c.wait_recovery_done(RECOVERY);
    let current = c.current_wal_file();
    assert!(current.starts_with("00000002"), "{} promoted but writes {current}, not timeline 2", c.name);
}

// --- 1. point in time --------------------------------------------------------------------------

#[test]
fn local_store_point_in_time_restores() {
    let wd = WorkDir::new("bk-pitr-local");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    point_in_time_restores(&wd, &store);
}

#[test]
fn s3_store_point_in_time_restores() {
    let wd = WorkDir::new("bk-pitr-s3");
    let s3 = S3Server::start(&wd);
    point_in_time_restores(&wd, &s3.store("clusters/main"));
}

/// A first backup, then batch A, time T1, batch B (one transaction), restore point rp1, a
/// second backup taken while pgbench writes, batch C. Restores, each checked against the
/// primary's checksums at that moment:
/// - (a) to T1, no backup named: the first backup is chosen (the newest finished before
///   T1), and the result is exactly A;
/// - (b) to rp1, the first backup named (LATEST began after rp1): A and B;
/// - (c) to batch B's xid, the first backup named: A and B;
/// - (d) to rp1's LSN, no backup named: the first backup is chosen; A and B;
/// - (e) the first backup with `--target-immediate`: the tables as they were before A;
/// - (f) LATEST, the backup taken under pgbench's writes, to the end of the archive: A, B,
///   C, and pgbench's tables as the primary left them.
fn point_in_time_restores(wd: &WorkDir, store: &StoreEnv) {
    let primary = PgCluster::archiving(wd, "primary", store);
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    primary.query("create table t (id int primary key, note text not null)");
    // 20 MB that lz4 cannot shrink: a partition object larger than one S3 part (8 MiB).
    primary.query(
        "create table noise as select g as id, decode(string_agg(md5(random()::text), ''), 'hex') as b \
         from generate_series(1, 20000) g, generate_series(1, 64) k group by g",
    );
    let noise = noise_sum(&primary);
    let walrs = walrs_for(wd, store, &primary);
    assert!(backup_list(&walrs, &[]).is_empty(), "a fresh store lists backups");

    let at_start = (t_sum(&primary), pgbench_sums(&primary));
    let before_first = clock_utc(&primary);
    let first = backup_push(&walrs, &primary);
    let parts = store.object_path(&format!("basebackups_005/{first}/tar_partitions"));
    let biggest = files_under(&parts).iter().map(|f| fs::metadata(parts.join(f)).unwrap().len()).max().unwrap_or(0);
    assert!(biggest > 8 << 20, "no partition of {first} is larger than 8 MiB: {biggest} bytes at most");

    // Batch A, then T1, strictly after A's commit and strictly before B's.
    primary.query("insert into t select g, 'A' || g from generate_series(1, 1000) g");
    let at_a = (t_sum(&primary), pgbench_sums(&primary));
    let t1 = clock_utc(&primary);
    wait_until("the primary's clock to pass T1", Duration::from_secs(10), || {
        primary.one(&format!("select clock_timestamp() > '{t1}'::timestamptz + interval '50 ms'")) == "t"
    });

    // Batch B, one transaction, then the restore point.
    let xid_b = primary.one(
        "begin; \
         insert into t select g, 'B' || g from generate_series(1001, 2000) g; \
         update t set note = note || ' updated by B' where id % 7 = 0; \
         select pg_current_xact_id()::text; \
         commit",
    );
    let rp1_lsn = primary.one("select pg_create_restore_point('rp1')");
    let at_b = (t_sum(&primary), pgbench_sums(&primary));
    assert_ne!(at_a.0, at_b.0);

    // The second backup, while pgbench writes into its own tables.
    let mut bench = as_postgres("pgbench")
        .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"])
        .args(["-n", "-c", "2", "-j", "2", "-T", "5", "postgres"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting pgbench");
    wait_until("pgbench to commit its first transactions", Duration::from_secs(30), || {
        primary.one("select count(*) > 0 from pgbench_history") == "t"
    });
    assert!(bench.try_wait().expect("pgbench status").is_none(), "pgbench ended before the backup began");
    // Small partitions, so the restore below unpacks several of them in parallel.
    let pushed = backup_push_json(&walrs.clone().env("WALRS_BACKUP_PARTITION_SIZE_MIB", "8"), &primary);
    let second = pushed["name"].as_str().unwrap().to_string();
    assert!(pushed["partitions"].as_u64().unwrap() >= 5, "8 MiB partitions of a 40 MB cluster: {pushed}");
    let bench_out = bench.wait_with_output().expect("waiting for pgbench");
    assert!(bench_out.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&bench_out.stderr));
    assert_ne!(first, second);

    // Batch C: inserts, updates and deletes.
    primary.query("insert into t select g, 'C' || g from generate_series(2001, 3000) g");
    primary.query("update t set note = note || ' updated by C' where id % 5 = 0");
    primary.query("delete from t where id % 11 = 0");
    let at_c = (t_sum(&primary), pgbench_sums(&primary));
    assert!(at_c.0.starts_with("2728 "), "t after batch C: {}", at_c.0);
    primary.switch_wal_and_wait_archived();
    assert_eq!(primary.one("select failed_count from pg_stat_archiver"), "0");
    let sysid = primary.one("select system_identifier::text from pg_control_system()");
    let version = primary.one("show server_version_num");
    primary.stop();

    let listed = backup_list(&walrs, &[]);
    assert_eq!(names(&listed), [first.as_str(), second.as_str()], "backup-list, oldest first: {listed:#?}");
    assert_eq!(listed[1]["start_lsn"], pushed["start_lsn"]);
    assert_eq!(listed[1]["finish_lsn"], pushed["finish_lsn"]);
    for b in &listed {
        assert_eq!(b["system_identifier"].as_str(), Some(sysid.as_str()), "{b}");
        assert_eq!(b["pg_version"].as_u64().map(|v| v.to_string()), Some(version.clone()), "{b}");
        assert_eq!(b["timeline"], 1, "{b}");
    }

    // A time before any backup finished: nothing to restore from, and nothing written.
    let too_early = wd.join("too-early");
    let run = walrs.run(&["backup-fetch", path_str(&too_early), "--target-time", &before_first]);
    run.expect_code(code::NOT_FOUND, "backup-fetch to a time before the first backup");
    assert!(!too_early.exists(), "a failed backup-fetch created its destination");

    let env = server_env(store);

    // (a) To T1 with no backup named: only the first backup finished before T1.
    let (chosen, at_t1) = fetch(wd, &walrs, "at-t1", &["--target-time", &t1, "--target-action", "promote"]);
    assert_eq!(chosen["name"], first.as_str(), "--target-time T1 must choose the newest backup finished before T1");
    assert!(at_t1.data.join("recovery.signal").exists() && !at_t1.data.join("standby.signal").exists());
    check_recovery_settings(
        wd,
        &at_t1,
        store,
        &[&format!("recovery_target_time = '{t1}'"), "recovery_target_action = 'promote'"],
    );
    start_and_recover(&at_t1, &env);
    assert_eq!(t_sum(&at_t1), at_a.0, "restored to T1: t is not exactly batch A");
    assert_eq!(pgbench_sums(&at_t1), at_a.1, "restored to T1: pgbench tables");
    assert_eq!(noise_sum(&at_t1), noise, "restored to T1: the incompressible table");
    at_t1.stop();

    // (b) To rp1, from the first backup by name: the second one began after rp1.
    let (chosen, at_rp1) = fetch(wd, &walrs, "at-rp1", &[&first, "--target-name", "rp1", "--target-action", "promote"]);
    assert_eq!(chosen["name"], first.as_str());
    check_recovery_settings(wd, &at_rp1, store, &["recovery_target_name = 'rp1'"]);
    start_and_recover(&at_rp1, &env);
    assert_eq!(t_sum(&at_rp1), at_b.0, "restored to rp1: t is not exactly batches A and B");
    assert_eq!(pgbench_sums(&at_rp1), at_b.1, "restored to rp1: pgbench tables");
    at_rp1.stop();

    // (c) To batch B's transaction id, from the first backup by name: A and B.
    let (chosen, at_xid) = fetch(wd, &walrs, "at-xid", &[&first, "--target-xid", &xid_b, "--target-action", "promote"]);
    assert_eq!(chosen["name"], first.as_str());
    check_recovery_settings(wd, &at_xid, store, &[&format!("recovery_target_xid = '{xid_b}'")]);
    start_and_recover(&at_xid, &env);
    assert_eq!(t_sum(&at_xid), at_b.0, "restored to batch B's xid: t is not exactly batches A and B");
    at_xid.stop();

    // (d) To rp1's LSN with no backup named: only the first backup is consistent before it.
    let (chosen, at_lsn) = fetch(wd, &walrs, "at-lsn", &["--target-lsn", &rp1_lsn, "--target-action", "promote"]);
    assert_eq!(chosen["name"], first.as_str(), "--target-lsn must choose the newest backup consistent before it");
    check_recovery_settings(wd, &at_lsn, store, &[&format!("recovery_target_lsn = '{rp1_lsn}'")]);
    start_and_recover(&at_lsn, &env);
    assert_eq!(t_sum(&at_lsn), at_b.0, "restored to rp1's LSN: t is not exactly batches A and B");
    assert_eq!(pgbench_sums(&at_lsn), at_b.1, "restored to rp1's LSN: pgbench tables");
    at_lsn.stop();

    // (e) The first backup alone, recovered only to consistency.
    let (chosen, immediate) =
        fetch(wd, &walrs, "immediate", &[&first, "--target-immediate", "--target-action", "promote"]);
    assert_eq!(chosen["name"], first.as_str());
    check_recovery_settings(wd, &immediate, store, &["recovery_target = 'immediate'"]);
    start_and_recover(&immediate, &env);
    assert_eq!(t_sum(&immediate), at_start.0, "the first backup at consistency: t");
    assert_eq!(pgbench_sums(&immediate), at_start.1, "the first backup at consistency: pgbench tables");
    immediate.stop();

    // (f) LATEST, the backup taken under pgbench's writes, to the end of the archive.
    let (chosen, latest) = fetch(wd, &walrs, "latest", &["LATEST"]);
    assert_eq!(chosen["name"], second.as_str(), "LATEST");
    check_recovery_settings(wd, &latest, store, &[]);
    start_and_recover(&latest, &env);
    assert_eq!(t_sum(&latest), at_c.0, "restored to the end: t");
    assert_eq!(pgbench_sums(&latest), at_c.1, "restored to the end: pgbench tables differ from the primary's");
    assert_eq!(noise_sum(&latest), noise, "restored to the end: the incompressible table");
    latest.stop();
}

/// A cluster restored to a point in time becomes a primary of its own (a new store), and a
/// base backup of it is restored in turn, with no target: that restore must recover to the
/// end of the new store's archive.
///
/// The backup of the restored cluster carries its postgresql.auto.conf, where the first
/// backup-fetch wrote `recovery_target_time` and `recovery_target_action`. The second
/// backup-fetch must drop those, not only append a new restore_command: a stale target of
/// the first restore would still apply to the second recovery.
#[test]
fn local_store_backup_of_a_point_in_time_copy_restores_to_its_end() {
    let wd = WorkDir::new("bk-pitr-again");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.query("create table t (id int primary key, note text not null)");
    let walrs = walrs_for(&wd, &store, &primary);
    backup_push(&walrs, &primary);
    primary.query("insert into t select g, 'A' || g from generate_series(1, 1000) g");
    let t1 = clock_utc(&primary);
    wait_until("the primary's clock to pass T1", Duration::from_secs(10), || {
        primary.one(&format!("select clock_timestamp() > '{t1}'::timestamptz + interval '50 ms'")) == "t"
    });
    primary.query("insert into t select g, 'B' || g from generate_series(1001, 2000) g");
    primary.switch_wal_and_wait_archived();
    primary.stop();

    // The point-in-time copy, promoted, archives into a store of its own.
    let new_store = StoreEnv::local(&wd.pg_dir("new-store"));
    let (_, copy) = fetch(&wd, &walrs, "copy", &["--target-time", &t1, "--target-action", "promote"]);
    copy.archive_to(&new_store);
    start_and_recover(&copy, &[]);
    assert!(t_sum(&copy).starts_with("1000 "), "the point-in-time copy: {}", t_sum(&copy));
    copy.query("insert into t select g, 'C' || g from generate_series(2001, 3000) g");
    let copy_walrs = walrs_for(&wd, &new_store, &copy);
    let name = backup_push(&copy_walrs, &copy);
    // Written after the copy's backup: only its archive has them.
    copy.query("insert into t select g, 'D' || g from generate_series(3001, 4000) g");
    copy.query("update t set note = note || ' updated by D' where id % 3 = 0");
    let expected = t_sum(&copy);
    copy.switch_wal_and_wait_archived();
    copy.stop();

    let (chosen, again) = fetch(&wd, &copy_walrs, "again", &["LATEST"]);
    assert_eq!(chosen["name"], name.as_str());
    again.start();
    again.wait_recovery_done(RECOVERY);
    assert_eq!(t_sum(&again), expected, "the backup of the point-in-time copy did not recover to its end");
}

// --- 2. follower -------------------------------------------------------------------------------

#[test]
fn local_store_follower_replays_the_archive_then_forks() {
    let wd = WorkDir::new("bk-follower-local");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let fork = StoreEnv::local(&wd.pg_dir("fork-store"));
    follower_replays_then_forks(&wd, &store, &fork);
}

#[test]
fn s3_store_follower_replays_the_archive_then_forks() {
    let wd = WorkDir::new("bk-follower-s3");
    let s3 = S3Server::start(&wd);
    follower_replays_then_forks(&wd, &s3.store("clusters/main"), &s3.store("clusters/fork"));
}

/// A standby restored with `--standby` follows the primary through the archive; promoted,
/// it goes to timeline 2 and archives into a store of its own, leaving the primary and its
/// store on timeline 1.
fn follower_replays_then_forks(wd: &WorkDir, store: &StoreEnv, fork: &StoreEnv) {
    let primary = PgCluster::archiving(wd, "primary", store);
    primary.query("create table t (id int primary key, note text not null)");
    primary.query("insert into t select g, 'before backup ' || g from generate_series(1, 1000) g");
    let walrs = walrs_for(wd, store, &primary);
    // PGDATA relative to the current directory (the work directory).
    let run = walrs.run(&["backup-push", "--fast", "--json", &primary.name]);
    run.expect_code(0, "backup-push with a relative PGDATA");
    let name = json_of(&run)["name"].as_str().expect("a name").to_string();
    primary.query("insert into t select g, 'after backup ' || g from generate_series(1001, 2000) g");

    let (chosen, follower) = fetch(wd, &walrs, "follower", &["LATEST", "--standby"]);
    assert_eq!(chosen["name"], name.as_str());
    assert_eq!(chosen["verified"], true, "a wal-rs backup is restored against its manifest");
    assert!(follower.data.join("standby.signal").exists(), "--standby wrote no standby.signal");
    assert!(!follower.data.join("recovery.signal").exists(), "--standby wrote recovery.signal");
    check_recovery_settings(wd, &follower, store, &[]);
    // Ask the archive again every 200 ms instead of every 5 s; once promoted, archive into
    // the fork's own store (a standby with archive_mode = on archives nothing).
    follower.set(&[
        ("wal_retrieve_retry_interval", "200ms"),
        ("archive_mode", "on"),
        ("archive_command", &fork.archive_command(wd.walrs())),
    ]);
    let env = server_env(store);
    follower.start_with_env(&env);
    assert_eq!(follower.one("select pg_is_in_recovery()"), "t", "the follower left recovery");

    // Written after the follower started: it gets them only from the archive.
    primary.query("insert into t select g, 'while following ' || g from generate_series(2001, 3000) g");
    primary.query("update t set note = note || ' updated' where id % 9 = 0");
    let expected = t_sum(&primary);
    primary.switch_wal_and_wait_archived();
    wait_until("the follower to replay the primary's latest rows", Duration::from_secs(60), || {
        follower.try_query("select 1").is_ok() && t_sum(&follower) == expected
    });
    assert_eq!(follower.one("select pg_is_in_recovery()"), "t", "the follower left recovery by itself");
    assert!(fork.wal_objects().is_empty(), "a standby archived into its store: {:?}", fork.wal_objects());

    assert_eq!(follower.one("select pg_promote()"), "t");
    follower.wait_recovery_done(RECOVERY);
    let current = follower.current_wal_file();
    assert!(current.starts_with("00000002"), "the promoted follower writes {current}");
    wait_until("the fork's 00000002.history in its own store", Duration::from_secs(60), || {
        fork.wal_object("00000002.history").exists()
    });
    let history = String::from_utf8(lz4_cli_decompress(&fork.wal_object("00000002.history"))).unwrap();
    assert!(history.starts_with("1\t"), "00000002.history does not branch from timeline 1: {history:?}");
    follower.query("insert into t select g, 'fork ' || g from generate_series(3001, 3500) g");
    assert!(t_sum(&follower).starts_with("3500 "));
    let last_on_2 = follower.switch_wal_and_wait_archived();
    assert!(last_on_2.starts_with("00000002"), "{last_on_2}");
    assert!(fork.wal_objects().contains(&format!("{last_on_2}.lz4")), "{:?}", fork.wal_objects());
    assert_eq!(follower.one("select failed_count from pg_stat_archiver"), "0");

    // A backup of the fork, on timeline 2, into its own store, restores and recovers onto
    // timeline 3 through that store alone.
    let fork_walrs = walrs_for(wd, fork, &follower);
    let fork_backup = backup_push(&fork_walrs, &follower);
    assert!(fork_backup.starts_with("base_00000002"), "{fork_backup}");
    follower.query("update t set note = note || ' after the fork backup' where id % 4 = 0");
    let fork_expected = t_sum(&follower);
    follower.switch_wal_and_wait_archived();
    let listed = backup_list(&fork_walrs, &[]);
    assert_eq!(names(&listed), [fork_backup.as_str()]);
    assert_eq!(listed[0]["timeline"], 2);
    let (chosen, fork_copy) = fetch(wd, &fork_walrs, "fork-copy", &["LATEST"]);
    assert_eq!(chosen["name"], fork_backup.as_str());
    check_recovery_settings(wd, &fork_copy, fork, &[]);
    fork_copy.start_with_env(&server_env(fork));
    fork_copy.wait_recovery_done(RECOVERY);
    assert_eq!(t_sum(&fork_copy), fork_expected, "the copy of the fork");
    let current = fork_copy.current_wal_file();
    assert!(current.starts_with("00000003"), "the copy of the fork writes {current}, not timeline 3");
    fork_copy.stop();

    // The primary never saw the fork.
    primary.query("insert into t values (9001, 'primary after the fork')");
    assert_eq!(t_sum(&primary).split(' ').next(), Some("3001"));
    let last_on_1 = primary.switch_wal_and_wait_archived();
    assert!(last_on_1.starts_with("00000001"), "the primary writes {last_on_1}");
    assert!(primary.current_wal_file().starts_with("00000001"));
    let objects = store.wal_objects();
    assert!(!objects.iter().any(|o| o.starts_with("00000002")), "timeline 2 files in the primary's store: {objects:?}");
    assert!(objects.contains(&format!("{last_on_1}.lz4")), "{objects:?}");
}

// --- 3. tablespaces ----------------------------------------------------------------------------

/// A tablespace outside PGDATA: a restore into its location while it is in use is refused;
/// remapped with `--tablespace-map`, and to its original location once that is empty, it
/// comes back with its rows, including those written after the backup.
#[test]
fn local_store_tablespace_restores_remapped_and_in_place() {
    let wd = WorkDir::new("bk-tblspc");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let ts_dir = wd.pg_dir("ts-original");
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.query(&format!("create tablespace ts1 location '{}'", ts_dir.display()));
    primary.query("create table tt (id int primary key, note text not null) tablespace ts1");
    primary.query("insert into tt select g, md5(g::text) from generate_series(1, 2000) g");
    let oid = primary.one("select oid from pg_tablespace where spcname = 'ts1'");
    // This time the connection comes from --pg-url, with no PG* variable set.
    let walrs = WalRs::new(&wd, &store).run_as_postgres();
    let url = format!("postgresql://postgres@127.0.0.1:{}/postgres", primary.port);
    let run = walrs.run(&["backup-push", "--fast", "--pg-url", &url, "--json", path_str(&primary.data)]);
    run.expect_code(0, "backup-push --pg-url");
    let name = json_of(&run)["name"].as_str().expect("a name").to_string();
    // Replayed from the archive into the tablespace.
    primary.query("insert into tt select g, md5(g::text) from generate_series(2001, 3000) g");
    primary.query("update tt set note = 'after backup' where id % 10 = 0");
    let expected = primary.one("select count(*) || ' ' || md5(string_agg(id || ':' || note, ',' order by id)) from tt");
    primary.switch_wal_and_wait_archived();

    let listed = backup_list(&walrs, &["--detail"]);
    assert_eq!(names(&listed), [name.as_str()]);
    let spaces = listed[0]["tablespaces"].as_array().expect("--detail lists tablespaces");
    assert_eq!(spaces.len(), 1, "{listed:#?}");
    assert_eq!(spaces[0]["oid"].as_str(), Some(oid.as_str()));
    assert_eq!(spaces[0]["location"].as_str().map(|l| l.trim_end_matches('/')), Some(path_str(&ts_dir)));

    // The original location is in use: refused before anything is written.
    let in_use = files_under(&ts_dir);
    let refused_dest = wd.join("refused");
    let refused = walrs.run(&["backup-fetch", path_str(&refused_dest), "LATEST"]);
    refused.expect_code(code::INVALID_INPUT, "backup-fetch into a tablespace location in use");
    assert!(refused.stderr.contains(path_str(&ts_dir)), "the refusal does not name {}: {refused:#?}", ts_dir.display());
    assert!(!refused_dest.exists(), "a refused backup-fetch created its destination");
    assert_eq!(files_under(&ts_dir), in_use);
    let good = format!("{oid}={}", wd.join("ts-unused").display());
    let bad_map = walrs.run(&[
        "backup-fetch",
        path_str(&refused_dest),
        "LATEST",
        "--tablespace-map",
        &good,
        "--tablespace-map",
        "999999=/tmp/x",
    ]);
    bad_map.expect_code(code::USAGE, "--tablespace-map of a tablespace the backup does not have");
    assert!(bad_map.stderr.contains("999999"), "{bad_map:#?}");
    assert!(!refused_dest.exists() && !wd.join("ts-unused").exists(), "a refused backup-fetch created directories");

    // (b) Remapped.
    let moved = wd.join("ts-moved");
    let map = format!("{oid}={}", moved.display());
    let (_, remapped) = fetch(&wd, &walrs, "remapped", &["LATEST", "--tablespace-map", &map]);
    let link = remapped.data.join("pg_tblspc").join(&oid);
    assert_eq!(fs::read_link(&link).expect("pg_tblspc/<oid> is a symlink"), moved);
    let map_file = fs::read_to_string(remapped.data.join("tablespace_map")).unwrap_or_default();
    assert!(
        !map_file.contains(path_str(&ts_dir)) && map_file.contains(path_str(&moved)),
        "tablespace_map still names the original location: {map_file:?}"
    );
    assert!(
        files_under(&moved).iter().any(|f| f.to_string_lossy().starts_with("PG_15_")),
        "nothing restored into {}",
        moved.display()
    );
    start_and_recover(&remapped, &[]);
    assert_eq!(
        remapped.one("select count(*) || ' ' || md5(string_agg(id || ':' || note, ',' order by id)) from tt"),
        expected
    );
    assert_eq!(remapped.one(&format!("select pg_tablespace_location({oid})")), path_str(&moved));
    assert_eq!(fs::read_link(&link).expect("pg_tblspc/<oid> after recovery"), moved);
    let rel = remapped.one("select pg_relation_filepath('tt')");
    assert!(rel.starts_with(&format!("pg_tblspc/{oid}/")), "{rel}");
    assert!(remapped.data.join(&rel).exists(), "{rel} does not resolve in the remapped copy");
    remapped.stop();

    // (a) In place, once the primary is gone and its tablespace directory emptied.
    primary.stop();
    for entry in fs::read_dir(&ts_dir).unwrap() {
        fs::remove_dir_all(entry.unwrap().path()).expect("emptying the original tablespace directory");
    }
    let (_, in_place) = fetch(&wd, &walrs, "in-place", &["LATEST"]);
    let link = in_place.data.join("pg_tblspc").join(&oid);
    let target = fs::read_link(&link).expect("pg_tblspc/<oid> is a symlink");
    assert_eq!(path_str(&target).trim_end_matches('/'), path_str(&ts_dir), "pg_tblspc/{oid} in the in-place restore");
    start_and_recover(&in_place, &[]);
    assert_eq!(
        in_place.one("select count(*) || ' ' || md5(string_agg(id || ':' || note, ',' order by id)) from tt"),
        expected
    );
    assert!(files_under(&ts_dir).iter().any(|f| f.to_string_lossy().starts_with("PG_15_")));
    // Compared without a trailing '/': see the next test for the exact value.
    let location = in_place.one(&format!("select pg_tablespace_location({oid})"));
    assert_eq!(location.trim_end_matches('/'), path_str(&ts_dir));
}

/// Restored in place, a tablespace keeps the location the primary had, byte for byte:
/// `pg_tablespace_location()` is what pg_dumpall writes into CREATE TABLESPACE, and what
/// scripts compare.
///
/// The sentinel records each location with a trailing '/' (WAL-G's spec format): the
/// `pg_tblspc/<oid>` link and the rewritten tablespace_map, from which PostgreSQL recreates
/// the link at startup, must not carry it.
#[test]
fn local_store_in_place_tablespace_restore_keeps_the_exact_location() {
    let wd = WorkDir::new("bk-tblspc-exact");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let ts_dir = wd.pg_dir("ts");
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.query(&format!("create tablespace ts1 location '{}'", ts_dir.display()));
    primary.query("create table tt (id int primary key) tablespace ts1");
    primary.query("insert into tt select generate_series(1, 100)");
    let oid = primary.one("select oid from pg_tablespace where spcname = 'ts1'");
    let location = primary.one(&format!("select pg_tablespace_location({oid})"));
    assert_eq!(location, path_str(&ts_dir));
    let walrs = walrs_for(&wd, &store, &primary);
    backup_push(&walrs, &primary);
    primary.stop();
    fs::remove_dir_all(&ts_dir).expect("removing the original tablespace directory");

    let (_, in_place) = fetch(&wd, &walrs, "in-place", &["LATEST"]);
    let link = in_place.data.join("pg_tblspc").join(&oid);
    start_and_recover(&in_place, &[]);
    assert_eq!(in_place.one("select count(*) from tt"), "100");
    assert_eq!(
        in_place.one(&format!("select pg_tablespace_location({oid})")),
        location,
        "the tablespace's location changed in the in-place restore"
    );
    assert_eq!(fs::read_link(&link).unwrap(), ts_dir, "pg_tblspc/{oid} in the in-place restore");
}

// --- 4. kill -9 --------------------------------------------------------------------------------

/// The role's own timeouts never end a backup: with `idle_session_timeout` and
/// `statement_timeout` of 1 s set on the role, backup-push's session sits idle through the
/// whole walk (held to 4 MB/s: several seconds) and still stops the backup. Its session
/// turns them off for itself alone, as pg_dump does.
#[test]
fn local_store_backup_outlasts_the_roles_session_timeouts() {
    let wd = WorkDir::new("bk-timeouts");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.query("alter role postgres set idle_session_timeout = '1s'");
    primary.query("alter role postgres set statement_timeout = '1s'");
    assert_eq!(primary.one("show idle_session_timeout"), "1s");
    let walrs = walrs_for(&wd, &store, &primary).env("WALRS_DISK_RATE_LIMIT", "4000000");
    let started = Instant::now();
    let name = backup_push(&walrs, &primary);
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "backup-push took {:?}: too short to outlast the role's 1 s idle timeout",
        started.elapsed()
    );
    assert_eq!(names(&backup_list(&walrs, &[])), [name.as_str()]);
}

/// Published (not temporary) partition objects of any backup under `basebackups_005/`.
fn published_partitions(store: &StoreEnv) -> Vec<PathBuf> {
    let root = store.object_path("basebackups_005");
    files_under(&root)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            p.parent().is_some_and(|d| d.ends_with("tar_partitions")) && name.starts_with("part_")
        })
        .collect()
}

/// A backup-push killed with SIGKILL after its first partition is stored leaves no backup
/// that anything lists or restores; the next backup-push succeeds and restores.
#[test]
fn local_store_backup_push_killed_midway_leaves_no_backup() {
    let wd = WorkDir::new("bk-kill");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.pgbench(&["-i", "-s", "3", "-q"]);
    primary.query("update pgbench_accounts set abalance = aid % 1000 where aid % 3 = 0");
    // Only its init fork is backed up: it comes back empty.
    primary.query("create unlogged table scratch as select g as id from generate_series(1, 10000) g");
    let expected = pgbench_sums(&primary);
    let walrs = walrs_for(&wd, &store, &primary);

    // Slow on purpose: 1 MiB partitions one at a time, each compressed with zstd -19.
    let slow = walrs
        .clone()
        .env("WALRS_BACKUP_PARTITION_SIZE_MIB", "1")
        .env("WALRS_BACKUP_CONCURRENCY", "1")
        .env("WALRS_COMPRESSION", "zstd")
        .env("WALRS_ZSTD_LEVEL", "19");
    let log = wd.join("killed-backup-push.log");
    let mut child = slow.spawn(&["backup-push", "--fast", path_str(&primary.data)], &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while published_partitions(&store).is_empty() {
        if let Some(status) = child.try_wait().expect("backup-push status") {
            panic!("backup-push ended ({status}) before a partition was seen: {}", fs::read_to_string(&log).unwrap());
        }
        assert!(Instant::now() < deadline, "no partition stored within 60 s: {}", fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL to backup-push");
    let status = child.wait().expect("reaping backup-push");
    assert_eq!(status.signal(), Some(9), "backup-push was not killed mid-way: {status}");
    let left = published_partitions(&store);
    assert!(!left.is_empty());
    let sentinels: Vec<_> = files_under(&store.object_path("basebackups_005"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("_backup_stop_sentinel.json"))
        .collect();
    assert!(sentinels.is_empty(), "a killed backup-push wrote a sentinel: {sentinels:?}");

    assert!(backup_list(&walrs, &[]).is_empty(), "a killed backup is listed");
    let text = walrs.run(&["backup-list"]);
    text.expect_code(0, "backup-list");
    assert_eq!(text.stdout.lines().count(), 1, "backup-list lists the killed backup: {text:#?}");
    let nothing = walrs.run(&["backup-fetch", path_str(&wd.join("nothing")), "LATEST"]);
    nothing.expect_code(code::NOT_FOUND, "backup-fetch LATEST with only a killed backup in the store");
    assert!(!wd.join("nothing/global/pg_control").exists());

    // The next backup-push: zstd, in 4 MiB partitions, restored with two at a time.
    let pushed = backup_push_json(
        &walrs.clone().env("WALRS_COMPRESSION", "zstd").env("WALRS_BACKUP_PARTITION_SIZE_MIB", "4"),
        &primary,
    );
    let name = pushed["name"].as_str().unwrap().to_string();
    assert!(pushed["partitions"].as_u64().unwrap() >= 5, "{pushed}");
    let listed = backup_list(&walrs, &[]);
    assert_eq!(names(&listed), [name.as_str()]);
    assert!(
        store.object_path(&format!("basebackups_005/{name}/tar_partitions/part_001.tar.zst")).exists(),
        "no zstd partition in {name}"
    );
    // With a restore_command of the caller's own, written as given.
    let command = store.restore_command(wd.walrs());
    let (chosen, restored) = fetch(&wd, &walrs, "restored", &["LATEST", "--restore-command", &command]);
    assert_eq!(chosen["name"], name.as_str());
    let auto = fs::read_to_string(restored.data.join("postgresql.auto.conf")).unwrap();
    assert!(auto.lines().any(|l| l == format!("restore_command = '{command}'")), "{auto}");
    primary.stop();
    start_and_recover(&restored, &[]);
    assert_eq!(pgbench_sums(&restored), expected);
    assert_eq!(restored.one("select count(*) from scratch"), "0", "an unlogged table came back with rows");
}

/// A backup's name is reserved before anything is written into its folder: a backup-push
/// that starts where another backup-push is writing (or died) takes the next name, and
/// leaves that folder alone.
#[test]
fn local_store_a_backup_name_in_use_is_never_written_into() {
    let wd = WorkDir::new("bk-name");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    let expected = pgbench_sums(&primary);
    let walrs = walrs_for(&wd, &store, &primary);

    // The backup starts in the current segment or one after it (pg_backup_start switches
    // segments): another run holds each of the next few names, with a partition written.
    let current = primary.one("select pg_walfile_name(pg_current_wal_insert_lsn())");
    let segno =
        u64::from_str_radix(&current[8..16], 16).unwrap() * 256 + u64::from_str_radix(&current[16..24], 16).unwrap();
    let held: Vec<(String, PathBuf)> = (0..4)
        .map(|n| {
            let name = format!("base_{}", segment_name(1, segno + n));
            let folder = store.object_path(&format!("basebackups_005/{name}"));
            fs::create_dir_all(folder.join("tar_partitions")).unwrap();
            fs::write(folder.join("walrs_writer.json"), br#"{"hostname":"elsewhere","pid":1}"#).unwrap();
            let part = folder.join("tar_partitions/part_001.tar.lz4");
            fs::write(&part, b"another run's partition").unwrap();
            // As that run, the postgres user, would have left them.
            for path in [folder.parent().unwrap(), &folder, &folder.join("tar_partitions"), &part] {
                chown_postgres(path);
            }
            (name, part)
        })
        .collect();

    let name = backup_push(&walrs, &primary);
    assert!(
        held.iter().any(|(taken, _)| name.starts_with(&format!("{taken}_"))),
        "{name} is not the next name after one of {:?}",
        held.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for (_, part) in &held {
        assert_eq!(read(part), b"another run's partition", "{} was written over", part.display());
    }
    assert_eq!(names(&backup_list(&walrs, &[])), [name.as_str()]);
    let (chosen, restored) = fetch(&wd, &walrs, "restored", &["LATEST"]);
    assert_eq!(chosen["name"], name.as_str());
    primary.stop();
    start_and_recover(&restored, &server_env(&store));
    assert_eq!(pgbench_sums(&restored), expected);
}

// --- 5. refusals and corruption ----------------------------------------------------------------

#[test]
fn local_store_non_empty_dest_and_corrupt_partition_are_refused() {
    let wd = WorkDir::new("bk-refuse-local");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    refusals_and_corruption(&wd, &store, &StoreEnv::local(&wd.pg_dir("unarchived-store")));
}

#[test]
fn s3_store_non_empty_dest_and_corrupt_partition_are_refused() {
    let wd = WorkDir::new("bk-refuse-s3");
    let s3 = S3Server::start(&wd);
    refusals_and_corruption(&wd, &s3.store("clusters/main"), &s3.store("clusters/unarchived"));
}

/// `other` is a store the primary does not archive into.
fn refusals_and_corruption(wd: &WorkDir, store: &StoreEnv, other: &StoreEnv) {
    let primary = PgCluster::archiving(wd, "primary", store);
    primary.query("create table t (id int primary key, note text not null)");
    primary.query("insert into t select g, md5(g::text) from generate_series(1, 5000) g");
    let walrs = walrs_for(wd, store, &primary);

    // Not the server's data directory: refused before anything is stored.
    let elsewhere = wd.pg_dir("not-the-pgdata");
    let run = walrs.run(&["backup-push", "--fast", path_str(&elsewhere)]);
    run.expect_code(code::CONFIG, "backup-push of another directory than the server's");
    assert!(!store.object_path("basebackups_005").exists(), "a refused backup-push stored something");

    // Into a store the server does not archive into: its WAL never arrives, so no backup.
    let run = walrs_for(wd, other, &primary).env("WALRS_BACKUP_WAL_TIMEOUT_SECS", "2").run(&[
        "backup-push",
        "--fast",
        path_str(&primary.data),
    ]);
    run.expect_code(code::TIMEOUT, "backup-push whose WAL never reaches the store");
    assert!(backup_list(&walrs_for(wd, other, &primary), &[]).is_empty(), "a backup without its WAL is listed");

    let name = backup_push(&walrs, &primary);
    primary.stop();

    let unknown = wd.join("unknown");
    let run = walrs.run(&["backup-fetch", path_str(&unknown), "base_000000010000000000000099"]);
    run.expect_code(code::NOT_FOUND, "backup-fetch of a backup that does not exist");
    assert!(!unknown.exists(), "a failed backup-fetch created its destination");

    // A destination with something in it: refused, and left exactly as it was.
    let occupied = wd.pg_dir("occupied");
    let kept = occupied.join("keep.txt");
    fs::write(&kept, b"precious, not a data directory\n").unwrap();
    let kept_mtime = fs::metadata(&kept).unwrap().modified().unwrap();
    let run = walrs.run(&["backup-fetch", path_str(&occupied), "LATEST"]);
    run.expect_code(code::INVALID_INPUT, "backup-fetch into a non-empty directory");
    assert!(run.stderr.contains(path_str(&occupied)), "the refusal does not name the directory: {run:#?}");
    assert_eq!(files_under(&occupied), [PathBuf::from("keep.txt")], "backup-fetch added to a non-empty directory");
    assert_eq!(read(&kept), b"precious, not a data directory\n");
    assert_eq!(fs::metadata(&kept).unwrap().modified().unwrap(), kept_mtime);

    // One byte flipped in the data partition: the restore fails, names the partition, and
    // leaves a directory PostgreSQL cannot start (no pg_control).
    let part = store.object_path(&format!("basebackups_005/{name}/tar_partitions/part_001.tar.lz4"));
    assert!(part.exists(), "no {}", part.display());
    flip_middle_byte(&part);
    let dest = wd.join("from-corrupt");
    let run = walrs.run(&["backup-fetch", path_str(&dest), "LATEST"]);
    run.expect_code(code::CORRUPT, "backup-fetch of a corrupt partition");
    assert!(run.stderr.contains("part_001"), "the error does not name part_001: {run:#?}");
    assert!(!dest.join("global/pg_control").exists(), "a failed restore left global/pg_control");
    assert!(run.elapsed < Duration::from_secs(60), "the failure took {:?}", run.elapsed);

    // The partition gone from the store: the backup is damaged (exit 10, as for a WAL-G
    // backup missing one), and that is known before anything is written.
    fs::remove_file(&part).unwrap();
    let dest = wd.join("from-missing");
    let run = walrs.run(&["backup-fetch", path_str(&dest), "LATEST"]);
    run.expect_code(code::CORRUPT, "backup-fetch of a backup missing a partition its manifest lists");
    assert!(run.stderr.contains("part_001.tar.lz4"), "the error does not name part_001: {run:#?}");
    assert!(!dest.exists(), "the refused restore created {}", dest.display());
}

// --- 6. a WAL-G backup -------------------------------------------------------------------------

/// backup-list and backup-fetch of the base backup in the WAL-G-layout fixture (no wal-rs
/// manifest): listed with the sentinel's facts, restored, and recovered through the
/// restore_command backup-fetch wrote to what the fixture's README says it holds.
#[test]
fn walg_fixture_backup_lists_and_restores() {
    let wd = WorkDir::new("bk-walg");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/walg-layout-pg15/store");
    let copy = wd.join("walg-store");
    run_ok(Command::new("cp").arg("-r").arg(&fixture).arg(&copy), "copying the fixture's store");
    let store = StoreEnv::local(&copy);
    let walrs = WalRs::new(&wd, &store).run_as_postgres();

    let listed = backup_list(&walrs, &["--detail"]);
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let b = &listed[0];
    assert_eq!(b["name"], "base_000000010000000000000002");
    assert_eq!(b["start_lsn"], "0/2000028");
    assert_eq!(b["finish_lsn"], "0/2000100");
    assert_eq!(b["pg_version"], 150018);
    assert_eq!(b["system_identifier"], "7712412929493074945");
    assert_eq!(b["timeline"], 1);
    assert_eq!(b["verified_by_manifest"], false);
    let text = walrs.run(&["backup-list"]);
    text.expect_code(0, "backup-list");
    assert!(text.stdout.contains("base_000000010000000000000002"), "{text:#?}");

    // An empty destination that exists already (mode 755: PostgreSQL wants 700, which
    // backup-fetch sets).
    let dest = wd.pg_dir("restored");
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).unwrap();
    // The store from a configuration file this time: the restore_command must name it.
    let config = wd.join("walrs.toml");
    fs::write(&config, format!("store = \"{}\"\n", store.url)).unwrap();
    let from_file = WalRs::without_store(&wd).run_as_postgres();
    let (chosen, restored) = fetch(&wd, &from_file, "restored", &["LATEST", "--config", path_str(&config)]);
    assert_eq!(chosen["name"], "base_000000010000000000000002");
    assert_eq!(chosen["verified"], false, "a WAL-G backup has no wal-rs manifest");
    assert!(restored.data.join("backup_label").exists() && restored.data.join("recovery.signal").exists());
    let auto = fs::read_to_string(restored.data.join("postgresql.auto.conf")).unwrap();
    let command = format!(
        "restore_command = '{} --config {} --set retry_deadline_secs=10 wal-fetch %f %p'",
        wd.walrs().display(),
        config.display()
    );
    assert!(auto.lines().any(|l| l == command), "expected {command:?} in postgresql.auto.conf:\n{auto}");
    start_and_recover(&restored, &[]);
    assert_eq!(
        restored.query("select count(*), sum(id), count(*) filter (where note = 'after backup') from t"),
        [[Some("1500".to_string()), Some("1125750".to_string()), Some("500".to_string())]],
        "the table the fixture's README describes"
    );
}

/// A copy of the WAL-G-layout fixture's store in `wd`.
fn walg_fixture_copy(wd: &WorkDir) -> StoreEnv {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/walg-layout-pg15/store");
    let copy = wd.join("walg-store");
    run_ok(Command::new("cp").arg("-r").arg(&fixture).arg(&copy), "copying the fixture's store");
    StoreEnv::local(&copy)
}

/// WAL-G writes backup_label into its last partition: with the data partition lost, the
/// restore had backup_label, pg_control and nothing else, and exited 0. files_metadata.json
/// lists every partition: backup-fetch refuses before writing anything, backup-verify
/// reports the missing one.
#[test]
fn walg_backup_missing_a_data_partition_is_refused() {
    let wd = WorkDir::new("bk-walg-missing");
    let store = walg_fixture_copy(&wd);
    let walrs = WalRs::new(&wd, &store);
    let part = "basebackups_005/base_000000010000000000000002/tar_partitions/part_001.tar.lz4";
    fs::remove_file(store.object_path(part)).unwrap();

    let dest = wd.join("restored");
    let run = walrs.run(&["backup-fetch", path_str(&dest), "LATEST"]);
    run.expect_code(code::CORRUPT, "backup-fetch of a WAL-G backup missing part_001");
    assert!(run.stderr.contains("part_001.tar"), "the error does not name part_001: {run:#?}");
    assert!(!dest.exists(), "the refused restore created {}", dest.display());

    let run = walrs.run(&["backup-verify", "LATEST", "--json"]);
    run.expect_code(code::CORRUPT, "backup-verify of a WAL-G backup missing part_001");
    let report = json_of(&run);
    assert_eq!(report["ok"], false, "{report:#}");
    let problems = report["problems"].as_array().expect("problems");
    assert!(
        problems.iter().any(|p| p["object"].as_str().is_some_and(|o| o.ends_with("tar_partitions/part_001.tar"))),
        "no problem names part_001: {report:#}"
    );
}

/// Encryption required (a key file, plaintext not allowed) and a plaintext backup: the
/// keys refuse it, exit 14 with wal-fetch's explanation, at once and without retries, in
/// backup-fetch and backup-verify alike.
#[test]
fn walg_backup_refused_by_the_keys_is_a_key_error() {
    let wd = WorkDir::new("bk-walg-key");
    let keys = wd.join("keys");
    fs::write(&keys, "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90\n").unwrap();
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o600)).unwrap();
    let store = walg_fixture_copy(&wd).with("WALRS_ENCRYPTION_KEY_FILE", path_str(&keys));
    let walrs = WalRs::new(&wd, &store);

    let run = walrs.run(&["backup-fetch", path_str(&wd.join("restored")), "LATEST"]);
    run.expect_code(code::KEY, "backup-fetch of a plaintext backup with encryption required");
    assert!(run.stderr.contains("encryption_allow_plaintext"), "no hint: {run:#?}");
    assert!(!run.logged("attempt", "1"), "the refusal was retried: {run:#?}");

    let run = walrs.run(&["backup-verify", "LATEST"]);
    run.expect_code(code::KEY, "backup-verify of a plaintext backup with encryption required");
    assert!(run.stderr.contains("encryption_allow_plaintext"), "no hint: {run:#?}");
}
