//! The body type for every message the proxy sends: a fixed buffer, or a streamed body
//! paced by a bandwidth limiter and optionally cut short.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::conn::{ConnCtl, Kill};
use crate::state::Limiter;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Cuts a body: after `remaining` bytes (half of the first chunk when unknown) no more
/// bytes flow and the connection is closed once what was sent is flushed.
pub struct Cut {
    pub remaining: Option<u64>,
    pub ctl: Arc<ConnCtl>,
}

pub struct ProxyBody {
    inner: Option<Incoming>,
    /// Bytes taken from `inner` (or the fixed body) and not yet sent.
    pending: Bytes,
    /// A piece waiting for the limiter.
    ready: Option<Bytes>,
    sleep: Option<Pin<Box<Sleep>>>,
    limiter: Option<Arc<Limiter>>,
    counter: Option<Arc<AtomicU64>>,
    cut: Option<Cut>,
    stalled: bool,
}

impl ProxyBody {
    pub fn fixed(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody {
            inner: None,
            pending: bytes.into(),
            ready: None,
            sleep: None,
            limiter: None,
            counter: None,
            cut: None,
            stalled: false,
        }
    }

    pub fn stream(inner: Incoming, limiter: Arc<Limiter>, counter: Arc<AtomicU64>, cut: Option<Cut>) -> ProxyBody {
        ProxyBody {
            inner: Some(inner),
            pending: Bytes::new(),
            ready: None,
            sleep: None,
            limiter: Some(limiter),
            counter: Some(counter),
            cut,
            stalled: false,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                let piece = this.ready.take().expect("a piece waits for the limiter");
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if this.stalled {
                // Cut: nothing more will come; the connection task closes the connection.
                return Poll::Pending;
            }
            if let Some(cut) = &this.cut {
                if cut.remaining == Some(0) {
                    this.stalled = true;
                    cut.ctl.kill(Kill::CloseAfterFlush);
                    return Poll::Pending;
                }
            }
            if !this.pending.is_empty() {
                let mut n = this.pending.len();
                let limiter = this.limiter.as_deref();
                if let Some(piece) = limiter.and_then(Limiter::piece) {
                    n = n.min(piece);
                }
                if let Some(cut) = &mut this.cut {
                    let remaining = cut.remaining.get_or_insert(this.pending.len() as u64 / 2);
                    n = n.min(*remaining as usize);
                    *remaining -= n as u64;
                    if n == 0 {
                        continue;
                    }
                }
                let piece = this.pending.split_to(n);
                if let Some(counter) = &this.counter {
                    counter.fetch_add(n as u64, Relaxed);
                }
                if let Some(at) = limiter.and_then(|l| l.reserve(n)) {
                    this.sleep = Some(Box::pin(tokio::time::sleep_until(at.into())));
                    this.ready = Some(piece);
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => {
                    this.inner = None;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none()
            && self.pending.is_empty()
            && !self.stalled
            && self.cut.is_none()
            && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held = (self.pending.len() + self.ready.as_ref().map_or(0, Bytes::len)) as u64;
        match &self.inner {
            None => SizeHint::with_exact(held),
            Some(inner) => {
                let h = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + held);
                if let Some(upper) = h.upper() {
                    out.set_upper(upper + held);
                }
                out
            }
        }
    }
}
