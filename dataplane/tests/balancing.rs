#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! Member choice through the running proxy: distribution per algorithm
//! (with stated tolerances), weights, backups, draining, and agreement
//! with the Maglev table any other node would build.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use siphon_dataplane::maglev::{hash_source, hash_source_ip, Backend as MBackend, MaglevTable};
use siphon_testkit::{connect_greeting, connect_greeting_from, free_port, roundtrip, Backend};

struct Setup {
    backends: Vec<Backend>,
    server: siphon_dataplane::Server,
    port: u16,
}

/// Starts `weights.len()` backends named b0, b1, ... behind one listener.
fn setup(algorithm: &str, weights: &[u32], workers: usize) -> Setup {
    let rt = siphon_testkit::runtime();
    let backends: Vec<Backend> = (0..weights.len())
        .map(|i| Backend::start(&rt, &format!("b{i}"), "127.0.0.1"))
        .collect();
    let port = free_port();
    let members: Vec<String> = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| member(&b.name, b.addr, *w, ""))
        .collect();
    let server = start(
        config(
            1,
            &[
                listener("l", "127.0.0.1", port, "p", ""),
                pool("p", "TCP", algorithm, &members),
            ],
        ),
        workers,
    );
    Setup {
        backends,
        server,
        port,
    }
}

/// Makes `n` short connections (optionally from chosen source addresses)
/// and counts which member answered.
fn tally(
    port: u16,
    n: usize,
    from: impl Fn(usize) -> Option<SocketAddr>,
) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for i in 0..n {
        let (_s, name) = connect_greeting_from(from(i), addr(port))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *count.entry(name).or_insert(0) += 1;
    }
    count
}

fn share(count: &HashMap<String, usize>, name: &str) -> usize {
    count.get(name).copied().unwrap_or(0)
}

#[test]
fn round_robin_follows_weights() {
    // The workers share one round-robin position: 600 connections are
    // whole cycles of the weighted schedule, so the shares are exact.
    let s = setup("ROUND_ROBIN", &[1, 2, 3], 2);
    let count = tally(s.port, 600, |_| None);
    for (name, want) in [("b0", 100i64), ("b1", 200), ("b2", 300)] {
        let got = share(&count, name) as i64;
        assert!(got == want, "{name}: {got} vs {want} ({count:?})");
    }
    s.server.shutdown(Duration::from_secs(1));
}

#[test]
fn round_robin_is_shared_by_the_workers() {
    // The demo: six connections over its two backends, two workers. The
    // workers share the pool's round-robin position, so the connections
    // alternate whichever worker accepts each (3 and 3, not 4 and 2).
    let ports = [free_port(), free_port()];
    let listeners = siphon_dataplane::demo::bind_backends(ports).expect("bind demo backends");
    for (name, l) in ["backend-1", "backend-2"].into_iter().zip(listeners) {
        siphon_dataplane::demo::spawn_backend(name, l);
    }
    let port = free_port();
    let config = siphon_dataplane::demo::config(port, ports).expect("demo config");
    let server = start(config, 2);
    for round in 0..3 {
        let greetings = siphon_dataplane::demo::probe(addr(port), 6).expect("probe");
        let on = |name: &str| greetings.iter().filter(|g| g.ends_with(name)).count();
        assert_eq!(
            (on("backend-1"), on("backend-2")),
            (3, 3),
            "round {round}: {greetings:?}"
        );
    }
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn least_connections_follows_weights_for_held_connections() {
    let s = setup("LEAST_CONNECTIONS", &[1, 2], 2);
    // Hold 30 connections open: weighted least-connections fills 10 : 20.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(connect_greeting(addr(s.port)).expect("connect"));
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, name) in &held {
        *count.entry(name.clone()).or_insert(0) += 1;
    }
    let (a, b) = (share(&count, "b0") as i64, share(&count, "b1") as i64);
    assert!((a - 10).abs() <= 1 && (b - 20).abs() <= 1, "{count:?}");
    // Close everything on b1: new connections now go to b1 until even.
    held.retain(|(_, n)| n == "b0");
    assert!(eventually(Duration::from_secs(5), || s.backends[1]
        .active()
        == 0));
    assert!(eventually(Duration::from_secs(5), || s
        .server
        .stats()
        .member("p", "b1")
        .map(|m| m.active_connections)
        == Some(0)));
    let (_c, name) = connect_greeting(addr(s.port)).expect("connect");
    assert_eq!(name, "b1");
    s.server.shutdown(Duration::from_secs(1));
}

/// 127.0.x.y source addresses: loopback accepts the whole /8.
fn source(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8], 0))
}

#[test]
fn source_ip_sticks_per_client_and_spreads_clients() {
    let s = setup("SOURCE_IP", &[1, 1, 1], 2);
    let first = (0..600)
        .map(|i| {
            connect_greeting_from(Some(source(i)), addr(s.port))
                .expect("c")
                .1
        })
        .collect::<Vec<_>>();
    // Stickiness: every client address lands on its member again.
    for (i, name) in first.iter().enumerate().step_by(7) {
        let (_s, again) = connect_greeting_from(Some(source(i)), addr(s.port)).expect("c");
        assert_eq!(&again, name, "client {i} moved");
    }
    // Spread: 600 clients over 3 members, each within 200 ± 60 (about 5
    // standard deviations of a fair split).
    let mut count: HashMap<String, usize> = HashMap::new();
    for n in &first {
        *count.entry(n.clone()).or_insert(0) += 1;
    }
    for b in ["b0", "b1", "b2"] {
        let c = share(&count, b);
        assert!((140..=260).contains(&c), "{b}: {c} ({count:?})");
    }
    s.server.shutdown(Duration::from_secs(1));
}

/// The member another node would choose: the library's Maglev table over
/// the same members, built independently of the running proxy.
fn predicted(names: &[&str], key: u64) -> String {
    let backends: Vec<MBackend<'_>> = names.iter().map(|id| MBackend { id, weight: 1 }).collect();
    let t = MaglevTable::build(&backends, 65537).expect("table");
    names[usize::from(t.lookup(key))].to_owned()
}

#[test]
fn source_ip_port_spreads_and_matches_every_nodes_table() {
    let s = setup("SOURCE_IP_PORT", &[1, 1, 1], 2);
    let mut count: HashMap<String, usize> = HashMap::new();
    for i in 0..900 {
        let (c, name) = connect_greeting(addr(s.port)).expect("connect");
        let local = c.local_addr().expect("local");
        assert_eq!(
            name,
            predicted(&["b0", "b1", "b2"], hash_source(local)),
            "connection {i} from {local}"
        );
        *count.entry(name).or_insert(0) += 1;
    }
    // 900 flows over 3 members: 300 ± 75 each (about 5 standard deviations).
    for b in ["b0", "b1", "b2"] {
        let c = share(&count, b);
        assert!((225..=375).contains(&c), "{b}: {c} ({count:?})");
    }
    s.server.shutdown(Duration::from_secs(1));
}

#[test]
fn maglev_spreads_flows_and_honours_weights() {
    let s = setup("MAGLEV", &[1, 3], 2);
    let count = tally(s.port, 800, |_| None);
    // weight 1 : 3 -> 200 : 600, each within ± 70 (about 5 s.d.)
    let (a, b) = (share(&count, "b0") as i64, share(&count, "b1") as i64);
    assert!((a - 200).abs() <= 70 && (b - 600).abs() <= 70, "{count:?}");
    s.server.shutdown(Duration::from_secs(1));
}

#[test]
fn source_ip_agrees_with_the_table_for_each_address() {
    let s = setup("SOURCE_IP", &[1, 2, 1], 1);
    let names = ["b0", "b1", "b2"];
    let backends: Vec<MBackend<'_>> = names
        .iter()
        .zip([1u32, 2, 1])
        .map(|(id, weight)| MBackend { id, weight })
        .collect();
    let t = MaglevTable::build(&backends, 65537).expect("table");
    for i in 0..100 {
        let src = source(i);
        let (_c, name) = connect_greeting_from(Some(src), addr(s.port)).expect("c");
        assert_eq!(name, names[usize::from(t.lookup(hash_source_ip(src.ip())))]);
    }
    s.server.shutdown(Duration::from_secs(1));
}

#[test]
fn backup_members_serve_only_when_no_primary_is_usable() {
    let rt = siphon_testkit::runtime();
    let p1 = Backend::start(&rt, "primary-1", "127.0.0.1");
    let p2 = Backend::start(&rt, "primary-2", "127.0.0.1");
    let bk = Backend::start(&rt, "backup", "127.0.0.1");
    let port = free_port();
    let cfg = |generation, p1_extra: &str, p2_weight| {
        config(
            generation,
            &[
                listener("l", "127.0.0.1", port, "p", ""),
                pool(
                    "p",
                    "TCP",
                    "ROUND_ROBIN",
                    &[
                        member("primary-1", p1.addr, 1, p1_extra),
                        member("primary-2", p2.addr, p2_weight, ""),
                        member("backup", bk.addr, 1, "backup = true"),
                    ],
                ),
            ],
        )
    };
    let server = start(cfg(1, "", 1), 2);
    let count = tally(port, 20, |_| None);
    assert_eq!(share(&count, "backup"), 0, "{count:?}");
    // One primary admin-down, the other drained: only the backup is left.
    server
        .apply(cfg(2, "admin_state_up = false", 0))
        .expect("apply");
    let count = tally(port, 10, |_| None);
    assert_eq!(share(&count, "backup"), 10, "{count:?}");
    // A primary back: the backup gets nothing new.
    server.apply(cfg(3, "", 0)).expect("apply");
    let count = tally(port, 10, |_| None);
    assert_eq!(share(&count, "primary-1"), 10, "{count:?}");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_drained_member_keeps_its_established_connections() {
    let rt = siphon_testkit::runtime();
    let a = Backend::start(&rt, "a", "127.0.0.1");
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let cfg = |generation, wa| {
        config(
            generation,
            &[
                listener("l", "127.0.0.1", port, "p", ""),
                pool(
                    "p",
                    "TCP",
                    "ROUND_ROBIN",
                    &[member("a", a.addr, wa, ""), member("b", b.addr, 1, "")],
                ),
            ],
        )
    };
    let server = start(cfg(1, 1), 1);
    let (mut on_a, name) = connect_greeting(addr(port)).expect("connect");
    assert_eq!(name, "a", "round robin starts with the first member by id");
    server.apply(cfg(2, 0)).expect("drain a");
    let count = tally(port, 20, |_| None);
    assert_eq!(
        share(&count, "b"),
        20,
        "no new connection to a drained member: {count:?}"
    );
    roundtrip(&mut on_a, b"still here").expect("the established connection still works");
    assert_eq!(a.active(), 1);
    drop(on_a);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn dual_stack_listener_serves_both_families() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let l = format!(
        "[[listeners]]\nid = \"dual\"\nprotocol = \"TCP\"\nbind_addresses = [\"127.0.0.1\", \"::1\"]\nprotocol_port = {port}\ndefault_pool_id = \"p\"\n"
    );
    let server = start(
        config(
            1,
            &[
                l,
                pool("p", "TCP", "ROUND_ROBIN", &[member("b", b.addr, 1, "")]),
            ],
        ),
        2,
    );
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), "::1".parse().expect("v6")] {
        let (_s, name) = connect_greeting(SocketAddr::new(ip, port)).expect("connect");
        assert_eq!(name, "b");
    }
    server.shutdown(Duration::from_secs(1));
}
