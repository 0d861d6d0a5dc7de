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
//! Pure parts (no sockets, no clocks): [`config`], [`maglev`], [`balance`],
//! [`timer`], [`proxy_protocol`], [`snapshot`]. The I/O shell: [`worker`],
//! [`relay`], [`pipe`], [`udp`], [`mmsg`], [`listen`], [`server`].

pub mod api;
pub mod balance;
pub mod demo;
pub mod health;
pub mod listen;
pub mod live;
pub mod maglev;
pub mod mailbox;
pub mod metrics;
pub mod mmsg;
pub mod pipe;
pub mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod snapshot;
pub mod spread;
pub mod stats;
pub mod status;
pub mod timer;
pub mod udp;
pub mod worker;

pub use server::{Applied, ApplyError, Options, Server};
/// The config vocabulary lives in `siphon_proto`; `config::` paths keep
/// working here.
pub use siphon_proto::config;
pub use siphon_proto::Config;
pub use stats::StatsReport;
pub use status::{OperatingStatus, StatusReport};
