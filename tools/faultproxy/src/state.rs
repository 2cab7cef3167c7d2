//! Settings (changeable at run time), the fault draw, counters and the bandwidth limiter.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// One injectable fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 InternalError, request not forwarded.
    Internal,
    /// 503 SlowDown, request not forwarded.
    SlowDown,
    /// The client's connection is reset (RST) once the request head is in.
    Reset,
    /// Forwarded, but the response body is cut at about half and the connection closed.
    Truncate,
    /// The request is read and never answered.
    Blackhole,
    /// 404 with an HTML body and no S3 error code, request not forwarded: what a gateway or
    /// proxy routed wrongly answers, which is not the store saying "no such key".
    GatewayNotFound,
    /// 404 NoSuchKey, request not forwarded: a replica behind, whose reads miss an object
    /// its listings already show.
    StaleRead,
    /// 409 ConditionalRequestConflict, request not forwarded: a conditional write of an
    /// earlier attempt still in progress.
    Conflict,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Internal,
        Fault::SlowDown,
        Fault::Reset,
        Fault::Truncate,
        Fault::Blackhole,
        Fault::GatewayNotFound,
        Fault::StaleRead,
        Fault::Conflict,
    ];

    /// The name used in the stats JSON, the control API and the log.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Internal => "500",
            Fault::SlowDown => "503",
            Fault::Reset => "reset",
            Fault::Truncate => "truncate",
            Fault::Blackhole => "blackhole",
            Fault::GatewayNotFound => "404",
            Fault::StaleRead => "nosuchkey",
            Fault::Conflict => "409",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Probability of each fault per request; they are exclusive, so they must sum to at most 1.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates(pub [f64; 8]);

impl Rates {
    pub fn get(&self, f: Fault) -> f64 {
        self.0[f.index()]
    }

    pub fn set(&mut self, f: Fault, rate: f64) {
        self.0[f.index()] = rate;
    }

    pub fn validate(&self) -> Result<(), String> {
        for f in Fault::ALL {
            let r = self.get(f);
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("rate of {} is {r}: rates are probabilities between 0 and 1", f.name()));
            }
        }
        let sum: f64 = self.0.iter().sum();
        if sum > 1.0 + 1e-9 {
            return Err(format!("fault rates add up to {sum}: each request gets at most one fault, so at most 1"));
        }
        Ok(())
    }

    /// The fault for a uniform draw `u` in [0, 1): fault k is chosen with probability rate k.
    pub fn pick(&self, u: f64) -> Option<Fault> {
        let mut edge = 0.0;
        for f in Fault::ALL {
            let r = self.get(f);
            edge += r;
            if r > 0.0 && u < edge {
                return Some(f);
            }
        }
        None
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Wait before acting on a request (time to first byte).
    pub delay: Duration,
    /// Bytes per second in each direction, shared by all connections; 0 = unlimited.
    pub bandwidth: u64,
    pub rates: Rates,
    /// Faults only for requests whose `METHOD /path?query` contains this; others are
    /// forwarded without a draw. Empty: every request.
    pub only: String,
    /// How many more faults may be injected; None: no limit. At 0 no draw is made.
    pub budget: Option<u64>,
}

impl Settings {
    /// Applies `key=value&...` from the control API; nothing changes on an error.
    pub fn apply_query(&mut self, query: &str) -> Result<(), String> {
        let mut next = self.clone();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = key.strip_prefix("rate_").unwrap_or(key);
            let float = || value.parse::<f64>().map_err(|_| format!("{key}={value}: not a number"));
            let int = || value.parse::<u64>().map_err(|_| format!("{key}={value}: not a whole number"));
            match key {
                "delay_ms" => next.delay = Duration::from_millis(int()?),
                "bandwidth_bytes_per_sec" | "bandwidth" => next.bandwidth = int()?,
                "only" => next.only = percent_decode(value)?,
                "budget" if value.is_empty() || value == "none" => next.budget = None,
                "budget" => next.budget = Some(int()?),
                _ => match Fault::ALL.into_iter().find(|f| f.name() == key) {
                    Some(f) => next.rates.set(f, float()?),
                    None => return Err(format!("unknown setting {key:?}")),
                },
            }
        }
        next.rates.validate()?;
        *self = next;
        Ok(())
    }

    /// Whether faults apply to a request, given as `METHOD /path?query`.
    pub fn targets(&self, request: &str) -> bool {
        request.contains(self.only.as_str())
    }

    pub fn to_json(&self) -> String {
        let mut s = format!("{{\"delay_ms\":{},\"bandwidth_bytes_per_sec\":{}", self.delay.as_millis(), self.bandwidth);
        for f in Fault::ALL {
            let _ = write!(s, ",\"rate_{}\":{}", f.name(), self.rates.get(f));
        }
        match self.budget {
            Some(b) => {
                let _ = write!(s, ",\"budget\":{b}");
            }
            None => s.push_str(",\"budget\":null"),
        }
        s.push_str(",\"only\":\"");
        for c in self.only.chars() {
            match c {
                '"' | '\\' => s.extend(['\\', c]),
                c if (c as u32) < 0x20 => {
                    let _ = write!(s, "\\u{:04x}", c as u32);
                }
                c => s.push(c),
            }
        }
        s.push_str("\"}");
        s
    }
}

/// Decodes `%XX` escapes and `+` (space) of a query value.
fn percent_decode(v: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(v.len());
    let mut bytes = v.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let byte = std::str::from_utf8(&hex).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(byte.filter(|_| hex.len() == 2).ok_or_else(|| format!("bad escape in {v:?}"))?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| format!("{v:?} is not UTF-8"))
}

/// HTTP methods counted separately.
pub const METHODS: [&str; 5] = ["GET", "PUT", "HEAD", "POST", "DELETE"];

#[derive(Default)]
pub struct Stats {
    /// Client connections that carried at least one proxied (non-control) request.
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub forwarded: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Request body bytes sent upstream, response body bytes sent to clients.
    pub bytes_up: Arc<AtomicU64>,
    pub bytes_down: Arc<AtomicU64>,
    injected: [AtomicU64; 8],
    /// Per entry of METHODS, then "other".
    methods: [AtomicU64; 6],
}

impl Stats {
    pub fn injected(&self, f: Fault) {
        self.injected[f.index()].fetch_add(1, Relaxed);
    }

    pub fn method(&self, m: &str) {
        let i = METHODS.iter().position(|x| *x == m).unwrap_or(METHODS.len());
        self.methods[i].fetch_add(1, Relaxed);
    }

    pub fn clear(&self) {
        let all = [&self.connections, &self.requests, &self.forwarded, &self.upstream_errors];
        for c in all.into_iter().chain([&*self.bytes_up, &*self.bytes_down]).chain(&self.injected).chain(&self.methods)
        {
            c.store(0, Relaxed);
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"connections\":{},\"requests\":{},\"forwarded\":{},\"upstream_errors\":{},\"bytes_up\":{},\"bytes_down\":{},\"injected\":{{",
            self.connections.load(Relaxed),
            self.requests.load(Relaxed),
            self.forwarded.load(Relaxed),
            self.upstream_errors.load(Relaxed),
            self.bytes_up.load(Relaxed),
            self.bytes_down.load(Relaxed),
        );
        for (i, f) in Fault::ALL.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(s, "{sep}\"{}\":{}", f.name(), self.injected[f.index()].load(Relaxed));
        }
        s.push_str("},\"methods\":{");
        for (i, m) in METHODS.iter().chain(&["other"]).enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(s, "{sep}\"{m}\":{}", self.methods[i].load(Relaxed));
        }
        s.push_str("}}");
        s
    }

    /// One line for stderr at exit.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "faultproxy: connections={} requests={} forwarded={} upstream_errors={}",
            self.connections.load(Relaxed),
            self.requests.load(Relaxed),
            self.forwarded.load(Relaxed),
            self.upstream_errors.load(Relaxed),
        );
        for f in Fault::ALL {
            let _ = write!(s, " {}={}", f.name(), self.injected[f.index()].load(Relaxed));
        }
        s
    }
}

/// The per-request fault draw: one uniform number per request from a seeded generator.
pub struct Dice {
    rng: Mutex<SmallRng>,
    pub seed: u64,
}

impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice { rng: Mutex::new(SmallRng::seed_from_u64(seed)), seed }
    }

    pub fn draw(&self, rates: &Rates) -> Option<Fault> {
        let u: f64 = self.rng.lock().unwrap().random();
        rates.pick(u)
    }
}

/// A bandwidth cap shared by every stream in one direction: each chunk is released at the
/// time the link would have finished sending it.
pub struct Limiter {
    rate: AtomicU64,
    next_free: Mutex<Instant>,
}

impl Limiter {
    pub fn new(rate: u64) -> Limiter {
        Limiter { rate: AtomicU64::new(rate), next_free: Mutex::new(Instant::now()) }
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Relaxed);
    }

    /// How many bytes to release at once: about 20 ms worth, at least 1 KiB, at most 64 KiB.
    /// None when there is no cap.
    pub fn piece(&self) -> Option<usize> {
        match self.rate.load(Relaxed) {
            0 => None,
            r => Some((r / 50).clamp(1024, 64 * 1024) as usize),
        }
    }

    /// Books `n` bytes on the link; returns when they are through, if that is in the future.
    pub fn reserve(&self, n: usize) -> Option<Instant> {
        let rate = self.rate.load(Relaxed);
        if rate == 0 {
            return None;
        }
        let now = Instant::now();
        let mut next = self.next_free.lock().unwrap();
        let done = (*next).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
        *next = done;
        (done > now).then_some(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_follows_cumulative_rates() {
        let mut r = Rates::default();
        assert_eq!(r.pick(0.0), None);
        r.set(Fault::Internal, 0.1);
        r.set(Fault::Blackhole, 0.2);
        assert_eq!(r.pick(0.05), Some(Fault::Internal));
        assert_eq!(r.pick(0.1), Some(Fault::Blackhole));
        assert_eq!(r.pick(0.29), Some(Fault::Blackhole));
        assert_eq!(r.pick(0.31), None);
        r.set(Fault::Internal, 0.0);
        assert_eq!(r.pick(0.0), Some(Fault::Blackhole));
    }

    #[test]
    fn draws_match_rates_and_are_reproducible() {
        let mut r = Rates::default();
        r.set(Fault::SlowDown, 0.3);
        let (a, b) = (Dice::new(7), Dice::new(7));
        let seq_a: Vec<_> = (0..10_000).map(|_| a.draw(&r)).collect();
        let seq_b: Vec<_> = (0..10_000).map(|_| b.draw(&r)).collect();
        assert_eq!(seq_a, seq_b);
        let hits = seq_a.iter().filter(|f| **f == Some(Fault::SlowDown)).count();
        assert!((2700..3300).contains(&hits), "{hits}");
    }

    #[test]
    fn apply_query_validates_and_is_atomic() {
        let mut s = Settings {
            delay: Duration::from_millis(30),
            bandwidth: 0,
            rates: Rates::default(),
            only: String::new(),
            budget: None,
        };
        s.apply_query("rate_500=0.25&503=0.25&delay_ms=5&bandwidth=1000&only=PUT+%2Fb%22").unwrap();
        assert_eq!(s.only, "PUT /b\"");
        assert!(s.targets("PUT /b\"/k") && !s.targets("GET /b\"/k"));
        assert!(s.to_json().ends_with(",\"only\":\"PUT /b\\\"\"}"), "{}", s.to_json());
        assert_eq!(s.rates.get(Fault::Internal), 0.25);
        assert_eq!(s.rates.get(Fault::SlowDown), 0.25);
        assert_eq!(s.delay, Duration::from_millis(5));
        assert_eq!(s.bandwidth, 1000);
        let before = s.clone();
        assert!(s.apply_query("delay_ms=1&blackhole=0.6").unwrap_err().contains("add up"));
        assert!(s.apply_query("delay_ms=1&rate_reset=2").is_err());
        assert!(s.apply_query("nope=1").unwrap_err().contains("unknown"));
        assert!(s.apply_query("delay_ms=x").is_err());
        assert!(s.apply_query("only=%2").is_err());
        s.apply_query("budget=3").unwrap();
        assert_eq!(s.budget, Some(3));
        assert!(s.to_json().contains("\"budget\":3"));
        s.apply_query("budget=none").unwrap();
        assert!(s.to_json().contains("\"budget\":null"));
        assert_eq!(s, before);
        assert!(s.to_json().contains("\"rate_503\":0.25"));
    }

    #[test]
    fn stats_json_shape() {
        let st = Stats::default();
        st.injected(Fault::Truncate);
        st.method("PUT");
        st.method("PATCH");
        let j = st.to_json();
        assert!(j.contains("\"truncate\":1") && j.contains("\"PUT\":1") && j.contains("\"other\":1"), "{j}");
        st.clear();
        assert!(st.to_json().contains("\"truncate\":0"));
    }

    #[test]
    fn limiter_books_time() {
        let l = Limiter::new(1000);
        let start = Instant::now();
        l.reserve(500).unwrap();
        let done = l.reserve(500).unwrap();
        assert!(done >= start + Duration::from_millis(1000));
        l.set_rate(0);
        assert!(l.reserve(500).is_none() && l.piece().is_none());
    }
}
