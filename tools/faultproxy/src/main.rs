//! walrs-faultproxy: an HTTP/1.1 reverse proxy for tests that sits between wal-rs and an
//! S3 test server, adds a delay to every request, optionally caps bandwidth, and injects
//! faults (500, 503 SlowDown, connection resets, truncated bodies, black holes) at
//! configurable rates. See README.md.

mod body;
mod conn;
mod proxy;
mod state;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::uri::Authority;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::proxy::State;
use crate::state::{Fault, Rates, Settings};

#[derive(Parser, Debug)]
#[command(version, about = "HTTP proxy for tests: adds latency and injects S3-style faults")]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed as `listening ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server to forward to, as HOST:PORT (plain HTTP).
    #[arg(long)]
    upstream: Authority,
    /// Wait before acting on each request, in milliseconds (time to first byte).
    #[arg(long, default_value_t = 30)]
    delay_ms: u64,
    /// Cap on body bytes per second in each direction, shared by all connections.
    #[arg(long)]
    bandwidth_bytes_per_sec: Option<u64>,
    /// Share of requests answered 500 InternalError (not forwarded).
    #[arg(long, default_value_t = 0.0)]
    rate_500: f64,
    /// Share of requests answered 503 SlowDown (not forwarded).
    #[arg(long, default_value_t = 0.0)]
    rate_503: f64,
    /// Share of requests whose connection is reset (RST) instead of answered.
    #[arg(long, default_value_t = 0.0)]
    rate_reset: f64,
    /// Share of requests forwarded whose response body is cut at half, then the connection closed.
    #[arg(long, default_value_t = 0.0)]
    rate_truncate: f64,
    /// Share of requests read and never answered.
    #[arg(long, default_value_t = 0.0)]
    rate_blackhole: f64,
    /// Share of requests answered 404 with an HTML body and no S3 error code (not forwarded):
    /// a gateway's "not found", not the store's.
    #[arg(long, default_value_t = 0.0)]
    rate_404: f64,
    /// Share of requests answered 404 NoSuchKey (not forwarded): a replica whose reads lag
    /// its listings.
    #[arg(long, default_value_t = 0.0)]
    rate_nosuchkey: f64,
    /// Share of requests answered 409 ConditionalRequestConflict (not forwarded).
    #[arg(long, default_value_t = 0.0)]
    rate_409: f64,
    /// Inject faults only into requests whose `METHOD /path?query` contains this text
    /// (say `PUT ` or `x-id=GetObject`); the others are forwarded without a draw.
    #[arg(long, default_value = "")]
    only: String,
    /// Inject at most this many faults in all, then none (say 1: only the first matching
    /// request fails). Unlimited if not given.
    #[arg(long)]
    fault_budget: Option<u64>,
    /// Seed of the fault draw (random if not given; shown by the stats).
    #[arg(long)]
    seed: Option<u64>,
    /// Serve the control API under /__faultproxy/ on the same port.
    #[arg(long)]
    control: bool,
    /// Log one line per request to stderr.
    #[arg(long)]
    log: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut rates = Rates::default();
    for (f, r) in [
        (Fault::Internal, args.rate_500),
        (Fault::SlowDown, args.rate_503),
        (Fault::Reset, args.rate_reset),
        (Fault::Truncate, args.rate_truncate),
        (Fault::Blackhole, args.rate_blackhole),
        (Fault::GatewayNotFound, args.rate_404),
        (Fault::StaleRead, args.rate_nosuchkey),
        (Fault::Conflict, args.rate_409),
    ] {
        rates.set(f, r);
    }
    if let Err(e) = rates.validate() {
        eprintln!("walrs-faultproxy: {e}");
        return ExitCode::from(2);
    }
    let settings = Settings {
        delay: Duration::from_millis(args.delay_ms),
        bandwidth: args.bandwidth_bytes_per_sec.unwrap_or(0),
        rates,
        only: args.only,
        budget: args.fault_budget,
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("walrs-faultproxy: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State::new(args.upstream, settings, seed, args.control, args.log));
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening {addr}");
            let _ = out.flush();
        }
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(conn::serve(stream, state.clone()));
                    }
                    // Out of file descriptors and the like: wait a little rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        eprintln!("{}", state.stats.summary());
        ExitCode::SUCCESS
    })
}
