//! One direction of a proxied TCP connection: bytes from a source socket to
//! a destination socket, through a kernel pipe with `splice(2)` (zero copy)
//! or, where no pipe could be had, through a reused user-space buffer.
//!
//! Edge-triggered readiness: the caller keeps a "ready" flag per socket
//! side, set by events and cleared here only on `EAGAIN`. One subtlety: a
//! socket-to-pipe splice also says `EAGAIN` when the *pipe* is full, so
//! that `EAGAIN` clears the source flag only when the pipe was empty.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};

use crate::pipe::{Pipe, PipePool};

/// Splice/copy rounds per wake-up before yielding to other connections.
const ROUNDS: usize = 16;

#[derive(Debug)]
enum Channel {
    Splice(Pipe),
    Copy { buf: Box<[u8]>, start: usize },
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
    /// A half that splices through `pipe`.
    pub fn splice(pipe: Pipe) -> Half {
        Half::with(Channel::Splice(pipe))
    }

    /// A half that copies through `buf`.
    pub fn copy(buf: Box<[u8]>) -> Half {
        Half::with(Channel::Copy { buf, start: 0 })
    }

    fn with(chan: Channel) -> Half {
        Half {
            chan,
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

    pub fn is_splice(&self) -> bool {
        matches!(self.chan, Channel::Splice(_))
    }

    /// Gives back the pipe (if empty) or buffer for reuse.
    pub fn recycle(self, pipes: &mut PipePool, bufs: &mut Vec<Box<[u8]>>) {
        match self.chan {
            Channel::Splice(p) if self.pending == 0 => pipes.put(p),
            Channel::Splice(_) => {}
            Channel::Copy { buf, .. } => {
                if bufs.len() < 64 {
                    bufs.push(buf)
                }
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
        src_ready: &mut bool,
        dst_ready: &mut bool,
        other_shut: bool,
    ) -> io::Result<Moved> {
        let mut moved = Moved::default();
        if !self.flush_prefix(dst, dst_ready)? {
            return Ok(moved);
        }
        for _ in 0..ROUNDS {
            let mut progress = false;
            let room = self.capacity() - self.pending;
            if *src_ready && !self.eof && room > 0 {
                match self.fill(src, room) {
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
                        if self.pending == 0 {
                            *src_ready = false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(e),
                }
            }
            if self.pending > 0 && *dst_ready {
                match self.drain(dst) {
                    Ok(n) => {
                        self.pending -= n;
                        moved.written += n as u64;
                        progress = n > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => *dst_ready = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(e),
                }
            }
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

    fn capacity(&self) -> usize {
        match &self.chan {
            Channel::Splice(p) => p.capacity,
            Channel::Copy { buf, .. } => buf.len(),
        }
    }

    fn fill(&mut self, src: &TcpStream, room: usize) -> io::Result<usize> {
        match &mut self.chan {
            Channel::Splice(p) => {
                splice(fd(src), None, &p.write, None, room, flags()).map_err(errno)
            }
            Channel::Copy { buf, start } => {
                if self.pending == 0 {
                    *start = 0;
                }
                let end = *start + self.pending;
                if end == buf.len() {
                    // Full at the tail: compact (rare; only after partial writes).
                    buf.copy_within(*start..end, 0);
                    *start = 0;
                }
                let end = *start + self.pending;
                (&*src).read(&mut buf[end..])
            }
        }
    }

    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        match &mut self.chan {
            Channel::Splice(p) => {
                splice(&p.read, None, fd(dst), None, self.pending, flags()).map_err(errno)
            }
            Channel::Copy { buf, start } => {
                let n = (&*dst).write(&buf[*start..*start + self.pending])?;
                *start += n;
                Ok(n)
            }
        }
    }
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}
