#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! UDP load balancing on real loopback sockets: flows, stickiness, limits,
//! idle timeout, eviction, ACL, IPv6, large datagrams, ICMP errors, reloads.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use siphon_dataplane::maglev::{hash_source, Backend as MBackend, MaglevTable};
use siphon_dataplane::{Server, StatsReport};
use siphon_testkit::{free_udp_port, udp_ask, udp_client, udp_who, UdpBackend};

fn backends(n: usize) -> (std::sync::Arc<tokio::runtime::Runtime>, Vec<UdpBackend>) {
    let rt = siphon_testkit::runtime();
    let b = (0..n)
        .map(|i| UdpBackend::start(&rt, &format!("b{i}"), "127.0.0.1"))
        .collect();
    (rt, b)
}

fn members(bs: &[UdpBackend]) -> Vec<String> {
    bs.iter().map(|b| member(&b.name, b.addr, 1, "")).collect()
}

fn udp_proxy(
    generation: u64,
    port: u16,
    bs: &[UdpBackend],
    algorithm: &str,
    extra: &str,
) -> siphon_dataplane::Config {
    config(
        generation,
        &[
            udp_listener("u", "127.0.0.1", port, "p", extra),
            pool("p", "UDP", algorithm, &members(bs)),
        ],
    )
}

fn listener_stats(s: &Server) -> siphon_dataplane::stats::ListenerReport {
    s.stats().listener("u").cloned().expect("listener stats")
}

fn member_stats(s: &Server, id: &str) -> siphon_dataplane::stats::MemberReport {
    let r: StatsReport = s.stats();
    r.member("p", id).cloned().expect("member stats")
}

#[test]
fn requests_and_replies_across_many_flows() {
    let (_rt, bs) = backends(2);
    let port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, "ROUND_ROBIN", ""), 2);
    let mut count: HashMap<String, usize> = HashMap::new();
    // Clients stay open: a closed one's port could come back as a new
    // client with the same address, which is the same flow.
    let clients: Vec<_> = (0..200).map(|_| udp_client("127.0.0.1:0")).collect();
    for (i, c) in clients.iter().enumerate() {
        let name = udp_who(c, addr(port)).expect("who");
        for j in 0..3 {
            let msg = format!("flow {i} message {j}");
            let back = udp_ask(c, addr(port), msg.as_bytes()).expect("echo");
            assert_eq!(back, msg.as_bytes());
        }
        *count.entry(name).or_insert(0) += 1;
    }
    // Round robin per new flow, per worker: 100 ± 2 each.
    for b in ["b0", "b1"] {
        let c = count.get(b).copied().unwrap_or(0);
        assert!((98..=102).contains(&c), "{b}: {c} ({count:?})");
    }
    // The worker counts a reply right after sending it, so the client may
    // read the last one a moment before it is counted.
    assert!(
        eventually(Duration::from_secs(2), || listener_stats(&server)
            .packets_out
            == 800),
        "{:?}",
        listener_stats(&server)
    );
    let l = listener_stats(&server);
    assert_eq!(l.total_connections, 200, "flows");
    assert_eq!(l.packets_in, 800);
    let m: u64 = ["b0", "b1"]
        .iter()
        .map(|b| member_stats(&server, b).packets_out)
        .sum();
    assert_eq!(m, 800);
    server.shutdown(Duration::from_secs(1));
}

/// The member another node would choose for this client address: the
/// library's Maglev table, built independently of the running proxy.
fn predicted(names: &[&str], client: SocketAddr) -> String {
    let backends: Vec<MBackend<'_>> = names.iter().map(|id| MBackend { id, weight: 1 }).collect();
    let t = MaglevTable::build(&backends, 65537).expect("table");
    names[usize::from(t.lookup(hash_source(client)))].to_owned()
}

#[test]
fn a_client_port_sticks_to_its_member_and_every_node_agrees() {
    let (_rt, bs) = backends(3);
    let port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, "SOURCE_IP_PORT", ""), 2);
    let clients: Vec<_> = (0..60).map(|_| udp_client("127.0.0.1:0")).collect();
    for (i, c) in clients.iter().enumerate() {
        let local = c.local_addr().unwrap();
        let first = udp_who(c, addr(port)).expect("who");
        assert_eq!(first, predicted(&["b0", "b1", "b2"], local), "client {i}");
        for _ in 0..5 {
            assert_eq!(
                udp_who(c, addr(port)).expect("who"),
                first,
                "client {i} moved"
            );
        }
    }
    // 60 flows, 6 datagrams each, each flow one socket at one member.
    let total: usize = bs.iter().map(|b| b.datagrams()).sum();
    assert_eq!(total, 360);
    let peers: usize = bs.iter().map(|b| b.peers()).sum();
    assert_eq!(peers, 60, "one upstream socket per flow");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_thousand_concurrent_flows() {
    let (_rt, bs) = backends(2);
    let port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, "LEAST_CONNECTIONS", ""), 2);
    let clients: Vec<_> = (0..1000).map(|_| udp_client("127.0.0.1:0")).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(format!("hello {i}").as_bytes(), addr(port))
            .unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).expect("reply");
        assert_eq!(&buf[..n], format!("hello {i}").as_bytes());
    }
    let l = listener_stats(&server);
    assert_eq!(l.active_connections, 1000, "all flows open at once");
    // Least connections across flows: 500 ± a few per member.
    for b in ["b0", "b1"] {
        let a = member_stats(&server, b).active_connections;
        assert!((490..=510).contains(&a), "{b}: {a}");
    }
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn idle_flows_time_out_and_free_their_sockets() {
    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let server = start(
        udp_proxy(1, port, &bs, "ROUND_ROBIN", "timeout_client_data = 300"),
        1,
    );
    let clients: Vec<_> = (0..10).map(|_| udp_client("127.0.0.1:0")).collect();
    for c in &clients {
        udp_who(c, addr(port)).expect("who");
    }
    assert_eq!(listener_stats(&server).active_connections, 10);
    assert!(
        eventually(Duration::from_secs(3), || listener_stats(&server)
            .active_connections
            == 0),
        "flows still open: {:?}",
        listener_stats(&server)
    );
    let l = listener_stats(&server);
    assert_eq!(l.timeouts, 10);
    assert_eq!(member_stats(&server, "b0").active_connections, 0);
    // The next datagram opens a new flow.
    udp_who(&clients[0], addr(port)).expect("who again");
    assert_eq!(listener_stats(&server).total_connections, 11);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn the_flow_cap_evicts_the_least_recently_used_flow() {
    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, "ROUND_ROBIN", "max_flows = 4"), 1);
    let clients: Vec<_> = (0..6).map(|_| udp_client("127.0.0.1:0")).collect();
    for c in &clients[..4] {
        udp_who(c, addr(port)).expect("who");
    }
    // Client 0 is used again: client 1 is now the least recently used.
    udp_who(&clients[0], addr(port)).expect("who");
    for c in &clients[4..] {
        udp_who(c, addr(port)).expect("who");
    }
    let l = listener_stats(&server);
    assert_eq!(l.flows_evicted, 2);
    assert_eq!(l.active_connections, 4);
    // Clients 0, 4 and 5 kept their flows; client 1 was evicted and gets
    // a new one (evicting client 3, the least recent now).
    let before = bs[0].peers();
    for i in [0, 4, 5] {
        udp_who(&clients[i], addr(port)).expect("who");
    }
    assert_eq!(bs[0].peers(), before, "kept flows reuse their sockets");
    udp_who(&clients[1], addr(port)).expect("who");
    assert_eq!(
        bs[0].peers(),
        before + 1,
        "an evicted client gets a new flow"
    );
    assert_eq!(listener_stats(&server).flows_evicted, 3);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn connection_limit_caps_flows_across_workers() {
    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let server = start(
        udp_proxy(1, port, &bs, "ROUND_ROBIN", "connection_limit = 3"),
        2,
    );
    let clients: Vec<_> = (0..6).map(|_| udp_client("127.0.0.1:0")).collect();
    let mut answered = 0;
    for c in &clients {
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if udp_who(c, addr(port)).is_ok() {
            answered += 1;
        }
    }
    assert_eq!(answered, 3);
    let l = listener_stats(&server);
    assert_eq!(l.active_connections, 3);
    assert_eq!(l.dropped_limit, 3);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn allowed_cidrs_drop_other_clients() {
    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let server = start(
        udp_proxy(
            1,
            port,
            &bs,
            "ROUND_ROBIN",
            "allowed_cidrs = [\"127.0.0.2/32\"]",
        ),
        1,
    );
    let outsider = udp_client("127.0.0.1:0");
    outsider
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(udp_who(&outsider, addr(port)).is_err(), "outsider answered");
    let insider = udp_client("127.0.0.2:0");
    assert_eq!(udp_who(&insider, addr(port)).expect("insider"), "b0");
    let l = listener_stats(&server);
    assert_eq!(l.dropped_acl, 1);
    assert_eq!(l.total_connections, 1);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn ipv6_on_loopback() {
    let rt = siphon_testkit::runtime();
    let b = UdpBackend::start(&rt, "v6", "::1");
    let port = free_udp_port();
    let server = start(
        config(
            1,
            &[
                udp_listener("u", "::1", port, "p", ""),
                pool("p", "UDP", "SOURCE_IP", &[member("v6", b.addr, 1, "")]),
            ],
        ),
        1,
    );
    let c = udp_client("[::1]:0");
    let to: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    assert_eq!(udp_who(&c, to).expect("who"), "v6");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn the_largest_datagrams_pass_intact() {
    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, "ROUND_ROBIN", ""), 1);
    let c = udp_client("127.0.0.1:0");
    let mut msg = vec![0u8; 65_507];
    siphon_testkit::Pattern::new(11).fill(&mut msg);
    let back = udp_ask(&c, addr(port), &msg).expect("echo");
    assert_eq!(back.len(), msg.len());
    assert!(back == msg, "datagram changed on the way");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_wildcard_listener_answers_from_the_address_the_client_used() {
    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let server = start(
        config(
            1,
            &[
                udp_listener("u", "0.0.0.0", port, "p", ""),
                pool("p", "UDP", "ROUND_ROBIN", &members(&bs)),
            ],
        ),
        1,
    );
    for ip in ["127.0.0.1", "127.0.0.3", "127.0.0.77"] {
        let to: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        // udp_ask checks the reply's source address.
        let c = udp_client("127.0.0.1:0");
        assert_eq!(udp_who(&c, to).expect(ip), "b0");
        // A connected socket drops datagrams from any other address.
        let connected = udp_client("127.0.0.1:0");
        connected.connect(to).unwrap();
        connected.send(b"who").unwrap();
        let mut buf = [0u8; 16];
        let n = connected
            .recv(&mut buf)
            .expect("reply to a connected client");
        assert_eq!(&buf[..n], b"b0");
    }
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn icmp_port_unreachable_is_counted_and_the_worker_lives_on() {
    let (_rt, bs) = backends(1);
    let dead = free_udp_port(); // nobody listens there
    let dead_addr = addr(dead);
    let (port, port2) = (free_udp_port(), free_udp_port());
    let server = start(
        config(
            1,
            &[
                udp_listener("u", "127.0.0.1", port, "p", ""),
                pool(
                    "p",
                    "UDP",
                    "ROUND_ROBIN",
                    &[member("dead", dead_addr, 1, "")],
                ),
                udp_listener("ok", "127.0.0.1", port2, "q", ""),
                pool("q", "UDP", "ROUND_ROBIN", &members(&bs)),
            ],
        ),
        1,
    );
    let c = udp_client("127.0.0.1:0");
    for _ in 0..5 {
        c.send_to(b"anyone?", addr(port)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        eventually(Duration::from_secs(3), || member_stats(&server, "dead")
            .unreachable
            >= 1),
        "no ICMP error counted: {:?}",
        member_stats(&server, "dead")
    );
    // The same worker still serves.
    assert_eq!(udp_who(&c, addr(port2)).expect("healthy pool"), "b0");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_removed_member_ends_its_flows_and_a_drained_one_keeps_them() {
    let (_rt, bs) = backends(2);
    let port = free_udp_port();
    let mut server = start(udp_proxy(1, port, &bs, "ROUND_ROBIN", ""), 1);
    let c0 = udp_client("127.0.0.1:0");
    let c1 = udp_client("127.0.0.1:0");
    let n0 = udp_who(&c0, addr(port)).unwrap();
    let n1 = udp_who(&c1, addr(port)).unwrap();
    assert_ne!(n0, n1, "round robin spreads the first two flows");
    let (keep, gone) = if n0 == "b0" { (&c0, &c1) } else { (&c1, &c0) };

    // b1 removed: its flow ends; its client's next datagram goes to b0.
    server
        .apply(udp_proxy(2, port, &bs[..1], "ROUND_ROBIN", ""))
        .expect("apply");
    assert!(eventually(Duration::from_secs(2), || listener_stats(
        &server
    )
    .active_connections
        == 1));
    assert_eq!(udp_who(gone, addr(port)).unwrap(), "b0");
    assert_eq!(listener_stats(&server).total_connections, 3);

    // b0 drained (weight 0) next to a new b1: established flows stay on b0.
    let drained = config(
        3,
        &[
            udp_listener("u", "127.0.0.1", port, "p", ""),
            pool(
                "p",
                "UDP",
                "ROUND_ROBIN",
                &[
                    member("b0", bs[0].addr, 0, ""),
                    member("b1", bs[1].addr, 1, ""),
                ],
            ),
        ],
    );
    server.apply(drained).expect("apply");
    assert_eq!(udp_who(keep, addr(port)).unwrap(), "b0");
    assert_eq!(udp_who(gone, addr(port)).unwrap(), "b0");
    // A new client goes to the member that takes new flows.
    let fresh = udp_client("127.0.0.1:0");
    assert_eq!(udp_who(&fresh, addr(port)).unwrap(), "b1");
    server.shutdown(Duration::from_secs(1));
}
