//! `siphon-control`: Siphon's thin control plane.
//!
//! - [`api`]: the Octavia-v2-shaped REST API (under `/v2` and `/v2.0`).
//! - [`store`]: SQLite, one transaction per change, state kept in memory.
//! - [`render`]: a load balancer → the dataplane config of its amphorae.
//! - [`provision`]: pushes configs and VIPs to agents (mutual TLS) and
//!   moves objects from `PENDING_*` to `ACTIVE` or `ERROR`.
//! - [`health`]: receives heartbeats, updates statuses and stats, fails
//!   stale amphorae over to spares.
//! - [`distributor`]: spreads each VIP over the amphorae that should
//!   receive it (`noop`, or `linux-ecmp`: a resilient nexthop group).
//! - [`decide`]: the background tasks' decisions, pure functions of the
//!   stored state, [`liveness`] and the time.
//! - [`agent_client`]: the HTTPS client for agents.

pub mod agent_client;
pub mod api;
pub mod claim;
pub mod client;
pub mod config;
pub mod decide;
pub mod distributor;
pub mod health;
pub mod heartbeat_keys;
pub mod keys_push;
pub mod liveness;
pub mod log_limit;
pub mod metrics;
pub mod model;
pub mod provision;
pub mod render;
pub mod repair;
pub mod serve;
pub mod store;
pub mod vip;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;

pub use claim::{Claim, Job};
pub use config::ControlConfig;

/// What every part of the controller shares.
#[derive(Debug)]
pub struct Controller {
    pub db: store::Db,
    pub config: ControlConfig,
    /// The settings the decisions ([`decide`]) depend on.
    pub policy: decide::Policy,
    /// `None`: no auth (development mode).
    pub token: Option<String>,
    /// Wakes the provisioner after a change.
    pub wake: tokio::sync::Notify,
    /// Wakes the distributor after a push.
    pub distribute: tokio::sync::Notify,
    /// Which amphorae still get VIP traffic: the distributor alone sends
    /// it; the provisioner empties only amphorae it shows unreached.
    pub routed: tokio::sync::watch::Sender<liveness::Routed>,
    /// When each amphora was heard, what it reported, how its repair
    /// goes (not stored).
    pub liveness: liveness::Liveness,
    pub agents: Option<agent_client::AgentClient>,
    /// Jobs a task is working on ([`Controller::claim`]).
    busy: Mutex<std::collections::HashSet<Job>>,
    /// This controller's name in claims (`cluster.name`).
    pub name: String,
    pub metrics: metrics::Metrics,
}

impl Controller {
    /// What is known of the amphorae at run time, as of now. Taken
    /// inside the `Db` closure a decision runs in (the store's locks,
    /// then this leaf one), so whatever was stored before is in it too:
    /// a heartbeat's flush, a push's settling.
    pub fn view(&self) -> liveness::View {
        self.liveness.view(Instant::now())
    }
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("agent TLS: {0}")]
    Tls(agent_client::TlsSetupError),
    #[error("cannot create {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("distributor {driver}: {source}")]
    Distributor {
        driver: &'static str,
        source: distributor::DistributorError,
    },
    #[error("registering amphora {id}: {message}")]
    Amphora { id: String, message: String },
}

/// A running controller.
#[derive(Debug)]
pub struct Handle {
    pub addr: SocketAddr,
    pub heartbeat_addr: Option<SocketAddr>,
    pub controller: Arc<Controller>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Handle {
    /// Stops serving and waits for the tasks to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Opens the store, registers configured amphorae, binds the API (and the
/// heartbeat socket), and starts serving on the current tokio runtime.
pub async fn start(config: ControlConfig) -> Result<Handle, StartError> {
    config.check_secrets()?;
    let token = config.admin_token()?;
    if let Some(dir) = config.database.dir() {
        std::fs::create_dir_all(dir).map_err(|source| StartError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let db = store::Db::open(&config.database).await?;
    let driver =
        distributor::open(&config.distributor).map_err(|source| StartError::Distributor {
            driver: match config.distributor {
                config::Distributor::Noop => "noop",
                config::Distributor::LinuxEcmp(_) => "linux-ecmp",
                config::Distributor::Bgp(_) => "bgp",
            },
            source,
        })?;
    let agents = match &config.agent_tls {
        Some(t) => Some(
            agent_client::AgentClient::new(t, config.push.timeout()).map_err(StartError::Tls)?,
        ),
        None => None,
    };
    let controller = Arc::new(Controller {
        db,
        token,
        policy: decide::Policy::of(&config),
        wake: tokio::sync::Notify::new(),
        distribute: tokio::sync::Notify::new(),
        routed: tokio::sync::watch::Sender::new(liveness::Routed::Unknown),
        liveness: liveness::Liveness::new(Instant::now()),
        agents,
        busy: Mutex::new(Default::default()),
        name: config
            .cluster
            .name
            .clone()
            .unwrap_or_else(claim::default_name),
        metrics: Default::default(),
        config,
    });
    api::amphorae::register_configured(&controller).await?;

    let listener = tokio::net::TcpListener::bind(controller.config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: controller.config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: controller.config.listen,
        source,
    })?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    let mut heartbeat_addr = None;
    if let Some(h) = controller.config.health.clone() {
        let (socket, key) = health::bind(&h).await?;
        heartbeat_addr = socket.local_addr().ok();
        tasks.push(tokio::spawn(health::receive(
            controller.clone(),
            socket,
            key,
            h.clone(),
            stopped.clone(),
        )));
        tasks.push(tokio::spawn(health::watch(
            controller.clone(),
            h,
            stopped.clone(),
        )));
    }
    tasks.push(tokio::spawn(distributor::run(
        controller.clone(),
        driver,
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(provision::run(
        controller.clone(),
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(repair::run(
        controller.clone(),
        stopped.clone(),
    )));

    let app = api::router(controller.clone());
    let nofile = serve::raise_nofile();
    let limits = controller.config.limits.clone();
    let cap = serve::connection_cap(&limits, nofile);
    tasks.push(tokio::spawn(serve::serve(
        listener,
        app,
        limits,
        cap,
        stopped.clone(),
    )));
    tracing::info!(%addr, max_connections = cap, nofile, "siphon-control API listening");
    Ok(Handle {
        addr,
        heartbeat_addr,
        controller,
        stop,
        tasks,
    })
}

/// `2026-11-30T06:20:11`: Octavia's timestamp format (UTC, no zone).
pub fn now() -> String {
    stamp(std::time::SystemTime::now())
}

/// `t` in Octavia's timestamp format.
pub fn stamp(t: std::time::SystemTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::OffsetDateTime::from(t)
        .format(&format)
        .unwrap_or_default()
}

/// `now + d` in Octavia's timestamp format.
pub fn stamp_in(d: std::time::Duration) -> String {
    stamp(std::time::SystemTime::now() + d)
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
