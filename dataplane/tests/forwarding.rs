#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! TCP forwarding on real loopback sockets: byte-exact transfer, half
//! close, many connections, IPv6, PROXY headers, ACLs, limits, connect
//! failures.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use siphon_testkit::{
    connect_greeting, connect_greeting_from, free_port, roundtrip, Backend, Pattern,
};

const MIB: usize = 1024 * 1024;

fn one_member_proxy(
    port: u16,
    backend: SocketAddr,
    pool_protocol: &str,
    extra: &str,
) -> siphon_dataplane::Config {
    config(
        1,
        &[
            listener("l", "127.0.0.1", port, "p", extra),
            pool(
                "p",
                pool_protocol,
                "ROUND_ROBIN",
                &[member("m", backend, 1, "")],
            ),
        ],
    )
}

/// Sends `total` bytes of a pattern while reading the echo back on another
/// thread, checking every byte.
fn echo_transfer(mut s: TcpStream, total: usize) {
    let mut reader = s.try_clone().expect("clone");
    let check = std::thread::spawn(move || {
        let mut want = Pattern::new(7);
        let (mut got, mut buf, mut exp) = (0usize, vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
        while got < total {
            let n = reader.read(&mut buf).expect("read echo");
            assert!(n > 0, "EOF after {got} of {total} bytes");
            want.fill(&mut exp[..n]);
            assert!(buf[..n] == exp[..n], "echo differs near byte {got}");
            got += n;
        }
        got
    });
    let mut pat = Pattern::new(7);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = buf.len().min(total - sent);
        pat.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).expect("write");
        sent += n;
    }
    assert_eq!(check.join().expect("reader"), total);
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
}

fn transfer_64_mib(splice: bool) {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b1", "127.0.0.1");
    let port = free_port();
    let opts = siphon_dataplane::Options {
        workers: 2,
        splice,
        ..Default::default()
    };
    let server = siphon_dataplane::Server::start(one_member_proxy(port, b.addr, "TCP", ""), opts)
        .expect("start");
    let (s, name) = connect_greeting(addr(port)).expect("connect");
    assert_eq!(name, "b1");
    echo_transfer(s, 64 * MIB);
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .listener("l")
        .map(|l| l.active_connections)
        == Some(0)));
    let st = server.stats();
    let l = st.listener("l").expect("listener stats");
    assert_eq!(l.bytes_in, 64 * MIB as u64);
    assert_eq!(l.bytes_out, 64 * MIB as u64 + 3); // + "b1\n"
    let m = st.member("p", "m").expect("member stats");
    assert_eq!(
        (m.bytes_out, m.bytes_in, m.total_connections),
        (l.bytes_in, l.bytes_out, 1)
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn transfers_64_mib_both_ways_byte_exact_with_splice() {
    transfer_64_mib(true);
}

#[test]
fn transfers_64_mib_both_ways_byte_exact_on_the_copy_path() {
    transfer_64_mib(false);
}

#[test]
fn client_half_close_still_gets_the_whole_reply() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b1", "127.0.0.1");
    let port = free_port();
    let server = start(one_member_proxy(port, b.addr, "TCP", ""), 2);
    let mut s = TcpStream::connect(addr(port)).expect("connect");
    let mut msg = vec![0u8; 3 * MIB];
    Pattern::new(3).fill(&mut msg);
    // Write everything, then close our write side while the echo is still
    // on its way: the reply must arrive whole, then EOF.
    let mut w = s.try_clone().expect("clone");
    let data = msg.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).expect("write");
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to EOF");
    writer.join().expect("writer");
    assert_eq!(&got[..3], b"b1\n");
    assert!(
        got[3..] == msg[..],
        "reply differs (len {} vs {})",
        got.len() - 3,
        msg.len()
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn member_half_close_leaves_the_client_side_open() {
    // A member that answers, closes its write side, then keeps reading.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let maddr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.write_all(b"answer").expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut all = Vec::new();
        s.read_to_end(&mut all).expect("read");
        tx.send(all.len()).expect("send");
    });
    let port = free_port();
    let server = start(one_member_proxy(port, maddr, "TCP", ""), 1);
    let mut s = TcpStream::connect(addr(port)).expect("connect");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("EOF from member side");
    assert_eq!(got, b"answer");
    s.write_all(&vec![9u8; 100_000])
        .expect("client still writes after member EOF");
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10))
            .expect("member result"),
        100_000
    );
    server.shutdown(Duration::from_secs(1));
}

/// Request and FIN, then answer and FIN, each in one flight: the proxy's
/// read sees the bytes and the EOF queued together, the case where trusting
/// a short read could lose the EOF and leave both ends waiting.
#[test]
fn one_shot_exchanges_end_with_eof_both_ways() {
    const ROUNDS: usize = 300;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let maddr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().take(ROUNDS) {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut req = Vec::new();
            if s.read_to_end(&mut req).is_err() {
                return; // the client side sees no answer and fails
            }
            let _ = s.write_all(format!("got {} bytes", req.len()).as_bytes());
            // Dropping the socket sends the FIN right behind the answer.
        }
    });
    let port = free_port();
    let server = start(one_member_proxy(port, maddr, "TCP", ""), 2);
    for i in 0..ROUNDS {
        let mut s = TcpStream::connect(addr(port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let len = 1 + i * 37 % 1000;
        s.write_all(&vec![b'q'; len]).expect("request");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut got = String::new();
        s.read_to_string(&mut got)
            .unwrap_or_else(|e| panic!("exchange {i}: no answer and EOF: {e}"));
        assert_eq!(got, format!("got {len} bytes"), "exchange {i}");
    }
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_thousand_concurrent_connections() {
    const N: usize = 1000;
    siphon_testkit::raise_fd_limit();
    let rt = siphon_testkit::runtime();
    let backends: Vec<Backend> = (0..2)
        .map(|i| Backend::start(&rt, &format!("b{i}"), "127.0.0.1"))
        .collect();
    let port = free_port();
    let members: Vec<String> = backends
        .iter()
        .map(|b| member(&b.name, b.addr, 1, ""))
        .collect();
    let server = start(
        config(
            1,
            &[
                listener("l", "127.0.0.1", port, "p", ""),
                pool("p", "TCP", "ROUND_ROBIN", &members),
            ],
        ),
        2,
    );
    let client = siphon_testkit::runtime();
    let ok = client.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for i in 0..N {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let greeted = async {
                    let mut s = tokio::net::TcpStream::connect(addr(port)).await?;
                    let mut greet = [0u8; 3];
                    s.read_exact(&mut greet).await?;
                    std::io::Result::Ok(s)
                };
                let greeted = tokio::time::timeout(Duration::from_secs(30), greeted).await;
                // Everyone is connected at once before anyone finishes. A
                // client that failed still arrives, so one failure is
                // counted as one and does not hold the others.
                barrier.wait().await;
                let Ok(Ok(mut s)) = greeted else {
                    return false;
                };
                let echoed = async {
                    let msg = format!("hello {i:05}");
                    s.write_all(msg.as_bytes()).await?;
                    let mut back = vec![0u8; msg.len()];
                    s.read_exact(&mut back).await?;
                    std::io::Result::Ok(back == msg.as_bytes())
                };
                matches!(
                    tokio::time::timeout(Duration::from_secs(30), echoed).await,
                    Ok(Ok(true))
                )
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if let Ok(true) = t.await {
                ok += 1;
            }
        }
        ok
    });
    let accepted: Vec<usize> = backends.iter().map(Backend::accepted).collect();
    assert_eq!(
        ok,
        N,
        "backends accepted {accepted:?}\n{:?}\n{:?}",
        server.stats(),
        server.status()
    );
    assert_eq!(accepted.iter().sum::<usize>(), N);
    server.shutdown(Duration::from_secs(2));
}

#[test]
fn ipv6_on_loopback() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "v6", "::1");
    let port = free_port();
    let c = config(
        1,
        &[
            listener("l6", "::1", port, "p", ""),
            pool("p", "TCP", "SOURCE_IP_PORT", &[member("m", b.addr, 1, "")]),
        ],
    );
    let server = start(c, 2);
    let (mut s, name) = connect_greeting(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))
        .expect("connect ::1");
    assert_eq!(name, "v6");
    roundtrip(&mut s, b"over ipv6").expect("echo");
    server.shutdown(Duration::from_secs(1));
}

/// Accepts one connection and returns the bytes of the PROXY header as
/// parsed by the `ppp` crate (an implementation independent of ours).
fn proxy_header_seen(
    pool_protocol: &str,
) -> (SocketAddr, SocketAddr, SocketAddr, SocketAddr, Vec<u8>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let maddr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        // Read until the header and the client's payload are both in.
        while !buf.ends_with(b"PAYLOAD") {
            let n = s.read(&mut chunk).expect("read");
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        tx.send(buf).expect("send");
    });
    let port = free_port();
    let server = start(one_member_proxy(port, maddr, pool_protocol, ""), 1);
    let mut c = TcpStream::connect(addr(port)).expect("connect");
    let client = c.local_addr().expect("local");
    c.write_all(b"PAYLOAD").expect("write");
    let buf = rx.recv_timeout(Duration::from_secs(10)).expect("header");
    server.shutdown(Duration::from_secs(1));
    let (src, dst, rest) = match ppp::HeaderResult::parse(&buf) {
        ppp::HeaderResult::V1(Ok(h)) => {
            let ppp::v1::Addresses::Tcp4(a) = h.addresses else {
                panic!("not TCP4: {:?}", h.addresses)
            };
            let src = SocketAddr::from((a.source_address, a.source_port));
            let dst = SocketAddr::from((a.destination_address, a.destination_port));
            (src, dst, buf[h.header.len()..].to_vec())
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            assert_eq!(h.command, ppp::v2::Command::Proxy);
            let ppp::v2::Addresses::IPv4(a) = h.addresses else {
                panic!("not IPv4: {:?}", h.addresses)
            };
            let src = SocketAddr::from((a.source_address, a.source_port));
            let dst = SocketAddr::from((a.destination_address, a.destination_port));
            (src, dst, buf[h.len()..].to_vec())
        }
        other => panic!("no valid PROXY header: {other:?}"),
    };
    (src, dst, client, addr(port), rest)
}

#[test]
fn proxy_protocol_v1_header_reaches_the_member() {
    let (src, dst, client, listener, rest) = proxy_header_seen("PROXY");
    assert_eq!((src, dst), (client, listener));
    assert_eq!(rest, b"PAYLOAD");
}

#[test]
fn proxy_protocol_v2_header_reaches_the_member() {
    let (src, dst, client, listener, rest) = proxy_header_seen("PROXYV2");
    assert_eq!((src, dst), (client, listener));
    assert_eq!(rest, b"PAYLOAD");
}

/// A client's connection was refused: reset or closed without a greeting.
fn refused(a: SocketAddr, from: Option<SocketAddr>) -> bool {
    connect_greeting_from(from, a).is_err()
}

#[test]
fn allowed_cidrs_refuse_other_clients() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b1", "127.0.0.1");
    let port = free_port();
    let server = start(
        one_member_proxy(
            port,
            b.addr,
            "TCP",
            "allowed_cidrs = [\"127.0.0.2/32\", \"2001:db8::/32\"]",
        ),
        2,
    );
    assert!(
        refused(addr(port), None),
        "127.0.0.1 is not in allowed_cidrs"
    );
    let from = SocketAddr::from(([127, 0, 0, 2], 0));
    let (_s, name) = connect_greeting_from(Some(from), addr(port)).expect("127.0.0.2 is allowed");
    assert_eq!(name, "b1");
    assert_eq!(b.accepted(), 1, "the refused client never reached a member");
    assert_eq!(server.stats().listener("l").map(|l| l.refused_acl), Some(1));
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn connection_limit_holds_across_workers() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b1", "127.0.0.1");
    let port = free_port();
    let server = start(
        one_member_proxy(port, b.addr, "TCP", "connection_limit = 5"),
        2,
    );
    let held: Vec<TcpStream> = (0..5)
        .map(|_| connect_greeting(addr(port)).expect("within limit").0)
        .collect();
    for _ in 0..3 {
        assert!(refused(addr(port), None), "over the limit");
    }
    drop(held);
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .listener("l")
        .map(|l| l.active_connections)
        == Some(0)));
    let again: Vec<TcpStream> = (0..5)
        .map(|_| connect_greeting(addr(port)).expect("room again").0)
        .collect();
    assert_eq!(
        server.stats().listener("l").map(|l| l.refused_limit),
        Some(3)
    );
    drop(again);
    server.shutdown(Duration::from_secs(1));
}

/// A listening socket whose accept queue is full: the kernel drops further
/// SYNs, so a connect to it never completes (an address that never answers).
fn black_hole() -> (socket2::Socket, Vec<socket2::Socket>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    l.listen(0).expect("listen");
    let a = l.local_addr().expect("addr").as_socket().expect("inet");
    let mut fill = Vec::new();
    for _ in 0..8 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let done = s
            .connect_timeout(&a.into(), Duration::from_millis(200))
            .is_ok();
        fill.push(s);
        if !done {
            return (l, fill, a);
        }
    }
    panic!("accept queue never filled");
}

#[test]
fn connect_timeout_moves_to_the_next_member() {
    let rt = siphon_testkit::runtime();
    let live = Backend::start(&rt, "b-live", "127.0.0.1");
    let (_hole, _fill, hole) = black_hole();
    let port = free_port();
    // Round robin starts with the first member by id: the black hole.
    let c = config(
        1,
        &[
            listener("l", "127.0.0.1", port, "p", "timeout_member_connect = 300"),
            pool(
                "p",
                "TCP",
                "ROUND_ROBIN",
                &[
                    member("a-hole", hole, 1, ""),
                    member("b-live", live.addr, 1, ""),
                ],
            ),
        ],
    );
    let server = start(c, 1);
    let t0 = Instant::now();
    let (mut s, name) = connect_greeting(addr(port)).expect("served by the next member");
    let waited = t0.elapsed();
    assert_eq!(name, "b-live");
    assert!(
        waited >= Duration::from_millis(290),
        "gave up on the first member too early: {waited:?}"
    );
    roundtrip(&mut s, b"after timeout").expect("echo");
    assert_eq!(
        server
            .stats()
            .member("p", "a-hole")
            .map(|m| m.connect_errors),
        Some(1)
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn refused_connect_moves_on_and_gives_up_after_the_retries() {
    let rt = siphon_testkit::runtime();
    let live = Backend::start(&rt, "z-live", "127.0.0.1");
    let dead: Vec<SocketAddr> = (0..3).map(|_| addr(free_port())).collect();
    let port = free_port();
    // Three refusing members sort before the live one.
    let cfg = |generation, retries: u32| {
        let mut members: Vec<String> = dead
            .iter()
            .enumerate()
            .map(|(i, a)| member(&format!("dead-{i}"), *a, 1, ""))
            .collect();
        members.push(member("z-live", live.addr, 1, ""));
        let retries = format!("connect_retries = {retries}");
        config(
            generation,
            &[
                listener("l", "127.0.0.1", port, "p", &retries),
                pool("p", "TCP", "ROUND_ROBIN", &members),
            ],
        )
    };
    let server = start(cfg(1, 3), 1);
    let (_s, name) = connect_greeting(addr(port)).expect("3 retries reach the live member");
    assert_eq!(name, "z-live");
    // With one retry allowed, two dead members in a row end the connection.
    server.apply(cfg(2, 1)).expect("apply");
    assert!(refused(addr(port), None), "gave up after 2 attempts");
    assert!(
        server
            .stats()
            .listener("l")
            .map(|l| l.no_member)
            .unwrap_or(0)
            >= 1
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_few_long_connections_are_spread_over_the_workers() {
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let server = start(
        config(
            1,
            &[
                listener("l", "127.0.0.1", port, "p", ""),
                pool("p", "TCP", "ROUND_ROBIN", &[member("b", b.addr, 1, "")]),
            ],
        ),
        2,
    );
    // Eight held connections, one after another: whatever SO_REUSEPORT's
    // hash does with them, the workers end up with four each.
    let mut held = Vec::new();
    for i in 0..8 {
        let (mut s, greeting) = connect_greeting(addr(port)).unwrap();
        assert_eq!(greeting, "b");
        siphon_testkit::roundtrip(&mut s, format!("hello {i}").as_bytes()).unwrap();
        held.push(s);
        // Each accept sees the counts the other worker published.
        assert!(eventually(Duration::from_secs(2), || {
            server.worker_connections().iter().sum::<usize>() == i + 1
        }));
    }
    assert_eq!(server.worker_connections(), [4, 4]);
    // Handed-over connections carry data like the others.
    for (i, s) in held.iter_mut().enumerate() {
        siphon_testkit::roundtrip(s, format!("again {i}").as_bytes()).unwrap();
    }
    drop(held);
    assert!(eventually(Duration::from_secs(2), || server
        .worker_connections()
        == [0, 0]));
    server.shutdown(Duration::from_secs(1));
}
