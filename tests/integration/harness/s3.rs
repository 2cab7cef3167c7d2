//! An S3-protocol server for tests: s3s-fs on 127.0.0.1, one per test, with its own port,
//! random credentials and data directory.
//!
//! s3s-fs verifies SigV4 signatures (a wrong secret gets 403) and keeps each object as a
//! plain file `DATA_DIR/bucket/key`, so tests can check and damage objects directly. Its
//! binary comes from `WALRS_S3S_FS`, else `.cache/tools/bin/s3s-fs` in the checkout, where
//! `make tools` installs it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{free_port, wait_until, StoreEnv, WorkDir};

/// The bucket every test server has.
pub const BUCKET: &str = "walrs-test";

/// A running s3s-fs.
pub struct S3Server {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The access key it accepts.
    pub access_key: String,
    /// The secret key it accepts.
    pub secret_key: String,
    /// Its data directory: a bucket is a folder in it.
    pub data: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    _wd: WorkDir,
}

impl S3Server {
    /// Starts a server with a fresh data directory holding the bucket [`BUCKET`].
    pub fn start(wd: &WorkDir) -> S3Server {
        let data = wd.dir("s3-data");
        fs::create_dir(data.join(BUCKET)).expect("creating the bucket folder");
        let server = S3Server {
            port: free_port(),
            access_key: format!("AK{}", random_hex(8).to_uppercase()),
            secret_key: random_hex(20),
            data,
            log: wd.join("s3s-fs.log"),
            child: Mutex::new(None),
            _wd: wd.clone(),
        };
        server.launch();
        server
    }

    fn binary() -> PathBuf {
        let bin = std::env::var_os("WALRS_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/tools/bin/s3s-fs"));
        assert!(bin.exists(), "s3s-fs not found at {}: run `make tools` (or set WALRS_S3S_FS)", bin.display());
        bin
    }

    fn launch(&self) {
        let log = File::options().create(true).append(true).open(&self.log).expect("opening the s3s-fs log");
        let child = Command::new(Self::binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", &self.access_key, "--secret-key", &self.secret_key])
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting s3s-fs");
        *self.child.lock().unwrap() = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(&format!("s3s-fs to listen on {addr}"), Duration::from_secs(20), || {
            if let Some(status) = self.child.lock().unwrap().as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("s3s-fs exited ({status}): {}", fs::read_to_string(&self.log).unwrap_or_default());
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
    }

    /// Kills the server (as a crash would) and waits for it to be gone.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The store `s3://BUCKET/prefix` on this server, with everything wal-rs needs to reach it.
    pub fn store(&self, prefix: &str) -> StoreEnv {
        let url = format!("s3://{BUCKET}/{prefix}");
        let vars = [
            ("WALRS_STORE", url.as_str()),
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_key),
            ("AWS_ENDPOINT_URL", &self.endpoint()),
            ("AWS_REGION", "us-east-1"),
            ("WALRS_S3_PATH_STYLE", "true"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        StoreEnv {
            url: url.clone(),
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            objects_root: self.data.join(BUCKET).join(prefix),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            if !log.trim().is_empty() {
                eprintln!("--- s3s-fs log\n{log}\n---");
            }
        }
        self.stop();
    }
}

/// `bytes` random bytes from the kernel, as hex.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("reading /dev/urandom");
    hex::encode(buf)
}

/// A TCP proxy in front of a server that forwards requests only up to a byte budget, then
/// holds them, so a test can stop the server in the middle of an upload: deterministically,
/// whatever the speed of the machine. After [`CuttingProxy::cut`] it closes every
/// connection and refuses new ones, as a dead server would.
pub struct CuttingProxy {
    /// The port clients connect to.
    pub port: u16,
    state: Arc<ProxyState>,
    accept: Option<JoinHandle<()>>,
}

struct ProxyState {
    upstream: SocketAddr,
    budget: u64,
    forwarded: AtomicU64,
    cut: AtomicBool,
    stop: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
}

impl CuttingProxy {
    /// A proxy to 127.0.0.1:`upstream_port` that forwards at most `budget` bytes from
    /// clients to the server.
    pub fn start(upstream_port: u16, budget: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            budget,
            forwarded: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => s.clone().serve(client),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(_) => break,
                }
            }
        });
        CuttingProxy { port, state, accept: Some(accept) }
    }

    /// Bytes forwarded from clients to the server so far.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for s in self.state.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// `AWS_ENDPOINT_URL` through the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl ProxyState {
    fn serve(self: Arc<Self>, client: TcpStream) {
        if self.cut.load(Ordering::SeqCst) {
            return; // dropping it closes it
        }
        let _ = client.set_nonblocking(false);
        let Ok(server) = TcpStream::connect_timeout(&self.upstream, Duration::from_secs(2)) else {
            return;
        };
        {
            let mut sockets = self.sockets.lock().unwrap();
            sockets.push(client.try_clone().expect("clone"));
            sockets.push(server.try_clone().expect("clone"));
        }
        let (mut client_r, mut server_w) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        let up = self.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match client_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut sent = 0;
                while sent < n {
                    if up.cut.load(Ordering::SeqCst) {
                        return;
                    }
                    let room = up.budget.saturating_sub(up.forwarded.load(Ordering::SeqCst));
                    if room == 0 {
                        // Over budget: hold the request until the test cuts.
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let k = (n - sent).min(room as usize);
                    if server_w.write_all(&buf[sent..sent + k]).is_err() {
                        return;
                    }
                    up.forwarded.fetch_add(k as u64, Ordering::SeqCst);
                    sent += k;
                }
            }
            let _ = server_w.shutdown(Shutdown::Write);
        });
        let (mut server_r, mut client_w) = (server, client);
        std::thread::spawn(move || {
            let _ = io::copy(&mut server_r, &mut client_w);
            let _ = client_w.shutdown(Shutdown::Write);
        });
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
