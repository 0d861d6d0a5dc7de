//! Helpers shared by the dataplane's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("siphon-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `siphon-dataplane` binary running as a child, stderr in a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Runs the binary with `args`. A `run` without `--socket` gets its
    /// control socket next to `log`, so parallel tests never share one.
    pub fn spawn(args: &[&str], log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}"));
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        if args.first().is_some_and(|a| a == "run") && !args.iter().any(|a| a == "--socket") {
            let socket = log.with_extension("sock");
            args.extend(["--socket".to_owned(), socket.to_string_lossy().into_owned()]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_siphon-dataplane"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        Proc {
            child,
            log: log.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        eventually(timeout, || self.log_text().matches(needle).count() >= count)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap_or_else(|e| panic!("kill: {e}"));
    }

    /// Waits for exit up to `timeout`; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
