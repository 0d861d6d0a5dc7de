//! `siphon-agent`: the process on each load-balancer node that the
//! controller talks to. It serves a mutual-TLS API ([`api`]), drives the
//! dataplane over its Unix socket, keeps the last good config on disk
//! ([`store`]) and puts it back whenever the dataplane (re)starts.
//!
//! It is never on the forwarding path: if the agent dies, the dataplane
//! keeps serving the config it has.

pub mod announce;
pub mod api;
pub mod bgp;
pub mod bird;
pub mod config;
pub mod heartbeat;
pub use siphon_proto::keys;
pub mod store;
pub mod tls;
pub mod vips;

mod conn;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use siphon_proto::http::{self, Request, Target};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::Agent;
use crate::config::{AgentConfig, Limits};
use crate::heartbeat::Keys;
use crate::keys::{KeyError, PushedKey};
use crate::store::{Store, StoreError, HEARTBEAT_KEY_FILE};
use crate::tls::{Live, Material, RotationPolicy, TlsError};

/// How often the agent asks the dataplane which generation it runs: a
/// restarted dataplane gets its config back within this (plus one apply).
const WATCH_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum StartError {
    #[error("TLS files: {0}")]
    TlsFiles(std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("local API: {0}")]
    Local(#[from] siphon_proto::socket::SocketError),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("heartbeat key: {0}")]
    HeartbeatKey(#[from] KeyError),
    #[error("tls.server_ca {path}: {source}")]
    ServerCa {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running agent (its own runtime thread); stops on drop.
#[derive(Debug)]
pub struct Handle {
    /// Where the mutual-TLS API listens (the real port when 0 was asked).
    pub addr: SocketAddr,
    pub local_socket: PathBuf,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// Blocks until the agent stops (it never does unless stopped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.local_socket);
    }
}

/// Starts the agent: reads its TLS material and state, binds both API
/// sockets (errors are returned here), then serves on a new thread.
///
/// State files that do not parse are set aside (`<name>.corrupt`) and the
/// agent starts without them; see [`store`].
pub fn start(cfg: &AgentConfig) -> Result<Handle, StartError> {
    let material = Material::read(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.client_ca)
        .map_err(StartError::TlsFiles)?;
    let live = Live::new(tls::server_config(&material)?);
    let rotation = match &cfg.tls.server_ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| StartError::ServerCa {
                path: path.clone(),
                source,
            })?;
            let name = cfg.tls.server_name.as_deref().unwrap_or(&cfg.amphora_id);
            Some(RotationPolicy::new(&pem, name)?)
        }
        None => None,
    };
    let bootstrap = match cfg.heartbeat.as_ref().and_then(|h| h.key_file.as_ref()) {
        Some(path) => Some(keys::bootstrap(path)?),
        None => None,
    };
    let store = Store::open(&cfg.state_dir)?;
    let persisted = store.read_or_set_aside::<siphon_proto::Config>(store::CONFIG_FILE)?;
    let pushed = store.read_or_set_aside::<PushedKey>(HEARTBEAT_KEY_FILE)?;
    let vips = Arc::new(vips::Vips::load(store.clone())?);
    let keys = Keys::new(pushed.as_ref().map(PushedKey::signing_key).or(bootstrap));
    let (persisted_generation, persisted_rx) =
        watch::channel(persisted.as_ref().map(|c| c.generation));
    // BGP: the peering persisted (a corrupt file is set aside: no
    // peering until the controller sets it again).
    let bgp = match &cfg.bgp {
        Some(settings) => {
            let peering = store
                .read_or_set_aside::<Option<bgp::Peering>>(store::BGP_FILE)?
                .flatten();
            let (tx, rx) = watch::channel(peering);
            let status = bgp::Shared::default();
            let announcer = bgp::Announcer {
                speaker: bgp::Speaker::new(settings),
                peering: rx,
                dataplane: Target::Unix(cfg.dataplane_socket.clone()),
                persisted: persisted_rx.clone(),
                vips: vips.clone(),
                status: status.clone(),
                withdraw_delay: Duration::from_millis(settings.withdraw_delay_ms),
            };
            Some((
                api::BgpControl {
                    peering: tx,
                    status,
                },
                announcer,
            ))
        }
        None => None,
    };
    let (bgp_control, announcer) = bgp.unzip();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("siphon-agent")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let (tcp, unix) = runtime.block_on(async {
        let tcp = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: cfg.listen,
                source,
            })?;
        // The operators' socket: mode 0600, a leftover of a dead agent
        // replaced, a live agent's refused.
        let unix = siphon_proto::socket::bind_unix(&cfg.local_socket, 0o600)?;
        Ok::<_, StartError>((tcp, unix))
    })?;
    let addr = tcp.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let agent = Arc::new(Agent {
        id: cfg.amphora_id.clone(),
        started: Instant::now(),
        dataplane: Target::Unix(cfg.dataplane_socket.clone()),
        store,
        persisted: tokio::sync::Mutex::new(persisted),
        tls: live.clone(),
        tls_files: cfg.tls.clone(),
        rotation,
        persisted_generation,
        keys: keys.clone(),
        pushed_key: tokio::sync::Mutex::new(pushed),
        vips: vips.clone(),
        bgp: bgp_control,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let heartbeats = cfg.heartbeat.as_ref().map(|hb| {
        heartbeat::run(
            heartbeat::Sender {
                amphora_id: cfg.amphora_id.clone(),
                dataplane: Target::Unix(cfg.dataplane_socket.clone()),
                destinations: hb.destinations.clone(),
                interval: hb.interval(),
                keys,
                persisted: persisted_rx,
                vips: Some(vips),
                bgp: agent.bgp.as_ref().map(|b| b.status.clone()),
            },
            stop_rx.clone(),
        )
    });
    let limits = cfg.limits.clone();
    let thread = std::thread::Builder::new()
        .name("siphon-agent-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                let app = api::router(agent.clone());
                tokio::spawn(watch_dataplane(agent.clone(), stop_rx.clone()));
                let announcer = announcer.map(|a| tokio::spawn(bgp::run(a, stop_rx.clone())));
                if let Some(h) = heartbeats {
                    tokio::spawn(h);
                }
                tokio::spawn(serve_tls(tcp, live, app.clone(), limits, stop_rx.clone()));
                let mut stop = stop_rx.clone();
                let local = axum::serve(unix, app).with_graceful_shutdown(async move {
                    stopped(&mut stop).await;
                });
                if let Err(e) = local.await {
                    tracing::error!(error = %e, "local API failed");
                }
                // Stopping: the VIPs withdrawn and the routers given time
                // before the agent exits.
                if let Some(a) = announcer {
                    let _ = a.await;
                }
            });
        })
        .map_err(StartError::Runtime)?;
    Ok(Handle {
        addr,
        local_socket: cfg.local_socket.clone(),
        stop: stop_tx,
        thread: Some(thread),
    })
}

/// Resolves once the agent is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: dropped before returning.
    let _ = stop.wait_for(|s| *s).await.map(drop);
}

/// Accepts controller connections, at most `limits.max_connections` at
/// once (when all are taken, accepting waits for one to end: clients queue
/// in the listen backlog, and the agent's file descriptors stay bounded).
/// Each gets the TLS handshake (client certificate checked against the
/// CA) with the TLS config current at accept time, within
/// `header_read_timeout`, then HTTP/1.1 under [`conn::serve`]'s timeouts.
async fn serve_tls(
    listener: TcpListener,
    tls: Live,
    app: axum::Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusals = Arc::new(std::sync::Mutex::new(conn::Throttle::new(
        conn::REFUSAL_LOG_EVERY,
    )));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = stopped(&mut stop) => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let app = app.clone();
        let limits = limits.clone();
        let refusals = refusals.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake =
                tokio::time::timeout(limits.header_read_timeout(), acceptor.accept(tcp)).await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    conn::log_refusal(&refusals, peer, &e.to_string());
                    return;
                }
                Err(_) => {
                    conn::log_refusal(&refusals, peer, "handshake timed out");
                    return;
                }
            };
            conn::serve(stream, peer, app, &limits).await;
        });
    }
}

/// Puts the persisted config back whenever the dataplane runs an older
/// generation than it: at start, and after the dataplane restarted.
/// The generation the dataplane runs (`None`: its answer did not say).
pub(crate) async fn running_generation(dataplane: &Target) -> Result<Option<u64>, http::HttpError> {
    let r = http::send(dataplane, Request::get("/v1/generation")).await?;
    Ok(serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["generation"].as_u64()))
}

async fn watch_dataplane(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let mut reachable = true;
    // A generation the dataplane refused is not retried (it would only be
    // refused again); a newer push replaces it.
    let mut refused: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            () = stopped(&mut stop) => return,
        }
        let persisted = agent.persisted.lock().await;
        let Some(config) = persisted.as_ref() else {
            continue;
        };
        let running = match running_generation(&agent.dataplane).await {
            Ok(g) => g,
            Err(e) => {
                if reachable {
                    tracing::warn!(error = %e, "dataplane unreachable");
                }
                reachable = false;
                continue;
            }
        };
        reachable = true;
        if running.is_some_and(|g| g >= config.generation) || refused == Some(config.generation) {
            continue;
        }
        match api::apply(&agent, config).await {
            Ok(r) if (200..300).contains(&r.status) => {
                tracing::info!(
                    generation = config.generation,
                    "persisted config re-applied to the dataplane"
                )
            }
            Ok(r) => {
                refused = Some(config.generation);
                tracing::error!(status = r.status, body = %r.body, "dataplane refused the persisted config")
            }
            Err(e) => tracing::warn!(error = %e, "re-applying the persisted config failed"),
        }
    }
}
