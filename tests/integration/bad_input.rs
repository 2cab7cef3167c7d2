//! Bad input, table-driven: wrong arguments, files that are not WAL, unreadable paths,
//! missing and malformed configuration, bad store URLs, wrong credentials, unknown backups,
//! occupied restore folders, another cluster's or another PostgreSQL version's data.
//!
//! Every case asserts the three things an operator relies on:
//! - the exit code is the documented one (docs/exit-codes.md; wal-fetch: 200 + code outside
//!   a standby, 1 in one);
//! - stderr is exactly one logfmt line at level=error, with `exit=` equal to the code, that
//!   names the problem (the path, name, setting or value at fault) and what to do;
//! - nothing was lost: every file of the stores and of the inputs is as it was (size,
//!   modification time, inode, mode; the stored objects also byte for byte).
//!
//! `failures.rs` checks the behaviour behind several of these codes in depth (what reaches
//! the store, retries, deadlines); this table checks the breadth of the answers. One
//! PostgreSQL cluster (for backup-push) and one S3 server (for credentials) serve all cases.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::harness::pg::PgCluster;
use crate::harness::s3::S3Server;
use crate::harness::{
    craft_segment, free_port, segment_name, sha256_hex, write_file, StoreEnv, WalRs, WorkDir, SEG_SIZE,
};

const SYSID: u64 = 7_300_000_000_000_000_401;
const OTHER_SYSID: u64 = 7_300_000_000_000_000_402;

/// One row of the table.
struct Case {
    what: &'static str,
    args: Vec<String>,
    /// Environment on top of the base (the local store, a 3 s deadline); `None` removes.
    env: Vec<(&'static str, Option<String>)>,
    cwd: Option<PathBuf>,
    as_postgres: bool,
    code: i32,
    /// Each must appear in the error line: the thing at fault, and a hint of what to do.
    names: Vec<String>,
}

fn case(what: &'static str, code: i32, args: &[&str], names: &[&str]) -> Case {
    Case {
        what,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        as_postgres: false,
        code,
        names: names.iter().map(|s| s.to_string()).collect(),
    }
}

impl Case {
    fn env(mut self, k: &'static str, v: &str) -> Case {
        self.env.push((k, Some(v.to_string())));
        self
    }
    fn unset(mut self, k: &'static str) -> Case {
        self.env.push((k, None));
        self
    }
    fn store(self, s: &StoreEnv) -> Case {
        s.vars.iter().fold(self, |c, (k, v)| c.env(leak(k), v))
    }
    fn cwd(mut self, dir: &Path) -> Case {
        self.cwd = Some(dir.to_path_buf());
        self
    }
    fn by_postgres(mut self) -> Case {
        self.as_postgres = true;
        self
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

fn p(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

/// What a file tree looks like: path -> (size, mtime ns, inode, mode, sha256 of small files).
type Snapshot = BTreeMap<PathBuf, (u64, i64, u64, u32, String)>;

fn snapshot(roots: &[PathBuf]) -> Snapshot {
    let mut out = Snapshot::new();
    let mut pending: Vec<PathBuf> = roots.to_vec();
    while let Some(d) = pending.pop() {
        let Ok(meta) = fs::symlink_metadata(&d) else { continue };
        let sum = if meta.is_file() && meta.len() <= 4 << 20 {
            fs::read(&d).map(|b| sha256_hex(&b)).unwrap_or_else(|e| format!("unreadable: {e}"))
        } else {
            String::new()
        };
        out.insert(
            d.clone(),
            (meta.len(), meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), meta.ino(), meta.mode(), sum),
        );
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&d) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

#[test]
fn bad_input_gets_one_clear_line_a_documented_code_and_loses_nothing() {
    let wd = WorkDir::new("bad-input");
    // --- fixtures ---------------------------------------------------------------------------
    let store = StoreEnv::local(&wd.pg_dir("store"));
    let base = WalRs::new(&wd, &store).env("WALRS_RETRY_DEADLINE_SECS", "3").env("WALRS_PREFETCH_COUNT", "0");
    let input = wd.dir("in");
    let seg = |dir: &str, tli: u32, segno: u64, sysid: u64, salt: u64| {
        let d = input.join(dir);
        fs::create_dir_all(&d).unwrap();
        write_file(&d, &segment_name(tli, segno), &craft_segment(tli, segno, sysid, salt))
    };
    let archived = seg("archived", 1, 3, SYSID, 1);
    base.clone().run_as_postgres().push(&archived).expect_code(0, "setup: push of segment 3");
    let name3 = segment_name(1, 3);

    let good = craft_segment(1, 4, SYSID, 1);
    let named = |dir: &str, name: &str, bytes: &[u8]| {
        let d = input.join(dir);
        fs::create_dir_all(&d).unwrap();
        write_file(&d, name, bytes)
    };
    let name4 = segment_name(1, 4);
    let truncated = named("truncated", &name4, &good[..SEG_SIZE / 2]);
    let mut longer = good.clone();
    longer.push(0);
    let too_long = named("too-long", &name4, &longer);
    let no_header = named("no-header", &name4, &vec![0; SEG_SIZE]);
    let other_segment = named("other-segment", &name4, &craft_segment(1, 6, SYSID, 1));
    let later_tli = named("later-tli", &name4, &craft_segment(2, 4, SYSID, 1));
    let not_wal = named("not-wal", "postgresql.conf", b"archive_mode = on\n");
    // Segment 10 is ...0A: its name has a letter to lower.
    let lower = named("lower", &segment_name(1, 10).to_lowercase(), &craft_segment(1, 10, SYSID, 1));
    let empty_history = named("empty-history", "00000002.history", b"");
    let binary_history = named("binary-history", "00000003.history", &[0, 1, 2, 255]);
    let short_partial = named("partial", &format!("{name4}.partial"), &good[..4096]);
    let binary_backup = named("backup-history", &format!("{name4}.00000028.backup"), &[0, 255, 1]);
    let dir_as_segment = input.join("dir").join(&name4);
    fs::create_dir_all(&dir_as_segment).unwrap();
    let missing_segment = input.join("nowhere").join(&name4);
    let unreadable = named("unreadable", &name4, &good);
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    let other_cluster = seg("other-cluster", 1, 4, OTHER_SYSID, 1);
    let conflicting = seg("conflict", 1, 3, SYSID, 2);
    let mut pg14 = good.clone();
    pg14[0..2].copy_from_slice(&0xD10Du16.to_le_bytes()); // XLOG_PAGE_MAGIC of PostgreSQL 14
    let pg14_segment = named("pg14", &name4, &pg14);

    let configs = wd.dir("configs");
    let bad_toml = write_file(&configs, "bad.toml", b"store = [\n");
    let unknown_key = write_file(&configs, "unknown.toml", b"stor = \"file:///tmp\"\n");
    let unreadable_toml = write_file(&configs, "secret.toml", b"store = \"file:///tmp\"\n");
    fs::set_permissions(&unreadable_toml, fs::Permissions::from_mode(0o000)).unwrap();

    let standby = wd.dir("standby");
    write_file(&standby, "standby.signal", b"");
    let out = wd.dir("out");
    let locked = wd.dir("locked"); // root's, 755: postgres cannot create files in it
    let root_store = StoreEnv::local(&wd.dir("root-store"));
    WalRs::new(&wd, &root_store).push(&archived).expect_code(0, "setup: push into root's store");
    let missing_store = StoreEnv::local(&wd.join("never-created"));

    // A complete backup (the WAL-G fixture), for the backup-fetch refusals.
    let backups = StoreEnv::local(&wd.join("walg-store"));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/walg-layout-pg15/store");
    let copied = std::process::Command::new("cp").arg("-r").arg(&fixture).arg(&backups.objects_root).status();
    assert!(copied.is_ok_and(|s| s.success()), "copying {}", fixture.display());
    let occupied = wd.dir("occupied");
    write_file(&occupied, "keep.txt", b"precious\n");
    let plain_file = write_file(&wd.dir("files"), "not-a-dir", b"x");

    // S3: a server, a bucket with a segment in it, and wrong credentials.
    let s3 = S3Server::start(&wd);
    let s3_store = s3.store("bad-input");
    WalRs::new(&wd, &s3_store).push(&archived).expect_code(0, "setup: push to S3");
    let wrong_secret = "WrongSecretKey0123456789abcdefWRONGwrong";
    let closed_port = format!("http://127.0.0.1:{}", free_port());

    // A running cluster, and stores that belong to another cluster or another version.
    let pg = PgCluster::init(&wd, "pg");
    pg.start();
    let sysid = pg.one("select system_identifier::text from pg_control_system()");
    let identity = |dir: &str, sysid: &str, major: u32| {
        let s = StoreEnv::local(&wd.pg_dir(dir));
        let walrs_dir = wd.pg_dir(&format!("{dir}/walrs"));
        let json = format!(
            "{{\"system_identifier\": \"{sysid}\", \"pg_major\": {major}, \"wal_segment_size\": 16777216, \"created_by\": \"test\"}}"
        );
        write_file(&walrs_dir, "cluster.json", json.as_bytes());
        s
    };
    let foreign = identity("foreign-store", &OTHER_SYSID.to_string(), 15);
    let old_version = identity("pg14-store", &sysid, 14);
    let not_pgdata = wd.pg_dir("not-pgdata");
    let libpq = |c: Case| {
        c.env("PGHOST", "127.0.0.1").env("PGPORT", &pg.port.to_string()).env("PGUSER", "postgres").by_postgres()
    };

    let dest = p(&out.join("RECOVERYXLOG"));
    let ws = |c: &str| c.to_string();
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // --- the command line: 2 (wal-fetch 202, or 1 in a standby) -------------------
        case("no command", 2, &[], &["no command", "--help"]),
        case("an unknown command", 2, &["wal-pushh", "x"], &["wal-pushh", "--help"]),
        case("wal-push without a path", 2, &["wal-push"], &["<PATH>", "usage"]),
        case("wal-push with two paths", 2, &["wal-push", "a", "b"], &["'b'", "usage"]),
        case("wal-push with an unknown flag", 2, &["wal-push", "--nope", "x"], &["--nope"]),
        case("wal-fetch without a destination", 202, &["wal-fetch", &name3], &["<DEST>", "usage"]),
        case("wal-fetch without a destination, standby", 1, &["wal-fetch", &name3], &["<DEST>"]).cwd(&standby),
        case("wal-fetch of a name that is not WAL", 202, &["wal-fetch", "notawal", &dest], &["notawal", "WAL file name"]),
        case("a bad --target-action", 2, &["backup-fetch", &p(&out.join("r")), "--target-action", "explode"], &["explode", "promote"]),
        case("a bad --target-lsn", 2, &["backup-fetch", &p(&out.join("r")), "LATEST", "--target-lsn", "zz"], &["zz", "0/16B3748"]),
        case("a bad --target-time", 2, &["backup-fetch", &p(&out.join("r")), "LATEST", "--target-time", "yesterday"], &["yesterday", "YYYY-MM-DD"]),
        case("a bad --tablespace-map", 2, &["backup-fetch", &p(&out.join("r")), "LATEST", "--tablespace-map", "16385"], &["16385", "OID=/absolute/path"]),
        case("--set without a value", 2, &["--set", "compression", "wal-push", &p(&archived)], &["compression", "KEY=VALUE"]),
        // --- configuration: 3 (wal-fetch 203) ------------------------------------------
        case("WALRS_STORE unset, wal-push", 3, &["wal-push", &p(&archived)], &["WALRS_STORE"]).unset("WALRS_STORE"),
        case("WALRS_STORE unset, wal-fetch", 203, &["wal-fetch", &name3, &dest], &["WALRS_STORE"]).unset("WALRS_STORE"),
        case("a store URL of an unknown scheme", 3, &["wal-push", &p(&archived)], &["WALRS_STORE", "ftp://host/dir"]).env("WALRS_STORE", "ftp://host/dir"),
        case("a relative file:// store URL", 3, &["wal-push", &p(&archived)], &["WALRS_STORE", "relative"]).env("WALRS_STORE", "file://relative/dir"),
        case("an s3:// URL without a bucket", 3, &["wal-push", &p(&archived)], &["WALRS_STORE"]).env("WALRS_STORE", "s3://"),
        case("a --store flag with .. in it", 3, &["--store", "s3://bucket/../up", "backup-list"], &["s3://bucket/../up"]),
        case("a missing config file", 3, &["--config", &p(&configs.join("nope.toml")), "wal-push", &p(&archived)], &["nope.toml", "--config"]),
        case("a config file that is not TOML", 3, &["--config", &p(&bad_toml), "wal-push", &p(&archived)], &["bad.toml", "TOML"]),
        case("a config file with an unknown key", 3, &["--config", &p(&unknown_key), "wal-push", &p(&archived)], &["unknown.toml", "\\\"stor\\\""]),
        case("an unreadable config file", 3, &["wal-push", &p(&archived)], &["secret.toml", "WALRS_CONFIG"]).env("WALRS_CONFIG", &p(&unreadable_toml)).by_postgres(),
        case("an unknown compression", 3, &["wal-push", &p(&archived)], &["WALRS_COMPRESSION", "gzip", "lz4"]).env("WALRS_COMPRESSION", "gzip"),
        case("a zstd level out of range", 3, &["wal-push", &p(&archived)], &["WALRS_ZSTD_LEVEL", "99", "1 to 19"]).env("WALRS_ZSTD_LEVEL", "99"),
        case("an unknown log level", 3, &["wal-push", &p(&archived)], &["WALRS_LOG_LEVEL", "loud"]).env("WALRS_LOG_LEVEL", "loud"),
        case("a deadline that is not a number", 3, &["wal-push", &p(&archived)], &["WALRS_RETRY_DEADLINE_SECS", "abc"]).env("WALRS_RETRY_DEADLINE_SECS", "abc"),
        case("an unknown fetch mode", 203, &["wal-fetch", &name3, &dest], &["WALRS_FETCH_MODE", "bogus"]).env("WALRS_FETCH_MODE", "bogus"),
        case("an S3 part size below 5 MiB", 3, &["wal-push", &p(&archived)], &["WALRS_S3_PART_SIZE_MIB", "5"]).env("WALRS_S3_PART_SIZE_MIB", "1"),
        case("--set of an unknown setting", 3, &["--set", "nosuch=1", "wal-push", &p(&archived)], &["nosuch", "wal-rs config"]),
        // --- wal-push input: 4, or 11 when it cannot be read ---------------------------
        case("a truncated segment", 4, &["wal-push", &p(&truncated)], &[&name4, "truncated"]),
        case("a segment one byte too long", 4, &["wal-push", &p(&too_long)], &[&name4]),
        case("a segment without a page header", 4, &["wal-push", &p(&no_header)], &[&name4]),
        case("another segment's page header", 4, &["wal-push", &p(&other_segment)], &[&name4, "does not match the file name"]),
        case("a later timeline's page header", 4, &["wal-push", &p(&later_tli)], &[&name4]),
        case("a file that is not WAL", 4, &["wal-push", &p(&not_wal)], &["postgresql.conf", "not a WAL file name"]),
        case("a lower-case segment name", 4, &["wal-push", &p(&lower)], &[&segment_name(1, 10).to_lowercase()]),
        case("an empty timeline history file", 4, &["wal-push", &p(&empty_history)], &["00000002.history"]),
        case("a binary timeline history file", 4, &["wal-push", &p(&binary_history)], &["00000003.history"]),
        case("a short .partial segment", 4, &["wal-push", &p(&short_partial)], &[".partial", "truncated"]),
        case("a binary backup history file", 4, &["wal-push", &p(&binary_backup)], &[".backup", "text"]),
        case("a directory named like a segment", 11, &["wal-push", &p(&dir_as_segment)], &[&ws(&p(&dir_as_segment)), "directory"]),
        case("a path that does not exist", 11, &["wal-push", &p(&missing_segment)], &[&ws(&p(&missing_segment)), "No such file"]),
        case("an unreadable segment", 11, &["wal-push", &p(&unreadable)], &[&ws(&p(&unreadable)), "Permission denied"]).by_postgres(),
        // --- wal-fetch destinations: 204, 211 -------------------------------------------
        case("wal-fetch into a directory", 204, &["wal-fetch", &name3, &p(&out)], &[&ws(&p(&out)), "not a regular file"]),
        case("wal-fetch into a missing directory", 211, &["wal-fetch", &name3, &p(&out.join("no/dir/x"))], &[&ws(&p(&out.join("no/dir"))), "No such file"]),
        case("wal-fetch into a folder it cannot write", 211, &["wal-fetch", &name3, &p(&locked.join("x"))], &[&ws(&p(&locked)), "Permission denied"]).by_postgres(),
        // --- stores: 7, 8, 9 --------------------------------------------------------------
        case("wal-push into a missing store directory", 9, &["wal-push", &p(&archived)], &["never-created", "create it"]).store(&missing_store),
        case("wal-fetch from a missing store directory", 209, &["wal-fetch", &name3, &dest], &["never-created", "create it"]).store(&missing_store),
        case("backup-list of a missing store directory", 9, &["backup-list"], &["never-created", "create it"]).store(&missing_store),
        case("wal-push into a store it cannot write", 11, &["wal-push", &p(&seg("root-store-4", 1, 4, SYSID, 1))], &["root-store", "Permission denied"]).store(&root_store).by_postgres(),
        case("S3 with a wrong secret key, wal-push", 8, &["wal-push", &p(&seg("s3-4", 1, 4, SYSID, 1))], &["credentials"]).store(&s3_store).env("AWS_SECRET_ACCESS_KEY", wrong_secret),
        case("S3 with a wrong secret key, wal-fetch", 208, &["wal-fetch", &name3, &dest], &["credentials"]).store(&s3_store).env("AWS_SECRET_ACCESS_KEY", wrong_secret),
        case("S3 with an unknown access key", 8, &["backup-list"], &["credentials"]).store(&s3_store).env("AWS_ACCESS_KEY_ID", "AKNOSUCHKEY"),
        case("S3 with a missing bucket", 9, &["wal-push", &p(&archived)], &["no-such-bucket"]).store(&s3_store).env("WALRS_STORE", "s3://no-such-bucket/p"),
        case("S3 endpoint where nothing listens", 7, &["wal-push", &p(&archived)], &["s3://walrs-test/bad-input", &closed_port, "reachable"]).store(&s3_store).env("AWS_ENDPOINT_URL", &closed_port).env("WALRS_RETRY_DEADLINE_SECS", "2"),
        // --- whose data: 5, 6 -----------------------------------------------------------
        case("different content under an archived name", 5, &["wal-push", &p(&conflicting)], &[&name3, "different content"]),
        case("another cluster's segment", 6, &["wal-push", &p(&other_cluster)], &[&OTHER_SYSID.to_string(), &SYSID.to_string(), "own store prefix"]),
        case("a segment of another PostgreSQL version", 6, &["wal-push", &p(&pg14_segment)], &["PostgreSQL 14", "PostgreSQL 15", "own store prefix"]),
        libpq(case("a backup of another cluster", 6, &["backup-push", "--fast", &p(&pg.data)], &[&OTHER_SYSID.to_string(), &sysid, "own store prefix"]).store(&foreign)),
        libpq(case("a backup of another PostgreSQL version", 6, &["backup-push", "--fast", &p(&pg.data)], &["PostgreSQL 14", "PostgreSQL 15"]).store(&old_version)),
        libpq(case("backup-push of a folder that is not the server's", 3, &["backup-push", &p(&not_pgdata)], &[&ws(&p(&not_pgdata)), "PGDATA"])),
        case("backup-push with no server to connect to", 3, &["backup-push", &p(&not_pgdata)], &["PGHOST", "--pg-url"]).env("PGHOST", "127.0.0.1").env("PGPORT", &free_port().to_string()),
        // --- backups: 4, 12 ---------------------------------------------------------------
        case("an unknown backup name", 12, &["backup-fetch", &p(&out.join("r")), "base_000000010000000000000099"], &["base_000000010000000000000099", "backup-list"]).store(&backups),
        case("LATEST of a store without backups", 12, &["backup-fetch", &p(&out.join("r")), "LATEST"], &["no complete backup", "backup-push"]),
        case("a non-empty restore folder", 4, &["backup-fetch", &p(&occupied), "LATEST"], &[&ws(&p(&occupied)), "not empty"]).store(&backups),
        case("a restore folder that is a file", 4, &["backup-fetch", &p(&plain_file), "LATEST"], &[&ws(&p(&plain_file)), "not a directory"]).store(&backups),
    ];

    let roots = vec![
        store.objects_root.clone(),
        root_store.objects_root.clone(),
        backups.objects_root.clone(),
        foreign.objects_root.clone(),
        old_version.objects_root.clone(),
        // Not s3.data: s3s-fs accepts a PUT into a bucket that does not exist (a real S3
        // answers NoSuchBucket), creating it there; the bucket the tests use must not change.
        s3.data.join(crate::harness::s3::BUCKET),
        input.clone(),
        configs.clone(),
        out.clone(),
        occupied.clone(),
        locked.clone(),
        wd.join("files"),
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let mut walrs = if c.env.iter().any(|(k, v)| *k == "WALRS_STORE" && v.is_none()) {
            WalRs::without_store(&wd).env("WALRS_RETRY_DEADLINE_SECS", "3").env("WALRS_PREFETCH_COUNT", "0")
        } else {
            base.clone()
        };
        for (k, v) in &c.env {
            if let Some(v) = v {
                walrs = walrs.env(k, v);
            }
        }
        if let Some(dir) = &c.cwd {
            walrs = walrs.cwd(dir);
        }
        if c.as_postgres {
            walrs = walrs.run_as_postgres();
        }
        let before = snapshot(&roots);
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let run = walrs.run(&args);
        let after = snapshot(&roots);
        let mut wrong = Vec::new();
        if run.code != c.code {
            wrong.push(format!("exit {} instead of {}", run.code, c.code));
        }
        let lines: Vec<&str> = run.stderr.lines().collect();
        if lines.len() != 1 {
            wrong.push(format!("{} lines on stderr instead of one", lines.len()));
        }
        let line = lines.first().copied().unwrap_or("");
        if !(line.starts_with("ts=") && line.contains(" level=error ") && line.contains(" outcome=error")) {
            wrong.push("not a logfmt error line".into());
        }
        if !run.logged("exit", &c.code.to_string()) {
            wrong.push(format!("no exit={} field", c.code));
        }
        for n in &c.names {
            if !line.contains(n.as_str()) {
                wrong.push(format!("does not name {n:?}"));
            }
        }
        if before != after {
            let changed: Vec<_> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            wrong.push(format!("files changed: {changed:?}"));
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}\n    stderr: {}", c.what, wrong.join("; "), run.stderr.trim_end()));
        }
    }
    pg.stop();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // The stores were usable all along.
    base.push(&seg("valid", 1, 4, SYSID, 1)).expect_code(0, "a valid push after all the refusals");
}
