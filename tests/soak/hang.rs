//! Black holes: requests read and never answered. wal-push, wal-fetch and backup-push each
//! end within their configured deadline (`retry_deadline_secs` 3 s, `request_timeout_secs`
//! 1 s) with one clear error line, whether every request, only uploads, or a third of all
//! requests vanish. None hangs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{add_injected, seed, write_results, Proxy};
use crate::harness::pg::PgCluster;
use crate::harness::s3::S3Server;
use crate::harness::{craft_segment, read, segment_name, write_file, Run, WalRs, WorkDir};

const SYSID: u64 = 7_300_000_000_000_000_701;
const DEADLINE: u64 = 3;

fn scale() -> u64 {
    std::env::var("WALRS_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

#[test]
fn hang_black_holes() {
    let scenario = "hang_black_holes";
    let seed = seed(scenario);
    let started = Instant::now();
    let wd = WorkDir::new("soak-hang");
    let s3 = S3Server::start(&wd);
    let proxy = Proxy::start(&s3, seed, &[]);
    let primary = PgCluster::init(&wd, "primary");
    primary.archive_to(&s3.store("hang-pg"));
    primary.start();
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    let settings = |w: WalRs| {
        w.env("WALRS_RETRY_DEADLINE_SECS", &DEADLINE.to_string())
            .env("WALRS_REQUEST_TIMEOUT_SECS", "1")
            .env("WALRS_PREFETCH_COUNT", "0")
            .env("WALRS_BACKUP_PARTITION_SIZE_MIB", "4")
    };
    let wal = settings(WalRs::new(&wd, &proxy.store(&s3, "hang-wal")));
    let direct_wal = settings(WalRs::new(&wd, &s3.store("hang-wal")));
    let backup = settings(WalRs::new(&wd, &proxy.store(&s3, "hang-pg")))
        .run_as_postgres()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", &primary.port.to_string())
        .env("PGUSER", "postgres");
    // A segment in the store for wal-fetch.
    let src = wd.dir("src");
    let fetched_name = segment_name(1, 3);
    let fetched_bytes = craft_segment(1, 3, SYSID, 3);
    direct_wal.push(&write_file(&src, &fetched_name, &fetched_bytes)).expect_code(0, "setup push");

    let modes =
        [("all", "blackhole=1&only="), ("uploads", "blackhole=1&only=PUT+"), ("a third", "blackhole=0.3&only=")];
    let trials_per_mode = 3 * scale();
    let mut rows = Vec::new();
    let mut injected = BTreeMap::new();
    let mut worst: BTreeMap<&str, f64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut segno = 10u64;
    let mut trials = 0u64;
    let mut hung = Vec::new();
    for (mode, query) in modes {
        proxy.set(query);
        for _ in 0..trials_per_mode {
            segno += 1;
            let name = segment_name(1, segno);
            let bytes = craft_segment(1, segno, SYSID, segno);
            let file = write_file(&src, &name, &bytes);
            let dest = wd.dir("out").join("RECOVERYXLOG");
            let _ = std::fs::remove_file(&dest);
            let runs: Vec<(&str, Run, &[i32])> = vec![
                ("wal-push", wal.push(&file), &[0, 7]),
                ("wal-fetch", wal.fetch(&fetched_name, &dest), &[0, 207]),
                ("backup-push", watched(&backup, &wd, &primary, &mut hung), &[0, 7, 13]),
            ];
            trials += 1;
            for (cmd, run, allowed) in runs {
                // backup-push makes many requests, each bounded; the limit is its deadline
                // per request plus the time to read the database.
                let limit = Duration::from_secs(DEADLINE + if cmd == "backup-push" { 12 } else { 4 });
                if run.code == -9 {
                    // Recorded in `hung`, reported below with the figures.
                    *outcomes.entry(format!("{cmd} killed after {} s, hung ({mode})", limit.as_secs())).or_default() +=
                        1;
                    continue;
                }
                assert!(run.elapsed < limit, "{cmd} with {mode} black-holed took {:?}: {run:#?}", run.elapsed);
                assert!(allowed.contains(&run.code), "{cmd} with {mode} black-holed: {run:#?}");
                if run.code != 0 {
                    let lines: Vec<&str> = run.stderr.lines().filter(|l| l.contains("level=error")).collect();
                    assert_eq!(lines.len(), 1, "{cmd}: not one error line: {run:#?}");
                }
                if cmd == "wal-fetch" && run.code == 0 {
                    assert!(read(&dest) == fetched_bytes, "wal-fetch restored other bytes");
                }
                if cmd == "wal-fetch" && run.code != 0 {
                    assert!(!dest.exists(), "a failed wal-fetch left {}", dest.display());
                }
                let w = worst.entry(cmd).or_default();
                *w = w.max(run.elapsed.as_secs_f64());
                *outcomes.entry(format!("{cmd} exit {}", run.code)).or_default() += 1;
                rows.push(
                    json!({"mode": mode, "command": cmd, "exit": run.code, "seconds": run.elapsed.as_secs_f64()}),
                );
            }
            // What wal-push acknowledged is whole (checked without the proxy).
            let check = wd.dir("check").join("x");
            if direct_wal.fetch(&name, &check).code == 0 {
                assert!(read(&check) == bytes, "{name}: stored bytes differ");
                let _ = std::fs::remove_file(&check);
            }
        }
        add_injected(&mut injected, &proxy.clear());
    }
    proxy.set("blackhole=0&only=");
    primary.stop();
    write_results(
        scenario,
        seed,
        started,
        json!({
            "trials": trials,
            "commands_run": rows.len(),
            "deadline_secs": DEADLINE,
            "faults_injected": injected,
            "slowest_seconds": worst,
            "outcomes": outcomes,
            "failures": hung.len(),
            "hung": hung,
        }),
    );
    assert!(hung.is_empty(), "commands that never ended (killed by the test): {hung:?}");
}

/// backup-push, killed by the test if it runs past its deadline plus 12 s (a hang): then
/// the run is reported with code -9 and added to `hung`.
fn watched(walrs: &WalRs, wd: &WorkDir, primary: &PgCluster, hung: &mut Vec<String>) -> Run {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let log = wd.join(&format!("backup-push-{}.log", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let started = Instant::now();
    let mut child = walrs.spawn(&["backup-push", "--fast", primary.data.to_str().unwrap()], &log);
    let limit = Duration::from_secs(DEADLINE + 12);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        if started.elapsed() > limit + Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            hung.push(format!("backup-push: {}", std::fs::read_to_string(&log).unwrap_or_default().trim()));
            break -9;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    Run { code, stdout: String::new(), stderr: output, elapsed: started.elapsed() }
}
