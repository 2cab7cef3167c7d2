//! Issue 5's safety checks on real clusters: client-side encryption end to end (every
//! stored WAL object, partition and manifest sealed, nothing readable in them, a restore
//! that reaches the primary's checksums, a wrong or missing key refused by id, tampered and
//! truncated objects refused with nothing written, and so is a sealed object copied over
//! another name in the store), `backup-verify` naming a damaged
//! partition and a missing WAL segment, and the restore drill passing on a good backup and
//! failing on a damaged one, staying inside its folder (tablespaces, a linked
//! postgresql.conf) on the primary's host, and passing on a backup taken with a prepared
//! transaction open (the primary's `max_prepared_transactions`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::harness::pg::PgCluster;
use crate::harness::s3::{S3Server, BUCKET};
use crate::harness::workdir::chown_postgres;
use crate::harness::{
    craft_segment, files_under, flip_middle_byte, json_of, path_str, read, segment_name, sha256_hex, walrs_for,
    write_file, StoreEnv, WalRs, WorkDir,
};

const KEY_A: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const KEY_B: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// Exit of wal-fetch outside a standby for a key failure (200 + 14) and for corruption.
const FETCH_KEY: i32 = 214;
const FETCH_CORRUPT: i32 = 210;

/// A key file readable by the postgres user (archive_command and restore_command run as it).
fn key_file(wd: &WorkDir, name: &str, keys: &[&str]) -> PathBuf {
    let path = wd.join(name);
    fs::write(&path, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).expect("writing a key file");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod key file");
    chown_postgres(&path);
    path
}

/// The id wal-rs shows for a key: the first 8 bytes of sha256("wal-rs key id v1\0" || key).
fn key_id(hex_key: &str) -> String {
    let mut bytes = b"wal-rs key id v1\0".to_vec();
    bytes.extend(hex::decode(hex_key).expect("hex key"));
    sha256_hex(&bytes)[..16].to_string()
}

/// The stored objects wal-rs must seal: WAL, partitions, manifests (not the readable
/// sentinels, metadata.json and walrs/ records).
fn sealed_objects(store: &StoreEnv) -> Vec<PathBuf> {
    let root = &store.objects_root;
    let mut out: Vec<PathBuf> = files_under(root)
        .into_iter()
        .filter(|rel| {
            let s = rel.to_string_lossy();
            let hidden = rel.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            !hidden
                && (s.starts_with("wal_005/") || s.contains("/tar_partitions/") || s.ends_with("walrs_manifest.json"))
        })
        .map(|rel| root.join(rel))
        .collect();
    out.sort();
    out
}

const ROWS: &str = "select count(*) || ':' || md5(string_agg(note, ',' order by id)) from secret";

#[test]
fn local_store_encrypted_archive_and_backup_round_trip() {
    let wd = WorkDir::new("enc-local");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    encrypted_round_trip(&wd, &store);
}

#[test]
fn s3_store_encrypted_archive_and_backup_round_trip() {
    let wd = WorkDir::new("enc-s3");
    let s3 = S3Server::start(&wd);
    encrypted_round_trip(&wd, &s3.store("clusters/enc"));
}

fn encrypted_round_trip(wd: &WorkDir, plain: &StoreEnv) {
    let keys = key_file(wd, "keys", &[KEY_A]);
    let store = plain.with("WALRS_ENCRYPTION_KEY_FILE", path_str(&keys));
    let primary = PgCluster::archiving(wd, "primary", &store);
    primary.query("create table secret (id int primary key, note text not null)");
    primary.query("insert into secret select g, 'TOPSECRET-' || g from generate_series(1, 5000) g");
    let walrs = walrs_for(wd, &store, &primary);
    walrs.run(&["backup-push", "--fast", "--json", path_str(&primary.data)]).expect_code(0, "encrypted backup-push");
    primary.query("insert into secret select g, 'TOPSECRET-after-' || g from generate_series(5001, 6000) g");
    let expected = primary.one(ROWS);
    primary.switch_wal_and_wait_archived();

    // Every WAL object, partition and manifest is sealed, and no row text shows through.
    let sealed = sealed_objects(&store);
    assert!(sealed.len() >= 5, "too few objects to check: {sealed:?}");
    for path in &sealed {
        let bytes = read(path);
        assert_eq!(&bytes[..8.min(bytes.len())], b"WALRSENC", "{} is not encrypted", path.display());
        assert!(!bytes.windows(9).any(|w| w == b"TOPSECRET"), "{} shows row text", path.display());
    }
    // Sentinels stay readable: listing needs no key.
    let listed = WalRs::new(wd, plain).run(&["backup-list", "--json"]);
    listed.expect_code(0, "backup-list without the key");
    assert_eq!(json_of(&listed).as_array().map(Vec::len), Some(1), "{listed:#?}");
    // The key never shows; its id does.
    let config = walrs.run(&["config"]);
    config.expect_code(0, "config");
    assert!(config.stdout.contains(&key_id(KEY_A)), "{config:#?}");
    assert!(!config.stdout.contains(KEY_A) && !config.stderr.contains(KEY_A), "the key was printed: {config:#?}");

    // A restore with the key reaches the primary's rows.
    let dest = wd.join("restored");
    let run = walrs.run(&["backup-fetch", path_str(&dest), "LATEST", "--json"]);
    run.expect_code(0, "encrypted backup-fetch");
    let copy = PgCluster::adopt(wd, "restored");
    copy.set(&[("archive_mode", "off")]);
    let server_env: Vec<(String, String)> = store
        .vars
        .iter()
        .filter(|(k, _)| {
            ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"].contains(&k.as_str())
        })
        .cloned()
        .collect();
    copy.start_with_env(&server_env);
    copy.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(copy.one(ROWS), expected, "the encrypted restore does not hold the primary's rows");
    copy.stop();

    // A wrong key and no key: refused by id, nothing written, no key printed.
    let segment = store.wal_objects().into_iter().find(|n| n.len() == 28 && n.ends_with(".lz4")).expect("a segment");
    let name = &segment[..24];
    let target = wd.join("fetched");
    let wrong = key_file(wd, "other-keys", &[KEY_B]);
    let run = WalRs::new(wd, &plain.with("WALRS_ENCRYPTION_KEY_FILE", path_str(&wrong))).fetch(name, &target);
    run.expect_code(FETCH_KEY, "wal-fetch with the wrong key");
    assert!(run.stderr.contains(&key_id(KEY_A)) && run.stderr.contains(&key_id(KEY_B)), "{run:#?}");
    assert!(!run.stderr.contains(KEY_A) && !run.stderr.contains(KEY_B), "a key was printed: {run:#?}");
    let run = WalRs::new(wd, plain).fetch(name, &target);
    run.expect_code(FETCH_KEY, "wal-fetch with no key");
    assert!(run.stderr.contains("WALRS_ENCRYPTION_KEY_FILE"), "{run:#?}");
    let run = WalRs::new(wd, &plain.with("WALRS_ENCRYPTION_KEY_FILE", path_str(&wrong))).run(&[
        "backup-fetch",
        path_str(&wd.join("wrong-key-restore")),
        "LATEST",
    ]);
    run.expect_code(14, "backup-fetch with the wrong key");
    assert!(!target.exists(), "a refused fetch wrote {}", target.display());

    // A push without the key, into a store a keyed push marked encrypted, is refused rather
    // than checked or stored in clear (here a segment already archived, which would
    // otherwise pass as "already archived").
    let again = wd.join("push-without-key");
    fs::create_dir_all(&again).unwrap();
    WalRs::new(wd, &store).fetch(name, &again.join(name)).expect_code(0, "wal-fetch with the key");
    let run = WalRs::new(wd, plain).run(&["wal-push", path_str(&again.join(name))]);
    run.expect_code(3, "wal-push without a key into an encrypted store");
    assert!(run.stderr.contains("no encryption key"), "{run:#?}");

    // Rotation: a new key first, the old one kept, opens the old objects.
    let rotated = key_file(wd, "rotated-keys", &[KEY_B, KEY_A]);
    let run = WalRs::new(wd, &plain.with("WALRS_ENCRYPTION_KEY_FILE", path_str(&rotated))).fetch(name, &target);
    run.expect_code(0, "wal-fetch after a key rotation");
    fs::remove_file(&target).unwrap();

    // Tampered and truncated ciphertext: refused as corrupt, nothing written.
    let object = store.wal_object(name);
    let original = read(&object);
    flip_middle_byte(&object);
    let run = WalRs::new(wd, &store).fetch(name, &target);
    run.expect_code(FETCH_CORRUPT, "wal-fetch of a tampered object");
    assert!(run.stderr.contains("authentication"), "{run:#?}");
    assert!(!target.exists(), "a tampered object was restored");
    fs::write(&object, &original[..original.len() - 1000]).unwrap();
    let run = WalRs::new(wd, &store).fetch(name, &target);
    run.expect_code(FETCH_CORRUPT, "wal-fetch of a truncated object");
    assert!(!target.exists(), "a truncated object was restored");
    fs::write(&object, &original).unwrap();
    WalRs::new(wd, &store).fetch(name, &target).expect_code(0, "wal-fetch of the repaired object");
}

#[test]
fn local_store_sealed_object_under_another_name_is_corrupt() {
    let wd = WorkDir::new("enc-rename-local");
    let store = StoreEnv::local(&wd.dir("store"));
    sealed_object_under_another_name_is_corrupt(&wd, &store, None);
}

#[test]
fn s3_store_sealed_object_under_another_name_is_corrupt() {
    let wd = WorkDir::new("enc-rename-s3");
    let s3 = S3Server::start(&wd);
    sealed_object_under_another_name_is_corrupt(&wd, &s3.store("clusters/rename"), Some((&s3, "clusters/rename")));
}

/// Copies the WAL object of `from` over that of `to` as the store's own copy does. s3s-fs
/// keeps each object's checksum beside it (`.bucket-<bucket>.object-<key>.internal.json`
/// in its data directory, names in unpadded URL-safe base64), and CopyObject carries the
/// checksum along: without it the SDK's checksum would catch the copy before wal-rs does.
fn copy_wal_object(store: &StoreEnv, s3: Option<(&S3Server, &str)>, from: &str, to: &str) {
    fs::copy(store.wal_object(from), store.wal_object(to)).expect("copying an object in the store");
    if let Some((server, prefix)) = s3 {
        use base64::Engine as _;
        let info = |name: &str| {
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let key = format!("{prefix}/wal_005/{name}.lz4");
            server.data.join(format!(".bucket-{}.object-{}.internal.json", b64(BUCKET), b64(&key)))
        };
        fs::copy(info(from), info(to)).expect("copying an object's checksum in s3s-fs");
    }
}

/// Whoever can write the bucket copies one sealed object over another's name: timeline 2's
/// history file over timeline 3's (recovery to 'latest' would follow the wrong branch), and
/// segment 3 of timeline 1 over segment 3 of timeline 2 (its page header names a lower
/// timeline, which the header check accepts). Each object is bound to its key, so the copy
/// fails authentication: corrupt (210, or 1 in a standby), nothing written. No cluster is
/// needed: the files are crafted.
fn sealed_object_under_another_name_is_corrupt(wd: &WorkDir, plain: &StoreEnv, s3: Option<(&S3Server, &str)>) {
    const SYSID: u64 = 7_300_000_000_000_000_001;
    let keys = key_file(wd, "keys", &[KEY_A]);
    let store = plain.with("WALRS_ENCRYPTION_KEY_FILE", path_str(&keys));
    let walrs = WalRs::new(wd, &store);
    let standby = wd.dir("standby");
    write_file(&standby, "standby.signal", b"");
    let history_2 = b"1\t0/5000000\tno recovery target specified\n".to_vec();
    let history_3 = [&history_2[..], b"2\t0/7000000\tno recovery target specified\n"].concat();
    let cases = [
        ("00000002.history".to_string(), history_2, "00000003.history".to_string(), history_3),
        (segment_name(1, 3), craft_segment(1, 3, SYSID, 1), segment_name(2, 3), craft_segment(2, 3, SYSID, 2)),
    ];
    for (i, (copied, copied_bytes, victim, victim_bytes)) in cases.iter().enumerate() {
        for (name, bytes) in [(copied, copied_bytes), (victim, victim_bytes)] {
            let path = write_file(&wd.dir(&format!("in-{i}-{name}")), name, bytes);
            walrs.push(&path).expect_code(0, &format!("encrypted wal-push of {name}"));
        }
        let target = wd.join(&format!("fetched-{i}"));
        walrs.fetch(victim, &target).expect_code(0, &format!("wal-fetch of {victim} before the copy"));
        assert_eq!(&read(&target), victim_bytes, "{victim} before the copy");
        fs::remove_file(&target).unwrap();

        copy_wal_object(&store, s3, copied, victim);
        let run = walrs.fetch(victim, &target);
        run.expect_code(FETCH_CORRUPT, &format!("wal-fetch of {victim} holding {copied}'s sealed object"));
        assert!(run.stderr.contains("authentication"), "{run:#?}");
        assert!(!target.exists(), "{copied}'s object was restored as {victim}");
        let run = walrs.clone().cwd(&standby).fetch(victim, &target);
        run.expect_code(1, &format!("the same wal-fetch of {victim} in a standby"));
        assert!(!target.exists(), "{copied}'s object was restored as {victim} in a standby");
        // The copied object itself still opens under its own name.
        walrs.fetch(copied, &target).expect_code(0, &format!("wal-fetch of {copied}"));
        assert_eq!(&read(&target), copied_bytes, "{copied}");
        fs::remove_file(&target).unwrap();
    }
}

/// A backup of a cluster configured the Debian way: `postgresql.conf` a link to a file
/// outside the data directory that names it (`data_directory`), and a tablespace outside it
/// too. The drill, on the primary's own host, works on its copy alone: it passes, leaves
/// nothing in its folder, and the live cluster's configuration, tablespace and server are
/// as they were.
#[test]
fn local_store_restore_drill_stays_inside_its_folder() {
    let wd = WorkDir::new("drill-inside");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    let ts_dir = wd.pg_dir("ts");
    primary.query(&format!("create tablespace ts1 location '{}'", ts_dir.display()));
    primary.query("create table tt (id int primary key) tablespace ts1");
    primary.query("insert into tt select generate_series(1, 1000)");
    let etc = wd.pg_dir("etc");
    let live_conf = etc.join("postgresql.conf");
    fs::rename(primary.data.join("postgresql.conf"), &live_conf).expect("moving postgresql.conf out");
    let mut conf_text = String::from_utf8(read(&live_conf)).unwrap();
    conf_text.push_str(&format!("data_directory = '{}'\n", primary.data.display()));
    fs::write(&live_conf, &conf_text).unwrap();
    std::os::unix::fs::symlink(&live_conf, primary.data.join("postgresql.conf")).unwrap();
    let walrs = walrs_for(&wd, &store, &primary);
    let pushed = walrs.run(&["backup-push", "--fast", "--json", path_str(&primary.data)]);
    pushed.expect_code(0, "backup-push");
    let backup = json_of(&pushed)["name"].as_str().expect("a name").to_string();
    let tablespace_files = files_under(&ts_dir);

    let drills = wd.pg_dir("drills");
    let as_root = WalRs::new(&wd, &store).env("PGUSER", "postgres");
    let run = as_root.run(&["backup-verify", &backup, "--restore-drill", "--drill-dir", path_str(&drills), "--json"]);
    run.expect_code(0, "restore drill of a backup with a linked postgresql.conf and a tablespace");
    let drill = json_of(&run);
    assert_eq!(drill["passed"], true, "{drill}");
    assert!(drill["tables"].as_u64().unwrap_or(0) >= 1, "the table in the tablespace was not found: {drill}");
    assert!(fs::read_dir(&drills).unwrap().next().is_none(), "the drill left its folder behind");
    assert_eq!(String::from_utf8(read(&live_conf)).unwrap(), conf_text, "the live configuration was changed");
    assert_eq!(files_under(&ts_dir), tablespace_files, "the live tablespace was written into");
    assert_eq!(primary.one("select pg_is_in_recovery()::text || ' ' || count(*) from tt"), "false 1000");
}

/// A primary using two-phase commit, with a transaction prepared and still open when the
/// backup is taken: recovery restores it into one of `max_prepared_transactions` slots, of
/// which PostgreSQL's default has none. The drill takes the primary's value from the
/// restored pg_control, rolls the transaction back in its copy (its table lock would block
/// the checks) and passes; the primary then commits the transaction.
#[test]
fn local_store_restore_drill_recovers_a_prepared_transaction() {
    let wd = WorkDir::new("drill-2pc");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::init(&wd, "primary");
    primary.set(&[("max_prepared_transactions", "5")]);
    primary.archive_to(&store);
    primary.start();
    primary.query("create table ledger (id int primary key)");
    primary.query("insert into ledger select generate_series(1, 100)");
    // Prepared DDL: its lock on the table comes back with the recovery and would block the
    // drill's checks for ever, unless the drill rolls it back in its copy.
    primary.query(
        "begin; insert into ledger values (101); alter table ledger add column note text; \
         prepare transaction 'walrs-drill'",
    );
    let walrs = walrs_for(&wd, &store, &primary);
    walrs.run(&["backup-push", "--fast", "--json", path_str(&primary.data)]).expect_code(0, "backup-push");
    assert_eq!(primary.one("select count(*) from pg_prepared_xacts"), "1", "the prepared transaction ended early");

    let drills = wd.pg_dir("drills");
    let as_root = WalRs::new(&wd, &store).env("PGUSER", "postgres");
    let run = as_root.run(&["backup-verify", "LATEST", "--restore-drill", "--drill-dir", path_str(&drills), "--json"]);
    run.expect_code(0, "restore drill of a backup taken with a prepared transaction open");
    let drill = json_of(&run);
    assert_eq!(drill["passed"], true, "{drill}");
    assert_eq!(drill["prepared_rolled_back"], 1, "{drill}");
    assert!(drill["tables"].as_u64().unwrap_or(0) >= 1, "the table was not found: {drill}");
    assert!(fs::read_dir(&drills).unwrap().next().is_none(), "the drill left its folder behind");

    // The prepared transaction stays the primary's own: committing it lets the cluster
    // stop cleanly.
    primary.query("commit prepared 'walrs-drill'");
    assert_eq!(primary.one("select count(*) || ' ' || max(id) from ledger"), "101 101");
}

#[test]
fn local_store_backup_verify_and_restore_drill_find_damage() {
    let wd = WorkDir::new("verify-drill");
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let primary = PgCluster::archiving(&wd, "primary", &store);
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    let walrs = walrs_for(&wd, &store, &primary);
    let pushed = walrs.run(&["backup-push", "--fast", "--json", path_str(&primary.data)]);
    pushed.expect_code(0, "backup-push");
    let backup = json_of(&pushed)["name"].as_str().expect("a name").to_string();

    let run = walrs.run(&["backup-verify", "LATEST", "--json"]);
    run.expect_code(0, "backup-verify of a good backup");
    let report = json_of(&run);
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["files"].as_u64().unwrap_or(0) > 500, "{report}");
    assert!(report["wal_segments"].as_u64().unwrap_or(0) >= 1, "{report}");

    // The drill runs as root here: it gives its copy to postgres and starts it as postgres.
    let drills = wd.pg_dir("drills");
    let as_root = WalRs::new(&wd, &store).env("PGUSER", "postgres");
    let run = as_root.run(&["backup-verify", &backup, "--restore-drill", "--drill-dir", path_str(&drills), "--json"]);
    run.expect_code(0, "restore drill of a good backup");
    let drill = json_of(&run);
    assert_eq!(drill["passed"], true, "{drill}");
    assert!(drill["databases"].as_u64().unwrap_or(0) >= 2, "{drill}");
    assert!(drill["tables"].as_u64().unwrap_or(0) >= 4, "pgbench's tables were not found: {drill}");
    assert!(fs::read_dir(&drills).unwrap().next().is_none(), "the drill left its folder behind");

    // An interrupted restore (its marker, no pg_control) is cleared by the rerun; the same
    // folder once restored is refused.
    let resume = wd.pg_dir("resume");
    fs::write(resume.join(".walrs-restore-incomplete"), b"").unwrap();
    fs::create_dir_all(resume.join("base/1")).unwrap();
    fs::write(resume.join("base/1/leftover"), b"half a file").unwrap();
    for rel in [".walrs-restore-incomplete", "base", "base/1", "base/1/leftover"] {
        chown_postgres(&resume.join(rel));
    }
    walrs
        .run(&["backup-fetch", path_str(&resume), "LATEST"])
        .expect_code(0, "backup-fetch into an interrupted restore");
    assert!(!resume.join("base/1/leftover").exists(), "the interrupted restore's files were kept");
    assert!(!resume.join(".walrs-restore-incomplete").exists(), "a finished restore kept its marker");
    assert!(resume.join("global/pg_control").exists(), "the resumed restore has no pg_control");
    let run = walrs.run(&["backup-fetch", path_str(&resume), "LATEST"]);
    run.expect_code(4, "backup-fetch into a finished restore");
    assert!(resume.join("global/pg_control").exists(), "a refused backup-fetch touched the folder");

    // A flipped byte in a data partition: backup-verify names it, the drill fails.
    let parts = store.object_path(&format!("basebackups_005/{backup}/tar_partitions"));
    let part = files_under(&parts)
        .into_iter()
        .map(|p| parts.join(p))
        .filter(|p| !p.to_string_lossy().contains("pg_control"))
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a data partition");
    let part_name = part.file_name().unwrap().to_string_lossy().into_owned();
    flip_middle_byte(&part);
    let run = walrs.run(&["backup-verify", "LATEST", "--json"]);
    run.expect_code(10, "backup-verify of a damaged backup");
    let report = json_of(&run);
    assert_eq!(report["ok"], false, "{report}");
    let problems = report["problems"].as_array().expect("problems");
    assert!(problems.iter().any(|p| p["object"].as_str().unwrap_or("").ends_with(&part_name)), "{report}");
    let run = as_root.run(&["backup-verify", &backup, "--restore-drill", "--drill-dir", path_str(&drills), "--json"]);
    run.expect_code(10, "restore drill of a damaged backup");
    assert!(run.stderr.contains(&part_name), "the drill's error does not name the partition: {run:#?}");
    assert!(fs::read_dir(&drills).unwrap().next().is_none(), "the failed drill left its folder behind");

    // A missing WAL segment the backup needs: named as a range.
    let needed = report["wal_segments"].as_u64().unwrap_or(0);
    assert!(needed >= 1, "{report}");
    let first = backup.trim_start_matches("base_").to_string();
    fs::remove_file(store.wal_object(&first)).expect("removing the backup's first WAL segment");
    let run = walrs.run(&["backup-verify", "LATEST", "--json"]);
    run.expect_code(10, "backup-verify with a missing segment");
    let report = json_of(&run);
    let problems = report["problems"].as_array().expect("problems");
    assert!(problems.iter().any(|p| p["object"].as_str().unwrap_or("").contains(&first)), "{report}");
}
