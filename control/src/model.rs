//! The controller's objects, in Octavia's v2 vocabulary. Each is stored as
//! its own JSON document (see [`crate::store`]); what the API shows is built
//! from it by [`crate::api::view`].

use std::collections::{BTreeMap, BTreeSet};

// hashbrown's default hasher (foldhash, seeded per process) costs a fraction of
// SipHash on the 36-byte ids every relationship lookup hashes.
use hashbrown::HashMap;

use serde::{Deserialize, Serialize};
pub use siphon_proto::config::model::{
    HttpMethod, LbAlgorithm, ListenerProtocol, MonitorType, PoolProtocol,
};
pub use siphon_proto::keys::PushedKey;

/// Octavia's `provisioning_status` (lifecycle of a change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProvisioningStatus {
    Active,
    PendingCreate,
    PendingUpdate,
    PendingDelete,
    Error,
}

impl ProvisioningStatus {
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            Self::PendingCreate | Self::PendingUpdate | Self::PendingDelete
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::PendingCreate => "PENDING_CREATE",
            Self::PendingUpdate => "PENDING_UPDATE",
            Self::PendingDelete => "PENDING_DELETE",
            Self::Error => "ERROR",
        }
    }
}

pub use siphon_proto::OperatingStatus;

/// Fields every API object has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Common {
    pub id: String,
    pub name: String,
    pub description: String,
    pub project_id: String,
    pub admin_state_up: bool,
    pub provisioning_status: ProvisioningStatus,
    pub operating_status: OperatingStatus,
    pub tags: Vec<String>,
    pub created_at: String,
    pub updated_at: Option<String>,
    /// Siphon extension: why the object is in `ERROR`, when it is.
    #[serde(default)]
    pub provisioning_error: Option<String>,
    /// Whether some push carrying this object succeeded: an object whose
    /// later change failed is still on the amphorae and stays in what is
    /// rendered; one whose creation failed is not.
    #[serde(default)]
    pub deployed: bool,
    /// Siphon extension: when the controller next retries what left this
    /// object in `ERROR` (UTC, Octavia's format); `None` when nothing is
    /// scheduled.
    #[serde(default)]
    pub next_attempt_at: Option<String>,
}

siphon_proto::words! {
    /// How many amphorae carry a load balancer, and how.
    pub enum Topology {
        /// One amphora; a spare takes over when it fails.
        Single = "SINGLE",
        /// N amphorae with identical configs behind a distributor.
        ActiveActive = "ACTIVE_ACTIVE",
    }
}

siphon_proto::words! {
    /// Session persistence types this provider honours (Octavia also has
    /// `HTTP_COOKIE` and `APP_COOKIE`, which an L4 balancer cannot).
    pub enum PersistenceType {
        SourceIp = "SOURCE_IP",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    #[serde(flatten)]
    pub common: Common,
    pub vip_address: String,
    pub vip_subnet_id: String,
    pub vip_network_id: String,
    pub vip_port_id: String,
    pub vip_qos_policy_id: Option<String>,
    pub provider: String,
    pub flavor_id: String,
    pub availability_zone: Option<String>,
    pub topology: Topology,
    pub amphora_count: u32,
    /// The distributor's id for this VIP's group of amphorae (the nexthop
    /// group id with `linux-ecmp`), given out once and kept.
    #[serde(default)]
    pub distributor_id: Option<u32>,
    /// A change of the load balancer itself that failed (a failover, a
    /// create, an update) and is retried with back-off until it succeeds
    /// or the load balancer is deleted.
    #[serde(default)]
    pub retry: Option<Retry>,
    /// VIPs beyond the first, on other subnets of its network (Octavia's
    /// `additional_vips`): a dual-stack load balancer has one of each
    /// family. Every listener binds them all.
    #[serde(default)]
    pub additional_vips: Vec<AdditionalVip>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdditionalVip {
    pub subnet_id: String,
    pub ip_address: String,
}

impl LoadBalancer {
    /// Every VIP address: the first, then the additional ones.
    pub fn vips(&self) -> Vec<String> {
        std::iter::once(self.vip_address.clone())
            .chain(self.additional_vips.iter().map(|v| v.ip_address.clone()))
            .collect()
    }
}

/// A failed change waiting for its next attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// What the load balancer goes back to for the attempt.
    pub status: ProvisioningStatus,
    /// Attempts that failed in a row.
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    #[serde(flatten)]
    pub common: Common,
    pub load_balancer_id: String,
    pub protocol: ListenerProtocol,
    pub protocol_port: u16,
    pub connection_limit: i64,
    pub default_pool_id: Option<String>,
    pub timeout_client_data: i64,
    pub timeout_member_connect: i64,
    pub timeout_member_data: i64,
    pub timeout_tcp_inspect: i64,
    pub allowed_cidrs: Vec<String>,
}

/// Octavia's listener timeout range (ms): 0 to 24 days.
pub const MAX_TIMEOUT_MS: i64 = 24 * 24 * 60 * 60 * 1000;

impl Listener {
    /// The longest (ms) a connection of this listener stays open while
    /// idle before the dataplane closes it; `None` when a data timeout is
    /// 0 (never).
    pub fn idle_bound_ms(&self) -> Option<u64> {
        let client = u64::try_from(self.timeout_client_data).ok()?;
        let member = u64::try_from(self.timeout_member_data).ok()?;
        (client > 0 && member > 0).then_some(client.max(member))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPersistence {
    #[serde(rename = "type")]
    pub kind: PersistenceType,
    #[serde(default)]
    pub cookie_name: Option<String>,
    #[serde(default)]
    pub persistence_timeout: Option<i64>,
    #[serde(default)]
    pub persistence_granularity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    #[serde(flatten)]
    pub common: Common,
    pub load_balancer_id: String,
    pub protocol: PoolProtocol,
    pub lb_algorithm: LbAlgorithm,
    pub session_persistence: Option<SessionPersistence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(flatten)]
    pub common: Common,
    pub load_balancer_id: String,
    pub pool_id: String,
    pub address: String,
    pub protocol_port: u16,
    pub weight: i64,
    pub backup: bool,
    pub subnet_id: Option<String>,
    pub monitor_address: Option<String>,
    pub monitor_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthMonitor {
    #[serde(flatten)]
    pub common: Common,
    pub load_balancer_id: String,
    pub pool_id: String,
    #[serde(rename = "type")]
    pub kind: MonitorType,
    pub delay: i64,
    pub timeout: i64,
    pub max_retries: i64,
    pub max_retries_down: i64,
    pub http_method: Option<HttpMethod>,
    pub url_path: Option<String>,
    pub expected_codes: Option<String>,
    pub http_version: Option<f64>,
    pub domain_name: Option<String>,
}

/// Amphora `status`, as Octavia spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AmphoraStatus {
    /// Registered, never heard from.
    Booting,
    /// Heard from, carrying no load balancer: a spare.
    Ready,
    /// Carrying a load balancer.
    Allocated,
    /// Failed over (or unreachable); it is cleaned and returns to `READY`
    /// when it is heard from again.
    Error,
    /// Stale, but the failover circuit breaker held it back.
    FailoverStopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amphora {
    pub id: String,
    pub load_balancer_id: Option<String>,
    pub status: AmphoraStatus,
    /// Management address of its agent (`lb_network_ip` in Octavia).
    pub lb_network_ip: String,
    pub agent_port: u16,
    /// Name its agent certificate carries (Octavia: the amphora id).
    pub server_name: String,
    /// PEM CA its agent certificate must chain to; the controller's
    /// `agent_tls.ca` when absent.
    pub ca_certificate: Option<String>,
    /// Where the agent plumbs VIP addresses.
    pub vip_interface: String,
    /// Last dataplane config generation pushed to it.
    pub generation: u64,
    /// VIP addresses this controller plumbed on it.
    pub vips: Vec<String>,
    pub created_at: String,
    pub updated_at: Option<String>,
    /// Siphon extension: the last problem talking to it.
    #[serde(default)]
    pub error: Option<String>,
    /// When its last verified heartbeat was stored (UTC, Octavia's format).
    #[serde(default)]
    pub last_heartbeat: Option<String>,
    /// Its address on the VIP network, where a distributor sends VIP
    /// traffic (Octavia's `vrrp_ip`); `lb_network_ip` when absent.
    #[serde(default)]
    pub vrrp_ip: Option<String>,
    /// The distributor's id for it (its nexthop id with `linux-ecmp`),
    /// given out once and kept.
    #[serde(default)]
    pub distributor_id: Option<u32>,
    /// Siphon extension: when the controller next tries to bring it in
    /// line (re-push) after `error` (UTC, Octavia's format).
    #[serde(default)]
    pub next_attempt_at: Option<String>,
    /// Its own heartbeat key, pushed to its agent over mutual TLS: no
    /// other amphora can sign for it.
    #[serde(default)]
    pub heartbeat_key: Option<PushedKey>,
    /// The key before the last rotation, still taken until
    /// `previous_key_valid_until` so a rotation drops no heartbeat.
    #[serde(default)]
    pub previous_heartbeat_key: Option<PushedKey>,
    #[serde(default)]
    pub previous_key_valid_until: Option<String>,
    /// Keys retired before `previous_heartbeat_key` and still in their
    /// grace window, oldest first (at most [`MAX_OLDER_KEYS`]): rotated
    /// again before its agent took the last key, it still signs with one
    /// of these.
    #[serde(default)]
    pub older_heartbeat_keys: Vec<RetiredKey>,
    /// Its agent is known to hold `heartbeat_key` (it took the push, or
    /// signed with it); from then on the fleet's bootstrap key does not
    /// speak for it.
    #[serde(default)]
    pub heartbeat_key_acked: bool,
    /// Its agent held a key of its own before the last rotation: the
    /// bootstrap key does not speak for it while it takes the new one.
    #[serde(default)]
    pub own_key_held: bool,
    /// The last heartbeat sequence number taken from it: what replay
    /// protection starts from after a controller restart.
    #[serde(default)]
    pub heartbeat_seq: u64,
}

/// Most keys kept in `Amphora::older_heartbeat_keys`.
pub const MAX_OLDER_KEYS: usize = 8;

/// A heartbeat key taken out of use by a rotation, still taken until
/// `valid_until` (UTC, Octavia's format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredKey {
    pub key: PushedKey,
    pub valid_until: String,
}

impl Amphora {
    /// Whether the fleet's bootstrap key is refused for it: its agent
    /// holds (or held, before a rotation) a key of its own.
    pub fn bootstrap_refused(&self) -> bool {
        self.heartbeat_key_acked || self.own_key_held
    }

    /// Where a distributor sends its VIP traffic.
    pub fn data_address(&self) -> Option<std::net::IpAddr> {
        self.vrrp_ip
            .as_deref()
            .unwrap_or(&self.lb_network_ip)
            .parse()
            .ok()
    }
}

/// Traffic counters of one listener on one amphora, accumulated from
/// heartbeats across dataplane restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub active_connections: u64,
    pub total_connections: u64,
    pub request_errors: u64,
}

impl Counters {
    /// Adds `o` (saturating: counters come from heartbeats, which a
    /// broken or hostile agent could fill with anything).
    pub fn add(&mut self, o: &Counters) {
        self.bytes_in = self.bytes_in.saturating_add(o.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(o.bytes_out);
        self.active_connections = self.active_connections.saturating_add(o.active_connections);
        self.total_connections = self.total_connections.saturating_add(o.total_connections);
        self.request_errors = self.request_errors.saturating_add(o.request_errors);
    }
}

/// What a [`Table`] indexes an object by.
pub trait Row {
    /// Whether the object has a `name` (an amphora has none).
    const NAMED: bool = true;
    fn id(&self) -> &str;
    fn created_at(&self) -> &str;
    fn name(&self) -> &str {
        ""
    }
    /// The load balancer it belongs to (an amphora: the one it carries).
    fn load_balancer(&self) -> Option<&str> {
        None
    }
    /// The pool it belongs to (a member, a health monitor) or, for a
    /// listener, its default pool.
    fn pool(&self) -> Option<&str> {
        None
    }
    /// The addresses it holds (a load balancer: its VIPs).
    fn addresses(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
    }
}

/// The secondary indexes of a [`Table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Name,
    LoadBalancer,
    Pool,
}

/// Key → ids of the objects with that key.
type Postings = HashMap<String, BTreeSet<String>>;

/// One kind of object by id, with the indexes that lists and relationship
/// lookups go through, so that they cost what they return rather than
/// what the store holds. Read it as the `BTreeMap` it derefs to; it
/// changes only through [`Table::insert`] and [`Table::remove`], which
/// keep every index in step (so nothing can update the map and forget an
/// index).
#[derive(Debug, Clone)]
pub struct Table<T> {
    rows: BTreeMap<String, T>,
    /// (created_at, id): Octavia's default list order.
    created: BTreeSet<(String, String)>,
    by_name: Postings,
    by_lb: Postings,
    by_pool: Postings,
    /// Address → ids of the objects holding it (a VIP is taken or not
    /// without a scan of every load balancer).
    by_address: HashMap<std::net::IpAddr, BTreeSet<String>>,
}

impl<T> Default for Table<T> {
    fn default() -> Table<T> {
        Table {
            rows: BTreeMap::new(),
            created: BTreeSet::new(),
            by_name: HashMap::new(),
            by_lb: HashMap::new(),
            by_pool: HashMap::new(),
            by_address: HashMap::new(),
        }
    }
}

impl<T> std::ops::Deref for Table<T> {
    type Target = BTreeMap<String, T>;

    fn deref(&self) -> &BTreeMap<String, T> {
        &self.rows
    }
}

impl<'a, T> IntoIterator for &'a Table<T> {
    type Item = (&'a String, &'a T);
    type IntoIter = std::collections::btree_map::Iter<'a, String, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.rows.iter()
    }
}

fn link(p: &mut Postings, key: Option<&str>, id: &str) {
    if let Some(k) = key {
        p.entry(k.to_owned()).or_default().insert(id.to_owned());
    }
}

fn unlink(p: &mut Postings, key: Option<&str>, id: &str) {
    if let Some(k) = key {
        if let Some(ids) = p.get_mut(k) {
            ids.remove(id);
            if ids.is_empty() {
                p.remove(k);
            }
        }
    }
}

impl<T: Row> Table<T> {
    /// Adds or replaces the object with `v`'s id; the one replaced.
    pub fn insert(&mut self, v: T) -> Option<T> {
        let id = v.id().to_owned();
        let old = self.remove(&id);
        self.created.insert((v.created_at().to_owned(), id.clone()));
        if T::NAMED {
            link(&mut self.by_name, Some(v.name()), &id);
        }
        link(&mut self.by_lb, v.load_balancer(), &id);
        link(&mut self.by_pool, v.pool(), &id);
        for a in v.addresses() {
            self.by_address.entry(a).or_default().insert(id.clone());
        }
        self.rows.insert(id, v);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<T> {
        let old = self.rows.remove(id)?;
        self.created
            .remove(&(old.created_at().to_owned(), id.to_owned()));
        if T::NAMED {
            unlink(&mut self.by_name, Some(old.name()), id);
        }
        unlink(&mut self.by_lb, old.load_balancer(), id);
        unlink(&mut self.by_pool, old.pool(), id);
        for a in old.addresses() {
            if let Some(ids) = self.by_address.get_mut(&a) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_address.remove(&a);
                }
            }
        }
        Some(old)
    }

    /// Every (created_at, id), in order: Octavia's default list order.
    pub fn by_created(&self) -> &BTreeSet<(String, String)> {
        &self.created
    }

    /// The ids an index holds under `key`.
    pub fn ids(&self, by: By, key: &str) -> Option<&BTreeSet<String>> {
        match by {
            By::Name => &self.by_name,
            By::LoadBalancer => &self.by_lb,
            By::Pool => &self.by_pool,
        }
        .get(key)
    }

    /// Whether an object holds address `a`.
    pub fn holds_address(&self, a: &std::net::IpAddr) -> bool {
        self.by_address.contains_key(a)
    }

    /// The objects an index holds under `key`, by id.
    pub fn with<'a>(&'a self, by: By, key: &str) -> impl Iterator<Item = &'a T> + 'a {
        self.ids(by, key)
            .into_iter()
            .flatten()
            .filter_map(move |id| self.rows.get(id))
    }
}

macro_rules! row {
    ($t:ty, |$s:ident| lb: $lb:expr, pool: $pool:expr) => {
        row!($t, |$s| lb: $lb, pool: $pool, addresses: Vec::new());
    };
    ($t:ty, |$s:ident| lb: $lb:expr, pool: $pool:expr, addresses: $addresses:expr) => {
        impl Row for $t {
            fn id(&self) -> &str {
                &self.common.id
            }
            fn created_at(&self) -> &str {
                &self.common.created_at
            }
            fn name(&self) -> &str {
                &self.common.name
            }
            #[allow(unused_variables)]
            fn load_balancer(&self) -> Option<&str> {
                let $s = self;
                $lb
            }
            #[allow(unused_variables)]
            fn pool(&self) -> Option<&str> {
                let $s = self;
                $pool
            }
            #[allow(unused_variables)]
            fn addresses(&self) -> Vec<std::net::IpAddr> {
                let $s = self;
                $addresses
            }
        }
    };
}

row!(LoadBalancer, |l| lb: None, pool: None, addresses: l.vips().iter().filter_map(|a| a.parse().ok()).collect());
row!(Listener, |l| lb: Some(l.load_balancer_id.as_str()), pool: l.default_pool_id.as_deref());
row!(Pool, |p| lb: Some(p.load_balancer_id.as_str()), pool: None);
row!(Member, |m| lb: Some(m.load_balancer_id.as_str()), pool: Some(m.pool_id.as_str()));
row!(HealthMonitor, |h| lb: Some(h.load_balancer_id.as_str()), pool: Some(h.pool_id.as_str()));

impl Row for Amphora {
    const NAMED: bool = false;
    fn id(&self) -> &str {
        &self.id
    }
    fn created_at(&self) -> &str {
        &self.created_at
    }
    fn load_balancer(&self) -> Option<&str> {
        self.load_balancer_id.as_deref()
    }
}

/// Everything the controller knows, as loaded from the store.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub load_balancers: Table<LoadBalancer>,
    pub listeners: Table<Listener>,
    pub pools: Table<Pool>,
    pub members: Table<Member>,
    pub health_monitors: Table<HealthMonitor>,
    pub amphorae: Table<Amphora>,
    /// (listener id, amphora id) → counters.
    pub stats: BTreeMap<(String, String), Counters>,
}

impl State {
    pub fn listeners_of<'a>(&'a self, lb: &str) -> impl Iterator<Item = &'a Listener> + 'a {
        self.listeners.with(By::LoadBalancer, lb)
    }

    pub fn pools_of<'a>(&'a self, lb: &str) -> impl Iterator<Item = &'a Pool> + 'a {
        self.pools.with(By::LoadBalancer, lb)
    }

    pub fn members_of<'a>(&'a self, pool: &str) -> impl Iterator<Item = &'a Member> + 'a {
        self.members.with(By::Pool, pool)
    }

    pub fn monitor_of(&self, pool: &str) -> Option<&HealthMonitor> {
        self.health_monitors.with(By::Pool, pool).next()
    }

    pub fn amphorae_of<'a>(&'a self, lb: &str) -> impl Iterator<Item = &'a Amphora> + 'a {
        self.amphorae.with(By::LoadBalancer, lb)
    }

    /// Listeners whose `default_pool_id` is `pool`.
    pub fn listeners_using<'a>(&'a self, pool: &str) -> impl Iterator<Item = &'a Listener> + 'a {
        self.listeners.with(By::Pool, pool)
    }

    /// A copy of one load balancer and everything under it.
    pub fn subset(&self, lb: &str) -> State {
        let mut s = State::default();
        if let Some(v) = self.load_balancers.get(lb) {
            s.load_balancers.insert(v.clone());
        }
        for v in self.listeners_of(lb) {
            s.listeners.insert(v.clone());
        }
        for v in self.pools_of(lb) {
            s.pools.insert(v.clone());
        }
        for v in self.members.with(By::LoadBalancer, lb) {
            s.members.insert(v.clone());
        }
        for v in self.health_monitors.with(By::LoadBalancer, lb) {
            s.health_monitors.insert(v.clone());
        }
        s
    }

    /// Summed counters of one listener over its amphorae.
    pub fn listener_counters(&self, listener: &str) -> Counters {
        let mut c = Counters::default();
        for (_, v) in self.stats_of(listener) {
            c.add(v);
        }
        c
    }

    /// The counters of one listener, per amphora.
    pub fn stats_of<'a>(
        &'a self,
        listener: &'a str,
    ) -> impl Iterator<Item = (&'a (String, String), &'a Counters)> + 'a {
        self.stats
            .range((listener.to_owned(), String::new())..)
            .take_while(move |((l, _), _)| l == listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(id: &str, lb: &str, pool: Option<&str>) -> Listener {
        Listener {
            common: Common {
                id: id.into(),
                name: format!("name-{id}"),
                description: String::new(),
                project_id: String::new(),
                admin_state_up: true,
                provisioning_status: ProvisioningStatus::Active,
                operating_status: OperatingStatus::Online,
                tags: vec![],
                created_at: "2026-01-01T00:00:00".into(),
                updated_at: None,
                provisioning_error: None,
                deployed: true,
                next_attempt_at: None,
            },
            load_balancer_id: lb.into(),
            protocol: ListenerProtocol::Tcp,
            protocol_port: 80,
            connection_limit: -1,
            default_pool_id: pool.map(Into::into),
            timeout_client_data: 0,
            timeout_member_connect: 0,
            timeout_member_data: 0,
            timeout_tcp_inspect: 0,
            allowed_cidrs: vec![],
        }
    }

    fn ids<'a>(it: impl Iterator<Item = &'a Listener>) -> Vec<&'a str> {
        it.map(|l| l.common.id.as_str()).collect()
    }

    #[test]
    fn indexes_follow_replacements_and_removals() {
        let mut s = State::default();
        s.listeners.insert(listener("l1", "lb1", Some("p1")));
        s.listeners.insert(listener("l2", "lb1", None));
        s.listeners.insert(listener("l3", "lb2", Some("p1")));
        assert_eq!(ids(s.listeners_of("lb1")), ["l1", "l2"]);
        assert_eq!(ids(s.listeners_using("p1")), ["l1", "l3"]);
        // l1 changes its default pool and is renamed; l3 goes.
        let mut l1 = listener("l1", "lb1", Some("p2"));
        l1.common.name = "renamed".into();
        s.listeners.insert(l1);
        s.listeners.remove("l3");
        assert_eq!(ids(s.listeners_using("p1")), Vec::<&str>::new());
        assert_eq!(ids(s.listeners_using("p2")), ["l1"]);
        assert_eq!(ids(s.listeners.with(By::Name, "renamed")), ["l1"]);
        assert_eq!(s.listeners.ids(By::Name, "name-l1"), None);
        assert_eq!(ids(s.listeners_of("lb2")), Vec::<&str>::new());
        assert_eq!(s.listeners.ids(By::LoadBalancer, "lb2"), None);
        assert_eq!(s.listeners.by_created().len(), 2);
        // A subset carries its indexes.
        let sub = s.subset("lb1");
        assert_eq!(ids(sub.listeners_of("lb1")), ["l1", "l2"]);
        assert_eq!(ids(sub.listeners_using("p2")), ["l1"]);
    }
}
