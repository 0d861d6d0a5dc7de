#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The binary and the apply path: `check`, SIGHUP reloads under traffic,
//! broken configs, SIGTERM drain, the demo, and rejected applies that
//! change nothing.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use siphon_dataplane::config::{Object, Problem};
use siphon_dataplane::ApplyError;
use siphon_testkit::{connect_greeting, free_port, roundtrip, Backend};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_siphon-dataplane"))
}

#[test]
fn check_accepts_a_good_file_and_names_every_problem_in_a_bad_one() {
    let dir = TempDir::new("check");
    let good = dir.path("good.toml");
    std::fs::write(&good, siphon_dataplane::demo::DEMO_CONFIG).expect("write");
    let out = bin()
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        r#"
generation = 2
[[listeners]]
id = "web"
protocol = "TCP"
bind_addresses = []
protocol_port = 70000
default_pool_id = "nope"
allowed_cidrs = ["10.0.0.0/33"]

[[listeners]]
id = "web"
protocol = "UDP"
bind_addresses = ["127.0.0.300"]
protocol_port = 53
default_pool_id = "tcp-pool"

[[pools]]
id = "tcp-pool"
protocol = "TCP"
lb_algorithm = "ROUND_ROBIN"
members = [{ id = "m1", address = "127.0.0.1", protocol_port = 80, weight = 300 }]
"#,
    )
    .expect("write");
    let out = bin()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "listener \"web\": bind_addresses: must not be empty",
        "listener \"web\": protocol_port: 70000 is out of range 1..=65535",
        "listener \"web\": default_pool_id: unknown pool \"nope\"",
        "listener \"web\": allowed_cidrs: \"10.0.0.0/33\" is not a CIDR",
        "listener \"web\": id: duplicate id \"web\"",
        "listener \"web\": bind_addresses: \"127.0.0.300\" is not an IPv4 or IPv6 address",
        "listener \"web\": default_pool_id: a Udp listener cannot use a Tcp pool",
        "pool \"tcp-pool\" member \"m1\": weight: 300 is out of range 0..=256",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let out = bin()
        .args(["check", "--config", "/nonexistent/siphon.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/siphon.toml"));
}

/// A config with the traffic listener unchanged and other parts varying by
/// generation: weights, a second listener that comes and goes, a member
/// added and removed.
fn reload_config(generation: u64, port: u16, extra_port: u16, b: &[Backend]) -> String {
    let mut members = vec![member("b0", b[0].addr, 1 + (generation % 3) as u32, "")];
    if generation % 2 == 0 {
        members.push(member("b1", b[1].addr, 1, ""));
    }
    let mut parts = vec![
        listener("traffic", "127.0.0.1", port, "p", ""),
        pool("p", "TCP", "ROUND_ROBIN", &members),
    ];
    if generation % 4 == 1 {
        parts.push(listener("extra", "127.0.0.1", extra_port, "p", ""));
    }
    toml(generation, &parts)
}

#[test]
fn twenty_sighup_reloads_under_steady_traffic_lose_no_connection() {
    let rt = siphon_testkit::runtime();
    let b: Vec<Backend> = (0..2)
        .map(|i| Backend::start(&rt, &format!("b{i}"), "127.0.0.1"))
        .collect();
    let (port, extra) = (free_port(), free_port());
    let dir = TempDir::new("reload");
    let file = dir.path("siphon.toml");
    std::fs::write(&file, reload_config(1, port, extra, &b)).expect("write");
    let proc = dataplane(
        &[
            "run",
            "--config",
            file.to_str().expect("utf8"),
            "--workers",
            "2",
        ],
        &dir.path("log"),
    );
    assert!(
        eventually(Duration::from_secs(10), || connect_greeting(addr(port))
            .is_ok()),
        "{}",
        proc.log_text()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                    match connect_greeting(addr(port))
                        .and_then(|(mut s, _)| roundtrip(&mut s, b"ping"))
                    {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("failed connection: {e}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect();
    for generation in 2..=21 {
        std::fs::write(&file, reload_config(generation, port, extra, &b)).expect("write");
        proc.signal(Signal::SIGHUP);
        let applied = format!("generation={generation} ");
        assert!(
            proc.wait_log(&applied, 1, Duration::from_secs(10)),
            "reload {generation} not applied:\n{}",
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client");
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(failed, 0, "{failed} failed connections ({ok} ok)");
    assert!(ok > 100, "too little traffic to mean anything: {ok}");
    eprintln!("20 reloads under traffic: {ok} connections, 0 failed");
}

#[test]
fn a_broken_file_on_sighup_is_reported_and_the_running_config_stays() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b0", "127.0.0.1");
    let port = free_port();
    let dir = TempDir::new("broken");
    let file = dir.path("siphon.toml");
    let good = toml(1, &one_member(port, "b0", b.addr));
    std::fs::write(&file, &good).expect("write");
    let proc = dataplane(
        &[
            "run",
            "--config",
            file.to_str().expect("utf8"),
            "--workers",
            "1",
        ],
        &dir.path("log"),
    );
    assert!(eventually(Duration::from_secs(10), || connect_greeting(
        addr(port)
    )
    .is_ok()));
    let (mut held, _) = connect_greeting(addr(port)).expect("connect");
    // Syntax error, then a semantic error, then a stale generation.
    let bad_files = [
        "generation = 2\n[[listeners]\n".to_owned(),
        good.replace("generation = 1", "generation = 2")
            .replace("weight = 1", "weight = 999"),
        good.replace("ROUND_ROBIN", "LEAST_CONNECTIONS"),
    ];
    for (i, text) in bad_files.iter().enumerate() {
        std::fs::write(&file, text).expect("write");
        proc.signal(Signal::SIGHUP);
        assert!(
            proc.wait_log(
                "reload rejected, running generation 1 stays",
                i + 1,
                Duration::from_secs(10)
            ),
            "{}",
            proc.log_text()
        );
        let (mut s, name) = connect_greeting(addr(port)).expect("still serving");
        assert_eq!(name, "b0");
        roundtrip(&mut s, b"ok").expect("echo");
    }
    let log = proc.log_text();
    assert!(log.contains("weight: 999 is out of range 0..=256"), "{log}");
    assert!(
        log.contains("generation 1 is not newer than the running generation 1"),
        "{log}"
    );
    roundtrip(&mut held, b"the held connection never noticed").expect("echo");
}

#[test]
fn sigterm_stops_accepting_drains_then_exits_zero() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b0", "127.0.0.1");
    let port = free_port();
    let dir = TempDir::new("term");
    let file = dir.path("siphon.toml");
    std::fs::write(&file, toml(1, &one_member(port, "b0", b.addr))).expect("write");
    let mut proc = dataplane(
        &[
            "run",
            "--config",
            file.to_str().expect("utf8"),
            "--workers",
            "2",
            "--drain-timeout",
            "20",
        ],
        &dir.path("log"),
    );
    assert!(eventually(Duration::from_secs(10), || connect_greeting(
        addr(port)
    )
    .is_ok()));
    let (mut held, _) = connect_greeting(addr(port)).expect("connect");
    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_log("draining", 1, Duration::from_secs(5)));
    assert!(
        eventually(Duration::from_secs(5), || connect_greeting(addr(port))
            .is_err()),
        "still accepting after SIGTERM"
    );
    // The established connection keeps working while draining ...
    roundtrip(&mut held, b"draining but alive").expect("echo while draining");
    assert_eq!(
        proc.try_wait().expect("wait"),
        None,
        "exited before its connection ended"
    );
    // ... and once it ends, the process exits 0 without waiting the full grace period.
    drop(held);
    let t0 = Instant::now();
    exits_zero(&mut proc, Duration::from_secs(10));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_readme_demo_shows_balancing() {
    // Below the ephemeral range (so no test's client socket holds it) and
    // away from the default 19080 (so a demo someone runs doesn't clash).
    let out = bin()
        .args(["demo", "--once", "--port", "19180"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each worker runs its own round robin starting at backend-1, so any
    // split of six connections over the workers gives each backend 2 to 4.
    let (b1, b2) = (
        text.matches("hello from backend-1").count(),
        text.matches("hello from backend-2").count(),
    );
    assert!(b1 + b2 == 6 && b1 >= 2 && b2 >= 2, "{text}");
}

#[test]
fn rejected_applies_change_nothing() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b0", "127.0.0.1");
    let port = free_port();
    let good = |generation| config(generation, &one_member(port, "b0", b.addr));
    let server = start(good(5), 2);
    let (mut held, _) = connect_greeting(addr(port)).expect("connect");

    // Invalid: the error names object and field.
    let mut bad = good(6);
    bad.pools[0].members[0].protocol_port = 0;
    match server.apply(bad) {
        Err(ApplyError::Invalid(e)) => {
            let first = &e.0[0];
            assert_eq!(
                first.object,
                Object::Member {
                    pool: "p".into(),
                    member: "b0".into()
                }
            );
            assert_eq!(first.field, "protocol_port");
            assert_eq!(
                first.problem,
                Problem::OutOfRange {
                    value: 0,
                    min: 1,
                    max: 65535
                }
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // Stale generation.
    assert!(matches!(
        server.apply(good(4)),
        Err(ApplyError::Stale {
            running: 5,
            offered: 4
        })
    ));
    // A new listener on a port someone else holds: nothing is applied,
    // not even the other (valid) new listener.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let other_port = free_port();
    let mut c = good(7);
    c.listeners.push(c.listeners[0].clone());
    c.listeners[1].id = "new".into();
    c.listeners[1].protocol_port = i64::from(other_port);
    c.listeners.push(c.listeners[0].clone());
    c.listeners[2].id = "clash".into();
    c.listeners[2].protocol_port = i64::from(taken_port);
    match server.apply(c) {
        Err(ApplyError::Bind { listener, .. }) => assert_eq!(listener, "clash"),
        other => panic!("expected Bind, got {other:?}"),
    }
    assert_eq!(server.generation(), 5);
    assert!(
        connect_greeting(addr(other_port)).is_err(),
        "half of a rejected config went live"
    );
    roundtrip(&mut held, b"unaffected").expect("echo");
    let (_s, name) = connect_greeting(addr(port)).expect("still serving");
    assert_eq!(name, "b0");
    // The same generation again is a no-op.
    assert_eq!(
        server.apply(good(5)).expect("same"),
        siphon_dataplane::Applied::Unchanged { generation: 5 }
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_removed_listener_stops_accepting_while_its_connections_finish() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b0", "127.0.0.1");
    let (keep, gone, off) = (free_port(), free_port(), free_port());
    let p = || pool("p", "TCP", "ROUND_ROBIN", &[member("b0", b.addr, 1, "")]);
    let server = start(
        config(
            1,
            &[
                listener("keep", "127.0.0.1", keep, "p", ""),
                listener("gone", "127.0.0.1", gone, "p", ""),
                listener("off", "127.0.0.1", off, "p", "admin_state_up = false"),
                p(),
            ],
        ),
        2,
    );
    assert!(
        connect_greeting(addr(off)).is_err(),
        "an admin-down listener must not listen"
    );
    let (mut on_gone, _) = connect_greeting(addr(gone)).expect("connect");
    server
        .apply(config(
            2,
            &[listener("keep", "127.0.0.1", keep, "p", ""), p()],
        ))
        .expect("apply");
    assert!(
        connect_greeting(addr(gone)).is_err(),
        "removed listener still accepts"
    );
    roundtrip(&mut on_gone, b"finishing on a removed listener").expect("echo");
    let (_s, name) = connect_greeting(addr(keep)).expect("kept listener serves");
    assert_eq!(name, "b0");
    drop(on_gone);
    assert!(eventually(Duration::from_secs(5), || b.active() <= 1));
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn check_refuses_what_run_cannot_bind_reach_or_parse() {
    let dir = TempDir::new("check-run");
    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        r#"
generation = 1
[[listeners]]
id = "mapped"
protocol = "TCP"
bind_addresses = ["::ffff:127.0.0.1"]
protocol_port = 8080
default_pool_id = "p"

[[pools]]
id = "p"
protocol = "TCP"
lb_algorithm = "ROUND_ROBIN"
members = [
  { id = "self", address = "0.0.0.0", protocol_port = 80 },
  { id = "group", address = "224.0.0.1", protocol_port = 80 },
  { id = "everyone", address = "255.255.255.255", protocol_port = 80 },
]
"#,
    )
    .expect("write");
    let trailing = dir.path("trailing.json");
    std::fs::write(&trailing, r#"{"generation": 3} {"x": ["#).expect("write");
    let positional = dir.path("positional.json");
    std::fs::write(&positional, "[3, [], []]").expect("write");
    let cases: [(&std::path::Path, &[&str]); 3] = [
        (
            &bad,
            &[
                "listener \"mapped\": bind_addresses: ::ffff:127.0.0.1 is an IPv4-mapped IPv6 address",
                "pool \"p\" member \"self\": address: 0.0.0.0 is the unspecified address",
                "pool \"p\" member \"group\": address: 224.0.0.1 is a multicast address",
                "pool \"p\" member \"everyone\": address: 255.255.255.255 is the broadcast address",
            ],
        ),
        (&trailing, &["trailing characters"]),
        (&positional, &["positional form"]),
    ];
    for (file, needles) in cases {
        // `check` and `run` refuse the same file with the same words.
        let checked = bin()
            .args(["check", "--config"])
            .arg(file)
            .output()
            .expect("run check");
        let ran = bin()
            .args(["run", "--no-api", "--config"])
            .arg(file)
            .output()
            .expect("run run");
        for out in [checked, ran] {
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            for needle in needles {
                assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
            }
        }
    }
}

/// A running dataplane with one listener (`port`) in front of a backend
/// of its own, and its control socket.
struct WithApi {
    proc: Proc,
    socket: std::path::PathBuf,
    port: u16,
    /// Kept for as long as the test binds it (`_keep`).
    _keep: (Backend, std::sync::Arc<tokio::runtime::Runtime>, TempDir),
}

impl WithApi {
    /// With `--drain-timeout 60` and `extra` arguments.
    fn start(tag: &str, extra: &[&str]) -> WithApi {
        let rt = siphon_testkit::runtime();
        let b = Backend::start(&rt, "b0", "127.0.0.1");
        let port = free_port();
        let dir = TempDir::new(tag);
        let (proc, socket) = running_with_api(&b, port, &dir, extra);
        WithApi {
            proc,
            socket,
            port,
            _keep: (b, rt, dir),
        }
    }
}

fn running_with_api(
    b: &Backend,
    port: u16,
    dir: &TempDir,
    extra: &[&str],
) -> (Proc, std::path::PathBuf) {
    let file = dir.path("siphon.toml");
    std::fs::write(&file, toml(1, &one_member(port, "b0", b.addr))).expect("write");
    let socket = dir.path("ctl.sock");
    let mut args = vec![
        "run",
        "--config",
        file.to_str().expect("utf8"),
        "--socket",
        socket.to_str().expect("utf8"),
        "--workers",
        "2",
        "--drain-timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    let proc = dataplane(&args, &dir.path("log"));
    assert!(
        proc.wait_log("siphon-dataplane running", 1, Duration::from_secs(10)),
        "{}",
        proc.log_text()
    );
    (proc, socket)
}

#[test]
fn half_sent_api_requests_never_hold_sigterm() {
    use std::io::Write;
    let WithApi {
        mut proc,
        socket,
        _keep,
        ..
    } = WithApi::start("term-api", &[]);
    // One client stopped in the middle of its headers, one in the middle
    // of its body, one that never said anything.
    let mut held = Vec::new();
    for part in [
        "PUT /v1/config HTTP/1.1\r\nHost: x\r\nContent-Le",
        "PUT /v1/config HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"generation\": ",
        "",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        s.write_all(part.as_bytes()).expect("write");
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    proc.signal(Signal::SIGTERM);
    // No connection to drain: out at once, whatever the API clients do.
    exits_zero(&mut proc, Duration::from_secs(5));
    assert!(!socket.exists(), "the control socket file stays behind");
}

#[test]
fn a_second_sigterm_ends_the_drain_at_once() {
    let WithApi {
        mut proc,
        port,
        _keep,
        ..
    } = WithApi::start("term-twice", &[]);
    let (mut held, _) = connect_greeting(addr(port)).expect("connect");
    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_log("draining", 1, Duration::from_secs(5)));
    roundtrip(&mut held, b"draining but alive").expect("echo while draining");
    assert_eq!(proc.try_wait().expect("wait"), None, "exited early");
    // The operator does not want to wait the 60 s.
    proc.signal(Signal::SIGTERM);
    exits_zero(&mut proc, Duration::from_secs(5));
    assert!(proc.log_text().contains("second stop signal"));
    // The connection was closed by the dataplane, not left hanging.
    held.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert!(matches!(
        std::io::Read::read(&mut held, &mut buf),
        Ok(0) | Err(_)
    ));
}

/// The process exits with status 0 within `within` (its log otherwise).
fn exits_zero(proc: &mut Proc, within: Duration) {
    assert_eq!(proc.wait_exit(within), Some(0), "{}", proc.log_text());
}

/// Connects to `port` on loopback within `within`.
fn try_connect(port: u16, within: Duration) -> std::io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.connect_timeout(&addr(port).into(), within)?;
    Ok(s.into())
}

#[test]
fn with_a_drain_delay_sigterm_drops_new_syns_while_the_api_is_gone_then_drains() {
    let WithApi {
        mut proc,
        socket,
        port,
        _keep,
        ..
    } = WithApi::start("term-delay", &["--drain-delay-ms", "2500"]);
    let (mut held, _) = connect_greeting(addr(port)).expect("connect");
    let termed = Instant::now();
    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_log("new connection attempts dropped", 1, Duration::from_secs(5)));
    // The control API is gone at once (the agent withdraws the VIP) ...
    assert!(eventually(Duration::from_secs(2), || {
        std::os::unix::net::UnixStream::connect(&socket).is_err()
    }));
    // ... new connection attempts get no answer (the client's kernel
    // sends the SYN again), not a reset ...
    let e = try_connect(port, Duration::from_millis(500)).expect_err("accepted while quiescing");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(
        termed.elapsed() < Duration::from_millis(2000),
        "the check came too late"
    );
    // ... and established connections go on.
    roundtrip(&mut held, b"quiescing but alive").expect("echo while quiescing");
    // After the delay: the drain proper, the listener closed (refused).
    assert!(proc.wait_log("draining established ones", 1, Duration::from_secs(5)));
    assert!(termed.elapsed() >= Duration::from_millis(2500));
    let e = try_connect(port, Duration::from_millis(500)).expect_err("accepted while draining");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    roundtrip(&mut held, b"draining but alive").expect("echo while draining");
    drop(held);
    exits_zero(&mut proc, Duration::from_secs(10));

    // A second SIGTERM ends the delay (and the drain) at once.
    let WithApi {
        mut proc,
        port,
        _keep,
        ..
    } = WithApi::start("term-delay-cut", &["--drain-delay-ms", "60000"]);
    let (_held, _) = connect_greeting(addr(port)).expect("connect");
    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_log("new connection attempts dropped", 1, Duration::from_secs(5)));
    proc.signal(Signal::SIGTERM);
    exits_zero(&mut proc, Duration::from_secs(5));
}

#[test]
fn api_timeouts_are_set_from_the_command_line() {
    use std::io::Read;
    let WithApi {
        mut proc,
        socket,
        _keep,
        ..
    } = WithApi::start("api-timeouts", &["--api-idle-timeout", "1"]);
    // A client that says nothing is closed after 1 s, not the default 5 s.
    let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    let start = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = s
        .read(&mut buf)
        .expect("closed by the API, not timed out here");
    assert_eq!(n, 0);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    proc.signal(Signal::SIGTERM);
    assert_eq!(proc.wait_exit(Duration::from_secs(5)), Some(0));
    // Zero would mean "close at once": refused with a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_siphon-dataplane"))
        .args(["run", "--api-idle-timeout", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-idle-timeout"), "{err}");
}
