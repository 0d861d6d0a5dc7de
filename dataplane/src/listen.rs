//! Binding listening sockets: one `SO_REUSEPORT` socket per worker and
//! address, so the kernel spreads new connections (TCP) and flows (UDP: it
//! hashes the 4-tuple, so one client stays on one socket) over the workers
//! with no shared queue.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Backlog of each listening socket (the kernel caps it at `somaxconn`).
pub const BACKLOG: i32 = 4096;
/// Receive and send buffer asked for each UDP listener socket: bursts of
/// datagrams wait here while the worker is busy (the kernel caps it at
/// `net.core.rmem_max`/`wmem_max` unless we may force it).
pub const UDP_BUFFER: usize = 4 << 20;

/// A reuseport socket bound to `addr`, not yet listening.
///
/// `IP_FREEBIND` lets a listener bind a VIP before the address is plumbed
/// (Octavia's amphorae set `ip_nonlocal_bind` for the same reason);
/// IPv6 sockets are v6-only so `0.0.0.0` and `::` can both be listed.
fn bound(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
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
    Ok(s)
}

/// Binds `count` TCP sockets on `addr`, all in one reuseport group.
pub fn bind_tcp(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    (0..count)
        .map(|_| {
            let s = bound(addr, Type::STREAM, Protocol::TCP)?;
            // Accepted sockets inherit TCP_NODELAY from the listener, which
            // saves a setsockopt on every connection.
            s.set_nodelay(true)?;
            s.listen(BACKLOG)?;
            Ok(s.into())
        })
        .collect()
}

/// Binds `count` UDP sockets on `addr`, all in one reuseport group. On a
/// wildcard address each datagram carries the local address it was sent
/// to (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), so the reply can leave from it;
/// every datagram carries the socket's kernel drop count (`SO_RXQ_OVFL`).
/// With `gro`, trains of datagrams from one client arrive coalesced.
pub fn bind_udp(addr: SocketAddr, count: usize, gro: bool) -> io::Result<Vec<std::net::UdpSocket>> {
    (0..count)
        .map(|_| {
            let s = bound(addr, Type::DGRAM, Protocol::UDP)?;
            if addr.ip().is_unspecified() {
                set_pktinfo(&s, addr.is_ipv6())?;
            }
            size_buffers(&s);
            count_drops(&s);
            if gro {
                enable_gro(&s);
            }
            Ok(s.into())
        })
        .collect()
}

/// Asks for coalesced receives (`UDP_GRO`, Linux 5.0+); without it every
/// datagram arrives alone, which also works.
pub fn enable_gro(s: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::UdpGroSegment, &true);
}

/// Asks the kernel to attach the socket's count of dropped datagrams to
/// each one received (`SO_RXQ_OVFL`), which the worker turns into the
/// listener's `dropped_kernel` counter. Without it forwarding still works,
/// so a failure is not an error.
fn count_drops(s: &Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::RxqOvfl, &1);
}

fn set_pktinfo(s: &Socket, v6: bool) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let r = if v6 {
        setsockopt(s, sockopt::Ipv6RecvPacketInfo, &true)
    } else {
        setsockopt(s, sockopt::Ipv4PacketInfo, &true)
    };
    r.map_err(io::Error::from)
}

/// Larger buffers where allowed; the defaults still work, so failures are
/// not errors.
fn size_buffers(s: &Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::RcvBufForce, &UDP_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(UDP_BUFFER);
    }
    if setsockopt(s, sockopt::SndBufForce, &UDP_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(UDP_BUFFER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept path relies on this instead of a setsockopt per
    /// connection.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let ls = bind_tcp(addr, 1).unwrap().remove(0);
            let _client = std::net::TcpStream::connect(ls.local_addr().unwrap()).unwrap();
            let (accepted, _) = ls.accept().unwrap();
            assert!(accepted.nodelay().unwrap(), "{addr}");
        }
    }
}
