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
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Sender};
use mio::Waker;
use thiserror::Error;

use crate::config::{Config, ConfigErrors};
use crate::listen;
use crate::snapshot::{Endpoint, Snapshot};
use crate::stats::{Registry, StatsReport};
use crate::worker::{Bound, Command, Update, Worker, WorkerOptions};

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
    #[error("worker {0} did not take the new config in time")]
    WorkerTimeout(usize),
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
struct WorkerHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    thread: JoinHandle<()>,
}

/// A running dataplane.
#[derive(Debug)]
pub struct Server {
    workers: Vec<WorkerHandle>,
    current: Arc<Snapshot>,
    /// Endpoints with bound sockets (held by the workers).
    bound: HashSet<Endpoint>,
    registry: Registry,
    started: bool,
    /// UDP sockets get `UDP_GRO` (Options::udp_offload).
    udp_offload: bool,
}

impl Server {
    /// Starts the workers and applies the first config.
    pub fn start(config: Config, opts: Options) -> Result<Server, ApplyError> {
        let n = opts.workers.max(1);
        let wopts = WorkerOptions {
            splice: opts.splice,
            pipe_size: opts.pipe_size,
            udp_offload: opts.udp_offload,
        };
        let mut workers = Vec::with_capacity(n);
        for id in 0..n {
            let (tx, rx) = unbounded();
            let (worker, waker) =
                Worker::new(id, n, rx, wopts.clone()).map_err(ApplyError::Worker)?;
            let thread = std::thread::Builder::new()
                .name(format!("siphon-worker-{id}"))
                .spawn(move || worker.run())
                .map_err(ApplyError::Worker)?;
            workers.push(WorkerHandle { tx, waker, thread });
        }
        let mut server = Server {
            workers,
            current: Arc::new(Snapshot::empty()),
            bound: HashSet::new(),
            registry: Registry::new(n),
            started: false,
            udp_offload: opts.udp_offload,
        };
        server.apply(config)?;
        server.started = true;
        Ok(server)
    }

    pub fn generation(&self) -> u64 {
        self.current.generation()
    }

    pub fn config(&self) -> &Config {
        &self.current.config
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Validates and applies `config` atomically.
    pub fn apply(&mut self, config: Config) -> Result<Applied, ApplyError> {
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
        let snapshot = Arc::new(Snapshot::build(config, &mut self.registry)?);
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
            let update = Update {
                snapshot: snapshot.clone(),
                add: socks,
                remove: removed.clone(),
                ack: ack_tx.clone(),
            };
            // A worker that died cannot ack; the timeout below reports it.
            let _ = w.tx.send(Command::Apply(update));
            let _ = w.waker.wake();
        }
        self.bound = wanted.keys().copied().collect();
        self.current = snapshot;
        self.prune_registry();
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut acked = vec![false; self.workers.len()];
        for _ in 0..self.workers.len() {
            match ack_rx.recv_deadline(deadline) {
                Ok(id) => acked[id] = true,
                Err(_) => {
                    let id = acked.iter().position(|a| !a).unwrap_or(0);
                    return Err(ApplyError::WorkerTimeout(id));
                }
            }
        }
        Ok(Applied::Changed {
            generation: self.current.generation(),
            added,
            removed,
        })
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

    /// All counters, summed over workers.
    pub fn stats(&self) -> StatsReport {
        self.registry.report(self.generation())
    }

    /// Stops accepting everywhere, lets connections finish for up to
    /// `grace`, then closes what is left and joins the workers.
    pub fn shutdown(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for w in &self.workers {
            let _ = w.tx.send(Command::Drain { deadline });
            let _ = w.waker.wake();
        }
        for w in self.workers {
            if w.thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}
