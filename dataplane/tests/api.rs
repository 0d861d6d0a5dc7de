#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The control API on a real Unix socket: apply, idempotent retry, stale
//! generation 409, invalid config 400 naming object and field with nothing
//! changed; JSON status and stats; the Prometheus page read by a
//! text-format parser; `ctl` and SIGHUP sharing one apply path; the
//! limits on slow, idle, numerous and large clients; reads during an
//! apply; corrupted and positional bodies.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use nix::sys::signal::Signal;
use serde_json::Value;
use siphon_dataplane::api::{Api, ApiLimits, ApiOptions};
use siphon_proto::http::{send_blocking, Reply, Request, Target};
use siphon_testkit::{connect_greeting, free_port, Backend};

fn get(socket: &Path, path: &str) -> Reply {
    send_blocking(&Target::Unix(socket.to_owned()), Request::get(path)).unwrap()
}

fn put(socket: &Path, content_type: &'static str, body: &str) -> Reply {
    let req = Request::new(Method::PUT, "/v1/config").body(content_type, body.as_bytes().to_vec());
    send_blocking(&Target::Unix(socket.to_owned()), req).unwrap()
}

fn json(r: &Reply) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

/// One listener per port, all on pool "p" with backend `b`.
fn parts(ports: &[u16], b: &Backend) -> Vec<String> {
    let mut parts: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| listener(&format!("l{i}"), "127.0.0.1", *p, "p", ""))
        .collect();
    parts.push(pool(
        "p",
        "TCP",
        "ROUND_ROBIN",
        &[member("b", b.addr, 1, "")],
    ));
    parts
}

fn cfg(generation: u64, ports: &[u16], b: &Backend) -> siphon_dataplane::Config {
    config(generation, &parts(ports, b))
}

fn cfg_toml(generation: u64, ports: &[u16], b: &Backend) -> String {
    toml(generation, &parts(ports, b))
}

fn cfg_json(generation: u64, ports: &[u16], b: &Backend) -> String {
    serde_json::to_string(&cfg(generation, ports, b)).unwrap()
}

struct Running {
    server: Arc<siphon_dataplane::Server>,
    api: Option<Api>,
    socket: std::path::PathBuf,
    _dir: TempDir,
}

impl Running {
    fn start(first: siphon_dataplane::Config, metrics: Option<std::net::SocketAddr>) -> Running {
        Running::with_limits(first, metrics, ApiLimits::default())
    }

    fn with_limits(
        first: siphon_dataplane::Config,
        metrics: Option<std::net::SocketAddr>,
        limits: ApiLimits,
    ) -> Running {
        let dir = TempDir::new("api");
        let socket = dir.path("run/ctl.sock");
        let server = Arc::new(start(first, 2));
        let opts = ApiOptions {
            socket: socket.clone(),
            mode: 0o600,
            metrics,
        };
        let api = Some(
            Api::bind(&opts)
                .unwrap()
                .with_limits(limits)
                .serve(server.clone())
                .unwrap(),
        );
        Running {
            server,
            api,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.api.take();
        self.server.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn apply_retry_stale_and_invalid_configs_over_the_socket() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let (p0, p1, p2) = (free_port(), free_port(), free_port());
    let r = Running::start(cfg(1, &[p0], &b), None);
    let sock = &r.socket;
    let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(json(&get(sock, "/v1/config"))["generation"], 1);

    // Apply generation 2 (a second listener), as JSON.
    let two = cfg_json(2, &[p0, p1], &b);
    let reply = put(sock, "application/json", &two);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = json(&reply);
    assert_eq!(body["result"], "applied");
    assert_eq!(body["listening_added"][0], format!("tcp/127.0.0.1:{p1}"));
    assert_eq!(connect_greeting(addr(p1)).unwrap().1, "b");
    // The same push again is harmless.
    let reply = put(sock, "application/json", &two);
    assert_eq!(
        (reply.status, json(&reply)["result"].clone()),
        (200, "unchanged".into())
    );

    // Not newer: 409, nothing changes.
    let reply = put(sock, "application/json", &cfg_json(1, &[p2], &b));
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert_eq!(json(&reply)["running_generation"], 2);
    let reply = put(sock, "application/json", &cfg_json(2, &[p2], &b));
    assert_eq!(reply.status, 409, "same generation, other content");

    // Invalid: 400 naming object and field, nothing changes.
    let before = get(sock, "/v1/config").body;
    let bad = cfg_toml(3, &[p0, p2], &b)
        .replace(&format!("protocol_port = {p2}"), "protocol_port = 70000")
        .replace("weight = 1", "weight = 300");
    let reply = put(sock, "application/toml", &bad);
    assert_eq!(reply.status, 400, "{}", reply.body);
    let problems = json(&reply)["problems"].as_array().unwrap().clone();
    let named: Vec<(String, String)> = problems
        .iter()
        .map(|p| {
            (
                p["object"].as_str().unwrap().to_owned(),
                p["field"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        named.contains(&("listener \"l1\"".into(), "protocol_port".into())),
        "{named:?}"
    );
    assert!(
        named.contains(&("pool \"p\" member \"b\"".into(), "weight".into())),
        "{named:?}"
    );
    assert_eq!(get(sock, "/v1/config").body, before);
    assert_eq!(r.server.generation(), 2);
    assert_eq!(connect_greeting(addr(p1)).unwrap().1, "b", "still serving");

    // A field of the wrong type: 400 naming where it is.
    let wrong = r#"{"generation": 3, "listeners": [{"id": "x", "protocol": "TCP",
        "bind_addresses": ["127.0.0.1"], "protocol_port": "eighty"}]}"#;
    let reply = put(sock, "application/json", wrong);
    assert_eq!(reply.status, 400, "{}", reply.body);
    let p = &json(&reply)["problems"][0];
    assert_eq!(
        (p["object"].as_str(), p["field"].as_str()),
        (Some("listeners[0]"), Some("protocol_port")),
        "{p}"
    );

    // Not a config at all: 400 with the parser's message.
    for garbage in ["{", "{\"generation\": 3, \"listenres\": []}"] {
        let reply = put(sock, "application/json", garbage);
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(json(&reply)["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot parse"));
    }

    // TOML accepted too; a removed listener is reported.
    let reply = put(sock, "application/toml", &cfg_toml(3, &[p2], &b));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = json(&reply);
    assert_eq!(body["generation"], 3);
    assert_eq!(body["listening_removed"].as_array().unwrap().len(), 2);

    let stats = json(&get(sock, "/v1/stats"));
    assert_eq!(stats["generation"], 3);
    assert_eq!(stats["listeners"][0]["id"], "l0");
    let status = json(&get(sock, "/v1/status"));
    assert_eq!(
        status["pools"][0]["members"][0]["operating_status"],
        "NO_MONITOR"
    );
    assert_eq!(get(sock, "/v1/nothing").status, 404);

    // Once shutting down, nothing more is applied.
    r.server.shutdown(Duration::from_secs(1));
    let reply = put(sock, "application/toml", &cfg_toml(4, &[p2], &b));
    assert_eq!(reply.status, 503, "{}", reply.body);
}

#[test]
fn the_control_socket_never_replaces_a_live_socket_or_another_file() {
    let dir = TempDir::new("sock");
    let opts = |name: &str| ApiOptions {
        socket: dir.path(name),
        mode: 0o600,
        metrics: None,
    };
    std::fs::write(dir.path("file"), "keep me").unwrap();
    let err = Api::bind(&opts("file")).unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path("file")).unwrap(),
        "keep me"
    );

    let live = std::os::unix::net::UnixListener::bind(dir.path("live")).unwrap();
    let err = Api::bind(&opts("live")).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    drop(live);
    // A leftover socket file of a process that is gone is replaced.
    let bound = Api::bind(&opts("live")).unwrap();
    drop(bound);
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn listener_connections(s: &prometheus_parse::Scrape, listener: &str) -> Option<f64> {
    sample(
        s,
        "siphon_listener_connections_total",
        &[("listener", listener)],
    )
}

fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

#[test]
fn the_metrics_page_parses_on_the_socket_and_on_tcp() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let r = Running::start(cfg(1, &[port], &b), Some(metrics));
    for _ in 0..7 {
        let (mut s, _) = connect_greeting(addr(port)).unwrap();
        siphon_testkit::roundtrip(&mut s, b"hello").unwrap();
    }
    assert!(eventually(Duration::from_secs(2), || {
        r.server.stats().listener("l0").unwrap().active_connections == 0
    }));
    let reply = get(&r.socket, "/metrics");
    assert_eq!(reply.status, 200);
    let s = scrape(&reply.body);
    assert_eq!(listener_connections(&s, "l0"), Some(7.0));
    assert_eq!(
        sample(
            &s,
            "siphon_member_connections_total",
            &[("pool", "p"), ("member", "b")]
        ),
        Some(7.0)
    );
    let bytes = sample(&s, "siphon_listener_bytes_in_total", &[("listener", "l0")]).unwrap();
    assert_eq!(bytes, 35.0);
    assert_eq!(
        sample(
            &s,
            "siphon_member_status",
            &[("member", "b"), ("status", "NO_MONITOR")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &s,
            "siphon_member_status",
            &[("member", "b"), ("status", "ERROR")]
        ),
        Some(0.0)
    );
    assert_eq!(sample(&s, "siphon_config_generation", &[]), Some(1.0));
    assert!(
        s.docs.contains_key("siphon_listener_bytes_in_total"),
        "HELP lines"
    );

    // The same page for scrapers over TCP. Counters survive a reload for
    // a listener that stays; a removed listener disappears from the page.
    let port2 = free_port();
    r.server.apply(cfg(2, &[port, port2], &b)).unwrap();
    let s = scrape(&http_get(metrics, "/metrics"));
    assert_eq!(sample(&s, "siphon_config_generation", &[]), Some(2.0));
    assert_eq!(listener_connections(&s, "l0"), Some(7.0));
    assert_eq!(listener_connections(&s, "l1"), Some(0.0));
    r.server.apply(cfg(3, &[port], &b)).unwrap();
    let s = scrape(&http_get(metrics, "/metrics"));
    assert_eq!(listener_connections(&s, "l1"), None);
    assert_eq!(listener_connections(&s, "l0"), Some(7.0));
}

/// A plain HTTP/1.0 GET over TCP, body returned.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

#[test]
fn ctl_and_sighup_share_one_apply_path() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let dir = TempDir::new("ctl");
    let (p0, p1) = (free_port(), free_port());
    let file = dir.path("dataplane.toml");
    std::fs::write(&file, cfg_toml(1, &[p0], &b)).unwrap();
    let socket = dir.path("ctl.sock");
    let (f, s) = (file.to_str().unwrap(), socket.to_str().unwrap());
    let proc = dataplane(
        &["run", "--config", f, "--socket", s, "--workers", "1"],
        &dir.path("log"),
    );
    assert!(
        proc.wait_log("siphon-dataplane running", 1, Duration::from_secs(10)),
        "{}",
        proc.log_text()
    );

    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_siphon-dataplane"))
            .args(["ctl", "--socket", s])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = ctl(&["status"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["generation"],
        1
    );

    // ctl apply: generation 2 from a TOML file.
    let two = dir.path("two.toml");
    std::fs::write(&two, cfg_toml(2, &[p0, p1], &b)).unwrap();
    let (code, out, err) = ctl(&["apply", two.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"applied\""), "{out}");
    assert_eq!(connect_greeting(addr(p1)).unwrap().1, "b");

    // An invalid file: exit 1, the field named, nothing changed.
    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        cfg_toml(3, &[p0], &b).replace("ROUND_ROBIN", "FASTEST"),
    )
    .unwrap();
    let (code, _, err) = ctl(&["apply", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("lb_algorithm") || err.contains("FASTEST"),
        "{err}"
    );
    let bad = dir.path("bad2.toml");
    std::fs::write(
        &bad,
        cfg_toml(3, &[p0], &b).replace("weight = 1", "weight = 999"),
    )
    .unwrap();
    let (code, _, err) = ctl(&["apply", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("400") && err.contains("weight"), "{err}");

    // SIGHUP re-reads the file (generation 1): the same apply path refuses
    // it as stale, and generation 2 keeps running.
    proc.signal(Signal::SIGHUP);
    assert!(
        proc.wait_log("reload rejected", 1, Duration::from_secs(5)),
        "{}",
        proc.log_text()
    );
    assert!(proc
        .log_text()
        .contains("not newer than the running generation 2"));
    let (_, out, _) = ctl(&["stats"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["generation"],
        2
    );
    let (code, out, _) = ctl(&["metrics"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("siphon_config_generation 2"), "{out}");

    // A second dataplane on the same socket refuses to start.
    let other = dataplane(&["run", "--config", f, "--socket", s], &dir.path("log2"));
    let mut other = other;
    assert_eq!(other.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(other.log_text().contains("in use"), "{}", other.log_text());
    drop(proc);
    // No dataplane: ctl says so.
    let (code, _, err) = ctl(&["status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot connect"), "{err}");
}

/// Limits small enough for a test to see each one act.
fn tight() -> ApiLimits {
    ApiLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        max_body: 64 << 10,
        body_budget: 128 << 10,
    }
}

/// A connection that has sent `head` (and maybe part of a body).
fn raw(socket: &Path, head: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s
}

/// Reads a whole answer (the server closes after it): status and body.
fn answer(s: &mut UnixStream) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Whether the server closed `s` within `within`, writing `drip` one byte
/// at a time every 200 ms meanwhile (a slowloris client).
fn cut_while_dripping(s: &mut UnixStream, drip: &[u8], within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    for b in drip.iter().cycle() {
        if Instant::now() > end {
            return false;
        }
        if s.write_all(&[*b]).is_err() {
            return true;
        }
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An error answer (408) before the close counts as cut too.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn slow_clients_are_cut_and_the_api_still_answers() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let r = Running::with_limits(cfg(1, &[free_port()], &b), None, tight());
    let sock = r.socket.clone();
    // Four times the connection cap, each trickling its request head (or
    // its body) a byte every 200 ms, so no idle timer ever fires.
    let slow: Vec<_> = (0..32)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let (head, drip) = if i % 2 == 0 {
                    ("GET /v1/status HTTP/1.1\r\n", &b"X-Slow: aaaaaaaa"[..])
                } else {
                    (
                        "PUT /v1/config HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n",
                        &b"{\"generation\": 2"[..],
                    )
                };
                let mut s = UnixStream::connect(&sock).unwrap();
                // At the cap the oldest connections are closed, maybe
                // before this one got its head out: cut too.
                if s.write_all(head.as_bytes()).is_err() {
                    return true;
                }
                cut_while_dripping(&mut s, drip, Duration::from_secs(15))
            })
        })
        .collect();
    // Meanwhile an operator's requests are answered.
    for _ in 0..3 {
        let reply = get(&sock, "/v1/generation");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(json(&reply)["generation"], 1);
    }
    for (i, t) in slow.into_iter().enumerate() {
        assert!(t.join().unwrap(), "slow client {i} was never cut");
    }

    // A client that connects and says nothing is closed by the idle timer.
    let mut silent = UnixStream::connect(&sock).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        silent.read(&mut buf).unwrap_or(0),
        0,
        "idle connection kept"
    );
    assert_eq!(r.server.generation(), 1, "nothing was applied");
}

#[test]
fn config_bodies_are_bounded_in_size_time_and_memory() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let r = Running::with_limits(cfg(1, &[port], &b), None, tight());
    let sock = &r.socket;
    let head = |len: usize| {
        format!(
            "PUT /v1/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };

    // Over the size limit: 413 before the body is read.
    let (code, body) = answer(&mut raw(sock, &head(1 << 20)));
    assert_eq!(code, 413, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("larger than the limit of 65536 bytes"),
        "{e}"
    );

    // Two bodies of 60 KiB that stall hold the 128 KiB budget: a third
    // push is told to come back (503, Retry-After) instead of piling up.
    let mut stalled: Vec<UnixStream> = (0..2)
        .map(|_| raw(sock, &(head(60 << 10) + "{\"generation\"")))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let reply = put(sock, "application/json", &" ".repeat(60 << 10));
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        json(&reply)["error"]
            .as_str()
            .unwrap()
            .contains("retry shortly"),
        "{}",
        reply.body
    );
    // The stalled ones run out of time: 408, however the bytes trickle.
    for s in &mut stalled {
        let (code, body) = answer(s);
        assert_eq!(code, 408, "{body}");
        assert!(body.contains("did not arrive whole within 1s"), "{body}");
    }
    let mut drip = raw(sock, &head(1000));
    assert!(cut_while_dripping(
        &mut drip,
        b"{\"generation\": 2",
        Duration::from_secs(10)
    ));

    // The budget is free again, and nothing was applied meanwhile.
    assert_eq!(r.server.generation(), 1);
    let reply = put(sock, "application/json", &cfg_json(2, &[port], &b));
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn reads_answer_while_an_apply_builds_large_tables() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let r = Running::start(cfg(1, &[port], &b), None);
    // Pools at the largest Maglev table, one heavy member among light
    // ones (the slowest kind of build): the apply takes a while.
    let mut parts = parts(&[port], &b);
    for p in 0..40 {
        let members: Vec<String> = (0..256u16)
            .map(|m| {
                let w = if m == 0 { 256 } else { 1 };
                member(&format!("m{m}"), addr(1000 + m), w, "")
            })
            .collect();
        let pool = pool(&format!("big{p}"), "TCP", "MAGLEV", &members);
        parts.push(pool.replace(
            "lb_algorithm = \"MAGLEV\"",
            "lb_algorithm = \"MAGLEV\"\nmaglev_table_size = 131071",
        ));
    }
    let big = toml(2, &parts);
    let done = Arc::new(AtomicBool::new(false));
    let push = {
        let (sock, done) = (r.socket.clone(), done.clone());
        std::thread::spawn(move || {
            let reply = put(&sock, "application/toml", &big);
            done.store(true, Ordering::SeqCst);
            reply
        })
    };
    // Asked again and again: some answer must come from the middle of the
    // apply (the API says which generation it is applying).
    let mut during = None;
    while !done.load(Ordering::SeqCst) {
        let reply = get(&r.socket, "/v1/generation");
        let answered_before_the_apply_returned = !done.load(Ordering::SeqCst);
        let v = json(&reply);
        if v["applying"] == 2 && answered_before_the_apply_returned {
            during = Some(v);
            break;
        }
    }
    let during = during.expect("no read was answered while the apply ran");
    assert_eq!(during["generation"], 1, "{during}");
    // Status and counters too, while it still runs.
    let status = get(&r.socket, "/v1/status");
    assert_eq!(status.status, 200);
    let reply = push.join().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = json(&get(&r.socket, "/v1/generation"));
    assert_eq!(
        (v["generation"].clone(), v["applying"].clone()),
        (2.into(), Value::Null)
    );
}

/// A config whose listener is written as an array of its fields in order.
fn nested_positional(generation: u64, port: u16, b: &Backend) -> String {
    let mut v: Value = serde_json::from_str(&cfg_json(generation, &[port], b)).unwrap();
    v["listeners"][0] = serde_json::json!([
        "l0",
        "TCP",
        ["127.0.0.1"],
        port,
        -1,
        50000,
        5000,
        50000,
        3,
        65536,
        [],
        "p",
        true
    ]);
    v.to_string()
}

#[test]
fn corrupted_and_positional_bodies_change_nothing() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let r = Running::start(cfg(1, &[port], &b), None);
    let sock = &r.socket;
    let cases = [
        // A config followed by the start of another: it used to apply as
        // generation 3 with no listener, removing the running one.
        (
            r#"{"generation":3} {"x":["#.to_owned(),
            "trailing characters",
        ),
        ("[3, [], []]".to_owned(), "positional form"),
        (nested_positional(3, port, &b), "positional form"),
    ];
    for (body, why) in cases {
        let reply = put(sock, "application/json", &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        let e = json(&reply);
        assert!(
            e["error"].as_str().unwrap().starts_with("cannot parse"),
            "{e}"
        );
        assert!(e["error"].as_str().unwrap().contains(why), "{e}");
        assert_eq!(r.server.generation(), 1);
        let (_s, name) = connect_greeting(addr(port)).expect("the listener still serves");
        assert_eq!(name, "b");
    }
}

/// Descriptors `pid` holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_api_connections_hold_a_bounded_number_of_descriptors() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let dir = TempDir::new("api-fds");
    let port = free_port();
    let file = dir.path("dataplane.toml");
    std::fs::write(&file, cfg_toml(1, &[port], &b)).unwrap();
    let socket = dir.path("ctl.sock");
    let proc = dataplane(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--workers",
            "1",
            "--api-max-connections",
            "16",
        ],
        &dir.path("log"),
    );
    assert!(
        proc.wait_log("siphon-dataplane running", 1, Duration::from_secs(10)),
        "{}",
        proc.log_text()
    );
    let pid = proc.id();
    let before = fds(pid);
    // Twenty times the cap, connected and silent.
    let idle: Vec<UnixStream> = (0..320)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = fds(pid);
    assert!(
        during <= before + 16 + 2,
        "{before} descriptors before, {during} with {} idle API clients",
        idle.len()
    );
    // Forwarding and the API itself still work.
    let (mut s, name) = connect_greeting(addr(port)).expect("forwarding works");
    assert_eq!(name, "b");
    siphon_testkit::roundtrip(&mut s, b"hello").unwrap();
    let reply = get(&socket, "/v1/generation");
    assert_eq!(json(&reply)["generation"], 1);
    assert!(fds(pid) <= before + 16 + 8);
}
