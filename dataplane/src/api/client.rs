//! A client of the control API over its Unix socket: one request per
//! connection, through hyper. Used by `siphon-dataplane ctl` (and tests).

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cannot connect to {path}: {source} (is siphon-dataplane running with this --socket?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
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

/// Sends one request and reads the whole reply (blocking).
pub fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<Reply, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(request_async(socket, method, path, body))
}

/// The same, inside a tokio runtime.
pub async fn request_async(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<Reply, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "siphon-dataplane");
    let payload = match body {
        Some((content_type, bytes)) => {
            req = req.header(hyper::header::CONTENT_TYPE, content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let res = sender.send_request(req.body(Full::new(payload))?).await?;
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
