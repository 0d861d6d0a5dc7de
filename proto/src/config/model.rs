//! The config document: one set of serde types for TOML files, JSON files
//! and (later) the control API. Names and enum values follow Octavia's v2 API
//! so a controller maps its objects 1:1.
//!
//! Fields that a user can get wrong (addresses, ports, weights, CIDRs) are
//! kept as they were written and checked by [`super::validate`], so an error
//! names the object and the field instead of a line of the file.

use serde::{Deserialize, Serialize};

/// Octavia's default for `timeout_client_data` and `timeout_member_data` (ms).
pub const DEFAULT_DATA_TIMEOUT_MS: u64 = 50_000;
/// Octavia's default for `timeout_member_connect` (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// How many other members a connection tries after its first one fails.
pub const DEFAULT_CONNECT_RETRIES: u32 = 3;
/// UDP flows a listener keeps before evicting the least recently used one.
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;
/// The Maglev lookup table size (a prime; Maglev's and Katran's default).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;

/// A whole dataplane configuration, applied atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Monotonic version of this document; a running dataplane only moves
    /// to a newer generation.
    pub generation: u64,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub pools: Vec<Pool>,
}

words! {
    pub enum ListenerProtocol {
        Tcp = "TCP",
        Udp = "UDP",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub id: String,
    pub protocol: ListenerProtocol,
    /// Local addresses to listen on (IPv4 and/or IPv6; `0.0.0.0` and `::`
    /// are wildcards). Each gets one socket per worker.
    pub bind_addresses: Vec<String>,
    pub protocol_port: i64,
    /// Concurrent connections across all workers; -1 = unlimited (Octavia).
    #[serde(default = "unlimited")]
    pub connection_limit: i64,
    #[serde(default = "default_data_timeout")]
    pub timeout_client_data: u64,
    #[serde(default = "default_connect_timeout")]
    pub timeout_member_connect: u64,
    #[serde(default = "default_data_timeout")]
    pub timeout_member_data: u64,
    /// Siphon extension: other members tried after a failed connect.
    #[serde(default = "default_connect_retries")]
    pub connect_retries: u32,
    /// Siphon extension, UDP listeners: flows kept at once (each holds one
    /// socket); a new flow beyond it evicts the least recently used one.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// Client networks allowed in; empty = everyone (Octavia's semantics).
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    #[serde(default)]
    pub default_pool_id: Option<String>,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
}

words! {
    pub enum PoolProtocol {
        Tcp = "TCP",
        Udp = "UDP",
        /// TCP with a PROXY protocol v1 header sent to the member.
        Proxy = "PROXY",
        /// TCP with a PROXY protocol v2 header sent to the member.
        ProxyV2 = "PROXYV2",
    }
}

impl PoolProtocol {
    /// The listener protocol that can take this pool: UDP for UDP, TCP
    /// for the rest.
    pub fn transport(self) -> ListenerProtocol {
        match self {
            PoolProtocol::Udp => ListenerProtocol::Udp,
            PoolProtocol::Tcp | PoolProtocol::Proxy | PoolProtocol::ProxyV2 => {
                ListenerProtocol::Tcp
            }
        }
    }
}

words! {
    pub enum LbAlgorithm {
        RoundRobin = "ROUND_ROBIN",
        LeastConnections = "LEAST_CONNECTIONS",
        SourceIp = "SOURCE_IP",
        SourceIpPort = "SOURCE_IP_PORT",
        Maglev = "MAGLEV",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub id: String,
    pub protocol: PoolProtocol,
    pub lb_algorithm: LbAlgorithm,
    #[serde(default)]
    pub members: Vec<Member>,
    #[serde(default)]
    pub healthmonitor: Option<HealthMonitor>,
    /// Siphon extension: Maglev table size (prime) for the hashing algorithms.
    #[serde(default = "default_maglev_table_size")]
    pub maglev_table_size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: String,
    pub address: String,
    pub protocol_port: i64,
    /// 0–256; 0 = no new connections, established ones stay (drain).
    #[serde(default = "default_weight")]
    pub weight: i64,
    /// Used only when no non-backup member is usable.
    #[serde(default)]
    pub backup: bool,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    #[serde(default)]
    pub monitor_address: Option<String>,
    #[serde(default)]
    pub monitor_port: Option<i64>,
}

words! {
    pub enum MonitorType {
        Http = "HTTP",
        Https = "HTTPS",
        Ping = "PING",
        Tcp = "TCP",
        TlsHello = "TLS-HELLO",
        UdpConnect = "UDP-CONNECT",
    }
}

words! {
    pub enum HttpMethod {
        Get = "GET",
        Head = "HEAD",
        Post = "POST",
        Put = "PUT",
        Delete = "DELETE",
        Trace = "TRACE",
        Options = "OPTIONS",
        Connect = "CONNECT",
        Patch = "PATCH",
    }
}

/// A member's active health check, run by the dataplane's health thread
/// (see the README, "Health checks").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthMonitor {
    #[serde(rename = "type")]
    pub kind: MonitorType,
    /// Seconds between checks.
    pub delay: i64,
    /// Seconds a check may take.
    pub timeout: i64,
    /// Consecutive successes to go up (1–10).
    pub max_retries: i64,
    /// Consecutive failures to go down (1–10).
    #[serde(default = "default_retries_down")]
    pub max_retries_down: i64,
    #[serde(default)]
    pub http_method: Option<HttpMethod>,
    #[serde(default)]
    pub url_path: Option<String>,
    #[serde(default)]
    pub expected_codes: Option<String>,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
}

fn unlimited() -> i64 {
    -1
}
fn yes() -> bool {
    true
}
fn default_data_timeout() -> u64 {
    DEFAULT_DATA_TIMEOUT_MS
}
fn default_connect_timeout() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_connect_retries() -> u32 {
    DEFAULT_CONNECT_RETRIES
}
fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}
fn default_maglev_table_size() -> u32 {
    DEFAULT_MAGLEV_TABLE_SIZE
}
fn default_weight() -> i64 {
    1
}
fn default_retries_down() -> i64 {
    3
}
