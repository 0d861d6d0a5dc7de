//! The controller's HTTPS client for agents: mutual TLS (the controller's
//! client certificate; the agent's certificate must chain to the agent CA
//! and carry the amphora's name), one connection per request, through the
//! shared client ([`siphon_proto::http`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use siphon_proto::http::{self, HttpError, Reply, Request, Target};
use thiserror::Error;

use crate::config::AgentTls;
use crate::model::Amphora;

/// Why the agent TLS material cannot be used.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Pem { what: &'static str, message: String },
    #[error("{what}: no certificate in it")]
    NoCertificate { what: &'static str },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("agent TLS setup: {0}")]
    Setup(#[from] TlsSetupError),
    #[error("server name {name:?}: {message}")]
    ServerName { name: String, message: String },
}

#[derive(Debug)]
pub struct AgentClient {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    default_config: Arc<ClientConfig>,
    timeout: Duration,
}

fn pem_certs(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Pem {
            what,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate { what });
    }
    Ok(certs)
}

fn client_config(
    ca_pem: &[u8],
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in pem_certs(ca_pem, "agent CA")? {
        roots.add(ca).map_err(|source| TlsSetupError::Rustls {
            what: "agent CA",
            source,
        })?;
    }
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsSetupError::Rustls {
            what: "TLS versions",
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs.to_vec(), key.clone_key())
        .map_err(|source| TlsSetupError::Rustls {
            what: "client certificate",
            source,
        })?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl AgentClient {
    pub fn new(tls: &AgentTls, timeout: Duration) -> Result<AgentClient, TlsSetupError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsSetupError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let certs = pem_certs(&read(&tls.cert)?, "agent_tls.cert")?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&tls.key)?).map_err(|e| TlsSetupError::Pem {
                what: "agent_tls.key",
                message: e.to_string(),
            })?;
        let default_config = Arc::new(client_config(&read(&tls.ca)?, &certs, &key)?);
        Ok(AgentClient {
            certs,
            key,
            default_config,
            timeout,
        })
    }

    /// Checks a per-amphora CA before it is stored.
    pub fn check_ca(&self, pem: &str) -> Result<(), TlsSetupError> {
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
        let config = match &amphora.ca_certificate {
            Some(pem) => Arc::new(client_config(pem.as_bytes(), &self.certs, &self.key)?),
            None => self.default_config.clone(),
        };
        let name = ServerName::try_from(amphora.server_name.clone()).map_err(|e| {
            AgentError::ServerName {
                name: amphora.server_name.clone(),
                message: e.to_string(),
            }
        })?;
        let target = Target::Tls {
            addr: crate::vip::join_host_port(&amphora.lb_network_ip, amphora.agent_port),
            name,
            config,
        };
        let mut req = Request::new(method, path).timeout(self.timeout);
        if let Some(body) = body {
            req = req.json(body);
        }
        Ok(http::send(&target, req).await?)
    }
}
