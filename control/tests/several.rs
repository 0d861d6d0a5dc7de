#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! Several controllers on one PostgreSQL: three `siphon-control`
//! processes sharing a real throwaway server (`siphon_testkit::postgres`),
//! and amphorae running the real agent and dataplane, each controller and
//! each amphora a host of its own (a network namespace):
//!
//! ```text
//!   this process: the operator (API), the clients of the VIPs, the backends
//!        │ api                      │ lan (+ the VIP subnet, on link)
//!   ┌────┴──────────── switch ──────┴──────────────────────────────────┐
//!   │ br-api                     br-lan                   br-mgmt      │
//!   └────┬──────────────────────────┬────────────────────────┬─────────┘
//!   ctl-a, ctl-b, ctl-c (api0)   amphorae (eth1: VIPs)   ctl-a, ctl-b, ctl-c (eth0)
//!                                                        amphorae (eth0: agent)
//!   PostgreSQL: on this host, reached by the controllers on its Unix
//!   socket (their database network, apart from the management one)
//! ```
//!
//! Agents heartbeat to all three controllers over the management network;
//! a VIP that moves is announced on the lan by the agent that takes it.
//! What the operator checks: any controller serves, a controller or the
//! database dying changes nothing that runs and loses nothing, work is
//! done exactly once, and a controller cut off from the management network
//! fails nothing over.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{json, Value};
use siphon_control::client::{Answer, Client};
use siphon_control::config::{Auth, ControlConfig};
use siphon_control::store::Database;
use siphon_testkit::dataplane::generation_at;
use siphon_testkit::netns::{self, Netns};
use siphon_testkit::postgres::Postgres;
use siphon_testkit::{free_port, Backend, TempDir};

const NAMES: [&str; 3] = ["ctl-a", "ctl-b", "ctl-c"];

/// The networks of one cluster, a /24 of 198.19.0.0/16 each (one set per
/// cluster, so the tests of this file run side by side): their third
/// octets.
struct Nets {
    /// Controllers and amphorae: pushes and heartbeats.
    mgmt: u8,
    /// The controllers' API, and this process.
    api: u8,
    /// The amphorae's VIP side, and this process (clients, backends).
    lan: u8,
    /// The VIP subnet, on the lan's link.
    vips: u8,
}

impl Nets {
    fn next() -> Nets {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let base = 20 + 4 * NEXT.fetch_add(1, Ordering::Relaxed);
        Nets {
            mgmt: base,
            api: base + 1,
            lan: base + 2,
            vips: base + 3,
        }
    }
}

/// One controller of the cluster: its process (killed before its host
/// goes) and its host.
struct Node {
    name: &'static str,
    config: ControlConfig,
    process: ControllerProcess,
    client: Client,
    ns: Netns,
}

/// Three controllers on one PostgreSQL database, amphorae heartbeating to
/// all of them, in the topology above.
struct Cluster {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    nodes: Vec<Node>,
    amphorae: Vec<Amphora>,
    /// Where the backends listen (this process's lan address).
    member_ip: String,
    // Dropped after the hosts plugged into it: the bridges, and this
    // process's links to them.
    _switch: Netns,
    // Dropped last: the controllers go before their database.
    pg: Postgres,
    _dir: TempDir,
}

impl Cluster {
    /// The cluster, with `amphorae` (their agents with `agent_limits`)
    /// registered through the first controller and `READY`; `tune`
    /// adjusts each controller's config.
    /// `None` where PostgreSQL or root is missing (a failure in CI).
    fn new(
        test: &str,
        amphorae: &[&str],
        agent_limits: &str,
        tune: impl Fn(&mut ControlConfig),
    ) -> Option<Cluster> {
        let pg = Postgres::start_or_skip(test)?;
        pg.create_database("siphon");
        let rt = siphon_testkit::runtime();
        let dir = TempDir::new(&format!("several-{test}"));
        let pki = Pki::new(&dir);
        let nets = Nets::next();
        let net = |n: u8, host: u8| format!("198.19.{n}.{host}");
        let switch = Netns::create("sw").unwrap();
        for b in ["br-api", "br-lan", "br-mgmt"] {
            switch.bridge(b).unwrap();
        }
        // This process: on the API network and on the lan, with the VIP
        // subnet on the lan's link (its neighbours answer for the VIPs).
        let tag = format!("{}-{}", nets.mgmt, std::process::id() % 100_000);
        let (api_if, lan_if) = (format!("sa{tag}"), format!("sl{tag}"));
        let api_cidr = format!("{}/24", net(nets.api, 1));
        let lan_cidr = format!("{}/24", net(nets.lan, 1));
        switch
            .plug("br-api", "api-host", None, &api_if, &[&api_cidr])
            .unwrap();
        switch
            .plug("br-lan", "lan-host", None, &lan_if, &[&lan_cidr])
            .unwrap();
        netns::ip(&[
            "route",
            "add",
            &format!("{}/24", net(nets.vips, 0)),
            "dev",
            &lan_if,
        ])
        .unwrap();
        // The database over its Unix socket: the controllers' own
        // network to it, which no test here cuts.
        let url = format!(
            "postgres://postgres@localhost:{}/siphon?host={}",
            pg.port,
            pg.socket_dir.display()
        );
        let vip_net = format!("198.19.{}", nets.vips);
        let mut nodes: Vec<Node> = NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let host = 2 + i as u8;
                let ns = Netns::create(name).unwrap();
                let (api, mgmt) = (net(nets.api, host), net(nets.mgmt, host));
                switch
                    .plug(
                        "br-api",
                        &format!("api-{name}"),
                        Some(&ns),
                        "api0",
                        &[&format!("{api}/24")],
                    )
                    .unwrap();
                switch
                    .plug(
                        "br-mgmt",
                        &format!("m-{name}"),
                        Some(&ns),
                        "eth0",
                        &[&format!("{mgmt}/24")],
                    )
                    .unwrap();
                let database = Database::Postgres {
                    url: url.clone(),
                    password_file: Some(pg.password_file.clone()),
                    max_connections: 8,
                };
                let mut config = control_config(&dir, Auth::Noauth, &vip_net, database);
                config.listen = format!("{api}:{}", free_port()).parse().unwrap();
                let health = config.health.as_mut().unwrap();
                health.listen = format!("{mgmt}:{}", free_port()).parse().unwrap();
                config.cluster.name = Some((*name).into());
                config.cluster.claim_ttl_ms = 2_000;
                tune(&mut config);
                let process = ControllerProcess::new(&config, &dir, name).in_netns(&ns);
                let client = Client::new(&format!("http://{}", config.listen), None).unwrap();
                Node {
                    name,
                    config,
                    process,
                    client,
                    ns,
                }
            })
            .collect();
        // All three at once: they migrate the empty database one after
        // another (under its advisory lock), not three times.
        for n in &mut nodes {
            n.process.spawn();
        }
        for n in &mut nodes {
            n.process.wait_up(&rt, &n.client);
        }
        let heartbeats: Vec<SocketAddr> = nodes
            .iter()
            .map(|n| n.config.health.as_ref().unwrap().listen)
            .collect();
        let amps: Vec<Amphora> = amphorae
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let ns = Netns::create(id).unwrap();
                let h = 10 + i as u8;
                let mgmt = net(nets.mgmt, h);
                switch
                    .plug(
                        "br-mgmt",
                        &format!("m-{id}"),
                        Some(&ns),
                        "eth0",
                        &[&format!("{mgmt}/24")],
                    )
                    .unwrap();
                switch
                    .plug(
                        "br-lan",
                        &format!("l-{id}"),
                        Some(&ns),
                        "eth1",
                        &[&format!("{}/24", net(nets.lan, h))],
                    )
                    .unwrap();
                let host = Host {
                    ns,
                    mgmt: mgmt.parse().unwrap(),
                    vip_interface: "eth1".into(),
                    links: vec!["eth0".into(), "eth1".into()],
                };
                let key = dir.path("heartbeat.key");
                Amphora::start_on(Some(host), id, &pki, &heartbeats, &key, agent_limits)
            })
            .collect();
        register(&rt, &nodes[0].client, &amps);
        Some(Cluster {
            rt,
            nodes,
            amphorae: amps,
            member_ip: net(nets.lan, 1),
            _switch: switch,
            pg,
            _dir: dir,
        })
    }

    fn call(&self, node: usize, method: Method, path: &str, body: Option<Value>) -> Answer {
        let n = &self.nodes[node];
        self.rt
            .block_on(n.client.call(method, path, body.as_ref()))
            .unwrap_or_else(|e| panic!("{} {path}: {e}", n.name))
    }

    fn get(&self, node: usize, path: &str) -> Answer {
        self.call(node, Method::GET, path, None)
    }

    /// Polls `path` through `node` until `key.field == want`.
    fn wait_field(
        &self,
        node: usize,
        path: &str,
        key: &str,
        field: &str,
        want: &str,
        limit: Duration,
    ) {
        let start = Instant::now();
        loop {
            let a = self.get(node, path);
            if a.body[key][field] == want {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{path} through {}: {field} still {:?} after {limit:?}, want {want}: {}",
                self.nodes[node].name,
                a.body[key][field],
                a.body
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_active(&self, node: usize, lb: &str) {
        self.wait_field(
            node,
            &format!("/v2/lbaas/loadbalancers/{lb}"),
            "loadbalancer",
            "provisioning_status",
            "ACTIVE",
            Duration::from_secs(15),
        );
    }

    /// A load balancer with a TCP listener on `port` and `backends` as
    /// members, each step through the next controller (and waited for
    /// through the one after): its id and VIP.
    fn build_lb(&self, name: &str, backends: &[&Backend], port: u16) -> (String, SocketAddr) {
        let a = self.call(
            0,
            Method::POST,
            "/v2/lbaas/loadbalancers",
            Some(json!({"loadbalancer": {"name": name, "vip_subnet_id": SUBNET}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let lb = a.body["loadbalancer"]["id"].as_str().unwrap().to_owned();
        let vip = a.body["loadbalancer"]["vip_address"]
            .as_str()
            .unwrap()
            .to_owned();
        self.wait_active(1, &lb);
        let a = self.call(
            1,
            Method::POST,
            "/v2/lbaas/listeners",
            Some(json!({"listener": {"protocol": "TCP", "protocol_port": port, "loadbalancer_id": lb}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let listener = a.body["listener"]["id"].as_str().unwrap().to_owned();
        self.wait_active(2, &lb);
        let a = self.call(
            2,
            Method::POST,
            "/v2/lbaas/pools",
            Some(json!({"pool": {"protocol": "TCP", "lb_algorithm": "ROUND_ROBIN", "listener_id": listener}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let pool = a.body["pool"]["id"].as_str().unwrap().to_owned();
        self.wait_active(0, &lb);
        for (i, b) in backends.iter().enumerate() {
            let a = self.call(
                i % 3,
                Method::POST,
                &format!("/v2/lbaas/pools/{pool}/members"),
                Some(
                    json!({"member": {"address": self.member_ip, "protocol_port": b.addr.port()}}),
                ),
            );
            assert_eq!(a.status, 201, "{}", a.body);
            self.wait_active((i + 1) % 3, &lb);
        }
        (lb, format!("{vip}:{port}").parse().unwrap())
    }

    /// One value of a query on the shared database.
    fn sql(&self, query: &str) -> String {
        self.pg.psql("siphon", query)
    }

    fn node(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    fn amphora(&self, node: usize, id: &str) -> Value {
        self.get(node, &format!("/v2/octavia/amphorae/{id}")).body["amphora"].clone()
    }

    /// The amphorae carrying `lb`.
    fn carriers(&self, node: usize, lb: &str) -> Vec<String> {
        let a = self.get(node, &format!("/v2/octavia/amphorae?loadbalancer_id={lb}"));
        a.body["amphorae"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The amphora with `id`, in the rig.
    fn amp(&mut self, id: &str) -> &mut Amphora {
        self.amphorae.iter_mut().find(|a| a.id == id).unwrap()
    }

    /// Holds the only slot of `id`'s agent (see [`ONE_SLOT`]): a
    /// connection that says nothing, opened on the amphora's own host
    /// (this process is not on the management network).
    fn plug(&self, id: &str) -> TcpStream {
        let a = self.amphorae.iter().find(|a| a.id == id).unwrap();
        let to = a.addr();
        let host = &a.host.as_ref().unwrap().ns;
        host.enter(|| TcpStream::connect(to)).unwrap().unwrap()
    }

    /// `siphon_control_failovers_total` summed over the running
    /// controllers.
    fn failovers(&self) -> f64 {
        self.nodes
            .iter()
            .filter(|n| n.process.running())
            .map(|n| {
                metric(
                    raw_get(n.config.listen, "/metrics").2.as_str(),
                    "siphon_control_failovers_total",
                )
            })
            .sum()
    }
}

/// A GET without any client library: status, headers, body.
fn raw_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until connections to `vip` reach every one of `backends`.
fn wait_served(vip: SocketAddr, backends: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = greetings(vip, 3 * backends.len());
        if backends.iter().all(|b| got.iter().any(|g| g == b)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{vip} not served by {backends:?}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two backends, on this process's lan address.
fn backends(c: &Cluster) -> [Backend; 2] {
    [
        Backend::start(&c.rt, "b1", &c.member_ip),
        Backend::start(&c.rt, "b2", &c.member_ip),
    ]
}

/// Load balancer "web" over backends b1 and b2, served: the backends
/// (kept for the test's length), its id and VIP.
fn web(c: &Cluster) -> ([Backend; 2], String, SocketAddr) {
    let bs = backends(c);
    let (lb, vip) = c.build_lb("web", &[&bs[0], &bs[1]], free_port());
    wait_served(vip, &["b1", "b2"], Duration::from_secs(10));
    (bs, lb, vip)
}

/// An agent's `[limits]` for the tests that catch a push in the middle:
/// one controller connection at a time, and a minute for its TLS
/// handshake. A silent connection the test opens ([`Cluster::plug`])
/// holds the only slot, so a push to that amphora waits until it goes.
const ONE_SLOT: &str =
    "max_connections = 1\nheader_read_timeout_ms = 60000\nidle_timeout_ms = 60000";

#[test]
fn an_object_made_through_one_controller_is_seen_and_edited_through_the_others_at_once() {
    let Some(c) = Cluster::new("visible", &["amp-v1", "amp-v2"], "", |_| {}) else {
        return;
    };
    let (_bs, lb, vip) = web(&c);
    let path = format!("/v2/lbaas/loadbalancers/{lb}");

    // Each controller edits in turn; the very next read through every
    // controller (no waiting) has the edit.
    for (writer, text) in [
        (1, "edited through B"),
        (2, "edited through C"),
        (0, "and through A"),
    ] {
        let a = c.call(
            writer,
            Method::PUT,
            &path,
            Some(json!({"loadbalancer": {"description": text}})),
        );
        assert_eq!(a.status, 200, "{}", a.body);
        for reader in 0..3 {
            let got = c.get(reader, &path).body;
            assert_eq!(
                got["loadbalancer"]["description"], text,
                "read through {} after a write through {}",
                c.nodes[reader].name, c.nodes[writer].name
            );
        }
        c.wait_active((writer + 1) % 3, &lb);
    }
    // A new object is listed everywhere at once, and deleted through
    // another.
    let a = c.call(
        2,
        Method::POST,
        "/v2/lbaas/loadbalancers",
        Some(json!({"loadbalancer": {"name": "second", "vip_subnet_id": SUBNET}})),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let second = a.body["loadbalancer"]["id"].as_str().unwrap().to_owned();
    for reader in 0..3 {
        let list = c.get(reader, "/v2/lbaas/loadbalancers?name=second").body;
        assert_eq!(list["loadbalancers"][0]["id"], second.as_str(), "{list}");
    }
    c.wait_active(1, &second);
    let gone = format!("/v2/lbaas/loadbalancers/{second}");
    assert_eq!(c.call(0, Method::DELETE, &gone, None).status, 204);
    let start = Instant::now();
    while c.get(2, &gone).status != 404 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{second} not deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The stock openstack CLI, pointed at each controller in turn.
    let venv = stock_clients();
    for (i, n) in c.nodes.iter().enumerate() {
        let endpoint = format!("http://{}/v2.0", n.config.listen);
        let os = |args: &[&str]| openstack(&venv, &endpoint, args);
        let shown = os(&["loadbalancer", "show", &lb, "-f", "json"]);
        assert_eq!(shown["id"], lb.as_str(), "through {}: {shown}", n.name);
        let text = format!("set through {} by the CLI", n.name);
        os(&["loadbalancer", "set", "--description", &text, &lb, "--wait"]);
        let listed = os(&["loadbalancer", "list", "-f", "json"]);
        assert!(lists(&listed, "id", &lb), "through {}: {listed}", n.name);
        let other = &c.nodes[(i + 1) % 3];
        let endpoint = format!("http://{}/v2.0", other.config.listen);
        let shown = openstack(
            &venv,
            &endpoint,
            &["loadbalancer", "show", &lb, "-f", "json"],
        );
        assert_eq!(
            shown["description"],
            text.as_str(),
            "through {}: {shown}",
            other.name
        );
    }
    wait_served(vip, &["b1", "b2"], Duration::from_secs(10));
}

/// Waits until every amphora holds its own heartbeat key (pushed by some
/// controller), so that no push to them is still to come.
fn wait_keys_held(c: &Cluster) {
    let start = Instant::now();
    for a in &c.amphorae {
        while c.amphora(0, &a.id)["heartbeat_key_acked"] != true {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{} holds no key",
                a.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The holder of `job`'s claim on the database, if any holds it now.
fn holder(c: &Cluster, job: &str) -> Option<String> {
    let now = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
    let h = c.sql(&format!(
        "SELECT holder FROM claim WHERE job = '{job}' AND expires_at > {now}"
    ));
    (!h.is_empty()).then_some(h)
}

#[test]
fn a_controller_killed_holding_a_failover_has_it_finished_by_another_within_the_claim_expiry() {
    // The spares' agents' slots held (ONE_SLOT) catch the failover in
    // the middle.
    let Some(mut c) = Cluster::new("claim", &["amp-c1", "amp-c2", "amp-c3"], ONE_SLOT, |cfg| {
        // One long attempt: the push hangs for its whole timeout.
        cfg.push.attempts = 1;
        cfg.push.timeout_ms = 15_000;
    }) else {
        return;
    };
    let (_bs, lb, vip) = web(&c);
    wait_keys_held(&c);
    let carrier = c.carriers(0, &lb).pop().unwrap();
    let spares: Vec<String> = c
        .amphorae
        .iter()
        .map(|a| a.id.clone())
        .filter(|id| *id != carrier)
        .collect();
    let plugs: Vec<TcpStream> = spares.iter().map(|id| c.plug(id)).collect();
    // Accepted into the agents' one slot before anything else comes.
    std::thread::sleep(Duration::from_millis(300));

    c.amp(&carrier).kill();
    let job = format!("loadbalancer:{lb}");
    let start = Instant::now();
    // The failover is decided (a spare now carries the load balancer)
    // and its push holds the claim.
    let (spare, first) = loop {
        let now = c.carriers(0, &lb);
        if let (Some(s), Some(h)) = (now.iter().find(|a| spares.contains(a)), holder(&c, &job)) {
            break (s.clone(), h);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no failover began: carriers {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        holder(&c, &job).as_deref(),
        Some(first.as_str()),
        "the push ended early"
    );
    let lb_path = format!("/v2/lbaas/loadbalancers/{lb}");
    assert_ne!(
        c.get(0, &lb_path).body["loadbalancer"]["provisioning_status"],
        "ACTIVE",
        "the failover finished before the kill"
    );
    let killed = c.node(&first);
    c.nodes[killed].process.kill();
    let killed_at = Instant::now();
    drop(plugs);

    // Another controller takes the claim over once it expires, and
    // finishes the failover.
    let ttl = Duration::from_millis(c.nodes[0].config.cluster.claim_ttl_ms);
    let alive = (killed + 1) % 3;
    let taken = loop {
        if let Some(h) = holder(&c, &job) {
            if h != first {
                break killed_at.elapsed();
            }
        }
        // A holder that finished already released it: the load balancer
        // is then ACTIVE.
        let status = c.get(alive, &lb_path).body["loadbalancer"]["provisioning_status"].clone();
        if status == "ACTIVE" {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < ttl + Duration::from_secs(3),
            "claim of {first} not taken over"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        taken <= ttl + Duration::from_secs(2),
        "taken over {taken:?} after the kill (claim expiry {ttl:?})"
    );
    c.wait_active(alive, &lb);
    let served = killed_at.elapsed();
    wait_served(vip, &["b1", "b2"], Duration::from_secs(15));
    eprintln!(
        "{first} killed mid-failover: claim taken over after {:.2} s (expiry {:.1} s), active after {:.2} s, served after {:.2} s",
        taken.as_secs_f64(),
        ttl.as_secs_f64(),
        served.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );

    // Exactly one spare used, the one first chosen; the other is still a
    // spare; the dead one is out of service.
    assert_eq!(c.carriers(alive, &lb), std::slice::from_ref(&spare));
    let other = spares.iter().find(|s| **s != spare).unwrap();
    let o = c.amphora(alive, other);
    assert_eq!(o["status"], "READY", "{o}");
    assert!(o["loadbalancer_id"].is_null(), "{o}");
    let dead = c.amphora(alive, &carrier);
    assert_eq!(dead["status"], "ERROR", "{dead}");
}

/// Every amphora's status and load balancer, as `node` says.
fn fleet(c: &Cluster, node: usize) -> Vec<(String, String, String)> {
    let a = c.get(node, "/v2/octavia/amphorae").body;
    let mut v: Vec<(String, String, String)> = a["amphorae"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["status"].as_str().unwrap_or("").to_owned(),
                a["loadbalancer_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_controller_cut_off_from_the_management_network_fails_nothing_over_and_one_death_is_one_failover(
) {
    let ids = ["amp-p1", "amp-p2", "amp-p3", "amp-p4"];
    let Some(mut c) = Cluster::new("partition", &ids, "", |_| {}) else {
        return;
    };
    let bs = backends(&c);
    let (web1, vip1) = c.build_lb("web1", &[&bs[0], &bs[1]], free_port());
    let (web2, vip2) = c.build_lb("web2", &[&bs[0], &bs[1]], free_port());
    wait_served(vip1, &["b1", "b2"], Duration::from_secs(10));
    wait_served(vip2, &["b1", "b2"], Duration::from_secs(10));
    let before = fleet(&c, 0);

    // ctl-c is cut off from the management network from now on (its
    // link there down): it hears no heartbeat and reaches no agent, but
    // still reads the database (on its own network), where the others
    // record theirs, and still serves its API.
    let cut = c.node("ctl-c");
    let heard = |c: &Cluster| {
        let page = raw_get(c.nodes[cut].config.listen, "/metrics").2;
        metric(
            &page,
            r#"siphon_control_heartbeats_total{result="accepted"}"#,
        )
    };
    assert!(heard(&c) > 0.0, "ctl-c heard nothing before the cut");
    c.nodes[cut]
        .ns
        .ip(&["link", "set", "eth0", "down"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let heard_at_cut = heard(&c);
    let timeout = Duration::from_millis(
        c.nodes[0]
            .config
            .health
            .as_ref()
            .unwrap()
            .heartbeat_timeout_ms,
    );
    std::thread::sleep(3 * timeout);
    assert_eq!(heard(&c), heard_at_cut, "ctl-c still hears heartbeats");
    for n in 0..3 {
        assert_eq!(fleet(&c, n), before, "through {}", c.nodes[n].name);
    }
    assert_eq!(c.failovers(), 0.0);

    // One carrier dies: its load balancer moves to one spare, once.
    let dead = c.carriers(0, &web1).pop().unwrap();
    let survivor = c.carriers(0, &web2).pop().unwrap();
    c.amp(&dead).kill();
    let start = Instant::now();
    let moved = loop {
        let now = c.carriers(cut, &web1);
        if now.len() == 1 && now[0] != dead {
            break now[0].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "web1 not failed over: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    c.wait_active(cut, &web1);
    wait_served(vip1, &["b1", "b2"], Duration::from_secs(15));
    // And nothing else happens, for a while longer.
    std::thread::sleep(3 * timeout);
    let after = fleet(&c, cut);
    let spares_left: Vec<_> = after.iter().filter(|a| a.1 == "READY").collect();
    assert_eq!(spares_left.len(), 1, "{after:?}");
    assert!(
        after.contains(&(survivor.clone(), "ALLOCATED".into(), web2.clone())),
        "{survivor} was failed over: {after:?}"
    );
    assert!(
        after.contains(&(moved.clone(), "ALLOCATED".into(), web1.clone())),
        "{after:?}"
    );
    assert!(
        after.iter().any(|a| a.0 == dead && a.1 == "ERROR"),
        "{after:?}"
    );
    assert_eq!(
        c.failovers(),
        1.0,
        "failovers decided, over the three controllers"
    );
    wait_served(vip2, &["b1", "b2"], Duration::from_secs(5));
    assert_eq!(heard(&c), heard_at_cut, "ctl-c heard heartbeats again");
}

#[test]
fn ten_seconds_without_the_database_change_nothing_that_runs_and_writes_get_a_clear_503() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let Some(mut c) = Cluster::new("dbdown", &["amp-d1", "amp-d2"], "", |_| {}) else {
        return;
    };
    let (_bs, lb, vip) = web(&c);
    c.wait_field(
        0,
        &format!("/v2/lbaas/loadbalancers/{lb}"),
        "loadbalancer",
        "operating_status",
        "ONLINE",
        Duration::from_secs(10),
    );
    let generations = |c: &Cluster| -> Vec<u64> {
        c.amphorae
            .iter()
            .map(|a| a.dataplane.as_ref().unwrap().generation())
            .collect()
    };
    let before = (generations(&c), fleet(&c, 0));
    let lb_path = format!("/v2/lbaas/loadbalancers/{lb}");

    // Steady traffic through the VIP all along: a connection every 20 ms,
    // for at most 40 s.
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(40) {
                match siphon_testkit::connect_greeting(vip) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });

        c.pg.stop();
        let down = Instant::now();
        // Writes through each controller, at once: a 503 that says why.
        let answers: Vec<Answer> = std::thread::scope(|s| {
            let c = &c;
            let lb_path = &lb_path;
            let writes: Vec<_> = (0..3)
                .map(|n| {
                    s.spawn(move || {
                        c.call(
                            n,
                            Method::PUT,
                            lb_path,
                            Some(json!({"loadbalancer": {"description": "while down"}})),
                        )
                    })
                })
                .collect();
            writes.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for (n, a) in answers.iter().enumerate() {
            assert_eq!(a.status, 503, "through {}: {}", c.nodes[n].name, a.body);
            let why = a.fault().unwrap_or_default();
            assert!(
                why.to_lowercase().contains("database"),
                "through {}: {why}",
                c.nodes[n].name
            );
        }
        // Once a controller knows the database lost, a write is refused
        // at once, with the cause.
        for n in 0..3 {
            let t = Instant::now();
            let a = c.call(
                n,
                Method::POST,
                "/v2/lbaas/loadbalancers",
                Some(json!({"loadbalancer": {"name": "while-down", "vip_subnet_id": SUBNET}})),
            );
            let took = t.elapsed();
            let why = a.fault().unwrap_or_default();
            assert_eq!(a.status, 503, "through {}: {}", c.nodes[n].name, a.body);
            // The cause as the system gives it: the controllers reach
            // the database on its Unix socket, gone with the server (over
            // TCP it would be "Connection refused").
            assert!(
                why.contains("No such file or directory"),
                "through {}: {why}",
                c.nodes[n].name
            );
            assert!(
                took < Duration::from_secs(2),
                "through {}: 503 after {took:?}",
                c.nodes[n].name
            );
        }
        // Reads answer from each controller's cache, and say so.
        for n in &c.nodes {
            let (status, head, body) = raw_get(n.config.listen, &lb_path);
            assert_eq!(status, 200, "through {}: {head}{body}", n.name);
            assert!(
                head.contains("x-siphon-stale:"),
                "through {}: {head}",
                n.name
            );
            assert!(head.contains("warning: 110"), "through {}: {head}", n.name);
        }
        let rest = Duration::from_secs(10).saturating_sub(down.elapsed());
        std::thread::sleep(rest);
        assert_eq!(
            generations(&c),
            before.0,
            "a dataplane changed while the database was down"
        );
        c.pg.start_server();
        eprintln!("database down {:.1} s", down.elapsed().as_secs_f64());

        // Back: writes through each controller go through again.
        let back = Instant::now();
        for n in 0..3 {
            loop {
                let text = format!("after, through {}", c.nodes[n].name);
                let a = c.call(
                    n,
                    Method::PUT,
                    &lb_path,
                    Some(json!({"loadbalancer": {"description": text}})),
                );
                if a.status == 200 {
                    break;
                }
                assert!(
                    back.elapsed() < Duration::from_secs(20) && [409, 503].contains(&a.status),
                    "through {}: {} {}",
                    c.nodes[n].name,
                    a.status,
                    a.body
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            c.wait_active((n + 1) % 3, &lb);
        }
        eprintln!(
            "writes through all three again {:.1} s after the database came back",
            back.elapsed().as_secs_f64()
        );
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    eprintln!("traffic through the outage: {ok} connections served, {failed} failed");
    assert_eq!(failed, 0, "connections failed while the database was down");
    assert!(ok > 100, "too little traffic: {ok}");
    // No failover, the same amphorae carrying the same load balancer.
    assert_eq!(fleet(&c, 2), before.1);
    assert_eq!(c.failovers(), 0.0);
    wait_served(vip, &["b1", "b2"], Duration::from_secs(5));
    assert_eq!(c.amphora(1, &c.carriers(1, &lb)[0])["status"], "ALLOCATED");
}

/// What one writer of the conflict test did: its final status, and the
/// faults it met on the way.
struct Outcome {
    status: u16,
    fault: String,
}

/// Sends `body` to `path` through `node` until it is not refused for the
/// load balancer being busy (`immutable`): at most 60 s.
fn write_through_busy(
    c: &Cluster,
    node: usize,
    method: Method,
    path: &str,
    body: Value,
) -> Outcome {
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let a = c.call(node, method.clone(), path, Some(body.clone()));
        let fault = a.fault().unwrap_or_default().to_owned();
        if a.status != 409 || !fault.contains("immutable") {
            return Outcome {
                status: a.status,
                fault,
            };
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{path}: busy for a minute"
        );
        // Spread the retries (by writer and attempt), so they do not
        // come in lockstep.
        n += 1;
        std::thread::sleep(Duration::from_millis(20 + (n * 7 + node as u64 * 13) % 40));
    }
}

#[test]
fn fifty_conflicting_writes_over_three_controllers_have_one_winner_each_and_lose_nothing() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(c) = Cluster::new("conflict", &["amp-w1", "amp-w2"], "", |_| {}) else {
        return;
    };
    let (_bs, lb, vip) = web(&c);
    let lb_path = format!("/v2/lbaas/loadbalancers/{lb}");
    // Eight ports, five writers each wanting a listener on it: eight
    // conflicts. Ten more writers rename the load balancer or redescribe
    // it: neither field's last write may undo the other's.
    let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
    let done = AtomicBool::new(false);
    let barrier = std::sync::Barrier::new(50);
    let (outcomes, generations) = std::thread::scope(|s| {
        let (c, lb, lb_path, ports, barrier) = (&c, &lb, &lb_path, &ports, &barrier);
        // Every generation each dataplane runs, as often as it can be
        // asked, while the writers write.
        let watcher = s.spawn(|| {
            let mut seen: Vec<Vec<u64>> = vec![Vec::new(); c.amphorae.len()];
            while !done.load(Ordering::Relaxed) {
                for (i, a) in c.amphorae.iter().enumerate() {
                    let g = a.dataplane.as_ref().unwrap().generation();
                    if seen[i].last() != Some(&g) {
                        seen[i].push(g);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        let writers: Vec<_> = (0..50)
            .map(|i| {
                s.spawn(move || {
                    let node = i % 3;
                    barrier.wait();
                    let (method, path, body) = match i {
                        0..=39 => (
                            Method::POST,
                            "/v2/lbaas/listeners".to_owned(),
                            json!({"listener": {"name": format!("w{i}"), "protocol": "TCP", "protocol_port": ports[i % 8], "loadbalancer_id": lb}}),
                        ),
                        40..=44 => (
                            Method::PUT,
                            lb_path.clone(),
                            json!({"loadbalancer": {"name": format!("name-{i}")}}),
                        ),
                        _ => (
                            Method::PUT,
                            lb_path.clone(),
                            json!({"loadbalancer": {"description": format!("description-{i}")}}),
                        ),
                    };
                    (i, write_through_busy(c, node, method, &path, body))
                })
            })
            .collect();
        let outcomes: BTreeMap<usize, Outcome> =
            writers.into_iter().map(|w| w.join().unwrap()).collect();
        c.wait_active(0, lb);
        done.store(true, Ordering::Relaxed);
        (outcomes, watcher.join().unwrap())
    });

    // Each port: exactly one listener created, four refused as taken.
    for (k, port) in ports.iter().enumerate() {
        let group: Vec<&Outcome> = (0..40)
            .filter(|i| i % 8 == k)
            .map(|i| &outcomes[&i])
            .collect();
        let won = group.iter().filter(|o| o.status == 201).count();
        assert_eq!(won, 1, "port {port}: {} winners", won);
        for o in group.iter().filter(|o| o.status != 201) {
            assert_eq!(o.status, 409, "port {port}: {}", o.fault);
            assert!(
                o.fault.contains("already using protocol_port"),
                "port {port}: {}",
                o.fault
            );
        }
    }
    // Every controller sees the same eight new listeners (and the first).
    let mut seen = Vec::new();
    for n in 0..3 {
        let list = c
            .get(n, &format!("/v2/lbaas/listeners?loadbalancer_id={lb}"))
            .body;
        let mut got: Vec<u64> = list["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["protocol_port"].as_u64().unwrap())
            .collect();
        got.sort();
        seen.push(got);
    }
    assert_eq!(seen[0].len(), 9, "{:?}", seen[0]);
    for p in &ports {
        assert!(
            seen[0].contains(&u64::from(*p)),
            "{p} missing: {:?}",
            seen[0]
        );
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    // The renames and the new descriptions all went through, and the last
    // of each stands: neither undid the other.
    for i in 40..50 {
        assert_eq!(
            outcomes[&i].status, 200,
            "writer {i}: {}",
            outcomes[&i].fault
        );
    }
    let l = &c.get(1, &lb_path).body["loadbalancer"];
    let name = l["name"].as_str().unwrap();
    let description = l["description"].as_str().unwrap();
    assert!(name.starts_with("name-"), "the rename was lost: {l}");
    assert!(
        description.starts_with("description-"),
        "the description was lost: {l}"
    );
    // No dataplane ever went back to an older generation; each ends on
    // the one its controller pushed last.
    for (a, gens) in c.amphorae.iter().zip(&generations) {
        assert!(gens.windows(2).all(|w| w[0] < w[1]), "{}: {gens:?}", a.id);
        let stored = c.amphora(2, &a.id)["generation"].as_u64().unwrap();
        assert_eq!(
            a.dataplane.as_ref().unwrap().generation(),
            stored,
            "{}",
            a.id
        );
    }
    eprintln!(
        "50 conflicting writes: generations seen {:?}",
        generations.iter().map(|g| g.len()).collect::<Vec<_>>()
    );
    wait_served(vip, &["b1", "b2"], Duration::from_secs(5));
}

#[test]
fn the_database_stopped_mid_push_loses_nothing_and_all_settles_once_it_is_back() {
    use std::sync::atomic::AtomicBool;
    // The carrier's agent's slot held (ONE_SLOT): the next push waits.
    let Some(mut c) = Cluster::new("midpush", &["amp-m1", "amp-m2"], ONE_SLOT, |cfg| {
        cfg.push.timeout_ms = 15_000;
    }) else {
        return;
    };
    let (_bs, lb, vip) = web(&c);
    wait_keys_held(&c);
    let carrier = c.carriers(0, &lb).pop().unwrap();
    let plug = c.plug(&carrier);
    let socket = c.amp(&carrier).dataplane_socket.clone();
    let pools = c
        .get(0, &format!("/v2/lbaas/pools?loadbalancer_id={lb}"))
        .body;
    let pool = pools["pools"][0]["id"].as_str().unwrap().to_owned();
    let b3 = Backend::start(&c.rt, "b3", &c.member_ip);
    let first = generation_at(&socket);
    std::thread::sleep(Duration::from_millis(300));

    // Every generation the carrier runs, all along.
    let done = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        // Set however this scope ends: a failed assertion below must not
        // leave the watcher looping (and the test hanging).
        let _stop = StopOnDrop(&done);
        let watcher = s.spawn(|| {
            let mut seen = vec![first];
            while !done.load(Ordering::Relaxed) {
                let g = generation_at(&socket);
                if seen.last() != Some(&g) {
                    seen.push(g);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        });

        // A third member, through ctl-b: its push waits for the slot,
        // holding the load balancer's claim.
        let a = c.call(
            1,
            Method::POST,
            &format!("/v2/lbaas/pools/{pool}/members"),
            Some(json!({"member": {"address": c.member_ip, "protocol_port": b3.addr.port()}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let job = format!("loadbalancer:{lb}");
        assert!(
            siphon_testkit::eventually(Duration::from_secs(5), || holder(&c, &job).is_some()),
            "no push began"
        );
        // The database dies; then the agent lets the push in.
        c.pg.stop();
        let down = Instant::now();
        drop(plug);
        let delivered =
            siphon_testkit::eventually(Duration::from_secs(10), || generation_at(&socket) > first);
        assert!(delivered, "the push did not reach the dataplane");
        let pushed = generation_at(&socket);
        // Longer than a claim lives: whoever held it cannot renew it.
        std::thread::sleep(Duration::from_secs(4));
        assert_eq!(
            generation_at(&socket),
            pushed,
            "changed while the database was down"
        );
        c.pg.start_server();
        eprintln!(
            "database down {:.1} s, with the push delivered and not recorded",
            down.elapsed().as_secs_f64()
        );

        // Back: the load balancer settles ACTIVE, the generation stored
        // is the one the dataplane runs, and the new member serves.
        let back = Instant::now();
        c.wait_active(2, &lb);
        let settled = back.elapsed();
        let stored = c.amphora(0, &carrier)["generation"].as_u64().unwrap();
        assert_eq!(generation_at(&socket), stored);
        assert!(stored >= pushed, "stored {stored}, pushed {pushed}");
        wait_served(vip, &["b1", "b2", "b3"], Duration::from_secs(10));
        eprintln!(
            "ACTIVE {:.2} s after the database came back, generation {stored}",
            settled.as_secs_f64()
        );
        done.store(true, Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{carrier}: {seen:?}");
    eprintln!("generations the carrier ran: {seen:?}");
    assert_eq!(c.failovers(), 0.0);
    let members = c.get(0, &format!("/v2/lbaas/pools/{pool}/members")).body;
    assert_eq!(members["members"].as_array().unwrap().len(), 3, "{members}");
}

/// Sets its flag when dropped, unwinding included.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
