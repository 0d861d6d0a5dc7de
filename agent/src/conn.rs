//! One controller connection after its TLS handshake: HTTP/1.1 with a
//! header-read timeout and an idle timeout, and the rate-limited log of
//! refused handshakes.
//!
//! Timeouts (hyper 1.x):
//! - `header_read_timeout`: hyper's own. Its clock starts when hyper starts
//!   waiting for a request head, i.e. right after the handshake and right
//!   after each response, so it bounds both a request head sent slowly and
//!   the idle wait between requests on a kept-alive connection.
//! - `idle_timeout`: ours. A connection on which no byte moved either way
//!   for that long is closed, unless a request whose body was read in full
//!   is being handled (a slow handler is never cut). It catches what
//!   hyper's timeout does not: a request body that stops arriving, a
//!   response nobody reads.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Limits;

/// At most one log line about refused handshakes per this long.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Says when to log an event that may come in floods: the first, then at
/// most one per `every`, with how many were not logged in between.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// An event at `now`: `Some(n)` to log it (with `n` not logged since
    /// the last line), `None` to count it silently.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

pub fn log_refusal(throttle: &Mutex<Throttle>, peer: SocketAddr, reason: &str) {
    let note = throttle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note(Instant::now());
    if let Some(not_logged) = note {
        tracing::warn!(
            %peer,
            reason,
            not_logged,
            "TLS handshake refused (at most one line per {}s; not_logged: refusals since the last line)",
            REFUSAL_LOG_EVERY.as_secs()
        );
    }
}

/// When the connection last moved a byte, and how many requests with a
/// complete body are being handled.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    handling: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The TLS stream, noting every byte that moves.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One request being handled: counted in `handling` from when its body is
/// complete until its response is ready and the body dropped.
#[derive(Debug)]
struct Handling {
    activity: Arc<Activity>,
    counted: AtomicBool,
}

impl Handling {
    fn body_complete(&self) {
        if !self.counted.swap(true, Ordering::Relaxed) {
            self.activity.handling.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        if *self.counted.get_mut() {
            self.activity.handling.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request body that says when it has been read in full.
#[derive(Debug)]
pub struct TrackedBody {
    inner: Incoming,
    handling: Arc<Handling>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.handling.body_complete();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves HTTP/1.1 on an accepted TLS stream until the client leaves, a
/// timeout closes it, or an error ends it.
pub async fn serve<S>(stream: S, peer: SocketAddr, app: axum::Router, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        handling: AtomicUsize::new(0),
    });
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let handling = Arc::new(Handling {
            activity: requests.clone(),
            counted: AtomicBool::new(false),
        });
        if req.body().is_end_stream() {
            handling.body_complete();
        }
        let req = req.map(|inner| TrackedBody {
            inner,
            handling: handling.clone(),
        });
        let response = svc.call(req);
        async move {
            let r = response.await;
            drop(handling);
            r
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout());
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = limits.idle_timeout();
    loop {
        let handling = activity.handling.load(Ordering::Relaxed) > 0;
        let wake = if handling {
            tokio::time::Instant::now() + idle
        } else {
            tokio::time::Instant::from_std(activity.last() + idle)
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                let handling = activity.handling.load(Ordering::Relaxed) > 0;
                if !handling && activity.last().elapsed() >= idle {
                    tracing::debug!(%peer, idle_ms = idle.as_millis() as u64, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_logs_the_first_then_one_per_period_with_a_count() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.note(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.note(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.note(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(t.note(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.note(t0 + Duration::from_secs(25)), Some(1));
        // A clock read out of order does not panic.
        assert_eq!(t.note(t0), None);
    }
}
