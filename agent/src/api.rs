//! The agent's API, served twice: over HTTPS with mutual TLS for the
//! controller, and over a local Unix socket without TLS for operators.
//!
//! - `GET /v1/info`: id, version, hostname, uptime, and the id of the
//!   heartbeat key in use (`heartbeat_key_id`: 0 for the bootstrap key,
//!   null for none).
//! - `PUT /v1/config`: a dataplane config (JSON), generation at most 2^53.
//!   Applied to the dataplane first; only a config the dataplane took is
//!   persisted, so a rejected one leaves the previous config running and on
//!   disk. Idempotent by generation: the persisted generation with the same
//!   content answers 200 again (and is re-applied if the dataplane lost
//!   it).
//! - `GET /v1/config`: the persisted config.
//! - `GET /v1/status`, `GET /v1/stats`: the dataplane's.
//! - `PUT /v1/vips`: add/remove VIP addresses on an interface (netlink);
//!   removes only VIPs this agent added ([`crate::vips`]); idempotent.
//! - `PUT /v1/certificates`: new PEM cert, key and client CA, checked
//!   against `tls.server_ca` and `tls.server_name` ([`tls::check_rotation`]);
//!   used from the next handshake on, and written over the configured files.
//! - `PUT /v1/heartbeat-key`: `{"key_id": N >= 1, "key": "<64 hex>"}`, this
//!   amphora's own heartbeat key; persisted, then every later heartbeat is
//!   signed with it. Idempotent.
//! - `PUT /v1/bgp`: the BGP peering ([`crate::bgp::Peering`]: our AS,
//!   1 to 8 peers with AS and optional MD5 password, hold time, BFD),
//!   checked, persisted, and brought to the local BIRD; `DELETE /v1/bgp`
//!   ends it; `GET /v1/bgp`: the peering (passwords blanked), each
//!   session's state and the VIPs announced. 400 on an agent without
//!   `[bgp]`.
//!
//! Bodies that do not parse, or break a rule, get 400 with
//! `{"error": "..."}` and change nothing.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use siphon_proto::config::load::Format;
use siphon_proto::http::{self, Reply, Request, Target};
use siphon_proto::Config;

use crate::heartbeat::Keys;
use crate::keys::PushedKey;
use crate::store::{Store, HEARTBEAT_KEY_FILE};
use crate::tls::{self, Live, Material, RotationPolicy};
use crate::vips::Vips;

/// Largest request body (configs with thousands of listeners fit).
const MAX_BODY: usize = 64 << 20;
/// The largest generation accepted: JSON clients that read numbers as
/// doubles (most) keep integers exact up to 2^53.
pub const MAX_GENERATION: u64 = 1 << 53;

/// What the handlers share.
#[derive(Debug)]
pub struct Agent {
    pub id: String,
    pub started: Instant,
    pub dataplane: Target,
    pub store: Store,
    /// The persisted config, cached; pushes are serialised through it.
    pub persisted: tokio::sync::Mutex<Option<Config>>,
    pub tls: Live,
    /// Where rotated TLS material is written (cert, key, client CA).
    pub tls_files: crate::config::TlsFiles,
    /// What a rotation must pass; `None` without `tls.server_ca`.
    pub rotation: Option<RotationPolicy>,
    /// The generation of the persisted config, for heartbeats.
    pub persisted_generation: tokio::sync::watch::Sender<Option<u64>>,
    /// The heartbeat key in use (read by the sender).
    pub keys: Keys,
    /// The key the controller pushed; pushes are serialised through it.
    pub pushed_key: tokio::sync::Mutex<Option<PushedKey>>,
    pub vips: Arc<Vips>,
    /// The peering and the announcer's status, with `[bgp]` configured.
    pub bgp: Option<BgpControl>,
}

/// The API's side of the announcer ([`crate::bgp::run`]).
#[derive(Debug)]
pub struct BgpControl {
    pub peering: tokio::sync::watch::Sender<Option<crate::bgp::Peering>>,
    pub status: crate::bgp::Shared,
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/config", get(get_config).put(put_config))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/certificates", put(put_certificates))
        .route("/v1/vips", put(put_vips))
        .route("/v1/bgp", get(get_bgp).put(put_bgp).delete(delete_bgp))
        .route("/v1/heartbeat-key", put(put_heartbeat_key))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

/// A JSON body, or why not (for a 400).
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("cannot parse: {e}"))
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
        "heartbeat_key_id": agent.keys.key_id(),
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
    match http::send(&agent.dataplane, Request::get("/v1/status")).await {
        Ok(r) => relay(r),
        Err(e) => unavailable(e),
    }
}

async fn stats(State(agent): State<Arc<Agent>>) -> Response {
    match http::send(&agent.dataplane, Request::get("/v1/stats")).await {
        Ok(r) => relay(r),
        Err(e) => unavailable(e),
    }
}

/// Sends `config` to the dataplane.
pub async fn apply(agent: &Agent, config: &Config) -> Result<Reply, String> {
    let body = serde_json::to_vec(config).map_err(|e| e.to_string())?;
    http::send(
        &agent.dataplane,
        Request::new(Method::PUT, "/v1/config").json(body),
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
    if config.generation > MAX_GENERATION {
        return error(
            StatusCode::BAD_REQUEST,
            "generation must be at most 2^53 so JSON clients keep it exact",
        );
    }
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
        agent
            .persisted_generation
            .send_replace(Some(config.generation));
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

async fn put_vips(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let req: crate::vips::VipRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match agent.vips.apply(&req).await {
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

/// The peering with passwords blanked, and the announcer's status.
async fn get_bgp(State(agent): State<Arc<Agent>>) -> Response {
    let Some(bgp) = &agent.bgp else {
        return no_bgp();
    };
    let mut peering = bgp.peering.borrow().clone();
    for p in peering.iter_mut().flat_map(|p| p.peers.iter_mut()) {
        if p.password.is_some() {
            p.password = Some("***".into());
        }
    }
    Json(serde_json::json!({"peering": peering, "status": bgp.status.get()})).into_response()
}

fn no_bgp() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "this agent announces nothing over BGP: its config has no [bgp] (the local BIRD)",
    )
}

/// Sets the peering: checked whole, persisted, then handed to the
/// announcer (which brings BIRD in line within a tenth of a second).
async fn put_bgp(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let Some(bgp) = &agent.bgp else {
        return no_bgp();
    };
    let peering: crate::bgp::Peering = match parse_body(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = peering.check() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    set_peering(&agent, bgp, Some(peering))
}

/// No BGP any more: the sessions close (nothing is announced).
async fn delete_bgp(State(agent): State<Arc<Agent>>) -> Response {
    let Some(bgp) = &agent.bgp else {
        return no_bgp();
    };
    set_peering(&agent, bgp, None)
}

fn set_peering(agent: &Agent, bgp: &BgpControl, peering: Option<crate::bgp::Peering>) -> Response {
    if *bgp.peering.borrow() == peering {
        return StatusCode::NO_CONTENT.into_response();
    }
    if let Err(e) = agent.store.write(crate::store::BGP_FILE, &peering) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    tracing::info!(
        peers = peering.as_ref().map_or(0, |p| p.peers.len()),
        "BGP peering set"
    );
    bgp.peering.send_replace(peering);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Certificates {
    cert: String,
    key: String,
    client_ca: String,
}

async fn put_certificates(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let c: Certificates = match parse_body(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(policy) = &agent.rotation else {
        return error(
            StatusCode::BAD_REQUEST,
            "certificate rotation needs tls.server_ca in the agent's config \
             (the CA the new certificate must chain to)",
        );
    };
    let m = Material {
        cert: c.cert.into_bytes(),
        key: c.key.into_bytes(),
        client_ca: c.client_ca.into_bytes(),
    };
    // Checked whole before anything is written or swapped.
    let config = match tls::check_rotation(&m, policy) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "certificate rotation refused");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let f = &agent.tls_files;
    let files = [
        (f.cert.as_path(), m.cert.as_slice()),
        (f.key.as_path(), m.key.as_slice()),
        (f.client_ca.as_path(), m.client_ca.as_slice()),
    ];
    if let Err(e) = crate::store::write_all_atomic(&files) {
        tracing::error!(error = %e, "rotated TLS files not written");
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    agent.tls.replace(config);
    tracing::info!("TLS certificates rotated");
    Json(json!({ "result": "rotated" })).into_response()
}

async fn put_heartbeat_key(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let key: PushedKey = match parse_body(&body) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let mut pushed = agent.pushed_key.lock().await;
    if pushed.as_ref() != Some(&key) {
        if let Err(e) = agent.store.write(HEARTBEAT_KEY_FILE, &key) {
            tracing::error!(error = %e, "heartbeat key not persisted");
            return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
        agent.keys.replace(key.signing_key());
        tracing::info!(key_id = key.key_id, "heartbeat key pushed: signing with it");
        *pushed = Some(key.clone());
    }
    Json(json!({ "key_id": key.key_id })).into_response()
}
