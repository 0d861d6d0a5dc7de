//! The control API: HTTP/1.1 over a Unix socket (mode 0600 by default), on
//! its own thread with its own single-threaded runtime, never on a worker.
//!
//! - `PUT /v1/config`: a whole config (JSON, or TOML with a `toml` content
//!   type), validated and applied atomically through the same path as
//!   SIGHUP. 200 applied or unchanged; 400 invalid, with every problem
//!   naming its object and field; 409 for a generation not newer than the
//!   running one (the same generation with the same content is 200
//!   unchanged, so a retried push is harmless). Nothing changes on error.
//!   A body over [`ApiLimits::max_body`] is 413, one that does not arrive
//!   within its timeout 408, one beyond the budget of bodies in flight
//!   503 (see [`body`]).
//! - `GET /v1/config`, `GET /v1/status`, `GET /v1/stats`: JSON;
//!   `GET /v1/generation`: just the running generation (what an agent
//!   polls to notice a restarted dataplane), and the one being applied if
//!   an apply is under way. Reads never wait for an apply.
//! - `GET /metrics`: Prometheus text; optionally also on a TCP address for
//!   scrapers.
//!
//! Connections are capped and timed out ([`serve`]), so the API holds a
//! bounded number of descriptors and never keeps the process from
//! draining. `siphon_proto::http` is the other end, used by
//! `siphon-dataplane ctl`.

pub mod body;
pub mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use thiserror::Error;
use tokio::sync::{watch, Semaphore};

use crate::config::load::{Format, ParseError};
use crate::config::Config;
use crate::server::{Applied, ApplyError, Server};

pub use siphon_proto::socket::DEFAULT_SOCKET;
use siphon_proto::socket::{bind_unix, SocketError};

/// Limits on the API's clients, the same for the control socket and the
/// metrics address (each has its own connection cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections served at once per listener; at the cap the oldest is
    /// asked to close and new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// The request line and headers must arrive whole within this.
    pub header_read_timeout: Duration,
    /// A connection with nothing moving either way for this long, while
    /// no request is being handled, is closed.
    pub idle_timeout: Duration,
    /// A `PUT /v1/config` body must arrive whole within this.
    pub body_read_timeout: Duration,
    /// Largest config body (bytes).
    pub max_body: usize,
    /// Config body bytes received or being applied at once, over all
    /// requests (at least `max_body`).
    pub body_budget: usize,
}

impl Default for ApiLimits {
    fn default() -> ApiLimits {
        ApiLimits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            // A pool of the largest size (65,535 members) is about 6 MB
            // of JSON.
            max_body: 16 << 20,
            body_budget: 32 << 20,
        }
    }
}

impl ApiLimits {
    /// The body budget in effect: never below one body of `max_body`.
    pub fn budget(&self) -> usize {
        self.body_budget.max(self.max_body)
    }
}

#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub socket: PathBuf,
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Also serve `GET /metrics` on this TCP address.
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control API thread: {0}")]
    Thread(std::io::Error),
}

/// The running API; stops (and removes its socket file) on drop.
#[derive(Debug)]
pub struct Api {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

/// The API's sockets, bound but not served yet: a dataplane checks it can
/// have its control socket before it binds any listener.
#[derive(Debug)]
pub struct Bound {
    runtime: tokio::runtime::Runtime,
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    socket: PathBuf,
    limits: ApiLimits,
}

impl Api {
    /// Binds the control socket (and the metrics address).
    pub fn bind(opts: &ApiOptions) -> Result<Bound, ApiError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiError::Thread)?;
        let (unix, tcp) = runtime.block_on(async {
            let unix = bind_unix(&opts.socket, opts.mode)?;
            let tcp = match opts.metrics {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|source| ApiError::Metrics { addr, source })?,
                ),
                None => None,
            };
            Ok::<_, ApiError>((unix, tcp))
        })?;
        Ok(Bound {
            runtime,
            unix,
            tcp,
            socket: opts.socket.clone(),
            limits: ApiLimits::default(),
        })
    }
}

impl Bound {
    /// Other limits than [`ApiLimits::default`].
    pub fn with_limits(mut self, limits: ApiLimits) -> Bound {
        self.limits = limits;
        self
    }

    /// Serves `server` on a new thread.
    pub fn serve(self, server: Arc<Server>) -> Result<Api, ApiError> {
        let Bound {
            runtime,
            unix,
            tcp,
            socket,
            limits,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let ctx = Ctx {
            server,
            limits,
            bodies: Arc::new(Semaphore::new(limits.budget())),
        };
        let app = router(ctx.clone());
        let metrics_app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(ctx);
        let thread = std::thread::Builder::new()
            .name("siphon-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let scrape = async {
                        if let Some(tcp) = tcp {
                            serve::serve(tcp, metrics_app, limits, stop_rx.clone()).await;
                        }
                    };
                    let api = serve::serve(unix, app, limits, stop_rx.clone());
                    tokio::join!(api, scrape);
                });
                // An apply still running on the blocking pool finishes (or
                // is refused) on its own; stopping never waits for it.
                runtime.shutdown_background();
            })
            .map_err(ApiError::Thread)?;
        Ok(Api {
            stop: stop_tx,
            thread: Some(thread),
            socket,
        })
    }
}

impl Api {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts stopping without waiting: no new connections, open ones
    /// closed within [`serve::STOP_GRACE`]. Dropping the `Api` waits for
    /// that and removes the socket file.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What every handler gets.
#[derive(Clone)]
struct Ctx {
    server: Arc<Server>,
    limits: ApiLimits,
    /// Config body bytes in flight ([`ApiLimits::budget`]).
    bodies: Arc<Semaphore>,
}

fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/v1/config", get(get_config).put(put_config))
        .route("/v1/status", get(status))
        .route("/v1/generation", get(generation))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

/// Runs `f` on tokio's blocking pool: reads never wait for the control
/// lock, but rendering a large config or counter set is still work the
/// API's one thread should not do while other clients wait.
async fn off_runtime(ctx: Ctx, f: fn(&Server) -> Response) -> Response {
    match tokio::task::spawn_blocking(move || f(&ctx.server)).await {
        Ok(r) => r,
        Err(e) => rejected(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
    }
}

async fn get_config(State(ctx): State<Ctx>) -> Response {
    off_runtime(ctx, |s| Json(&*s.config()).into_response()).await
}

async fn generation(State(ctx): State<Ctx>) -> Response {
    // Two atomic-ish loads: answered on the API thread.
    let s = &ctx.server;
    Json(json!({ "generation": s.generation(), "applying": s.applying() })).into_response()
}

async fn status(State(ctx): State<Ctx>) -> Response {
    off_runtime(ctx, |s| Json(s.status()).into_response()).await
}

async fn stats(State(ctx): State<Ctx>) -> Response {
    off_runtime(ctx, |s| Json(s.stats()).into_response()).await
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    off_runtime(ctx, |s| {
        let text = crate::metrics::render(&s.stats(), &s.status(), &s.worker_connections());
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
    })
    .await
}

/// One problem with a pushed config.
#[derive(Debug, Serialize)]
struct Problem {
    object: String,
    field: String,
    problem: String,
}

fn rejected(code: StatusCode, error: String, problems: Vec<Problem>) -> Response {
    (code, Json(json!({ "error": error, "problems": problems }))).into_response()
}

async fn put_config(State(ctx): State<Ctx>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("toml"));
    let format = if toml { Format::Toml } else { Format::Json };
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Held until the apply is done: the parsed config's memory goes with
    // the body's size.
    let received = match body::read(body, length, &ctx.limits, &ctx.bodies).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "config push refused");
            return e.into_response();
        }
    };
    let server = ctx.server.clone();
    let parsed = match std::str::from_utf8(&received.bytes) {
        Ok(text) => Config::parse_at(text, format),
        Err(e) => Err(ParseError {
            path: String::new(),
            message: e.to_string(),
        }),
    };
    let config = match parsed {
        Ok(c) => c,
        Err(e) => {
            // `listeners[0].protocol_port` → object `listeners[0]`, field
            // `protocol_port`; a document-level problem has neither.
            let (object, field) = match e.path.rsplit_once('.') {
                Some((o, f)) => (o.to_owned(), f.to_owned()),
                None => ("config".to_owned(), e.path.clone()),
            };
            let p = Problem {
                object,
                field,
                problem: e.message.clone(),
            };
            return rejected(
                StatusCode::BAD_REQUEST,
                format!("cannot parse: {e}"),
                vec![p],
            );
        }
    };
    // apply() waits for every worker's acknowledgement: off the runtime.
    let result = tokio::task::spawn_blocking(move || server.apply(config)).await;
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            return rejected(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]);
        }
    };
    match result {
        Ok(Applied::Unchanged { generation }) => {
            Json(json!({ "result": "unchanged", "generation": generation })).into_response()
        }
        Ok(Applied::Changed {
            generation,
            added,
            removed,
        }) => {
            let show = |v: Vec<crate::snapshot::Endpoint>| {
                v.iter().map(ToString::to_string).collect::<Vec<_>>()
            };
            tracing::info!(generation, "config applied through the control API");
            Json(json!({
                "result": "applied",
                "generation": generation,
                "listening_added": show(added),
                "listening_removed": show(removed),
            }))
            .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "config rejected through the control API");
            let message = e.to_string();
            match e {
                ApplyError::Invalid(errors) => {
                    let problems = errors
                        .0
                        .iter()
                        .map(|p| Problem {
                            object: p.object.to_string(),
                            field: p.field.to_owned(),
                            problem: p.problem.to_string(),
                        })
                        .collect();
                    rejected(StatusCode::BAD_REQUEST, message, problems)
                }
                ApplyError::Stale { running, offered } => (
                    StatusCode::CONFLICT,
                    Json(json!({
                        "error": message,
                        "running_generation": running,
                        "offered_generation": offered,
                    })),
                )
                    .into_response(),
                ApplyError::Bind {
                    listener,
                    endpoint,
                    source,
                } => {
                    let p = Problem {
                        object: crate::config::Object::Listener(listener).to_string(),
                        field: "bind_addresses".into(),
                        problem: format!("cannot listen on {endpoint}: {source}"),
                    };
                    rejected(StatusCode::BAD_REQUEST, message, vec![p])
                }
                ApplyError::ShuttingDown => {
                    rejected(StatusCode::SERVICE_UNAVAILABLE, message, vec![])
                }
                ApplyError::Worker(_)
                | ApplyError::WorkerTimeout { .. }
                | ApplyError::Health(_) => {
                    rejected(StatusCode::INTERNAL_SERVER_ERROR, message, vec![])
                }
            }
        }
    }
}

/// The control API's router for `server`, to drive it in-process (the
/// fuzz targets in `dataplane/fuzz`); not part of the supported API.
#[doc(hidden)]
pub fn router_for(server: Arc<Server>) -> Router {
    let limits = ApiLimits::default();
    router(Ctx {
        server,
        limits,
        bodies: Arc::new(Semaphore::new(limits.budget())),
    })
}
