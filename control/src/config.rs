//! The controller's config file (TOML): where it listens, its database,
//! auth, the VIP subnets it may allocate from, the amphorae it starts with,
//! how it talks to their agents and how it hears them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

/// Octavia's API port.
pub const DEFAULT_PORT: u16 = 9876;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The store: an SQLite file (created, with its directory, if
    /// missing), or PostgreSQL for several controllers.
    #[serde(default)]
    pub database: crate::store::Database,
    #[serde(default)]
    pub auth: Auth,
    /// Subnets VIPs are allocated from.
    #[serde(default)]
    pub vip_subnets: Vec<VipSubnet>,
    /// Amphorae registered at start (more can be added through the API).
    #[serde(default)]
    pub amphorae: Vec<AmphoraEntry>,
    /// How the controller reaches agents; without it nothing is pushed
    /// and load balancers stay `PENDING_CREATE`.
    #[serde(default)]
    pub agent_tls: Option<AgentTls>,
    #[serde(default)]
    pub push: Push,
    #[serde(default)]
    pub health: Option<Health>,
    /// How a VIP's traffic reaches the amphorae of its load balancer.
    #[serde(default)]
    pub distributor: Distributor,
    /// Limits of the API server.
    #[serde(default)]
    pub limits: Limits,
    /// Several controllers sharing one PostgreSQL store.
    #[serde(default)]
    pub cluster: Cluster,
}

impl ControlConfig {
    /// What a config file with only `database`, `auth` and `vip_subnets`
    /// gives (no agents, so nothing is pushed; no health manager), on
    /// `127.0.0.1` at a port the system picks: for tests and benches,
    /// which set what else they need.
    pub fn local(
        database: crate::store::Database,
        auth: Auth,
        vip_subnets: Vec<VipSubnet>,
    ) -> ControlConfig {
        ControlConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database,
            auth,
            vip_subnets,
            amphorae: vec![],
            agent_tls: None,
            push: Push::default(),
            health: None,
            distributor: Distributor::default(),
            limits: Limits::default(),
            cluster: Cluster::default(),
        }
    }
}

/// How this controller works beside others on one store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// This controller's name in claims and logs (default: the host's
    /// name, the process id and a random tag).
    #[serde(default)]
    pub name: Option<String>,
    /// How long a claim on a job (a push, a wipe) lasts unless renewed:
    /// work of a controller that died is taken over after this.
    #[serde(default = "default_claim_ttl_ms")]
    pub claim_ttl_ms: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            name: None,
            claim_ttl_ms: default_claim_ttl_ms(),
        }
    }
}

impl Cluster {
    pub fn claim_ttl(&self) -> Duration {
        Duration::from_millis(self.claim_ttl_ms)
    }
}

fn default_claim_ttl_ms() -> u64 {
    10_000
}

/// What one client may hold of the API server, so idle or slow clients
/// can never take the descriptors pushes and the health manager need.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once; at the cap the oldest connection is
    /// closed (once its request, if any, is answered) to let a new one in.
    /// Lowered at start to leave `reserved_fds` of the process's
    /// descriptor limit free.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Descriptors kept for pushes, the store and heartbeats.
    #[serde(default = "default_reserved_fds")]
    pub reserved_fds: usize,
    /// Time to receive a whole request head, and the longest a kept-alive
    /// connection may wait for its next request.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Longest a connection may go without a byte moved either way while
    /// a request is read or answered (a stalled body, a client that does
    /// not read its answer).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            reserved_fds: default_reserved_fds(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

fn default_max_connections() -> usize {
    1_000
}
fn default_reserved_fds() -> usize {
    256
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}

/// The distributor driver and its settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, tag = "driver", rename_all = "kebab-case")]
pub enum Distributor {
    /// Nothing routes the VIP: the network delivers it (one amphora, or a
    /// distributor managed elsewhere).
    #[default]
    Noop,
    /// The VIP routed on a Linux router over a resilient nexthop group,
    /// one nexthop per healthy amphora.
    LinuxEcmp(LinuxEcmp),
    /// Every amphora announces the VIPs it serves to the operator's
    /// routers over BGP (through its agent and a local BIRD); the routers
    /// spread with ECMP and take a dead amphora out by BFD, with no
    /// controller in that path.
    Bgp(Bgp),
}

/// The peering the controller gives every amphora it pushes to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bgp {
    /// The amphorae's AS.
    pub local_as: u32,
    /// The routers they peer with.
    pub peers: Vec<BgpPeer>,
    /// BGP hold time, seconds (keepalives a third of it).
    #[serde(default = "default_bgp_hold")]
    pub hold_time_s: u16,
    /// BFD on every session (the routers must run it too): how a dead
    /// amphora is taken out in a fraction of a second.
    #[serde(default)]
    pub bfd: Option<siphon_proto::bgp::Bfd>,
}

fn default_bgp_hold() -> u16 {
    9
}

impl Bgp {
    /// Peer `i`, its password read from its file (mode 0600).
    fn peer(&self, i: usize) -> Result<siphon_proto::bgp::Peer, ConfigError> {
        let p = &self.peers[i];
        let password = match &p.password_file {
            Some(f) => {
                let field = format!("distributor.peers[{i}].password_file");
                let raw = read_secret(f, &field)?;
                let text = String::from_utf8(raw).map_err(|_| ConfigError::Invalid {
                    path: f.clone(),
                    field,
                    problem: "not UTF-8".into(),
                })?;
                Some(text.trim_end_matches(['\n', '\r']).to_owned())
            }
            None => None,
        };
        Ok(siphon_proto::bgp::Peer {
            address: p.address,
            asn: p.asn,
            password,
        })
    }

    /// Every peer's password file read and its password one BIRD takes,
    /// whatever network the peer is for.
    fn check_passwords(&self) -> Result<(), ConfigError> {
        for i in 0..self.peers.len() {
            let peer = self.peer(i)?;
            let alone = siphon_proto::bgp::Peering {
                local_as: self.local_as,
                router_id: None,
                peers: vec![peer],
                hold_time_s: self.hold_time_s,
                bfd: self.bfd.clone(),
            };
            alone.check().map_err(|e| ConfigError::Invalid {
                path: self.peers[i].password_file.clone().unwrap_or_default(),
                field: format!("distributor.peers[{i}].password_file"),
                problem: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// The peering an amphora gets: the peers of the network its
    /// address on the VIP network (`data_address`) is in, and those of
    /// every network; passwords read from their files. `None` peers: the
    /// error says which file, or what BIRD would refuse.
    pub fn peering_for(
        &self,
        data_address: Option<IpAddr>,
    ) -> Result<siphon_proto::bgp::Peering, ConfigError> {
        let mut peers = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let applies = match (p.network, data_address) {
                (Some(n), Some(a)) => n.contains(&a),
                (Some(_), None) => false,
                (None, _) => true,
            };
            if !applies {
                continue;
            }
            peers.push(self.peer(i)?);
        }
        let router_id = match data_address {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        let peering = siphon_proto::bgp::Peering {
            local_as: self.local_as,
            router_id,
            peers,
            hold_time_s: self.hold_time_s,
            bfd: self.bfd.clone(),
        };
        peering.check().map_err(|e| ConfigError::Invalid {
            path: PathBuf::from("(config)"),
            field: "distributor".into(),
            problem: match data_address {
                Some(a) => format!("the peering of an amphora at {a}: {e}"),
                None => e.to_string(),
            },
        })?;
        Ok(peering)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeer {
    pub address: IpAddr,
    pub asn: u32,
    /// The session's TCP MD5 password, in a file (mode 0600).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Only amphorae whose address on the VIP network (`vrrp_ip`, else
    /// `lb_network_ip`) is in this network peer with it: a peering per
    /// network. Absent: every amphora.
    #[serde(default)]
    pub network: Option<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxEcmp {
    /// The router's network namespace (`/run/netns/NAME`) when the
    /// controller runs on the router host but outside that namespace;
    /// absent: the controller's own.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The router's interface on the amphorae's network.
    pub interface: String,
    /// Hash buckets per group (spread over its nexthops).
    #[serde(default = "default_buckets")]
    pub buckets: u16,
    /// Seconds a bucket must be idle before it moves to a new nexthop: a
    /// scale-out or a recovery takes only idle flows. The least: each
    /// VIP's group waits at least its listeners' longest data timeout
    /// plus `idle_margin_s`, so no connection still open is moved.
    #[serde(default = "default_idle_timer_s")]
    pub idle_timer_s: u32,
    /// Seconds added to the listeners' longest data timeout for a VIP's
    /// idle timer (the dataplane's close and the router's clock are not
    /// in step).
    #[serde(default = "default_idle_margin_s")]
    pub idle_margin_s: u32,
    /// Seconds a group may stay unbalanced (a new amphora short of its
    /// share because no bucket went idle) before busy buckets move too,
    /// resetting their flows; 0: never.
    #[serde(default)]
    pub unbalanced_timer_s: u32,
    /// The first nexthop id given out; ids below stay the operator's.
    #[serde(default = "default_first_id")]
    pub first_id: u32,
    /// Seconds between full re-applies of every VIP's route, group and
    /// nexthops (create or replace: flows are not moved), which repair
    /// what changed under the controller.
    #[serde(default = "default_resync_s")]
    pub resync_s: u32,
}

/// `X-Auth-Token` checking.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
pub enum Auth {
    /// Every request must carry this admin token.
    Token {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        token_file: Option<PathBuf>,
    },
    /// No check at all: development only.
    Noauth,
}

impl Default for Auth {
    fn default() -> Self {
        Auth::Token {
            token: None,
            token_file: Some(PathBuf::from("/etc/siphon/admin-token")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSubnet {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub network_id: String,
    #[serde(default)]
    pub network_name: String,
    pub cidr: IpNet,
    #[serde(default)]
    pub gateway_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmphoraEntry {
    pub id: String,
    /// The agent's management address.
    pub address: IpAddr,
    #[serde(default = "default_agent_port")]
    pub port: u16,
    /// Name in the agent's certificate; the amphora id when absent.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the CA for this agent; `agent_tls.ca` when absent.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default = "default_vip_interface")]
    pub vip_interface: String,
    /// Its address on the VIP network, where a distributor sends VIP
    /// traffic; `address` when absent.
    #[serde(default)]
    pub vrrp_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTls {
    /// PEM client certificate the controller presents to agents.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM CA agents' server certificates chain to.
    pub ca: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Push {
    /// Attempts per push before the change goes to `ERROR`.
    #[serde(default = "default_push_attempts")]
    pub attempts: u32,
    /// First back-off between attempts; doubles up to 5 s.
    #[serde(default = "default_push_backoff_ms")]
    pub backoff_ms: u64,
    /// Per request (connect included).
    #[serde(default = "default_push_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for Push {
    fn default() -> Self {
        Push {
            attempts: default_push_attempts(),
            backoff_ms: default_push_backoff_ms(),
            timeout_ms: default_push_timeout_ms(),
        }
    }
}

impl Push {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(self.backoff_ms.max(1))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// UDP address heartbeats arrive on.
    #[serde(default = "default_health_listen")]
    pub listen: SocketAddr,
    /// File holding the fleet's bootstrap HMAC key (the agents'
    /// `heartbeat.key_file`): it speaks for an amphora only until the
    /// amphora's agent holds its own key, which the controller pushes.
    /// Without it, amphorae are heard once their own key is pushed.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How long a rotated-out heartbeat key is still taken.
    #[serde(default = "default_key_grace_ms")]
    pub key_grace_ms: u64,
    /// Silence after which an amphora is failed over.
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// How often staleness is checked.
    #[serde(default = "default_check_interval_ms")]
    pub check_interval_ms: u64,
    /// How far a heartbeat's clock may be from ours.
    #[serde(default = "default_clock_window_ms")]
    pub clock_window_ms: u64,
    /// Circuit breaker: when this many carrying amphorae fall silent
    /// together (each for over half of `heartbeat_timeout_ms`), none is
    /// failed over (they are marked `FAILOVER_STOPPED`) and the
    /// distributor keeps sending them traffic: that is a fault on the
    /// controller's side, not that many dead amphorae. Agents' heartbeat
    /// interval must be at most half of `heartbeat_timeout_ms`.
    #[serde(default)]
    pub failover_threshold: Option<usize>,
    /// How long an amphora that is heard but out of step (an older
    /// generation, no config kept, no VIP) is re-pushed to before it is
    /// failed over to a spare.
    #[serde(default = "default_repair_timeout_ms")]
    pub repair_timeout_ms: u64,
    /// The longest wait between two attempts of a repair or of a failed
    /// change (the first wait is `push.backoff_ms`, doubled each time).
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
}

fn default_key_grace_ms() -> u64 {
    60_000
}
fn default_repair_timeout_ms() -> u64 {
    30_000
}
fn default_retry_max_ms() -> u64 {
    30_000
}

impl Health {
    /// The heartbeat key shared by the fleet (see `key_file`), checked
    /// like every secret.
    pub fn bootstrap_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.key_file else {
            return Ok(None);
        };
        let key = read_secret(path, "health.key_file")?;
        let key = key.trim_ascii();
        if key.len() < MIN_SECRET_LEN {
            return Err(ConfigError::Invalid {
                path: path.clone(),
                field: "health.key_file".into(),
                problem: format!(
                    "the heartbeat key must be at least {MIN_SECRET_LEN} bytes (it has {})",
                    key.len()
                ),
            });
        }
        Ok(Some(key.to_vec()))
    }
    pub fn key_grace(&self) -> Duration {
        Duration::from_millis(self.key_grace_ms)
    }

    pub fn repair_timeout(&self) -> Duration {
        Duration::from_millis(self.repair_timeout_ms)
    }
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.check_interval_ms)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0u16; 8], DEFAULT_PORT))
}
fn default_agent_port() -> u16 {
    siphon_proto::AGENT_PORT
}
fn default_vip_interface() -> String {
    "lo".to_owned()
}
/// Longest resilient-group timer accepted (an hour).
pub const MAX_TIMER_S: u32 = 3_600;

fn default_resync_s() -> u32 {
    10
}
fn default_buckets() -> u16 {
    128
}
fn default_idle_timer_s() -> u32 {
    120
}
fn default_idle_margin_s() -> u32 {
    5
}
fn default_first_id() -> u32 {
    1_000_000
}
fn default_push_attempts() -> u32 {
    5
}
fn default_push_backoff_ms() -> u64 {
    200
}
fn default_push_timeout_ms() -> u64 {
    10_000
}
fn default_health_listen() -> SocketAddr {
    SocketAddr::from(([0u16; 8], 5555))
}
fn default_heartbeat_timeout_ms() -> u64 {
    3_000
}
fn default_check_interval_ms() -> u64 {
    100
}
fn default_clock_window_ms() -> u64 {
    30_000
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// Shortest admin token and heartbeat key taken.
pub const MIN_SECRET_LEN: usize = 16;

/// Reads a file holding a secret (token, key), refusing one that group or
/// others may read: a secret readable by every local user is no secret.
/// (The units run as `siphon`: give the files `siphon:siphon 0600`.)
pub fn read_secret(path: &Path, field: &str) -> Result<Vec<u8>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            problem: format!(
                "mode {:04o} lets group or others read this secret; chmod 600 it (owned by the user the controller runs as)",
                mode & 0o7777
            ),
        });
    }
    std::fs::read(path).map_err(read)
}

impl ControlConfig {
    /// Reads and checks every secret the config names (admin token,
    /// heartbeat key, agent TLS key): what `check` and start refuse.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        self.admin_token()?;
        self.database.connect_url()?;
        if let Some(h) = &self.health {
            h.bootstrap_key()?;
        }
        if let Some(t) = &self.agent_tls {
            read_secret(&t.key, "agent_tls.key")?;
        }
        if let Distributor::Bgp(b) = &self.distributor {
            b.check_passwords()?;
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<ControlConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text` (read from `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<ControlConfig, ConfigError> {
        // The position and the problem, not toml's quote of the line: a
        // line may hold a secret (a token, a password in a URL), and this
        // error goes to logs.
        let config: ControlConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let start = span.start.min(text.len());
                let before = &text[..start];
                let line = before.matches('\n').count() + 1;
                let begin = before.rfind('\n').map_or(0, |i| i + 1);
                let column = start - begin + 1;
                // The key the problem is at (the text before `=`).
                let whole = text[begin..].lines().next().unwrap_or_default();
                let key = match whole.split_once('=') {
                    Some((k, _)) => k.trim(),
                    None if whole.trim_start().starts_with('[') => whole.trim(),
                    // Inside a multi-line value: nothing of it is shown.
                    None => "",
                };
                format!("line {line}, column {column} ({key}): ")
            });
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("{at}{}", e.message()),
            }
        })?;
        let invalid = |field: String, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            problem: problem.to_owned(),
        };
        if let Auth::Token { token, token_file } = &config.auth {
            if token.is_none() && token_file.is_none() {
                return Err(invalid(
                    "auth".into(),
                    "mode \"token\" needs token or token_file",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in config.vip_subnets.iter().enumerate() {
            if !seen.insert(&s.id) {
                return Err(invalid(format!("vip_subnets[{i}].id"), "duplicate id"));
            }
            if let Some(g) = s.gateway_ip {
                if !s.cidr.contains(&g) {
                    return Err(invalid(
                        format!("vip_subnets[{i}].gateway_ip"),
                        "not inside cidr",
                    ));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in config.amphorae.iter().enumerate() {
            if a.id.trim().is_empty() {
                return Err(invalid(format!("amphorae[{i}].id"), "must not be empty"));
            }
            if !seen.insert(&a.id) {
                return Err(invalid(format!("amphorae[{i}].id"), "duplicate id"));
            }
        }
        let l = &config.limits;
        if l.max_connections == 0 || l.header_read_timeout_ms == 0 || l.idle_timeout_ms == 0 {
            return Err(invalid(
                "limits".into(),
                "max_connections, header_read_timeout_ms and idle_timeout_ms must be at least 1",
            ));
        }
        if !(1_000..=600_000).contains(&config.cluster.claim_ttl_ms) {
            return Err(invalid(
                "cluster.claim_ttl_ms".into(),
                "between 1000 and 600000 (renewed every third of it)",
            ));
        }
        if config
            .cluster
            .name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty() || n.len() > 200)
        {
            return Err(invalid("cluster.name".into(), "1 to 200 characters"));
        }
        if config.push.attempts == 0 {
            return Err(invalid("push.attempts".into(), "must be at least 1"));
        }
        if let Some(h) = &config.health {
            if h.failover_threshold == Some(0) {
                return Err(invalid(
                    "health.failover_threshold".into(),
                    "must be at least 1 (0 would stop every failover)",
                ));
            }
            if h.heartbeat_timeout_ms < 10 || h.check_interval_ms < 10 {
                return Err(invalid(
                    "health".into(),
                    "heartbeat_timeout_ms and check_interval_ms must be at least 10",
                ));
            }
        }
        if let Distributor::Bgp(b) = &config.distributor {
            // The shape of every peering: what BIRD would refuse (the
            // passwords are checked with the other secrets).
            let whole = siphon_proto::bgp::Peering {
                local_as: b.local_as,
                peers: b
                    .peers
                    .iter()
                    .map(|p| siphon_proto::bgp::Peer {
                        address: p.address,
                        asn: p.asn,
                        password: None,
                    })
                    .collect(),
                router_id: None,
                hold_time_s: b.hold_time_s,
                bfd: b.bfd.clone(),
            };
            if let Err(e) = whole.check() {
                return Err(invalid("distributor".into(), &e.to_string()));
            }
        }
        if let Distributor::LinuxEcmp(d) = &config.distributor {
            let name = d.interface.as_str();
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(invalid(
                    "distributor.interface".into(),
                    "not an interface name (1 to 15 characters, no '/' or space)",
                ));
            }
            if d.buckets < 2 {
                return Err(invalid("distributor.buckets".into(), "must be at least 2"));
            }
            if d.first_id == 0 {
                return Err(invalid("distributor.first_id".into(), "must be at least 1"));
            }
            if d.resync_s == 0 || d.resync_s > MAX_TIMER_S {
                return Err(invalid(
                    "distributor.resync_s".into(),
                    &format!("between 1 and {MAX_TIMER_S}"),
                ));
            }
            for (field, v) in [
                ("idle_timer_s", d.idle_timer_s),
                ("idle_margin_s", d.idle_margin_s),
                ("unbalanced_timer_s", d.unbalanced_timer_s),
            ] {
                if v > MAX_TIMER_S {
                    return Err(invalid(
                        format!("distributor.{field}"),
                        &format!("at most {MAX_TIMER_S}"),
                    ));
                }
            }
        }
        Ok(config)
    }

    /// The admin token, read from its file if need be; `None` = no auth.
    /// An empty or short token is refused (an empty one would let every
    /// request without a token in), and so is a token file that group or
    /// others can read.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let checked = |t: &str, path: &Path, field: &str| {
            let t = t.trim();
            if t.chars().count() < MIN_SECRET_LEN {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    field: field.into(),
                    problem: format!(
                        "the admin token must be at least {MIN_SECRET_LEN} characters (it has {}); generate one with `openssl rand -hex 32`",
                        t.chars().count()
                    ),
                });
            }
            Ok(Some(t.to_owned()))
        };
        match &self.auth {
            Auth::Noauth => Ok(None),
            Auth::Token { token: Some(t), .. } => checked(t, Path::new(""), "auth.token"),
            Auth::Token {
                token_file: Some(path),
                ..
            } => {
                let t = read_secret(path, "auth.token_file")?;
                checked(&String::from_utf8_lossy(&t), path, "auth.token_file")
            }
            // Refused by `parse`; never fall back to no auth.
            Auth::Token { .. } => Err(ConfigError::Invalid {
                path: PathBuf::new(),
                field: "auth".into(),
                problem: "mode \"token\" needs token or token_file".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/control.toml.example");
        let c = ControlConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.amphorae.len(), 2);
        assert_eq!(c.health.and_then(|h| h.failover_threshold), Some(5));
    }

    #[test]
    fn weak_or_exposed_secrets_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("siphon-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Path::new("c.toml");
        let token = |t: &str| {
            ControlConfig::parse(&format!("[auth]\nmode = \"token\"\ntoken = {t:?}\n"), p)
                .unwrap()
                .check_secrets()
                .map_err(|e| e.to_string())
        };
        // An empty token would let every request without one in.
        assert!(token("").unwrap_err().contains("at least 16"));
        assert!(token("   short   ").unwrap_err().contains("at least 16"));
        assert!(token("a-long-enough-admin-token").is_ok());
        let file = dir.join("token");
        std::fs::write(&file, "a-long-enough-admin-token\n").unwrap();
        let from_file = |mode: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            ControlConfig::parse(
                &format!("[auth]\nmode = \"token\"\ntoken_file = {:?}\n", file),
                p,
            )
            .unwrap()
            .check_secrets()
            .map_err(|e| e.to_string())
        };
        assert!(from_file(0o644).unwrap_err().contains("chmod 600"));
        assert!(from_file(0o640).unwrap_err().contains("mode 0640"));
        assert!(from_file(0o600).is_ok());
        let key = dir.join("hb.key");
        std::fs::write(&key, "short\n").unwrap();
        let health = |mode: u32| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            ControlConfig::parse(
                &format!("[auth]\nmode = \"noauth\"\n[health]\nkey_file = {key:?}\n"),
                p,
            )
            .unwrap()
            .check_secrets()
            .map_err(|e| e.to_string())
        };
        assert!(health(0o600).unwrap_err().contains("at least 16 bytes"));
        std::fs::write(&key, "a heartbeat key long enough\n").unwrap();
        assert!(health(0o604).unwrap_err().contains("health.key_file"));
        assert!(health(0o600).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bgp_peering_per_network_with_passwords_from_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("siphon-bgp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("peer-password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = Path::new("c.toml");
        let text = format!(
            "[auth]\nmode = \"noauth\"\n[distributor]\ndriver = \"bgp\"\nlocal_as = 64513\nhold_time_s = 3\n\
             bfd = {{ min_rx_ms = 100, min_tx_ms = 100, multiplier = 3 }}\n\
             [[distributor.peers]]\naddress = \"198.18.1.1\"\nasn = 64512\nnetwork = \"198.18.1.0/24\"\npassword_file = {pw:?}\n\
             [[distributor.peers]]\naddress = \"198.18.2.1\"\nasn = 64512\nnetwork = \"198.18.2.0/24\"\n\
             [[distributor.peers]]\naddress = \"2001:db8:1::1\"\nasn = 64512\n"
        );
        let c = ControlConfig::parse(&text, p).unwrap_or_else(|e| panic!("{e}"));
        c.check_secrets().unwrap_or_else(|e| panic!("{e}"));
        let Distributor::Bgp(b) = &c.distributor else {
            panic!("{:?}", c.distributor)
        };
        // An amphora on the first network: its router and the IPv6 one.
        let first = b.peering_for(Some("198.18.1.20".parse().unwrap())).unwrap();
        let peers: Vec<String> = first.peers.iter().map(|p| p.address.to_string()).collect();
        assert_eq!(peers, ["198.18.1.1", "2001:db8:1::1"]);
        assert_eq!(first.peers[0].password.as_deref(), Some("s3cret"));
        assert_eq!(first.hold_time_s, 3);
        let second = b.peering_for(Some("198.18.2.20".parse().unwrap())).unwrap();
        assert_eq!(second.peers[0].address.to_string(), "198.18.2.1");
        assert_eq!(second.peers[0].password, None);
        // A password others can read is refused, as every secret, and
        // one BIRD would not take too; the error names the peer.
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = c.check_secrets().unwrap_err().to_string();
        assert!(e.contains("distributor.peers[0].password_file"), "{e}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let quoted = dir.join("quoted-password");
        std::fs::write(&quoted, "a\"b\n").unwrap();
        std::fs::set_permissions(&quoted, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c2 = c.clone();
        let Distributor::Bgp(b2) = &mut c2.distributor else {
            unreachable!()
        };
        b2.peers[2].password_file = Some(quoted);
        let e = c2.check_secrets().unwrap_err().to_string();
        assert!(e.contains("distributor.peers[2].password_file"), "{e}");
        // What BIRD would refuse is refused at load.
        let e = |t: String| ControlConfig::parse(&t, p).unwrap_err().to_string();
        let bgp = "[auth]\nmode = \"noauth\"\n[distributor]\ndriver = \"bgp\"\n";
        assert!(e(format!(
            "{bgp}local_as = 0\npeers = [{{ address = \"198.18.1.1\", asn = 1 }}]\n"
        ))
        .contains("AS number"));
        assert!(e(format!("{bgp}local_as = 64513\npeers = []\n")).contains("peers"));
        assert!(e(format!("{bgp}local_as = 64513\nhold_time_s = 1\npeers = [{{ address = \"198.18.1.1\", asn = 1 }}]\n")).contains("hold_time_s"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn problems_name_the_field() {
        let p = Path::new("c.toml");
        let e = |t: &str| {
            ControlConfig::parse(t, p)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(e("[auth]\nmode = \"token\"\n").contains("auth"));
        assert!(e("listen = \"nope\"\n").contains("listen"));
        let dup = "[auth]\nmode = \"noauth\"\n[[amphorae]]\nid = \"a\"\naddress = \"192.0.2.1\"\n[[amphorae]]\nid = \"a\"\naddress = \"192.0.2.2\"\n";
        assert!(e(dup).contains("amphorae[1].id"), "{}", e(dup));
        let gw = "[auth]\nmode = \"noauth\"\n[[vip_subnets]]\nid = \"s\"\nnetwork_id = \"n\"\ncidr = \"198.18.0.0/24\"\ngateway_ip = \"198.19.0.1\"\n";
        assert!(e(gw).contains("gateway_ip"));
        let na = "[auth]\nmode = \"noauth\"\n";
        assert!(e(&format!("{na}[distributor]\ndriver = \"bgp\"\n")).contains("local_as"));
        assert!(e(&format!("{na}[distributor]\ndriver = \"bgp-ecmp\"\n")).contains("bgp-ecmp"));
        assert!(e(&format!("{na}[distributor]\ndriver = \"linux-ecmp\"\n")).contains("interface"));
        let bad_if = format!("{na}[distributor]\ndriver = \"linux-ecmp\"\ninterface = \"a/b\"\n");
        assert!(
            e(&bad_if).contains("distributor.interface"),
            "{}",
            e(&bad_if)
        );
        let ok = format!("{na}[distributor]\ndriver = \"linux-ecmp\"\ninterface = \"eth1\"\nnetns = \"/run/netns/r\"\n");
        let c = ControlConfig::parse(&ok, p).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            c.distributor,
            Distributor::LinuxEcmp(LinuxEcmp {
                buckets: 128,
                idle_timer_s: 120,
                idle_margin_s: 5,
                ..
            })
        ));
    }
}
