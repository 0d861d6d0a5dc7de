//! Helpers shared by the dataplane's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use siphon_dataplane::config::load::Format;
use siphon_dataplane::{Config, Options, Server};

/// A `[[listeners]]` table.
pub fn listener(id: &str, bind: &str, port: u16, pool: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\nid = \"{id}\"\nprotocol = \"TCP\"\nbind_addresses = [\"{bind}\"]\n\
         protocol_port = {port}\ndefault_pool_id = \"{pool}\"\n{extra}\n"
    )
}

/// A UDP `[[listeners]]` table.
pub fn udp_listener(id: &str, bind: &str, port: u16, pool: &str, extra: &str) -> String {
    listener(id, bind, port, pool, extra).replace("protocol = \"TCP\"", "protocol = \"UDP\"")
}

/// A member line for [`pool`]: `(id, addr, weight, extra fields)`.
pub fn member(id: &str, addr: SocketAddr, weight: u32, extra: &str) -> String {
    let ip = addr.ip();
    let sep = if extra.is_empty() { "" } else { ", " };
    format!(
        "{{ id = \"{id}\", address = \"{ip}\", protocol_port = {}, weight = {weight}{sep}{extra} }}",
        addr.port()
    )
}

/// A `[[pools]]` table.
pub fn pool(id: &str, protocol: &str, algorithm: &str, members: &[String]) -> String {
    format!(
        "[[pools]]\nid = \"{id}\"\nprotocol = \"{protocol}\"\nlb_algorithm = \"{algorithm}\"\n\
         members = [\n  {}\n]\n",
        members.join(",\n  ")
    )
}

/// Listener `l` on 127.0.0.1:`port` in front of pool `p` (TCP, round
/// robin) with the one member `id` at `addr`.
pub fn one_member(port: u16, id: &str, addr: SocketAddr) -> [String; 2] {
    [
        listener("l", "127.0.0.1", port, "p", ""),
        pool("p", "TCP", "ROUND_ROBIN", &[member(id, addr, 1, "")]),
    ]
}

pub fn toml(generation: u64, parts: &[String]) -> String {
    format!("generation = {generation}\n\n{}", parts.join("\n"))
}

pub fn config(generation: u64, parts: &[String]) -> Config {
    let text = toml(generation, parts);
    let c = Config::parse(&text, Format::Toml).unwrap_or_else(|e| panic!("{e}\n{text}"));
    c.validate().unwrap_or_else(|e| panic!("{e}\n{text}"));
    c
}

pub fn options(workers: usize) -> Options {
    Options {
        workers,
        ..Options::default()
    }
}

pub fn start(config: Config, workers: usize) -> Server {
    siphon_testkit::raise_fd_limit();
    Server::start(config, options(workers)).unwrap_or_else(|e| panic!("start: {e}"))
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use siphon_testkit::process::Proc;
#[allow(unused_imports)]
pub use siphon_testkit::{eventually, TempDir};

/// The `siphon-dataplane` binary with `args`, its output in `log`. A `run`
/// without `--socket` gets its control socket next to `log`, so parallel
/// tests never share one.
pub fn dataplane(args: &[&str], log: &Path) -> Proc {
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    if args.first().is_some_and(|a| a == "run") && !args.iter().any(|a| a == "--socket") {
        let socket = log.with_extension("sock");
        args.extend(["--socket".to_owned(), socket.to_string_lossy().into_owned()]);
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_siphon-dataplane"));
    cmd.args(&args).env("RUST_LOG", "info");
    Proc::spawn(cmd, log)
}
