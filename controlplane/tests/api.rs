//! The control plane end to end, through its HTTP API, with real PostgreSQL 15, the local
//! provider and a local directory store: create a database, follow it, fork it at a time,
//! kill PostgreSQL and a worker and watch the system repair itself, roll back, unfollow,
//! destroy.
//!
//! Processes: `wal-rs-control all --workers 0` (web, observer, clock) plus separate `worker`
//! processes, so a worker can be killed in the middle of a restore while the rest runs on.
//! Needs target/release/wal-rs (`make build`, or `cargo build --release -p wal-rs`), or
//! WALRS_BIN. Tests run as root on CI: the control plane runs PostgreSQL as postgres itself.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

const CONVERGE: Duration = Duration::from_secs(90);

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
#[track_caller]
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn walrs_bin() -> PathBuf {
    let bin = std::env::var_os("WALRS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/wal-rs"));
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --release -p wal-rs` (make test does), or set WALRS_BIN",
        bin.display()
    );
    bin
}

/// A control plane: its data folder and processes. Dropping it kills the processes, stops
/// every PostgreSQL it started (`stop-all`) and removes the folder, also when a test fails.
struct ControlPlane {
    data: PathBuf,
    port: u16,
    procs: Vec<(String, Child)>,
    bin: PathBuf,
    /// `WALRS_*` settings given to every process.
    walrs_env: Vec<(String, String)>,
}

impl ControlPlane {
    fn new() -> ControlPlane {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let data = PathBuf::from(format!("/tmp/walrs-cp-{}-{nanos:08x}", std::process::id()));
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = walrs_bin();
        ControlPlane { data, port, procs: Vec::new(), bin, walrs_env: Vec::new() }
    }

    /// Makes every process started from now on encrypt, with a key file in the data folder
    /// (readable by postgres, who runs archive_command and restore_command).
    fn encrypt(&mut self) {
        let keys = self.data.join("keys");
        fs::write(&keys, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o644)).unwrap();
        self.walrs_env.push(("WALRS_ENCRYPTION_KEY_FILE".into(), keys.display().to_string()));
    }

    /// The state database (the private cluster under the data folder).
    fn state_db(&self) -> String {
        format!("host={} port=5432 user=postgres dbname=postgres", self.data.join("run").display())
    }

    /// Starts `wal-rs-control ARGS...` with fast ticks; stdout goes to `<data>/<name>.log`.
    fn spawn(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) {
        let log = fs::File::create(self.data.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wal-rs-control"))
            .args(args)
            .env("WALRS_CONTROL_DATA", &self.data)
            .env("WALRS_CONTROL_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("WALRS_BIN", &self.bin)
            .env("WALRS_CONTROL_OBSERVE_MS", "1000")
            .env("WALRS_CONTROL_CLOCK_MS", "1000")
            .env("WALRS_CONTROL_POLL_MS", "200")
            .env("WALRS_CONTROL_LEASE_SECS", "5")
            .env("WALRS_CONTROL_UNSAFE_NO_FSYNC", "true")
            .envs(self.walrs_env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting wal-rs-control");
        self.procs.push((name.to_string(), child));
    }

    /// SIGKILLs process `name`: no cleanup, as a crash.
    fn kill(&mut self, name: &str) {
        let i = self.procs.iter().position(|(n, _)| n == name).expect("a process of that name");
        let (_, mut child) = self.procs.remove(i);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.data.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `METHOD path` with an optional JSON body: (status, JSON).
    fn http(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to the web process");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let json = resp.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
        (status, json)
    }

    #[track_caller]
    fn call(&self, method: &str, path: &str, body: Option<Value>, expect: u16) -> Value {
        let (status, v) = self.http(method, path, body);
        assert_eq!(status, expect, "{method} {path}: {v}");
        v
    }

    fn database(&self, name: &str) -> Value {
        self.call("GET", &format!("/databases/{name}"), None, 200)
    }

    fn server(&self, id: &str) -> Value {
        self.call("GET", &format!("/servers/{id}"), None, 200)
    }

    #[track_caller]
    fn wait_database(&self, name: &str, state: &str) -> Value {
        wait_for(&format!("database {name} to be {state}"), CONVERGE, || {
            let d = self.database(name);
            assert_ne!(d["leader"]["state"], "failed", "{name} failed: {d}");
            (d["state"] == state && (state != "available" || d["leader"]["state"] == "available")).then_some(d)
        })
    }

    #[track_caller]
    fn wait_server(&self, id: &str, state: &str) -> Value {
        wait_for(&format!("server {id} to be {state}"), CONVERGE, || {
            let s = self.server(id);
            assert_ne!(s["state"], "failed", "{id} failed: {s}");
            (s["state"] == state).then_some(s)
        })
    }

    /// Starts the web, observer and clock processes and waits until the API answers.
    fn start(&mut self) {
        self.spawn("all", &["all", "--workers", "0"], &[]);
        wait_for("the web process", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", self.port)).ok().map(|_| ())
        });
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, _) in &self.procs {
                let log = self.log(name);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- last lines of {name}.log\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_wal-rs-control"))
            .args(["stop-all", "--data"])
            .arg(&self.data)
            .env("WALRS_BIN", &self.bin)
            .output();
        if std::env::var_os("WALRS_IT_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.data);
        }
    }
}

/// Runs `sql` on the server at `url`: every row's values as text. Err on connection or SQL
/// errors (a server restarting, a read-only follower).
fn sql(url: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        let r = client.simple_query(sql).await;
        drop(client);
        let _ = driver.await;
        let msgs = r.map_err(|e| e.as_db_error().map(|d| d.message().to_string()).unwrap_or(e.to_string()))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    })
}

/// The single value of `q` on `url`, or None while it cannot answer.
fn one(url: &str, q: &str) -> Option<String> {
    sql(url, q).ok()?.into_iter().next()?.into_iter().next()?
}

/// `count(*), max(i)` of table t.
fn rows(url: &str) -> Option<(i64, i64)> {
    let r = sql(url, "select count(*), coalesce(max(i), 0) from t").ok()?;
    let row = r.into_iter().next()?;
    Some((row[0].as_ref()?.parse().ok()?, row[1].as_ref()?.parse().ok()?))
}

#[track_caller]
fn wait_rows(what: &str, url: &str, expect: (i64, i64)) {
    wait_for(&format!("{what} to have rows {expect:?}"), CONVERGE, || (rows(url) == Some(expect)).then_some(()));
}

fn url_of(v: &Value) -> String {
    v["url"].as_str().unwrap_or_else(|| panic!("no url in {v}")).to_string()
}

/// Kills the postmaster of server `s` with SIGKILL, as a crash would.
fn kill_postgres(s: &Value) {
    let pgdata = Path::new(s["pgdata"].as_str().unwrap());
    let pid: i32 =
        fs::read_to_string(pgdata.join("postmaster.pid")).unwrap().lines().next().unwrap().trim().parse().unwrap();
    let ok = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -9 {pid}");
}

/// Command lines of the processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(cmd);
            }
        }
    }
    out
}

/// (encrypted, plaintext) WAL objects under the store folder `dir`: files under a `wal_*`
/// folder, by whether they start with the encryption magic.
fn encrypted_wal(dir: &Path) -> (usize, usize) {
    let (mut sealed, mut plain) = (0, 0);
    let mut stack = vec![(dir.to_path_buf(), false)];
    while let Some((d, in_wal)) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let wal = in_wal || e.file_name().to_string_lossy().starts_with("wal_");
            if e.file_type().unwrap().is_dir() {
                stack.push((e.path(), wal));
            } else if wal {
                let mut head = [0u8; 8];
                let n = fs::File::open(e.path()).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
                if n == 8 && &head == b"WALRSENC" {
                    sealed += 1;
                } else {
                    plain += 1;
                }
            }
        }
    }
    (sealed, plain)
}

fn stamp(phase: &str, since: Instant) {
    eprintln!("control-plane test: {phase} in {:.1} s", since.elapsed().as_secs_f64());
}

#[test]
fn databases_follow_fork_converge_roll_back_unfollow_and_destroy() {
    let started = Instant::now();
    let mut cp = ControlPlane::new();
    // Encrypted: archive_command must seal WAL like backup-push seals backups, or the
    // restore_command of forks and rollbacks (which carries the key file) refuses the WAL.
    cp.encrypt();
    cp.start();
    cp.spawn("worker-1", &["worker"], &[]);

    // --- create a database, write rows.
    let t = Instant::now();
    let created = cp.call("POST", "/databases", Some(json!({ "name": "app", "attributes": { "team": "a" } })), 201);
    assert_eq!(created["state"], "creating");
    let (dup, _) = cp.http("POST", "/databases", Some(json!({ "name": "app" })));
    assert_eq!(dup, 409, "a second database named app");
    let app = cp.wait_database("app", "available");
    stamp("create database", t);
    assert_eq!(app["attributes"]["team"], "a");
    assert!(!app["backups"].as_array().unwrap().is_empty(), "available before its first backup: {app}");
    let leader_url = url_of(&app["leader"]);
    sql(&leader_url, "create table t (i int primary key); insert into t select generate_series(1, 10)").unwrap();

    // --- a follower: the rows arrive, first from the backup and archive, then streaming.
    let t = Instant::now();
    let f1 = cp.call("POST", "/databases/app/followers", None, 201)["id"].as_str().unwrap().to_string();
    let follower = cp.wait_server(&f1, "available");
    let f1_url = url_of(&follower);
    wait_rows("the follower", &f1_url, (10, 10));
    sql(&leader_url, "insert into t select generate_series(11, 20)").unwrap();
    wait_rows("the follower, streaming", &f1_url, (20, 20));
    stamp("follower available with the rows", t);
    let err = sql(&f1_url, "insert into t values (1000)").unwrap_err();
    assert!(err.contains("read-only"), "a follower accepted a write: {err}");
    let facts = wait_for("the follower's lag to be observed", CONVERGE, || {
        let f = cp.server(&f1)["observation"]["facts"].clone();
        (f["in_recovery"] == true && f["replay_lag_bytes"].is_u64()).then_some(f)
    });
    eprintln!("control-plane test: follower facts {facts}");

    // --- fork at time T: exactly the rows of T.
    let at =
        one(&leader_url, "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            .unwrap();
    sql(&leader_url, "insert into t select generate_series(21, 30)").unwrap();
    let t = Instant::now();
    cp.call("POST", "/databases/app/forks", Some(json!({ "name": "app-fork", "at": at })), 201);
    let fork = cp.wait_database("app-fork", "available");
    stamp("fork at a time", t);
    let fork_url = url_of(&fork);
    assert_eq!(rows(&fork_url), Some((20, 20)), "the fork at {at} must hold exactly rows 1..20");
    assert_eq!(fork["timeline"]["parent"], app["timeline"]["id"]);
    assert_ne!(fork["timeline"]["id"], app["timeline"]["id"]);
    sql(&fork_url, "insert into t values (1001)").unwrap();
    assert_eq!(rows(&leader_url), Some((30, 30)), "writing to the fork changed its parent");

    // --- fork at a time after the parent's last write: the recovery needs the commit the
    // control plane makes on the parent, archived before the segment switch.
    let now =
        one(&leader_url, "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            .unwrap();
    let t = Instant::now();
    cp.call("POST", "/databases/app/forks", Some(json!({ "name": "app-now", "at": now })), 201);
    let fork_now = cp.wait_database("app-now", "available");
    stamp("fork at a time after the last write", t);
    assert_eq!(rows(&url_of(&fork_now)), Some((30, 30)), "the fork at {now} must hold rows 1..30");
    // Converged at the first restore: a recovery that ends before its target stops the server,
    // and the server is restored again (which then finds the first attempt's commit archived).
    let fork_now_leader = fork_now["leader"]["id"].as_str().unwrap().to_string();
    let log = cp.log("worker-1");
    assert!(
        !log.lines().any(|l| l.contains(&fork_now_leader) && l.contains("stopped during recovery")),
        "the fork at {now} did not reach its target at the first restore:\n{log}"
    );
    let store = fork_now["timeline"]["store"].as_str().unwrap().to_string();
    let parent_store = app["timeline"]["store"].as_str().unwrap().to_string();
    let sealed = encrypted_wal(Path::new(parent_store.trim_start_matches("file://")));
    assert!(sealed.0 > 0 && sealed.1 == 0, "WAL objects of {parent_store} (encrypted, plaintext): {sealed:?}");
    assert!(store != parent_store);

    // --- PostgreSQL killed on the leader and on the follower: both come back by themselves.
    let t = Instant::now();
    kill_postgres(&app["leader"]);
    kill_postgres(&follower);
    wait_for("the leader to answer again", CONVERGE, || one(&leader_url, "select 1"));
    sql(&leader_url, "insert into t values (31)").unwrap();
    wait_rows("the restarted follower", &f1_url, (31, 31));
    stamp("leader and follower back after kill -9 of their postmasters", t);
    assert!(cp.log("all").contains("reason=observed_unreachable"), "the clock never noticed the dead servers");

    // --- a worker killed in the middle of a restore: the next worker wipes and finishes it.
    cp.kill("worker-1");
    // A slow store (about 300 kB/s) keeps the restore running long enough to kill it.
    cp.spawn("worker-slow", &["worker"], &[("WALRS_NETWORK_RATE_LIMIT", "300000")]);
    let f2 = cp.call("POST", "/databases/app/followers", None, 201)["id"].as_str().unwrap().to_string();
    let pgdata = wait_for("the slow restore to begin writing", CONVERGE, || {
        let s = cp.server(&f2);
        let dir = PathBuf::from(s["pgdata"].as_str()?);
        (s["state"] == "restoring" && fs::read_dir(&dir).ok()?.count() > 0).then_some(dir)
    });
    cp.kill("worker-slow");
    let t = Instant::now();
    assert_eq!(cp.server(&f2)["state"], "restoring", "the restore finished before the worker was killed");
    assert!(!pgdata.join("global/pg_control").exists(), "a half-restored folder already has pg_control");
    // The killed worker's backup-fetch dies with it (parent-death signal through runuser), so
    // nothing keeps writing into the folder the next worker wipes.
    let needle = pgdata.display().to_string();
    wait_for("the killed worker's backup-fetch to exit", Duration::from_secs(20), || {
        (!processes_mentioning(&needle).iter().any(|c| c.contains("backup-fetch"))).then_some(())
    });
    cp.spawn("worker-2", &["worker"], &[]);
    let f2_view = cp.wait_server(&f2, "available");
    wait_rows("the follower whose restore was interrupted", &url_of(&f2_view), (31, 31));
    stamp("interrupted restore finished by the next worker", t);
    let log = cp.log("worker-2");
    assert!(
        log.lines().any(|l| l.contains("action=wipe") && l.contains(&f2)),
        "worker-2 did not wipe the half-restored folder:\n{log}"
    );

    // --- roll back to T: the resource points at a new server with exactly the rows of T.
    // Followers that had used restores of their own get all of them again: the rollback's
    // re-pointing resets their count. A trigger records the count as they are sent back to
    // `restoring` (it is reset again anyway once they are available).
    let state_db = cp.state_db();
    sql(
        &state_db,
        &format!(
            "UPDATE servers SET restore_restarts = 2 WHERE id IN ('{f1}', '{f2}');
             CREATE TABLE test_resent (id text, restore_restarts int);
             CREATE FUNCTION test_note_resent() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO test_resent VALUES (NEW.id, NEW.restore_restarts); RETURN NULL; END $$;
             CREATE TRIGGER test_note_resent AFTER UPDATE ON servers FOR EACH ROW
               WHEN (NEW.state = 'restoring' AND NEW.generation <> OLD.generation) EXECUTE FUNCTION test_note_resent();"
        ),
    )
    .unwrap();
    let t = Instant::now();
    let old_leader = app["leader"]["id"].as_str().unwrap().to_string();
    cp.call("POST", "/databases/app/rollback", Some(json!({ "at": at })), 202);
    let rolled = wait_for("the rollback to complete", CONVERGE, || {
        let d = cp.database("app");
        (d["state"] == "available" && d["leader"]["id"] != old_leader.as_str()).then_some(d)
    });
    stamp("rollback", t);
    let new_url = url_of(&rolled);
    assert_eq!(rows(&new_url), Some((20, 20)), "after the rollback to {at}");
    assert_eq!(rolled["timeline"]["parent"], app["timeline"]["id"]);
    // The followers are rebuilt from the new leader; the old leader goes.
    let t = Instant::now();
    cp.wait_server(&old_leader, "destroyed");
    for f in [&f1, &f2] {
        let s = cp.wait_server(f, "available");
        wait_rows("a follower after the rollback", &url_of(&s), (20, 20));
    }
    stamp("followers rebuilt after the rollback", t);
    let resent = sql(&state_db, "SELECT id, restore_restarts FROM test_resent ORDER BY id").unwrap();
    let mut expect = vec![vec![Some(f1.clone()), Some("0".to_string())], vec![Some(f2.clone()), Some("0".to_string())]];
    expect.sort();
    assert_eq!(resent, expect, "followers sent back to restoring by the rollback: (id, restore_restarts)");
    sql(&state_db, "DROP TRIGGER test_note_resent ON servers").unwrap();
    sql(&new_url, "insert into t values (21)").unwrap();
    wait_rows("a follower of the rolled-back leader", &f1_url, (21, 21));

    // --- unfollow: a follower becomes a database of its own, on a new timeline.
    let t = Instant::now();
    let copy = cp.call("POST", &format!("/servers/{f2}/unfollow"), Some(json!({ "name": "app-copy" })), 201);
    assert_eq!(copy["timeline"]["parent"], rolled["timeline"]["id"]);
    let copy = cp.wait_database("app-copy", "available");
    stamp("unfollow", t);
    let copy_url = url_of(&copy);
    sql(&copy_url, "insert into t values (500)").unwrap();
    assert_eq!(rows(&copy_url), Some((22, 500)));
    assert_eq!(rows(&new_url), Some((21, 21)), "writing to the unfollowed copy changed app");
    assert!(!copy["backups"].as_array().unwrap().is_empty(), "the unfollowed database has no backup of its own");

    // --- destroy everything.
    let t = Instant::now();
    let mut pgdatas = Vec::new();
    for name in ["app", "app-fork", "app-now", "app-copy"] {
        let d = cp.database(name);
        pgdatas.push(PathBuf::from(d["leader"]["pgdata"].as_str().unwrap()));
        cp.call("DELETE", &format!("/databases/{name}"), None, 202);
    }
    for name in ["app", "app-fork", "app-now", "app-copy"] {
        wait_for(&format!("{name} to be gone"), CONVERGE, || {
            (cp.http("GET", &format!("/databases/{name}"), None).0 == 404).then_some(())
        });
    }
    stamp("destroy", t);
    for p in pgdatas {
        assert!(!p.exists(), "{} survived its database", p.display());
    }
    assert!(one(&leader_url, "select 1").is_none() && one(&f1_url, "select 1").is_none());
    assert_eq!(cp.call("GET", "/databases", None, 200), json!([]));
    stamp("whole scenario", started);
}

/// The API's checks, with no worker (nothing converges; the state database is set by hand):
/// bad bodies, bad attributes and non-finite or BC times are refused with 422 and a JSON error, and a handler that changes a
/// database waits for a concurrent change of that database and then answers 409, instead of
/// acting on the state it read before.
#[test]
fn api_refuses_bad_input_and_serializes_changes_of_a_database() {
    let mut cp = ControlPlane::new();
    cp.start();

    // --- attributes: an object, without the keys the control plane writes.
    for bad in [json!([]), json!("x"), json!({ "pending_leader": "bogus" })] {
        let (status, v) = cp.http("POST", "/databases", Some(json!({ "name": "bad", "attributes": bad })));
        assert_eq!(status, 422, "attributes {bad}: {v}");
    }
    assert_eq!(cp.http("GET", "/databases/bad", None).0, 404);
    // --- bodies the JSON extractor refuses get the API's error format too.
    for bad in [json!({}), json!({ "name": 5 }), json!([])] {
        let (status, v) = cp.http("POST", "/databases", Some(bad.clone()));
        assert_eq!(status, 422, "body {bad}: {v}");
        let error = v["error"].as_str().unwrap_or_else(|| panic!("body {bad}: no JSON error in the answer {v}"));
        assert!(!error.contains('\n'), "not one line: {error}");
    }
    cp.call("POST", "/databases", Some(json!({ "name": "db", "attributes": { "team": "a" } })), 201);

    // No worker runs: make the database look available by hand.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let state = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&cp.state_db(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    });
    let exec = |q: &str| rt.block_on(state.batch_execute(q)).unwrap();
    let resource_state = || -> String {
        rt.block_on(state.query_one("SELECT state FROM resources WHERE name = 'db' AND state <> 'destroyed'", &[]))
            .unwrap()
            .get(0)
    };
    exec("UPDATE resources SET state = 'available' WHERE name = 'db'");

    // --- times that are not finite (to_char gives NULL for them), or BC (to_char drops the
    // era: 3000 BC would become 3000 AD, a target never reached).
    for at in ["-infinity", "infinity", "3000-01-01 BC", "0001-12-31 23:59:59+00 BC"] {
        for path in ["/databases/db/rollback", "/databases/db/forks"] {
            let (status, v) = cp.http("POST", path, Some(json!({ "name": "db-fork", "at": at })));
            assert_eq!(status, 422, "POST {path} at {at}: {v}");
        }
    }
    assert_eq!(resource_state(), "available");

    // --- a destroy in flight (its transaction holds the row, not committed yet): a follower
    // or a rollback asked meanwhile waits for it, then finds the database destroying.
    let past = "2000-01-01T00:00:00Z";
    for (method, path, body) in
        [("POST", "/databases/db/followers", None), ("POST", "/databases/db/rollback", Some(json!({ "at": past })))]
    {
        exec("BEGIN; UPDATE resources SET state = 'destroying' WHERE name = 'db' AND state <> 'destroyed'");
        let (status, v) = std::thread::scope(|s| {
            let call = s.spawn(|| cp.http(method, path, body.clone()));
            std::thread::sleep(Duration::from_millis(1500));
            let waited = !call.is_finished();
            exec("COMMIT");
            let answer = call.join().unwrap();
            assert!(waited, "{method} {path} did not wait for the destroy in flight: {answer:?}");
            answer
        });
        assert_eq!(status, 409, "{method} {path} during a destroy: {v}");
        assert_eq!(resource_state(), "destroying", "{method} {path} overwrote the destroy");
        let followers: i64 = rt
            .block_on(state.query_one(
                "SELECT count(*) FROM servers s JOIN resources r ON r.id = s.resource_id WHERE r.name = 'db' AND s.role = 'follower'",
                &[],
            ))
            .unwrap()
            .get(0);
        assert_eq!(followers, 0, "a follower was added to a database being destroyed");
        exec("UPDATE resources SET state = 'available' WHERE name = 'db'");
    }

    // --- two rollbacks at once: one wins, the other gets 409 (no orphaned pending leader).
    let answers: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..2)
            .map(|_| s.spawn(|| cp.http("POST", "/databases/db/rollback", Some(json!({ "at": past }))).0))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut sorted = answers.clone();
    sorted.sort();
    assert_eq!(sorted, [202, 409], "two rollbacks at once: {answers:?}");
    let leaders: i64 = rt
        .block_on(state.query_one(
            "SELECT count(*) FROM servers s JOIN resources r ON r.id = s.resource_id WHERE r.name = 'db' AND s.role = 'leader'",
            &[],
        ))
        .unwrap()
        .get(0);
    assert_eq!(leaders, 2, "the leader and one pending leader");
    let d = cp.database("db");
    assert_eq!(d["state"], "rolling_back");
    assert_eq!(d["attributes"]["team"], "a");
    assert!(d["pending_leader"]["id"].is_string(), "{d}");

    // --- destroy: the database goes (no worker: it stays destroying, with its servers).
    cp.call("DELETE", "/databases/db", None, 202);
    assert_eq!(resource_state(), "destroying");
}
