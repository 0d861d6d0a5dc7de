//! Telling the link that a VIP is here now: a gratuitous ARP (IPv4) or an
//! unsolicited neighbour advertisement with the override flag (IPv6),
//! sent from the interface the VIP was added to.
//!
//! Why: when a VIP moves (a failover onto a spare), the router and the
//! hosts on the link still map it to the old node's hardware address,
//! and Linux keeps such an entry for up to 45 s, plus its probes, before
//! asking again. The announcement replaces their entries at once, as
//! keepalived does on a VRRP takeover. It is sent three times, a second
//! apart, in case one is lost; a failure is logged and changes nothing
//! else (the address is added either way).

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// How many times each announcement goes out, and how far apart.
pub const REPEATS: u32 = 3;
pub const SPACING: Duration = Duration::from_secs(1);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// The override flag: replace whatever link-layer address is cached.
const NA_OVERRIDE: u8 = 0x20;
const OPTION_TARGET_LINK_LAYER: u8 = 2;

/// An interface that can announce: its index and hardware address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

impl Link {
    /// A link with a 6-byte hardware address that is not all zeros (not
    /// `lo`, not a tunnel): one whose neighbours cache addresses.
    pub fn ethernet(index: u32, hardware: &[u8]) -> Option<Link> {
        let mac: [u8; 6] = hardware.try_into().ok()?;
        (mac != [0; 6]).then_some(Link { index, mac })
    }
}

/// The ARP packet (without the Ethernet header, which the kernel adds)
/// of a gratuitous request for `addr` from `mac`: sender and target are
/// both `addr`, the target hardware address unknown (zeros).
pub fn gratuitous_arp(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&addr.octets());
    p[24..28].copy_from_slice(&addr.octets());
    p
}

/// The ICMPv6 body of an unsolicited neighbour advertisement of `addr`
/// at `mac` (override set, solicited not); the kernel fills the checksum.
pub fn neighbour_advertisement(mac: [u8; 6], addr: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = ICMPV6_NEIGHBOUR_ADVERTISEMENT;
    p[4] = NA_OVERRIDE;
    p[8..24].copy_from_slice(&addr.octets());
    p[24] = OPTION_TARGET_LINK_LAYER;
    p[25] = 1; // in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

/// Sends one announcement of `addr` on `link`.
pub fn send(link: Link, addr: IpAddr) -> io::Result<()> {
    match addr {
        IpAddr::V4(a) => send_arp(link, &gratuitous_arp(link.mac, a)),
        IpAddr::V6(a) => send_na(link, &neighbour_advertisement(link.mac, a)),
    }
}

/// Broadcast on the link through a packet socket.
fn send_arp(link: Link, packet: &[u8]) -> io::Result<()> {
    let protocol = ETH_P_ARP.to_be();
    // SAFETY: a plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data, valid all zeros.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = protocol;
    to.sll_ifindex = i32::try_from(link.index).map_err(io::Error::other)?;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `packet` and `to` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::addr_of!(to).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// To all nodes on the link, with the hop limit of 255 that receivers
/// require of neighbour discovery.
fn send_na(link: Link, packet: &[u8]) -> io::Result<()> {
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.set_multicast_if_v6(link.index)?;
    s.set_multicast_hops_v6(255)?;
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, link.index);
    s.send_to(packet, &all_nodes.into())?;
    Ok(())
}

/// Announces `addrs` on `link` [`REPEATS`] times, [`SPACING`] apart, in
/// the background; failures are logged.
pub fn spawn(interface: String, link: Link, addrs: Vec<IpAddr>) {
    if addrs.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for round in 0..REPEATS {
            if round > 0 {
                tokio::time::sleep(SPACING).await;
            }
            for a in &addrs {
                if let Err(e) = send(link, *a) {
                    tracing::warn!(%interface, vip = %a, error = %e, "cannot announce the VIP on its link");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let mac = [0x02, 0, 0, 0, 0, 0x0a];
        let p = gratuitous_arp(mac, Ipv4Addr::new(198, 18, 10, 1));
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[14..18], &[198, 18, 10, 1]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[198, 18, 10, 1]);
    }

    #[test]
    fn a_neighbour_advertisement_overrides_and_carries_the_hardware_address() {
        let mac = [0x02, 0, 0, 0, 0, 0x0b];
        let addr: Ipv6Addr = "2001:db8::10".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let p = neighbour_advertisement(mac, addr);
        assert_eq!(p[0], 136);
        assert_eq!(p[4], 0x20, "override, not solicited, not a router");
        assert_eq!(&p[8..24], &addr.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..], &mac);
    }

    #[test]
    fn only_links_with_a_hardware_address_announce() {
        assert_eq!(Link::ethernet(1, &[0; 6]), None, "lo");
        assert_eq!(Link::ethernet(2, &[]), None, "a tunnel");
        assert_eq!(Link::ethernet(3, &[1, 2, 3, 4]), None);
        assert!(Link::ethernet(4, &[2, 0, 0, 0, 0, 1]).is_some());
    }
}
