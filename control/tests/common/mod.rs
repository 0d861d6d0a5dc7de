//! The controller's test rig, on loopback: its API, a real SQLite file,
//! real `siphon-agent` and `siphon-dataplane` processes (mutual TLS,
//! certificates from a test CA), heartbeats, and a client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test file uses part of it

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{json, Value};
use siphon_control::client::{Answer, Client};
use siphon_control::config::{AgentTls, Auth, ControlConfig, Health, Push, VipSubnet};
use siphon_control::store::Database;
use siphon_testkit::agent::AgentToml;
use siphon_testkit::dataplane::Dataplane;
use siphon_testkit::netns::Netns;
use siphon_testkit::pki::Ca;
use siphon_testkit::process::{self, Proc};
use siphon_testkit::TempDir;
use siphon_testkit::{connect_greeting, eventually, free_port, free_udp_port, Backend};

pub const TOKEN: &str = "test-admin-token";
pub const SUBNET: &str = "5a1c0b4e-1f6c-4a43-9d3c-7a1d2b3c4d5e";
pub const NETWORK: &str = "0b8e6c1a-2d3f-4e5a-8b7c-9d0e1f2a3b4c";

/// One amphora: a `siphon-dataplane` and a `siphon-agent` process,
/// heartbeating to the controller.
pub struct Amphora {
    pub id: String,
    pub agent: Option<Proc>,
    pub dataplane: Option<Dataplane>,
    /// The agent's port (it comes back on the same one after a restart,
    /// as the controller knows it).
    pub port: u16,
    /// Where its heartbeats go (read at each agent start).
    pub heartbeat_to: Vec<SocketAddr>,
    /// The fleet's bootstrap heartbeat key.
    pub heartbeat_key: PathBuf,
    /// Lines of the agent's `[limits]` table (read at each agent start).
    pub limits: String,
    pub state_dir: PathBuf,
    pub dataplane_socket: PathBuf,
    pub dir: TempDir,
    /// Its own host, when it has one (else it shares this one's
    /// loopback). Dropped after its processes.
    pub host: Option<Host>,
}

/// The network namespace an amphora runs in, as a machine of its own.
pub struct Host {
    pub ns: Netns,
    /// Its management address: its agent listens there.
    pub mgmt: std::net::IpAddr,
    /// Where its VIPs go.
    pub vip_interface: String,
    /// Its interfaces other than `lo` (taken down when it dies).
    pub links: Vec<String>,
}

impl Amphora {
    /// Starts one heartbeating to every controller of `heartbeats`.
    pub fn start(id: &str, pki: &Pki, heartbeats: &[SocketAddr], key: &Path) -> Amphora {
        Amphora::start_with(id, pki, heartbeats, key, "")
    }

    /// The same, its agent with `limits` (lines of its `[limits]` table).
    pub fn start_with(
        id: &str,
        pki: &Pki,
        heartbeats: &[SocketAddr],
        key: &Path,
        limits: &str,
    ) -> Amphora {
        Amphora::start_on(None, id, pki, heartbeats, key, limits)
    }

    /// The same on `host` when given: its dataplane and agent run there,
    /// the agent on the management address.
    pub fn start_on(
        host: Option<Host>,
        id: &str,
        pki: &Pki,
        heartbeats: &[SocketAddr],
        key: &Path,
        limits: &str,
    ) -> Amphora {
        let dir = TempDir::new(&format!("amp-{id}"));
        let dataplane_socket = dir.path("dataplane.sock");
        let dataplane = Dataplane::start_in(host.as_ref().map(|h| &h.ns), &dataplane_socket);
        pki.amphora_ca
            .issue_to(&[id], &dir.path("agent.crt"), &dir.path("agent.key"));
        std::fs::write(dir.path("controller-ca.crt"), pki.controller_ca.pem()).unwrap();
        let port = free_port();
        let mut amp = Amphora {
            id: id.into(),
            agent: None,
            dataplane: Some(dataplane),
            port,
            heartbeat_to: heartbeats.to_vec(),
            heartbeat_key: key.to_owned(),
            limits: limits.into(),
            state_dir: dir.path("state"),
            dataplane_socket,
            dir,
            host,
        };
        amp.start_agent();
        amp
    }

    /// Where the controller reaches its agent.
    pub fn addr(&self) -> SocketAddr {
        let ip = self
            .host
            .as_ref()
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |h| h.mgmt);
        SocketAddr::new(ip, self.port)
    }

    /// Whether a TCP connection to its agent gets in (from its own host).
    fn agent_up(&self) -> bool {
        let addr = self.addr();
        let connect = || std::net::TcpStream::connect(addr).is_ok();
        match &self.host {
            Some(h) => h.ns.enter(connect).unwrap_or(false),
            None => connect(),
        }
    }

    /// Stops the dataplane (SIGKILL: its config is gone with it).
    pub fn stop_dataplane(&mut self) {
        self.dataplane = None;
    }

    /// Starts a dataplane with no config on the same socket.
    pub fn start_dataplane(&mut self) {
        self.stop_dataplane();
        self.dataplane = Some(Dataplane::start(&self.dataplane_socket));
    }

    /// Stops the agent as systemd would (SIGTERM), then makes sure.
    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.signal(nix::sys::signal::Signal::SIGTERM);
            a.wait_exit(Duration::from_secs(5));
        }
    }

    /// Starts the agent again, on the port it had, and waits until it
    /// accepts connections.
    pub fn start_agent(&mut self) {
        self.stop_agent();
        let config = AgentToml {
            id: &self.id,
            listen: self.addr().to_string(),
            dir: &self.dir.0,
            dataplane_socket: &self.dataplane_socket,
            state_dir: &self.state_dir,
            client_ca: &self.dir.path("controller-ca.crt"),
            heartbeat: Some((self.heartbeat_to.as_slice(), self.heartbeat_key.as_path())),
            limits: &self.limits,
        }
        .render();
        std::fs::write(self.dir.path("agent.toml"), config).unwrap();
        let bin = process::binary("siphon-agent");
        let mut cmd = match &self.host {
            Some(h) => h.ns.command(bin),
            None => std::process::Command::new(bin),
        };
        cmd.arg("--config").arg(self.dir.path("agent.toml"));
        let agent = Proc::spawn(cmd, &self.dir.path("agent.log"));
        assert!(
            eventually(Duration::from_secs(10), || self.agent_up()),
            "siphon-agent {} did not start: {}",
            self.id,
            agent.log_text()
        );
        self.agent = Some(agent);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// As if the machine died: no more heartbeats, no more traffic.
    pub fn kill(&mut self) {
        self.agent = None;
        self.stop_dataplane();
        if let Some(h) = &self.host {
            // Its links go dark: nothing it had answers any more, its
            // VIPs included.
            for l in &h.links {
                let _ = h.ns.ip(&["link", "set", l, "down"]);
            }
            return;
        }
        // A dead machine's addresses die with it. Here every amphora
        // shares `lo`, so the VIPs this one's agent added are taken off
        // by hand (a spare that adds one still there would find it
        // present and, rightly, never own it).
        let owned: Value = std::fs::read(self.state_dir.join("vips.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (dev, addrs) in owned.as_object().into_iter().flatten() {
            for a in addrs
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let _ = std::process::Command::new("ip")
                    .args(["addr", "del", a, "dev", dev])
                    .status();
            }
        }
    }
}

impl Drop for Amphora {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Pki {
    pub controller_ca: Ca,
    pub amphora_ca: Ca,
}

impl Pki {
    /// Two test CAs; the controller's client certificate, the amphora
    /// CA and the fleet's bootstrap heartbeat key written to `dir`.
    pub fn new(dir: &TempDir) -> Pki {
        let pki = Pki {
            controller_ca: Ca::new("controller CA"),
            amphora_ca: Ca::new("amphora CA"),
        };
        pki.controller_ca.issue_to(
            &["siphon-control"],
            &dir.path("client.crt"),
            &dir.path("client.key"),
        );
        std::fs::write(dir.path("amphora-ca.crt"), pki.amphora_ca.pem()).unwrap();
        siphon_testkit::pki::write_secret(
            &dir.path("heartbeat.key"),
            "a heartbeat key of enough length\n",
        );
        pki
    }
}

/// A VIP subnet of its own per rig, inside 127/8 (on loopback): its
/// first three octets.
pub fn vip_net() -> String {
    let n = (std::process::id() % 200) as u8 + 20;
    let third = free_port() % 250;
    format!("127.{n}.{third}")
}

/// A controller's config with the files of [`Pki::new`] in `dir`, its own
/// API and heartbeat ports, short timers, and `database`.
pub fn control_config(
    dir: &TempDir,
    auth: Auth,
    vip_net: &str,
    database: Database,
) -> ControlConfig {
    ControlConfig {
        listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        database,
        auth,
        vip_subnets: vec![VipSubnet {
            id: SUBNET.into(),
            name: "vips".into(),
            network_id: NETWORK.into(),
            network_name: "public".into(),
            cidr: format!("{vip_net}.0/24").parse().unwrap(),
            gateway_ip: None,
        }],
        amphorae: vec![],
        agent_tls: Some(AgentTls {
            cert: dir.path("client.crt"),
            key: dir.path("client.key"),
            ca: dir.path("amphora-ca.crt"),
        }),
        push: Push {
            attempts: 3,
            backoff_ms: 100,
            timeout_ms: 3_000,
        },
        health: Some(Health {
            listen: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
            key_file: Some(dir.path("heartbeat.key")),
            key_grace_ms: 60_000,
            heartbeat_timeout_ms: 1_000,
            check_interval_ms: 50,
            clock_window_ms: 30_000,
            failover_threshold: None,
            repair_timeout_ms: 5_000,
            retry_max_ms: 2_000,
        }),
        distributor: Default::default(),
        cluster: Default::default(),
        limits: Default::default(),
    }
}

/// Registers `amphorae` through `client` and waits until each is `READY`.
pub fn register(rt: &tokio::runtime::Runtime, client: &Client, amphorae: &[Amphora]) {
    for a in amphorae {
        let mut body = json!({"amphora": {"id": a.id, "lb_network_ip": a.addr().ip().to_string(), "agent_port": a.port()}});
        if let Some(h) = &a.host {
            body["amphora"]["vip_interface"] = h.vip_interface.clone().into();
        }
        let r = rt
            .block_on(client.call(Method::POST, "/v2/octavia/amphorae", Some(&body)))
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let start = Instant::now();
    for a in amphorae {
        loop {
            let path = format!("/v2/octavia/amphorae/{}", a.id);
            let r = rt.block_on(client.call(Method::GET, &path, None)).unwrap();
            if r.body["amphora"]["status"] == "READY" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} not READY: {}",
                a.id,
                r.body
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A controller with its files, two amphorae and a client.
pub struct Rig {
    pub rt: Arc<tokio::runtime::Runtime>,
    pub config: ControlConfig,
    pub handle: Option<siphon_control::Handle>,
    pub client: Client,
    pub amphorae: Vec<Amphora>,
    pub vip_net: String,
    pub _dir: TempDir,
}

impl Rig {
    pub fn new(tag: &str, amphorae: &[&str]) -> Rig {
        Rig::with_auth(
            tag,
            amphorae,
            Auth::Token {
                token: Some(TOKEN.into()),
                token_file: None,
            },
        )
    }

    pub fn with_auth(tag: &str, amphorae: &[&str], auth: Auth) -> Rig {
        let rt = siphon_testkit::runtime();
        let dir = TempDir::new(&format!("control-{tag}"));
        let pki = Pki::new(&dir);
        let vip_net = vip_net();
        let config = control_config(&dir, auth, &vip_net, dir.path("control.db").into());
        let handle = rt.block_on(siphon_control::start(config.clone())).unwrap();
        let client = Client::new(&format!("http://{}", handle.addr), Some(TOKEN.into())).unwrap();
        let hb = handle.heartbeat_addr.unwrap();
        let amps: Vec<Amphora> = amphorae
            .iter()
            .map(|id| Amphora::start(id, &pki, &[hb], &dir.path("heartbeat.key")))
            .collect();
        register(&rt, &client, &amps);
        Rig {
            rt,
            config,
            handle: Some(handle),
            client,
            amphorae: amps,
            vip_net,
            _dir: dir,
        }
    }

    pub fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.rt
            .block_on(self.client.call(method, path, body.as_ref()))
            .unwrap()
    }

    pub fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None)
    }

    /// Polls `path` until `key.field == want`; returns how long it took.
    pub fn wait_field(
        &self,
        path: &str,
        key: &str,
        field: &str,
        want: &str,
        limit: Duration,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let a = self.get(path);
            if a.body[key][field] == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{path}: {field} still {:?} after {limit:?}, want {want}: {}",
                a.body[key][field],
                a.body
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_active(&self, lb: &str) {
        self.wait_field(
            &format!("/v2/lbaas/loadbalancers/{lb}"),
            "loadbalancer",
            "provisioning_status",
            "ACTIVE",
            Duration::from_secs(10),
        );
    }

    pub fn restart(&mut self) {
        let h = self.handle.take().unwrap();
        self.rt.block_on(h.stop());
        let h = self
            .rt
            .block_on(siphon_control::start(self.config.clone()))
            .unwrap();
        self.handle = Some(h);
    }

    /// Stops the in-process controller and runs the real `siphon-control`
    /// binary on the same config (store, API and heartbeat ports): a
    /// process a test can kill with SIGKILL.
    pub fn controller_process(&mut self) -> ControllerProcess {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
        let mut p = ControllerProcess::new(&self.config, &self._dir, "control");
        p.start(&self.rt, &self.client);
        p
    }

    /// Creates LB → listener → pool → two members, waiting for each.
    pub fn build_lb(
        &self,
        backends: &[&Backend],
        port: u16,
    ) -> (String, String, String, Vec<String>) {
        let a = self.call(
            Method::POST,
            "/v2.0/lbaas/loadbalancers",
            Some(json!({"loadbalancer": {"name": "web", "vip_subnet_id": SUBNET, "admin_state_up": true}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let lb = a.body["loadbalancer"]["id"].as_str().unwrap().to_owned();
        assert_eq!(
            a.body["loadbalancer"]["provisioning_status"],
            "PENDING_CREATE"
        );
        assert_eq!(a.body["loadbalancer"]["operating_status"], "OFFLINE");
        assert_eq!(
            a.body["loadbalancer"]["vip_address"],
            format!("{}.1", self.vip_net)
        );
        self.wait_active(&lb);

        let a = self.call(
            Method::POST,
            "/v2/lbaas/listeners",
            Some(json!({"listener": {"name": "web-80", "protocol": "TCP", "protocol_port": port, "loadbalancer_id": lb}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let listener = a.body["listener"]["id"].as_str().unwrap().to_owned();
        // The load balancer is locked while the listener is pushed.
        let busy = self.call(
            Method::PUT,
            &format!("/v2/lbaas/loadbalancers/{lb}"),
            Some(json!({"loadbalancer": {"admin_state_up": false}})),
        );
        if busy.status != 200 {
            assert_eq!(busy.status, 409, "{}", busy.body);
            assert!(
                busy.fault().unwrap().contains("is immutable"),
                "{}",
                busy.body
            );
        } else {
            // The push was already done; put it back.
            self.wait_active(&lb);
            self.call(
                Method::PUT,
                &format!("/v2/lbaas/loadbalancers/{lb}"),
                Some(json!({"loadbalancer": {"admin_state_up": true}})),
            );
        }
        self.wait_active(&lb);

        let a = self.call(
            Method::POST,
            "/v2/lbaas/pools",
            Some(json!({"pool": {"name": "web-pool", "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN", "listener_id": listener}})),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        let pool = a.body["pool"]["id"].as_str().unwrap().to_owned();
        self.wait_active(&lb);
        let mut members = Vec::new();
        for b in backends {
            let a = self.call(
                Method::POST,
                &format!("/v2/lbaas/pools/{pool}/members"),
                Some(json!({"member": {"address": "127.0.0.1", "protocol_port": b.addr.port()}})),
            );
            assert_eq!(a.status, 201, "{}", a.body);
            assert_eq!(a.body["member"]["operating_status"], "NO_MONITOR");
            members.push(a.body["member"]["id"].as_str().unwrap().to_owned());
            self.wait_active(&lb);
        }
        (lb, listener, pool, members)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
    }
}

/// Whether a listing (a JSON array, as the stock CLI prints one) has an
/// entry whose `field` is `want`.
pub fn lists(listing: &Value, field: &str, want: &str) -> bool {
    listing
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x[field] == want))
}

/// Which backends answer `n` connections to `addr`.
pub fn greetings(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            connect_greeting(addr)
                .map(|(_, g)| g)
                .unwrap_or_else(|e| format!("error: {e}"))
        })
        .collect()
}

/// `config` as the controller's TOML file says it (the parts the tests
/// set).
pub fn controller_toml(c: &ControlConfig) -> String {
    let h = c.health.as_ref().unwrap();
    let tls = c.agent_tls.as_ref().unwrap();
    let subnet = &c.vip_subnets[0];
    let auth = match &c.auth {
        Auth::Token { token, .. } => {
            format!(
                "mode = \"token\"\ntoken = \"{}\"",
                token.as_deref().unwrap()
            )
        }
        Auth::Noauth => "mode = \"noauth\"".into(),
    };
    // A path is a top-level key (before any table); PostgreSQL a table.
    let database = match &c.database {
        Database::Sqlite(path) => format!("database = \"{}\"", path.display()),
        Database::Postgres {
            url,
            password_file,
            max_connections,
        } => format!(
            "[database]\nurl = \"{url}\"\npassword_file = \"{}\"\nmax_connections = {max_connections}",
            password_file.as_ref().unwrap().display()
        ),
    };
    let cluster = match &c.cluster.name {
        Some(name) => format!("name = \"{name}\"\n"),
        None => String::new(),
    };
    format!(
        r#"listen = "{listen}"
{database}
[auth]
{auth}
[cluster]
{cluster}claim_ttl_ms = {ttl}
[[vip_subnets]]
id = "{sid}"
name = "{sname}"
network_id = "{net}"
cidr = "{cidr}"
[agent_tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"
[push]
attempts = {attempts}
backoff_ms = {backoff}
timeout_ms = {timeout}
[health]
listen = "{hb}"
key_file = "{hb_key}"
heartbeat_timeout_ms = {hb_timeout}
check_interval_ms = {check}
repair_timeout_ms = {repair}
retry_max_ms = {retry}
"#,
        listen = c.listen,
        ttl = c.cluster.claim_ttl_ms,
        sid = subnet.id,
        sname = subnet.name,
        net = subnet.network_id,
        cidr = subnet.cidr,
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = tls.ca.display(),
        attempts = c.push.attempts,
        backoff = c.push.backoff_ms,
        timeout = c.push.timeout_ms,
        hb = h.listen,
        hb_key = h.key_file.as_ref().unwrap().display(),
        hb_timeout = h.heartbeat_timeout_ms,
        check = h.check_interval_ms,
        repair = h.repair_timeout_ms,
        retry = h.retry_max_ms,
    )
}

/// `siphon-control` run as its own process (see
/// [`Rig::controller_process`]); killed with SIGKILL on drop.
pub struct ControllerProcess {
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Option<Proc>,
    /// The network namespace it runs in, if not this one.
    netns: Option<String>,
}

impl ControllerProcess {
    /// Writes `config` as `<name>.toml` in `dir` (logging to `<name>.log`);
    /// not started yet.
    pub fn new(config: &ControlConfig, dir: &TempDir, name: &str) -> ControllerProcess {
        let path = dir.path(&format!("{name}.toml"));
        std::fs::write(&path, controller_toml(config)).unwrap();
        ControllerProcess {
            config: path,
            log: dir.path(&format!("{name}.log")),
            child: None,
            netns: None,
        }
    }

    /// To run in `ns` (which must outlive it).
    pub fn in_netns(mut self, ns: &Netns) -> ControllerProcess {
        self.netns = Some(ns.name.clone());
        self
    }

    /// Starts it and waits until its API answers `client`.
    pub fn start(&mut self, rt: &tokio::runtime::Runtime, client: &Client) {
        self.spawn();
        self.wait_up(rt, client);
    }

    /// Starts the process, without waiting.
    pub fn spawn(&mut self) {
        let bin = env!("CARGO_BIN_EXE_siphon-control");
        let mut cmd = match &self.netns {
            Some(ns) => siphon_testkit::netns::exec(ns, bin),
            None => std::process::Command::new(bin),
        };
        cmd.args(["--config", self.config.to_str().unwrap()]);
        self.child = Some(Proc::spawn(cmd, &self.log));
    }

    /// Waits until its API answers `client`.
    pub fn wait_up(&mut self, rt: &tokio::runtime::Runtime, client: &Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = rt
                .block_on(client.call(Method::GET, "/v2/octavia/amphorae", None))
                .is_ok_and(|a| a.status == 200);
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "siphon-control did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) {
        self.child = None;
    }
}

/// A venv under `target/` with the pinned stock clients
/// (`tests/stock/requirements.txt`), installed from PyPI once.
pub fn stock_clients() -> std::path::PathBuf {
    let venv = siphon_testkit::process::target_dir().join("stock-clients");
    let req = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stock/requirements.txt");
    let wanted = std::fs::read_to_string(&req).unwrap();
    let marker = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return venv;
    }
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv));
    run(std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&req));
    std::fs::write(&marker, wanted).unwrap();
    venv
}

/// `openstack ARGS -f json` (when it prints), as the stock CLI runs with
/// no Keystone: `OS_AUTH_TYPE=none`, `OS_ENDPOINT=.../v2.0`.
pub fn openstack(venv: &Path, endpoint: &str, args: &[&str]) -> Value {
    let mut cmd = std::process::Command::new(venv.join("bin/openstack"));
    cmd.args(args)
        .env("OS_AUTH_TYPE", "none")
        .env("OS_ENDPOINT", endpoint);
    let stdout = stock_output(cmd, &format!("openstack {}", args.join(" ")));
    serde_json::from_str(&stdout).unwrap_or(Value::Null)
}

/// Runs a stock client (outside any clouds.yaml) and returns its stdout;
/// a failure fails the test with both outputs.
pub fn stock_output(mut cmd: std::process::Command, label: &str) -> String {
    let out = cmd.env_remove("OS_CLOUD").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{label}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
