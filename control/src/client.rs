//! A small client of the controller's API (plain HTTP, JSON), used by the
//! `siphon` CLI and the tests.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("endpoint {0:?}: expected http://HOST:PORT")]
    Endpoint(String),
    #[error("cannot reach {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("HTTP: {0}")]
    Http(String),
}

#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`.
    authority: String,
    token: Option<String>,
}

/// An answer: status and JSON body (`null` when there was none).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// Octavia's error text, when the body is a fault.
    pub fn fault(&self) -> Option<&str> {
        self.body.get("faultstring").and_then(Value::as_str)
    }
}

impl Client {
    /// `endpoint` like `http://127.0.0.1:9876` (a path after it is
    /// ignored: calls give the full path).
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Client, ClientError> {
        let u = url::Url::parse(endpoint).map_err(|_| ClientError::Endpoint(endpoint.into()))?;
        if u.scheme() != "http" {
            return Err(ClientError::Endpoint(endpoint.into()));
        }
        let host = u
            .host_str()
            .ok_or_else(|| ClientError::Endpoint(endpoint.into()))?;
        let port = u
            .port_or_known_default()
            .unwrap_or(crate::config::DEFAULT_PORT);
        Ok(Client {
            authority: crate::vip::join_host_port(host.trim_matches(['[', ']']), port),
            token,
        })
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.authority.clone(),
                message: e.to_string(),
            })?;
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(http)?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header("X-Auth-Token", t.as_str());
        }
        let bytes = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(v).map_err(|e| ClientError::Http(e.to_string()))?
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        driver.abort();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer { status, body })
    }
}
