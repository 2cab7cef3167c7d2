//! Runs the walrs-faultproxy binary in front of a toy hyper server and checks forwarding,
//! the delay, each fault mode, the control API and the bandwidth cap.
//!
//! Synchronisation is by reading: the proxy's `listening` line, responses, and errors, all
//! under deadlines. The only timed waits are the ones under test (delay, black hole).

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Upper bound for anything that should happen promptly.
const PROMPT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The toy upstream: records each request; `/bytes/N` answers N bytes, anything else echoes
// "METHOD URI body=LEN".

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    host: String,
    transfer_encoding: Option<String>,
    body: Vec<u8>,
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| upstream_handle(req, record.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Upstream { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

async fn upstream_handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes().to_vec()).unwrap_or_default();
    let header = |name: &str| parts.headers.get(name).map(|v| v.to_str().unwrap().to_string());
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        host: header("host").unwrap_or_default(),
        transfer_encoding: header("transfer-encoding"),
        body: body.clone(),
    });
    let out = match parts.uri.path().strip_prefix("/bytes/") {
        Some(n) => pattern(n.parse().unwrap()),
        None => format!("{} {} body={}", parts.method, parts.uri, body.len()).into_bytes(),
    };
    Ok(Response::new(Full::new(Bytes::from(out))))
}

// ---------------------------------------------------------------------------------------
// The proxy binary.

struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr, extra: &[&str]) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_walrs-faultproxy"))
            .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("first line: {line:?}"));
        Proxy { addr: addr.parse().unwrap(), child }
    }

    async fn control(&self, path: &str) -> (u16, serde_json::Value) {
        let mut s = connect(self.addr).await;
        send(&mut s, "GET", &format!("/__faultproxy/{path}"), &[], b"").await;
        let r = read_resp(&mut s, false).await.unwrap();
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    async fn stats(&self) -> serde_json::Value {
        self.control("stats").await.1
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client, to see exactly what comes back on the wire.

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(PROMPT, TcpStream::connect(addr)).await.unwrap().unwrap()
}

/// Sends a request; adds Host and, unless the caller set Transfer-Encoding, Content-Length.
async fn send(s: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str("host: test.invalid\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"));
    if !chunked && !body.is_empty() {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
}

#[derive(Debug, PartialEq)]
enum End {
    /// Content-Length bytes arrived.
    Complete,
    /// The connection closed early.
    Eof,
    Error(std::io::ErrorKind),
}

#[derive(Debug)]
struct Resp {
    status: u16,
    content_length: Option<usize>,
    content_type: Option<String>,
    body: Vec<u8>,
    end: End,
}

/// Reads one response; Err if the connection fails or closes before a whole head arrives.
async fn read_resp(s: &mut TcpStream, head_request: bool) -> std::io::Result<Resp> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let mut content_length = None;
    let mut content_type = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = Some(v.trim().parse().unwrap()),
                "content-type" => content_type = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    let want = if head_request { 0 } else { content_length.expect("the proxy sends Content-Length") };
    let end = loop {
        if body.len() >= want {
            break End::Complete;
        }
        match s.read(&mut chunk).await {
            Ok(0) => break End::Eof,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) => break End::Error(e.kind()),
        }
    };
    Ok(Resp { status, content_length, content_type, body, end })
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Resp {
    let mut s = connect(addr).await;
    send(&mut s, method, path, &[], body).await;
    timeout(PROMPT, read_resp(&mut s, method == "HEAD")).await.unwrap().unwrap()
}

fn n(v: &serde_json::Value, path: &str) -> u64 {
    v.pointer(path).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("{path} in {v}"))
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_requests_unchanged_over_keep_alive() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--control"]);
    let mut s = connect(proxy.addr).await;

    // Path, query and Host exactly as sent (SigV4 signs them).
    let path = "/bucket/dir%2Fkey%20x?list-type=2&prefix=a%2Fb&x-id=GetObject";
    send(&mut s, "GET", path, &[("Host", "s3.example.test:9000")], b"").await;
    let r = read_resp(&mut s, false).await.unwrap();
    assert_eq!((r.status, r.end), (200, End::Complete));
    assert_eq!(String::from_utf8(r.body).unwrap(), format!("GET {path} body=0"));

    // A chunked upload on the same connection, streamed through.
    let chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    send(&mut s, "PUT", "/bucket/chunked", &[("transfer-encoding", "chunked")], chunked).await;
    let r = read_resp(&mut s, false).await.unwrap();
    assert_eq!(String::from_utf8(r.body).unwrap(), "PUT /bucket/chunked body=11");

    // A sized upload, still the same connection.
    let big = pattern(300_000);
    send(&mut s, "PUT", "/bucket/sized", &[], &big).await;
    let r = read_resp(&mut s, false).await.unwrap();
    assert_eq!(String::from_utf8(r.body).unwrap(), "PUT /bucket/sized body=300000");

    let r = request(proxy.addr, "HEAD", "/bytes/1234", b"").await;
    assert_eq!((r.status, r.content_length, r.body.len()), (200, Some(1234), 0));

    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!((seen[0].method.as_str(), seen[0].uri.as_str()), ("GET", path));
    assert_eq!(seen[0].host, "s3.example.test:9000");
    assert_eq!(seen[1].body, b"hello world");
    assert_eq!(seen[1].transfer_encoding.as_deref(), Some("chunked"));
    assert_eq!(seen[1].host, "test.invalid");
    assert_eq!(seen[2].body, big);
    assert_eq!(seen[3].method, "HEAD");

    let st = proxy.stats().await;
    assert_eq!(n(&st, "/connections"), 2, "{st}"); // control connections are not counted
    assert_eq!(n(&st, "/requests"), 4, "{st}");
    assert_eq!(n(&st, "/forwarded"), 4, "{st}");
    assert_eq!(n(&st, "/methods/PUT"), 2, "{st}");
    assert_eq!(n(&st, "/bytes_up"), 300_011, "{st}");
    assert_eq!(n(&st, "/bytes_down"), (format!("GET {path} body=0").len() + 27 + 29) as u64, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_applies_to_every_request() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "150"]);
    let mut s = connect(proxy.addr).await;
    for _ in 0..2 {
        let start = Instant::now();
        send(&mut s, "GET", "/bytes/10", &[], b"").await;
        let r = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap();
        let took = start.elapsed();
        assert_eq!((r.status, r.end), (200, End::Complete));
        assert!(took >= Duration::from_millis(150), "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_500_and_503_without_forwarding() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-500", "1", "--control"]);
    let mut s = connect(proxy.addr).await;
    // A request with a body: it is read in full, and the connection stays usable.
    for _ in 0..2 {
        send(&mut s, "PUT", "/bucket/obj", &[], &pattern(200_000)).await;
        let r = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap();
        assert_eq!((r.status, &r.end), (500, &End::Complete));
        assert_eq!(r.content_type.as_deref(), Some("application/xml"));
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.contains("<Error><Code>InternalError</Code><Message>injected</Message></Error>"), "{body}");
    }

    let (status, _) = proxy.control("set?rate_500=0&rate_503=1").await;
    assert_eq!(status, 200);
    send(&mut s, "GET", "/bucket/obj", &[], b"").await;
    let r = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap();
    assert_eq!(r.status, 503);
    let body = String::from_utf8(r.body).unwrap();
    assert!(
        body.contains("<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
        "{body}"
    );

    // A gateway's 404: HTML, no S3 error code.
    let (status, _) = proxy.control("set?rate_503=0&rate_404=1").await;
    assert_eq!(status, 200);
    send(&mut s, "GET", "/bucket/obj", &[], b"").await;
    let r = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap();
    assert_eq!((r.status, r.content_type.as_deref()), (404, Some("text/html")));
    let body = String::from_utf8(r.body).unwrap();
    assert!(body.contains("404 Not Found") && !body.contains("<Code>"), "{body}");
    // A replica behind, and a conditional write still in progress: S3's own errors.
    for (set, status, code) in [
        ("set?rate_404=0&rate_nosuchkey=1", 404, "NoSuchKey"),
        ("set?rate_nosuchkey=0&rate_409=1", 409, "ConditionalRequestConflict"),
    ] {
        assert_eq!(proxy.control(set).await.0, 200);
        send(&mut s, "GET", "/bucket/obj", &[], b"").await;
        let r = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap();
        assert_eq!(r.status, status);
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.contains(&format!("<Code>{code}</Code>")), "{body}");
    }

    assert!(up.seen().is_empty());
    let st = proxy.stats().await;
    assert_eq!(
        (
            n(&st, "/injected/500"),
            n(&st, "/injected/503"),
            n(&st, "/injected/404"),
            n(&st, "/injected/nosuchkey"),
            n(&st, "/injected/409"),
            n(&st, "/forwarded")
        ),
        (2, 1, 1, 1, 1, 0),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_limits_faults_to_matching_requests() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-503", "1", "--only", "PUT /bucket/", "--control"]);
    assert_eq!(request(proxy.addr, "GET", "/bucket/k", b"").await.status, 200);
    assert_eq!(request(proxy.addr, "PUT", "/other/k", b"x").await.status, 200);
    assert_eq!(request(proxy.addr, "PUT", "/bucket/k", b"x").await.status, 503);
    // Changed at run time; the value is percent-decoded.
    let (_, settings) = proxy.control("set?only=x-id%3DGetObject").await;
    assert_eq!(settings["only"], "x-id=GetObject");
    assert_eq!(request(proxy.addr, "PUT", "/bucket/k", b"x").await.status, 200);
    assert_eq!(request(proxy.addr, "GET", "/bucket/k?x-id=GetObject", b"").await.status, 503);
    let st = proxy.stats().await;
    assert_eq!((n(&st, "/requests"), n(&st, "/injected/503")), (5, 2), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_limits_how_many_faults_are_injected() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-500", "1", "--fault-budget", "2", "--control"]);
    let statuses: Vec<u16> = sequential_statuses(proxy.addr, 4).await;
    assert_eq!(statuses, [500, 500, 200, 200]);
    let (_, settings) = proxy.control("set?budget=1").await;
    assert_eq!(settings["budget"], 1);
    assert_eq!(sequential_statuses(proxy.addr, 2).await, [500, 200]);
    let (_, settings) = proxy.control("set?budget=none").await;
    assert!(settings["budget"].is_null());
    assert_eq!(sequential_statuses(proxy.addr, 2).await, [500, 500]);
}

/// Statuses of `count` GETs made one after the other.
async fn sequential_statuses(addr: SocketAddr, count: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(request(addr, "GET", "/bytes/1", b"").await.status);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_the_client_a_connection_error() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-reset", "1", "--control"]);

    let mut s = connect(proxy.addr).await;
    send(&mut s, "GET", "/bytes/100", &[], b"").await;
    let err = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // Mid-request: the head is in, the body is still coming.
    let mut s = connect(proxy.addr).await;
    s.write_all(b"PUT /bucket/obj HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\npartial").await.unwrap();
    let err = timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    assert!(up.seen().is_empty());
    let st = proxy.stats().await;
    assert_eq!((n(&st, "/injected/reset"), n(&st, "/requests")), (2, 2), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_cuts_the_body_and_closes() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-truncate", "1", "--control"]);

    // The head promises 300000 bytes; half arrive, then a clean close.
    let r = request(proxy.addr, "GET", "/bytes/300000", b"").await;
    assert_eq!((r.status, r.content_length, &r.end), (200, Some(300_000), &End::Eof));
    assert_eq!(r.body.len(), 150_000);
    assert!(r.body == pattern(300_000)[..150_000]);

    // What an HTTP client library makes of it.
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = client.get(format!("http://{}/bytes/100000", proxy.addr).parse().unwrap()).await.unwrap();
    let err = timeout(PROMPT, resp.into_body().collect()).await.unwrap().unwrap_err();
    assert!(format!("{err:?}").contains("IncompleteBody"), "{err:?}");

    // A client that reads slowly: the proxy must wait for room before it closes, or the
    // bytes still in its buffers would be lost.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(32 * 1024).unwrap();
    let mut s = timeout(PROMPT, socket.connect(proxy.addr)).await.unwrap().unwrap();
    send(&mut s, "GET", "/bytes/8000000", &[], b"").await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match timeout(PROMPT, s.read(&mut buf)).await.unwrap() {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => panic!("after {got} bytes: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await; // the slowness under test
    }
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 8000000\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n".len();
    assert_eq!(got - head, 4_000_000);

    // A response without a body has nothing to cut: it is lost whole, after the server
    // has acted on the request.
    let mut s = connect(proxy.addr).await;
    send(&mut s, "HEAD", "/bytes/10", &[], b"").await;
    let err = timeout(PROMPT, read_resp(&mut s, true)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");

    assert_eq!(up.seen().len(), 4);
    let st = proxy.stats().await;
    assert_eq!((n(&st, "/injected/truncate"), n(&st, "/forwarded")), (4, 4), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_reads_and_never_answers() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-blackhole", "1", "--control"]);
    let mut s = connect(proxy.addr).await;
    // 4 MB: more than socket buffers hold, so the whole write finishing shows it is read.
    let body = pattern(4 << 20);
    timeout(PROMPT, send(&mut s, "PUT", "/bucket/obj", &[], &body)).await.unwrap();
    let mut byte = [0u8; 1];
    let waited = timeout(Duration::from_millis(700), s.read(&mut byte)).await;
    assert!(waited.is_err(), "the black hole answered: {waited:?}");

    assert!(up.seen().is_empty());
    let st = proxy.stats().await;
    assert_eq!(n(&st, "/injected/blackhole"), 1, "{st}");

    // Switched off, requests go through again.
    proxy.control("set?blackhole=0").await;
    assert_eq!(request(proxy.addr, "GET", "/bytes/5", b"").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_is_roughly_respected() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--bandwidth-bytes-per-sec", "1000000", "--control"]);

    let start = Instant::now();
    let r = request(proxy.addr, "GET", "/bytes/1000000", b"").await;
    let down = start.elapsed();
    assert_eq!((r.end, r.body.len()), (End::Complete, 1_000_000));
    assert!(down >= Duration::from_millis(900) && down < Duration::from_secs(3), "download took {down:?}");

    let start = Instant::now();
    let r = request(proxy.addr, "PUT", "/bucket/up", &pattern(500_000)).await;
    let up_took = start.elapsed();
    assert_eq!(String::from_utf8(r.body).unwrap(), "PUT /bucket/up body=500000");
    assert!(up_took >= Duration::from_millis(450) && up_took < Duration::from_secs(3), "upload took {up_took:?}");

    // Lifted at run time.
    proxy.control("set?bandwidth=0").await;
    let start = Instant::now();
    request(proxy.addr, "GET", "/bytes/1000000", b"").await;
    assert!(start.elapsed() < Duration::from_millis(800), "uncapped download took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_draws_are_reproducible() {
    let up = Upstream::start().await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--rate-503", "0.5", "--seed", "42"]);
        let mut s = connect(proxy.addr).await;
        let mut statuses = Vec::new();
        for _ in 0..40 {
            send(&mut s, "GET", "/bytes/1", &[], b"").await;
            statuses.push(timeout(PROMPT, read_resp(&mut s, false)).await.unwrap().unwrap().status);
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&200) && runs[0].contains(&503), "{:?}", runs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(up.addr, &["--delay-ms", "0", "--control", "--seed", "9"]);

    let (status, settings) = proxy.control("set?rate_500=0.1&503=0.2&reset=0.05&delay_ms=7").await;
    assert_eq!(status, 200);
    assert_eq!(settings["rate_500"], 0.1);
    assert_eq!(settings["rate_503"], 0.2);
    assert_eq!(settings["rate_reset"], 0.05);
    assert_eq!(settings["delay_ms"], 7);

    let (status, err) = proxy.control("set?rate_truncate=0.9").await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("add up"), "{err}");
    let (status, _) = proxy.control("nope").await;
    assert_eq!(status, 404);

    let st = proxy.stats().await;
    assert_eq!(n(&st, "/seed"), 9);
    assert_eq!(n(&st, "/settings/delay_ms"), 7);
    assert_eq!(st["settings"]["rate_truncate"], 0.0, "a rejected set changes nothing");
    assert_eq!(n(&st, "/requests"), 0, "control requests are not counted");

    proxy.control("set?rate_500=0&503=0&reset=0").await;
    request(proxy.addr, "GET", "/bytes/3", b"").await;
    assert_eq!(n(&proxy.stats().await, "/requests"), 1);
    let (_, cleared) = proxy.control("clear").await;
    assert_eq!((n(&cleared, "/requests"), n(&cleared, "/forwarded")), (0, 0));
    assert!(up.seen().iter().all(|s| !s.uri.contains("__faultproxy")));

    // Without --control the prefix is just a path, forwarded like any other.
    let plain = Proxy::start(up.addr, &["--delay-ms", "0"]);
    let r = request(plain.addr, "GET", "/__faultproxy/stats", b"").await;
    assert_eq!(String::from_utf8(r.body).unwrap(), "GET /__faultproxy/stats body=0");
}

#[test]
fn rejects_rates_adding_up_to_more_than_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_walrs-faultproxy"))
        .args(["--upstream", "127.0.0.1:9", "--rate-500", "0.7", "--rate-503", "0.7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("add up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_502() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = Proxy::start(addr, &["--delay-ms", "0", "--control"]);
    let r = request(proxy.addr, "GET", "/bucket/k", b"").await;
    assert_eq!(r.status, 502);
    assert!(String::from_utf8(r.body).unwrap().contains("<Code>BadGateway</Code>"));
    let st = proxy.stats().await;
    assert_eq!((n(&st, "/upstream_errors"), n(&st, "/forwarded")), (1, 1), "{st}");
}
