//! A timeline switch: a copy restored from the archive is promoted (timeline 2) and keeps
//! archiving; a second recovery from the same base backup follows it onto timeline 2.
//!
//! Where the promoted copy archives: into the SAME store as the primary. That is what a
//! failover does with WAL-E/WAL-G-style archives, and it is coherent here: the copy has the
//! primary's system identifier (wal-rs's `walrs/cluster.json` accepts it), every file of
//! timeline 2 has a name of its own (`00000002...`, `00000002.history`), and a recovery
//! with `recovery_target_timeline = 'latest'` needs timeline 1 and timeline 2 from one
//! restore_command, which a single store gives. A fork into a prefix of its own would need
//! a restore_command that reads two stores, which wal-rs does not offer.

use std::time::Duration;

use crate::harness::pg::PgCluster;
use crate::harness::{lz4_cli_decompress, StoreEnv, WorkDir};

#[test]
fn a_second_recovery_follows_a_promoted_copy_onto_timeline_2() {
    let wd = WorkDir::new("timeline");
    let store = StoreEnv::local(&wd.pg_dir("store"));

    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.query("create table t (id int primary key, tli int not null, note text not null)");
    primary.query("insert into t select g, 1, 'before backup' from generate_series(1, 1000) g");
    let backup = primary.base_backup("backup");
    primary.query("insert into t select g, 1, 'after backup' from generate_series(1001, 2000) g");
    let last_on_1 = primary.switch_wal_and_wait_archived();
    assert!(last_on_1.starts_with("00000001"), "{last_on_1}");
    // The primary is lost; a copy restored from the archive takes over.
    primary.stop();

    let promoted = PgCluster::from_backup(&wd, "promoted", &backup);
    promoted.archive_to(&store);
    promoted.recover_from(&store);
    promoted.start();
    promoted.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(promoted.one("select count(*) || ' ' || sum(id) from t"), "2000 2001000");
    let current = promoted.current_wal_file();
    assert!(current.starts_with("00000002"), "the promoted copy writes {current}, not timeline 2");

    promoted.query("insert into t select g, 2, 'timeline 2' from generate_series(2001, 2500) g");
    promoted.query("update t set note = 'updated on timeline 2' where id % 10 = 0");
    let expected = table_checksum(&promoted);
    let last_on_2 = promoted.switch_wal_and_wait_archived();
    assert!(last_on_2.starts_with("00000002"), "{last_on_2}");
    assert_eq!(promoted.one("select failed_count from pg_stat_archiver"), "0");
    // PostgreSQL archives the history file before any segment of the new timeline.
    let history = String::from_utf8(lz4_cli_decompress(&store.wal_object("00000002.history"))).unwrap();
    assert!(history.starts_with("1\t"), "00000002.history does not branch from timeline 1: {history:?}");
    let objects = store.wal_objects();
    assert!(objects.contains(&format!("{last_on_2}.lz4")), "{objects:?}");
    promoted.stop();

    let follower = PgCluster::from_backup(&wd, "follower", &backup);
    follower.set(&[("archive_mode", "off"), ("recovery_target_timeline", "latest")]);
    follower.recover_from(&store);
    follower.start();
    follower.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(follower.one("select count(*) from t where tli = 2"), "500", "the timeline-2 rows");
    assert_eq!(follower.one("select count(*) from t where note = 'updated on timeline 2'"), "250");
    assert_eq!(table_checksum(&follower), expected, "the second recovery differs from the promoted copy");
    // It followed timeline 2 to its end, then chose timeline 3.
    let current = follower.current_wal_file();
    assert!(current.starts_with("00000003"), "the second recovery writes {current}");
}

fn table_checksum(c: &PgCluster) -> String {
    c.one("select count(*) || ' ' || sum(id) || ' ' || md5(string_agg(id || ':' || tli || ':' || note, ',' order by id)) from t")
}
