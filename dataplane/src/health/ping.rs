//! ICMP echo for `PING` monitors: one request, wait for its reply.
//!
//! An unprivileged ICMP datagram socket (`net.ipv4.ping_group_range`) is
//! tried first: the kernel then fills in the identifier and checksum and
//! delivers only this socket's replies. Otherwise a raw socket (needs
//! `CAP_NET_RAW`), connected to the member so only its packets arrive;
//! the reply is matched on type and on a per-probe token in the payload.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
/// Marks our payloads (and, with the sequence number, this probe's reply).
const MAGIC: &[u8; 8] = b"siphonhc";

static SEQ: AtomicU16 = AtomicU16::new(1);

/// Sends one echo request to `ip` and waits for the matching reply (the
/// caller bounds the wait).
pub async fn echo(ip: IpAddr) -> io::Result<()> {
    let (sock, raw) = open(ip)?;
    sock.connect(&SocketAddr::new(ip, 0).into())?;
    // SAFETY: the socket owns its descriptor, and the AsyncFd owns the
    // socket until both are dropped together at the end of this probe.
    let fd = unsafe { AsyncFd::register(sock)? };
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let id = std::process::id() as u16;
    let request = packet(ip.is_ipv6(), id, seq);
    loop {
        let mut guard = fd.writable().await?;
        match guard.try_io(|s| s.get_ref().send(&request)) {
            Ok(r) => {
                r?;
                break;
            }
            Err(_would_block) => continue,
        }
    }
    let mut buf = [0u8; 1500];
    loop {
        let mut guard = fd.readable().await?;
        let n = match guard.try_io(|s| {
            use std::io::Read;
            s.get_ref().read(&mut buf)
        }) {
            Ok(r) => r?,
            Err(_would_block) => continue,
        };
        let got = &buf[..n];
        if is_reply(got, ip.is_ipv6(), raw, seq) {
            return Ok(());
        }
    }
}

fn open(ip: IpAddr) -> io::Result<(Socket, bool)> {
    let (domain, proto) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let (sock, raw) = match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => (s, false),
        Err(_) => (Socket::new(domain, Type::RAW, Some(proto))?, true),
    };
    sock.set_nonblocking(true)?;
    sock.set_cloexec(true)?;
    Ok((sock, raw))
}

fn packet(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + MAGIC.len());
    p.push(if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 });
    p.push(0);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(MAGIC);
    if !v6 {
        // ICMPv6 checksums cover a pseudo-header and are always filled in
        // by the kernel; ICMPv4 ones are ours on raw sockets.
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn is_reply(got: &[u8], v6: bool, raw: bool, seq: u16) -> bool {
    // A raw IPv4 socket hands over the IP header too.
    let icmp = if raw && !v6 {
        let ihl = usize::from(got.first().map_or(0, |b| b & 0x0f)) * 4;
        got.get(ihl..).unwrap_or(&[])
    } else {
        got
    };
    let want = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    icmp.len() >= 8 + MAGIC.len()
        && icmp[0] == want
        && icmp[6..8] == seq.to_be_bytes()
        && &icmp[8..8 + MAGIC.len()] == MAGIC
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_packet_with_its_checksum_is_zero() {
        let p = packet(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0);
    }

    #[test]
    fn replies_match_on_type_sequence_and_payload() {
        let mut reply = packet(false, 1, 9);
        reply[0] = ECHO_REPLY_V4;
        assert!(is_reply(&reply, false, false, 9));
        assert!(!is_reply(&reply, false, false, 10));
        // Our own request, seen by a raw socket on loopback, is no reply.
        let mut with_ip = vec![0x45u8; 1];
        with_ip.extend_from_slice(&[0; 19]);
        with_ip.extend_from_slice(&packet(false, 1, 9));
        assert!(!is_reply(&with_ip, false, true, 9));
        with_ip[20] = ECHO_REPLY_V4;
        assert!(is_reply(&with_ip, false, true, 9));
    }
}
