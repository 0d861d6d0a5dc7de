//! Binding listening sockets: one `SO_REUSEPORT` socket per worker and
//! address, so the kernel spreads new connections over the workers with no
//! shared accept queue.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Backlog of each listening socket (the kernel caps it at `somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Binds `count` TCP sockets on `addr`, all in one reuseport group.
///
/// `IP_FREEBIND` lets a listener bind a VIP before the address is plumbed
/// (Octavia's amphorae set `ip_nonlocal_bind` for the same reason);
/// IPv6 sockets are v6-only so `0.0.0.0` and `::` can both be listed.
pub fn bind_tcp(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    (0..count)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
                let _ = s.set_freebind_ipv6(true);
            } else {
                let _ = s.set_freebind(true);
            }
            s.set_nonblocking(true)?;
            s.set_cloexec(true)?;
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            Ok(s.into())
        })
        .collect()
}
