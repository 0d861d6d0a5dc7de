//! Kernel pipes for `splice(2)`, pooled per worker so a connection does
//! not cost two `pipe2` + `fcntl` calls. A pipe goes back to the pool only
//! when empty; one that still holds bytes is closed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::pipe2;

#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Bytes the pipe can hold.
    pub capacity: usize,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Growing the pipe cuts syscalls per byte; failing to (the per-user
        // pipe page limit) still leaves a working 64 KiB pipe.
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size));
        let capacity = fcntl(write.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
            .map(|n| n as usize)
            .unwrap_or(65536);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    size: usize,
    keep: usize,
}

impl PipePool {
    pub fn new(size: usize, keep: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            size,
            keep,
        }
    }

    pub fn get(&mut self) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(p) => Ok(p),
            None => Pipe::new(self.size),
        }
    }

    /// Returns an *empty* pipe to the pool.
    pub fn put(&mut self, pipe: Pipe) {
        if self.free.len() < self.keep {
            self.free.push(pipe);
        }
    }
}
