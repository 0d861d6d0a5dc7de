//! One health check of one member, with Octavia's semantics per monitor
//! type. Async (the monitor runs many at once on one thread); every check
//! is bounded by the monitor's `timeout`.
//!
//! - `TCP`: the connect completes.
//! - `HTTP` / `HTTPS`: the request gets a response whose status is in
//!   `expected_codes`. HTTPS does not verify the certificate (Octavia's
//!   haproxy checks don't either).
//! - `TLS-HELLO`: a TLS handshake completes (no verification).
//! - `UDP-CONNECT`: an empty datagram draws no ICMP port unreachable within
//!   the timeout (what Octavia's `nc -uz` check tells); an answer is up too.
//! - `PING`: an ICMP echo reply comes back ([`super::ping`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

use crate::config::{HttpMethod, MonitorType};

/// What to check and how; built once per target by the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub kind: MonitorType,
    pub target: SocketAddr,
    pub timeout: Duration,
    /// HTTP and HTTPS only.
    pub http: Option<HttpCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    pub method: HttpMethod,
    pub path: String,
    /// Inclusive ranges of accepted status codes.
    pub expected: Vec<(u16, u16)>,
}

/// Why a check failed; shown in `/v1/status` as the member's reason.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("ICMP port unreachable")]
    PortUnreachable,
    #[error("UDP: {0}")]
    Udp(io::Error),
    #[error("HTTP status {0} not in expected_codes")]
    Status(u16),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP request: {0}")]
    Request(String),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("ping: {0}")]
    Ping(io::Error),
}

/// Runs `check` once.
pub async fn run(check: &Check, tls: &TlsConnector) -> Result<(), ProbeError> {
    if check.kind == MonitorType::UdpConnect {
        // Silence until the timeout is the good outcome here.
        return udp_connect(check.target, check.timeout).await;
    }
    match tokio::time::timeout(check.timeout, run_bounded(check, tls)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}

async fn run_bounded(check: &Check, tls: &TlsConnector) -> Result<(), ProbeError> {
    match check.kind {
        MonitorType::Ping => super::ping::echo(check.target.ip())
            .await
            .map_err(ProbeError::Ping),
        MonitorType::Tcp => connect(check.target).await.map(drop),
        MonitorType::TlsHello => {
            let tcp = connect(check.target).await?;
            handshake(tls, check.target, tcp).await.map(drop)
        }
        MonitorType::Http => {
            let tcp = connect(check.target).await?;
            http(check, tcp).await
        }
        MonitorType::Https => {
            let tcp = connect(check.target).await?;
            let stream = handshake(tls, check.target, tcp).await?;
            http(check, stream).await
        }
        MonitorType::UdpConnect => udp_connect(check.target, check.timeout).await,
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(target)
        .await
        .map_err(ProbeError::Connect)
}

async fn handshake(
    tls: &TlsConnector,
    target: SocketAddr,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeError> {
    let name = ServerName::IpAddress(target.ip().into());
    tls.connect(name, tcp).await.map_err(ProbeError::Tls)
}

/// One request on a fresh connection (`Connection: close`), judged by its
/// status code; the body is not read.
async fn http<S>(check: &Check, stream: S) -> Result<(), ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(h) = &check.http else {
        return Ok(());
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future drives the socket; it ends with the check.
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(method(h.method))
        .uri(h.path.as_str())
        .header(hyper::header::HOST, check.target.to_string())
        .header(hyper::header::USER_AGENT, "siphon-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new());
    // validate() checked the path, so building should not fail; if it
    // does, the member is reported down with the reason, never a panic.
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(ProbeError::Request(e.to_string()));
        }
    };
    let res = send.send_request(req).await;
    driver.abort();
    let code = res?.status().as_u16();
    if h.expected.iter().any(|&(lo, hi)| (lo..=hi).contains(&code)) {
        Ok(())
    } else {
        Err(ProbeError::Status(code))
    }
}

fn method(m: HttpMethod) -> hyper::Method {
    use hyper::Method;
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Trace => Method::TRACE,
        HttpMethod::Options => Method::OPTIONS,
        HttpMethod::Connect => Method::CONNECT,
        HttpMethod::Patch => Method::PATCH,
    }
}

/// A connected UDP socket reports an ICMP port unreachable for its earlier
/// datagram as `ECONNREFUSED` on the next receive.
async fn udp_connect(target: SocketAddr, wait: Duration) -> Result<(), ProbeError> {
    let local: SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(ProbeError::Udp)?;
    sock.connect(target).await.map_err(ProbeError::Udp)?;
    sock.send(&[])
        .await
        .map_err(|e| refused_or(e, ProbeError::Udp))?;
    let mut buf = [0u8; 512];
    match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
        Err(_) | Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(refused_or(e, ProbeError::Udp)),
    }
}

fn refused_or(e: io::Error, other: fn(io::Error) -> ProbeError) -> ProbeError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ProbeError::PortUnreachable
    } else {
        other(e)
    }
}

/// The TLS client of HTTPS and TLS-HELLO checks: any certificate, as
/// Octavia's checks accept (a member's certificate names the service, not
/// the address the check uses).
pub fn tls_connector() -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The handshake itself stays sound: the server proves it holds the
        // key of the certificate it sent, whatever that certificate is.
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
