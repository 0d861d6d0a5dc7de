//! Writers for the PROXY protocol header (haproxy's proxy-protocol.txt),
//! sent to a member before any client byte when a pool's protocol is
//! `PROXY` (v1, text) or `PROXYV2` (v2, binary). Only writing: Siphon does
//! not accept PROXY headers from clients.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Family of the pair as both ends should be written: if one side is IPv4
/// and the other IPv6, both are written as IPv6 (IPv4-mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (src, dst),
        _ => (to_v6(src), to_v6(dst)),
    }
}

fn to_v6(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
pub fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    let mut out = Vec::with_capacity(108);
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    );
    out
}

/// Binary v2 header, command PROXY, transport STREAM, no TLVs.
pub fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let s6 = match s {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            };
            let d6 = match d {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s6.octets());
            out.extend_from_slice(&d6.octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_text() {
        let h = v1(
            "192.0.2.1:5000".parse().expect("addr"),
            "198.51.100.2:80".parse().expect("addr"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n");
    }

    #[test]
    fn mixed_families_are_written_as_v6() {
        let h = v1(
            "192.0.2.1:5000".parse().expect("addr"),
            "[2001:db8::1]:80".parse().expect("addr"),
        );
        assert_eq!(
            h,
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 5000 80\r\n".to_vec()
        );
        let h2 = v2(
            "192.0.2.1:5000".parse().expect("addr"),
            "[2001:db8::1]:80".parse().expect("addr"),
        );
        assert_eq!(h2.len(), 16 + 36);
    }
}
