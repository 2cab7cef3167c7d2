//! The core promise, on both stores: what a primary archives through `wal-rs wal-push`, a
//! copy restored from an early base backup gets back through `wal-rs wal-fetch`, to the
//! same table contents.

use std::time::Duration;

use crate::harness::pg::{PgCluster, Rows};
use crate::harness::s3::S3Server;
use crate::harness::{lz4_cli_decompress, read, StoreEnv, WalRs, WorkDir, SEG_SIZE};

/// Segments the primary completes after the base backup, at the least.
const ROUNDS: u32 = 32;

#[test]
fn local_store_archives_and_a_copy_recovers_to_the_same_tables() {
    let wd = WorkDir::new("core-local");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    archive_and_recover(&wd, &store);
}

#[test]
fn s3_store_archives_and_a_copy_recovers_to_the_same_tables() {
    let wd = WorkDir::new("core-s3");
    let s3 = S3Server::start(&wd);
    let store = s3.store("clusters/main");
    archive_and_recover(&wd, &store);
}

fn archive_and_recover(wd: &WorkDir, store: &StoreEnv) {
    let primary = PgCluster::archiving(wd, "primary", store);
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.query("create table t (id int primary key, payload text not null)");

    // The backup comes early: most of what follows reaches the copy only through the archive.
    let backup = primary.base_backup("backup");
    primary.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "1000"]);
    for round in 0..ROUNDS {
        let (from, to) = (round * 1000 + 1, (round + 1) * 1000);
        primary.query(&format!("insert into t select g, md5(g::text) from generate_series({from}, {to}) g"));
        primary.query("select pg_switch_wal()");
    }
    primary.query("update pgbench_accounts set abalance = abalance + 7 where aid % 97 = 0");
    let expected = checksums(&primary);
    assert_eq!(expected[0][1].as_deref(), Some("200000"), "pgbench_accounts rows: {expected:?}");
    assert_eq!(expected[4][1].as_deref(), Some(&*(ROUNDS * 1000).to_string()), "t rows: {expected:?}");
    // The last writes are in the segment this switch completes.
    let last = primary.switch_wal_and_wait_archived();

    // What the primary and the store say was archived.
    let stats = primary.query("select archived_count, failed_count, last_archived_wal from pg_stat_archiver");
    let archived: u32 = stats[0][0].as_deref().unwrap().parse().unwrap();
    assert!(archived >= ROUNDS, "archived_count {archived}");
    assert_eq!(stats[0][1].as_deref(), Some("0"), "failed_count: {stats:?}");
    let objects = store.wal_objects();
    let segments: Vec<u64> = objects
        .iter()
        .filter_map(|o| o.strip_suffix(".lz4"))
        .filter(|n| n.len() == 24 && n.starts_with("00000001"))
        .map(|n| u64::from_str_radix(&n[8..16], 16).unwrap() * 256 + u64::from_str_radix(&n[16..24], 16).unwrap())
        .collect();
    assert!(segments.len() >= ROUNDS as usize, "only {} segments in {}: {objects:?}", segments.len(), store.url);
    assert!(segments.windows(2).all(|w| w[1] == w[0] + 1), "a gap in the archived segments: {objects:?}");
    assert!(objects.contains(&format!("{last}.lz4")), "{last} archived but not in {}: {objects:?}", store.url);

    // The stored object is a standard lz4 frame (the trailer is a skippable frame): the
    // lz4 tool and wal-fetch both give back the segment PostgreSQL wrote, byte for byte.
    let original = read(&primary.data.join("pg_wal").join(&last));
    assert_eq!(original.len(), SEG_SIZE);
    assert!(lz4_cli_decompress(&store.wal_object(&last)) == original, "lz4 -d of {last} differs from pg_wal/{last}");
    let fetched = wd.dir("fetched").join(&last);
    let run = WalRs::new(wd, store).fetch(&last, &fetched);
    run.expect_code(0, "wal-fetch of an archived segment");
    assert!(run.logged("verified", "sha256"), "{run:#?}");
    assert!(read(&fetched) == original, "wal-fetch of {last} differs from pg_wal/{last}");
    primary.stop();

    let copy = PgCluster::from_backup(wd, "copy", &backup);
    copy.set(&[("archive_mode", "off")]);
    copy.recover_from(store);
    copy.start();
    copy.wait_recovery_done(Duration::from_secs(180));
    assert_eq!(checksums(&copy), expected, "the recovered copy differs from the primary");
    // It replayed to the end of the archive, then started a timeline of its own.
    let current = copy.current_wal_file();
    assert!(current.starts_with("00000002"), "the copy is writing {current}");
}

/// Row count, a sum and an md5 over every row in key order, for each table pgbench and the
/// test write.
fn checksums(c: &PgCluster) -> Rows {
    c.query(
        "select * from (select 'pgbench_accounts', count(*), sum(abalance), \
                md5(string_agg(aid || ':' || bid || ':' || abalance, ',' order by aid)) from pgbench_accounts \
         union all select 'pgbench_branches', count(*), sum(bbalance), \
                md5(string_agg(bid || ':' || bbalance, ',' order by bid)) from pgbench_branches \
         union all select 'pgbench_tellers', count(*), sum(tbalance), \
                md5(string_agg(tid || ':' || bid || ':' || tbalance, ',' order by tid)) from pgbench_tellers \
         union all select 'pgbench_history', count(*), sum(delta), \
                md5(string_agg(tid || ':' || bid || ':' || aid || ':' || delta || ':' || mtime, ',' \
                               order by mtime, tid, bid, aid, delta)) from pgbench_history \
         union all select 't', count(*), sum(id), md5(string_agg(id || ':' || payload, ',' order by id)) from t) s \
         order by 1",
    )
}
