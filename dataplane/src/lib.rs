//! `siphon-dataplane`: Siphon's L4 proxy.
//!
//! One worker thread per core, each with its own `mio::Poll` and its own
//! `SO_REUSEPORT` socket per listener address; TCP forwarded with
//! `splice(2)`, UDP by flow with batched `recvmmsg`/`sendmmsg`; members chosen by Maglev consistent hashing (identical on
//! every node), smooth weighted round robin or weighted least connections;
//! configs applied live and atomically.
//!
//! It is *not* a control plane: it never talks to the network's control
//! side; an agent (or an operator with a file and SIGHUP) drives it.
//!
//! What other crates use: [`Server`] (run, apply, status, stats), the
//! HTTP [`api`], [`metrics`], [`stats`], [`demo`], and the pure parts
//! benchmarked and fuzzed on their own ([`maglev`], [`balance`],
//! [`proxy_protocol`]). The rest is the crate's own: the pure `timer` and
//! `snapshot`, and the I/O shell (`worker`, `relay`, `pipe`, `udp`,
//! `mmsg`, `listen`, `health`).

pub mod api;
pub mod balance;
pub mod demo;
pub(crate) mod health;
pub(crate) mod listen;
pub(crate) mod live;
pub mod maglev;
pub(crate) mod mailbox;
pub mod metrics;
pub(crate) mod mmsg;
pub(crate) mod pipe;
pub mod proxy_protocol;
pub(crate) mod relay;
pub mod server;
pub(crate) mod snapshot;
pub(crate) mod spread;
pub mod stats;
pub(crate) mod status;
pub(crate) mod timer;
pub(crate) mod udp;
pub(crate) mod worker;

pub use server::{Applied, ApplyError, Options, Server};
/// The config vocabulary lives in `siphon_proto`; `config::` paths keep
/// working here.
pub use siphon_proto::config;
pub use siphon_proto::Config;
pub use stats::StatsReport;
pub use status::{OperatingStatus, StatusReport};
