//! Validation of a [`Config`]: every problem is reported with the object
//! (listener, pool, member, health monitor) and the field it is in, and a
//! config with any problem is rejected whole.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use thiserror::Error;

use super::model::{
    Config, HealthMonitor, Listener, ListenerProtocol, Member, MonitorType, Pool, PoolProtocol,
};

/// Octavia's upper bound for listener timeouts: 24 h in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// Octavia's member weight range is 0..=256.
pub const MAX_WEIGHT: i64 = 256;
/// Member indexes in Maglev tables are `u16`.
pub const MAX_MEMBERS_PER_POOL: usize = u16::MAX as usize;
/// Largest accepted Maglev table: the prime 2^17 - 1, twice the default.
/// A build costs up to `size × min(members, 256)` steps (weights 1..=256
/// take turns), and it runs under the control lock on every apply and
/// health change of the pool: at this size the worst case (65,535
/// members, one of weight 256, the rest 1) takes ~35 ms, against ~2 s at
/// Envoy's 5,000,011. Evenness needs about 100 slots per member, so pools
/// of up to ~1,300 members get it in full.
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 131_071;
pub const MAX_CONNECT_RETRIES: u32 = 100;
/// Upper bound of `max_flows`: each flow holds a socket, and no process has
/// more descriptors than this.
pub const MAX_FLOWS: u32 = 1 << 24;

/// The object a problem was found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Config,
    Listener(String),
    Pool(String),
    Member { pool: String, member: String },
    HealthMonitor { pool: String },
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Config => write!(f, "config"),
            Object::Listener(id) => write!(f, "listener {id:?}"),
            Object::Pool(id) => write!(f, "pool {id:?}"),
            Object::Member { pool, member } => write!(f, "pool {pool:?} member {member:?}"),
            Object::HealthMonitor { pool } => write!(f, "pool {pool:?} healthmonitor"),
        }
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    #[error("must not be empty")]
    Empty,
    #[error("duplicate id {0:?}")]
    DuplicateId(String),
    #[error("{0} is used twice")]
    Duplicate(String),
    #[error("unknown pool {0:?}")]
    UnknownPool(String),
    #[error("{value} is out of range {min}..={max}")]
    OutOfRange { value: i64, min: i64, max: i64 },
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    InvalidAddress(String),
    #[error("{address} is an IPv4-mapped IPv6 address, which a listener cannot bind (its IPv6 sockets are v6-only): write {v4}")]
    Ipv4Mapped { address: String, v4: Ipv4Addr },
    #[error("{address} is {what}, not the address of one host")]
    NotAHost { address: String, what: &'static str },
    #[error("{0:?} is not a CIDR (such as 192.0.2.0/24 or 2001:db8::/32)")]
    InvalidCidr(String),
    #[error("a {listener:?} listener cannot use a {pool:?} pool")]
    ProtocolMismatch {
        listener: ListenerProtocol,
        pool: PoolProtocol,
    },
    #[error("a {pool:?} pool cannot use a {monitor:?} health monitor")]
    MonitorMismatch {
        pool: PoolProtocol,
        monitor: MonitorType,
    },
    #[error("{0} is not a prime number")]
    NotPrime(u32),
    #[error("{size} is too small for {members} members")]
    TableTooSmall { size: u32, members: usize },
    #[error("only valid for HTTP and HTTPS health monitors")]
    HttpOnly,
    #[error("{0:?} is not a request path: it must start with '/' and hold no spaces or control characters")]
    BadPath(String),
    #[error("{0:?} is not a list of HTTP codes such as 200, 200,202 or 200-204")]
    BadCodes(String),
}

/// One problem in one field of one object.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{object}: {field}: {problem}")]
pub struct ConfigError {
    pub object: Object,
    pub field: &'static str,
    pub problem: Problem,
}

/// Every problem found in a config (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid config ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems while walking the config.
struct Checker {
    errors: Vec<ConfigError>,
}

impl Checker {
    fn push(&mut self, object: &Object, field: &'static str, problem: Problem) {
        self.errors.push(ConfigError {
            object: object.clone(),
            field,
            problem,
        });
    }

    fn range(&mut self, object: &Object, field: &'static str, value: i64, min: i64, max: i64) {
        if value < min || value > max {
            self.push(object, field, Problem::OutOfRange { value, min, max });
        }
    }

    fn id(&mut self, object: &Object, id: &str, seen: &mut HashSet<String>) {
        if id.is_empty() {
            self.push(object, "id", Problem::Empty);
        } else if !seen.insert(id.to_owned()) {
            self.push(object, "id", Problem::DuplicateId(id.to_owned()));
        }
    }
}

/// Parses an address field, naming the object and field on failure.
pub fn parse_ip(object: &Object, field: &'static str, text: &str) -> Result<IpAddr, ConfigError> {
    text.trim().parse().map_err(|_| ConfigError {
        object: object.clone(),
        field,
        problem: Problem::InvalidAddress(text.to_owned()),
    })
}

/// Parses a CIDR field; a bare address means that one host.
pub fn parse_cidr(object: &Object, text: &str) -> Result<IpNet, ConfigError> {
    let text_t = text.trim();
    text_t
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| text_t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ConfigError {
            object: object.clone(),
            field: "allowed_cidrs",
            problem: Problem::InvalidCidr(text.to_owned()),
        })
}

/// Parses Octavia's `expected_codes` (`200`, `200,202`, `200-204`) into
/// inclusive ranges.
pub fn parse_expected_codes(text: &str) -> Option<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?),
            None => {
                let c = part.parse::<u16>().ok()?;
                (c, c)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return None;
        }
        out.push((lo, hi));
    }
    Some(out)
}

/// The IPv4 address inside an IPv4-mapped IPv6 one (`::ffff:a.b.c.d`).
fn mapped(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

/// Why `ip` is not the address of one host, if it is not: connecting to
/// the unspecified address reaches this very host (the dataplane would
/// proxy to itself), and group or broadcast addresses are no one member.
fn not_a_host(ip: IpAddr) -> Option<&'static str> {
    let ip = mapped(ip).map_or(ip, IpAddr::V4);
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// What validation parsed, in the config's order: what runs the config
/// takes addresses, ports and weights from here and parses nothing again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub listeners: Vec<ParsedListener>,
    pub pools: Vec<ParsedPool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedPool {
    pub members: Vec<ParsedMember>,
    /// The monitor's accepted status ranges (HTTP and HTTPS checks).
    pub expected_codes: Option<Vec<(u16, u16)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedListener {
    /// Each bind address with the listener's port.
    pub addrs: Vec<SocketAddr>,
    pub allowed: Vec<IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedMember {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Where its health check goes: `monitor_address` and `monitor_port`,
    /// each defaulting to the member's own.
    pub monitor: SocketAddr,
}

/// A config that passed validation, with what validation parsed of it:
/// the only way to get one is [`Config::into_valid`].
#[derive(Debug, Clone)]
pub struct Valid {
    config: Config,
    parsed: Parsed,
}

impl Valid {
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn parsed(&self) -> &Parsed {
        &self.parsed
    }

    pub fn into_parts(self) -> (Config, Parsed) {
        (self.config, self.parsed)
    }
}

impl Config {
    /// Checks the whole document (every problem at once; on error nothing
    /// should be applied) and returns what it parsed.
    pub fn validate(&self) -> Result<Parsed, ConfigErrors> {
        let mut c = Checker { errors: Vec::new() };
        let pools: HashMap<&str, &Pool> = self.pools.iter().map(|p| (p.id.as_str(), p)).collect();

        let mut ids = HashSet::new();
        let mut sockets: HashMap<(ListenerProtocol, SocketAddr), &str> = HashMap::new();
        let listeners = self
            .listeners
            .iter()
            .map(|l| check_listener(&mut c, l, &pools, &mut ids, &mut sockets))
            .collect();
        let mut ids = HashSet::new();
        let pools = self
            .pools
            .iter()
            .map(|p| check_pool(&mut c, p, &mut ids))
            .collect();
        if c.errors.is_empty() {
            Ok(Parsed { listeners, pools })
        } else {
            Err(ConfigErrors(c.errors))
        }
    }

    /// The config with what validation parsed, or every problem.
    pub fn into_valid(self) -> Result<Valid, ConfigErrors> {
        let parsed = self.validate()?;
        Ok(Valid {
            config: self,
            parsed,
        })
    }
}

fn check_listener<'a>(
    c: &mut Checker,
    l: &'a Listener,
    pools: &HashMap<&str, &Pool>,
    ids: &mut HashSet<String>,
    sockets: &mut HashMap<(ListenerProtocol, SocketAddr), &'a str>,
) -> ParsedListener {
    let mut parsed = ParsedListener {
        addrs: Vec::with_capacity(l.bind_addresses.len()),
        allowed: Vec::with_capacity(l.allowed_cidrs.len()),
    };
    let o = Object::Listener(l.id.clone());
    c.id(&o, &l.id, ids);
    c.range(&o, "protocol_port", l.protocol_port, 1, 65535);
    c.range(
        &o,
        "connection_limit",
        l.connection_limit,
        -1,
        i64::from(u32::MAX),
    );
    for (field, v) in [
        ("timeout_client_data", l.timeout_client_data),
        ("timeout_member_connect", l.timeout_member_connect),
        ("timeout_member_data", l.timeout_member_data),
    ] {
        if v > MAX_TIMEOUT_MS {
            c.push(
                &o,
                field,
                Problem::OutOfRange {
                    value: i64::try_from(v).unwrap_or(i64::MAX),
                    min: 0,
                    max: MAX_TIMEOUT_MS as i64,
                },
            );
        }
    }
    if l.connect_retries > MAX_CONNECT_RETRIES {
        c.push(
            &o,
            "connect_retries",
            Problem::OutOfRange {
                value: i64::from(l.connect_retries),
                min: 0,
                max: i64::from(MAX_CONNECT_RETRIES),
            },
        );
    }
    c.range(
        &o,
        "max_flows",
        i64::from(l.max_flows),
        1,
        i64::from(MAX_FLOWS),
    );
    if l.bind_addresses.is_empty() {
        c.push(&o, "bind_addresses", Problem::Empty);
    }
    for a in &l.bind_addresses {
        match parse_ip(&o, "bind_addresses", a) {
            Ok(ip) => {
                // Both refused at bind time (EINVAL) by `run`; `check` must
                // say so too.
                if let Some(v4) = mapped(ip) {
                    let address = ip.to_string();
                    c.push(&o, "bind_addresses", Problem::Ipv4Mapped { address, v4 });
                    continue;
                }
                // An IPv4 group or broadcast address binds, but a listener
                // there never sees a connection or a datagram for it.
                if let Some(what) = not_a_host(ip).filter(|_| !ip.is_unspecified()) {
                    let address = ip.to_string();
                    c.push(&o, "bind_addresses", Problem::NotAHost { address, what });
                    continue;
                }
                // Out of range is reported above; only a valid port binds.
                if let Some(port) = u16::try_from(l.protocol_port).ok().filter(|p| *p != 0) {
                    let sa = SocketAddr::new(ip, port);
                    if let Some(other) = sockets.insert((l.protocol, sa), &l.id) {
                        let what = format!("{sa} (also bound by listener {other:?})");
                        c.push(&o, "bind_addresses", Problem::Duplicate(what));
                    }
                    parsed.addrs.push(sa);
                }
            }
            Err(e) => c.errors.push(e),
        }
    }
    for cidr in &l.allowed_cidrs {
        match parse_cidr(&o, cidr) {
            Ok(net) => parsed.allowed.push(net),
            Err(e) => c.errors.push(e),
        }
    }
    if let Some(pid) = &l.default_pool_id {
        match pools.get(pid.as_str()) {
            None => c.push(&o, "default_pool_id", Problem::UnknownPool(pid.clone())),
            Some(p) => {
                if p.protocol.transport() != l.protocol {
                    let problem = Problem::ProtocolMismatch {
                        listener: l.protocol,
                        pool: p.protocol,
                    };
                    c.push(&o, "default_pool_id", problem);
                }
            }
        }
    }
    parsed
}

fn check_pool(c: &mut Checker, p: &Pool, ids: &mut HashSet<String>) -> ParsedPool {
    let o = Object::Pool(p.id.clone());
    c.id(&o, &p.id, ids);
    let size = p.maglev_table_size;
    if !(3..=MAX_MAGLEV_TABLE_SIZE).contains(&size) {
        let problem = Problem::OutOfRange {
            value: i64::from(size),
            min: 3,
            max: i64::from(MAX_MAGLEV_TABLE_SIZE),
        };
        c.push(&o, "maglev_table_size", problem);
    } else if !is_prime(size) {
        c.push(&o, "maglev_table_size", Problem::NotPrime(size));
    } else if p.members.len() >= size as usize {
        let problem = Problem::TableTooSmall {
            size,
            members: p.members.len(),
        };
        c.push(&o, "maglev_table_size", problem);
    }
    if p.members.len() > MAX_MEMBERS_PER_POOL {
        let problem = Problem::OutOfRange {
            value: p.members.len() as i64,
            min: 0,
            max: MAX_MEMBERS_PER_POOL as i64,
        };
        c.push(&o, "members", problem);
    }
    let mut member_ids = HashSet::new();
    let mut endpoints = HashSet::new();
    let members = p
        .members
        .iter()
        .filter_map(|m| check_member(c, p, m, &mut member_ids, &mut endpoints))
        .collect();
    let expected_codes = p
        .healthmonitor
        .as_ref()
        .and_then(|hm| check_monitor(c, p, hm));
    ParsedPool {
        members,
        expected_codes,
    }
}

fn check_member(
    c: &mut Checker,
    p: &Pool,
    m: &Member,
    ids: &mut HashSet<String>,
    endpoints: &mut HashSet<SocketAddr>,
) -> Option<ParsedMember> {
    let o = Object::Member {
        pool: p.id.clone(),
        member: m.id.clone(),
    };
    c.id(&o, &m.id, ids);
    c.range(&o, "protocol_port", m.protocol_port, 1, 65535);
    c.range(&o, "weight", m.weight, 0, MAX_WEIGHT);
    let weight = u32::try_from(m.weight).ok();
    let mut parsed = None;
    match parse_ip(&o, "address", &m.address) {
        Ok(ip) => {
            if let Some(what) = not_a_host(ip) {
                let address = ip.to_string();
                c.push(&o, "address", Problem::NotAHost { address, what });
            }
            if let Some(port) = u16::try_from(m.protocol_port).ok().filter(|p| *p != 0) {
                let sa = SocketAddr::new(ip, port);
                if !endpoints.insert(sa) {
                    c.push(&o, "address", Problem::Duplicate(sa.to_string()));
                }
                parsed = weight.map(|weight| ParsedMember {
                    addr: sa,
                    weight,
                    monitor: sa,
                });
            }
        }
        Err(e) => c.errors.push(e),
    }
    if let Some(a) = &m.monitor_address {
        match parse_ip(&o, "monitor_address", a) {
            Ok(ip) => {
                if let Some(what) = not_a_host(ip) {
                    let address = ip.to_string();
                    c.push(&o, "monitor_address", Problem::NotAHost { address, what });
                }
                if let Some(p) = parsed.as_mut() {
                    p.monitor.set_ip(ip);
                }
            }
            Err(e) => c.errors.push(e),
        }
    }
    if let Some(port) = m.monitor_port {
        c.range(&o, "monitor_port", port, 1, 65535);
        if let (Some(p), Ok(port)) = (parsed.as_mut(), u16::try_from(port)) {
            p.monitor.set_port(port);
        }
    }
    parsed
}

/// Checks a pool's monitor; its expected codes, parsed, when it has some.
fn check_monitor(c: &mut Checker, p: &Pool, hm: &HealthMonitor) -> Option<Vec<(u16, u16)>> {
    let o = Object::HealthMonitor { pool: p.id.clone() };
    let max = i64::from(i32::MAX);
    c.range(&o, "delay", hm.delay, 1, max);
    c.range(&o, "timeout", hm.timeout, 1, max);
    c.range(&o, "max_retries", hm.max_retries, 1, 10);
    c.range(&o, "max_retries_down", hm.max_retries_down, 1, 10);
    // Octavia: UDP pools take UDP-CONNECT, TCP and HTTP monitors; TCP pools
    // take everything but UDP-CONNECT.
    let fits = match p.protocol {
        PoolProtocol::Udp => matches!(
            hm.kind,
            MonitorType::UdpConnect | MonitorType::Tcp | MonitorType::Http
        ),
        _ => hm.kind != MonitorType::UdpConnect,
    };
    if !fits {
        let problem = Problem::MonitorMismatch {
            pool: p.protocol,
            monitor: hm.kind,
        };
        c.push(&o, "type", problem);
    }
    let http = matches!(hm.kind, MonitorType::Http | MonitorType::Https);
    if !http {
        if hm.http_method.is_some() {
            c.push(&o, "http_method", Problem::HttpOnly);
        }
        if hm.url_path.is_some() {
            c.push(&o, "url_path", Problem::HttpOnly);
        }
        if hm.expected_codes.is_some() {
            c.push(&o, "expected_codes", Problem::HttpOnly);
        }
    }
    if let Some(path) = &hm.url_path {
        // What an HTTP request line can carry: no spaces or control bytes.
        let parses = path.parse::<http::uri::PathAndQuery>().is_ok();
        if !path.starts_with('/') || !parses {
            c.push(&o, "url_path", Problem::BadPath(path.clone()));
        }
    }
    let codes = hm.expected_codes.as_ref()?;
    let parsed = parse_expected_codes(codes);
    if parsed.is_none() {
        c.push(&o, "expected_codes", Problem::BadCodes(codes.clone()));
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::Format;

    const BASE: &str = r#"
generation = 1
[[listeners]]
id = "l"
protocol = "TCP"
bind_addresses = ["0.0.0.0", "::"]
protocol_port = 80
default_pool_id = "p"
[[pools]]
id = "p"
protocol = "TCP"
lb_algorithm = "MAGLEV"
members = [
  { id = "a", address = "192.0.2.1", protocol_port = 80 },
  { id = "b", address = "2001:db8::1", protocol_port = 80, weight = 256, backup = true },
]
[pools.healthmonitor]
type = "HTTP"
delay = 5
timeout = 3
max_retries = 3
http_method = "GET"
url_path = "/health"
expected_codes = "200-204,302"
"#;

    fn errors(text: &str) -> Vec<ConfigError> {
        let c = Config::parse(text, Format::Toml).expect("parses");
        c.validate().err().map(|e| e.0).unwrap_or_default()
    }

    /// Validation hands over what it parsed, so the dataplane never
    /// parses an address, a port, a weight or a code range again.
    #[test]
    fn validation_returns_the_parsed_form() {
        let text = BASE.replace(
            "protocol_port = 80, weight = 256, backup = true }",
            "protocol_port = 80, weight = 256, backup = true, monitor_address = \"2001:db8::9\", monitor_port = 8080 }",
        );
        let c = Config::parse(&text, Format::Toml).expect("parses");
        let valid = c.clone().into_valid().expect("valid");
        let p = valid.parsed();
        let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(p.listeners[0].addrs, [sa("0.0.0.0:80"), sa("[::]:80")]);
        let members = &p.pools[0].members;
        assert_eq!(members[0].addr, sa("192.0.2.1:80"));
        assert_eq!(members[0].weight, 1);
        assert_eq!(
            members[0].monitor, members[0].addr,
            "defaults to the member's own"
        );
        assert_eq!(members[1].weight, 256);
        assert_eq!(members[1].monitor, sa("[2001:db8::9]:8080"));
        assert_eq!(
            p.pools[0].expected_codes,
            Some(vec![(200, 204), (302, 302)])
        );
        assert_eq!(valid.config(), &c);
        // An invalid config gives no parsed form at all.
        let bad = BASE.replace("192.0.2.1", "192.0.2.300");
        let bad = Config::parse(&bad, Format::Toml).expect("parses");
        assert!(bad.into_valid().is_err());
    }

    fn one(text: &str) -> (Object, &'static str, Problem) {
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        let e = e.into_iter().next().expect("one");
        (e.object, e.field, e.problem)
    }

    #[test]
    fn the_base_config_is_valid_in_toml_and_json() {
        assert!(errors(BASE).is_empty());
        let c = Config::parse(BASE, Format::Toml).expect("toml");
        let json = serde_json::to_string(&c).expect("json");
        assert_eq!(Config::parse(&json, Format::Json).expect("json parses"), c);
    }

    #[test]
    fn each_problem_names_its_object_and_field() {
        let l = || Object::Listener("l".into());
        let p = || Object::Pool("p".into());
        let m = |id: &str| Object::Member {
            pool: "p".into(),
            member: id.into(),
        };
        let hm = || Object::HealthMonitor { pool: "p".into() };
        let cases: Vec<(String, (Object, &str, Problem))> = vec![
            (BASE.replace("protocol = \"TCP\"\nlb_algorithm", "protocol = \"UDP\"\nlb_algorithm").replace("type = \"HTTP\"", "type = \"TCP\"").replace("http_method = \"GET\"\nurl_path = \"/health\"\nexpected_codes = \"200-204,302\"\n", ""),
             (l(), "default_pool_id", Problem::ProtocolMismatch { listener: ListenerProtocol::Tcp, pool: PoolProtocol::Udp })),
            (BASE.replace("{ id = \"b\", address = \"2001:db8::1\"", "{ id = \"b\", address = \"192.0.2.1\""),
             (m("b"), "address", Problem::Duplicate("192.0.2.1:80".into()))),
            (BASE.replace("{ id = \"b\"", "{ id = \"a\""), (m("a"), "id", Problem::DuplicateId("a".into()))),
            (BASE.replace("lb_algorithm = \"MAGLEV\"", "lb_algorithm = \"MAGLEV\"\nmaglev_table_size = 65536"),
             (p(), "maglev_table_size", Problem::NotPrime(65536))),
            (BASE.replace("\"::\"]", "\"0.0.0.0\"]"),
             (l(), "bind_addresses", Problem::Duplicate("0.0.0.0:80 (also bound by listener \"l\")".into()))),
            (BASE.replace("timeout = 3", "timeout = 0"), (hm(), "timeout", Problem::OutOfRange { value: 0, min: 1, max: i64::from(i32::MAX) })),
            (BASE.replace("max_retries = 3", "max_retries = 11"), (hm(), "max_retries", Problem::OutOfRange { value: 11, min: 1, max: 10 })),
            (BASE.replace("\"/health\"", "\"health\""), (hm(), "url_path", Problem::BadPath("health".into()))),
            (BASE.replace("\"/health\"", "\"/a b\""), (hm(), "url_path", Problem::BadPath("/a b".into()))),
            (BASE.replace("200-204,302", "204-200"), (hm(), "expected_codes", Problem::BadCodes("204-200".into()))),
            (BASE.replace("type = \"HTTP\"", "type = \"UDP-CONNECT\"").replace("http_method = \"GET\"\nurl_path = \"/health\"\nexpected_codes = \"200-204,302\"\n", ""),
             (hm(), "type", Problem::MonitorMismatch { pool: PoolProtocol::Tcp, monitor: MonitorType::UdpConnect })),
            (BASE.replace("type = \"HTTP\"", "type = \"PING\"").replace("url_path = \"/health\"\nexpected_codes = \"200-204,302\"\n", ""),
             (hm(), "http_method", Problem::HttpOnly)),
            (BASE.replace("protocol_port = 80\ndefault_pool_id", "protocol_port = 80\nconnection_limit = -2\ndefault_pool_id"),
             (l(), "connection_limit", Problem::OutOfRange { value: -2, min: -1, max: i64::from(u32::MAX) })),
            (BASE.replace("protocol_port = 80\ndefault_pool_id", "protocol_port = 80\ntimeout_client_data = 86400001\ndefault_pool_id"),
             (l(), "timeout_client_data", Problem::OutOfRange { value: 86_400_001, min: 0, max: 86_400_000 })),
        ];
        for (text, want) in cases {
            assert_eq!(one(&text), want, "for config:\n{text}");
        }
    }

    /// What `run` would refuse (a bind that fails with EINVAL) or do wrong
    /// (connect to itself, to a group) is refused by validation, which
    /// `check` shares.
    #[test]
    fn addresses_run_cannot_use_are_refused() {
        let l = || Object::Listener("l".into());
        let a = || Object::Member {
            pool: "p".into(),
            member: "a".into(),
        };
        let not_a_host = |address: &str, what| Problem::NotAHost {
            address: address.into(),
            what,
        };
        let cases: Vec<(String, (Object, &str, Problem))> = vec![
            (
                BASE.replace("\"::\"]", "\"::ffff:127.0.0.1\"]"),
                (
                    l(),
                    "bind_addresses",
                    Problem::Ipv4Mapped {
                        address: "::ffff:127.0.0.1".into(),
                        v4: Ipv4Addr::LOCALHOST,
                    },
                ),
            ),
            (
                BASE.replace("\"::\"]", "\"224.0.0.1\"]"),
                (
                    l(),
                    "bind_addresses",
                    not_a_host("224.0.0.1", "a multicast address"),
                ),
            ),
            (
                BASE.replace("\"192.0.2.1\"", "\"0.0.0.0\""),
                (
                    a(),
                    "address",
                    not_a_host("0.0.0.0", "the unspecified address"),
                ),
            ),
            (
                BASE.replace("\"192.0.2.1\"", "\"::\""),
                (a(), "address", not_a_host("::", "the unspecified address")),
            ),
            (
                BASE.replace("\"192.0.2.1\"", "\"239.1.2.3\""),
                (
                    a(),
                    "address",
                    not_a_host("239.1.2.3", "a multicast address"),
                ),
            ),
            (
                BASE.replace("\"192.0.2.1\"", "\"ff02::1\""),
                (a(), "address", not_a_host("ff02::1", "a multicast address")),
            ),
            (
                BASE.replace("\"192.0.2.1\"", "\"::ffff:255.255.255.255\""),
                (
                    a(),
                    "address",
                    not_a_host("::ffff:255.255.255.255", "the broadcast address"),
                ),
            ),
            (
                BASE.replace(
                    "\"192.0.2.1\", protocol_port = 80",
                    "\"192.0.2.1\", protocol_port = 80, monitor_address = \"255.255.255.255\"",
                ),
                (
                    a(),
                    "monitor_address",
                    not_a_host("255.255.255.255", "the broadcast address"),
                ),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(one(&text), want, "for config:\n{text}");
        }
        // Wildcards stay what a listener binds.
        assert!(errors(&BASE.replace("\"::\"]", "\"::1\"]")).is_empty());
    }

    #[test]
    fn maglev_tables_are_capped_and_a_zero_connect_timeout_is_octavias() {
        let p = Object::Pool("p".into());
        let size = |n: u32| {
            BASE.replace(
                "lb_algorithm = \"MAGLEV\"",
                &format!("lb_algorithm = \"MAGLEV\"\nmaglev_table_size = {n}"),
            )
        };
        assert!(errors(&size(MAX_MAGLEV_TABLE_SIZE)).is_empty());
        assert!(is_prime(MAX_MAGLEV_TABLE_SIZE));
        assert_eq!(
            one(&size(5_000_011)),
            (
                p,
                "maglev_table_size",
                Problem::OutOfRange {
                    value: 5_000_011,
                    min: 3,
                    max: 131_071
                }
            )
        );
        // Octavia's API takes 0 (haproxy: no timeout); the connect is then
        // bounded by the kernel's SYN retries. Refusing it would make a
        // listener the controller accepted impossible to push.
        let zero = BASE.replace(
            "protocol_port = 80\ndefault_pool_id",
            "protocol_port = 80\ntimeout_member_connect = 0\ndefault_pool_id",
        );
        assert!(errors(&zero).is_empty());
    }

    #[test]
    fn unknown_fields_and_enum_values_are_parse_errors() {
        let typo = BASE.replace("default_pool_id", "default_pool");
        assert!(Config::parse(&typo, Format::Toml)
            .expect_err("typo")
            .contains("default_pool"));
        let bad_enum = BASE.replace("\"MAGLEV\"", "\"RANDOM\"");
        assert!(Config::parse(&bad_enum, Format::Toml)
            .expect_err("enum")
            .contains("RANDOM"));
    }

    #[test]
    fn expected_codes_forms() {
        assert_eq!(parse_expected_codes("200"), Some(vec![(200, 200)]));
        assert_eq!(
            parse_expected_codes("200,202"),
            Some(vec![(200, 200), (202, 202)])
        );
        assert_eq!(parse_expected_codes("200-204"), Some(vec![(200, 204)]));
        assert_eq!(parse_expected_codes("99"), None);
        assert_eq!(parse_expected_codes("abc"), None);
    }
}
