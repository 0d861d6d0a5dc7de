//! Batched datagram I/O: `recvmmsg(2)` into one preallocated buffer, and
//! `sendmmsg(2)` straight out of it, so a burst of datagrams costs one
//! syscall each way and no allocation.
//!
//! Written against libc rather than nix's `recvmmsg`: nix keeps the headers
//! between calls without resetting `msg_namelen`/`msg_controllen`, which
//! the kernel shrinks on every receive, so reusing them across sockets of
//! both address families truncates addresses and control data. Here the
//! headers are rebuilt on the stack for every call and only plain bytes
//! live in the batch.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr;

use socket2::SockAddr;

/// Datagrams per syscall.
pub const SLOTS: usize = 32;
/// Bytes per datagram slot: the largest UDP payload (65,507 bytes over
/// IPv4, 65,527 over IPv6) fits, so nothing is ever truncated.
pub const SLOT: usize = 1 << 16;
/// Control bytes per datagram: one `in6_pktinfo` (`CMSG_SPACE(20)` = 40)
/// or `in_pktinfo` message, with room to spare.
const CTRL: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL]);

/// A receive buffer of [`SLOTS`] datagrams with their source addresses and
/// destination (`*_PKTINFO`) control data.
pub struct RecvBatch {
    buf: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    namelens: [libc::socklen_t; SLOTS],
    ctrl: Box<[Ctrl]>,
    ctrllens: [usize; SLOTS],
    lens: [usize; SLOTS],
    flags: [i32; SLOTS],
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
            ctrllens: [0; SLOTS],
            lens: [0; SLOTS],
            flags: [0; SLOTS],
        }
    }

    /// Receives up to [`SLOTS`] datagrams without blocking; returns how
    /// many. Fewer than `SLOTS` means the socket's queue is empty for now.
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
        for (i, h) in hdrs.iter().take(n).enumerate() {
            self.lens[i] = (h.msg_len as usize).min(SLOT);
            self.namelens[i] = h.msg_hdr.msg_namelen;
            self.ctrllens[i] = h.msg_hdr.msg_controllen.min(CTRL);
            self.flags[i] = h.msg_hdr.msg_flags;
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

    /// The local address datagram `i` was sent to, from its `IP_PKTINFO` /
    /// `IPV6_PKTINFO` control message (only sockets that asked get one).
    pub fn destination(&self, i: usize) -> Option<IpAddr> {
        let len = self.ctrllens[i];
        if len == 0 || self.flags[i] & libc::MSG_CTRUNC != 0 {
            return None;
        }
        // SAFETY: a msghdr describing only the control buffer the kernel
        // filled (`len` bytes); the CMSG_* macros stay inside it.
        unsafe {
            let mut m: libc::msghdr = zeroed();
            m.msg_control = self.ctrl[i].0.as_ptr().cast_mut().cast();
            m.msg_controllen = len;
            let mut c = libc::CMSG_FIRSTHDR(&m);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let info: libc::in_pktinfo = ptr::read_unaligned(data.cast());
                        let ip = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                        return Some(IpAddr::V4(ip));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let info: libc::in6_pktinfo = ptr::read_unaligned(data.cast());
                        return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&m, c);
            }
        }
        None
    }
}

/// One datagram to send: a slot of a [`RecvBatch`], where to (None on a
/// connected socket) and from which local address (None: the socket's).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing {
    pub slot: usize,
    pub to: Option<SocketAddr>,
    pub from: Option<IpAddr>,
}

/// What a [`send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams not sent: the socket buffer was full, or an error.
    pub dropped: u64,
    /// ICMP errors (port or host unreachable) reported on the socket.
    pub unreachable: u64,
}

/// Sends `out` (slots of `batch`) on `fd` with as few `sendmmsg` calls as
/// possible. UDP has no back-pressure to offer: what the socket does not
/// take now is dropped and counted, as a router would.
pub fn send(fd: RawFd, batch: &RecvBatch, out: &[Outgoing]) -> Sent {
    let mut sent = Sent::default();
    let mut i = 0;
    // An ICMP error queued on a connected socket fails the next send once;
    // the same datagram is tried again, but only once.
    let mut retried = usize::MAX;
    while i < out.len() {
        let chunk = &out[i..out.len().min(i + SLOTS)];
        match send_chunk(fd, batch, chunk) {
            Ok(k) => {
                let k = k.min(chunk.len());
                for o in &chunk[..k] {
                    sent.datagrams += 1;
                    sent.bytes += batch.lens[o.slot] as u64;
                }
                i += k.max(1);
                if k == 0 {
                    sent.dropped += 1;
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
                    if retried != i =>
                {
                    sent.unreachable += 1;
                    retried = i;
                }
                Some(libc::EAGAIN | libc::ENOBUFS) => {
                    sent.dropped += (out.len() - i) as u64;
                    break;
                }
                _ => {
                    tracing::trace!(error = %e, "datagram not sent");
                    sent.dropped += 1;
                    i += 1;
                }
            },
        }
    }
    sent
}

fn send_chunk(fd: RawFd, batch: &RecvBatch, chunk: &[Outgoing]) -> io::Result<usize> {
    // SAFETY: plain data; every used field is set below.
    let mut hdrs: [libc::mmsghdr; SLOTS] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; SLOTS] = unsafe { zeroed() };
    let mut names: [Option<SockAddr>; SLOTS] = std::array::from_fn(|_| None);
    let mut ctrls = [Ctrl([0; CTRL]); SLOTS];
    for (((o, h), iov), (name, ctrl)) in chunk
        .iter()
        .zip(hdrs.iter_mut())
        .zip(iovs.iter_mut())
        .zip(names.iter_mut().zip(ctrls.iter_mut()))
    {
        let data = batch.data(o.slot);
        iov.iov_base = data.as_ptr().cast_mut().cast();
        iov.iov_len = data.len();
        let m = &mut h.msg_hdr;
        m.msg_iov = iov;
        m.msg_iovlen = 1;
        if let Some(to) = o.to {
            let a = name.insert(SockAddr::from(to));
            m.msg_name = a.as_ptr().cast_mut().cast();
            m.msg_namelen = a.len();
        }
        if let Some(from) = o.from {
            m.msg_control = ctrl.0.as_mut_ptr().cast();
            m.msg_controllen = CTRL;
            // SAFETY: the control buffer is CTRL bytes, more than
            // CMSG_SPACE of either pktinfo; CMSG_FIRSTHDR stays inside it.
            m.msg_controllen = unsafe { write_pktinfo(m, from) };
        }
    }
    // SAFETY: the kernel only reads the buffers the headers point at
    // (`batch`'s slots, and this frame's names and control data).
    let n = unsafe {
        libc::sendmmsg(
            fd,
            hdrs.as_mut_ptr(),
            chunk.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Writes a `*_PKTINFO` control message naming the source address; returns
/// the control length to use.
///
/// # Safety
/// `m.msg_control` must point at `m.msg_controllen` writable bytes, at least
/// `CMSG_SPACE(size_of::<in6_pktinfo>())`.
unsafe fn write_pktinfo(m: &mut libc::msghdr, from: IpAddr) -> usize {
    // SAFETY: the caller guarantees the control buffer; CMSG_FIRSTHDR
    // returns null when it is too small for a header, checked below.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(m);
        if c.is_null() {
            return 0;
        }
        match from {
            IpAddr::V4(ip) => {
                let mut info: libc::in_pktinfo = zeroed();
                info.ipi_spec_dst.s_addr = u32::from(ip).to_be();
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize
            }
            IpAddr::V6(ip) => {
                let mut info: libc::in6_pktinfo = zeroed();
                info.ipi6_addr.s6_addr = ip.octets();
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
            }
        }
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
        let sent = send(b.as_raw_fd(), &batch, &out);
        assert_eq!(sent.datagrams, SLOTS as u64);
        assert_eq!(sent.bytes, 100 * SLOTS as u64);
        let mut buf = [0u8; 200];
        let (len, _) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], &[0u8; 100][..]);
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 40 - SLOTS);
    }
}
