//! One direction of a proxied TCP connection: bytes from a source socket to
//! a destination socket. A direction starts by copying through the worker's
//! scratch buffer (`recv`/`send`: cheapest for small messages, and no
//! per-connection memory), and moves to a kernel pipe with `splice(2)` (zero
//! copy) once a read shows bulk data.
//!
//! Edge-triggered readiness: the caller keeps a [`Ready`] per socket, set by
//! events and cleared here when the socket has nothing more to give or take.
//! Two subtleties:
//! - A socket-to-pipe splice also says `EAGAIN` when the *pipe* is full, so
//!   that `EAGAIN` clears the source flag only when the pipe was empty.
//! - A `recv` that returns less than asked emptied the receive queue (TCP
//!   copies all it has queued), and bytes arriving later raise a new edge:
//!   the source is then known drained without the extra `recv` that would
//!   say `EAGAIN` (one syscall less per message, as nginx and haproxy do).
//!   The exception is a FIN or error that is already queued: it raises no
//!   new edge, so once an event reported one ([`Ready::closing`]) reads go
//!   on until EOF or the error. A FIN reported without an error
//!   ([`Ready::fin`]) is cheaper still: a short read reached it, so EOF is
//!   known without the `recv` that returns 0.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use socket2::SockRef;

use crate::pipe::{Pipe, PipePool};

/// Splice/copy rounds per wake-up before yielding to other connections.
const ROUNDS: usize = 16;

/// A read of at least this many bytes means bulk data: the direction moves
/// from copying to `splice` (haproxy's `splice-auto` idea: small messages
/// are cheaper through `recv`/`send`, bulk is cheaper without copies).
pub const SPLICE_THRESHOLD: usize = 16 * 1024;

#[derive(Debug)]
enum Channel {
    /// Copy through the worker's scratch buffer; only bytes a destination
    /// would not take stay with the connection (`spill`).
    Copy {
        spill: Vec<u8>,
        start: usize,
    },
    Splice(Pipe),
}

/// What the worker knows of one socket from edge-triggered events.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ready {
    /// Reading may give bytes, EOF or an error.
    pub read: bool,
    /// Writing may take bytes.
    pub write: bool,
    /// An event reported the peer's FIN, a hang-up or an error: read until
    /// EOF or the error instead of trusting a short read.
    pub closing: bool,
    /// An event reported the peer's FIN without an error. Every byte the
    /// peer sent is queued before its FIN, so a read shorter than asked
    /// drained them all: that is EOF, without the `recv` that returns 0.
    pub fin: bool,
}

/// What a worker lends a pump: its scratch buffer and pipe pool.
#[derive(Debug)]
pub struct Lent<'a> {
    pub scratch: &'a mut [u8],
    pub pipes: &'a mut PipePool,
    /// Whether bulk directions may move to `splice`.
    pub splice: bool,
}

/// Outcome of one pump.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the destination.
    pub written: u64,
    /// The round budget ran out with work left: pump again soon.
    pub more: bool,
}

#[derive(Debug)]
pub struct Half {
    chan: Channel,
    /// Bytes held in the pipe or buffer.
    pending: usize,
    /// Bytes to write before anything relayed (a PROXY header).
    prefix: Vec<u8>,
    prefix_sent: usize,
    /// The source said EOF.
    pub eof: bool,
    /// EOF was passed on (`shutdown(SHUT_WR)` on the destination).
    pub shut: bool,
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

fn fd(s: &TcpStream) -> BorrowedFd<'_> {
    s.as_fd()
}

impl Half {
    /// A half that starts by copying and moves to `splice` on bulk data.
    pub fn new() -> Half {
        Half {
            chan: Channel::Copy {
                spill: Vec::new(),
                start: 0,
            },
            pending: 0,
            prefix: Vec::new(),
            prefix_sent: 0,
            eof: false,
            shut: false,
        }
    }

    pub fn set_prefix(&mut self, bytes: Vec<u8>) {
        self.prefix = bytes;
        self.prefix_sent = 0;
    }

    /// Gives back the pipe, if empty, for reuse.
    pub fn recycle(self, pipes: &mut PipePool) {
        if let Channel::Splice(p) = self.chan {
            if self.pending == 0 {
                pipes.put(p);
            }
        }
    }

    /// Moves what it can from `src` to `dst`. Errors other than `EAGAIN`
    /// (reset, broken pipe) end the connection. `other_shut` says the
    /// opposite direction is finished: then this one's EOF means the
    /// connection closes at once, and `close` sends the FIN, so the
    /// `shutdown` call is skipped (one syscall less per connection).
    pub fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        src_ready: &mut Ready,
        dst_ready: &mut Ready,
        other_shut: bool,
        lent: &mut Lent<'_>,
    ) -> io::Result<Moved> {
        let mut moved = Moved::default();
        if !self.flush_prefix(dst, &mut dst_ready.write)? {
            return Ok(moved);
        }
        for _ in 0..ROUNDS {
            let progress = match self.chan {
                Channel::Copy { .. } => {
                    self.copy_round(src, dst, src_ready, dst_ready, lent, &mut moved)?
                }
                Channel::Splice(_) => self.splice_round(
                    src,
                    dst,
                    &mut src_ready.read,
                    &mut dst_ready.write,
                    &mut moved,
                )?,
            };
            if self.eof && self.pending == 0 && !self.shut {
                self.shut = true;
                if !other_shut {
                    // The peer may already be gone; the other half finds out.
                    let _ = dst.shutdown(Shutdown::Write);
                }
            }
            if !progress {
                return Ok(moved);
            }
        }
        moved.more = true;
        Ok(moved)
    }

    /// Writes the pending prefix; true when nothing of it is left.
    fn flush_prefix(&mut self, dst: &TcpStream, dst_ready: &mut bool) -> io::Result<bool> {
        while self.prefix_sent < self.prefix.len() {
            if !*dst_ready {
                return Ok(false);
            }
            match (&*dst).write(&self.prefix[self.prefix_sent..]) {
                Ok(n) => self.prefix_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *dst_ready = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.prefix.is_empty() {
            self.prefix = Vec::new();
        }
        Ok(true)
    }

    /// One splice round: socket → pipe, then pipe → socket.
    fn splice_round(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        src_ready: &mut bool,
        dst_ready: &mut bool,
        moved: &mut Moved,
    ) -> io::Result<bool> {
        let Channel::Splice(p) = &self.chan else {
            return Ok(false);
        };
        let mut progress = false;
        let room = p.capacity - self.pending;
        if *src_ready && !self.eof && room > 0 {
            match splice(fd(src), None, &p.write, None, room, flags()).map_err(errno) {
                Ok(0) => {
                    self.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.pending += n;
                    moved.read += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // EAGAIN with bytes in the pipe may mean a full pipe.
                    if self.pending == 0 {
                        *src_ready = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(e),
            }
        }
        if self.pending > 0 && *dst_ready {
            match splice(&p.read, None, fd(dst), None, self.pending, flags()).map_err(errno) {
                Ok(n) => {
                    self.pending -= n;
                    moved.written += n as u64;
                    progress |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *dst_ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// One copy round: flush what a destination refused earlier, else read
    /// into the scratch buffer and write it on at once.
    fn copy_round(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        src_ready: &mut Ready,
        dst_ready: &mut Ready,
        lent: &mut Lent<'_>,
        moved: &mut Moved,
    ) -> io::Result<bool> {
        let Channel::Copy { spill, start } = &mut self.chan else {
            return Ok(false);
        };
        let Ready {
            read: src_ready,
            closing: src_closing,
            fin: src_fin,
            ..
        } = src_ready;
        let dst_ready = &mut dst_ready.write;
        if self.pending > 0 {
            if !*dst_ready {
                return Ok(false);
            }
            return match (&*dst).write(&spill[*start..]) {
                Ok(n) => {
                    *start += n;
                    self.pending -= n;
                    moved.written += n as u64;
                    if self.pending == 0 {
                        // Don't keep a large spill for a connection that idles.
                        *spill = Vec::new();
                        *start = 0;
                    }
                    Ok(n > 0)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *dst_ready = false;
                    Ok(false)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(e) => Err(e),
            };
        }
        // Read only what the destination can take now (back-pressure).
        if !*src_ready || self.eof || !*dst_ready {
            return Ok(false);
        }
        let n = match (&*src).read(lent.scratch) {
            Ok(0) => {
                self.eof = true;
                return Ok(true);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *src_ready = false;
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        moved.read += n as u64;
        if n < lent.scratch.len() {
            if *src_fin {
                self.eof = true;
            } else if !*src_closing {
                // Drained: see the module comment.
                *src_ready = false;
            }
        }
        // The last bytes before EOF: hold them for the FIN that follows at
        // once (`shutdown`, or `close` when the other way is done), so the
        // kernel sends data and FIN in one segment instead of two.
        let last = self.eof;
        let mut off = 0;
        while off < n {
            match send(dst, &lent.scratch[off..n], last) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *dst_ready = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        moved.written += off as u64;
        if off < n {
            spill.extend_from_slice(&lent.scratch[off..n]);
            *start = 0;
            self.pending = n - off;
        } else if n >= SPLICE_THRESHOLD && lent.splice {
            // Bulk: move to splice (nothing is buffered, so order holds).
            // Without a pipe (limits reached) the direction keeps copying.
            if let Ok(p) = lent.pipes.get() {
                self.chan = Channel::Splice(p);
            }
        }
        Ok(true)
    }
}

impl Default for Half {
    fn default() -> Half {
        Half::new()
    }
}

/// `send(2)`; `more` sets `MSG_MORE` (corked until the next push, which
/// the FIN's `shutdown` or `close` makes).
fn send(dst: &TcpStream, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = if more {
        libc::MSG_NOSIGNAL | libc::MSG_MORE
    } else {
        libc::MSG_NOSIGNAL
    };
    SockRef::from(dst).send_with_flags(buf, flags)
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}
