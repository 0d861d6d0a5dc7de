//! Siphon's shared vocabulary: what the dataplane, the agent and the
//! controller say to each other, and nothing that forwards traffic.
//!
//! - [`words`]: closed sets of words (protocols, algorithms, monitor
//!   types, HTTP methods, statuses), each spelled once;
//! - [`config`]: the dataplane's config document, loading it from TOML or
//!   JSON, and its validation;
//! - [`status`] and [`stats`]: the operating status and the counters the
//!   dataplane reports;
//! - [`bgp`]: the BGP peering the controller asks an agent for, and the
//!   sessions and announcements the agent reports;
//! - [`heartbeat`]: the signed UDP heartbeat an agent sends and a health
//!   manager verifies, and [`keys`], the heartbeat key the controller
//!   pushes to an agent;
//! - [`http`]: the one HTTP client for the dataplane's control socket, the
//!   controller's API and the agents' mutual-TLS API;
//! - [`socket`]: where the dataplane's control socket lives and how a
//!   daemon binds its Unix socket; [`systemd`]: readiness notification.
//!
//! The agent and the controller link this crate instead of the dataplane
//! (or each other): the controller builds none of the dataplane's splice,
//! recvmmsg or netlink code.

#[macro_use]
pub mod words;

pub mod bgp;
pub mod config;
pub mod heartbeat;
pub mod http;
pub mod keys;
pub mod socket;
pub mod stats;
pub mod status;
pub mod systemd;

/// The agent's HTTPS API port when its config names none.
pub const AGENT_PORT: u16 = 9443;

pub use config::Config;
pub use stats::StatsReport;
pub use status::{OperatingStatus, StatusReport};
