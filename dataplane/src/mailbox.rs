//! What reaches a worker from outside its thread: new generations from the
//! control side, rebuilt balancers, the drain, and connections handed over
//! by other workers (see `spread`). Its own module so that `spread` and
//! `worker` both use it without using each other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use mio::net::TcpStream;

use crate::balance::Balancer;
use crate::snapshot::{Endpoint, ListenerRt, PoolRt, Snapshot};

/// A newly bound socket for a worker.
#[derive(Debug)]
pub enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// A new generation for a worker.
#[derive(Debug)]
pub struct Update {
    pub snapshot: Arc<Snapshot>,
    /// This worker's new listening sockets.
    pub add: Vec<(SocketAddr, Bound)>,
    /// Sockets to stop listening on.
    pub remove: Vec<Endpoint>,
    pub ack: Sender<usize>,
}

#[derive(Debug)]
pub enum Command {
    Apply(Update),
    /// A health change rebuilt one pool's balancer.
    Balancer {
        pool: Arc<PoolRt>,
        balancer: Arc<Balancer>,
    },
    /// Keep the TCP listeners open but drop every new connection
    /// attempt unanswered (see [`crate::server::Server::quiesce`]); the
    /// worker's id on `ack` once done.
    Quiesce {
        ack: crossbeam_channel::Sender<usize>,
    },
    /// Stop accepting, finish connections until the deadline, then exit.
    Drain {
        deadline: Instant,
    },
    /// A connection another worker accepted (and checked against the
    /// ACL), handed over because that worker holds more (see `spread`).
    Adopt {
        listener: Arc<ListenerRt>,
        client: TcpStream,
        peer: SocketAddr,
    },
}
