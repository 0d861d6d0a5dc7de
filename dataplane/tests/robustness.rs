#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The proxy under shortage and at its edges, with real sockets: running
//! out of file descriptors blames no member and serves again as soon as
//! descriptors are free; a connection no member can take, and one cut by
//! the drain timeout, end with a reset rather than a clean close.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use siphon_proto::http::{send_blocking, Request, Target};
use siphon_testkit::{connect_greeting, free_port, Backend};

/// Connects and waits up to `wait` for the backend's greeting.
fn greeted(port: u16, wait: Duration) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    let mut line = [0u8; 2];
    (&s).read_exact(&mut line).ok()?;
    (&line == b"b\n").then_some(s)
}

/// How a connection through the proxy ended, read from the client side.
fn ending(mut s: &TcpStream) -> ErrorKind {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return ErrorKind::UnexpectedEof,
            Ok(_) => {}
            Err(e) => return e.kind(),
        }
    }
}

#[test]
fn running_out_of_descriptors_blames_no_member_and_serves_again_once_they_free() {
    // A connection costs the proxy two descriptors: with one limit the last
    // free one goes to an accept and the member's socket() fails, with the
    // other the accept itself fails. Both paths, then.
    let (a, b) = (exhaust(64), exhaust(65));
    assert!(
        a.0 + b.0 >= 1,
        "no client refused at the member connect: {a:?} {b:?}"
    );
    assert!(a.1 + b.1 >= 1, "accepting never paused: {a:?} {b:?}");
}

/// Runs the proxy with `limit` descriptors into a shortage and out again;
/// returns its listener's `local_errors` and `accept_pauses`.
fn exhaust(limit: u64) -> (u64, u64) {
    let rt = siphon_testkit::runtime();
    let backend = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let dir = TempDir::new("fd-shortage");
    let file = dir.path("dp.toml");
    std::fs::write(&file, toml(1, &one_member(port, "b", backend.addr))).unwrap();
    let socket = dir.path("dp.sock");
    let log = dir.path("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_siphon-dataplane"));
    cmd.args(["run", "--config", file.to_str().unwrap(), "--workers", "1"])
        .args(["--socket", socket.to_str().unwrap()])
        .env("RUST_LOG", "info");
    // SAFETY: between fork and exec only setrlimit(2) runs, a plain
    // syscall that allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                .map_err(std::io::Error::from)
        });
    }
    let _proc = Proc::spawn(cmd, &log);
    assert!(eventually(Duration::from_secs(10), || greeted(
        port,
        Duration::from_secs(1)
    )
    .is_some()));

    // Hold connections until the proxy has no descriptor left for the
    // member side: each one costs it two.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        match greeted(port, Duration::from_millis(300)) {
            Some(s) => held.push(s),
            None => refused += 1,
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(
        held.len() >= 5,
        "only {} connections before the shortage",
        held.len()
    );
    assert!(
        refused >= 3,
        "no shortage with {} connections held",
        held.len()
    );

    // Descriptors free again: served at once, the member never blamed.
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    let served = (0..10)
        .filter(|_| greeted(port, Duration::from_secs(2)).is_some())
        .count();
    assert_eq!(served, 10, "served right after the shortage ended");
    let get = |path: &str| {
        let r = send_blocking(&Target::Unix(socket.clone()), Request::get(path)).unwrap();
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()
    };
    let stats = get("/v1/stats");
    let m = &stats["members"][0];
    assert_eq!(m["connect_errors"], 0, "{stats}");
    let status = get("/v1/status");
    assert_eq!(
        status["pools"][0]["members"][0]["operating_status"], "NO_MONITOR",
        "{status}"
    );
    // Where the shortage struck: at accept (paused, the clients queued) or
    // at the member connect (that client reset).
    let l = &stats["listeners"][0];
    let count = |k: &str| l[k].as_u64().unwrap_or(0);
    (count("local_errors"), count("accept_pauses"))
}

#[test]
fn a_connection_no_member_can_take_is_reset() {
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let port = free_port();
    let server = start(config(1, &one_member(port, "d", dead)), 1);
    let s = TcpStream::connect(addr(port)).unwrap();
    assert_eq!(ending(&s), ErrorKind::ConnectionReset);
    assert_eq!(server.stats().listener("l").unwrap().no_member, 1);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn connections_cut_by_the_drain_timeout_are_reset() {
    let rt = siphon_testkit::runtime();
    let backend = Backend::start(&rt, "b", "127.0.0.1");
    let port = free_port();
    let server = start(config(1, &one_member(port, "b", backend.addr)), 1);
    let (s, name) = connect_greeting(addr(port)).unwrap();
    assert_eq!(name, "b");
    // The backend echoes and never closes: the drain can only cut it.
    std::thread::scope(|scope| {
        scope.spawn(|| server.shutdown(Duration::from_millis(300)));
        assert_eq!(ending(&s), ErrorKind::ConnectionReset);
    });
}
