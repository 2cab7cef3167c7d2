//! kill -9 at random moments (seeded: the seed is printed, `WALRS_SOAK_SEED` replays it).
//!
//! `crash_wal_push`: 100 trials, alternately on a local store and on S3 (through the proxy,
//! with no faults and a small delay, so a kill lands mid-request); every fourth trial's
//! segments are incompressible, so S3 uploads are multipart. Each trial pushes one segment
//! of a pg_wal holding two more ready ones (pushed ahead in the same process). After the
//! kill, every object in the store must wal-fetch to exactly its source bytes; then the
//! three pushes are rerun and must all succeed with the right content.
//!
//! `crash_backups`: 10 kills of backup-push, then 10 of backup-fetch, of a live primary.
//! After each, every backup backup-list shows restores and verifies, a rerun succeeds, a
//! half-restored folder has no pg_control and `pg_ctl start` refuses it, a rerun of
//! backup-fetch into that folder clears it and restores, and one into a finished restore is
//! refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{hidden_files, seed, write_results, Proxy, Rng};
use crate::harness::pg::{as_postgres, PgCluster, Rows};
use crate::harness::s3::S3Server;
use crate::harness::{
    craft_incompressible_segment, craft_segment, files_under, read, segment_name, StoreEnv, WalRs, WorkDir,
};

const SYSID: u64 = 7_300_000_000_000_000_601;

fn scale() -> u64 {
    std::env::var("WALRS_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// Waits `ms` milliseconds (the random moment), then SIGKILLs `child` if it still runs.
/// Returns whether the kill interrupted it (false: it had already exited, with its status).
fn kill_after(child: &mut Child, ms: u64) -> (bool, Option<i32>) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (false, status.code());
        }
        std::thread::sleep(Duration::from_millis(1).min(until.saturating_duration_since(Instant::now())));
    }
    if let Some(status) = child.try_wait().expect("try_wait") {
        return (false, status.code());
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reaping");
    match status.signal() {
        Some(9) => (true, None),
        _ => (false, status.code()),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A pg_wal with segments `first..first+3` and their .ready files.
fn pg_wal_with_three(wd: &WorkDir, tag: &str, first: u64, incompressible: bool) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let pg_wal = wd.dir(&format!("{tag}/pg_wal"));
    let status = wd.dir(&format!("{tag}/pg_wal/archive_status"));
    let mut segs = Vec::new();
    for segno in first..first + 3 {
        let name = segment_name(1, segno);
        let bytes = if incompressible {
            craft_incompressible_segment(1, segno, SYSID, segno)
        } else {
            craft_segment(1, segno, SYSID, segno)
        };
        fs::write(pg_wal.join(&name), &bytes).unwrap();
        fs::write(status.join(format!("{name}.ready")), b"").unwrap();
        segs.push((name, bytes));
    }
    (pg_wal, segs)
}

/// Every object under wal_005 of `store` whose name is one of `segs` must wal-fetch to its
/// bytes; objects of other names must be in `known`. Returns the bytes verified.
fn check_wal_store(
    wd: &WorkDir,
    walrs: &WalRs,
    store: &StoreEnv,
    segs: &[(String, Vec<u8>)],
    known: &BTreeSet<String>,
) -> u64 {
    let mut verified = 0;
    let dest = wd.dir("fetched").join("RECOVERYXLOG");
    for object in store.wal_objects() {
        let name = object.trim_end_matches(".lz4").to_string();
        if let Some((_, bytes)) = segs.iter().find(|(n, _)| *n == name) {
            walrs.fetch(&name, &dest).expect_code(0, &format!("wal-fetch of {name}, stored by a killed wal-push"));
            assert!(read(&dest) == *bytes, "{name}: the stored object is not the segment");
            verified += bytes.len() as u64;
            let _ = fs::remove_file(&dest);
        } else {
            assert!(known.contains(&name), "an unexpected object {object} appeared");
        }
    }
    verified
}

#[test]
fn crash_wal_push() {
    let scenario = "crash_wal_push";
    let seed = seed(scenario);
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let wd = WorkDir::new("soak-crash-wal");
    let s3 = S3Server::start(&wd);
    let proxy = Proxy::start(&s3, seed, &["--delay-ms", "5"]);
    let local = StoreEnv::local(&wd.dir("local-store"));
    let via_proxy = proxy.store(&s3, "crash");
    let direct = s3.store("crash");
    let walrs_of = |store: &StoreEnv| {
        WalRs::new(&wd, store)
            .env("WALRS_PREFETCH_COUNT", "0")
            .env("WALRS_S3_PART_SIZE_MIB", "5")
            .env("WALRS_RETRY_DEADLINE_SECS", "60")
    };
    // Calibration: how long a whole push of three incompressible segments takes, per store.
    let mut window = BTreeMap::new();
    let mut next = 16u64;
    let mut known: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (kind, store) in [("local", &local), ("s3", &via_proxy)] {
        let (pg_wal, segs) = pg_wal_with_three(&wd, &format!("calibrate-{kind}"), next, true);
        next += 3;
        let t = Instant::now();
        walrs_of(store).push(&pg_wal.join(&segs[0].0)).expect_code(0, "calibration push");
        window.insert(kind, (t.elapsed().as_millis() as u64 * 12 / 10).max(50));
        known.entry(kind).or_default().extend(segs.iter().map(|(n, _)| n.clone()));
    }
    eprintln!("soak {scenario}: kill windows {window:?} ms");

    let trials = 100 * scale();
    let (mut interrupted, mut finished, mut bytes_verified, mut reruns) = (0u64, 0u64, 0u64, 0u64);
    let mut objects_after_kill = 0u64;
    for trial in 0..trials {
        let kind = if trial % 2 == 0 { "local" } else { "s3" };
        let (store, check_store) = if kind == "local" { (&local, &local) } else { (&via_proxy, &direct) };
        let incompressible = trial % 4 >= 2;
        let tag = format!("t{trial}");
        let (pg_wal, segs) = pg_wal_with_three(&wd, &tag, next, incompressible);
        next += 3;
        let walrs = walrs_of(store);
        let log = wd.join(&format!("{tag}/wal-push.log"));
        let mut child = walrs.spawn(&["wal-push", p(&pg_wal.join(&segs[0].0))], &log);
        let moment = rng.below(window[kind]);
        let (killed, code) = kill_after(&mut child, moment);
        if killed {
            interrupted += 1;
        } else {
            finished += 1;
            assert_eq!(
                code,
                Some(0),
                "trial {trial}: wal-push ended by itself but failed: {}",
                fs::read_to_string(&log).unwrap()
            );
        }
        // The store: nothing partial visible, every object whole.
        let check = walrs_of(check_store);
        let before = known[kind].len();
        let verified = check_wal_store(&wd, &check, check_store, &segs, &known[kind]);
        objects_after_kill += check_store.wal_objects().len() as u64 - before as u64;
        bytes_verified += verified;
        // The rerun, as PostgreSQL retries: every segment pushed, and right.
        for (name, bytes) in &segs {
            walrs
                .push(&pg_wal.join(name))
                .expect_code(0, &format!("trial {trial} ({kind}, seed {seed}): rerun of {name}"));
            reruns += 1;
            let dest = wd.dir("fetched").join("RECOVERYXLOG");
            check.fetch(name, &dest).expect_code(0, "fetch after the rerun");
            assert!(read(&dest) == *bytes, "trial {trial}: {name} came back different after the rerun");
            bytes_verified += bytes.len() as u64;
            let _ = fs::remove_file(&dest);
        }
        known.get_mut(kind).unwrap().extend(segs.iter().map(|(n, _)| n.clone()));
        let _ = fs::remove_dir_all(wd.join(&tag));
    }
    let temp_left = hidden_files(&local.objects_root).len();
    write_results(
        scenario,
        seed,
        started,
        json!({
            "trials": trials,
            "killed_mid_push": interrupted,
            "finished_before_kill": finished,
            "objects_checked_after_kill": objects_after_kill,
            "reruns": reruns,
            "segments_archived": known.values().map(|s| s.len()).sum::<usize>(),
            "bytes_verified": bytes_verified,
            "hidden_temp_files_left_local": temp_left,
            "kill_window_ms": window,
            "failures": 0,
        }),
    );
}

// --- backups ---------------------------------------------------------------------------------

fn walrs_for(wd: &WorkDir, store: &StoreEnv, c: &PgCluster) -> WalRs {
    crate::harness::walrs_for(wd, store, c)
        .env("WALRS_BACKUP_PARTITION_SIZE_MIB", "4")
        .env("WALRS_RETRY_DEADLINE_SECS", "60")
}

fn listed(walrs: &WalRs) -> Vec<String> {
    let run = walrs.run(&["backup-list", "--json"]);
    run.expect_code(0, "backup-list");
    let rows: Value = serde_json::from_str(&run.stdout).expect("backup-list json");
    rows.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect()
}

/// backup-fetch NAME into `dest`, which must succeed and hold pg_control; returns the files.
fn fetch_ok(walrs: &WalRs, dest: &Path, name: &str, what: &str) -> usize {
    walrs.run(&["backup-fetch", p(dest), name]).expect_code(0, what);
    assert!(dest.join("global/pg_control").exists(), "{what}: no pg_control");
    files_under(dest).len()
}

fn remove(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}

fn pgbench_sums(c: &PgCluster) -> Rows {
    c.query(
        "select 'accounts', count(*), sum(abalance) from pgbench_accounts \
         union all select 'history', count(*), sum(delta) from pgbench_history",
    )
}

#[test]
fn crash_backups() {
    let seed = seed("crash_backups");
    let mut rng = Rng::new(seed);
    let wd = WorkDir::new("soak-crash-bk");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.pgbench(&["-i", "-s", "4", "-q"]);
    let walrs = walrs_for(&wd, &store, &primary);

    // --- backup-push ---
    let started = Instant::now();
    let t = Instant::now();
    let run = walrs.run(&["backup-push", "--fast", p(&primary.data)]);
    run.expect_code(0, "the first backup-push");
    let push_window = t.elapsed().as_millis() as u64 * 12 / 10;
    let mut verified: BTreeSet<String> = BTreeSet::new();
    let first = listed(&walrs);
    assert_eq!(first.len(), 1);
    let t = Instant::now();
    fetch_ok(&walrs, &wd.join("verify-first"), &first[0], "restore of the first backup");
    let fetch_window = t.elapsed().as_millis() as u64 * 12 / 10;
    remove(&wd.join("verify-first"));
    verified.insert(first[0].clone());
    eprintln!("soak crash_backups: windows push {push_window} ms, fetch {fetch_window} ms");

    let trials = 10 * scale();
    let (mut interrupted, mut restores_verified, mut files_verified) = (0u64, 1u64, 0usize);
    for trial in 0..trials {
        primary.pgbench(&["-n", "-t", "100"]);
        let log = wd.join(&format!("push-{trial}.log"));
        let mut child = walrs.spawn(&["backup-push", "--fast", p(&primary.data)], &log);
        let (killed, code) = kill_after(&mut child, rng.below(push_window));
        if killed {
            interrupted += 1;
        } else {
            assert_eq!(code, Some(0), "backup-push {trial} failed by itself: {}", fs::read_to_string(&log).unwrap());
        }
        // Whatever is listed restores and verifies.
        for name in listed(&walrs) {
            if verified.insert(name.clone()) {
                let dest = wd.join(&format!("verify-{trial}"));
                files_verified +=
                    fetch_ok(&walrs, &dest, &name, &format!("restore of {name}, listed after kill {trial}"));
                restores_verified += 1;
                remove(&dest);
            }
        }
        // The rerun succeeds, and its backup restores.
        let again = walrs.run(&["backup-push", "--fast", p(&primary.data)]);
        again.expect_code(0, &format!("backup-push rerun after kill {trial} (seed {seed})"));
        let names = listed(&walrs);
        let new: Vec<_> = names.iter().filter(|n| !verified.contains(*n)).cloned().collect();
        assert_eq!(new.len(), 1, "after the rerun: {names:?}");
        let dest = wd.join(&format!("verify-rerun-{trial}"));
        files_verified += fetch_ok(&walrs, &dest, &new[0], "restore of the rerun's backup");
        restores_verified += 1;
        remove(&dest);
        verified.insert(new[0].clone());
    }
    let sentinels = files_under(&store.object_path("basebackups_005"))
        .iter()
        .filter(|p| p.to_string_lossy().ends_with("_backup_stop_sentinel.json"))
        .count();
    let backup_dirs = fs::read_dir(store.object_path("basebackups_005"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .count();
    write_results(
        "crash_backup_push",
        seed,
        started,
        json!({
            "trials": trials,
            "killed_mid_push": interrupted,
            "finished_before_kill": trials - interrupted,
            "backups_listed": verified.len(),
            "restores_verified": restores_verified,
            "files_verified": files_verified,
            "unlisted_partial_backups_left": backup_dirs - sentinels,
            "kill_window_ms": push_window,
            "failures": 0,
        }),
    );

    // --- backup-fetch ---
    let started = Instant::now();
    let latest = listed(&walrs).last().unwrap().clone();
    let (mut interrupted, mut start_refused, mut refused_rerun, mut files_verified) = (0u64, 0u64, 0u64, 0usize);
    let mut resumed_in_place = 0u64;
    let mut last_dest = PathBuf::new();
    for trial in 0..trials {
        let dest = wd.join(&format!("restore-{trial}"));
        let log = wd.join(&format!("fetch-{trial}.log"));
        let mut child = walrs.spawn(&["backup-fetch", p(&dest), &latest], &log);
        let (killed, code) = kill_after(&mut child, rng.below(fetch_window));
        if killed {
            interrupted += 1;
            assert!(!dest.join("global/pg_control").exists(), "kill {trial}: a half-restored folder has pg_control");
            if dest.join("PG_VERSION").exists() {
                // The folder a DBA might try to start: PostgreSQL must refuse it.
                let out = as_postgres("pg_ctl")
                    .arg("-D")
                    .arg(&dest)
                    .arg("-l")
                    .arg(wd.join(&format!("start-{trial}.log")))
                    .args(["-w", "-t", "30", "start"])
                    .output()
                    .unwrap();
                if out.status.success() {
                    let _ = as_postgres("pg_ctl").arg("-D").arg(&dest).args(["-m", "immediate", "stop"]).output();
                    panic!("kill {trial}: PostgreSQL started a half-restored folder");
                }
                start_refused += 1;
            }
            // A rerun into the same, half-restored folder clears it and restores.
            if dest.exists() && fs::read_dir(&dest).unwrap().next().is_some() {
                resumed_in_place += 1;
            }
        } else {
            assert_eq!(code, Some(0), "backup-fetch {trial} failed by itself: {}", fs::read_to_string(&log).unwrap());
            remove(&dest);
        }
        files_verified +=
            fetch_ok(&walrs, &dest, &latest, &format!("backup-fetch rerun after kill {trial} (seed {seed})"));
        assert!(!dest.join(".walrs-restore-incomplete").exists(), "a finished restore kept its marker");
        // A finished restore is a cluster: a rerun into it is refused, naming it.
        let run = walrs.run(&["backup-fetch", p(&dest), &latest]);
        run.expect_code(4, "backup-fetch into a restored folder");
        assert!(run.stderr.contains(p(&dest)), "{run:#?}");
        refused_rerun += 1;
        if trial + 1 < trials {
            remove(&dest);
        }
        last_dest = dest;
    }
    // The last restore recovers to the primary's data.
    let expected = {
        primary.switch_wal_and_wait_archived();
        pgbench_sums(&primary)
    };
    primary.stop();
    let name = last_dest.file_name().unwrap().to_str().unwrap().to_string();
    let copy = PgCluster::adopt(&wd, &name);
    copy.set(&[("archive_mode", "off")]);
    copy.start();
    copy.wait_recovery_done(Duration::from_secs(300));
    assert_eq!(pgbench_sums(&copy), expected, "the restored copy differs from the primary");
    copy.stop();
    write_results(
        "crash_backup_fetch",
        seed,
        started,
        json!({
            "trials": trials,
            "killed_mid_restore": interrupted,
            "finished_before_kill": trials - interrupted,
            "start_refused": start_refused,
            "reruns_into_the_half_restored_folder": resumed_in_place,
            "rerun_into_a_restored_folder_refused": refused_rerun,
            "reruns_succeeded": trials,
            "files_verified": files_verified,
            "kill_window_ms": fetch_window,
            "failures": 0,
        }),
    );
}
