//! The controller's HTTPS client for agents: mutual TLS (the controller's
//! client certificate; the agent's certificate must chain to the agent CA
//! and carry the amphora's name), one connection per request.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;
use tokio_rustls::TlsConnector;

use crate::config::AgentTls;
use crate::model::Amphora;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("TLS with {addr}: {message}")]
    Tls { addr: String, message: String },
    #[error("HTTP with {addr}: {message}")]
    Http { addr: String, message: String },
    #[error("{addr} did not answer within {0:?}", .timeout)]
    Timeout { addr: String, timeout: Duration },
    #[error("agent TLS setup: {0}")]
    Setup(String),
}

/// An agent's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

#[derive(Debug)]
pub struct AgentClient {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    default_config: Arc<ClientConfig>,
    timeout: Duration,
}

fn pem_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in it"));
    }
    Ok(certs)
}

fn client_config(
    ca_pem: &[u8],
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in pem_certs(ca_pem, "agent CA")? {
        roots.add(ca).map_err(|e| format!("agent CA: {e}"))?;
    }
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs.to_vec(), key.clone_key())
        .map_err(|e| format!("client certificate: {e}"))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl AgentClient {
    pub fn new(tls: &AgentTls, timeout: Duration) -> Result<AgentClient, String> {
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let certs = pem_certs(&read(&tls.cert)?, "agent_tls.cert")?;
        let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?)
            .map_err(|e| format!("agent_tls.key: {e}"))?;
        let default_config = Arc::new(client_config(&read(&tls.ca)?, &certs, &key)?);
        Ok(AgentClient {
            certs,
            key,
            default_config,
            timeout,
        })
    }

    /// Checks a per-amphora CA before it is stored.
    pub fn check_ca(&self, pem: &str) -> Result<(), String> {
        client_config(pem.as_bytes(), &self.certs, &self.key).map(|_| ())
    }

    /// One request to `amphora`'s agent, JSON body optional.
    pub async fn request(
        &self,
        amphora: &Amphora,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, AgentError> {
        let addr = crate::vip::join_host_port(&amphora.lb_network_ip, amphora.agent_port);
        match tokio::time::timeout(
            self.timeout,
            self.exchange(amphora, &addr, method, path, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                addr,
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        amphora: &Amphora,
        addr: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, AgentError> {
        let config = match &amphora.ca_certificate {
            Some(pem) => Arc::new(
                client_config(pem.as_bytes(), &self.certs, &self.key).map_err(AgentError::Setup)?,
            ),
            None => self.default_config.clone(),
        };
        let name =
            ServerName::try_from(amphora.server_name.clone()).map_err(|e| AgentError::Tls {
                addr: addr.to_owned(),
                message: format!("server name {:?}: {e}", amphora.server_name),
            })?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| AgentError::Connect {
                addr: addr.to_owned(),
                message: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| AgentError::Tls {
                addr: addr.to_owned(),
                message: e.to_string(),
            })?;
        let http = |e: hyper::Error| AgentError::Http {
            addr: addr.to_owned(),
            message: e.to_string(),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(http)?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, amphora.server_name.as_str());
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AgentError::Http {
                addr: addr.to_owned(),
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        driver.abort();
        Ok(Reply {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}
