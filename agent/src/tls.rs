//! Mutual TLS for the controller API: the agent's certificate, and client
//! certificates that must chain to the controller CA (checked by rustls'
//! WebPKI verifier during the handshake, validity dates included).
//!
//! The current server config sits behind a lock taken once per accepted
//! connection, so a rotation applies to the next handshake with no
//! restart and no effect on connections already open.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what}: {message}")]
    Pem { what: &'static str, message: String },
    #[error("{what}: no certificate in it")]
    Empty { what: &'static str },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// PEM texts of the agent's TLS material.
#[derive(Debug, Clone)]
pub struct Material {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Vec<u8>,
}

impl Material {
    pub fn read(cert: &Path, key: &Path, client_ca: &Path) -> std::io::Result<Material> {
        Ok(Material {
            cert: std::fs::read(cert)?,
            key: std::fs::read(key)?,
            client_ca: std::fs::read(client_ca)?,
        })
    }
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what });
    }
    Ok(certs)
}

/// A server config requiring client certificates from `client_ca`.
pub fn server_config(m: &Material) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(&m.client_ca, "client_ca")? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Rustls(format!("client_ca: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&m.key).map_err(|e| TlsError::Pem {
        what: "key",
        message: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&m.cert, "cert")?, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The live server config, replaceable at run time.
#[derive(Debug, Clone)]
pub struct Live(Arc<RwLock<Arc<ServerConfig>>>);

impl Live {
    pub fn new(config: ServerConfig) -> Live {
        Live(Arc::new(RwLock::new(Arc::new(config))))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.0
            .read()
            .map_or_else(|e| e.into_inner().clone(), |c| c.clone())
    }

    pub fn replace(&self, config: ServerConfig) {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        *slot = Arc::new(config);
    }
}
