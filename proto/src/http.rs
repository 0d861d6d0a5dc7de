//! One HTTP/1 client for every request a Siphon process sends: to the
//! dataplane's control socket (Unix), to the controller's API (TCP) and to
//! the agents (TCP with mutual TLS). One request per connection: these are
//! rare control calls, and a fresh connection never meets a half-closed
//! one left over from a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderName, CONTENT_TYPE, HOST};
use hyper::Method;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long a request may take, connect to last byte, unless it says
/// otherwise: long enough for a dataplane applying a large config, short
/// enough that a hung peer does not hang its caller.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a request goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A Unix stream socket (the dataplane's control API).
    Unix(PathBuf),
    /// `host:port` over plain TCP.
    Tcp(String),
    /// `host:port` over TLS, checked against `name` with `config` (which
    /// carries the client certificate for mutual TLS).
    Tls {
        addr: String,
        name: ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
}

impl Target {
    /// The peer as errors name it.
    pub fn peer(&self) -> String {
        match self {
            Target::Unix(path) => path.display().to_string(),
            Target::Tcp(addr) | Target::Tls { addr, .. } => addr.clone(),
        }
    }

    /// The Host header's value: the socket has no host, so it names the
    /// dataplane; TLS names the certificate's host.
    fn host(&self) -> String {
        match self {
            Target::Unix(_) => "siphon-dataplane".into(),
            Target::Tcp(addr) => addr.clone(),
            Target::Tls { name, .. } => name.to_str().into_owned(),
        }
    }
}

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("TLS with {peer}: {source}")]
    Tls {
        peer: String,
        source: std::io::Error,
    },
    #[error("HTTP with {peer}: {source}")]
    Http { peer: String, source: hyper::Error },
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

impl HttpError {
    /// True when the peer was never reached (nothing was sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, HttpError::Connect { .. })
    }
}

/// One request: method, path, extra headers, an optional body.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    path: String,
    headers: Vec<(HeaderName, String)>,
    body: Option<(&'static str, Vec<u8>)>,
    timeout: Duration,
}

impl Request {
    pub fn new(method: Method, path: impl Into<String>) -> Request {
        Request {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn get(path: impl Into<String>) -> Request {
        Request::new(Method::GET, path)
    }

    /// Adds a header. A value that is no valid header value (a token with
    /// a newline in it) is an error when the request is sent.
    pub fn header(mut self, name: HeaderName, value: impl Into<String>) -> Request {
        self.headers.push((name, value.into()));
        self
    }

    /// A body with its content type.
    pub fn body(mut self, content_type: &'static str, bytes: Vec<u8>) -> Request {
        self.body = Some((content_type, bytes));
        self
    }

    /// A JSON body.
    pub fn json(self, bytes: Vec<u8>) -> Request {
        self.body("application/json", bytes)
    }

    /// Connect to last byte must take no longer than `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = timeout;
        self
    }
}

/// A response: status code and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends one request and reads the whole reply, within its timeout.
pub async fn send(target: &Target, req: Request) -> Result<Reply, HttpError> {
    let timeout = req.timeout;
    let request = build(target, req)?;
    match tokio::time::timeout(timeout, exchange(target, request)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout {
            peer: target.peer(),
            timeout,
        }),
    }
}

/// The same from blocking code (a CLI, a test): on a runtime of its own.
pub fn send_blocking(target: &Target, req: Request) -> Result<Reply, HttpError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HttpError::Runtime)?
        .block_on(send(target, req))
}

/// The hyper request: a header that is no valid header value is refused
/// here, before anything connects.
fn build(target: &Target, req: Request) -> Result<hyper::Request<Full<Bytes>>, HttpError> {
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(req.path)
        .header(HOST, target.host());
    for (name, value) in req.headers {
        builder = builder.header(name, value.as_str());
    }
    let payload = match req.body {
        Some((content_type, bytes)) => {
            builder = builder.header(CONTENT_TYPE, content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    Ok(builder.body(Full::new(payload))?)
}

async fn exchange(target: &Target, req: hyper::Request<Full<Bytes>>) -> Result<Reply, HttpError> {
    let peer = || target.peer();
    let connect = |source| HttpError::Connect {
        peer: peer(),
        source,
    };
    match target {
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect)?;
            over(stream, target, req).await
        }
        Target::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(connect)?;
            // Request and reply are one write each: don't hold them back.
            let _ = stream.set_nodelay(true);
            over(stream, target, req).await
        }
        Target::Tls { addr, name, config } => {
            let tcp = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(connect)?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|source| HttpError::Tls {
                    peer: peer(),
                    source,
                })?;
            over(stream, target, req).await
        }
    }
}

/// The HTTP exchange over a connected stream.
async fn over<S>(
    stream: S,
    target: &Target,
    request: hyper::Request<Full<Bytes>>,
) -> Result<Reply, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| HttpError::Http {
        peer: target.peer(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(conn);
    let result = async {
        let res = sender.send_request(request).await.map_err(http)?;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.map_err(http)?.to_bytes();
        Ok(Reply {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("siphon-http-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn nothing_listening_is_a_connect_error_naming_the_socket() {
        let dir = scratch("connect");
        let path = dir.join("none.sock");
        let e = send_blocking(&Target::Unix(path.clone()), Request::get("/v1/status")).unwrap_err();
        assert!(e.is_connect(), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_peer_that_never_answers_is_a_timeout_not_a_hang() {
        let dir = scratch("timeout");
        let path = dir.join("mute.sock");
        // Accepts (the kernel's backlog does) and never reads or writes.
        let _mute = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let req = Request::get("/v1/status").timeout(Duration::from_millis(200));
        let e = send_blocking(&Target::Unix(path), req).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_header_value_with_a_newline_is_refused_before_anything_connects() {
        let dir = scratch("header");
        let path = dir.join("x.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let req = Request::get("/").header(hyper::header::ACCEPT, "a\r\nX-Injected: 1");
        let e = send_blocking(&Target::Unix(path), req).unwrap_err();
        assert!(matches!(e, HttpError::Request(_)), "{e}");
        assert!(listener.accept().is_err(), "nobody connected");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
