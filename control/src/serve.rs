//! The API's HTTP/1.1 server, with the limits `axum::serve` lacks, so that
//! idle or slow clients cannot take the descriptors that pushes, the store
//! and the health manager need:
//!
//! - a cap on connections served at once, lowered at start to leave
//!   `reserved_fds` of the process's descriptor limit free; at the cap the
//!   oldest connection is asked to close (an idle one closes at once, a
//!   busy one after its answer) and the accept waits for its slot, so the
//!   surplus waits in the kernel's backlog instead of failing with
//!   `EMFILE`;
//! - a header-read timeout (hyper's, which also bounds how long a
//!   kept-alive connection waits for its next request);
//! - an idle timeout while a request is read or answered (a stalled body,
//!   a client that does not read).
//!
//! Accept errors are logged (rate-limited) and back off instead of
//! spinning.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower_service::Service;

use crate::config::Limits;
use crate::log_limit::LogLimit;

/// Raises the soft descriptor limit to the hard one (systemd's
/// `LimitNOFILE` sets both) and returns it.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the descriptor limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The connection cap that leaves `reserved_fds` of `nofile` free.
pub fn connection_cap(limits: &Limits, nofile: u64) -> usize {
    let room = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(limits.reserved_fds)
        .max(16);
    limits.max_connections.min(room)
}

/// Open connections by accept order, each with the way to ask it to close.
type Open = Arc<Mutex<BTreeMap<u64, Arc<Notify>>>>;

/// Serves `app` on `listener` until `stopped`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    cap: usize,
    mut stopped: watch::Receiver<bool>,
) {
    static ACCEPT_ERRORS: LogLimit = LogLimit::new(Duration::from_secs(10));
    static AT_CAP: LogLimit = LogLimit::new(Duration::from_secs(10));
    let slots = Arc::new(Semaphore::new(cap));
    let open: Open = Arc::default();
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
    let idle_timeout = Duration::from_millis(limits.idle_timeout_ms);
    let mut next_id: u64 = 0;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if let Some(held) = AT_CAP.hit(Instant::now()) {
                    tracing::warn!(
                        cap,
                        held_back = held,
                        "API at its connection cap: closing the oldest connections to let new ones in"
                    );
                }
                close_oldest(&open);
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    () = until_stopped(&mut stopped) => return,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    if let Some(held) = ACCEPT_ERRORS.hit(Instant::now()) {
                        tracing::error!(error = %e, held_back = held, "API accept failed; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = until_stopped(&mut stopped) => return,
        };
        next_id += 1;
        let id = next_id;
        let close = Arc::new(Notify::new());
        open.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, close.clone());
        let open = open.clone();
        let app = app.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().call(req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(Idle::new(tcp, idle_timeout)), svc);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = close.notified() => None,
                () = until_stopped(&mut stopped) => None,
            };
            let r = match ended {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
            open.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            drop(permit);
        });
    }
}

/// Resolves once `stopped` says so (the guard `wait_for` returns is not
/// `Send`, so it is dropped here).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await.map(drop);
}

/// Asks the oldest open connection to close (each is asked once).
fn close_oldest(open: &Open) {
    let oldest = open.lock().unwrap_or_else(|e| e.into_inner()).pop_first();
    if let Some((_, close)) = oldest {
        close.notify_one();
    }
}

/// A stream that fails with `TimedOut` once nothing moved either way for
/// `limit` while it is read or written.
struct Idle {
    io: TcpStream,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(io: TcpStream, limit: Duration) -> Idle {
        Idle {
            io,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
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
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Idle {
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

impl AsyncWrite for Idle {
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

/// The peer of a request served by [`serve`] (absent in tests that call
/// the router directly).
pub fn peer(req: &axum::extract::Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_free() {
        let l = Limits::default();
        assert_eq!(connection_cap(&l, 1024), 768);
        assert_eq!(connection_cap(&l, 65_536), 1_000);
        assert_eq!(connection_cap(&l, 100), 16);
    }
}
