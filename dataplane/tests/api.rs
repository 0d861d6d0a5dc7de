#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The control API on a real Unix socket: apply, idempotent retry, stale
//! generation 409, invalid config 400 naming object and field with nothing
//! changed; JSON status and stats; the Prometheus page read by a
//! text-format parser; `ctl` and SIGHUP sharing one apply path.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::Method;
use nix::sys::signal::Signal;
use serde_json::Value;
use siphon_dataplane::api::client::{self, Reply};
use siphon_dataplane::api::{Api, ApiOptions};
use siphon_testkit::{connect_greeting, free_port, Backend};

fn get(socket: &Path, path: &str) -> Reply {
    client::request(socket, Method::GET, path, None).unwrap()
}

fn put(socket: &Path, content_type: &str, body: &str) -> Reply {
    client::request(
        socket,
        Method::PUT,
        "/v1/config",
        Some((content_type, body.as_bytes().to_vec())),
    )
    .unwrap()
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
        let dir = TempDir::new("api");
        let socket = dir.path("run/ctl.sock");
        let server = Arc::new(start(first, 2));
        let opts = ApiOptions {
            socket: socket.clone(),
            mode: 0o600,
            metrics,
        };
        let api = Some(Api::bind(&opts).unwrap().serve(server.clone()).unwrap());
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
    let proc = Proc::spawn(
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
    let other = Proc::spawn(&["run", "--config", f, "--socket", s], &dir.path("log2"));
    let mut other = other;
    assert_eq!(other.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(other.log_text().contains("in use"), "{}", other.log_text());
    drop(proc);
    // No dataplane: ctl says so.
    let (code, _, err) = ctl(&["status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot connect"), "{err}");
}
