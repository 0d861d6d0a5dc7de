//! The agent's API, served twice: over HTTPS with mutual TLS for the
//! controller, and over a local Unix socket without TLS for operators.
//!
//! - `GET /v1/info`: id, version, hostname, uptime.
//! - `PUT /v1/config`: a dataplane config (JSON). Applied to the dataplane
//!   first; only a config the dataplane took is persisted, so a rejected
//!   one leaves the previous config running and on disk. Idempotent by
//!   generation: the persisted generation with the same content answers
//!   200 again (and is re-applied if the dataplane lost it).
//! - `GET /v1/config`: the persisted config.
//! - `GET /v1/status`, `GET /v1/stats`: the dataplane's.
//! - `PUT /v1/vips`: add/remove VIP addresses on an interface (netlink),
//!   idempotent.
//! - `PUT /v1/certificates`: new PEM cert, key and client CA; used from the
//!   next handshake on, and written over the configured files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper::Method;
use serde::Deserialize;
use serde_json::json;
use siphon_dataplane::api::client::{request_async, Reply};
use siphon_dataplane::config::load::Format;
use siphon_dataplane::Config;

use crate::store::Store;
use crate::tls::{self, Live, Material};

/// Largest request body (configs with thousands of listeners fit).
const MAX_BODY: usize = 64 << 20;

/// What the handlers share.
#[derive(Debug)]
pub struct Agent {
    pub id: String,
    pub started: Instant,
    pub dataplane: PathBuf,
    pub store: Store,
    /// The persisted config, cached; pushes are serialised through it.
    pub persisted: tokio::sync::Mutex<Option<Config>>,
    pub tls: Live,
    /// Where rotated TLS material is written (cert, key, client CA).
    pub tls_files: crate::config::TlsFiles,
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/config", get(get_config).put(put_config))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/certificates", put(put_certificates))
        .route("/v1/vips", put(put_vips))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

/// The dataplane's answer, passed on as it came.
fn relay(reply: Reply) -> Response {
    let code = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        code,
        [(hyper::header::CONTENT_TYPE, "application/json")],
        reply.body,
    )
        .into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("dataplane unavailable: {e}"),
    )
}

async fn info(State(agent): State<Arc<Agent>>) -> Response {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    Json(json!({
        "id": agent.id,
        "version": env!("CARGO_PKG_VERSION"),
        "api_version": "v1",
        "hostname": hostname,
        "uptime_seconds": agent.started.elapsed().as_secs(),
    }))
    .into_response()
}

async fn get_config(State(agent): State<Arc<Agent>>) -> Response {
    match &*agent.persisted.lock().await {
        Some(c) => Json(c).into_response(),
        None => error(StatusCode::NOT_FOUND, "no config pushed yet"),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    match request_async(&agent.dataplane, Method::GET, "/v1/status", None).await {
        Ok(r) => relay(r),
        Err(e) => unavailable(e),
    }
}

async fn stats(State(agent): State<Arc<Agent>>) -> Response {
    match request_async(&agent.dataplane, Method::GET, "/v1/stats", None).await {
        Ok(r) => relay(r),
        Err(e) => unavailable(e),
    }
}

/// Sends `config` to the dataplane.
pub async fn apply(agent: &Agent, config: &Config) -> Result<Reply, String> {
    let body = serde_json::to_vec(config).map_err(|e| e.to_string())?;
    request_async(
        &agent.dataplane,
        Method::PUT,
        "/v1/config",
        Some(("application/json", body)),
    )
    .await
    .map_err(|e| e.to_string())
}

async fn put_config(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot parse: {e}")),
    };
    let config = match Config::parse_at(text, Format::Json) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot parse: {e}")),
    };
    // One push at a time: what is persisted always matches what was applied.
    let mut persisted = agent.persisted.lock().await;
    let reply = match apply(&agent, &config).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    if !(200..300).contains(&reply.status) {
        // Rejected: the previous config stays, on disk and running.
        return relay(reply);
    }
    if persisted.as_ref() != Some(&config) {
        if let Err(e) = agent.store.save(&config) {
            // Applied but not persisted: say so; the controller retries.
            tracing::error!(error = %e, "config applied but not persisted");
            return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
        *persisted = Some(config.clone());
        tracing::info!(
            generation = config.generation,
            "config applied and persisted"
        );
    }
    Json(json!({
        "generation": config.generation,
        "dataplane": serde_json::from_str::<serde_json::Value>(&reply.body).unwrap_or_default(),
    }))
    .into_response()
}

async fn put_vips(Json(req): Json<crate::vips::VipRequest>) -> Response {
    match crate::vips::apply(&req).await {
        Ok(r) => {
            if !r.added.is_empty() || !r.removed.is_empty() {
                tracing::info!(interface = %r.interface, added = ?r.added, removed = ?r.removed, "VIPs changed");
            }
            Json(r).into_response()
        }
        Err(e) if e.is_bad_request() => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Certificates {
    cert: String,
    key: String,
    client_ca: String,
}

async fn put_certificates(
    State(agent): State<Arc<Agent>>,
    Json(c): Json<Certificates>,
) -> Response {
    let m = Material {
        cert: c.cert.into_bytes(),
        key: c.key.into_bytes(),
        client_ca: c.client_ca.into_bytes(),
    };
    // Checked whole before anything is written or swapped.
    let config = match tls::server_config(&m) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let f = &agent.tls_files;
    for (path, bytes) in [
        (&f.cert, &m.cert),
        (&f.key, &m.key),
        (&f.client_ca, &m.client_ca),
    ] {
        if let Err(e) = write_atomic(path, bytes) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            );
        }
    }
    agent.tls.replace(config);
    tracing::info!("TLS certificates rotated");
    Json(json!({ "result": "rotated" })).into_response()
}

/// Temp file, fsync, rename: a crash leaves the old or the new file.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
