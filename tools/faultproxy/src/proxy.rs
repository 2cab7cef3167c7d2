//! Per-request behaviour: the control API, the fault draw, the delay, and forwarding.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use http::uri::Authority;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::body::{Cut, ProxyBody};
use crate::conn::{ConnCtl, Kill};
use crate::state::{Dice, Fault, Limiter, Settings, Stats};

/// Path prefix of the control API (with `--control`). S3 bucket names start with a letter
/// or digit, so no path-style S3 request can collide with it.
pub const CONTROL_PREFIX: &str = "/__faultproxy/";

pub struct State {
    pub upstream: Authority,
    pub client: Client<HttpConnector, ProxyBody>,
    pub settings: Mutex<Settings>,
    pub dice: Dice,
    pub stats: Arc<Stats>,
    pub up: Arc<Limiter>,
    pub down: Arc<Limiter>,
    pub control: bool,
    pub log: bool,
}

impl State {
    pub fn new(upstream: Authority, settings: Settings, seed: u64, control: bool, log: bool) -> State {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        State {
            up: Arc::new(Limiter::new(settings.bandwidth)),
            down: Arc::new(Limiter::new(settings.bandwidth)),
            upstream,
            client,
            settings: Mutex::new(settings),
            dice: Dice::new(seed),
            stats: Arc::new(Stats::default()),
            control,
            log,
        }
    }

    fn settings(&self) -> Settings {
        self.settings.lock().unwrap().clone()
    }

    /// The settings for one request (`METHOD /path?query`) and its fault, if any.
    fn decide(&self, request: &str) -> (Settings, Option<Fault>) {
        let mut settings = self.settings.lock().unwrap();
        let mut fault = None;
        if settings.targets(request) && settings.budget != Some(0) {
            fault = self.dice.draw(&settings.rates);
            if let (Some(_), Some(budget)) = (fault, settings.budget.as_mut()) {
                *budget -= 1;
            }
        }
        (settings.clone(), fault)
    }
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut resp = Response::new(ProxyBody::fixed(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    resp
}

/// A gateway's 404: HTML, no S3 error code.
fn html_not_found() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::fixed("<html><body><h1>404 Not Found</h1></body></html>\n"));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::fixed(body + "\n"));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn control(req: &Request<Incoming>, state: &State) -> Response<ProxyBody> {
    let query = req.uri().query().unwrap_or("");
    match &req.uri().path()[CONTROL_PREFIX.len()..] {
        "stats" => json(StatusCode::OK, stats_json(state)),
        "clear" => {
            state.stats.clear();
            json(StatusCode::OK, stats_json(state))
        }
        "set" => {
            let mut settings = state.settings.lock().unwrap();
            match settings.apply_query(query) {
                Ok(()) => {
                    state.up.set_rate(settings.bandwidth);
                    state.down.set_rate(settings.bandwidth);
                    json(StatusCode::OK, settings.to_json())
                }
                Err(e) => json(StatusCode::BAD_REQUEST, format!("{{\"error\":{e:?}}}")),
            }
        }
        _ => json(StatusCode::NOT_FOUND, "{\"error\":\"control paths: set, stats, clear\"}".into()),
    }
}

/// The counters, plus the settings and seed in force.
pub fn stats_json(state: &State) -> String {
    let counters = state.stats.to_json();
    format!(
        "{},\"settings\":{},\"seed\":{}}}",
        &counters[..counters.len() - 1],
        state.settings().to_json(),
        state.dice.seed
    )
}

pub async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    ctl: Arc<ConnCtl>,
) -> Result<Response<ProxyBody>, Infallible> {
    if state.control && req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(control(&req, &state));
    }
    let what = format!("{} {}", req.method(), req.uri());
    let (settings, fault) = state.decide(&what);
    state.stats.requests.fetch_add(1, Relaxed);
    if ctl.first_proxied_request() {
        state.stats.connections.fetch_add(1, Relaxed);
    }
    state.stats.method(req.method().as_str());
    if !settings.delay.is_zero() {
        tokio::time::sleep(settings.delay).await;
    }
    let log = |outcome: &dyn std::fmt::Display| {
        if state.log {
            eprintln!("faultproxy: {what} -> {outcome}");
        }
    };
    if let Some(f) = fault {
        state.stats.injected(f);
        log(&format_args!("injected {}", f.name()));
    }
    match fault {
        Some(f @ (Fault::Internal | Fault::SlowDown | Fault::GatewayNotFound | Fault::StaleRead | Fault::Conflict)) => {
            // Read the whole request first, so the client is done sending and the
            // connection stays usable.
            let drained = req.into_body().collect().await;
            let resp = match f {
                Fault::Internal => xml_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "injected"),
                Fault::SlowDown => {
                    xml_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", "Please reduce your request rate.")
                }
                Fault::StaleRead => xml_error(StatusCode::NOT_FOUND, "NoSuchKey", "The specified key does not exist."),
                Fault::Conflict => xml_error(
                    StatusCode::CONFLICT,
                    "ConditionalRequestConflict",
                    "A conflicting conditional operation is currently in progress against this resource.",
                ),
                _ => html_not_found(),
            };
            if drained.is_err() {
                ctl.kill(Kill::Reset);
                return std::future::pending().await;
            }
            Ok(resp)
        }
        Some(Fault::Reset) => {
            ctl.kill(Kill::Reset);
            std::future::pending().await
        }
        Some(Fault::Blackhole) => {
            ctl.kill(Kill::Blackhole);
            std::future::pending().await
        }
        Some(Fault::Truncate) | None => {
            let resp = forward(req, &state, &ctl, fault == Some(Fault::Truncate)).await;
            if fault.is_none() {
                log(&resp.status().as_u16());
            }
            Ok(resp)
        }
    }
}

async fn forward(req: Request<Incoming>, state: &State, ctl: &Arc<ConnCtl>, truncate: bool) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match Uri::builder().scheme("http").authority(state.upstream.clone()).path_and_query(path).build() {
        Ok(uri) => uri,
        Err(_) => return xml_error(StatusCode::BAD_REQUEST, "InvalidURI", "the proxy cannot forward this URI"),
    };
    parts.version = Version::HTTP_11;
    let no_body = parts.method == Method::HEAD;
    let body = ProxyBody::stream(body, state.up.clone(), state.stats.bytes_up.clone(), None);
    state.stats.forwarded.fetch_add(1, Relaxed);
    let resp = match state.client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp,
        Err(e) => {
            state.stats.upstream_errors.fetch_add(1, Relaxed);
            if state.log {
                eprintln!("faultproxy: upstream error: {e}");
            }
            return xml_error(StatusCode::BAD_GATEWAY, "BadGateway", "the fault proxy could not reach the server");
        }
    };
    let (parts, body) = resp.into_parts();
    let cut = if truncate {
        let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let bodiless =
            no_body || matches!(parts.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) || length == Some(0);
        if bodiless {
            // Nothing to cut: the response is lost whole (the request did reach the server).
            ctl.kill(Kill::CloseAfterFlush);
            return std::future::pending().await;
        }
        Some(Cut { remaining: length.map(|n| n / 2), ctl: ctl.clone() })
    } else {
        None
    };
    Response::from_parts(parts, ProxyBody::stream(body, state.down.clone(), state.stats.bytes_down.clone(), cut))
}
