//! The PROXY header writers: for any pair of addresses, the v1 and v2
//! headers must parse back (with a parser written here from haproxy's
//! proxy-protocol.txt, not the writer's code) to the same addresses and
//! ports, and keep within the spec's lengths. A pair of mixed families is
//! written as IPv6, the IPv4 side mapped.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use siphon_dataplane::proxy_protocol;

/// The longest v1 header the spec allows, CRLF included.
const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.iter().copied();
    let (Some(src), Some(dst)) = (address(&mut bytes), address(&mut bytes)) else {
        return;
    };
    let (want_src, want_dst) = if src.is_ipv4() == dst.is_ipv4() {
        (plain(src), plain(dst))
    } else {
        (mapped(src), mapped(dst))
    };

    let h1 = proxy_protocol::v1(src, dst);
    assert!(h1.len() <= V1_MAX, "v1 header of {} bytes", h1.len());
    assert_eq!(parse_v1(&h1), Some((want_src, want_dst)), "{h1:?}");

    let h2 = proxy_protocol::v2(src, dst);
    assert_eq!(parse_v2(&h2), Some((want_src, want_dst)), "{h2:?}");
});

/// An address from the input: a family byte, 4 or 16 address bytes, a
/// port, and for IPv6 a flow label and scope id (the header carries
/// neither).
fn address(b: &mut impl Iterator<Item = u8>) -> Option<SocketAddr> {
    let mut take = |n: usize| -> Option<Vec<u8>> {
        let v: Vec<u8> = b.by_ref().take(n).collect();
        (v.len() == n).then_some(v)
    };
    let v6 = take(1)?[0] & 1 == 1;
    if v6 {
        let ip: [u8; 16] = take(16)?.try_into().ok()?;
        let port = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let extra = take(8)?;
        let flow = u32::from_be_bytes(extra[..4].try_into().ok()?);
        let scope = u32::from_be_bytes(extra[4..].try_into().ok()?);
        Some(SocketAddr::V6(std::net::SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            flow,
            scope,
        )))
    } else {
        let ip: [u8; 4] = take(4)?.try_into().ok()?;
        let port = u16::from_be_bytes(take(2)?.try_into().ok()?);
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
    }
}

/// Address and port only (what a header can carry).
fn plain(a: SocketAddr) -> (IpAddr, u16) {
    (a.ip(), a.port())
}

fn mapped(a: SocketAddr) -> (IpAddr, u16) {
    match a.ip() {
        IpAddr::V4(v4) => (IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        ip => (ip, a.port()),
    }
}

type Pair = ((IpAddr, u16), (IpAddr, u16));

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`, nothing after it.
fn parse_v1(h: &[u8]) -> Option<Pair> {
    let text = std::str::from_utf8(h).ok()?;
    let line = text.strip_suffix("\r\n")?;
    if line.contains(['\r', '\n']) {
        return None;
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let [proxy, family, src, dst, sport, dport] = fields.as_slice() else {
        return None;
    };
    if *proxy != "PROXY" {
        return None;
    }
    let (src, dst): (IpAddr, IpAddr) = match *family {
        "TCP4" => (
            IpAddr::V4(src.parse::<Ipv4Addr>().ok()?),
            IpAddr::V4(dst.parse::<Ipv4Addr>().ok()?),
        ),
        "TCP6" => (
            IpAddr::V6(src.parse::<Ipv6Addr>().ok()?),
            IpAddr::V6(dst.parse::<Ipv6Addr>().ok()?),
        ),
        _ => return None,
    };
    Some(((src, port(sport)?), (dst, port(dport)?)))
}

/// A v1 port: decimal, no sign, no leading zero (the spec's rule).
fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Signature, version 2 / PROXY, family and transport, length, then the
/// addresses and ports; no TLVs and nothing after the length.
fn parse_v2(h: &[u8]) -> Option<Pair> {
    if h.len() < 16 || &h[..12] != V2_SIGNATURE || h[12] != 0x21 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    let body = &h[16..];
    if body.len() != len {
        return None;
    }
    let (src, dst, ports) = match (h[13], len) {
        // AF_INET, STREAM
        (0x11, 12) => {
            let s: [u8; 4] = body[0..4].try_into().ok()?;
            let d: [u8; 4] = body[4..8].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), &body[8..12])
        }
        // AF_INET6, STREAM
        (0x21, 36) => {
            let s: [u8; 16] = body[0..16].try_into().ok()?;
            let d: [u8; 16] = body[16..32].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), &body[32..36])
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Some(((src, sport), (dst, dport)))
}
