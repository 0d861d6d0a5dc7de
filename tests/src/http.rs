//! An HTTP (or HTTPS) backend whose answer a test sets: what health checks
//! probe. Served by hyper; HTTPS with a self-signed certificate from rcgen.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

/// A backend answering every request with the current `status`, and
/// recording the last request line.
#[derive(Debug)]
pub struct HttpBackend {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    requests: Arc<AtomicUsize>,
    last: Arc<std::sync::Mutex<String>>,
    accept_loop: tokio::task::AbortHandle,
}

impl HttpBackend {
    /// Plain HTTP on 127.0.0.1.
    pub fn start(rt: &Arc<tokio::runtime::Runtime>, status: u16) -> HttpBackend {
        HttpBackend::spawn(rt, "127.0.0.1", status, None)
    }

    /// Plain HTTP on `ip` (e.g. `0.0.0.0` to answer on every loopback
    /// address).
    pub fn start_on(rt: &Arc<tokio::runtime::Runtime>, ip: &str, status: u16) -> HttpBackend {
        HttpBackend::spawn(rt, ip, status, None)
    }

    /// HTTPS on 127.0.0.1 with a self-signed certificate (checks must not
    /// verify it).
    pub fn start_tls(rt: &Arc<tokio::runtime::Runtime>, status: u16) -> HttpBackend {
        HttpBackend::spawn(rt, "127.0.0.1", status, Some(self_signed()))
    }

    fn spawn(
        rt: &Arc<tokio::runtime::Runtime>,
        ip: &str,
        status: u16,
        tls: Option<TlsAcceptor>,
    ) -> HttpBackend {
        let ip: std::net::IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        let std_l = crate::listen(SocketAddr::new(ip, 0));
        let addr = std_l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let status = Arc::new(AtomicU16::new(status));
        let requests = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(std::sync::Mutex::new(String::new()));
        let (st, rq, la) = (status.clone(), requests.clone(), last.clone());
        let accept_loop = rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(std_l)
                .unwrap_or_else(|e| panic!("listener: {e}"));
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (st, rq, la, tls) = (st.clone(), rq.clone(), la.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(s).await {
                                serve(s, st, rq, la).await;
                            }
                        }
                        None => serve(s, st, rq, la).await,
                    }
                });
            }
        });
        HttpBackend {
            addr,
            status,
            requests,
            last,
            accept_loop: accept_loop.abort_handle(),
        }
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The last request's method and path, e.g. `HEAD /health`.
    pub fn last_request(&self) -> String {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn serve<S>(
    s: S,
    status: Arc<AtomicU16>,
    requests: Arc<AtomicUsize>,
    last: Arc<std::sync::Mutex<String>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let code = status.load(Ordering::SeqCst);
        requests.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut l) = last.lock() {
            *l = format!("{} {}", req.method(), req.uri());
        }
        async move {
            let mut res = Response::new(Full::new(Bytes::from_static(b"health\n")));
            *res.status_mut() = hyper::StatusCode::from_u16(code)
                .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(s), svc)
        .await;
}

/// A TLS acceptor with a fresh self-signed certificate for 127.0.0.1.
pub fn self_signed() -> TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .unwrap_or_else(|e| panic!("rcgen: {e}"));
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.key_pair.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(vec![der], key))
        .unwrap_or_else(|e| panic!("tls config: {e}"));
    TlsAcceptor::from(Arc::new(config))
}
