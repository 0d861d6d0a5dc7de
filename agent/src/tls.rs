//! Mutual TLS for the controller API: the agent's certificate, and client
//! certificates that must chain to the controller CA (checked by rustls'
//! WebPKI verifier during the handshake, validity dates included).
//!
//! The current server config sits behind a lock taken once per accepted
//! connection, so a rotation applies to the next handshake with no
//! restart and no effect on connections already open.
//!
//! A rotation is checked before anything is written or swapped
//! ([`check_rotation`]): the new certificate must chain to the CA the
//! controller trusts for agents, be valid now and carry the name the
//! controller expects (rustls' WebPKI server verifier, exactly what the
//! controller will run), its key must match it, and the new client CA must
//! parse. Anything less could lock the controller out.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
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
    #[error("the new certificate would not be trusted as {name:?} by the controller: {reason}")]
    Untrusted { name: String, reason: String },
    #[error("the new key does not match the new certificate: {0}")]
    KeyMismatch(String),
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

/// The certificates of a PEM CA bundle as trust anchors.
pub fn roots(pem: &[u8], what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(pem, what)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Rustls(format!("{what}: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a rotation is checked against: the CA the controller trusts for
/// agents and the name it expects.
#[derive(Debug, Clone)]
pub struct RotationPolicy {
    verifier: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl RotationPolicy {
    pub fn new(server_ca: &[u8], name: &str) -> Result<RotationPolicy, TlsError> {
        let roots = roots(server_ca, "server_ca")?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Rustls(format!("server_ca: {e}")))?;
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| TlsError::Rustls(format!("server name {name:?}: {e}")))?;
        Ok(RotationPolicy { verifier, name })
    }
}

/// Checks new TLS material whole and builds its server config: the
/// certificate chains to the policy's CA, is valid now and carries its name;
/// the key matches the certificate; the client CA parses.
pub fn check_rotation(m: &Material, policy: &RotationPolicy) -> Result<ServerConfig, TlsError> {
    let chain = certs(&m.cert, "cert")?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(TlsError::Empty { what: "cert" })?;
    policy
        .verifier
        .verify_server_cert(leaf, intermediates, &policy.name, &[], UnixTime::now())
        .map_err(|e| TlsError::Untrusted {
            name: policy.name.to_str().into_owned(),
            reason: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(&m.key).map_err(|e| TlsError::Pem {
        what: "key",
        message: e.to_string(),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
    // Strict: a key whose public half cannot be compared is refused too.
    CertifiedKey::new(chain, signing)
        .keys_match()
        .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
    server_config(m)
}

/// A server config requiring client certificates from `client_ca`.
pub fn server_config(m: &Material) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let roots = roots(&m.client_ca, "client_ca")?;
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
