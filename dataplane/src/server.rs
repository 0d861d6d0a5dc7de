//! The control side of the dataplane: starts the workers, applies configs
//! (validate → bind new sockets → publish to every worker → wait for their
//! acknowledgement), reports counters and drains on shutdown.
//!
//! Apply is all-or-nothing: a config that fails validation, or whose new
//! sockets cannot be bound, changes nothing. Sockets of addresses present
//! in both the old and the new config are kept, so a reload never refuses
//! a connection on them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{bounded, unbounded, Sender};
use mio::Waker;
use thiserror::Error;

use crate::config::{Config, ConfigErrors};
use crate::health::monitor::{EjectPolicy, Input, Monitor};
use crate::health::{Book, Change, Ejector, MemberKey, Target};
use crate::listen;
use crate::mailbox::{Bound, Command, Update};
use crate::snapshot::{self, Endpoint, Snapshot};
use crate::spread::Spread;
use crate::stats::{MemberStats, Registry, StatsReport};
use crate::status::{self, StatusReport};
use crate::worker::{Worker, WorkerOptions};

/// How long `apply` waits for every worker to take a new generation.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads (≥ 1).
    pub workers: usize,
    /// Forward with `splice(2)`; off = copy through user-space buffers.
    pub splice: bool,
    /// Requested pipe size per direction (bytes).
    pub pipe_size: usize,
    /// UDP segmentation offloads: GRO on receive, GSO on send.
    pub udp_offload: bool,
    /// Passive ejection: a member out after this many refused connects in
    /// a row (0 = never).
    pub eject_after: u32,
    /// ... or after this many timed-out connects in a row (0 = never):
    /// timeouts may be only overload, so they take more.
    pub eject_after_timeouts: u32,
    /// At most this percentage of a pool ejected at once (the last member
    /// up never is).
    pub max_ejection_percent: u32,
    /// How long an ejected member without a monitor stays out the first
    /// time; repeated ejections double it, up to 32 times.
    pub eject_backoff: Duration,
    /// Hand accepted connections from a busier worker to the least busy
    /// one (see `spread`); off = wherever `SO_REUSEPORT` put them.
    pub spread: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            splice: true,
            pipe_size: 1 << 20,
            udp_offload: true,
            eject_after: 5,
            eject_after_timeouts: 15,
            max_ejection_percent: 50,
            eject_backoff: Duration::from_secs(10),
            spread: true,
        }
    }
}

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
    #[error("generation {offered} is not newer than the running generation {running}")]
    Stale { running: u64, offered: u64 },
    #[error("listener {listener:?}: cannot listen on {endpoint}: {source}")]
    Bind {
        listener: String,
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error("cannot start worker: {0}")]
    Worker(std::io::Error),
    #[error("cannot start the health thread: {0}")]
    Health(std::io::Error),
    /// The config was committed and sent, but a worker did not confirm it:
    /// that worker is stuck or gone (it is logged as well).
    #[error("generation {generation} was applied, but worker {worker} did not confirm it within {ACK_TIMEOUT:?}")]
    WorkerTimeout { generation: u64, worker: usize },
    #[error("the dataplane is shutting down")]
    ShuttingDown,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The same generation with the same content is already running.
    Unchanged { generation: u64 },
    Changed {
        generation: u64,
        added: Vec<Endpoint>,
        removed: Vec<Endpoint>,
    },
}

#[derive(Debug)]
struct WorkerLink {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

impl WorkerLink {
    fn send(&self, command: Command) {
        // A worker that died cannot ack; apply's timeout reports it.
        let _ = self.tx.send(command);
        let _ = self.waker.wake();
    }
}

/// A running dataplane. Shareable: every method takes `&self`, and the
/// control API, the signal loop and the health publisher use it at once.
#[derive(Debug)]
pub struct Server {
    core: Arc<Mutex<Core>>,
    /// What reads see, apart from the control lock.
    published: Arc<Published>,
    /// Thread handles, taken by the first shutdown.
    threads: Mutex<Threads>,
    spread: Arc<Spread>,
}

#[derive(Debug, Default)]
struct Threads {
    workers: Vec<JoinHandle<()>>,
    monitor: Option<Monitor>,
    publisher: Option<JoinHandle<()>>,
}

/// The state reads report (generation, config, status, counters), published
/// by every apply and health change: a read never takes the control lock,
/// which an apply holds while it builds Maglev tables and waits for the
/// workers, so the API answers during an apply.
#[derive(Debug)]
struct Published {
    view: RwLock<Arc<View>>,
    /// The generation an apply is building or sending, 0 when none is.
    applying: AtomicU64,
}

#[derive(Debug)]
struct View {
    snapshot: Arc<Snapshot>,
    book: Arc<Book>,
    registry: Arc<Registry>,
}

impl Published {
    fn view(&self) -> Arc<View> {
        // Held only to clone or swap an `Arc`; a panic cannot leave it
        // half-written.
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn store(&self, view: View) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

/// Clears [`Published::applying`] however an apply ends.
struct Applying<'a>(&'a AtomicU64);

impl Drop for Applying<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Everything an apply or a health change reads and writes, behind one
/// lock on the control side (never taken by a worker): applies and health
/// changes reach the workers in the order they happened.
#[derive(Debug)]
struct Core {
    workers: Vec<WorkerLink>,
    current: Arc<Snapshot>,
    /// Endpoints with bound sockets (held by the workers).
    bound: HashSet<Endpoint>,
    registry: Registry,
    book: Book,
    monitor: tokio::sync::mpsc::UnboundedSender<Input>,
    started: bool,
    /// Set by shutdown: applies are refused from then on.
    closing: bool,
    /// UDP sockets get `UDP_GRO` (Options::udp_offload).
    udp_offload: bool,
    published: Arc<Published>,
}

impl Server {
    /// Starts the workers and the health thread, and applies the first
    /// config.
    pub fn start(config: Config, opts: Options) -> Result<Server, ApplyError> {
        let n = opts.workers.max(1);
        let (changes_tx, changes_rx) = mpsc::channel::<Change>();
        let policy = EjectPolicy {
            base: opts.eject_backoff,
            max: opts.eject_backoff.saturating_mul(32),
            max_percent: opts.max_ejection_percent.min(100),
        };
        let monitor = Monitor::spawn(changes_tx, policy).map_err(ApplyError::Health)?;
        let wopts = WorkerOptions {
            splice: opts.splice,
            pipe_size: opts.pipe_size,
            udp_offload: opts.udp_offload,
            ejector: Ejector {
                after: opts.eject_after,
                after_timeouts: opts.eject_after_timeouts,
                tx: Some(monitor.sender()),
            },
        };
        let spread = Spread::new(n, opts.spread);
        let mut links = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for id in 0..n {
            let (tx, rx) = unbounded();
            let (worker, waker) = Worker::new(id, n, rx, wopts.clone(), spread.clone())
                .map_err(ApplyError::Worker)?;
            links.push(WorkerLink { tx, waker });
            workers.push(worker);
        }
        spread.connect(
            links
                .iter()
                .map(|l| (l.tx.clone(), l.waker.clone()))
                .collect(),
        );
        let mut threads = Vec::with_capacity(n);
        for (id, worker) in workers.into_iter().enumerate() {
            let thread = std::thread::Builder::new()
                .name(format!("siphon-worker-{id}"))
                .spawn(move || worker.run())
                .map_err(ApplyError::Worker)?;
            threads.push(thread);
        }
        let current = Arc::new(Snapshot::empty());
        let published = Arc::new(Published {
            view: RwLock::new(Arc::new(View {
                snapshot: current.clone(),
                book: Arc::default(),
                registry: Arc::new(Registry::new(n)),
            })),
            applying: AtomicU64::new(0),
        });
        let core = Arc::new(Mutex::new(Core {
            workers: links,
            current,
            bound: HashSet::new(),
            registry: Registry::new(n),
            book: Book::default(),
            monitor: monitor.sender(),
            started: false,
            closing: false,
            udp_offload: opts.udp_offload,
            published: published.clone(),
        }));
        let publisher = {
            let core = core.clone();
            std::thread::Builder::new()
                .name("siphon-health-publish".into())
                .spawn(move || {
                    // Ends when the health thread (the only sender) stops.
                    while let Ok(change) = changes_rx.recv() {
                        lock(&core).health_changed(change);
                    }
                })
                .map_err(ApplyError::Health)?
        };
        let server = Server {
            core,
            published,
            spread,
            threads: Mutex::new(Threads {
                workers: threads,
                monitor: Some(monitor),
                publisher: Some(publisher),
            }),
        };
        {
            let mut core = server.core();
            core.apply(config)?;
            core.started = true;
        }
        Ok(server)
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    pub fn generation(&self) -> u64 {
        self.published.view().snapshot.generation()
    }

    /// The generation an apply is working on right now, if one is.
    pub fn applying(&self) -> Option<u64> {
        Some(self.published.applying.load(Ordering::Relaxed)).filter(|g| *g != 0)
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.published.view().snapshot.config.clone()
    }

    pub fn workers(&self) -> usize {
        self.core().workers.len()
    }

    /// Validates and applies `config` atomically; on error nothing changed.
    pub fn apply(&self, config: Config) -> Result<Applied, ApplyError> {
        self.core().apply(config)
    }

    /// All counters, summed over workers.
    /// TCP connections each worker holds (as last published by it).
    pub fn worker_connections(&self) -> Vec<usize> {
        self.spread
            .loads()
            .into_iter()
            .map(|l| if l >= crate::spread::CLOSED { 0 } else { l })
            .collect()
    }

    pub fn stats(&self) -> StatsReport {
        let view = self.published.view();
        view.registry.report(view.snapshot.generation())
    }

    /// Operating status of every listener, pool and member.
    pub fn status(&self) -> StatusReport {
        let view = self.published.view();
        status::report(&view.snapshot, &view.book)
    }

    /// Stops accepting everywhere, lets connections finish for up to
    /// `grace`, then closes what is left and joins the workers. Later calls
    /// do nothing.
    pub fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        {
            let mut core = self.core();
            core.closing = true;
            for w in &core.workers {
                w.send(Command::Drain { deadline });
            }
        }
        let mut threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads.workers.drain(..) {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
        threads.stop_health();
    }
}

impl Server {
    /// The start of a graceful stop, before [`Server::shutdown`]: every
    /// TCP listener stays open but drops new connection attempts unanswered
    /// (clients send their SYN again, from 1 s on), while established
    /// connections and UDP flows go on. Meanwhile routers that learn the
    /// VIP's withdrawal (the agent withdraws it once the control API is
    /// gone) send new flows to other amphorae, and none was refused.
    /// Returns once every worker did so (or after a second).
    pub fn quiesce(&self) {
        let (ack, acks) = crossbeam_channel::unbounded();
        let n = {
            let core = self.core();
            for w in &core.workers {
                w.send(Command::Quiesce { ack: ack.clone() });
            }
            core.workers.len()
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..n {
            if acks.recv_deadline(deadline).is_err() {
                tracing::warn!("a worker did not confirm it drops new connection attempts");
                return;
            }
        }
    }

    /// Ends a drain under way at once: every worker closes the connections
    /// it still has and exits, so [`Server::shutdown`] returns (a second
    /// SIGTERM). A worker takes the earlier deadline of a second `Drain`.
    pub fn cut_drain(&self) {
        let now = Instant::now();
        for w in &self.core().workers {
            w.send(Command::Drain { deadline: now });
        }
    }
}

impl Threads {
    fn stop_health(&mut self) {
        // Dropping the monitor stops the health thread, which ends the
        // publisher.
        drop(self.monitor.take());
        if let Some(p) = self.publisher.take() {
            let _ = p.join();
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop_health();
    }
}

/// What the health thread watches: every member of the book, with its
/// counters (for the check-latency histogram).
fn plan(book: &Book, snapshot: &Snapshot) -> Vec<(Target, Arc<MemberStats>)> {
    let mut plan = Vec::new();
    for p in &snapshot.pools {
        for m in &p.members {
            let key = MemberKey {
                pool: p.id.clone(),
                member: m.id.clone(),
            };
            if let Some(r) = book.get(&key) {
                plan.push((r.target.clone(), m.stats.clone()));
            }
        }
    }
    plan
}

/// The control side survives a panic elsewhere while holding the lock:
/// the state it guards is replaced whole by every apply.
fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    fn apply(&mut self, config: Config) -> Result<Applied, ApplyError> {
        if self.closing {
            return Err(ApplyError::ShuttingDown);
        }
        let running = self.current.generation();
        if self.started && config.generation <= running {
            if config.generation == running && config == *self.current.config {
                return Ok(Applied::Unchanged {
                    generation: running,
                });
            }
            return Err(ApplyError::Stale {
                running,
                offered: config.generation,
            });
        }
        // Health records only for a valid config (plan() assumes one).
        let valid = config.into_valid()?;
        let published = self.published.clone();
        published
            .applying
            .store(valid.config().generation, Ordering::Relaxed);
        let _applying = Applying(&published.applying);
        let book = self.book.plan(&valid, SystemTime::now());
        let snapshot = Arc::new(Snapshot::build(valid, &mut self.registry, &|p, m| {
            book.is_up(p, m)
        }));
        // A member whose record started over (new address or check) counts
        // its connect failures afresh too.
        for p in &snapshot.pools {
            for m in &p.members {
                let key = MemberKey {
                    pool: p.id.clone(),
                    member: m.id.clone(),
                };
                let id = |b: &Book| b.get(&key).map(|r| r.target.check_id);
                if id(&book) != id(&self.book) {
                    Ejector::reset(&m.stats);
                }
            }
        }
        let wanted: HashMap<Endpoint, &str> = snapshot
            .endpoints()
            .map(|(e, l)| (e, l.id.as_str()))
            .collect();
        let mut added = Vec::new();
        let mut per_worker: Vec<Vec<(SocketAddr, Bound)>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        let mut fresh: Vec<Endpoint> = wanted
            .keys()
            .filter(|e| !self.bound.contains(e))
            .copied()
            .collect();
        fresh.sort();
        for endpoint in fresh {
            let n = self.workers.len();
            let socks: std::io::Result<Vec<Bound>> = if endpoint.udp {
                listen::bind_udp(endpoint.addr, n, self.udp_offload)
                    .map(|v| v.into_iter().map(Bound::Udp).collect())
            } else {
                listen::bind_tcp(endpoint.addr, n).map(|v| v.into_iter().map(Bound::Tcp).collect())
            };
            match socks {
                Ok(socks) => {
                    for (w, s) in socks.into_iter().enumerate() {
                        per_worker[w].push((endpoint.addr, s));
                    }
                    added.push(endpoint);
                }
                Err(source) => {
                    // Sockets bound so far are dropped (closed) here, and
                    // counters the rejected config created are forgotten.
                    self.prune_registry();
                    return Err(ApplyError::Bind {
                        listener: wanted.get(&endpoint).copied().unwrap_or("").to_owned(),
                        endpoint,
                        source,
                    });
                }
            }
        }
        let mut removed: Vec<Endpoint> = self
            .bound
            .iter()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        removed.sort();

        let (ack_tx, ack_rx) = bounded(self.workers.len());
        for (w, socks) in self.workers.iter().zip(per_worker) {
            w.send(Command::Apply(Update {
                snapshot: snapshot.clone(),
                add: socks,
                remove: removed.clone(),
                ack: ack_tx.clone(),
            }));
        }
        self.bound = wanted.keys().copied().collect();
        self.current = snapshot;
        self.book = book;
        let _ = self
            .monitor
            .send(Input::Plan(plan(&self.book, &self.current)));
        self.prune_registry();
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut acked = vec![false; self.workers.len()];
        for _ in 0..self.workers.len() {
            match ack_rx.recv_deadline(deadline) {
                Ok(id) => acked[id] = true,
                Err(_) => {
                    self.publish();
                    let worker = acked.iter().position(|a| !a).unwrap_or(0);
                    let generation = self.current.generation();
                    tracing::error!(
                        worker,
                        generation,
                        "a worker did not confirm a new generation"
                    );
                    return Err(ApplyError::WorkerTimeout { generation, worker });
                }
            }
        }
        // Reads see the new generation once every worker runs it.
        self.publish();
        Ok(Applied::Changed {
            generation: self.current.generation(),
            added,
            removed,
        })
    }

    /// Makes the committed state what reads see.
    fn publish(&self) {
        self.published.store(View {
            snapshot: self.current.clone(),
            book: Arc::new(self.book.clone()),
            registry: Arc::new(self.registry.clone()),
        });
    }

    /// A member went up or down: rebuild its pool's balancer and hand it to
    /// every worker (no acknowledgement needed: it only steers new
    /// connections).
    fn health_changed(&mut self, change: Change) {
        let (pool_id, member_id, up) = (
            change.key.pool.clone(),
            change.key.member.clone(),
            change.up,
        );
        if !self.book.apply(change, SystemTime::now()) {
            return;
        }
        // Status reads see the change; the rest of the view stays.
        let view = self.published.view();
        self.published.store(View {
            snapshot: view.snapshot.clone(),
            book: Arc::new(self.book.clone()),
            registry: view.registry.clone(),
        });
        let snap = &self.current;
        let Some(index) = snap.config.pools.iter().position(|p| p.id == pool_id) else {
            return;
        };
        let (Some(cfg), Some(pool)) = (snap.config.pools.get(index), snap.pools.get(index)) else {
            return;
        };
        if up {
            // A re-admitted member starts counting connect failures afresh
            // (connections in flight at its ejection may have added some).
            if let Some(m) = pool.members.iter().find(|m| m.id == member_id) {
                Ejector::reset(&m.stats);
            }
        }
        let book = &self.book;
        let balancer = Arc::new(snapshot::balancer(cfg, &pool.members, &|p, m| {
            book.is_up(p, m)
        }));
        for w in &self.workers {
            w.send(Command::Balancer {
                pool: pool.clone(),
                balancer: balancer.clone(),
            });
        }
    }

    fn prune_registry(&mut self) {
        let cfg = &self.current.config;
        let listeners: Vec<&str> = cfg.listeners.iter().map(|l| l.id.as_str()).collect();
        let members: Vec<(&str, &str)> = cfg
            .pools
            .iter()
            .flat_map(|p| p.members.iter().map(|m| (p.id.as_str(), m.id.as_str())))
            .collect();
        self.registry.retain(&listeners, &members);
    }
}
