//! One client connection: hyper serves it until a fault asks for the connection itself to
//! be reset, closed or turned into a black hole; then the socket is taken back from hyper.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::{handle, State};

/// What to do with the client's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// Close at once with SO_LINGER 0: the client gets a RST.
    Reset = 1,
    /// Close normally (FIN) once everything hyper has buffered is written.
    CloseAfterFlush = 2,
    /// Stop answering; read and discard until the client closes.
    Blackhole = 3,
}

/// Shared between the connection task and the request handlers and bodies, which all run
/// inside the connection's future: a flag set there is seen as soon as that poll returns.
#[derive(Default)]
pub struct ConnCtl {
    kill: AtomicU8,
    write_blocked: AtomicBool,
    proxied: AtomicBool,
}

impl ConnCtl {
    pub fn kill(&self, k: Kill) {
        let _ = self.kill.compare_exchange(0, k as u8, Relaxed, Relaxed);
    }

    /// True the first time only: counts connections that carried a proxied request.
    pub fn first_proxied_request(&self) -> bool {
        !self.proxied.swap(true, Relaxed)
    }

    fn requested(&self) -> Option<Kill> {
        match self.kill.load(Relaxed) {
            1 => Some(Kill::Reset),
            2 => Some(Kill::CloseAfterFlush),
            3 => Some(Kill::Blackhole),
            _ => None,
        }
    }
}

/// The client socket, noting whether the last write was refused for lack of room.
struct CtlIo {
    inner: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl AsyncRead for CtlIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CtlIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.ctl.write_blocked.store(r.is_pending(), Relaxed);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.ctl.write_blocked.store(r.is_pending(), Relaxed);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub async fn serve(stream: TcpStream, state: Arc<State>) {
    let ctl = Arc::new(ConnCtl::default());
    let io = TokioIo::new(CtlIo { inner: stream, ctl: ctl.clone() });
    let svc_ctl = ctl.clone();
    let svc = service_fn(move |req| handle(req, state.clone(), svc_ctl.clone()));
    let mut conn = http1::Builder::new().keep_alive(true).serve_connection(io, svc);
    let kill = std::future::poll_fn(|cx| {
        if Pin::new(&mut conn).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        // hyper flushes its buffer before returning Pending; it is all in the kernel
        // unless the last write was refused, in which case hyper waits for room.
        match ctl.requested() {
            Some(Kill::CloseAfterFlush) if ctl.write_blocked.load(Relaxed) => Poll::Pending,
            Some(k) => Poll::Ready(Some(k)),
            None => Poll::Pending,
        }
    })
    .await;
    let Some(kill) = kill else { return };
    // Dropping hyper's side drops the pending handler and anything it had buffered.
    let mut stream = conn.into_parts().io.into_inner().inner;
    match kill {
        Kill::Reset => {
            let _ = stream.set_zero_linger();
        }
        Kill::CloseAfterFlush => {}
        Kill::Blackhole => {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(1..) = stream.read(&mut buf).await {}
        }
    }
}
