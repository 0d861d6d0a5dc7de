#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! Health monitors and passive ejection against real peers on loopback:
//! a killed backend goes ERROR within delay × max_retries_down (+ timeout)
//! and gets no new connections, then comes back after max_retries good
//! checks; HTTP(S) status codes, TLS-HELLO, UDP-CONNECT, PING; ejection
//! after connect failures in a row and re-admission after the back-off.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use siphon_dataplane::{OperatingStatus, Options, Server};
use siphon_testkit::http::HttpBackend;
use siphon_testkit::{connect_greeting, free_port, free_udp_port, Backend, UdpBackend};

use OperatingStatus::*;

fn monitor(kind: &str, delay: u32, timeout: u32, rise: u32, fall: u32, extra: &str) -> String {
    format!(
        "[pools.healthmonitor]\ntype = \"{kind}\"\ndelay = {delay}\ntimeout = {timeout}\n\
         max_retries = {rise}\nmax_retries_down = {fall}\n{extra}\n"
    )
}

fn status_of(server: &Server, pool: &str, member: &str) -> OperatingStatus {
    server
        .status()
        .member(pool, member)
        .unwrap_or_else(|| panic!("no member {pool}/{member}"))
        .operating_status
}

/// Waits up to `limit` for the member to reach `want`; returns how long it
/// took, or panics with the last status seen.
fn wait_for(server: &Server, member: &str, want: OperatingStatus, limit: Duration) -> Duration {
    let start = Instant::now();
    let ok = eventually(limit, || status_of(server, "p", member) == want);
    let status = server.status();
    assert!(
        ok,
        "{member} not {want:?} within {limit:?}: {:?}",
        status.member("p", member)
    );
    start.elapsed()
}

fn one_pool(members: &[String], hm: &str) -> (u16, siphon_dataplane::Config) {
    let port = free_port();
    let cfg = config(
        1,
        &[
            listener("l", "127.0.0.1", port, "p", ""),
            format!("{}{hm}", pool("p", "TCP", "ROUND_ROBIN", members)),
        ],
    );
    (port, cfg)
}

fn start_with(cfg: siphon_dataplane::Config, opts: Options) -> Server {
    siphon_testkit::raise_fd_limit();
    Server::start(cfg, opts).unwrap_or_else(|e| panic!("start: {e}"))
}

#[test]
fn killed_backend_goes_error_gets_no_connections_and_comes_back() {
    let rt = siphon_testkit::runtime();
    let b0 = Backend::start(&rt, "b0", "127.0.0.1");
    let b1 = Backend::start(&rt, "b1", "127.0.0.1");
    let (delay, timeout, rise, fall) = (1, 1, 2, 2);
    let (port, cfg) = one_pool(
        &[member("b0", b0.addr, 1, ""), member("b1", b1.addr, 1, "")],
        &monitor("TCP", delay, timeout, rise, fall, ""),
    );
    // No passive ejection: this test is about the active check alone.
    let server = start_with(
        cfg,
        Options {
            eject_after: 0,
            ..options(2)
        },
    );
    wait_for(&server, "b1", Online, Duration::from_secs(1));
    assert_eq!(server.status().pool("p").unwrap().operating_status, Online);

    b1.stop();
    // Down after `fall` failed checks: at most delay × fall, plus the
    // timeout of the last check, plus scheduling slack.
    let bound =
        Duration::from_secs(u64::from(delay * fall + timeout)) + Duration::from_millis(1500);
    let took = wait_for(&server, "b1", Error, bound);
    eprintln!("b1 ERROR after {took:?} (bound {bound:?})");
    let status = server.status();
    assert_eq!(status.pool("p").unwrap().operating_status, Degraded);
    let reason = status.member("p", "b1").unwrap().reason.clone().unwrap();
    assert!(reason.contains("failed check"), "{reason}");

    let errors_before = server.stats().member("p", "b1").unwrap().connect_errors;
    for _ in 0..20 {
        let (_s, name) = connect_greeting(addr(port)).unwrap();
        assert_eq!(name, "b0");
    }
    let errors_after = server.stats().member("p", "b1").unwrap().connect_errors;
    assert_eq!(errors_before, errors_after, "no connection tried b1");

    let b1 = Backend::start_at(&rt, "b1", b1.addr);
    let bound = Duration::from_secs(u64::from(delay * rise)) + Duration::from_millis(1500);
    let took = wait_for(&server, "b1", Online, bound);
    eprintln!("b1 ONLINE again after {took:?} (bound {bound:?})");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(connect_greeting(addr(port)).unwrap().1);
    }
    assert!(seen.contains("b1"), "b1 serves again: {seen:?}");
    drop(b1);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn http_checks_judge_the_status_code() {
    let rt = siphon_testkit::runtime();
    let web = HttpBackend::start(&rt, 500);
    let (_, cfg) = one_pool(
        &[member("web", web.addr, 1, "")],
        &monitor(
            "HTTP",
            1,
            1,
            1,
            1,
            "http_method = \"HEAD\"\nurl_path = \"/health?deep=1\"\nexpected_codes = \"200-204\"",
        ),
    );
    let server = start_with(cfg, options(1));
    wait_for(&server, "web", Error, Duration::from_secs(4));
    let status = server.status();
    let reason = status.member("p", "web").unwrap().reason.clone().unwrap();
    assert!(reason.contains("500"), "{reason}");
    assert_eq!(status.pool("p").unwrap().operating_status, Error);
    assert_eq!(web.last_request(), "HEAD /health?deep=1");

    web.set_status(204);
    wait_for(&server, "web", Online, Duration::from_secs(4));
    web.set_status(302);
    wait_for(&server, "web", Error, Duration::from_secs(4));
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn https_and_tls_hello_checks_complete_a_handshake_without_verifying() {
    let rt = siphon_testkit::runtime();
    let tls = HttpBackend::start_tls(&rt, 200);
    let plain = Backend::start(&rt, "plain", "127.0.0.1");
    let server = |kind: &str, addr: SocketAddr| {
        let (_, cfg) = one_pool(&[member("m", addr, 1, "")], &monitor(kind, 1, 1, 1, 1, ""));
        start_with(cfg, options(1))
    };
    // Start from ERROR so that ONLINE proves a check passed: a member
    // starts up until its checks say otherwise.
    let https = server("HTTPS", tls.addr);
    wait_for(&https, "m", Online, Duration::from_secs(1));
    let before = tls.requests();
    assert!(eventually(Duration::from_secs(4), || tls.requests() > before));
    assert_eq!(status_of(&https, "p", "m"), Online);
    tls.set_status(503);
    wait_for(&https, "m", Error, Duration::from_secs(4));
    https.shutdown(Duration::from_secs(1));

    let hello = server("TLS-HELLO", tls.addr);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status_of(&hello, "p", "m"), Online, "handshake completes");
    hello.shutdown(Duration::from_secs(1));

    // A server that speaks no TLS fails the handshake.
    let not_tls = server("TLS-HELLO", plain.addr);
    wait_for(&not_tls, "m", Error, Duration::from_secs(4));
    not_tls.shutdown(Duration::from_secs(1));
}

#[test]
fn udp_connect_goes_down_on_port_unreachable() {
    let rt = siphon_testkit::runtime();
    let alive = UdpBackend::start(&rt, "alive", "127.0.0.1");
    let closed = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let port = free_udp_port();
    let cfg = config(
        1,
        &[
            udp_listener("l", "127.0.0.1", port, "p", ""),
            format!(
                "{}{}",
                pool(
                    "p",
                    "UDP",
                    "ROUND_ROBIN",
                    &[
                        member("alive", alive.addr, 1, ""),
                        member("closed", closed, 1, "")
                    ]
                ),
                monitor("UDP-CONNECT", 1, 1, 1, 2, "")
            ),
        ],
    );
    let server = start_with(cfg, options(1));
    let took = wait_for(&server, "closed", Error, Duration::from_secs(5));
    eprintln!("closed port ERROR after {took:?}");
    let status = server.status();
    let reason = status
        .member("p", "closed")
        .unwrap()
        .reason
        .clone()
        .unwrap();
    assert!(reason.contains("unreachable"), "{reason}");
    assert_eq!(status_of(&server, "p", "alive"), Online);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn ping_loopback_is_up() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let (_, cfg) = one_pool(
        &[member("b", b.addr, 1, "")],
        &monitor("PING", 1, 1, 1, 1, ""),
    );
    let server = start_with(cfg, options(1));
    // Three checks' worth of time: still up means every echo came back.
    std::thread::sleep(Duration::from_millis(3200));
    let status = server.status();
    let m = status.member("p", "b").unwrap();
    assert_eq!(m.operating_status, Online, "{m:?}");
    assert_eq!(m.reason, None, "never went down");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn connect_failures_eject_a_member_until_the_back_off_ends() {
    let rt = siphon_testkit::runtime();
    let good = Backend::start(&rt, "good", "127.0.0.1");
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (port, cfg) = one_pool(
        &[
            member("good", good.addr, 1, ""),
            member("dead", dead, 1, ""),
        ],
        "",
    );
    let server = start_with(
        cfg,
        Options {
            eject_after: 3,
            eject_backoff: Duration::from_secs(1),
            ..options(1)
        },
    );
    assert_eq!(status_of(&server, "p", "dead"), NoMonitor);
    let dead_errors = |server: &Server| server.stats().member("p", "dead").unwrap().connect_errors;
    // Every connection still reaches a member (a refused connect moves on)
    // until the dead one is ejected. The ejection is decided off the
    // workers, so a connection or two may still try it meanwhile.
    // A failure is counted before the retry reaches "good"; once 3 are,
    // no more connections are made until the monitor's task (which takes
    // its own time on a busy machine) has decided.
    let until_ejected = |server: &Server| {
        let base = dead_errors(server);
        for _ in 0..50 {
            if dead_errors(server) - base >= 3 {
                break;
            }
            assert_eq!(connect_greeting(addr(port)).unwrap().1, "good");
        }
        let ejected = eventually(Duration::from_secs(3), || {
            status_of(server, "p", "dead") == Error
        });
        assert!(
            ejected,
            "never ejected: {:?}",
            server.status().member("p", "dead")
        );
    };
    until_ejected(&server);
    let status = server.status();
    let dead_status = status.member("p", "dead").unwrap();
    assert!(dead_status.reason.as_deref().unwrap().contains("ejected"));
    let at_ejection = dead_errors(&server);
    assert!(
        (3..=5).contains(&at_ejection),
        "ejected after {at_ejection} failures, want 3 (+2 in flight)"
    );
    // While ejected, nothing tries it.
    for _ in 0..10 {
        assert_eq!(connect_greeting(addr(port)).unwrap().1, "good");
    }
    assert_eq!(dead_errors(&server), at_ejection);

    // Back after the back-off, and out again after 3 more failures.
    wait_for(&server, "dead", NoMonitor, Duration::from_secs(3));
    until_ejected(&server);
    let again = dead_errors(&server) - at_ejection;
    assert!(
        (3..=5).contains(&again),
        "ejected again after {again} failures"
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn status_shows_admin_down_draining_and_keeps_health_across_reloads() {
    let rt = siphon_testkit::runtime();
    let bs: Vec<Backend> = (0..3)
        .map(|i| Backend::start(&rt, &format!("b{i}"), "127.0.0.1"))
        .collect();
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let members = |gen_extra: &str| {
        vec![
            member("b0", bs[0].addr, 1, ""),
            member("b1", bs[1].addr, 0, ""),
            member("b2", bs[2].addr, 1, "admin_state_up = false"),
            member("dead", dead, 1, gen_extra),
        ]
    };
    let hm = monitor("TCP", 1, 1, 1, 1, "");
    let port = free_port();
    let cfg = |generation: u64, extra: &str| {
        config(
            generation,
            &[
                listener("l", "127.0.0.1", port, "p", ""),
                format!("{}{hm}", pool("p", "TCP", "ROUND_ROBIN", &members(extra))),
            ],
        )
    };
    let server = start_with(cfg(1, ""), options(1));
    wait_for(&server, "dead", Error, Duration::from_secs(4));
    let s = server.status();
    assert_eq!(s.generation, 1);
    assert_eq!(s.member("p", "b0").unwrap().operating_status, Online);
    assert_eq!(s.member("p", "b1").unwrap().operating_status, Draining);
    assert_eq!(s.member("p", "b2").unwrap().operating_status, Offline);
    assert_eq!(s.pool("p").unwrap().operating_status, Degraded);
    assert_eq!(s.listeners[0].operating_status, Online);
    let since = s.member("p", "dead").unwrap().since;

    // A reload that does not touch the member's check keeps its state.
    server.apply(cfg(2, "backup = true")).unwrap();
    let s = server.status();
    assert_eq!(s.member("p", "dead").unwrap().operating_status, Error);
    assert_eq!(s.member("p", "dead").unwrap().since, since);
    server.shutdown(Duration::from_secs(1));
}

/// Connects once; true if a backend greeted, false if the proxy refused
/// or cut the connection.
fn served(port: u16) -> bool {
    connect_greeting(addr(port)).is_ok()
}

#[test]
fn the_last_member_up_is_never_ejected_and_at_most_half_a_pool_is() {
    // One member, refusing every connect: ejecting it would turn "failing"
    // into "no member at all" and, with the doubling back-off, keep the
    // pool dark long after the member recovers.
    let lone = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (port, cfg) = one_pool(&[member("lone", lone, 1, "")], "");
    let opts = || Options {
        eject_after: 2,
        ..options(1)
    };
    let server = start_with(cfg, opts());
    for _ in 0..12 {
        assert!(!served(port), "nothing listens behind the proxy");
    }
    // Workers hand ejections to the health monitor's task, which counts
    // the held-back ones on its own time: wait for it, don't race it.
    let held_back = || {
        server
            .stats()
            .member("p", "lone")
            .unwrap()
            .ejections_held_back
    };
    assert!(eventually(Duration::from_secs(4), || held_back() >= 5));
    let stats = server.stats();
    let m = stats.member("p", "lone").unwrap();
    assert!(m.connect_errors >= 12, "{m:?}");
    assert_eq!(m.ejected_refused, 0, "{m:?}");
    assert_eq!(status_of(&server, "p", "lone"), NoMonitor);
    // It comes back: served at once, no back-off to sit out.
    let rt = siphon_testkit::runtime();
    let back = Backend::start_at(&rt, "lone", lone);
    assert!(served(port));
    drop(back);
    server.shutdown(Duration::from_secs(1));

    // Four members, three refusing: only two may be out at once (50 %).
    let rt = siphon_testkit::runtime();
    let good = Backend::start(&rt, "good", "127.0.0.1");
    let dead: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let mut members = vec![member("good", good.addr, 1, "")];
    members.extend((0..3).map(|i| member(&format!("d{i}"), dead[i], 1, "")));
    let (port, cfg) = one_pool(&members, "");
    let server = start_with(cfg, opts());
    let ejected = |server: &Server| {
        (0..3)
            .filter(|i| status_of(server, "p", &format!("d{i}")) == Error)
            .count()
    };
    for _ in 0..60 {
        // A refused connect moves on to the next member (3 retries).
        assert!(served(port));
    }
    assert!(
        eventually(Duration::from_secs(4), || ejected(&server) == 2),
        "{:?}",
        server.status()
    );
    let held = || -> u64 {
        let stats = server.stats();
        (0..3)
            .map(|i| {
                let m = stats.member("p", &format!("d{i}")).unwrap();
                m.ejections_held_back
            })
            .sum()
    };
    assert!(
        eventually(Duration::from_secs(4), || held() > 0),
        "the third ejection was held back: {:?}",
        server.stats()
    );
    let stats = server.stats();
    let metrics = siphon_dataplane::metrics::render(&stats, &server.status(), &[]);
    assert!(
        metrics.contains("siphon_member_ejections_total{pool=\"p\",member=\"d")
            && metrics.contains("reason=\"refused\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("siphon_member_ejections_held_back_total"));
    server.shutdown(Duration::from_secs(1));
}

/// A listener that completes no handshake once its accept queue is full:
/// later SYNs are dropped, so connects to it time out (an overloaded host).
fn unresponsive() -> (std::net::TcpListener, Vec<std::net::TcpStream>, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let a = SocketAddr::from(([127, 0, 0, 1], 0));
    s.bind(&a.into()).unwrap();
    s.listen(0).unwrap();
    let l: std::net::TcpListener = s.into();
    let at = l.local_addr().unwrap();
    // Fill the accept queue (a backlog of 0 holds one).
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&at, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    (l, fillers, at)
}

#[test]
fn connect_timeouts_are_counted_apart_and_take_more_to_eject() {
    let rt = siphon_testkit::runtime();
    let good = Backend::start(&rt, "good", "127.0.0.1");
    let (_slow, _fillers, slow) = unresponsive();
    let port = free_port();
    let cfg = config(
        1,
        &[
            listener("l", "127.0.0.1", port, "p", "timeout_member_connect = 100"),
            pool(
                "p",
                "TCP",
                "ROUND_ROBIN",
                &[
                    member("good", good.addr, 1, ""),
                    member("slow", slow, 1, ""),
                ],
            ),
        ],
    );
    let server = start_with(
        cfg,
        Options {
            eject_after: 2,
            eject_after_timeouts: 4,
            ..options(1)
        },
    );
    let timeouts = |server: &Server| server.stats().member("p", "slow").unwrap().connect_timeouts;
    let mut n = 0;
    while status_of(&server, "p", "slow") != Error && n < 40 {
        // Each connection reaches the good member, at worst after one
        // timed-out try of the slow one.
        assert_eq!(connect_greeting(addr(port)).unwrap().1, "good");
        n += 1;
    }
    let stats = server.stats();
    let m = stats.member("p", "slow").unwrap();
    assert_eq!(status_of(&server, "p", "slow"), Error, "{m:?}");
    // Two timeouts did not eject it (two refusals would have); four did.
    assert!((4..=5).contains(&timeouts(&server)), "{m:?}");
    assert_eq!((m.ejected_timed_out, m.ejected_refused), (1, 0), "{m:?}");
    let reason = server.status().member("p", "slow").unwrap().reason.clone();
    assert!(reason.unwrap().contains("timeouts"));
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn an_ejected_member_pointed_at_a_new_address_serves_at_once() {
    let rt = siphon_testkit::runtime();
    let good = Backend::start(&rt, "good", "127.0.0.1");
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (port, cfg) = one_pool(
        &[member("good", good.addr, 1, ""), member("m", dead, 1, "")],
        "",
    );
    let server = start_with(
        cfg,
        Options {
            eject_after: 2,
            // Long enough that only the address change can bring it back.
            eject_backoff: Duration::from_secs(300),
            ..options(1)
        },
    );
    for _ in 0..20 {
        if status_of(&server, "p", "m") == Error {
            break;
        }
        assert!(served(port));
    }
    // The monitor's task decides the ejection on its own time.
    assert!(eventually(Duration::from_secs(4), || {
        status_of(&server, "p", "m") == Error
    }));
    // Re-point "m" at a live backend.
    let moved = Backend::start(&rt, "moved", "127.0.0.1");
    let cfg = config(
        2,
        &[
            listener("l", "127.0.0.1", port, "p", ""),
            pool(
                "p",
                "TCP",
                "ROUND_ROBIN",
                &[
                    member("good", good.addr, 1, ""),
                    member("m", moved.addr, 1, ""),
                ],
            ),
        ],
    );
    server.apply(cfg).unwrap();
    assert_eq!(status_of(&server, "p", "m"), NoMonitor);
    let names: Vec<String> = (0..4)
        .map(|_| connect_greeting(addr(port)).unwrap().1)
        .collect();
    assert!(names.iter().any(|n| n == "moved"), "{names:?}");
    assert_eq!(server.stats().member("p", "m").unwrap().ejected_refused, 1);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn latency_histograms_count_every_connect_session_and_passing_check() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let (port, cfg) = one_pool(
        &[member("b", b.addr, 1, "")],
        &monitor("TCP", 1, 1, 1, 1, ""),
    );
    let server = start_with(cfg, options(2));
    for _ in 0..5 {
        let (mut s, _) = connect_greeting(addr(port)).unwrap();
        siphon_testkit::roundtrip(&mut s, b"hi").unwrap();
    }
    let checks = |server: &Server| {
        server
            .stats()
            .member("p", "b")
            .unwrap()
            .check_latency
            .count()
    };
    assert!(eventually(Duration::from_secs(5), || {
        server.stats().listener("l").unwrap().active_connections == 0 && checks(&server) >= 1
    }));
    let page = siphon_dataplane::metrics::render(&server.stats(), &server.status(), &[]);
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let buckets = |name: &str, label: (&str, &str)| -> Vec<f64> {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .unwrap_or_else(|| panic!("no {name} in\n{page}"));
        let prometheus_parse::Value::Histogram(h) = &s.value else {
            panic!("{name} is not a histogram: {s:?}");
        };
        h.iter().map(|c| c.count).collect()
    };
    for (name, label, want) in [
        ("siphon_member_connect_seconds", ("member", "b"), 5.0),
        ("siphon_listener_session_seconds", ("listener", "l"), 5.0),
    ] {
        let counts = buckets(name, label);
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "cumulative: {counts:?}"
        );
        assert_eq!(counts.last(), Some(&want), "{name}: {counts:?}");
    }
    assert!(buckets("siphon_member_check_seconds", ("member", "b")).last() >= Some(&1.0));
    server.shutdown(Duration::from_secs(1));
}
