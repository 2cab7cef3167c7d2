//! What the soak scenarios share: the fault proxy, a seeded random generator, the figures
//! each scenario writes, tmpfs mounts, and store checks.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::harness::s3::S3Server;
use crate::harness::StoreEnv;

/// The seed of this run: `WALRS_SOAK_SEED`, else the clock. Printed, so a failure can be
/// replayed with the same random moments and fault draws.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("WALRS_SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("WALRS_SOAK_SEED must be a whole number"))
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007);
    eprintln!("soak {scenario}: seed {seed} (replay with WALRS_SOAK_SEED={seed})");
    seed
}

/// xorshift64*: small, seeded, good enough to pick moments.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// The test running on this thread, by its full name (`crash::crash_backups`): libtest runs
/// each test on a thread named after it, also with `--test-threads=1`.
pub fn current_test() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => panic!("current_test: not on a test's thread (libtest names each test's thread after the test)"),
    }
}

/// The command that replays the running test with `seed`. A scenario is not always a test
/// of its own (`crash_backups` writes `crash_backup_push` and `crash_backup_fetch`), so the
/// filter is the test's full name, matched exactly: it always runs that one test.
pub fn rerun_command(seed: u64) -> String {
    format!("WALRS_SOAK_SEED={seed} cargo test --release --test soak {} -- --exact --test-threads=1", current_test())
}

/// Writes `target/soak-results/<scenario>.json` with the figures and how to rerun.
pub fn write_results(scenario: &str, seed: u64, started: std::time::Instant, mut figures: Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak-results");
    fs::create_dir_all(&dir).expect("creating target/soak-results");
    let obj = figures.as_object_mut().expect("figures are an object");
    obj.insert("scenario".into(), json!(scenario));
    obj.insert("seed".into(), json!(seed));
    obj.insert("seconds".into(), json!(started.elapsed().as_secs_f64().round()));
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().ok();
    let date = date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    obj.insert("date".into(), json!(date));
    obj.insert("rerun".into(), json!(rerun_command(seed)));
    let path = dir.join(format!("{scenario}.json"));
    fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()).expect("writing the results");
    eprintln!("soak {scenario}: {}", serde_json::to_string(&figures).unwrap());
}

/// The walrs-faultproxy binary, built by `make build`.
fn proxy_bin() -> PathBuf {
    std::env::var_os("WALRS_FAULTPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/walrs-faultproxy"))
}

/// A fault proxy in front of an S3 server, with its control API.
pub struct Proxy {
    child: Child,
    pub port: u16,
}

impl Proxy {
    pub fn start(s3: &S3Server, seed: u64, args: &[&str]) -> Proxy {
        Proxy::start_to(s3.port, seed, args)
    }

    /// A proxy in front of whatever listens on `upstream` (127.0.0.1).
    pub fn start_to(upstream: u16, seed: u64, args: &[&str]) -> Proxy {
        let bin = proxy_bin();
        assert!(bin.exists(), "{} is missing: run `make build`", bin.display());
        let mut child = Command::new(bin)
            .args(["--upstream", &format!("127.0.0.1:{upstream}"), "--control", "--seed", &seed.to_string()])
            .args(if args.contains(&"--delay-ms") { &[][..] } else { &["--delay-ms", "0"][..] })
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

    fn control(&self, path: &str) -> Value {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to the proxy");
        write!(s, "GET /__faultproxy/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        let json = &body[body.find('{').unwrap_or_else(|| panic!("proxy answered {body}"))..];
        serde_json::from_str(json).expect("proxy json")
    }

    /// The counters.
    pub fn stats(&self) -> Value {
        self.control("stats")
    }

    /// Zeroes the counters; returns them as they were.
    pub fn clear(&self) -> Value {
        let before = self.stats();
        self.control("clear");
        before
    }

    /// Changes settings (`rate_500=0.1&only=GET+`).
    pub fn set(&self, query: &str) {
        let v = self.control(&format!("set?{query}"));
        assert!(v.get("error").is_none(), "proxy set {query}: {v}");
    }

    /// The store `prefix` on `s3`, reached through this proxy.
    pub fn store(&self, s3: &S3Server, prefix: &str) -> StoreEnv {
        s3.store(prefix).with("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{}", self.port))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `injected` of the stats, summed over several snapshots.
pub fn add_injected(total: &mut BTreeMap<String, u64>, stats: &Value) {
    if let Some(m) = stats["injected"].as_object() {
        for (k, v) in m {
            *total.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
        }
    }
}

/// The fault kinds that proxy arguments `args` inject: `--rate-KIND R` with R above 0. KIND
/// is the proxy's name for the counter in `injected` (`--rate-reset` counts as `reset`).
pub fn kinds_in_mix(args: &[&str]) -> Vec<String> {
    args.windows(2)
        .filter_map(|w| {
            let kind = w[0].strip_prefix("--rate-")?;
            let rate: f64 = w[1].parse().unwrap_or_else(|_| panic!("proxy argument {} {}: not a rate", w[0], w[1]));
            (rate > 0.0).then(|| kind.to_string())
        })
        .collect()
}

/// The kinds of the mix `args` (see [`kinds_in_mix`]) that `injected` counts no fault of.
/// Kinds the mix leaves out are not looked at: the proxy counts every kind it knows.
pub fn kinds_never_injected(args: &[&str], injected: &BTreeMap<String, u64>) -> Vec<String> {
    kinds_in_mix(args).into_iter().filter(|k| injected.get(k).copied().unwrap_or(0) == 0).collect()
}

/// A tmpfs of `mib` MiB at `dir`, owned by postgres, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, mib: u64) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(out.status.success(), "mount tmpfs on {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        crate::harness::workdir::chown_postgres(dir);
        Tmpfs { dir: dir.to_path_buf() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg("-l").arg(&self.dir).output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("warning: could not unmount {}", self.dir.display());
        }
    }
}

/// Regular files under `dir` (recursively), relative, whose name starts with a dot: the
/// temporary names a store writes before publishing.
pub fn hidden_files(dir: &Path) -> Vec<PathBuf> {
    crate::harness::files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect()
}

/// Checks of the soak machinery itself, in seconds: `cargo test --test soak checks`.
mod checks {
    use super::*;

    /// `--list --format terse` of this test binary with `args`: one `NAME: test` per test.
    fn listed(args: &[&str]) -> Vec<String> {
        let exe = std::env::current_exe().expect("the test binary");
        let out = Command::new(exe).args(["--list", "--format", "terse"]).args(args).output().expect("--list");
        assert!(out.status.success(), "--list {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// The test filter and options of a rerun command: what follows `--test soak`.
    fn test_args(rerun: &str) -> Vec<&str> {
        let (_, args) = rerun.split_once("--test soak ").unwrap_or_else(|| panic!("not a soak command: {rerun}"));
        args.split_whitespace().filter(|a| *a != "--" && !a.starts_with("--test-threads")).collect()
    }

    #[test]
    fn the_rerun_command_runs_exactly_the_running_test() {
        let rerun = rerun_command(7);
        assert!(rerun.starts_with("WALRS_SOAK_SEED=7 "), "{rerun}");
        assert_eq!(
            listed(&test_args(&rerun)),
            ["common::checks::the_rerun_command_runs_exactly_the_running_test: test"]
        );
    }

    /// Every rerun command of the table in docs/reliability.md runs one test of this binary.
    #[test]
    fn each_documented_rerun_command_runs_one_test() {
        let doc = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reliability.md")).unwrap();
        let (_, table) = doc.split_once("<!-- soak-table -->").expect("the soak table");
        let (table, _) = table.split_once("<!-- /soak-table -->").expect("the end of the soak table");
        let commands: Vec<&str> = table.split('`').filter(|cell| cell.starts_with("WALRS_SOAK_SEED=")).collect();
        assert!(!commands.is_empty(), "no rerun command in the table of docs/reliability.md");
        for rerun in commands {
            let tests = listed(&test_args(rerun));
            assert_eq!(tests.len(), 1, "`{rerun}` runs {} tests: {tests:?}", tests.len());
        }
    }

    #[test]
    fn only_the_kinds_of_the_mix_must_be_injected() {
        let mix = ["--rate-500", "0.1", "--rate-reset", "0.05", "--rate-503", "0", "--delay-ms", "5"];
        assert_eq!(kinds_in_mix(&mix), ["500", "reset"]);
        // What the proxy reports after such a run: a counter for every kind it knows.
        let mut injected: BTreeMap<String, u64> =
            ["500", "503", "reset", "truncate", "blackhole", "404", "nosuchkey", "409"]
                .iter()
                .map(|k| (k.to_string(), 0))
                .collect();
        assert_eq!(kinds_never_injected(&mix, &injected), ["500", "reset"]);
        injected.insert("500".into(), 3);
        assert_eq!(kinds_never_injected(&mix, &injected), ["reset"]);
        injected.insert("reset".into(), 1);
        assert!(kinds_never_injected(&mix, &injected).is_empty());
    }
}
