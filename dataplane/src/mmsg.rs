//! Batched datagram I/O: `recvmmsg(2)` into one preallocated buffer, and
//! `sendmmsg(2)` straight out of it, so a burst of datagrams costs one
//! syscall each way and no allocation.
//!
//! Segmentation offload where the kernel offers it: a run of equal-sized
//! datagrams to one destination leaves as one UDP GSO message
//! (`UDP_SEGMENT`), which crosses the IP stack as one packet and is cut
//! into datagrams at the receiving socket or the NIC; sockets with
//! `UDP_GRO` receive trains of datagrams of one sender coalesced into one
//! slot, and a train is sent on as one GSO message. Where a device refuses
//! GSO the same datagrams go out one by one, with their boundaries intact.
//!
//! Written against libc rather than nix's `recvmmsg`: nix keeps the headers
//! between calls without resetting `msg_namelen`/`msg_controllen`, which
//! the kernel shrinks on every receive, so reusing them across sockets of
//! both address families truncates addresses and control data. Here the
//! headers are rebuilt on the stack for every call and only plain bytes
//! live in the batch.

use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr;

use socket2::SockAddr;

/// Datagrams per syscall.
pub const SLOTS: usize = 32;
/// Bytes per datagram slot: the largest UDP payload (65,507 bytes over
/// IPv4, 65,527 over IPv6) fits, so nothing is ever truncated.
pub const SLOT: usize = 1 << 16;
/// The largest UDP payload of one IPv4 datagram; also the most one GSO
/// message carries (the kernel's limit for the whole message).
pub const MAX_PAYLOAD: usize = 65_507;
/// Datagrams one GSO message may carry (`UDP_MAX_SEGMENTS` of older kernels).
pub const MAX_SEGMENTS: usize = 64;
/// Messages (and iovecs) per `sendmmsg` call.
const MSGS: usize = 64;
/// Control bytes per message: an `in6_pktinfo` (`CMSG_SPACE(20)` = 40),
/// a `UDP_SEGMENT`/`UDP_GRO` value (`CMSG_SPACE(4)` = 24) and an
/// `SO_RXQ_OVFL` count (`CMSG_SPACE(4)` = 16), with room to spare.
const CTRL: usize = 96;

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL]);

/// A receive buffer of [`SLOTS`] slots with their source addresses,
/// destinations (`*_PKTINFO`), GRO segment sizes and the socket's kernel
/// drop count (`SO_RXQ_OVFL`). A slot holds one datagram, or on a
/// `UDP_GRO` socket a train of datagrams of one sender, all `segment`
/// bytes long but the last.
pub struct RecvBatch {
    buf: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    namelens: [libc::socklen_t; SLOTS],
    ctrl: Box<[Ctrl]>,
    lens: [usize; SLOTS],
    dsts: [Option<IpAddr>; SLOTS],
    segs: [usize; SLOTS],
    /// The `SO_RXQ_OVFL` count of the last receive's latest slot that
    /// carried one.
    drops: Option<u32>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> RecvBatch {
        RecvBatch::new()
    }
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0u8; SLOTS * SLOT].into_boxed_slice(),
            // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
            names: (0..SLOTS).map(|_| unsafe { zeroed() }).collect(),
            namelens: [0; SLOTS],
            ctrl: vec![Ctrl([0; CTRL]); SLOTS].into_boxed_slice(),
            lens: [0; SLOTS],
            dsts: [None; SLOTS],
            segs: [0; SLOTS],
            drops: None,
        }
    }

    /// Receives up to [`SLOTS`] slots without blocking; returns how many.
    /// Fewer than `SLOTS` means the socket's queue is empty for now.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: mmsghdr and iovec are plain data; zeroes are valid
        // (null pointers, zero lengths) and every used field is set below.
        let mut hdrs: [libc::mmsghdr; SLOTS] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; SLOTS] = unsafe { zeroed() };
        let base = self.buf.as_mut_ptr();
        for (i, ((h, iov), (name, ctrl))) in hdrs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(self.names.iter_mut().zip(self.ctrl.iter_mut()))
            .enumerate()
        {
            // SAFETY: i < SLOTS, so the slot lies inside `buf`.
            iov.iov_base = unsafe { base.add(i * SLOT) }.cast();
            iov.iov_len = SLOT;
            let m = &mut h.msg_hdr;
            m.msg_name = ptr::from_mut(name).cast();
            m.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_iov = iov;
            m.msg_iovlen = 1;
            m.msg_control = ctrl.0.as_mut_ptr().cast();
            m.msg_controllen = CTRL;
        }
        // SAFETY: every header points at buffers owned by `self` or by this
        // frame, valid and unaliased for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                SLOTS as libc::c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = usize::try_from(n).unwrap_or(0).min(SLOTS);
        self.drops = None;
        for (i, h) in hdrs.iter().take(n).enumerate() {
            let len = (h.msg_len as usize).min(SLOT);
            self.lens[i] = len;
            self.namelens[i] = h.msg_hdr.msg_namelen;
            let c = if h.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
                Control::default()
            } else {
                parse_control(&self.ctrl[i], h.msg_hdr.msg_controllen.min(CTRL))
            };
            self.dsts[i] = c.dst;
            // A "train" no longer than its segment is one datagram.
            self.segs[i] = if c.seg < len { c.seg } else { 0 };
            // Slots come in queue order, so the last count is the newest.
            if c.drops.is_some() {
                self.drops = c.drops;
            }
        }
        Ok(n)
    }

    /// The payload of datagram `i` of the last receive.
    pub fn data(&self, i: usize) -> &[u8] {
        let start = i * SLOT;
        &self.buf[start..start + self.lens[i]]
    }

    /// Who sent datagram `i` (None on a socket without addresses).
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let len = self.namelens[i];
        if len == 0 {
            return None;
        }
        // SAFETY: the kernel wrote a sockaddr of `len` bytes into the
        // storage, which is large enough for any address family.
        let addr = unsafe { SockAddr::new(self.names[i], len) };
        addr.as_socket()
    }

    /// The local address slot `i` was sent to, from its `IP_PKTINFO` /
    /// `IPV6_PKTINFO` control message (only sockets that asked get one).
    pub fn destination(&self, i: usize) -> Option<IpAddr> {
        self.dsts[i]
    }

    /// The GRO segment size of slot `i`, 0 when it holds one datagram.
    pub fn segment(&self, i: usize) -> usize {
        self.segs[i]
    }

    /// The receiving socket's cumulative count of datagrams the kernel
    /// dropped (receive queue full, mostly), as of the newest datagram of
    /// the last receive that reported one: only a socket with
    /// `SO_RXQ_OVFL` set gets it, and the kernel leaves it out while the
    /// count is 0. A `u32` that wraps around.
    pub fn kernel_drops(&self) -> Option<u32> {
        self.drops
    }

    /// How many datagrams slot `i` holds.
    pub fn datagrams(&self, i: usize) -> u64 {
        match self.segs[i] {
            0 => 1,
            seg => self.lens[i].div_ceil(seg) as u64,
        }
    }
}

/// What the control messages of one received slot said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Control {
    /// `*_PKTINFO`: the local address the datagram was sent to.
    dst: Option<IpAddr>,
    /// `UDP_GRO`: the segment size of a coalesced train (0: none).
    seg: usize,
    /// `SO_RXQ_OVFL`: the socket's drop count when the datagram was queued.
    drops: Option<u32>,
}

/// The control messages in `len` bytes of control data the kernel wrote
/// into `ctrl`.
fn parse_control(ctrl: &Ctrl, len: usize) -> Control {
    let mut out = Control::default();
    if len == 0 {
        return out;
    }
    // SAFETY: a msghdr describing only the control buffer the kernel
    // filled (`len` bytes); the CMSG_* macros stay inside it.
    unsafe {
        let mut m: libc::msghdr = zeroed();
        m.msg_control = ctrl.0.as_ptr().cast_mut().cast();
        m.msg_controllen = len;
        let mut c = libc::CMSG_FIRSTHDR(&m);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info: libc::in_pktinfo = ptr::read_unaligned(data.cast());
                    let ip = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                    out.dst = Some(IpAddr::V4(ip));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info: libc::in6_pktinfo = ptr::read_unaligned(data.cast());
                    out.dst = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    let v: libc::c_int = ptr::read_unaligned(data.cast());
                    out.seg = usize::try_from(v).unwrap_or(0);
                }
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                    out.drops = Some(ptr::read_unaligned(data.cast::<u32>()));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&m, c);
        }
    }
    out
}

/// One slot of a [`RecvBatch`] to send on: where to (None on a connected
/// socket) and from which local address (None: the socket's).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing {
    pub slot: usize,
    pub to: Option<SocketAddr>,
    pub from: Option<IpAddr>,
}

/// A socket's segmentation offload: the largest segment it sends as one
/// GSO message. Starts at "any"; a device that refuses GSO turns it off,
/// and one that refuses a segment size (larger than its MTU) lowers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso(usize);

impl Gso {
    pub const ON: Gso = Gso(MAX_PAYLOAD);
    pub const OFF: Gso = Gso(0);

    fn allows(self, seg: usize) -> bool {
        seg > 0 && seg <= self.0
    }
}

/// What a [`Sender::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams not sent: the socket buffer was full, or an error.
    pub dropped: u64,
    /// ICMP errors (port or host unreachable) reported on the socket.
    pub unreachable: u64,
}

/// A place in a list of [`Outgoing`]: the entry, and the byte offset in
/// its slot when a GRO train is being sent datagram by datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Pos {
    out: usize,
    off: usize,
}

/// Bytes of a slot that one iovec sends.
#[derive(Debug, Clone, Copy)]
struct Piece {
    slot: usize,
    off: usize,
    len: usize,
}

/// One message of a `sendmmsg` call: one datagram, or a GSO run of them.
#[derive(Debug, Clone, Copy)]
struct Msg {
    start: Pos,
    end: Pos,
    piece0: usize,
    pieces: usize,
    /// GSO segment size; 0 = a plain datagram.
    seg: usize,
    /// Size of the run's datagrams (a joining datagram may not be longer).
    run: usize,
    /// A shorter datagram ended the run, or GSO cannot extend it.
    closed: bool,
    datagrams: u64,
    bytes: u64,
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
}

/// Plans and sends datagrams; its lists are reused, so sending allocates
/// nothing once they have grown.
#[derive(Debug, Default)]
pub struct Sender {
    msgs: Vec<Msg>,
    pieces: Vec<Piece>,
}

impl Sender {
    pub fn new() -> Sender {
        Sender {
            msgs: Vec::with_capacity(MSGS),
            pieces: Vec::with_capacity(MSGS),
        }
    }

    /// Sends `out` (slots of `batch`) on `fd` in as few messages and calls
    /// as `gso` allows. UDP has no back-pressure to offer: what the socket
    /// does not take now is dropped and counted, as a router would.
    pub fn send(&mut self, fd: RawFd, batch: &RecvBatch, out: &[Outgoing], gso: &mut Gso) -> Sent {
        let mut sent = Sent::default();
        let mut pos = Pos::default();
        // An ICMP error queued on a connected socket fails the next send
        // once; the same message is tried again, but only once.
        let mut retried = None;
        while pos.out < out.len() {
            let next = self.plan(batch, out, pos, *gso);
            let Some(first) = self.msgs.first().copied() else {
                break;
            };
            match self.transmit(fd, batch) {
                Ok(k) => {
                    let k = k.min(self.msgs.len());
                    for m in &self.msgs[..k] {
                        sent.datagrams += m.datagrams;
                        sent.bytes += m.bytes;
                    }
                    pos = match self.msgs.get(k) {
                        // The kernel stopped early: the next call reports why.
                        Some(m) if k > 0 => m.start,
                        Some(m) => {
                            sent.dropped += m.datagrams;
                            m.end
                        }
                        None => next,
                    };
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
                        if retried != Some(first.start) =>
                    {
                        sent.unreachable += 1;
                        retried = Some(first.start);
                    }
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        sent.dropped += remaining(batch, out, pos);
                        break;
                    }
                    // The device cannot segment: no GSO on this socket.
                    Some(libc::EIO) if first.seg > 0 => *gso = Gso::OFF,
                    // A segment too large for the path's MTU (older
                    // kernels say EINVAL): such datagrams go alone, and
                    // IP fragments them.
                    Some(libc::EMSGSIZE | libc::EINVAL) if first.seg > 0 => {
                        *gso = Gso(first.seg - 1)
                    }
                    _ => {
                        tracing::trace!(error = %e, "datagram not sent");
                        sent.dropped += first.datagrams;
                        pos = first.end;
                    }
                },
            }
        }
        sent
    }

    /// Fills `msgs` and `pieces` for one `sendmmsg`, from `pos` on;
    /// returns where the next call starts.
    fn plan(&mut self, batch: &RecvBatch, out: &[Outgoing], mut pos: Pos, gso: Gso) -> Pos {
        self.msgs.clear();
        self.pieces.clear();
        while pos.out < out.len() && self.msgs.len() < MSGS && self.pieces.len() < MSGS {
            let o = out[pos.out];
            let len = batch.lens[o.slot];
            let seg = batch.segment(o.slot);
            let whole = Pos {
                out: pos.out + 1,
                off: 0,
            };
            if seg > 0 {
                // A GRO train: on as one GSO message, or datagram by datagram.
                if pos.off == 0 && gso.allows(seg) {
                    self.push(
                        o,
                        pos,
                        whole,
                        Piece {
                            slot: o.slot,
                            off: 0,
                            len,
                        },
                        seg,
                    );
                    pos = whole;
                } else {
                    let plen = seg.min(len - pos.off);
                    let end = if pos.off + plen >= len {
                        whole
                    } else {
                        Pos {
                            out: pos.out,
                            off: pos.off + plen,
                        }
                    };
                    let piece = Piece {
                        slot: o.slot,
                        off: pos.off,
                        len: plen,
                    };
                    self.push(o, pos, end, piece, 0);
                    pos = end;
                }
                continue;
            }
            let piece = Piece {
                slot: o.slot,
                off: 0,
                len,
            };
            if let Some(m) = self.msgs.last_mut() {
                let joins = !m.closed
                    && m.to == o.to
                    && m.from == o.from
                    && m.pieces < MAX_SEGMENTS
                    && m.bytes as usize + len <= MAX_PAYLOAD
                    && len > 0
                    && len <= m.run
                    && gso.allows(m.run);
                if joins {
                    m.pieces += 1;
                    m.datagrams += 1;
                    m.bytes += len as u64;
                    m.seg = m.run;
                    m.closed = len < m.run;
                    m.end = whole;
                    self.pieces.push(piece);
                    pos = whole;
                    continue;
                }
            }
            self.push(o, pos, whole, piece, 0);
            pos = whole;
        }
        pos
    }

    /// A new message of one piece; `seg` > 0 for a GRO train sent whole.
    fn push(&mut self, o: Outgoing, start: Pos, end: Pos, piece: Piece, seg: usize) {
        self.msgs.push(Msg {
            start,
            end,
            piece0: self.pieces.len(),
            pieces: 1,
            seg,
            run: piece.len,
            closed: seg > 0 || piece.len == 0,
            datagrams: if seg > 0 {
                piece.len.div_ceil(seg) as u64
            } else {
                1
            },
            bytes: piece.len as u64,
            to: o.to,
            from: o.from,
        });
        self.pieces.push(piece);
    }

    /// One `sendmmsg` of the planned messages; how many went out.
    fn transmit(&self, fd: RawFd, batch: &RecvBatch) -> io::Result<usize> {
        let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; MSGS];
        let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; MSGS];
        let mut names = [const { MaybeUninit::<SockAddr>::uninit() }; MSGS];
        let mut ctrls = [const { MaybeUninit::<Ctrl>::uninit() }; MSGS];
        let base = batch.buf.as_ptr();
        for (p, iov) in self.pieces.iter().zip(iovs.iter_mut()) {
            // SAFETY: plan() only makes pieces inside a received slot.
            let at = unsafe { base.add(p.slot * SLOT + p.off) };
            iov.write(libc::iovec {
                iov_base: at.cast_mut().cast(),
                iov_len: p.len,
            });
        }
        let iov_base = iovs.as_mut_ptr().cast::<libc::iovec>();
        let n = self.msgs.len().min(MSGS);
        for (i, m) in self.msgs.iter().take(n).enumerate() {
            // SAFETY: msghdr is plain data; zeroes are valid and every
            // used field is set below.
            let mut h: libc::msghdr = unsafe { zeroed() };
            // SAFETY: piece0 + pieces <= pieces.len() <= MSGS: inside `iovs`,
            // whose first pieces.len() entries were written above.
            h.msg_iov = unsafe { iov_base.add(m.piece0) };
            h.msg_iovlen = m.pieces;
            if let Some(to) = m.to {
                let a = names[i].write(SockAddr::from(to));
                h.msg_name = a.as_ptr().cast_mut().cast();
                h.msg_namelen = a.len();
            }
            if m.from.is_some() || m.seg > 0 {
                let c = ctrls[i].write(Ctrl([0; CTRL]));
                h.msg_control = c.0.as_mut_ptr().cast();
                h.msg_controllen = CTRL;
                // SAFETY: the control buffer is CTRL zeroed bytes, room for
                // both messages write_control may write.
                h.msg_controllen = unsafe { write_control(&mut h, m.from, m.seg) };
            }
            hdrs[i].write(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }
        // SAFETY: the first n headers were written above; the kernel only
        // reads the buffers they point at (`batch`'s slots and this
        // frame's iovecs, names and control data).
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().cast(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(r).unwrap_or(0))
    }
}

/// Datagrams of `out` from `pos` on.
fn remaining(batch: &RecvBatch, out: &[Outgoing], pos: Pos) -> u64 {
    out.iter()
        .enumerate()
        .skip(pos.out)
        .map(|(i, o)| match batch.segment(o.slot) {
            0 => 1,
            seg => {
                let done = if i == pos.out { pos.off } else { 0 };
                (batch.lens[o.slot] - done).div_ceil(seg) as u64
            }
        })
        .sum()
}

/// Writes the control messages of one send: a `*_PKTINFO` naming the
/// source address, and a `UDP_SEGMENT` with the GSO segment size; returns
/// the control length to use.
///
/// # Safety
/// `m.msg_control` must point at `m.msg_controllen` zeroed, writable bytes,
/// at least `CMSG_SPACE(size_of::<in6_pktinfo>()) + CMSG_SPACE(2)`.
unsafe fn write_control(m: &mut libc::msghdr, from: Option<IpAddr>, seg: usize) -> usize {
    let mut used = 0;
    // SAFETY: the caller guarantees the buffer; CMSG_FIRSTHDR/NXTHDR return
    // null when no room is left for a header, checked before each write.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        if let Some(ip) = from {
            if c.is_null() {
                return used;
            }
            used += match ip {
                IpAddr::V4(ip) => {
                    let mut info: libc::in_pktinfo = zeroed();
                    info.ipi_spec_dst.s_addr = u32::from(ip).to_be();
                    put(c, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
                }
                IpAddr::V6(ip) => {
                    let mut info: libc::in6_pktinfo = zeroed();
                    info.ipi6_addr.s6_addr = ip.octets();
                    put(c, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
                }
            };
            c = libc::CMSG_NXTHDR(m, c);
        }
        if seg > 0 {
            if c.is_null() {
                return used;
            }
            let seg = u16::try_from(seg).unwrap_or(u16::MAX);
            used += put(c, libc::SOL_UDP, libc::UDP_SEGMENT, seg);
        }
    }
    used
}

/// Writes one control message at `c`; returns its space.
///
/// # Safety
/// `c` must point at a writable header with `CMSG_SPACE(size_of::<T>())`
/// bytes behind it.
unsafe fn put<T>(c: *mut libc::cmsghdr, level: i32, ty: i32, value: T) -> usize {
    let size = size_of::<T>() as u32;
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(size) as usize;
        ptr::write_unaligned(libc::CMSG_DATA(c).cast(), value);
        libc::CMSG_SPACE(size) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_burst_goes_through_in_one_call_each_way() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b_addr = b.local_addr().unwrap();
        for i in 0..40u8 {
            a.send_to(&[i; 100], b_addr).unwrap();
        }
        let mut batch = RecvBatch::new();
        let n = batch.recv(b.as_raw_fd()).unwrap();
        assert_eq!(n, SLOTS, "a full batch first");
        assert_eq!(batch.data(3), &[3u8; 100][..]);
        assert_eq!(batch.source(0), Some(a.local_addr().unwrap()));
        assert_eq!(batch.destination(0), None, "no pktinfo asked");
        // Echo them back in one go.
        let out: Vec<Outgoing> = (0..n)
            .map(|slot| Outgoing {
                slot,
                to: batch.source(slot),
                from: None,
            })
            .collect();
        let mut gso = Gso::ON;
        let sent = Sender::new().send(b.as_raw_fd(), &batch, &out, &mut gso);
        assert_eq!(sent.datagrams, SLOTS as u64);
        assert_eq!(sent.bytes, 100 * SLOTS as u64);
        let mut buf = [0u8; 200];
        let (len, _) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], &[0u8; 100][..]);
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 40 - SLOTS);
    }

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn sizes_of(msgs: &[Msg]) -> Vec<(usize, u64, usize)> {
        msgs.iter().map(|m| (m.pieces, m.bytes, m.seg)).collect()
    }

    /// The kernel's drop count rides on the datagrams queued after the
    /// drops, and only on a socket that asked for it.
    #[test]
    fn the_kernel_drop_count_comes_with_later_datagrams() {
        use nix::sys::socket::{setsockopt, sockopt};
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        // The smallest buffer the kernel allows holds a few datagrams.
        setsockopt(&b, sockopt::RcvBuf, &1).unwrap();
        let mut batch = RecvBatch::new();
        a.send_to(b"before", to).unwrap();
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.kernel_drops(), None, "option not set");
        setsockopt(&b, sockopt::RxqOvfl, &1).unwrap();
        a.send_to(b"no drops yet", to).unwrap();
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.kernel_drops(), None, "left out while 0");

        let sent = 200;
        for _ in 0..sent {
            a.send_to(&[1u8; 1000], to).unwrap();
        }
        let mut queued = 0;
        loop {
            match batch.recv(b.as_raw_fd()) {
                Ok(n) => queued += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(queued < sent, "the buffer overflowed");
        // Datagrams queued before the drops do not know of them; the next
        // one does.
        a.send_to(b"after", to).unwrap();
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.kernel_drops(), Some((sent - queued) as u32));
    }

    #[test]
    fn equal_sizes_form_gso_runs_that_a_shorter_datagram_ends() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        for n in [1200, 1200, 1200, 500, 1200, 1200, 9000] {
            a.send_to(&vec![7u8; n], to).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut batch = RecvBatch::new();
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 7);
        let out: Vec<Outgoing> = (0..7)
            .map(|slot| Outgoing {
                slot,
                to: Some(to),
                from: None,
            })
            .collect();
        let mut sender = Sender::new();
        sender.plan(&batch, &out, Pos::default(), Gso::ON);
        assert_eq!(
            sizes_of(&sender.msgs),
            vec![(4, 4100, 1200), (2, 2400, 1200), (1, 9000, 0)],
            "a longer datagram starts a run of its own"
        );
        sender.plan(&batch, &out, Pos::default(), Gso::OFF);
        assert_eq!(sender.msgs.len(), 7, "one message a datagram without GSO");
        // A segment size the socket refused stops runs of that size.
        sender.plan(&batch, &out, Pos::default(), Gso(1199));
        assert_eq!(sender.msgs.len(), 7);
    }

    #[test]
    fn a_gro_train_goes_on_whole_or_datagram_by_datagram() {
        use nix::sys::socket::{setsockopt, sockopt};
        let (a, b) = pair();
        setsockopt(&a, sockopt::UdpGsoSegment, &1000).unwrap();
        setsockopt(&b, sockopt::UdpGroSegment, &true).unwrap();
        let (c, d) = pair();
        let mut train = vec![0u8; 4500];
        for (i, x) in train.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        a.send_to(&train, b.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut batch = RecvBatch::new();
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1, "one coalesced slot");
        assert_eq!(batch.segment(0), 1000);
        assert_eq!(batch.datagrams(0), 5);
        let out = [Outgoing {
            slot: 0,
            to: Some(d.local_addr().unwrap()),
            from: None,
        }];
        let mut sender = Sender::new();
        sender.plan(&batch, &out, Pos::default(), Gso::ON);
        assert_eq!(sizes_of(&sender.msgs), vec![(1, 4500, 1000)]);
        for gso in [Gso::ON, Gso::OFF] {
            let sent = sender.send(c.as_raw_fd(), &batch, &out, &mut { gso });
            assert_eq!(sent.datagrams, 5);
            assert_eq!(sent.bytes, 4500);
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut buf = [0u8; 2000];
            for i in 0..5 {
                let (n, _) = d.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], &train[i * 1000..((i + 1) * 1000).min(4500)]);
            }
        }
    }
}
