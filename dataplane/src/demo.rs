//! The demo behind `siphon-dataplane demo`: two small local backends, the
//! proxy in front of them on an embedded config, and a few connections
//! through it that show which backend answered each.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::config::{load::Format, Config};

/// The embedded demo config: one listener, two members, round robin.
pub const DEMO_CONFIG: &str = include_str!("../demo.toml");

/// Starts a backend that greets each connection with `hello from NAME`
/// and then echoes what it receives until the client closes.
pub fn spawn_backend(name: &str, listener: TcpListener) {
    let name = name.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let _ = serve(&name, stream);
            });
        }
    });
}

fn serve(name: &str, mut s: TcpStream) -> io::Result<()> {
    writeln!(s, "hello from {name}")?;
    io::copy(&mut s.try_clone()?, &mut s)?;
    s.shutdown(std::net::Shutdown::Write)
}

/// The demo config with the ports the caller chose.
pub fn config(listen_port: u16, backend_ports: [u16; 2]) -> Result<Config, String> {
    let text = DEMO_CONFIG
        .replace("19080", &listen_port.to_string())
        .replace("19081", &backend_ports[0].to_string())
        .replace("19082", &backend_ports[1].to_string());
    Config::parse(&text, Format::Toml)
}

/// Binds the two demo backends on loopback.
pub fn bind_backends(ports: [u16; 2]) -> io::Result<[TcpListener; 2]> {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0]))?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, ports[1]))?;
    Ok([a, b])
}

/// Connects `n` times through the proxy and returns each greeting.
pub fn probe(addr: SocketAddr, n: usize) -> io::Result<Vec<String>> {
    (0..n)
        .map(|_| {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim_end().to_owned())
        })
        .collect()
}
