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
    let until_ejected = |server: &Server| {
        for _ in 0..50 {
            if status_of(server, "p", "dead") == Error {
                return;
            }
            assert_eq!(connect_greeting(addr(port)).unwrap().1, "good");
        }
        panic!("never ejected: {:?}", server.status().member("p", "dead"));
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
