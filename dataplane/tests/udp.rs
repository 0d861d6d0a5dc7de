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

/// `n` UDP backends behind a UDP listener on a free port (generation 1).
fn proxied(
    n: usize,
    algorithm: &str,
    extra: &str,
    workers: usize,
) -> (
    std::sync::Arc<tokio::runtime::Runtime>,
    Vec<UdpBackend>,
    u16,
    Server,
) {
    let (rt, bs) = backends(n);
    let port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, algorithm, extra), workers);
    (rt, bs, port, server)
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
    let (_rt, _bs, port, server) = proxied(2, "ROUND_ROBIN", "", 2);
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
    let (_rt, bs, port, server) = proxied(3, "SOURCE_IP_PORT", "", 2);
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
    let (_rt, _bs, port, server) = proxied(2, "LEAST_CONNECTIONS", "", 2);
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
    let (_rt, _bs, port, server) = proxied(1, "ROUND_ROBIN", "timeout_client_data = 300", 1);
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
    let (_rt, bs, port, server) = proxied(1, "ROUND_ROBIN", "max_flows = 4", 1);
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
    let (_rt, _bs, port, server) = proxied(1, "ROUND_ROBIN", "connection_limit = 3", 2);
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

/// IPv6 on `::1`, bound to the address and to the wildcard: a connected
/// client (which drops datagrams from any other address) gets its answer.
#[test]
fn ipv6_on_loopback() {
    let rt = siphon_testkit::runtime();
    let b = UdpBackend::start(&rt, "v6", "::1");
    for bind in ["::1", "::"] {
        let port = free_udp_port();
        let server = start(
            config(
                1,
                &[
                    udp_listener("u", bind, port, "p", ""),
                    pool("p", "UDP", "SOURCE_IP", &[member("v6", b.addr, 1, "")]),
                ],
            ),
            1,
        );
        let to: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        let c = udp_client("[::1]:0");
        c.connect(to).unwrap();
        c.send(b"who").unwrap();
        let mut buf = [0u8; 16];
        let n = c.recv(&mut buf).expect("reply to a connected client");
        assert_eq!(&buf[..n], b"v6", "bound to {bind}");
        server.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn the_largest_datagrams_pass_intact() {
    let (_rt, _bs, port, server) = proxied(1, "ROUND_ROBIN", "", 1);
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

/// Reloads that keep a UDP listener keep its socket and its flows: every
/// client stays on its member's socket, and no request goes unanswered.
#[test]
fn reloads_keep_udp_flows_and_their_members() {
    let (_rt, bs) = backends(3);
    let port = free_udp_port();
    let extra_port = free_udp_port();
    let server = start(udp_proxy(1, port, &bs, "SOURCE_IP_PORT", ""), 2);
    let clients: Vec<_> = (0..30).map(|_| udp_client("127.0.0.1:0")).collect();
    let first: Vec<String> = clients
        .iter()
        .map(|c| udp_who(c, addr(port)).expect("who"))
        .collect();
    let peers = |bs: &[UdpBackend]| bs.iter().map(|b| b.peers()).sum::<usize>();
    assert_eq!(peers(&bs), 30);
    for generation in 2..=11 {
        // Every other generation adds a second listener, so the workers
        // really switch configs.
        let mut parts = vec![
            udp_listener("u", "127.0.0.1", port, "p", ""),
            pool("p", "UDP", "SOURCE_IP_PORT", &members(&bs)),
        ];
        if generation % 2 == 0 {
            parts.push(udp_listener("extra", "127.0.0.1", extra_port, "p", ""));
        }
        server.apply(config(generation, &parts)).expect("apply");
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(
                udp_who(c, addr(port)).expect("answered across the reload"),
                first[i],
                "client {i}, generation {generation}"
            );
        }
    }
    assert_eq!(peers(&bs), 30, "flows kept their member sockets");
    assert_eq!(listener_stats(&server).total_connections, 30);
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
    let (_rt, bs, port, server) = proxied(2, "ROUND_ROBIN", "", 1);
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

/// A socket whose every send is cut by the kernel into datagrams of `seg`
/// bytes (UDP GSO), as QUIC stacks send.
fn gso_socket(local: &str, seg: u16) -> std::net::UdpSocket {
    use nix::sys::socket::{setsockopt, sockopt};
    let s = udp_client(local);
    setsockopt(&s, sockopt::UdpGsoSegment, &i32::from(seg)).expect("UDP_SEGMENT");
    s
}

/// `count` datagrams read from `s`.
fn read_datagrams(s: &std::net::UdpSocket, count: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65536];
    (0..count)
        .map(|i| {
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} of {count}: {e}"));
            (buf[..n].to_vec(), from)
        })
        .collect()
}

fn with_offload(offload: bool) -> siphon_dataplane::Options {
    siphon_testkit::raise_fd_limit();
    siphon_dataplane::Options {
        workers: 1,
        udp_offload: offload,
        ..siphon_dataplane::Options::default()
    }
}

/// A client sends one GSO train (ten 1,000-byte datagrams and a 300-byte
/// one): with offloads the proxy takes it in as one coalesced slot and
/// sends it on as one GSO message; without, datagram by datagram. Either
/// way the member gets eleven datagrams with their boundaries, and the
/// client gets eleven echoes.
#[test]
fn a_client_gso_train_reaches_the_member_as_separate_datagrams() {
    for offload in [true, false] {
        let (_rt, bs) = backends(1);
        let port = free_udp_port();
        let server = Server::start(
            udp_proxy(1, port, &bs, "ROUND_ROBIN", ""),
            with_offload(offload),
        )
        .expect("start");
        let c = gso_socket("127.0.0.1:0", 1000);
        let mut train = vec![0u8; 10 * 1000 + 300];
        siphon_testkit::Pattern::new(7).fill(&mut train);
        c.send_to(&train, addr(port)).expect("send train");
        let echoes = read_datagrams(&c, 11);
        for (i, (d, from)) in echoes.iter().enumerate() {
            let want = &train[i * 1000..((i + 1) * 1000).min(train.len())];
            assert_eq!(d.as_slice(), want, "datagram {i} (offload {offload})");
            assert_eq!(*from, addr(port));
        }
        assert_eq!(bs[0].datagrams(), 11, "offload {offload}");
        let l = listener_stats(&server);
        assert_eq!(l.packets_in, 11, "offload {offload}");
        assert_eq!(l.bytes_in, train.len() as u64);
        assert_eq!(member_stats(&server, "b0").packets_out, 11);
        server.shutdown(Duration::from_secs(1));
    }
}

/// A member that answers with a GSO train, behind a wildcard listener:
/// the replies leave from the address the client used (pktinfo and
/// segmentation in one message), as separate datagrams.
#[test]
fn a_member_gso_train_reaches_a_wildcard_client_as_separate_datagrams() {
    for offload in [true, false] {
        let origin = gso_socket("127.0.0.1:0", 700);
        let member_addr = origin.local_addr().unwrap();
        let mut reply = vec![0u8; 5 * 700 + 100];
        siphon_testkit::Pattern::new(3).fill(&mut reply);
        let answer = reply.clone();
        let responder = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (_, peer) = origin.recv_from(&mut buf).expect("request");
            origin.send_to(&answer, peer).expect("reply train");
        });
        let port = free_udp_port();
        let server = Server::start(
            config(
                1,
                &[
                    udp_listener("u", "0.0.0.0", port, "p", ""),
                    pool(
                        "p",
                        "UDP",
                        "ROUND_ROBIN",
                        &[member("m", member_addr, 1, "")],
                    ),
                ],
            ),
            with_offload(offload),
        )
        .expect("start");
        let to: SocketAddr = format!("127.0.0.5:{port}").parse().unwrap();
        let c = udp_client("127.0.0.1:0");
        c.send_to(b"go", to).unwrap();
        let got = read_datagrams(&c, 6);
        for (i, (d, from)) in got.iter().enumerate() {
            let want = &reply[i * 700..((i + 1) * 700).min(reply.len())];
            assert_eq!(d.as_slice(), want, "datagram {i} (offload {offload})");
            assert_eq!(*from, to, "reply source (offload {offload})");
        }
        responder.join().unwrap();
        let r = server.stats();
        let m = r.member("p", "m").cloned().unwrap();
        assert_eq!(m.packets_in, 6, "offload {offload}");
        assert!(
            eventually(Duration::from_secs(2), || listener_stats(&server)
                .packets_out
                == 6),
            "offload {offload}: {:?}",
            listener_stats(&server)
        );
        server.shutdown(Duration::from_secs(1));
    }
}

/// Bursts of plain datagrams of mixed sizes from one client: however the
/// proxy groups them into GSO runs, each arrives whole and in order.
#[test]
fn bursts_of_mixed_sizes_keep_their_boundaries() {
    let (_rt, _bs, port, server) = proxied(1, "ROUND_ROBIN", "", 1);
    let c = udp_client("127.0.0.1:0");
    // Runs of equal sizes broken by shorter and longer datagrams.
    let sizes: Vec<usize> = (0..200)
        .map(|i| match i % 10 {
            0..=5 => 1200,
            6 => 300,
            7 => 1,
            8 => 8000,
            _ => 1200,
        })
        .collect();
    let mut pattern = siphon_testkit::Pattern::new(5);
    let msgs: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| {
            let mut m = vec![0u8; n];
            pattern.fill(&mut m);
            m
        })
        .collect();
    // 20 bursts of 10 sent back to back, each read back before the next.
    for (b, burst) in msgs.chunks(10).enumerate() {
        for m in burst {
            c.send_to(m, addr(port)).unwrap();
        }
        let got = read_datagrams(&c, burst.len());
        for (i, (d, _)) in got.iter().enumerate() {
            assert_eq!(d.len(), burst[i].len(), "burst {b} datagram {i}");
            assert!(d == &burst[i], "burst {b} datagram {i} changed");
        }
    }
    assert_eq!(listener_stats(&server).packets_in, 200);
    server.shutdown(Duration::from_secs(1));
}

/// Over a path with a 1,500-byte MTU (a veth into a namespace the test
/// makes), a train of 3,000-byte datagrams cannot leave as one GSO
/// message, since each segment would exceed the MTU: the kernel refuses
/// it, and the proxy sends those datagrams one by one (IP fragments them)
/// and remembers the limit. 1,400-byte datagrams still go as GSO. All
/// arrive intact, and come back intact.
#[test]
fn datagrams_larger_than_the_path_mtu_still_pass() {
    use siphon_testkit::netns::Netns;
    if !siphon_testkit::root_or_skip("datagrams_larger_than_the_path_mtu_still_pass") {
        return;
    }
    let ns = Netns::create("mtu").expect("netns");
    let outside = format!("sphm{}", std::process::id() % 100_000);
    ns.veth(&outside, "198.18.3.1/24", "eth0", "198.18.3.2/24", 1500)
        .expect("veth");
    let rt = siphon_testkit::runtime();
    let sock = ns
        .enter(|| std::net::UdpSocket::bind("198.18.3.2:0"))
        .expect("enter")
        .expect("bind in the namespace");
    let far = UdpBackend::serve(&rt, "far", sock);
    let port = free_udp_port();
    let server = start(
        config(
            1,
            &[
                udp_listener("u", "127.0.0.1", port, "p", ""),
                pool("p", "UDP", "ROUND_ROBIN", &[member("far", far.addr, 1, "")]),
            ],
        ),
        1,
    );
    for seg in [3000u16, 1400, 3000] {
        let c = gso_socket("127.0.0.1:0", seg);
        let seg = usize::from(seg);
        let mut train = vec![0u8; 4 * seg + 100];
        siphon_testkit::Pattern::new(seg as u64).fill(&mut train);
        c.send_to(&train, addr(port)).expect("send train");
        let echoes = read_datagrams(&c, 5);
        for (i, (d, _)) in echoes.iter().enumerate() {
            let want = &train[i * seg..((i + 1) * seg).min(train.len())];
            assert!(d.as_slice() == want, "segment {seg}: datagram {i} changed");
        }
    }
    assert_eq!(far.datagrams(), 15);
    let l = listener_stats(&server);
    assert_eq!(l.dropped_to_member, 0);
    server.shutdown(Duration::from_secs(1));
}

/// The kernel's own drop counts (`drops`, the last column of
/// /proc/net/udp) and receive queues of the sockets bound to
/// 127.0.0.1:`port`, one entry per socket.
fn kernel_udp_sockets(port: u16) -> Vec<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(1) != Some(&local.as_str()) {
                return None;
            }
            let rx_queue = cols.get(4)?.split(':').nth(1)?;
            let rx_queue = u64::from_str_radix(rx_queue, 16).ok()?;
            let drops = cols.last()?.parse().ok()?;
            Some((drops, rx_queue))
        })
        .collect()
}

/// Whether every thread of process `pid` is stopped (state `T`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
}

/// Datagrams the kernel drops on a listener's sockets while its workers
/// cannot read (the whole dataplane is stopped with SIGSTOP, so the
/// receive queues fill and overflow) are counted as `dropped_kernel`, equal
/// to what the kernel itself says for those sockets summed (two workers:
/// two sockets, each with its own count), and on the Prometheus page.
#[test]
fn datagrams_the_kernel_drops_on_a_stalled_listener_are_counted() {
    use nix::sys::signal::Signal;
    use siphon_proto::http::{send_blocking, Request, Target};

    let (_rt, bs) = backends(1);
    let port = free_udp_port();
    let dir = TempDir::new("udp-kernel-drops");
    let file = dir.path("siphon.toml");
    let doc = toml(
        1,
        &[
            udp_listener("u", "127.0.0.1", port, "p", ""),
            pool("p", "UDP", "ROUND_ROBIN", &members(&bs)),
        ],
    );
    std::fs::write(&file, doc).expect("write config");
    let socket = dir.path("ctl.sock");
    let (f, s) = (file.to_str().unwrap(), socket.to_str().unwrap());
    let proc = dataplane(
        &["run", "--config", f, "--socket", s, "--workers", "2"],
        &dir.path("log"),
    );
    assert!(
        proc.wait_log("siphon-dataplane running", 1, Duration::from_secs(10)),
        "{}",
        proc.log_text()
    );
    assert_eq!(kernel_udp_sockets(port).len(), 2, "one socket per worker");
    let dropped_kernel = || {
        let reply =
            send_blocking(&Target::Unix(socket.clone()), Request::get("/v1/stats")).unwrap();
        let report: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        let l = &report["listeners"][0];
        assert_eq!(l["id"], "u");
        l["dropped_kernel"].as_u64().expect("dropped_kernel")
    };
    // Clients on many ports, so the reuseport hash spreads them over both
    // sockets; each one's flow is set up before the stall.
    let clients: Vec<_> = (0..16).map(|_| udp_client("127.0.0.1:0")).collect();
    for c in &clients {
        assert_eq!(udp_who(c, addr(port)).expect("who"), "b0");
    }
    assert_eq!(dropped_kernel(), 0);

    let pid = proc.id();
    proc.signal(Signal::SIGSTOP);
    assert!(eventually(Duration::from_secs(5), || all_stopped(pid)));
    // 16 × 200 datagrams of 8,000 bytes (25.6 MB) against two receive
    // buffers of 8 MiB: about half of them cannot be queued.
    let payload = vec![0x5au8; 8000];
    std::thread::scope(|scope| {
        for group in clients.chunks(4) {
            let payload = &payload;
            scope.spawn(move || {
                for _ in 0..200 {
                    for c in group {
                        c.send_to(payload, addr(port)).expect("send");
                    }
                }
            });
        }
    });
    let during: u64 = kernel_udp_sockets(port).iter().map(|s| s.0).sum();
    assert!(
        during > 0,
        "the kernel dropped nothing: {:?}",
        kernel_udp_sockets(port)
    );
    proc.signal(Signal::SIGCONT);

    // The count rides on datagrams queued after the drops: once the queues
    // are read empty, one more datagram from every client brings it in.
    assert!(
        eventually(Duration::from_secs(10), || kernel_udp_sockets(port)
            .iter()
            .all(|s| s.1 == 0)),
        "{:?}",
        kernel_udp_sockets(port)
    );
    for c in &clients {
        c.send_to(b"after", addr(port)).expect("send");
    }
    let kernel = || kernel_udp_sockets(port).iter().map(|s| s.0).sum::<u64>();
    assert!(
        eventually(Duration::from_secs(10), || dropped_kernel() == kernel()),
        "stats say {}, the kernel {:?}",
        dropped_kernel(),
        kernel_udp_sockets(port)
    );
    let dropped = dropped_kernel();
    assert_eq!(dropped, during, "no drops after the stall");

    let page = send_blocking(&Target::Unix(socket.clone()), Request::get("/metrics")).unwrap();
    let line = format!(
        "siphon_listener_dropped_packets_total{{listener=\"u\",reason=\"kernel\"}} {dropped}"
    );
    assert!(
        page.body.lines().any(|l| l == line),
        "{line} not in\n{}",
        page.body
    );
}
