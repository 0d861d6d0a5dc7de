//! The immutable runtime form of a config: what workers read on the hot
//! path. Built off the workers (validation, address parsing, Maglev tables)
//! and published whole; connections keep the `Arc`s of the generation they
//! started in, so a reload never changes an established connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::balance::{Balancer, Candidate};
use crate::config::{
    Config, LbAlgorithm, ListenerProtocol, ParsedListener, Pool, PoolProtocol, Valid,
};
use crate::stats::{ListenerStats, MemberStats, Registry};

#[derive(Debug)]
pub struct MemberRt {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub stats: Arc<MemberStats>,
}

#[derive(Debug)]
pub struct PoolRt {
    pub id: String,
    /// Position in [`Snapshot::pools`]: the index of per-worker pool state.
    pub index: usize,
    pub protocol: PoolProtocol,
    pub members: Vec<MemberRt>,
    /// Built with the health state at build time; the workers keep the
    /// health thread's later rebuilds ([`crate::live`]).
    pub balancer: Arc<Balancer>,
}

impl PoolRt {
    pub fn algorithm(&self) -> LbAlgorithm {
        self.balancer.algorithm()
    }
}

#[derive(Debug)]
pub struct ListenerRt {
    pub id: String,
    /// `None` = unlimited.
    pub connection_limit: Option<u64>,
    /// `None` = no timeout (a configured 0).
    pub timeout_client_data: Option<Duration>,
    pub timeout_member_connect: Option<Duration>,
    pub timeout_member_data: Option<Duration>,
    pub connect_retries: u32,
    /// UDP: flows kept at once across workers.
    pub max_flows: usize,
    /// Empty = everyone.
    pub allowed: Vec<IpNet>,
    pub pool: Option<Arc<PoolRt>>,
    pub stats: Arc<ListenerStats>,
}

impl ListenerRt {
    /// Whether a client address may connect.
    pub fn admits(&self, client: std::net::IpAddr) -> bool {
        if self.allowed.is_empty() {
            return true;
        }
        // An IPv4 client reaching an IPv6 socket arrives IPv4-mapped.
        let client = match client {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(client),
            v4 => v4,
        };
        self.allowed.iter().any(|n| n.contains(&client))
    }
}

/// A socket the dataplane listens on: a TCP and a UDP listener may share
/// an address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub udp: bool,
    pub addr: SocketAddr,
}

impl Endpoint {
    pub fn tcp(addr: SocketAddr) -> Endpoint {
        Endpoint { udp: false, addr }
    }
    pub fn udp(addr: SocketAddr) -> Endpoint {
        Endpoint { udp: true, addr }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.udp { "udp" } else { "tcp" };
        write!(f, "{proto}/{}", self.addr)
    }
}

/// One generation of the running configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// Enabled listeners only.
    pub listeners: Vec<Arc<ListenerRt>>,
    pub pools: Vec<Arc<PoolRt>>,
    /// Which listener owns each bound TCP socket address.
    pub tcp_by_addr: HashMap<SocketAddr, Arc<ListenerRt>>,
    /// Which listener owns each bound UDP socket address.
    pub udp_by_addr: HashMap<SocketAddr, Arc<ListenerRt>>,
}

/// The balancer of `pool` (its runtime `members`, in the config's
/// order) for the members `up(pool, member)` says are healthy (admin-down
/// members are never used).
pub fn balancer(pool: &Pool, members: &[MemberRt], up: &dyn Fn(&str, &str) -> bool) -> Balancer {
    let cands: Vec<Candidate> = pool
        .members
        .iter()
        .zip(members)
        .map(|(m, rt)| Candidate {
            id: m.id.clone(),
            weight: rt.weight,
            backup: m.backup,
            usable: m.admin_state_up && up(&pool.id, &m.id),
        })
        .collect();
    Balancer::new(&cands, pool.lb_algorithm, pool.maglev_table_size)
}

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

impl Snapshot {
    /// The generation before any config: nothing listens.
    pub fn empty() -> Snapshot {
        Snapshot {
            config: Arc::new(Config {
                generation: 0,
                listeners: Vec::new(),
                pools: Vec::new(),
            }),
            listeners: Vec::new(),
            pools: Vec::new(),
            tcp_by_addr: HashMap::new(),
            udp_by_addr: HashMap::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.config.generation
    }

    /// The socket addresses this generation listens on.
    pub fn endpoints(&self) -> impl Iterator<Item = (Endpoint, &Arc<ListenerRt>)> {
        let tcp = self.tcp_by_addr.iter().map(|(a, l)| (Endpoint::tcp(*a), l));
        let udp = self.udp_by_addr.iter().map(|(a, l)| (Endpoint::udp(*a), l));
        tcp.chain(udp)
    }

    /// Builds the runtime form of a validated config from what validation
    /// parsed, taking counters from `registry` so they carry over for
    /// objects that stay. `up(pool, member)` is the member's health.
    pub fn build(
        valid: Valid,
        registry: &mut Registry,
        up: &dyn Fn(&str, &str) -> bool,
    ) -> Snapshot {
        let (config, parsed) = valid.into_parts();
        let mut pools = Vec::with_capacity(config.pools.len());
        let mut pool_by_id = HashMap::new();
        for (index, (p, parsed)) in config.pools.iter().zip(&parsed.pools).enumerate() {
            let members: Vec<MemberRt> = p
                .members
                .iter()
                .zip(&parsed.members)
                .map(|(m, pm)| MemberRt {
                    id: m.id.clone(),
                    addr: pm.addr,
                    weight: pm.weight,
                    stats: registry.member(&p.id, &m.id),
                })
                .collect();
            let balancer = Arc::new(balancer(p, &members, up));
            let pool = Arc::new(PoolRt {
                id: p.id.clone(),
                index,
                protocol: p.protocol,
                members,
                balancer,
            });
            pool_by_id.insert(p.id.clone(), pool.clone());
            pools.push(pool);
        }

        let mut listeners = Vec::new();
        let mut tcp_by_addr = HashMap::new();
        let mut udp_by_addr = HashMap::new();
        let enabled = config.listeners.iter().zip(parsed.listeners);
        for (l, parsed) in enabled.filter(|(l, _)| l.admin_state_up) {
            let ParsedListener { addrs, allowed } = parsed;
            let rt = Arc::new(ListenerRt {
                id: l.id.clone(),
                connection_limit: u64::try_from(l.connection_limit).ok(),
                timeout_client_data: ms(l.timeout_client_data),
                timeout_member_connect: ms(l.timeout_member_connect),
                timeout_member_data: ms(l.timeout_member_data),
                connect_retries: l.connect_retries,
                max_flows: usize::try_from(l.max_flows).unwrap_or(usize::MAX),
                allowed,
                pool: l
                    .default_pool_id
                    .as_ref()
                    .and_then(|p| pool_by_id.get(p).cloned()),
                stats: registry.listener(&l.id),
            });
            let by_addr = match l.protocol {
                ListenerProtocol::Tcp => &mut tcp_by_addr,
                ListenerProtocol::Udp => &mut udp_by_addr,
            };
            for a in addrs {
                by_addr.insert(a, rt.clone());
            }
            listeners.push(rt);
        }
        Snapshot {
            config: Arc::new(config),
            listeners,
            pools,
            tcp_by_addr,
            udp_by_addr,
        }
    }
}
