//! Linux nexthop objects over rtnetlink: single nexthops (a gateway on an
//! interface) and resilient nexthop groups (kernel 5.13+), plus the route
//! that sends a VIP to a group.
//!
//! netlink-packet-route (what rtnetlink builds on) has no nexthop
//! messages, so they are encoded here on netlink-packet-core's framing:
//! `struct nhmsg` followed by `NHA_*` attributes (include/uapi/linux/
//! nexthop.h). Every request asks for an acknowledgement, and creates are
//! create-or-replace, so repeating one is harmless.

use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_utils::nla::DefaultNla;
use netlink_packet_utils::Emitable;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_GROUP_TYPE: u16 = 3;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_RES_GROUP: u16 = 12;
const NHA_RES_GROUP_BUCKETS: u16 = 1;
const NHA_RES_GROUP_IDLE_TIMER: u16 = 2;
const NHA_RES_GROUP_UNBALANCED_TIMER: u16 = 3;
const NEXTHOP_GRP_TYPE_RES: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;

const RTA_DST: u16 = 1;
const RTA_NH_ID: u16 = 30;
const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// Our routes and nexthops say who made them (`proto 77` in `ip route`;
/// a number iproute2 gives no name), so an operator can tell them apart.
pub const PROTOCOL: u8 = 77;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: the kernel said {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        source: std::io::Error,
    },
    #[error("{what}: no answer from the kernel")]
    NoAnswer { what: String },
}

impl NetlinkError {
    /// The kernel refused the request as invalid (EINVAL): e.g. an object
    /// of another kind at that id, or a group's bucket count changed.
    pub fn is_invalid(&self) -> bool {
        matches!(self, NetlinkError::Kernel { source, .. } if source.raw_os_error() == Some(libc::EINVAL))
    }
}

/// What one request carries: a message type, its fixed header and its
/// attributes, already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    kind: u16,
    header: Vec<u8>,
    attrs: Vec<DefaultNla>,
}

impl NetlinkSerializable for Request {
    fn message_type(&self) -> u16 {
        self.kind
    }
    fn buffer_len(&self) -> usize {
        self.header.len() + self.attrs.as_slice().buffer_len()
    }
    fn serialize(&self, buffer: &mut [u8]) {
        buffer[..self.header.len()].copy_from_slice(&self.header);
        self.attrs.as_slice().emit(&mut buffer[self.header.len()..]);
    }
}

/// Only acknowledgements and errors are read back; they are parsed by
/// netlink-packet-core itself.
impl NetlinkDeserializable for Request {
    type Error = std::io::Error;
    fn deserialize(_: &NetlinkHeader, _: &[u8]) -> Result<Self, Self::Error> {
        Err(std::io::Error::other("unexpected netlink message"))
    }
}

fn nla(kind: u16, value: Vec<u8>) -> DefaultNla {
    DefaultNla::new(kind, value)
}

fn address(ip: IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    }
}

/// `struct nhmsg`: family, scope, protocol, reserved, flags.
fn nhmsg(family: u8) -> Vec<u8> {
    vec![family, 0, PROTOCOL, 0, 0, 0, 0, 0]
}

/// A nexthop through `gateway` on interface `oif`.
fn gateway_nexthop(id: u32, gateway: IpAddr, oif: u32) -> Request {
    let (family, gw) = address(gateway);
    Request {
        kind: RTM_NEWNEXTHOP,
        header: nhmsg(family),
        attrs: vec![
            nla(NHA_ID, id.to_ne_bytes().to_vec()),
            nla(NHA_GATEWAY, gw),
            nla(NHA_OIF, oif.to_ne_bytes().to_vec()),
        ],
    }
}

/// How a resilient group spreads flows and moves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resilience {
    /// Hash buckets, spread over the members (fixed once the group exists).
    pub buckets: u16,
    /// Seconds a bucket must be idle before it moves to another member.
    pub idle_timer_s: u32,
    /// Seconds a group may stay unbalanced before buckets move even when
    /// busy (0: never).
    pub unbalanced_timer_s: u32,
}

/// A resilient group of `members` (nexthop ids, equal weights): removing
/// a member moves only its buckets; adding one takes buckets only from
/// idle flows.
fn resilient_group(id: u32, members: &[u32], r: &Resilience) -> Request {
    let mut group = Vec::with_capacity(members.len() * 8);
    for m in members {
        // struct nexthop_grp: id, weight - 1, reserved.
        group.extend_from_slice(&m.to_ne_bytes());
        group.extend_from_slice(&[0, 0, 0, 0]);
    }
    // clock_t: USER_HZ is 100 on Linux (the config caps the seconds).
    let ticks = |s: u32| s.saturating_mul(100).to_ne_bytes().to_vec();
    let mut res = Vec::new();
    for n in [
        nla(NHA_RES_GROUP_BUCKETS, r.buckets.to_ne_bytes().to_vec()),
        nla(NHA_RES_GROUP_IDLE_TIMER, ticks(r.idle_timer_s)),
        nla(NHA_RES_GROUP_UNBALANCED_TIMER, ticks(r.unbalanced_timer_s)),
    ] {
        let mut b = vec![0u8; n.buffer_len()];
        n.emit(&mut b);
        res.extend_from_slice(&b);
    }
    Request {
        kind: RTM_NEWNEXTHOP,
        header: nhmsg(AF_UNSPEC),
        attrs: vec![
            nla(NHA_ID, id.to_ne_bytes().to_vec()),
            nla(NHA_GROUP, group),
            nla(NHA_GROUP_TYPE, NEXTHOP_GRP_TYPE_RES.to_ne_bytes().to_vec()),
            nla(NHA_RES_GROUP | NLA_F_NESTED, res),
        ],
    }
}

fn delete_nexthop(id: u32) -> Request {
    Request {
        kind: RTM_DELNEXTHOP,
        // The kernel wants an all-zero header on delete.
        header: vec![0; 8],
        attrs: vec![nla(NHA_ID, id.to_ne_bytes().to_vec())],
    }
}

/// `struct rtmsg` for a host route to `dst` in the main table.
fn route(kind: u16, dst: IpAddr, group: Option<u32>) -> Request {
    let (family, addr) = address(dst);
    let prefix = (addr.len() * 8) as u8;
    let header = vec![
        family,
        prefix,
        0, // src_len
        0, // tos
        RT_TABLE_MAIN,
        PROTOCOL,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0, // flags
    ];
    let mut attrs = vec![nla(RTA_DST, addr)];
    if let Some(g) = group {
        attrs.push(nla(RTA_NH_ID, g.to_ne_bytes().to_vec()));
    }
    Request {
        kind,
        header,
        attrs,
    }
}

/// A route netlink socket, optionally inside another network namespace.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// A socket in this process's namespace, or in the one at `netns`
    /// (`/run/netns/NAME`): the socket keeps the namespace it was made in.
    pub fn open(netns: Option<&Path>) -> Result<Rtnl, NetlinkError> {
        let socket = match netns {
            None => Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?,
            Some(path) => socket_in(path)?,
        };
        let mut socket = socket;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    fn call(&mut self, what: &str, req: Request, flags: u16) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetlinkError::Socket)?;
        let mut rx = vec![0u8; 1 << 16];
        loop {
            let n = self
                .socket
                .recv(&mut &mut rx[..], 0)
                .map_err(NetlinkError::Socket)?;
            if n == 0 {
                return Err(NetlinkError::NoAnswer { what: what.into() });
            }
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<Request>::deserialize(&rx[off..n]).map_err(|e| {
                    NetlinkError::Kernel {
                        what: what.into(),
                        source: std::io::Error::other(e.to_string()),
                    }
                })?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = reply.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(NetlinkError::Kernel {
                                what: what.into(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Creates or replaces nexthop `id` via `gateway` on `oif`.
    pub fn set_gateway(&mut self, id: u32, gateway: IpAddr, oif: u32) -> Result<(), NetlinkError> {
        self.call(
            &format!("nexthop {id} via {gateway}"),
            gateway_nexthop(id, gateway, oif),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Creates or replaces resilient group `id` over `members`.
    pub fn set_group(
        &mut self,
        id: u32,
        members: &[u32],
        resilience: &Resilience,
    ) -> Result<(), NetlinkError> {
        self.call(
            &format!("resilient nexthop group {id}"),
            resilient_group(id, members, resilience),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes nexthop (or group) `id`; an absent one is not an error.
    pub fn delete_nexthop(&mut self, id: u32) -> Result<(), NetlinkError> {
        match self.call(&format!("delete nexthop {id}"), delete_nexthop(id), 0) {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Creates or replaces the host route to `vip` through group `group`.
    pub fn set_route(&mut self, vip: IpAddr, group: u32) -> Result<(), NetlinkError> {
        self.call(
            &format!("route {vip} nhid {group}"),
            route(RTM_NEWROUTE, vip, Some(group)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes the host route to `vip`; an absent one is not an error.
    pub fn delete_route(&mut self, vip: IpAddr) -> Result<(), NetlinkError> {
        match self.call(
            &format!("delete route {vip}"),
            route(RTM_DELROUTE, vip, None),
            0,
        ) {
            Err(NetlinkError::Kernel { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ESRCH)
                ) =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

/// The index of interface `name` in the namespace at `netns` (or this
/// process's).
pub fn ifindex(netns: Option<&Path>, name: &str) -> Result<u32, NetlinkError> {
    let lookup = || {
        nix::net::if_::if_nametoindex(name).map_err(|e| NetlinkError::Interface {
            name: name.to_owned(),
            source: std::io::Error::from(e),
        })
    };
    match netns {
        None => lookup(),
        Some(path) => in_netns(path, lookup),
    }
}

/// A netlink socket made inside the namespace at `path`.
fn socket_in(path: &Path) -> Result<Socket, NetlinkError> {
    in_netns(path, || {
        Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)
    })
}

/// Runs `f` on a thread that enters the namespace at `path` (a process's
/// other threads keep theirs); sockets it makes stay in that namespace.
fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, NetlinkError> + Send,
) -> Result<T, NetlinkError> {
    let ns_err = |source| NetlinkError::Netns {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(ns_err)?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T, NetlinkError> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns_err(std::io::Error::from(e)))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetlinkError::Socket(std::io::Error::other(
                "namespace thread panicked",
            )))
        })
    })
}
