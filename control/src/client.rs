//! A small client of the controller's API (plain HTTP, JSON), used by the
//! `siphon` CLI and the tests, over the shared client
//! ([`siphon_proto::http`]).

use hyper::header::{HeaderName, ACCEPT};
use hyper::Method;
use serde_json::Value;
use siphon_proto::http::{self, HttpError, Request, Target};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("endpoint {0:?}: expected http://HOST:PORT")]
    Endpoint(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("request body: {0}")]
    Json(String),
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
        let mut req = Request::new(method, path).header(ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header(HeaderName::from_static("x-auth-token"), t.as_str());
        }
        if let Some(v) = body {
            req = req.json(serde_json::to_vec(v).map_err(|e| ClientError::Json(e.to_string()))?);
        }
        let reply = http::send(&Target::Tcp(self.authority.clone()), req).await?;
        let body = if reply.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body))
        };
        Ok(Answer {
            status: reply.status,
            body,
        })
    }
}
