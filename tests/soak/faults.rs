//! Archiving and recovery through injected faults.
//!
//! `faults_archive_300_segments`: a live primary archives 300 switched segments (and some
//! full ones) through the fault proxy at a 10% mix of 500, 503 SlowDown, connection resets
//! and truncated responses. archive_command is wal-push wrapped by a check that runs the
//! moment wal-push says "archived": the object must be in the store and decompress to the
//! very bytes in pg_wal, else the segment is recorded as a violation. Then a copy restored
//! from a base backup taken before the load replays the archive, still through the faults,
//! to the primary's last LSN and table checksums.
//!
//! `faults_pitr`: point-in-time restores through faults injected into wal-fetch's GETs stop
//! exactly at their target: the recovered cluster holds exactly the rows committed before it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{add_injected, kinds_in_mix, kinds_never_injected, seed, write_results, Proxy, Rng};
use crate::harness::pg::PgCluster;
use crate::harness::s3::S3Server;
use crate::harness::{free_port, segment_name, wait_until, StoreEnv, WorkDir};

/// The fault mix: 2.5% each, 10% of all requests.
const MIX: &[&str] =
    &["--rate-500", "0.025", "--rate-503", "0.025", "--rate-reset", "0.025", "--rate-truncate", "0.025"];

fn scale() -> u64 {
    std::env::var("WALRS_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// `K=V ...` of a store's environment, for a shell script.
fn env_words(store: &StoreEnv) -> String {
    store.vars.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn t_sum(c: &PgCluster, filter: &str) -> String {
    c.one(&format!(
        "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || payload, ',' order by id)), '-') from t {filter}"
    ))
}

fn last_archived(c: &PgCluster) -> String {
    c.try_query("select coalesce(last_archived_wal, '') from pg_stat_archiver")
        .ok()
        .and_then(|r| r.first().and_then(|row| row[0].clone()))
        .unwrap_or_default()
}

#[test]
fn faults_archive_300_segments() {
    let scenario = "faults_archive_300_segments";
    let seed = seed(scenario);
    let started = Instant::now();
    let wd = WorkDir::new("soak-faults");
    let s3 = S3Server::start(&wd);
    let proxy = Proxy::start(&s3, seed, MIX);
    let faulty = proxy.store(&s3, "soak");
    let direct = s3.store("soak");

    // archive_command: wal-push through the faults, then the check at the moment of "archived".
    let checks = wd.pg_dir("checks");
    let script = wd.join("bin/archive.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             env {env} {walrs} wal-push \"$1\" || exit $?\n\
             obj={root}/wal_005/\"$2\".lz4\n\
             if [ -f \"$obj\" ] && lz4 -dc \"$obj\" 2>/dev/null | cmp -s - \"$1\"; then\n\
               echo \"$2 $(stat -c %s \"$1\")\" >> {checks}/acked\n\
             else\n\
               echo \"$2\" >> {checks}/violations\n\
             fi\n\
             exit 0\n",
            env = env_words(&faulty),
            walrs = wd.walrs().display(),
            root = direct.objects_root.display(),
            checks = checks.display(),
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();

    let primary = PgCluster::init(&wd, "primary");
    primary.set(&[
        ("archive_mode", "on"),
        ("archive_command", &format!("{} %p %f", script.display())),
        ("max_wal_size", "512MB"),
        ("min_wal_size", "80MB"),
    ]);
    primary.start();
    primary.query("create table t (id bigint primary key, payload text not null)");
    let backup = primary.base_backup("backup");

    let rounds = 300 * scale();
    let mut next_id = 1u64;
    for round in 0..rounds {
        // Every 25th round fills more than a segment; the others leave a mostly empty one.
        let rows = if round % 25 == 24 { 60_000 } else { 100 };
        primary.query(&format!(
            "insert into t select g, md5(g::text) || repeat('x', 40) from generate_series({next_id}, {}) g",
            next_id + rows - 1
        ));
        next_id += rows;
        primary.query("select pg_switch_wal()");
    }
    let expected = t_sum(&primary, "");
    let last = primary.one("select pg_walfile_name(pg_switch_wal())");
    let final_lsn = primary.one("select pg_current_wal_lsn()");
    wait_until("the primary to archive everything", Duration::from_secs(900), || {
        let l = last_archived(&primary);
        l.len() >= 24 && l[..24] >= *last
    });
    let archiver = primary.query("select archived_count, failed_count from pg_stat_archiver");
    let archive_faults = proxy.clear();
    primary.stop();

    // PostgreSQL was never told "archived" for a segment that was not stored whole.
    let violations = fs::read_to_string(checks.join("violations")).unwrap_or_default();
    assert!(violations.is_empty(), "archive_command said archived, but the store did not hold:\n{violations}");
    let acked_text = fs::read_to_string(checks.join("acked")).unwrap_or_default();
    let acked: BTreeMap<String, u64> = acked_text
        .lines()
        .map(|l| {
            let (n, s) = l.split_once(' ').unwrap();
            (n.to_string(), s.parse().unwrap())
        })
        .collect();
    // Every segment is stored exactly once: one object per name, no temporary leftovers.
    let objects = direct.wal_objects();
    let mut by_name: BTreeMap<String, u32> = BTreeMap::new();
    for o in &objects {
        let base = o.trim_end_matches(".lz4").trim_end_matches(".zst");
        *by_name.entry(base.to_string()).or_default() += 1;
    }
    let twice: Vec<_> = by_name.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "names stored more than once: {twice:?}");
    let hidden = crate::common::hidden_files(&direct.objects_root);
    assert!(hidden.is_empty(), "temporary objects left visible in the bucket folder: {hidden:?}");
    let missing: Vec<_> = acked.keys().filter(|n| !by_name.contains_key(*n)).collect();
    assert!(missing.is_empty(), "acknowledged but not stored: {missing:?}");
    let segments: BTreeSet<&String> = by_name.keys().filter(|n| n.len() == 24).collect();
    let segno =
        |n: &str| u64::from_str_radix(&n[8..16], 16).unwrap() * 256 + u64::from_str_radix(&n[16..24], 16).unwrap();
    let first = segno(segments.iter().next().unwrap());
    let gaps: Vec<String> =
        (first..=segno(&last)).map(|n| segment_name(1, n)).filter(|n| !segments.contains(n)).collect();
    assert!(gaps.is_empty(), "segments missing from the store: {gaps:?}");
    assert!(segments.len() as u64 >= rounds, "only {} segments stored", segments.len());

    // The copy replays the archive through the same faults to the last LSN.
    proxy.clear();
    let copy = PgCluster::from_backup(&wd, "copy", &backup);
    copy.set(&[("archive_mode", "off")]);
    copy.recover_from(&faulty);
    copy.start();
    copy.wait_recovery_done(Duration::from_secs(900));
    let reached = copy.one(&format!("select pg_current_wal_lsn() >= '{final_lsn}'::pg_lsn"));
    assert_eq!(reached, "t", "the copy promoted before the primary's last LSN {final_lsn}");
    assert_eq!(t_sum(&copy, ""), expected, "the copy's table differs from the primary's");
    let restore_faults = proxy.clear();
    copy.stop();

    // The proxy counts every kind it knows; only those of the mix are injected here.
    let mix = kinds_in_mix(MIX);
    let mut injected = BTreeMap::new();
    add_injected(&mut injected, &archive_faults);
    injected.retain(|kind, _| mix.contains(kind));
    let mut injected_restore = BTreeMap::new();
    add_injected(&mut injected_restore, &restore_faults);
    injected_restore.retain(|kind, _| mix.contains(kind));
    let never = kinds_never_injected(MIX, &injected);
    assert!(never.is_empty(), "fault kinds {never:?} of the mix were never injected while archiving: {injected:?}");
    let segments_total = segments.len();
    write_results(
        scenario,
        seed,
        started,
        json!({
            "trials": 1,
            "segments_archived": segments_total,
            "objects_stored": objects.len(),
            "acknowledged": acked.len(),
            "bytes_verified": acked.values().sum::<u64>(),
            "requests_archiving": archive_faults["requests"],
            "faults_injected_archiving": injected,
            "requests_restoring": restore_faults["requests"],
            "faults_injected_restoring": injected_restore,
            "archiver_failed_count": archiver[0][1],
            "rows": next_id - 1,
            "failures": 0,
        }),
    );
}

#[test]
fn faults_pitr() {
    let scenario = "faults_pitr";
    let seed = seed(scenario);
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let wd = WorkDir::new("soak-pitr");
    let s3 = S3Server::start(&wd);
    // 20% of wal-fetch's GETs fail: 5% of each kind.
    let proxy = Proxy::start(
        &s3,
        seed,
        &[
            "--rate-500",
            "0.05",
            "--rate-503",
            "0.05",
            "--rate-reset",
            "0.05",
            "--rate-truncate",
            "0.05",
            "--only",
            "GET ",
        ],
    );
    let direct = s3.store("pitr");
    let faulty = proxy.store(&s3, "pitr");
    let primary = PgCluster::archiving(&wd, "primary", &direct);
    primary.query("create table t (id bigint primary key, batch int not null, payload text not null)");
    let backup = primary.base_backup("backup");
    let batches = 40u64;
    let per = 500u64;
    let mut lsn_after = Vec::new();
    for b in 1..=batches {
        primary.query(&format!(
            "insert into t select g, {b}, md5(g::text) from generate_series({}, {}) g",
            (b - 1) * per + 1,
            b * per
        ));
        lsn_after.push(primary.one("select pg_current_wal_insert_lsn()"));
        if b % 2 == 0 {
            primary.query("select pg_switch_wal()");
        }
    }
    primary.switch_wal_and_wait_archived();
    let trials = 3 * scale();
    let mut injected = BTreeMap::new();
    let mut rows_checked = 0u64;
    let mut requests = 0u64;
    for trial in 0..trials {
        let k = 5 + rng.below(batches - 10);
        let expected = primary.one(&format!(
            "select count(*) || ' ' || md5(string_agg(id || ':' || payload, ',' order by id)) from t where batch <= {k}"
        ));
        let name = format!("copy{trial}");
        let copy = PgCluster::from_backup(&wd, &name, &backup);
        copy.set(&[
            ("archive_mode", "off"),
            ("recovery_target_lsn", &lsn_after[k as usize - 1]),
            ("recovery_target_action", "promote"),
        ]);
        copy.recover_from(&faulty);
        copy.start();
        copy.wait_recovery_done(Duration::from_secs(600));
        let got = copy.one("select count(*) || ' ' || md5(string_agg(id || ':' || payload, ',' order by id)) from t");
        assert_eq!(got, expected, "trial {trial}: the restore to batch {k} holds other rows");
        assert_eq!(copy.one("select max(batch) from t"), k.to_string(), "trial {trial}");
        rows_checked += k * per;
        copy.stop();
        let stats = proxy.clear();
        requests += stats["requests"].as_u64().unwrap_or(0);
        add_injected(&mut injected, &stats);
        let _ = fs::remove_dir_all(&copy.data);
    }
    primary.stop();
    assert!(injected.values().sum::<u64>() > 0, "no fault was injected: {injected:?}");
    write_results(
        scenario,
        seed,
        started,
        json!({
            "trials": trials,
            "get_requests": requests,
            "faults_injected": injected,
            "rows_verified": rows_checked,
            "failures": 0,
        }),
    );
}

/// Checks of this file's setup, in seconds.
mod checks {
    use super::*;

    /// The kinds of [`MIX`] are counters the proxy keeps, so the check that each was
    /// injected looks at real counters (a kind the proxy names otherwise would count as
    /// never injected).
    #[test]
    fn mix_kinds_are_proxy_counters() {
        let nothing_listens = free_port();
        let proxy = Proxy::start_to(nothing_listens, 1, MIX);
        let counters = proxy.stats()["injected"].as_object().cloned().expect("injected counters");
        let mix = kinds_in_mix(MIX);
        assert_eq!(mix, ["500", "503", "reset", "truncate"]);
        let unknown: Vec<_> = mix.iter().filter(|k| !counters.contains_key(*k)).collect();
        assert!(unknown.is_empty(), "the proxy keeps no counter {unknown:?}: it has {counters:?}");
    }
}
