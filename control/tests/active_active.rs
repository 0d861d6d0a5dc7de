#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! One load balancer on N amphorae at once, end to end, in network
//! namespaces the test creates and removes:
//!
//! ```text
//!   client ──┐                      ┌── amphora a1 (agent + dataplane, VIP on lo)
//!  (24 src)  │                      ├── amphora a2
//!            ├── router ── br0 ─────┼── amphora a3
//!  backends ─┘  (siphon-control,    ├── amphora a4 (spare, registered later)
//!  b0 b1 b2      VIP route over a   └── amphora a5 (spare, for the scale-out)
//!                resilient nexthop
//!                group)
//! ```
//!
//! Every process is the real binary: `siphon-control` in the router's
//! namespace (driving its nexthops through the `linux-ecmp` distributor),
//! `siphon-agent` and `siphon-dataplane` in each amphora's. The test talks
//! to the controller with the `siphon` CLI only.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use siphon_testkit::agent::AgentToml;
use siphon_testkit::bird::Bird;
use siphon_testkit::netns::Netns;
use siphon_testkit::pki::Ca;
use siphon_testkit::process::{self, Proc};
use siphon_testkit::root_or_skip;
use siphon_testkit::TempDir;

const VIP: &str = "198.18.100.10";
const SUBNET: &str = "6d0f4a2e-3b1c-4e5d-9f8a-1b2c3d4e5f60";
/// The BGP test's second VIP (dual stack), from the VIP network's IPv6
/// subnet.
const VIP6: &str = "2001:db8:100::10";
const SUBNET6: &str = "9a3c5e7f-1b2d-4c6e-8f0a-3d4e5f6a7b82";
/// IPv6 client sources (the first ones of `source6`).
const SOURCES6: usize = 8;
const NETWORK: &str = "7e1a5b3f-4c2d-4f6e-8a9b-2c3d4e5f6a71";
const TOKEN: &str = "active-active-token";
/// Client source addresses: 198.18.0.10 and up.
const SOURCES: usize = 24;
/// How long a test connection waits to connect, and then for each answer.
const WAIT: Duration = Duration::from_secs(2);
/// The linux-ecmp test's resilient group idle timer: its listeners' 6 s
/// data timeouts plus idle_margin_s.
const IDLE_TIMER: Duration = Duration::from_secs(7);
const API: &str = "http://127.0.0.1:9876";

/// `bin args` inside `ns`, output in `log`; killed on drop.
fn spawn_in(ns: &Netns, bin: &Path, args: &[&str], log: PathBuf) -> Proc {
    let mut cmd = ns.command(bin);
    cmd.args(args);
    Proc::spawn(cmd, &log)
}

fn sh(ns: &Netns, script: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c", script])
        .status()
        .unwrap();
    assert!(st.success(), "{script}");
}

/// One amphora: its namespace, address and processes (and its BIRD,
/// over BGP).
struct Amp {
    id: String,
    addr: String,
    dir: PathBuf,
    procs: Vec<Proc>,
    bird: Option<Bird>,
    ns: Netns,
}

impl Amp {
    /// As if the machine died: its processes killed, its link down.
    fn kill(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        self.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    }
}

/// The whole topology. Processes are declared (and so dropped) before
/// the namespaces they run in.
struct World {
    controller: Option<Proc>,
    amps: Vec<Amp>,
    /// The router's BGP daemon, over BGP.
    bird: Option<Bird>,
    rt: Netns,
    cl: Netns,
    /// The backends' namespace, kept for the test's length.
    _be: Netns,
    _backends: Arc<tokio::runtime::Runtime>,
    dir: TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.controller.iter().map(|p| p.log.clone()).chain(
                self.amps
                    .iter()
                    .flat_map(|a| a.procs.iter().map(|p| p.log.clone())),
            );
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {} (last lines)", log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        self.controller.take();
        for a in &mut self.amps {
            a.procs.clear();
            a.bird = None;
        }
        self.bird = None;
    }
}

impl World {
    fn build(amphorae: usize) -> World {
        let dir = TempDir::new("active-active");
        let rt = Netns::create("aa-rt").unwrap();
        let cl = Netns::create("aa-cl").unwrap();
        let be = Netns::create("aa-be").unwrap();
        // The router: forwards, hashes flows on addresses and ports.
        sh(
            &rt,
            "echo 1 > /proc/sys/net/ipv4/ip_forward && \
             echo 1 > /proc/sys/net/ipv4/fib_multipath_hash_policy && \
             echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter && \
             echo 1 > /proc/sys/net/ipv6/conf/all/forwarding && \
             echo 1 > /proc/sys/net/ipv6/fib_multipath_hash_policy",
        );
        rt.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        rt.ip(&["addr", "add", "198.18.1.1/24", "dev", "br0"])
            .unwrap();
        rt.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "br0", "nodad"])
            .unwrap();
        rt.ip(&["link", "set", "br0", "up"]).unwrap();
        // Client and backends, each on a link of its own.
        for (ns, name, rt_addr, addrs) in [
            (
                &cl,
                "vc",
                "198.18.0.1/24",
                (0..SOURCES)
                    .map(|i| format!("198.18.0.{}/24", 10 + i))
                    .collect::<Vec<_>>(),
            ),
            (
                &be,
                "vb",
                "198.18.2.1/24",
                (0..3).map(|i| format!("198.18.2.{}/24", 10 + i)).collect(),
            ),
        ] {
            rt.ip(&[
                "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])
            .unwrap();
            rt.ip(&["addr", "add", rt_addr, "dev", name]).unwrap();
            rt.ip(&["link", "set", name, "up"]).unwrap();
            for a in &addrs {
                ns.ip(&["addr", "add", a, "dev", "eth0"]).unwrap();
            }
            ns.ip(&["link", "set", "eth0", "up"]).unwrap();
            let gw = rt_addr.split('/').next().unwrap();
            ns.ip(&["route", "add", "default", "via", gw]).unwrap();
        }
        // The client has IPv6 sources too.
        rt.ip(&["addr", "add", "2001:db8::1/64", "dev", "vc", "nodad"])
            .unwrap();
        for i in 0..SOURCES6 {
            let a = format!("{}/64", source6(i));
            cl.ip(&["addr", "add", &a, "dev", "eth0", "nodad"]).unwrap();
        }
        cl.ip(&["-6", "route", "add", "default", "via", "2001:db8::1"])
            .unwrap();
        // Amphorae on the bridge.
        let mut amps = Vec::new();
        for i in 1..=amphorae {
            let ns = Netns::create(&format!("aa-a{i}")).unwrap();
            let port = format!("va{i}");
            rt.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])
            .unwrap();
            rt.ip(&["link", "set", &port, "master", "br0", "up"])
                .unwrap();
            let addr = format!("198.18.1.{}", 10 + i);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
                .unwrap();
            let addr6 = format!("2001:db8:1::{}/64", 10 + i);
            ns.ip(&["addr", "add", &addr6, "dev", "eth0", "nodad"])
                .unwrap();
            ns.ip(&["link", "set", "eth0", "up"]).unwrap();
            ns.ip(&["route", "add", "default", "via", "198.18.1.1"])
                .unwrap();
            ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"])
                .unwrap();
            let adir = dir.path(&format!("a{i}"));
            std::fs::create_dir_all(&adir).unwrap();
            amps.push(Amp {
                id: format!("a{i}"),
                addr,
                dir: adir,
                procs: Vec::new(),
                bird: None,
                ns,
            });
        }
        let backends = siphon_testkit::runtime();
        start_backends(&be, &backends);
        World {
            controller: None,
            amps,
            bird: None,
            rt,
            cl,
            _be: be,
            _backends: backends,
            dir,
        }
    }

    /// Certificates, the controller's config, and the controller itself,
    /// driving the router's nexthops (`linux-ecmp`).
    fn start_controller(&mut self) {
        let distributor = format!(
            "driver = \"linux-ecmp\"\nnetns = \"/run/netns/{}\"\ninterface = \"br0\"\nbuckets = 128\nidle_timer_s = 1\nidle_margin_s = 1\nresync_s = 1\n",
            self.rt.name
        );
        self.start_controller_with(&distributor);
    }

    /// The same with `distributor` (the lines of its table).
    fn start_controller_with(&mut self, distributor: &str) {
        let d = &self.dir;
        let controller_ca = Ca::new("controller CA");
        let amphora_ca = Ca::new("amphora CA");
        controller_ca.issue_to(
            &["siphon-control"],
            &d.path("client.crt"),
            &d.path("client.key"),
        );
        std::fs::write(d.path("amphora-ca.crt"), amphora_ca.pem()).unwrap();
        std::fs::write(d.path("controller-ca.crt"), controller_ca.pem()).unwrap();
        siphon_testkit::pki::write_secret(
            &d.path("heartbeat.key"),
            "an active-active heartbeat key\n",
        );
        for a in &self.amps {
            amphora_ca.issue_to(&[&a.id], &a.dir.join("agent.crt"), &a.dir.join("agent.key"));
        }
        let config = format!(
            r#"listen = "127.0.0.1:9876"
database = "{db}"
[auth]
mode = "token"
token = "{TOKEN}"
[[vip_subnets]]
id = "{SUBNET}"
name = "vips"
network_id = "{NETWORK}"
cidr = "198.18.100.0/24"
[[vip_subnets]]
id = "{SUBNET6}"
name = "vips6"
network_id = "{NETWORK}"
cidr = "2001:db8:100::/64"
[agent_tls]
cert = "{client_crt}"
key = "{client_key}"
ca = "{amphora_ca}"
[push]
attempts = 3
backoff_ms = 100
timeout_ms = 3000
[health]
listen = "198.18.1.1:5555"
key_file = "{hb}"
heartbeat_timeout_ms = 600
check_interval_ms = 50
failover_threshold = 3
[distributor]
{distributor}"#,
            db = d.path("control.db").display(),
            client_crt = d.path("client.crt").display(),
            client_key = d.path("client.key").display(),
            amphora_ca = d.path("amphora-ca.crt").display(),
            hb = d.path("heartbeat.key").display(),
        );
        std::fs::write(d.path("control.toml"), config).unwrap();
        self.spawn_controller("control.log");
    }

    fn spawn_controller(&mut self, log: &str) {
        let conf = self.dir.path("control.toml");
        self.controller = Some(spawn_in(
            &self.rt,
            Path::new(env!("CARGO_BIN_EXE_siphon-control")),
            &["--config", conf.to_str().unwrap()],
            self.dir.path(log),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_siphon(&["amphora", "list"]).is_err() {
            assert!(Instant::now() < deadline, "the controller did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Amphora `i`'s dataplane, as its unit runs it: on SIGTERM it drops
    /// new connection attempts for 1.5 s while its agent withdraws the
    /// VIP, then drains.
    fn spawn_dataplane(&self, i: usize, log: &str) -> Proc {
        let a = &self.amps[i - 1];
        let sock = a.dir.join("dataplane.sock");
        spawn_in(
            &a.ns,
            &process::binary("siphon-dataplane"),
            &[
                "run",
                "--socket",
                sock.to_str().unwrap(),
                "--workers",
                "1",
                "--drain-delay-ms",
                "1500",
            ],
            a.dir.join(log),
        )
    }

    /// Starts amphora `i`'s dataplane and agent (heartbeats every 200 ms).
    fn start_amphora(&mut self, i: usize) {
        let agent = process::binary("siphon-agent");
        let hb = self.dir.path("heartbeat.key");
        let ca = self.dir.path("controller-ca.crt");
        let dataplane = self.spawn_dataplane(i, "dataplane.log");
        let a = &mut self.amps[i - 1];
        let sock = a.dir.join("dataplane.sock");
        a.procs.push(dataplane);
        let heartbeats_to: [SocketAddr; 1] = ["198.18.1.1:5555".parse().unwrap()];
        let config = AgentToml {
            id: &a.id,
            listen: format!("{}:9443", a.addr),
            dir: &a.dir,
            dataplane_socket: &sock,
            state_dir: &a.dir.join("state"),
            client_ca: &ca,
            heartbeat: Some((&heartbeats_to[..], hb.as_path())),
            limits: "",
        }
        .render();
        let config = match &a.bird {
            Some(b) => format!(
                "{config}[bgp]\nbird_socket = \"{}\"\nbird_config = \"{}\"\nwithdraw_delay_ms = 500\n",
                b.socket.display(),
                b.config.display()
            ),
            None => config,
        };
        let conf = a.dir.join("agent.toml");
        std::fs::write(&conf, config).unwrap();
        // The agent connects to the dataplane's socket: let it appear.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "dataplane of {} did not start",
                a.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a.procs.push(spawn_in(
            &a.ns,
            &agent,
            &["--config", conf.to_str().unwrap()],
            a.dir.join("agent.log"),
        ));
    }

    fn kill_amphora(&mut self, i: usize) {
        self.amps[i - 1].kill();
    }

    fn try_siphon(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.rt.name])
            .arg(env!("CARGO_BIN_EXE_siphon"))
            .args(["--endpoint", API, "--token", TOKEN])
            .args(args)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "siphon {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    /// The `siphon` CLI, in the router's namespace.
    fn siphon(&self, args: &[&str]) -> Value {
        self.try_siphon(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn register(&self, i: usize) {
        let a = &self.amps[i - 1];
        self.siphon(&[
            "amphora",
            "register",
            "--id",
            &a.id,
            "--address",
            &a.addr,
            "--port",
            "9443",
            "--vip-interface",
            "lo",
        ]);
    }

    fn wait_amphora(&self, id: &str, status: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let v = self.siphon(&["amphora", "show", id]);
            if v["amphora"]["status"] == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "amphora {id} not {status}: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The router's nexthop group for the VIP: its members' gateways.
    fn group(&self) -> BTreeSet<String> {
        let out = Command::new("ip")
            .args(["-n", &self.rt.name, "-j", "nexthop", "show"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let all = v.as_array().cloned().unwrap_or_default();
        let gateway = |id: &Value| {
            all.iter()
                .find(|n| &n["id"] == id)
                .and_then(|n| n["gateway"].as_str())
                .map(str::to_owned)
        };
        all.iter()
            .filter_map(|n| n["group"].as_array())
            .flatten()
            .filter_map(|m| gateway(&m["id"]))
            .collect()
    }

    fn wait_group(&self, want: &BTreeSet<String>, within: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let g = self.group();
            if &g == want {
                return t.elapsed();
            }
            assert!(t.elapsed() < within, "nexthop group {g:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn addrs(&self, which: &[usize]) -> BTreeSet<String> {
        which
            .iter()
            .map(|i| self.amps[i - 1].addr.clone())
            .collect()
    }

    /// Each running amphora's dataplane config as its agent stored it,
    /// without the generation (each amphora counts its own).
    fn configs(&self, which: &[usize]) -> Vec<Value> {
        which
            .iter()
            .map(|i| {
                let a = &self.amps[i - 1];
                let text = std::fs::read_to_string(a.dir.join("state/config.json")).unwrap();
                let mut v: Value = serde_json::from_str(&text).unwrap();
                v.as_object_mut().unwrap().remove("generation");
                v
            })
            .collect()
    }
}

/// Three backends, each on TCP 8080 (greets with `NAME PEER\n`, then
/// echoes) and UDP 5353 (answers `NAME PEER`): PEER is the amphora that
/// carried the flow.
fn start_backends(be: &Netns, rt: &Arc<tokio::runtime::Runtime>) {
    for i in 0..3 {
        let name = format!("b{i}");
        let tcp: SocketAddr = format!("198.18.2.{}:8080", 10 + i).parse().unwrap();
        let udp: SocketAddr = format!("198.18.2.{}:5353", 10 + i).parse().unwrap();
        let l = be.enter(|| siphon_testkit::listen(tcp)).unwrap();
        let u = be.enter(|| UdpSocket::bind(udp).unwrap()).unwrap();
        u.set_nonblocking(true).unwrap();
        let n = name.clone();
        rt.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((mut s, peer)) = l.accept().await else {
                    continue;
                };
                let greet = format!("{n} {}\n", peer.ip());
                tokio::spawn(async move {
                    if s.write_all(greet.as_bytes()).await.is_ok() {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
            }
        });
        rt.spawn(async move {
            let u = tokio::net::UdpSocket::from_std(u).unwrap();
            let mut buf = [0u8; 512];
            loop {
                let Ok((_, from)) = u.recv_from(&mut buf).await else {
                    continue;
                };
                let _ = u
                    .send_to(format!("{name} {}", from.ip()).as_bytes(), from)
                    .await;
            }
        });
    }
}

fn source(i: usize) -> IpAddr {
    format!("198.18.0.{}", 10 + i % SOURCES).parse().unwrap()
}

fn source6(i: usize) -> IpAddr {
    format!("2001:db8::{}", 10 + i % SOURCES6).parse().unwrap()
}

/// Who answered a flow: the backend, and the amphora that carried it.
type Answer = (String, String);

fn parse_answer(line: &str) -> Option<Answer> {
    let mut it = line.split_whitespace();
    Some((it.next()?.to_owned(), it.next()?.to_owned()))
}

/// A TCP connection through the VIP from `src`, greeted.
struct Held {
    src: IpAddr,
    stream: BufReader<TcpStream>,
    seen: Answer,
}

impl Held {
    /// Opened in the client's namespace.
    fn open(src: IpAddr) -> std::io::Result<Held> {
        Held::open_within(src, WAIT)
    }

    /// The same, given up after `within` (connect, then the greeting).
    fn open_within(src: IpAddr, within: Duration) -> std::io::Result<Held> {
        let vip = SocketAddr::new(if src.is_ipv4() { VIP } else { VIP6 }.parse().unwrap(), 80);
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(vip),
            socket2::Type::STREAM,
            None,
        )?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.connect_timeout(&vip.into(), within)?;
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(within))?;
        let mut stream = BufReader::new(s);
        let mut line = String::new();
        stream.read_line(&mut line)?;
        let seen = parse_answer(&line)
            .ok_or_else(|| std::io::Error::other(format!("greeting {line:?}")))?;
        Ok(Held { src, stream, seen })
    }

    /// One echoed message: whether the connection still works.
    fn alive(&mut self) -> bool {
        let msg = b"still there?\n";
        if self.stream.get_mut().write_all(msg).is_err() {
            return false;
        }
        let mut back = [0u8; 13];
        self.stream.read_exact(&mut back).is_ok() && &back == msg
    }
}

/// One short connection from `src` (greeted, one echo, each step within
/// `within`): who answered.
fn greeted(src: IpAddr, within: Duration) -> Result<Answer, String> {
    let mut h = Held::open_within(src, within).map_err(|e| e.to_string())?;
    if h.alive() {
        Ok(h.seen.clone())
    } else {
        Err("no echo".into())
    }
}

/// `n` short connections spread over the sources: who answered each.
fn connections(cl: &Netns, n: usize) -> Vec<(IpAddr, Result<Answer, String>)> {
    connections_from(cl, n, source)
}

/// The same from `source(0)`, `source(1)`, ...
fn connections_from(
    cl: &Netns,
    n: usize,
    source: fn(usize) -> IpAddr,
) -> Vec<(IpAddr, Result<Answer, String>)> {
    cl.enter(|| {
        (0..n)
            .map(|i| (source(i), greeted(source(i), WAIT)))
            .collect()
    })
    .unwrap()
}

/// One connection of a [`load`].
#[derive(Debug)]
struct Attempt {
    started: Instant,
    took: Duration,
    answer: Result<Answer, String>,
}

/// New connections one after another (10 ms apart) for `run`, from
/// `source(first)`, `source(first + stride)`, ..., each given `within`: a
/// steady load when several run at once.
fn load(
    cl: &Netns,
    source: fn(usize) -> IpAddr,
    (first, stride): (usize, usize),
    run: Duration,
    within: Duration,
) -> Vec<Attempt> {
    cl.enter(|| {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut i = first;
        while start.elapsed() < run {
            let started = Instant::now();
            let answer = greeted(source(i), within);
            out.push(Attempt {
                started,
                took: started.elapsed(),
                answer,
            });
            i += stride;
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    })
    .unwrap()
}

fn hold(cl: &Netns, n: usize) -> Vec<Held> {
    cl.enter(|| {
        (0..n)
            .map(|i| Held::open(source(i)).expect("connection through the VIP"))
            .collect()
    })
    .unwrap()
}

/// A UDP flow through the VIP (one client socket).
struct Flow {
    socket: UdpSocket,
    seen: Answer,
}

impl Flow {
    fn ask(socket: &UdpSocket) -> Option<Answer> {
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            socket.send(b"which?").ok()?;
            if let Ok(n) = socket.recv(&mut buf) {
                return parse_answer(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        None
    }
}

fn flows(cl: &Netns, n: usize) -> Vec<Flow> {
    cl.enter(|| {
        (0..n)
            .map(|i| {
                let socket = UdpSocket::bind(SocketAddr::new(source(i), 0)).unwrap();
                socket.connect(format!("{VIP}:53")).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(700)))
                    .unwrap();
                let seen = Flow::ask(&socket).expect("UDP answer through the VIP");
                Flow { socket, seen }
            })
            .collect()
    })
    .unwrap()
}

/// Asks every flow again: (backend changed, amphora changed) counts.
fn recheck(flows: &mut [Flow]) -> (usize, usize) {
    let (mut backend, mut amphora) = (0, 0);
    for f in flows.iter_mut() {
        let now = Flow::ask(&f.socket).expect("UDP flow answered");
        backend += usize::from(now.0 != f.seen.0);
        amphora += usize::from(now.1 != f.seen.1);
        f.seen = now;
    }
    (backend, amphora)
}

fn lb_status(w: &World, lb: &str) -> Value {
    w.siphon(&["loadbalancer", "show", lb])["loadbalancer"].clone()
}

/// New connections after `dead` died: every one served, none by it.
fn all_avoid(cl: &Netns, dead: &str, source: fn(usize) -> IpAddr) {
    for (src, r) in connections_from(cl, SOURCES * 4, source) {
        let (_, amphora) = r.unwrap_or_else(|e| panic!("{src} after the kill: {e}"));
        assert_ne!(amphora, dead);
    }
}

/// The router's routes to the VIP (`ip -j route show`).
fn vip_routes(w: &World) -> Vec<Value> {
    routes_to(w, &format!("{VIP}/32"))
}

fn routes_to(w: &World, prefix: &str) -> Vec<Value> {
    let family = if prefix.contains(':') { "-6" } else { "-4" };
    let out = Command::new("ip")
        .args(["-n", &w.rt.name, family, "-j", "route", "show", prefix])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array().cloned().unwrap_or_default()
}

fn route_present(w: &World) -> bool {
    !vip_routes(w).is_empty()
}

/// Checks `conns` all served, over every one of `amphorae`, each
/// source on one backend; how many sources more than one amphora carried.
fn check_spread(conns: &[(IpAddr, Result<Answer, String>)], amphorae: usize) -> usize {
    let mut per_source: BTreeMap<IpAddr, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (src, r) in conns {
        let (backend, amphora) = r.clone().unwrap_or_else(|e| panic!("{src}: {e}"));
        let e = per_source.entry(*src).or_default();
        e.0.insert(backend);
        e.1.insert(amphora);
    }
    let carriers: BTreeSet<&String> = per_source.values().flat_map(|(_, a)| a).collect();
    assert_eq!(carriers.len(), amphorae, "carried by {carriers:?}");
    for (src, (backends, _)) in &per_source {
        assert_eq!(backends.len(), 1, "{src} reached {backends:?}");
    }
    per_source.values().filter(|(_, a)| a.len() > 1).count()
}

fn wait_field(w: &World, lb: &str, field: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = lb_status(w, lb);
        if v[field] == want {
            return;
        }
        assert!(Instant::now() < deadline, "{field} not {want}: {v:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_lb(w: &World, lb: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = lb_status(w, lb);
        if v["provisioning_status"] == "ACTIVE" {
            return;
        }
        assert!(Instant::now() < deadline, "load balancer not ACTIVE: {v:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The load balancer, through the CLI: TCP 80 and UDP 53 on the VIP, on
/// three amphorae, both keyed on the client's address, over the three
/// backends; `ACTIVE`.
fn create_lb(w: &World, lb_fields: &[&str], listener_fields: &[&str]) -> String {
    // The load balancer, through the CLI: TCP 80 and UDP 53, both keyed
    // on the client's address, with `lb_fields` and `listener_fields`
    // (`--set k=v`).
    let mut args = vec![
        "loadbalancer",
        "create",
        "--name",
        "aa",
        "--vip-subnet-id",
        SUBNET,
        "--vip-address",
        VIP,
        "--topology",
        "ACTIVE_ACTIVE",
        "--amphora-count",
        "3",
        "--wait",
    ];
    args.extend_from_slice(lb_fields);
    let lb = w.siphon(&args)["loadbalancer"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (proto, port, member_port) in [("TCP", "80", "8080"), ("UDP", "53", "5353")] {
        let mut args = vec![
            "listener",
            "create",
            "--protocol",
            proto,
            "--protocol-port",
            port,
            "--loadbalancer",
            &lb,
            "--wait",
        ];
        args.extend_from_slice(listener_fields);
        let l = w.siphon(&args)["listener"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let p = w.siphon(&[
            "pool",
            "create",
            "--protocol",
            proto,
            "--lb-algorithm",
            "SOURCE_IP",
            "--listener",
            &l,
            "--wait",
        ])["pool"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        for b in 0..3 {
            w.siphon(&[
                "member",
                "create",
                &p,
                "--name",
                &format!("b{b}"),
                "--address",
                &format!("198.18.2.{}", 10 + b),
                "--protocol-port",
                member_port,
                "--wait",
            ]);
        }
    }
    wait_lb(w, &lb, Duration::from_secs(10));
    lb
}

#[test]
fn one_load_balancer_on_n_amphorae_survives_a_loss_and_scales_out() {
    if !root_or_skip("active-active in network namespaces") {
        return;
    }
    siphon_testkit::raise_fd_limit();
    let mut w = World::build(5);
    w.start_controller();
    for i in 1..=5 {
        w.start_amphora(i);
    }
    for i in 1..=3 {
        w.register(i);
    }
    for id in ["a1", "a2", "a3"] {
        w.wait_amphora(id, "READY", Duration::from_secs(10));
    }

    // Idle connections are closed after 6 s, so the router's buckets move
    // to a joining amphora only once idle for 7 s (6 s + idle_margin_s;
    // idle_timer_s = 1 is only the least).
    let timeouts = [
        "--set",
        "timeout_client_data=6000",
        "--set",
        "timeout_member_data=6000",
    ];
    let lb = create_lb(&w, &[], &timeouts);
    // A listener that would keep an idle connection forever is refused:
    // its bucket could move under it.
    let listeners = w.siphon(&["listener", "list"]);
    let l = listeners["listeners"][0]["id"].as_str().unwrap();
    let e = w
        .try_siphon(&["listener", "set", l, "--set", "timeout_member_data=0"])
        .unwrap_err();
    assert!(e.contains("must both be above 0"), "{e}");

    // The same config on every amphora, and the VIP routed over all three.
    let configs = w.configs(&[1, 2, 3]);
    assert!(configs[0]["pools"].as_array().is_some_and(|p| p.len() == 2));
    assert_eq!(configs[0], configs[1]);
    assert_eq!(configs[0], configs[2]);
    w.wait_group(&w.addrs(&[1, 2, 3]), Duration::from_secs(5));

    // Many sources: spread over the three, each source on one backend.
    let conns = connections(&w.cl, SOURCES * 6);
    let multi = check_spread(&conns, 3);
    println!(
        "spread: {} connections from {SOURCES} sources over 3 amphorae; {multi} sources were carried by more than one amphora and each kept one backend",
        conns.len(),
    );
    assert!(multi > 0);

    // Flows that must live through the loss of an amphora.
    let mut udp = flows(&w.cl, SOURCES * 2);
    let mut held = hold(&w.cl, SOURCES * 2);
    let dead = w.amps[1].addr.clone();
    let on_dead = held.iter().filter(|h| h.seen.1 == dead).count();
    let udp_on_dead = udp.iter().filter(|f| f.seen.1 == dead).count();

    // Kill a2.
    let killed = Instant::now();
    w.kill_amphora(2);
    let gone = w.wait_group(&w.addrs(&[1, 3]), Duration::from_secs(5));
    let failover = killed.elapsed();
    println!(
        "failover: a2's nexthop left the group {:.0} ms after the kill (heartbeats every 200 ms, timeout 600 ms)",
        failover.as_secs_f64() * 1e3
    );
    assert!(
        failover < Duration::from_secs(1),
        "{failover:?} ({gone:?} of polling)"
    );
    // From then on, new connections succeed, on the survivors.
    all_avoid(&w.cl, &dead, source);
    // UDP flows keep their backend, wherever they are carried now.
    let (changed, moved) = recheck(&mut udp);
    println!(
        "after the loss: {changed} of {} UDP flows changed backend, {moved} moved to another amphora ({udp_on_dead} were on a2)",
        udp.len()
    );
    assert_eq!(changed, 0);
    assert_eq!(moved, udp_on_dead);
    // Established TCP connections on the survivors are untouched.
    let mut survivors_ok = 0;
    for h in held.iter_mut().filter(|h| h.seen.1 != dead) {
        assert!(h.alive(), "{} via {} broke", h.src, h.seen.1);
        survivors_ok += 1;
    }
    println!("established TCP: {survivors_ok} on the survivors all alive; {on_dead} were on a2");
    drop(held);
    // No spare yet: still served, by fewer amphorae than asked for.
    wait_field(&w, &lb, "operating_status", "DEGRADED");

    // A spare comes in: it takes a2's place (config first, then traffic).
    let registered = Instant::now();
    w.register(4);
    w.wait_group(&w.addrs(&[1, 3, 4]), Duration::from_secs(15));
    println!(
        "spare a4 in the group {:.2} s after its registration",
        registered.elapsed().as_secs_f64()
    );
    w.wait_amphora("a2", "ERROR", Duration::from_secs(5));
    wait_lb(&w, &lb, Duration::from_secs(10));
    wait_field(&w, &lb, "operating_status", "ONLINE");
    assert_eq!(w.configs(&[1, 3, 4])[0], w.configs(&[1, 3, 4])[2]);
    // Buckets move to it once idle for the group's idle timer (7 s).
    std::thread::sleep(IDLE_TIMER + Duration::from_millis(1000));
    let conns = connections(&w.cl, SOURCES * 4);
    let by_a4 = conns
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|a| a.1 == w.amps[3].addr))
        .count();
    assert!(conns.iter().all(|(_, r)| r.is_ok()));
    println!("a4 carried {by_a4} of {} new connections", conns.len());
    assert!(by_a4 > 0);

    // Scale-out, 3 → 4: UDP flows keep their backend, and no TCP
    // connection is reset: the resilient group's buckets move only once
    // idle for longer than the dataplane keeps an idle connection.
    w.register(5);
    w.wait_amphora("a5", "READY", Duration::from_secs(10));
    recheck(&mut udp);
    let mut busy = hold(&w.cl, SOURCES);
    let mut idle = hold(&w.cl, SOURCES);
    let chat = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let talker = {
        let chat = chat.clone();
        std::thread::spawn(move || {
            let mut broken = 0;
            while chat.load(std::sync::atomic::Ordering::Relaxed) {
                for h in busy.iter_mut() {
                    if !h.alive() {
                        broken += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (busy, broken)
        })
    };
    // Idle for longer than idle_timer_s (1 s), which alone would have let
    // their buckets move (6–14 of 25 were reset that way).
    std::thread::sleep(Duration::from_millis(1500));
    let idle_since = Instant::now() - Duration::from_millis(1500);
    w.siphon(&[
        "loadbalancer",
        "set",
        &lb,
        "--set",
        "amphora_count=4",
        "--wait",
    ]);
    w.wait_group(&w.addrs(&[1, 3, 4, 5]), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for < Duration::from_secs(6),
        "idle {idle_for:?}: past the listener's timeout, the check below means nothing"
    );
    chat.store(false, std::sync::atomic::Ordering::Relaxed);
    let (mut busy, _) = talker.join().unwrap();
    let busy_reset = busy
        .iter_mut()
        .filter_map(|h| (!h.alive()).then_some(()))
        .count();
    let idle_reset = idle
        .iter_mut()
        .filter_map(|h| (!h.alive()).then_some(()))
        .count();
    let (changed, moved) = recheck(&mut udp);
    println!(
        "scale-out 3→4: {changed} of {} UDP flows changed backend ({moved} moved amphora); TCP reset: {busy_reset} of {} active, {idle_reset} of {} idle for {:.1} s (idle timer {} s)",
        udp.len(),
        busy.len(),
        idle.len(),
        idle_for.as_secs_f64(),
        IDLE_TIMER.as_secs()
    );
    assert_eq!(changed, 0);
    assert_eq!(busy_reset, 0, "active flows keep their amphora");
    assert_eq!(idle_reset, 0, "idle flows keep their amphora");
    drop((busy, idle));
    // a5 takes buckets once they were idle for the idle timer.
    std::thread::sleep(IDLE_TIMER + Duration::from_millis(1000));
    let conns = connections(&w.cl, SOURCES * 4);
    assert!(conns.iter().all(|(_, r)| r.is_ok()));
    let by_a5 = conns
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|a| a.1 == w.amps[4].addr))
        .count();
    assert!(by_a5 > 0, "a5 carries nothing");

    // The controller restarts (killed): the VIP stays routed over the same
    // group meanwhile and after, and traffic flows.
    let four = w.addrs(&[1, 3, 4, 5]);
    if let Some(mut c) = w.controller.take() {
        c.kill();
    }
    assert_eq!(w.group(), four);
    w.spawn_controller("control-2.log");
    for _ in 0..30 {
        assert_eq!(w.group(), four, "after the controller restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_field(&w, &lb, "provisioning_status", "ACTIVE");
    let conns = connections(&w.cl, SOURCES * 2);
    assert!(conns.iter().all(|(_, r)| r.is_ok()));

    // Changed under the controller: the route deleted by hand comes back
    // at the next resync (1 s here).
    w.rt.ip(&["route", "del", &format!("{VIP}/32")]).unwrap();
    let t = Instant::now();
    while !route_present(&w) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the VIP route was not restored"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(w.group(), four);
    println!(
        "resync: a route deleted by hand restored after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // A controller-side fault: every amphora goes silent at once. The
    // circuit breaker holds, nothing is failed over, traffic flows.
    for i in [1, 3, 4, 5] {
        w.amps[i - 1]
            .ns
            .ip(&["route", "add", "blackhole", "198.18.1.1/32"])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    for id in ["a1", "a3", "a4", "a5"] {
        w.wait_amphora(id, "FAILOVER_STOPPED", Duration::from_secs(3));
    }
    assert_eq!(w.group(), w.addrs(&[1, 3, 4, 5]));
    let conns = connections(&w.cl, SOURCES * 2);
    assert!(conns.iter().all(|(_, r)| r.is_ok()));
    for i in [1, 3, 4, 5] {
        w.amps[i - 1]
            .ns
            .ip(&["route", "del", "blackhole", "198.18.1.1/32"])
            .unwrap();
    }
    for id in ["a1", "a3", "a4", "a5"] {
        w.wait_amphora(id, "ALLOCATED", Duration::from_secs(5));
    }
    assert_eq!(w.group(), w.addrs(&[1, 3, 4, 5]));
    println!("circuit breaker: 4 of 4 silent at once → FAILOVER_STOPPED, group kept, traffic served, ALLOCATED again once heard");

    // Recovery: one amphora unheard for a while, with no spare to take its
    // place, leaves the group; heard again, it is back in.
    w.amps[0]
        .ns
        .ip(&["route", "add", "blackhole", "198.18.1.1/32"])
        .unwrap();
    w.wait_group(&w.addrs(&[3, 4, 5]), Duration::from_secs(3));
    wait_field(&w, &lb, "operating_status", "DEGRADED");
    let conns = connections(&w.cl, SOURCES * 2);
    assert!(conns.iter().all(|(_, r)| r.is_ok()));
    w.amps[0]
        .ns
        .ip(&["route", "del", "blackhole", "198.18.1.1/32"])
        .unwrap();
    let back = w.wait_group(&w.addrs(&[1, 3, 4, 5]), Duration::from_secs(3));
    wait_field(&w, &lb, "operating_status", "ONLINE");
    println!(
        "recovery: a1 back in the group {:.0} ms after its heartbeats got through again",
        back.as_secs_f64() * 1e3
    );

    // Scale-in, 4 → 3: the last registered (a5) leaves the group first,
    // then is emptied and becomes a spare again.
    w.siphon(&[
        "loadbalancer",
        "set",
        &lb,
        "--set",
        "amphora_count=3",
        "--wait",
    ]);
    w.wait_group(&w.addrs(&[1, 3, 4]), Duration::from_secs(5));
    w.wait_amphora("a5", "READY", Duration::from_secs(10));
    let conns = connections(&w.cl, SOURCES * 2);
    assert!(conns
        .iter()
        .all(|(_, r)| r.as_ref().is_ok_and(|a| a.1 != w.amps[4].addr)));

    // Deleted: the VIP's route and group go, the amphorae are spares.
    w.siphon(&["loadbalancer", "delete", &lb, "--cascade", "--wait"]);
    w.wait_group(&BTreeSet::new(), Duration::from_secs(5));
    for id in ["a1", "a3", "a4"] {
        w.wait_amphora(id, "READY", Duration::from_secs(10));
    }
}

/// The router's BIRD: BGP with BFD from any amphora on br0, VIPs of
/// 198.18.100.0/24 taken as /32s, several next hops merged into one
/// multipath route (plain ECMP: Linux re-hashes when one goes).
const ROUTER_BIRD: &str = r#"
router id 198.18.1.1;
protocol device {}
protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }
protocol kernel { merge paths on; ipv4 { import none; export all; }; }
protocol kernel { merge paths on; ipv6 { import none; export all; }; }
protocol bgp amphorae {
  local 198.18.1.1 as 64512; neighbor range 198.18.1.0/24 as 64513;
  bfd on; hold time 3; keepalive time 1;
  ipv4 { import where net ~ [ 198.18.100.0/24{32,32} ]; export none; };
}
protocol bgp amphorae6 {
  local 2001:db8:1::1 as 64512; neighbor range 2001:db8:1::/64 as 64513;
  bfd on; hold time 3; keepalive time 1;
  ipv6 { import where net ~ [ 2001:db8:100::/64{128,128} ]; export none; };
}
"#;

/// The next hops of the route to `prefix` on the router, as BGP put them
/// there, each named by its amphora's IPv4 address (a`i` is 198.18.1.1`i`
/// and 2001:db8:1::1`i`).
fn bgp_targets(w: &World, prefix: &str) -> BTreeSet<String> {
    let mut hops = BTreeSet::new();
    let mut add = |g: &str| match g.strip_prefix("2001:db8:1::") {
        Some(host) => hops.insert(format!("198.18.1.{host}")),
        None => hops.insert(g.to_owned()),
    };
    for r in &routes_to(w, prefix) {
        if let Some(g) = r["gateway"].as_str() {
            add(g);
        }
        for n in r["nexthops"].as_array().into_iter().flatten() {
            if let Some(g) = n["gateway"].as_str() {
                add(g);
            }
        }
    }
    hops
}

/// Waits until both VIPs are routed to exactly the amphorae `want`.
fn wait_bgp(w: &World, want: &BTreeSet<String>, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let now = [
            bgp_targets(w, &format!("{VIP}/32")),
            bgp_targets(w, &format!("{VIP6}/128")),
        ];
        if now.iter().all(|n| n == want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "VIPs routed via {now:?}, want {want:?}: {}",
            w.bird
                .as_ref()
                .map(|b| b.birdc("show protocols"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn over_bgp_the_routers_fail_an_amphora_over_with_every_controller_stopped() {
    let test = "active-active over BGP in network namespaces";
    if !root_or_skip(test) {
        return;
    }
    siphon_testkit::raise_fd_limit();
    let mut w = World::build(3);
    let Some(router) = Bird::start_or_skip(test, &w.rt, "router", ROUTER_BIRD) else {
        return;
    };
    w.bird = Some(router);
    w.start_controller_with(
        "driver = \"bgp\"\nlocal_as = 64513\nhold_time_s = 3\n\
         bfd = { min_rx_ms = 100, min_tx_ms = 100, multiplier = 3 }\n\
         [[distributor.peers]]\naddress = \"198.18.1.1\"\nasn = 64512\n\
         [[distributor.peers]]\naddress = \"2001:db8:1::1\"\nasn = 64512\n",
    );
    for i in 1..=3 {
        let a = &w.amps[i - 1];
        let bird = Bird::start_or_skip(test, &a.ns, &a.id, "protocol device {}\n").unwrap();
        w.amps[i - 1].bird = Some(bird);
        w.start_amphora(i);
        w.register(i);
    }
    for id in ["a1", "a2", "a3"] {
        w.wait_amphora(id, "READY", Duration::from_secs(10));
    }
    // Dual stack: an IPv6 VIP beside the IPv4 one, each announced over
    // the session of its family.
    let additional =
        format!(r#"additional_vips=[{{"subnet_id": "{SUBNET6}", "ip_address": "{VIP6}"}}]"#);
    let lb = create_lb(&w, &["--set", &additional], &[]);
    let shown = &w.siphon(&["loadbalancer", "show", &lb])["loadbalancer"];
    assert_eq!(shown["additional_vips"][0]["ip_address"], VIP6, "{shown:#}");
    // The routes come from BGP, one next hop per amphora.
    let all = w.addrs(&[1, 2, 3]);
    wait_bgp(&w, &all, Duration::from_secs(15));
    // Each amphora says so in its heartbeat: session up, BFD up, VIP
    // announced.
    let up = |w: &World, id: &str| {
        let a = &w.siphon(&["amphora", "show", id])["amphora"];
        let sessions = a["bgp"]["sessions"].as_array().cloned().unwrap_or_default();
        let announced = a["bgp"]["announced"].to_string();
        sessions.len() == 2
            && sessions
                .iter()
                .all(|s| s["state"] == "Established" && s["bfd"] == "Up")
            && announced.contains(&format!("{VIP}/32"))
            && announced.contains(&format!("{VIP6}/128"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !["a1", "a2", "a3"].iter().all(|id| up(&w, id)) {
        assert!(
            Instant::now() < deadline,
            "{:#}",
            w.siphon(&["amphora", "list"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Spread and agreement: every source on one backend, whichever
    // amphora the router hashed it to.
    let conns = connections(&w.cl, SOURCES * 6);
    check_spread(&conns, 3);
    let conns6 = connections_from(&w.cl, SOURCES6 * 12, source6);
    check_spread(&conns6, 3);
    println!(
        "over BGP: {} IPv4 connections from {SOURCES} sources and {} IPv6 ones from {SOURCES6} spread over 3 amphorae, each source on one backend",
        conns.len(),
        conns6.len(),
    );

    // a1's dataplane dies, its agent lives: a1 withdraws the VIP.
    w.amps[0].procs[0].kill();
    let killed = Instant::now();
    let withdrawn = wait_bgp(&w, &w.addrs(&[2, 3]), Duration::from_secs(5));
    println!(
        "a1's dataplane killed: withdrawn from the router {} ms later",
        killed.elapsed().as_millis()
    );
    assert!(withdrawn < Duration::from_secs(1), "{withdrawn:?}");
    // A new dataplane: the agent puts the config back, a1 announces again.
    w.amps[0].procs[0] = w.spawn_dataplane(1, "dataplane-2.log");
    wait_bgp(&w, &all, Duration::from_secs(5));

    // Graceful drain: a2's dataplane gets SIGTERM under a steady load of
    // new connections. It drops new SYNs unanswered (the clients send
    // them again 1 s later) while its agent withdraws the VIP, and closes
    // its listener only after that (--drain-delay-ms 1500): not one
    // connection fails. a2 is the router's middle next hop, whose removal
    // moves no other amphora's flows (see below).
    let run = Duration::from_millis(3000);
    let (attempts, withdrawn) = std::thread::scope(|s| {
        // Four loaders over IPv4, two over IPv6.
        let loaders: Vec<_> = (0..4)
            .map(|k| (source as fn(usize) -> IpAddr, k, 4))
            .chain((0..2).map(|k| (source6 as fn(usize) -> IpAddr, k, 2)))
            .map(|(from, k, stride)| {
                let cl = &w.cl;
                s.spawn(move || load(cl, from, (k, stride), run, WAIT))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        let termed = Instant::now();
        w.amps[1].procs[0].signal(Signal::SIGTERM);
        wait_bgp(&w, &w.addrs(&[1, 3]), Duration::from_secs(5));
        let withdrawn = termed.elapsed();
        let attempts: Vec<Attempt> = loaders
            .into_iter()
            .flat_map(|l| l.join().unwrap())
            .collect();
        (attempts, (termed, withdrawn))
    });
    let (termed, withdrawn) = withdrawn;
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_err()).collect();
    let a2 = w.amps[1].addr.clone();
    let on_a2 = |after: bool| {
        attempts
            .iter()
            .filter(|a| (a.started >= termed) == after)
            .filter(|a| a.answer.as_ref().is_ok_and(|x| x.1 == a2))
            .count()
    };
    let retried = attempts
        .iter()
        .filter(|a| a.took >= Duration::from_millis(900))
        .count();
    println!(
        "graceful drain: a2's dataplane SIGTERMed under {} new connections in {} s: {} failed; \
         a2 withdrawn from the router {} ms after SIGTERM; a2 carried {} before, {} after; \
         {retried} waited for a SYN retry (longest {} ms)",
        attempts.len(),
        run.as_secs(),
        failed.len(),
        withdrawn.as_millis(),
        on_a2(false),
        on_a2(true),
        attempts
            .iter()
            .map(|a| a.took)
            .max()
            .unwrap_or_default()
            .as_millis()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(on_a2(false) > 0, "a2 carried nothing before its SIGTERM");
    assert_eq!(
        w.amps[1].procs[0].wait_exit(Duration::from_secs(5)),
        Some(0),
        "a2's dataplane did not drain and exit"
    );
    // Back: the agent puts the config back, a2 announces again.
    w.amps[1].procs[0] = w.spawn_dataplane(2, "dataplane-2.log");
    wait_bgp(&w, &all, Duration::from_secs(5));

    // Every controller stopped; then a2 dies (processes killed, link
    // down). The routers alone take it out, by BFD.
    if let Some(mut c) = w.controller.take() {
        c.kill();
    }
    let mut udp = flows(&w.cl, SOURCES * 2);
    let mut held = hold(&w.cl, SOURCES * 2);
    let dead = w.amps[1].addr.clone();
    let on_dead = held.iter().filter(|h| h.seen.1 == dead).count();
    let udp_on_dead = udp.iter().filter(|f| f.seen.1 == dead).count();
    // New connections all along (each given 150 ms), to see the outage
    // as the clients whose flows hashed to a2 see it.
    let (killed, outage, attempts) = std::thread::scope(|s| {
        let cl = &w.cl;
        let loaders: Vec<_> = (0..4)
            .map(|k| {
                s.spawn(move || {
                    let within = Duration::from_millis(150);
                    load(cl, source, (k, 4), Duration::from_millis(1500), within)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let killed = Instant::now();
        w.amps[1].kill();
        wait_bgp(&w, &w.addrs(&[1, 3]), Duration::from_secs(5));
        let outage = killed.elapsed();
        let attempts: Vec<Attempt> = loaders
            .into_iter()
            .flat_map(|l| l.join().unwrap())
            .collect();
        (killed, outage, attempts)
    });
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_err()).collect();
    let last_failed = failed
        .iter()
        .map(|a| a.started.saturating_duration_since(killed))
        .max()
        .unwrap_or_default();
    println!(
        "a2 killed with no controller running: out of the router's routes to both VIPs {} ms later (BFD 100 ms x 3); \
         clients: {} of {} new connections failed (those hashed to a2), the last one begun {} ms after the kill",
        outage.as_millis(),
        failed.len(),
        attempts.len(),
        last_failed.as_millis()
    );
    assert!(outage < Duration::from_secs(1), "{outage:?}");
    assert!(last_failed < Duration::from_millis(500), "{last_failed:?}");
    all_avoid(&w.cl, &dead, source);
    all_avoid(&w.cl, &dead, source6);
    // UDP flows keep their backend (Maglev on every amphora); established
    // TCP on the survivors: plain ECMP re-hashes over the two left, so
    // some move to an amphora that has no socket for them.
    let (changed, moved) = recheck(&mut udp);
    assert_eq!(changed, 0, "UDP flows changed backend");
    let (mut on_survivors, mut broken) = (0, 0);
    for h in held.iter_mut().filter(|h| h.seen.1 != dead) {
        on_survivors += 1;
        broken += usize::from(!h.alive());
    }
    println!(
        "after the loss: {moved} of {} UDP flows moved amphora ({udp_on_dead} were on a2), none changed backend; \
         established TCP on the survivors: {broken} of {on_survivors} broken by the router's re-hash ({on_dead} were on a2)",
        udp.len()
    );
}
