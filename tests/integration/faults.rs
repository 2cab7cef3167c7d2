//! The fault proxy's modes against wal-push and wal-fetch: with transient faults at a high
//! rate every command still succeeds with the right bytes (retries work, truncated bodies
//! are caught, not restored); with a black hole every command ends within its deadline
//! with the documented exit code. The proxy's counters prove each fault was injected.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::s3::S3Server;
use crate::harness::{craft_segment, read, segment_name, sha256_hex, StoreEnv, WalRs, WorkDir};

const SYSID: u64 = 7_300_000_000_000_000_077;

/// The walrs-faultproxy binary, built by `make test` with the rest of the workspace.
fn proxy_bin() -> PathBuf {
    std::env::var_os("WALRS_FAULTPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/walrs-faultproxy"))
}

/// A proxy in front of `upstream_port`, with control requests enabled.
struct Proxy {
    child: Child,
    port: u16,
}

impl Proxy {
    fn start(upstream_port: u16, args: &[&str]) -> Proxy {
        let bin = proxy_bin();
        assert!(bin.exists(), "{} is missing: run `make build` (cargo build --release --workspace)", bin.display());
        let mut child = Command::new(bin)
            .args(["--upstream", &format!("127.0.0.1:{upstream_port}"), "--control", "--seed", "7"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the fault proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("proxy banner");
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).expect("listening ADDR:PORT");
        Proxy { child, port }
    }

    /// `injected.KIND` from the stats.
    fn injected(&self, kind: &str) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET /__faultproxy/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        let json = &body[body.find('{').expect("stats json")..];
        let v: serde_json::Value = serde_json::from_str(json).expect("stats json");
        v["injected"][kind].as_u64().unwrap_or(0)
    }

    fn store(&self, s3: &S3Server, prefix: &str) -> StoreEnv {
        s3.store(prefix).with("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{}", self.port))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_of(s3: &S3Server) -> u16 {
    s3.endpoint().rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn transient_faults_are_retried_and_never_restore_wrong_bytes() {
    let wd = WorkDir::new("faults");
    let s3 = S3Server::start(&wd);
    let src = wd.dir("src");
    for (kind, flag) in [
        ("500", "--rate-500"),
        ("503", "--rate-503"),
        ("reset", "--rate-reset"),
        ("truncate", "--rate-truncate"),
        ("404", "--rate-404"),
        ("409", "--rate-409"),
    ] {
        let proxy = Proxy::start(port_of(&s3), &[flag, "0.3", "--delay-ms", "5"]);
        let store = proxy.store(&s3, kind);
        let walrs = WalRs::new(&wd, &store).env("WALRS_PREFETCH_COUNT", "0").env("WALRS_RETRY_DEADLINE_SECS", "60");
        for segno in 1..7u64 {
            let name = segment_name(1, segno);
            let bytes = craft_segment(1, segno, SYSID, segno);
            let path = src.join(format!("{kind}-{name}"));
            std::fs::create_dir_all(&path).unwrap();
            let file = path.join(&name);
            std::fs::write(&file, &bytes).unwrap();
            walrs.push(&file).expect_code(0, &format!("push through {kind} faults"));
            let out = path.join("fetched");
            walrs.fetch(&name, &out).expect_code(0, &format!("fetch through {kind} faults"));
            assert_eq!(sha256_hex(&read(&out)), sha256_hex(&bytes), "{kind}: wrong bytes restored");
            // The object itself is whole (checked without the proxy).
            assert_eq!(crate::harness::lz4_cli_decompress(&store.wal_object(&name)), bytes);
        }
        assert!(proxy.injected(kind) > 0, "no {kind} fault was injected");
    }
}

#[test]
fn a_black_hole_ends_every_command_within_its_deadline() {
    let wd = WorkDir::new("blackhole");
    let s3 = S3Server::start(&wd);
    let proxy = Proxy::start(port_of(&s3), &["--rate-blackhole", "1.0"]);
    let store = proxy.store(&s3, "bh");
    let walrs = WalRs::new(&wd, &store)
        .env("WALRS_RETRY_DEADLINE_SECS", "3")
        .env("WALRS_REQUEST_TIMEOUT_SECS", "1")
        .env("WALRS_PREFETCH_COUNT", "0");
    let name = segment_name(1, 1);
    let file = wd.dir("src").join(&name);
    std::fs::write(&file, craft_segment(1, 1, SYSID, 1)).unwrap();
    let push = walrs.push(&file);
    push.expect_code(7, "push into a black hole");
    assert!(push.elapsed < Duration::from_secs(8), "push took {:?}", push.elapsed);
    let fetch = walrs.fetch(&name, &wd.join("out"));
    fetch.expect_code(207, "fetch from a black hole, not in a standby");
    assert!(fetch.elapsed < Duration::from_secs(8), "fetch took {:?}", fetch.elapsed);
    assert!(!wd.join("out").exists());
    assert!(proxy.injected("blackhole") > 0);
    // Nothing reached the store.
    assert!(store.wal_objects().is_empty());
}

/// The safety valve is for a store that is down, and the common way a store goes down
/// behind a load balancer is to take connections and never answer. Over the limit, the
/// valve decides before anything waits on the store or the daemon (a server runs here, as
/// far as wal-push can tell): it drops the segment, keeps the gap record in pg_wal, and
/// exits 0 well within the deadline. Before, every call waited for the daemon, then for
/// the store, and ended with exit 7 at the deadline: nothing was ever dropped.
#[test]
fn the_valve_drops_while_the_store_never_answers() {
    let wd = WorkDir::new("valve-blackhole");
    let s3 = S3Server::start(&wd);
    let proxy = Proxy::start(port_of(&s3), &["--rate-blackhole", "1.0"]);
    let store = proxy.store(&s3, "valve");
    let data = wd.dir("data");
    let pg_wal = data.join("pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    let names: Vec<String> = (1..4u64)
        .map(|segno| {
            let name = segment_name(1, segno);
            std::fs::write(pg_wal.join(&name), craft_segment(1, segno, SYSID, segno)).unwrap();
            std::fs::write(pg_wal.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
            name
        })
        .collect();
    std::fs::write(data.join("postmaster.pid"), "4242\n").unwrap();
    let deadline = Duration::from_secs(6);
    let run = WalRs::new(&wd, &store)
        .env("WALRS_ARCHIVE_QUEUE_MAX", &(1u64 << 20).to_string())
        .env("WALRS_RETRY_DEADLINE_SECS", &deadline.as_secs().to_string())
        .env("WALRS_PREFETCH_COUNT", "0")
        .cwd(&data)
        .run(&["wal-push", &format!("pg_wal/{}", names[0])]);
    run.expect_code(0, "push over the valve's limit into a black hole");
    assert!(run.logged("outcome", "dropped"), "{run:#?}");
    assert!(run.elapsed < deadline * 2 / 3, "the valve took {:?} of a {deadline:?} deadline", run.elapsed);
    let gap = pg_wal.join("walrs_archive_status/gaps").join(format!("{}.json", names[0]));
    let record: serde_json::Value = serde_json::from_slice(&read(&gap)).expect("a gap record kept in pg_wal");
    assert_eq!(record["name"], names[0].as_str());
    assert!(proxy.injected("blackhole") > 0);
    assert!(store.wal_objects().is_empty());
    assert!(!pg_wal.join("walrs_archive_status/.daemon.sock").exists(), "a daemon was started and asked first");
}

/// Segment 1 of timeline 1, written to a file of its own: its name, bytes and path.
fn first_segment(wd: &WorkDir) -> (String, Vec<u8>, PathBuf) {
    let name = segment_name(1, 1);
    let bytes = craft_segment(1, 1, SYSID, 1);
    let file = wd.dir("src").join(&name);
    std::fs::write(&file, &bytes).unwrap();
    (name, bytes, file)
}

/// [`first_segment`], pushed into `store` directly (without a proxy).
fn archived_first_segment(wd: &WorkDir, store: &StoreEnv) -> (String, Vec<u8>, PathBuf) {
    let segment = first_segment(wd);
    WalRs::new(wd, store).push(&segment.2).expect_code(0, "push, without the proxy");
    segment
}

/// A 404 that is not S3's NoSuchKey (a gateway or a proxy routed wrongly answered, not the
/// store) is not "not in the archive": wal-fetch retries and restores the segment, and if
/// it keeps coming, aborts the recovery (exit 207) rather than end it at that segment.
#[test]
fn a_gateways_404_is_not_the_end_of_the_archive() {
    let wd = WorkDir::new("gateway-404");
    let s3 = S3Server::start(&wd);
    let segment = archived_first_segment(&wd, &s3.store("gw"));
    one_faulty_read_is_retried(&wd, &s3, "gw", &segment, "--rate-404", "404");

    // Every read: the store's listing has the object, so this is an outage, not its end.
    let always = Proxy::start(port_of(&s3), &["--delay-ms", "0", "--rate-404", "1", "--only", "x-id=GetObject"]);
    let walrs = WalRs::new(&wd, &always.store(&s3, "gw"))
        .env("WALRS_PREFETCH_COUNT", "0")
        .env("WALRS_RETRY_DEADLINE_SECS", "3");
    let out = wd.join("out");
    walrs.fetch(&segment.0, &out).expect_code(207, "fetch while a gateway answers 404 to every read");
    assert!(!out.exists());
    assert!(always.injected("404") > 1);
}

/// A replica whose reads lag its listings: S3's own NoSuchKey for an object the listing
/// shows is not "not in the archive" either; the retry restores the segment.
#[test]
fn a_read_that_misses_a_listed_object_is_retried() {
    let wd = WorkDir::new("stale-read");
    let s3 = S3Server::start(&wd);
    let segment = archived_first_segment(&wd, &s3.store("stale"));
    one_faulty_read_is_retried(&wd, &s3, "stale", &segment, "--rate-nosuchkey", "nosuchkey");
    // wal-push reads too (the cluster's record): a miss there is not "no record".
    let proxy = Proxy::start(
        port_of(&s3),
        &["--delay-ms", "0", "--rate-nosuchkey", "1", "--only", "x-id=GetObject", "--fault-budget", "1"],
    );
    let store = proxy.store(&s3, "stale");
    let (input, bytes) = (wd.dir("src2").join(segment_name(1, 2)), craft_segment(1, 2, SYSID, 2));
    std::fs::write(&input, &bytes).unwrap();
    WalRs::new(&wd, &store).push(&input).expect_code(0, "push after one read that missed an object");
    assert_eq!(proxy.injected("nosuchkey"), 1);
    assert_eq!(crate::harness::lz4_cli_decompress(&store.wal_object(&segment_name(1, 2))), bytes);
}

/// Fetches `segment` (pushed under `prefix`) through a proxy that answers the first read of
/// an object with a fault (`flag`, counted as `kind`): the retry must restore its bytes.
fn one_faulty_read_is_retried(
    wd: &WorkDir,
    s3: &S3Server,
    prefix: &str,
    segment: &(String, Vec<u8>, PathBuf),
    flag: &str,
    kind: &str,
) {
    let (name, bytes, _) = segment;
    let proxy =
        Proxy::start(port_of(s3), &["--delay-ms", "0", flag, "1", "--only", "x-id=GetObject", "--fault-budget", "1"]);
    let walrs = WalRs::new(wd, &proxy.store(s3, prefix)).env("WALRS_PREFETCH_COUNT", "0");
    let out = wd.join("out");
    walrs.fetch(name, &out).expect_code(0, &format!("fetch after one {kind} answer to a read"));
    assert_eq!(sha256_hex(&read(&out)), sha256_hex(bytes));
    assert_eq!(proxy.injected(kind), 1);
    std::fs::remove_file(&out).unwrap();
}

/// A 409 ConditionalRequestConflict on the upload (an earlier attempt's conditional write
/// still in progress) is retried: wal-push stores the segment and exits 0.
#[test]
fn a_conditional_write_conflict_is_retried() {
    let wd = WorkDir::new("conflict-409");
    let s3 = S3Server::start(&wd);
    let (name, bytes, file) = first_segment(&wd);
    let upload = format!("wal_005/{name}.lz4?x-id=PutObject");
    let proxy =
        Proxy::start(port_of(&s3), &["--delay-ms", "0", "--rate-409", "1", "--only", &upload, "--fault-budget", "1"]);
    let store = proxy.store(&s3, "c409");
    WalRs::new(&wd, &store).push(&file).expect_code(0, "push through one 409");
    assert_eq!(proxy.injected("409"), 1);
    assert_eq!(crate::harness::lz4_cli_decompress(&store.wal_object(&name)), bytes);
}
