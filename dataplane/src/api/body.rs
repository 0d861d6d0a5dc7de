//! Reading a pushed config's body within the API's limits: at most
//! `max_body` bytes (413 beyond, before reading when `Content-Length`
//! says so), all of it within `body_read_timeout` however slowly it comes
//! (408), and from a budget of body bytes shared by every request in
//! flight (503 with `Retry-After` when it is spent), so parallel pushes
//! cannot pile up memory. The budget is held until the request is done:
//! the parsed config costs memory in proportion to its body.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde_json::json;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiLimits;

#[derive(Debug, Error)]
pub enum BodyError {
    #[error("the config body{} is larger than the limit of {limit} bytes", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge { size: Option<u64>, limit: usize },
    #[error(
        "{budget} bytes of config bodies are being received or applied already; retry shortly"
    )]
    Busy { budget: usize },
    #[error("the config body did not arrive whole within {0:?}")]
    Timeout(Duration),
    #[error("cannot read the config body: {0}")]
    Read(String),
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let code = match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        };
        let body = Json(json!({ "error": self.to_string(), "problems": [] }));
        if code == StatusCode::SERVICE_UNAVAILABLE {
            (code, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (code, body).into_response()
        }
    }
}

/// A body read whole, and its share of the budget.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    _budget: OwnedSemaphorePermit,
}

/// Reads `body` within `limits`, taking its size from `budget`.
pub async fn read(
    body: axum::body::Body,
    content_length: Option<u64>,
    limits: &ApiLimits,
    budget: &Arc<Semaphore>,
) -> Result<Received, BodyError> {
    let limit = limits.max_body;
    let too_large = |size| BodyError::TooLarge { size, limit };
    if let Some(n) = content_length.filter(|n| *n > limit as u64) {
        return Err(too_large(Some(n)));
    }
    let reserve = |n: usize| {
        let n = u32::try_from(n).map_err(|_| too_large(None))?;
        budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| BodyError::Busy {
                budget: limits.budget(),
            })
    };
    // Reserved up front when the size is known; a chunked body reserves
    // as it arrives.
    let declared = content_length.map_or(0, |n| n as usize);
    let mut permit = reserve(declared)?;
    let mut bytes = Vec::with_capacity(declared);
    let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout(limits.body_read_timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let total = bytes.len() + data.len();
        if total > limit {
            return Err(too_large(None));
        }
        if total > permit.num_permits() {
            permit.merge(reserve(total - permit.num_permits())?);
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Received {
        bytes,
        _budget: permit,
    })
}
