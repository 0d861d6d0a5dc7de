//! The control API's HTTP/1.1 server: `axum::serve` with the limits it
//! lacks, so that slow, idle or numerous clients can neither hold the
//! descriptors forwarding needs nor keep a SIGTERM from draining (the
//! controller's `serve.rs` does the same over TCP):
//!
//! - a cap on connections served at once per listener; at the cap the
//!   oldest connection is asked to close (an idle one, or one still
//!   sending its request head, closes at once; one being answered after
//!   its answer) and the accept waits for that slot, so the surplus waits
//!   in the kernel's backlog, where it costs this process no descriptor;
//! - a header-read timeout: the request line and headers must arrive
//!   whole within it, however slowly they trickle (hyper's own timer);
//! - an idle timeout: a connection on which nothing moved either way for
//!   that long, while no request is being handled, is closed (a client
//!   that connects and says nothing, a kept-alive connection, a client
//!   that does not read its answer). The body has its own deadline, in
//!   the handler (`api::body`);
//! - on stop, connections are asked to close and given [`STOP_GRACE`];
//!   whatever is left then is dropped. Nothing waits for a client.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tower_service::Service;

use super::ApiLimits;

/// How long connections still open at stop get to finish their answer.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Open connections by accept order, each with the way to ask it to close.
type Open = Arc<Mutex<BTreeMap<u64, Arc<Notify>>>>;

fn lock(open: &Open) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
    // The map is only inserted into and removed from: a panic elsewhere
    // cannot leave it inconsistent.
    open.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves `app` on `listener` until `stop` turns true, then closes what is
/// open within [`STOP_GRACE`].
pub async fn serve<L: Listener>(
    mut listener: L,
    app: axum::Router,
    limits: ApiLimits,
    mut stop: watch::Receiver<bool>,
) {
    let cap = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(cap));
    let open: Open = Arc::default();
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    // Warned at most every 10 s: a flood would otherwise flood the log.
    let mut warned_at_cap: Option<Instant> = None;
    loop {
        // Reap finished connection tasks so the set stays small.
        while conns.try_join_next().is_some() {}
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if warned_at_cap.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        cap,
                        "control API at its connection cap: closing the oldest connections to let new ones in"
                    );
                    warned_at_cap = Some(Instant::now());
                }
                close_oldest(&open);
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = stopped(&mut stop) => break,
                }
            }
        };
        let (io, _) = tokio::select! {
            c = listener.accept() => c,
            () = stopped(&mut stop) => break,
        };
        next_id += 1;
        let id = next_id;
        let close = Arc::new(Notify::new());
        lock(&open).insert(id, close.clone());
        let open = open.clone();
        let app = app.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            connection(io, app, &limits, close, stop).await;
            lock(&open).remove(&id);
            drop(permit);
        });
    }
    // Stopping: no more accepts (the listener closes here), every
    // connection asked to close, and none waited for past the grace.
    drop(listener);
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// Serves one connection until it ends, is asked to close, or the API
/// stops.
async fn connection<I>(
    io: I,
    app: axum::Router,
    limits: &ApiLimits,
    close: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let busy = Arc::new(AtomicUsize::new(0));
    let in_flight = busy.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let call = app.clone().call(req);
        let busy = in_flight.clone();
        busy.fetch_add(1, Ordering::Relaxed);
        async move {
            // The idle timer stays off while a handler runs: an apply may
            // take a while, and it has its own bounds.
            let _done = Busy(busy);
            call.await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let io = Idle::new(io, limits.idle_timeout, busy);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        // The connection first: one asked to close before it was ever
        // polled still reads and answers the request it already sent.
        biased;
        r = conn.as_mut() => Some(r),
        () = close.notified() => None,
        () = stopped(&mut stop) => None,
    };
    let r = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "control API connection ended with an error");
    }
}

/// Counts a handler as running until dropped.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(drop);
}

/// Asks the oldest open connection to close (each is asked once).
fn close_oldest(open: &Open) {
    let oldest = lock(open).pop_first();
    if let Some((_, close)) = oldest {
        close.notify_one();
    }
}

/// A stream that fails with `TimedOut` once nothing moved either way for
/// `limit` while it is read or written and no handler is running.
struct Idle<I> {
    io: I,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    busy: Arc<AtomicUsize>,
}

impl<I> Idle<I> {
    fn new(io: I, limit: Duration, busy: Arc<AtomicUsize>) -> Idle<I> {
        Idle {
            io,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            busy,
        }
    }

    fn moved(&mut self) {
        let at = tokio::time::Instant::now() + self.limit;
        self.deadline.as_mut().reset(at);
    }

    /// A write's outcome, the deadline moved by what it wrote.
    fn wrote(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.expired(cx),
        }
    }

    fn expired<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            // A handler is running: the silence is ours, not the client's.
            self.moved();
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "control API connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Idle<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx),
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Idle<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(r, cx)
    }

    // Vectored, so hyper writes a response's head and body in one
    // `writev` instead of copying the body into its own buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.expired(cx),
            r => r,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
