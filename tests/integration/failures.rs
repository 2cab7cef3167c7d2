//! Failure cases, through direct calls of the binary: each documented exit code (src/exit.rs),
//! and what is, or is not, left in the store and beside the destination.
//!
//! The segments are crafted (a valid PostgreSQL 15 long page header, then filler): wal-push
//! checks only the header and the size, and no cluster is needed to exercise its failures.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::s3::{CuttingProxy, S3Server, BUCKET};
use crate::harness::{
    craft_incompressible_segment, craft_segment, files_under, flip_middle_byte, lz4_cli_decompress, read, segment_name,
    sha256_hex, wait_until, write_file, StoreEnv, WalRs, WorkDir, SEG_SIZE,
};

/// The cluster the crafted segments come from.
const SYSID: u64 = 7_300_000_000_000_000_001;
/// Another cluster.
const OTHER_SYSID: u64 = 7_300_000_000_000_000_002;

/// The exit codes of src/exit.rs the tests expect.
mod code {
    pub const NOT_IN_ARCHIVE: i32 = 1;
    pub const CONFIG: i32 = 3;
    pub const INVALID_INPUT: i32 = 4;
    pub const CONFLICT: i32 = 5;
    pub const CLUSTER_MISMATCH: i32 = 6;
    pub const STORAGE: i32 = 7;
    pub const DENIED: i32 = 8;
    pub const STORE_MISSING: i32 = 9;
    pub const CORRUPT: i32 = 10;
    pub const INTERNAL: i32 = 15;
    /// Added to wal-fetch failures outside a standby.
    pub const RECOVERY_ABORT: i32 = 200;
}

fn local_store(wd: &WorkDir) -> StoreEnv {
    StoreEnv::local(&wd.dir("store"))
}

/// Writes crafted segment `segno` of cluster `sysid` into a directory of its own (so two
/// contents can share a name) and returns its path and bytes.
fn segment_file(wd: &WorkDir, segno: u64, sysid: u64, salt: u64) -> (PathBuf, Vec<u8>) {
    let bytes = craft_segment(1, segno, sysid, salt);
    let dir = wd.dir(&format!("in/{segno}-{sysid}-{salt}"));
    (write_file(&dir, &segment_name(1, segno), &bytes), bytes)
}

/// A directory holding `standby.signal`, to run wal-fetch in as a standby's restore_command.
fn standby_dir(wd: &WorkDir) -> PathBuf {
    let dir = wd.dir("standby-datadir");
    write_file(&dir, "standby.signal", b"");
    dir
}

// --- same content twice ----------------------------------------------------------------

fn same_content_twice_is_archived_once(wd: &WorkDir, store: &StoreEnv) {
    let walrs = WalRs::new(wd, store);
    let (input, bytes) = segment_file(wd, 3, SYSID, 1);
    let name = segment_name(1, 3);

    let first = walrs.push(&input);
    first.expect_code(0, "first push");
    assert!(first.logged("outcome", "stored"), "{first:#?}");
    let object = store.wal_object(&name);
    let stored = read(&object);
    let mtime = fs::metadata(&object).unwrap().modified().unwrap();

    let second = walrs.push(&input);
    second.expect_code(0, "second push of the same content");
    assert!(second.logged("outcome", "already-archived"), "{second:#?}");
    assert!(read(&object) == stored, "the stored object changed");
    assert_eq!(fs::metadata(&object).unwrap().modified().unwrap(), mtime, "the stored object was rewritten");
    assert!(lz4_cli_decompress(&object) == bytes, "the stored object is not the segment");
}

#[test]
fn same_content_twice_is_archived_once_local() {
    let wd = WorkDir::new("twice-local");
    same_content_twice_is_archived_once(&wd, &local_store(&wd));
}

#[test]
fn same_content_twice_is_archived_once_s3() {
    let wd = WorkDir::new("twice-s3");
    let s3 = S3Server::start(&wd);
    same_content_twice_is_archived_once(&wd, &s3.store("twice"));
}

// --- different content under one name ---------------------------------------------------

fn different_content_is_refused(wd: &WorkDir, store: &StoreEnv) {
    let walrs = WalRs::new(wd, store);
    let (first, first_bytes) = segment_file(wd, 3, SYSID, 1);
    let (second, second_bytes) = segment_file(wd, 3, SYSID, 2);
    assert_ne!(first_bytes, second_bytes);
    walrs.push(&first).expect_code(0, "first push");
    let object = store.wal_object(&segment_name(1, 3));
    let stored = read(&object);

    let run = walrs.push(&second);
    run.expect_code(code::CONFLICT, "push of different content under an archived name");
    assert!(run.stderr.contains(&sha256_hex(&first_bytes)), "stderr does not name the stored sha256: {run:#?}");
    assert!(run.stderr.contains(&sha256_hex(&second_bytes)), "stderr does not name the new sha256: {run:#?}");
    assert!(read(&object) == stored, "the stored object changed");
    assert!(lz4_cli_decompress(&object) == first_bytes, "the stored object is not the first content");
}

#[test]
fn different_content_under_an_archived_name_is_refused_local() {
    let wd = WorkDir::new("conflict-local");
    different_content_is_refused(&wd, &local_store(&wd));
}

#[test]
fn different_content_under_an_archived_name_is_refused_s3() {
    let wd = WorkDir::new("conflict-s3");
    let s3 = S3Server::start(&wd);
    different_content_is_refused(&wd, &s3.store("conflict"));
}

// --- a name not in the archive ----------------------------------------------------------

fn missing_names_are_not_in_archive(wd: &WorkDir, store: &StoreEnv) {
    let walrs = WalRs::new(wd, store);
    // The store exists and holds a segment: only the names asked for are missing.
    walrs.push(&segment_file(wd, 3, SYSID, 1).0).expect_code(0, "push");
    let out = wd.dir("out");
    let dest = out.join("RECOVERYXLOG");
    for name in [segment_name(1, 4), segment_name(2, 3), "00000002.history".to_string()] {
        let run = walrs.fetch(&name, &dest);
        run.expect_code(code::NOT_IN_ARCHIVE, &format!("wal-fetch of {name}, not in the archive"));
        assert!(run.logged("outcome", "not-found"), "{run:#?}");
        // PostgreSQL asks for missing files all the time: the answer must come at once.
        assert!(run.elapsed < Duration::from_secs(5), "wal-fetch of a missing file took {:?}", run.elapsed);
    }
    assert!(files_under(&out).is_empty(), "left in {}: {:?}", out.display(), files_under(&out));
}

#[test]
fn fetch_of_a_missing_name_exits_1_local() {
    let wd = WorkDir::new("missing-local");
    missing_names_are_not_in_archive(&wd, &local_store(&wd));
}

#[test]
fn fetch_of_a_missing_name_exits_1_s3() {
    let wd = WorkDir::new("missing-s3");
    let s3 = S3Server::start(&wd);
    missing_names_are_not_in_archive(&wd, &s3.store("missing"));
}

/// A store location with nothing archived in it is not an empty archive: "not in the
/// archive" there would end a recovery at the wrong point. `says` is what the error must
/// name. Also: the failure answers a standby with 1 (it asks again), whether
/// `standby.signal` or a PostgreSQL 10/11 `recovery.conf` says so.
fn an_empty_location_is_not_the_end_of_the_archive(wd: &WorkDir, store: &StoreEnv, says: &str) {
    let out = wd.dir("out");
    let dest = out.join("RECOVERYXLOG");
    let walrs = WalRs::new(wd, store).env("WALRS_RETRY_DEADLINE_SECS", "1").env("WALRS_PREFETCH_COUNT", "0");
    let run = walrs.fetch(&segment_name(1, 3), &dest);
    run.expect_code(code::RECOVERY_ABORT + code::STORAGE, "wal-fetch from an empty location");
    assert!(run.stderr.contains(says), "{run:#?}");
    let standby = walrs.clone().cwd(&standby_dir(wd));
    standby.fetch(&segment_name(1, 3), &dest).expect_code(code::NOT_IN_ARCHIVE, "the same in a standby");
    let old_standby = wd.dir("recovery-conf-standby");
    write_file(&old_standby, "recovery.conf", b"standby_mode = 'on'\nrestore_command = 'wal-rs wal-fetch %f %p'\n");
    walrs.clone().cwd(&old_standby).fetch(&segment_name(1, 3), &dest).expect_code(
        code::NOT_IN_ARCHIVE,
        "the same in a PostgreSQL 11 standby (recovery.conf with standby_mode = on)",
    );
    walrs
        .fetch("00000002.history", &dest)
        .expect_code(code::RECOVERY_ABORT + code::STORAGE, "a history file from an empty location, not in a standby");
    assert!(files_under(&out).is_empty(), "left in {}: {:?}", out.display(), files_under(&out));

    // Once something is archived there, a missing name is simply not in the archive.
    WalRs::new(wd, store).push(&segment_file(wd, 3, SYSID, 1).0).expect_code(0, "push");
    walrs.fetch(&segment_name(1, 4), &dest).expect_code(code::NOT_IN_ARCHIVE, "a missing name in a store with WAL");
    standby.fetch("00000002.history", &dest).expect_code(code::NOT_IN_ARCHIVE, "a missing history file");
}

/// A local store on a file system that is not mounted: its mount point is an empty
/// directory.
#[test]
fn an_empty_mount_point_is_not_the_end_of_the_archive() {
    let wd = WorkDir::new("unmounted");
    an_empty_location_is_not_the_end_of_the_archive(&wd, &local_store(&wd), "not mounted");
}

/// An S3 prefix with nothing in it: a typo, or another environment's settings.
#[test]
fn an_empty_s3_prefix_is_not_the_end_of_the_archive() {
    let wd = WorkDir::new("empty-prefix");
    let s3 = S3Server::start(&wd);
    an_empty_location_is_not_the_end_of_the_archive(&wd, &s3.store("typo"), "nothing was ever archived there");
}

/// A wal-fetch stopped mid-download (its deadline, or a signal at shutdown) leaves its
/// temporary file beside the destination; the next one removes it, and only it.
#[test]
fn leftovers_of_a_stopped_fetch_do_not_pile_up_in_pg_wal() {
    let wd = WorkDir::new("leftovers");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store).env("WALRS_PREFETCH_COUNT", "0");
    let (input, bytes) = segment_file(&wd, 3, SYSID, 1);
    walrs.push(&input).expect_code(0, "push");
    let out = wd.dir("out");
    // A process that has exited: its PID names the leftover.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leftover = write_file(&out, &format!(".RECOVERYXLOG.walrs-partial.{dead}"), &bytes[..4096]);
    let live = write_file(&out, &format!(".RECOVERYXLOG.walrs-partial.{}", std::process::id()), b"in use");
    let other = write_file(&out, &format!(".other.walrs-partial.{dead}"), b"another destination's");

    walrs.fetch(&segment_name(1, 3), &out.join("RECOVERYXLOG")).expect_code(0, "fetch");
    assert_eq!(read(&out.join("RECOVERYXLOG")), bytes);
    assert!(!leftover.exists(), "a dead fetch's temporary file stayed");
    assert!(live.exists() && other.exists(), "a file that is not a dead fetch's leftover went");
}

// --- wal-rs itself fails ----------------------------------------------------------------

/// A wal-fetch that cannot start the thread it restores with (a process limit reached)
/// panics inside wal-rs. Rust's own exit code for that, 101, is below 126: PostgreSQL would
/// take it for "not in the archive" and end a recovery there.
#[test]
fn a_fetch_that_fails_inside_wal_rs_never_looks_like_the_end_of_the_archive() {
    let wd = WorkDir::new("panic");
    let store = local_store(&wd);
    let (input, _) = segment_file(&wd, 3, SYSID, 1);
    WalRs::new(&wd, &store).push(&input).expect_code(0, "push");
    let out = wd.pg_dir("out");
    let dest = out.join("RECOVERYXLOG");
    let limited = WalRs::new(&wd, &store).env("WALRS_PREFETCH_COUNT", "0").run_as_postgres().max_processes(1);

    let run = limited.fetch(&segment_name(1, 3), &dest);
    run.expect_code(code::RECOVERY_ABORT + code::INTERNAL, "wal-fetch that cannot start a thread");
    assert!(run.logged("exit", "215"), "{run:#?}");
    assert!(run.stderr.contains("internal error"), "{run:#?}");
    assert!(!dest.exists(), "a failed fetch left {}", dest.display());

    // A standby asks again later.
    let run = limited.cwd(&standby_dir(&wd)).fetch(&segment_name(1, 3), &dest);
    run.expect_code(code::NOT_IN_ARCHIVE, "the same in a standby");
    assert!(!dest.exists(), "a failed fetch left {}", dest.display());
}

// --- a damaged object -------------------------------------------------------------------

/// Pushes a segment, damages its stored object with `damage`, and checks that wal-fetch
/// reports it as corrupt (210 outside a standby, 1 in one) and restores nothing.
fn damaged_object_is_never_restored(wd: &WorkDir, store: &StoreEnv, damage: fn(&Path)) {
    // A short deadline: should a damaged object be taken for a transient failure and
    // retried, the test still ends quickly.
    let walrs = WalRs::new(wd, store).env("WALRS_RETRY_DEADLINE_SECS", "3");
    walrs.push(&segment_file(wd, 3, SYSID, 1).0).expect_code(0, "push");
    let name = segment_name(1, 3);
    damage(&store.wal_object(&name));

    let out = wd.dir("out");
    let dest = out.join("RECOVERYXLOG");
    let recovery = walrs.fetch(&name, &dest);
    let standby = walrs.clone().cwd(&standby_dir(wd)).fetch(&name, &dest);
    assert_eq!(
        (recovery.code, standby.code),
        (code::RECOVERY_ABORT + code::CORRUPT, code::NOT_IN_ARCHIVE),
        "wal-fetch of a damaged object, in recovery and in a standby:\n{recovery:#?}\n{standby:#?}"
    );
    assert!(!dest.exists(), "a damaged object was restored to {}", dest.display());
    assert!(files_under(&out).is_empty(), "left in {}: {:?}", out.display(), files_under(&out));
}

/// History and backup-history files have no size to check a restore against, as segments
/// do. An empty object (no data, no checksum), or a foreign lz4 frame cut after its header,
/// decodes to nothing; wal-push never archives an empty file and PostgreSQL never writes
/// one, so such a restore is damage, never the file: an empty timeline history would make
/// recovery fail on that timeline.
#[test]
fn an_empty_or_cut_object_is_never_restored_as_a_history_file() {
    let wd = WorkDir::new("empty-history");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store).env("WALRS_RETRY_DEADLINE_SECS", "3");
    // Something else in the archive, so that it is a store with an archive in it.
    walrs.push(&segment_file(&wd, 3, SYSID, 1).0).expect_code(0, "push");
    let wal = store.object_path("wal_005");
    // An lz4 frame header as the lz4 tool writes it (4 MiB blocks, content checksum), and
    // nothing after it.
    let cut_frame = [0x04, 0x22, 0x4D, 0x18, 0x64, 0x70, 0xB9];
    write_file(&wal, "00000002.history.lz4", b"");
    write_file(&wal, "00000003.history", b"");
    write_file(&wal, "00000004.history.lz4", &cut_frame);
    write_file(&wal, "000000010000000000000003.00000028.backup.zst", b"");
    let out = wd.dir("out");
    let dest = out.join("RECOVERYHISTORY");
    for name in ["00000002.history", "00000003.history", "00000004.history", "000000010000000000000003.00000028.backup"]
    {
        let run = walrs.fetch(name, &dest);
        assert_eq!(run.code, code::RECOVERY_ABORT + code::CORRUPT, "wal-fetch {name}: {run:#?}");
        assert!(files_under(&out).is_empty(), "{name}: left in {}: {:?}", out.display(), files_under(&out));
    }
}

/// Inverts the last byte: part of the sha256 in wal-rs's trailer. The lz4 data itself
/// still decodes; only the checksum can tell.
fn flip_last_byte(path: &Path) {
    let mut bytes = read(path);
    *bytes.last_mut().unwrap() ^= 0xFF;
    fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_object_fails_fetch_local() {
    let wd = WorkDir::new("corrupt-local");
    damaged_object_is_never_restored(&wd, &local_store(&wd), flip_middle_byte);
}

#[test]
fn corrupt_object_fails_fetch_s3() {
    let wd = WorkDir::new("corrupt-s3");
    let s3 = S3Server::start(&wd);
    damaged_object_is_never_restored(&wd, &s3.store("corrupt"), flip_middle_byte);
}

#[test]
fn damaged_checksum_fails_fetch_local() {
    let wd = WorkDir::new("badsum-local");
    damaged_object_is_never_restored(&wd, &local_store(&wd), flip_last_byte);
}

/// On S3 the SDK checks the response body against the CRC32 the server stored at upload,
/// and fails the body stream at its end. wal-fetch must take that error for damage, not
/// for a dropped connection to retry until the deadline (exit 207, "check that the store
/// is reachable").
#[test]
fn damaged_checksum_fails_fetch_s3() {
    let wd = WorkDir::new("badsum-s3");
    let s3 = S3Server::start(&wd);
    damaged_object_is_never_restored(&wd, &s3.store("badsum"), flip_last_byte);
}

/// An uncompressed object's sha256 travels as metadata (an extended attribute on a local
/// store). One that is there but unreadable is damage: the object must not be restored as
/// one that never had a checksum (`verified=none`).
#[test]
fn an_unreadable_checksum_in_metadata_is_damage() {
    let wd = WorkDir::new("badmeta-local");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store).env("WALRS_COMPRESSION", "none").env("WALRS_RETRY_DEADLINE_SECS", "3");
    walrs.push(&segment_file(&wd, 3, SYSID, 1).0).expect_code(0, "push");
    let name = segment_name(1, 3);
    let object = store.object_path(&format!("wal_005/{name}"));
    xattr::set(&object, "user.walrs.sha256", b"not a sha256").expect("setting the object's checksum attribute");
    let out = wd.dir("out");
    let dest = out.join("RECOVERYXLOG");
    let run = walrs.fetch(&name, &dest);
    assert_eq!(run.code, code::RECOVERY_ABORT + code::CORRUPT, "wal-fetch of an object with a bad checksum: {run:#?}");
    assert!(files_under(&out).is_empty(), "left in {}: {:?}", out.display(), files_under(&out));
}

// --- another cluster's segment ----------------------------------------------------------

fn other_clusters_segment_is_refused(wd: &WorkDir, store: &StoreEnv) {
    let walrs = WalRs::new(wd, store);
    walrs.push(&segment_file(wd, 3, SYSID, 1).0).expect_code(0, "push of the store's cluster");
    let name = segment_name(1, 4);

    let run = walrs.push(&segment_file(wd, 4, OTHER_SYSID, 1).0);
    run.expect_code(code::CLUSTER_MISMATCH, "push of another cluster's segment");
    assert!(run.stderr.contains(&SYSID.to_string()) && run.stderr.contains(&OTHER_SYSID.to_string()), "{run:#?}");
    assert!(!store.wal_object(&name).exists(), "another cluster's segment was stored");
    // The name was free: only the cluster was wrong.
    let (input, bytes) = segment_file(wd, 4, SYSID, 1);
    walrs.push(&input).expect_code(0, "push of the store's cluster under that name");
    assert!(lz4_cli_decompress(&store.wal_object(&name)) == bytes);
}

#[test]
fn another_clusters_segment_is_refused_local() {
    let wd = WorkDir::new("sysid-local");
    other_clusters_segment_is_refused(&wd, &local_store(&wd));
}

#[test]
fn another_clusters_segment_is_refused_s3() {
    let wd = WorkDir::new("sysid-s3");
    let s3 = S3Server::start(&wd);
    other_clusters_segment_is_refused(&wd, &s3.store("sysid"));
}

// --- S3 unreachable, S3 refusing --------------------------------------------------------

#[test]
fn s3_server_down_fails_push_and_fetch_without_losing_or_inventing_wal() {
    let wd = WorkDir::new("s3-down");
    let s3 = S3Server::start(&wd);
    let store = s3.store("down");
    let walrs = WalRs::new(&wd, &store)
        .env("WALRS_RETRY_DEADLINE_SECS", "3")
        .env("WALRS_REQUEST_TIMEOUT_SECS", "2")
        .env("WALRS_RETRY_ATTEMPTS", "2");
    let (archived, archived_bytes) = segment_file(&wd, 3, SYSID, 1);
    walrs.push(&archived).expect_code(0, "push while the server is up");
    let (pending, pending_bytes) = segment_file(&wd, 4, SYSID, 1);
    let (archived_name, pending_name) = (segment_name(1, 3), segment_name(1, 4));

    s3.stop();
    let push = walrs.push(&pending);
    push.expect_code(code::STORAGE, "push with the server down");
    assert!(push.elapsed < Duration::from_secs(10), "push with the server down took {:?}", push.elapsed);
    let out = wd.dir("out");
    let dest = out.join("RECOVERYXLOG");
    let fetch = walrs.fetch(&archived_name, &dest);
    // Not 1: "not in the archive" would end a recovery early, at the wrong point.
    fetch.expect_code(code::RECOVERY_ABORT + code::STORAGE, "fetch with the server down");
    walrs
        .clone()
        .cwd(&standby_dir(&wd))
        .fetch(&archived_name, &dest)
        .expect_code(code::NOT_IN_ARCHIVE, "fetch with the server down, in a standby (which asks again)");
    assert!(files_under(&out).is_empty(), "left in {}: {:?}", out.display(), files_under(&out));

    s3.restart();
    assert!(!store.wal_object(&pending_name).exists(), "a failed push left an object");
    walrs.fetch(&pending_name, &dest).expect_code(code::NOT_IN_ARCHIVE, "fetch of the segment whose push failed");
    walrs.push(&pending).expect_code(0, "push after the restart");
    assert!(lz4_cli_decompress(&store.wal_object(&pending_name)) == pending_bytes);
    walrs.fetch(&archived_name, &dest).expect_code(0, "fetch after the restart");
    assert!(read(&dest) == archived_bytes);
}

#[test]
fn s3_server_that_stops_answering_fails_push_and_fetch_within_the_deadline() {
    let wd = WorkDir::new("s3-silent");
    let s3 = S3Server::start(&wd);
    let direct = s3.store("silent");
    let (input, _) = segment_file(&wd, 3, SYSID, 1);
    // A proxy that forwards nothing: every request is held, unanswered.
    let proxy = CuttingProxy::start(s3.port, 0);
    let walrs = WalRs::new(&wd, &direct.with("AWS_ENDPOINT_URL", &proxy.endpoint()))
        .env("WALRS_RETRY_DEADLINE_SECS", "3")
        .env("WALRS_REQUEST_TIMEOUT_SECS", "2")
        .env("WALRS_RETRY_ATTEMPTS", "2");
    // The 3 s deadline, and time to start the process on a loaded machine.
    let limit = Duration::from_secs(3 + 3);

    let push = walrs.push(&input);
    push.expect_code(code::STORAGE, "push to a server that never answers");
    assert!(push.elapsed < limit, "push took {:?}, past the 3 s deadline", push.elapsed);
    let dest = wd.dir("out").join("RECOVERYXLOG");
    let fetch = walrs.fetch(&segment_name(1, 3), &dest);
    fetch.expect_code(code::RECOVERY_ABORT + code::STORAGE, "fetch from a server that never answers");
    assert!(fetch.elapsed < limit, "fetch took {:?}, past the 3 s deadline", fetch.elapsed);
    assert!(!dest.exists());
    let bucket = s3.data.join(BUCKET);
    assert!(files_under(&bucket).is_empty(), "stored: {:?}", files_under(&bucket));
}

/// Stops the server while wal-push is uploading `bytes` as segment 4: the proxy holds the
/// upload once `budget` bytes have gone through, the server is killed, the connections
/// cut. The push must fail, and nothing may be visible under the name afterwards.
fn server_killed_during_push(tag: &str, bytes: Vec<u8>, budget: u64) {
    let wd = WorkDir::new(tag);
    let s3 = S3Server::start(&wd);
    let store = s3.store("cut");
    let direct = WalRs::new(&wd, &store);
    // The cluster is recorded, so the upload is the first large request.
    direct.push(&segment_file(&wd, 3, SYSID, 1).0).expect_code(0, "push of segment 3");
    let name = segment_name(1, 4);
    let input = write_file(&wd.dir("in/cut"), &name, &bytes);

    let proxy = CuttingProxy::start(s3.port, budget);
    let via_proxy = WalRs::new(&wd, &store.with("AWS_ENDPOINT_URL", &proxy.endpoint()))
        .env("WALRS_RETRY_DEADLINE_SECS", "3")
        .env("WALRS_REQUEST_TIMEOUT_SECS", "2")
        .env("WALRS_RETRY_ATTEMPTS", "2");
    let pushing = std::thread::spawn({
        let input = input.clone();
        move || via_proxy.push(&input)
    });
    wait_until("the upload to reach the proxy's budget", Duration::from_secs(30), || proxy.forwarded() >= budget);
    s3.stop();
    proxy.cut();
    let push = pushing.join().expect("the push thread");
    push.expect_code(code::STORAGE, "push interrupted by the server's death");

    s3.restart();
    assert!(!store.wal_object(&name).exists(), "an interrupted push left an object");
    let dest = wd.dir("out").join("RECOVERYXLOG");
    direct.fetch(&name, &dest).expect_code(code::NOT_IN_ARCHIVE, "fetch of the segment whose push was cut");
    direct.push(&input).expect_code(0, "push after the restart");
    direct.fetch(&name, &dest).expect_code(0, "fetch after the restart");
    assert!(read(&dest) == bytes, "the segment came back different");
}

#[test]
fn s3_server_killed_during_a_single_put_leaves_nothing() {
    // The crafted segment compresses to about 460 KB: one PUT, cut after 100 KiB.
    server_killed_during_push("s3-cut-put", craft_segment(1, 4, SYSID, 1), 100 << 10);
}

#[test]
fn s3_server_killed_during_a_multipart_upload_leaves_nothing() {
    // Incompressible: about 16 MiB in 8 MiB parts, cut after 12 MiB.
    server_killed_during_push("s3-cut-multipart", craft_incompressible_segment(1, 4, SYSID, 1), 12 << 20);
}

#[test]
fn incompressible_segment_round_trips_through_a_multipart_upload() {
    let wd = WorkDir::new("s3-multipart");
    let s3 = S3Server::start(&wd);
    let store = s3.store("multipart");
    let walrs = WalRs::new(&wd, &store);
    let name = segment_name(1, 3);
    let bytes = craft_incompressible_segment(1, 3, SYSID, 7);
    let input = write_file(&wd.dir("in"), &name, &bytes);

    let first = walrs.push(&input);
    first.expect_code(0, "push of an incompressible segment");
    assert!(first.logged("outcome", "stored"), "{first:#?}");
    let object = store.wal_object(&name);
    assert!(fs::metadata(&object).unwrap().len() > 8 << 20, "the object fits in one part: not a multipart test");
    assert!(lz4_cli_decompress(&object) == bytes, "lz4 -d of the multipart object differs");
    let dest = wd.dir("out").join(&name);
    walrs.fetch(&name, &dest).expect_code(0, "fetch");
    assert!(read(&dest) == bytes, "wal-fetch of the multipart object differs");
    let again = walrs.push(&input);
    again.expect_code(0, "second push");
    assert!(again.logged("outcome", "already-archived"), "{again:#?}");
    let other = craft_incompressible_segment(1, 3, SYSID, 8);
    let conflict = walrs.push(&write_file(&wd.dir("in-other"), &name, &other));
    conflict.expect_code(code::CONFLICT, "push of other incompressible content under the name");
    assert!(lz4_cli_decompress(&object) == bytes, "the stored object changed");
}

#[test]
fn s3_wrong_secret_key_is_denied_without_printing_secrets() {
    let wd = WorkDir::new("s3-denied");
    let s3 = S3Server::start(&wd);
    let wrong_secret = "WrongSecretKey0123456789abcdefWRONGwrong";
    let store = s3.store("denied").with("AWS_SECRET_ACCESS_KEY", wrong_secret);
    let walrs = WalRs::new(&wd, &store);
    let (input, _) = segment_file(&wd, 3, SYSID, 1);

    let push = walrs.push(&input);
    push.expect_code(code::DENIED, "push with a wrong secret key");
    assert_eq!(push.stderr.trim_end().lines().count(), 1, "not one line: {push:#?}");
    assert!(push.stderr.contains("credentials"), "the error does not point at the credentials: {push:#?}");
    let dest = wd.dir("out").join("RECOVERYXLOG");
    let fetch = walrs.fetch(&segment_name(1, 3), &dest);
    fetch.expect_code(code::RECOVERY_ABORT + code::DENIED, "fetch with a wrong secret key");
    for run in [&push, &fetch] {
        for output in [&run.stderr, &run.stdout] {
            assert!(!output.contains(wrong_secret), "the secret key was printed: {run:#?}");
            assert!(!output.contains(&s3.secret_key), "the server's secret key was printed: {run:#?}");
        }
    }
    let bucket = s3.data.join(BUCKET);
    assert!(files_under(&bucket).is_empty(), "stored: {:?}", files_under(&bucket));
}

// --- configuration ----------------------------------------------------------------------

#[test]
fn missing_or_malformed_store_setting() {
    let wd = WorkDir::new("config");
    let (input, _) = segment_file(&wd, 3, SYSID, 1);
    let name = segment_name(1, 3);
    let dest = wd.dir("out").join("RECOVERYXLOG");
    let standby = standby_dir(&wd);
    let unset = WalRs::without_store(&wd);

    let push = unset.push(&input);
    push.expect_code(code::CONFIG, "push without WALRS_STORE");
    assert!(push.stderr.contains("WALRS_STORE"), "{push:#?}");
    unset.fetch(&name, &dest).expect_code(code::RECOVERY_ABORT + code::CONFIG, "fetch without WALRS_STORE");
    unset
        .clone()
        .cwd(&standby)
        .fetch(&name, &dest)
        .expect_code(code::NOT_IN_ARCHIVE, "fetch without WALRS_STORE, standby");

    for bad in ["ftp://host/dir", "file://relative/dir", "/no/scheme", "s3://", "s3://bucket/../up"] {
        let walrs = unset.clone().env("WALRS_STORE", bad);
        let push = walrs.push(&input);
        push.expect_code(code::CONFIG, &format!("push with WALRS_STORE={bad}"));
        assert!(push.stderr.contains("WALRS_STORE"), "{push:#?}");
        walrs
            .fetch(&name, &dest)
            .expect_code(code::RECOVERY_ABORT + code::CONFIG, &format!("fetch with WALRS_STORE={bad}"));
    }
    assert!(!dest.exists());
}

// --- a store that does not exist ---------------------------------------------------------

/// A missing directory or bucket is not an empty archive: wal-fetch must not answer "not in
/// the archive" (1), which would end a recovery at its start.
fn missing_store_is_not_an_empty_archive(wd: &WorkDir, store: &StoreEnv) {
    let walrs = WalRs::new(wd, store);
    let dest = wd.dir("out").join("RECOVERYXLOG");
    for name in [segment_name(1, 3), "00000002.history".to_string()] {
        let run = walrs.fetch(&name, &dest);
        run.expect_code(code::RECOVERY_ABORT + code::STORE_MISSING, &format!("fetch of {name} from {}", store.url));
    }
    walrs.push(&segment_file(wd, 3, SYSID, 1).0).expect_code(code::STORE_MISSING, "push into a missing store");
    assert!(!dest.exists());
}

#[test]
fn missing_store_directory_is_not_an_empty_archive() {
    let wd = WorkDir::new("nostore-local");
    missing_store_is_not_an_empty_archive(&wd, &StoreEnv::local(&wd.join("never-created")));
}

#[test]
fn missing_bucket_is_not_an_empty_archive() {
    let wd = WorkDir::new("nostore-s3");
    let s3 = S3Server::start(&wd);
    let store = s3.store("p");
    let url = "s3://no-such-bucket/p";
    missing_store_is_not_an_empty_archive(&wd, &store.with("WALRS_STORE", url));
}

// --- input that is not a WAL file -------------------------------------------------------

#[test]
fn invalid_input_is_refused_before_the_store_is_touched() {
    let wd = WorkDir::new("invalid");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store);
    let name = segment_name(1, 3);
    let good = craft_segment(1, 3, SYSID, 1);
    let mut one_byte_more = good.clone();
    one_byte_more.push(0);
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("a truncated segment", name.clone(), good[..SEG_SIZE / 2].to_vec()),
        ("a segment one byte too long", name.clone(), one_byte_more),
        ("a segment without a page header", name.clone(), vec![0; SEG_SIZE]),
        ("the header of another segment", name.clone(), craft_segment(1, 5, SYSID, 1)),
        ("the header of a later timeline", name.clone(), craft_segment(2, 3, SYSID, 1)),
        ("a file shorter than a page header", name.clone(), good[..20].to_vec()),
        ("a name that is not a WAL file's", "notawalfile".into(), good.clone()),
        ("a lower-case segment name", segment_name(1, 10).to_lowercase(), craft_segment(1, 10, SYSID, 1)),
        ("a binary timeline history file", "00000002.history".into(), vec![0, 1, 2, 0, 255]),
        ("an empty timeline history file", "00000003.history".into(), Vec::new()),
    ];
    for (i, (what, file_name, bytes)) in cases.iter().enumerate() {
        let input = write_file(&wd.dir(&format!("case-{i}")), file_name, bytes);
        let run = walrs.push(&input);
        run.expect_code(code::INVALID_INPUT, &format!("push of {what}"));
        assert!(run.logged("outcome", "error") && run.logged("exit", "4"), "{what}: {run:#?}");
    }
    assert!(files_under(&store.objects_root).is_empty(), "stored: {:?}", files_under(&store.objects_root));
    // The store itself was usable all along.
    let input = write_file(&wd.dir("valid"), &name, &good);
    walrs.push(&input).expect_code(0, "push of a valid segment");
    assert!(lz4_cli_decompress(&store.wal_object(&name)) == good);
}

// --- a store that stops answering, or answers slowly ------------------------------------

/// Runs `wal-rs ARGS` and waits for it at most `guard`: one still running then is killed and
/// the test fails (it would have held PostgreSQL forever). Returns the exit code, the time
/// it took and its output.
fn run_guarded(walrs: &WalRs, args: &[&str], log: &Path, guard: Duration) -> (i32, Duration, String) {
    let started = std::time::Instant::now();
    let mut child = walrs.spawn(args, log);
    loop {
        if let Some(status) = child.try_wait().expect("waiting for wal-rs") {
            let output = fs::read_to_string(log).unwrap_or_default();
            return (status.code().unwrap_or(-1), started.elapsed(), output);
        }
        if started.elapsed() > guard {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "wal-rs {args:?} still ran after {guard:?}: it never ends; its output: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A FIFO at `path`: opening it for reading waits for a writer that never comes, as a call
/// on a hard-mounted NFS share whose server is gone waits for the server.
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path it is given.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// A local store whose file system stops answering (here: FIFOs where wal-fetch reads the
/// segment and wal-push reads the cluster's identity): each command still ends, with its
/// storage failure code and one error line, instead of holding PostgreSQL forever.
#[test]
fn a_store_call_that_never_returns_still_ends_wal_fetch_and_wal_push() {
    let wd = WorkDir::new("stuck-store");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store).env("WALRS_RETRY_DEADLINE_SECS", "2").env("WALRS_PREFETCH_COUNT", "0");
    let name = segment_name(1, 3);
    mkfifo(&store.wal_object(&name));
    mkfifo(&store.object_path("walrs/cluster.json"));
    let dest = wd.dir("out").join("RECOVERYXLOG");
    let (input, _) = segment_file(&wd, 4, SYSID, 1);
    // The 2 s deadline, the 5 s more a stuck call gets, and time to start on a loaded machine.
    let limit = Duration::from_secs(2 + 5 + 8);
    let guard = Duration::from_secs(60);
    let fetch_args = ["wal-fetch", name.as_str(), dest.to_str().unwrap()];
    let push_args = ["wal-push", input.to_str().unwrap()];
    for (what, walrs, args, expected) in [
        ("wal-fetch", walrs.clone(), &fetch_args[..], code::RECOVERY_ABORT + code::STORAGE),
        ("wal-fetch in a standby", walrs.clone().cwd(&standby_dir(&wd)), &fetch_args[..], code::NOT_IN_ARCHIVE),
        ("wal-push", walrs.clone(), &push_args[..], code::STORAGE),
    ] {
        let log = wd.join(&format!("{}.log", what.replace(' ', "-")));
        let (exit, took, output) = run_guarded(&walrs, args, &log, guard);
        assert_eq!(exit, expected, "{what}: {output}");
        assert!(took < limit, "{what} took {took:?}: {output}");
        let errors: Vec<&str> = output.lines().filter(|l| l.contains("level=error")).collect();
        assert_eq!(errors.len(), 1, "{what}: not one error line: {output}");
        assert!(errors[0].contains(&format!("exit={expected}")) && errors[0].contains(&store.url), "{what}: {output}");
    }
    assert!(!dest.exists());
}

/// `retry_deadline_secs` bounds time without progress, not a transfer whose bytes keep
/// moving: a 16 MiB segment, stored uncompressed, at 4 MB/s takes about 4 s, twice the
/// deadline, and is pushed and restored.
#[test]
fn a_slow_transfer_that_keeps_moving_outlasts_the_retry_deadline() {
    let wd = WorkDir::new("slow-transfer");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store)
        .env("WALRS_COMPRESSION", "none")
        .env("WALRS_RETRY_DEADLINE_SECS", "2")
        .env("WALRS_PREFETCH_COUNT", "0")
        .env("WALRS_NETWORK_RATE_LIMIT", "4000000");
    let (input, bytes) = segment_file(&wd, 3, SYSID, 1);
    let past_the_deadline = Duration::from_millis(2500);

    let push = walrs.push(&input);
    push.expect_code(0, "a slow push");
    assert!(push.elapsed >= past_the_deadline, "the limit did not slow the push: {push:#?}");
    let dest = wd.dir("out").join("RECOVERYXLOG");
    let fetch = walrs.fetch(&segment_name(1, 3), &dest);
    fetch.expect_code(0, "a slow fetch");
    assert!(fetch.elapsed >= past_the_deadline, "the limit did not slow the fetch: {fetch:#?}");
    assert!(read(&dest) == bytes, "restored other bytes");
}

/// A prefetcher whose server stops while it downloads stops its downloads and removes what
/// they wrote: no temporary file, claim or segment is left in pg_wal.
#[test]
fn a_prefetcher_stopped_mid_download_leaves_nothing_in_pg_wal() {
    let wd = WorkDir::new("prefetch-stop");
    let store = local_store(&wd);
    let walrs = WalRs::new(&wd, &store);
    for segno in 4..=6 {
        let name = segment_name(1, segno);
        let input =
            write_file(&wd.dir(&format!("in/{segno}")), &name, &craft_incompressible_segment(1, segno, SYSID, segno));
        walrs.push(&input).expect_code(0, "push");
    }
    let data = wd.dir("data");
    fs::write(data.join("postmaster.pid"), "4242\n/data\n").unwrap();
    let dir = wd.dir("data/pg_wal").join("walrs_prefetch");
    let leftovers = || -> Vec<String> {
        fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".walrs-partial.") || n.ends_with(".claim") || n.starts_with("00000001"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // 1 MB/s for three 16 MiB downloads: they are under way for many seconds.
    let prefetcher = walrs.env("WALRS_NETWORK_RATE_LIMIT", "1000000").env("WALRS_PREFETCH_COUNT", "3").cwd(&data);
    let log = wd.join("prefetch.log");
    let args = ["wal-prefetch", &segment_name(1, 3), dir.to_str().unwrap(), &SEG_SIZE.to_string()];
    let mut child = prefetcher.spawn(&args, &log);
    wait_until("downloads under way", Duration::from_secs(30), || {
        leftovers().iter().any(|n| n.contains(".walrs-partial."))
    });

    // The server stops (a new postmaster.pid): the prefetcher exits.
    fs::write(data.join("postmaster.pid"), "4343\n/data\n").unwrap();
    let stopped = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if stopped.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the prefetcher did not exit: {}", fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(leftovers(), Vec::<String>::new(), "left in pg_wal: {}", fs::read_to_string(&log).unwrap_or_default());
}
