//! Real peers for Siphon's tests: backends on loopback that say who they
//! are, traffic helpers, the root-test policy, temp dirs, child processes
//! and the workspace's binaries. No mocks: everything
//! here opens real sockets.

pub mod agent;
pub mod bird;
pub mod dataplane;
pub mod dir;
pub mod http;
pub mod netns;
pub mod pki;
pub mod postgres;
pub mod process;

pub use dir::TempDir;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A backend that greets each connection with `NAME\n`, then echoes every
/// byte until the client shuts down its side, then closes its own side.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    accept_loop: tokio::task::AbortHandle,
    _rt: Arc<tokio::runtime::Runtime>,
}

/// A non-blocking listening socket on `addr` with a backlog deep enough
/// for a test's bursts. The standard library listens with a backlog of
/// 128: a burst of hundreds of connects then overflows the SYN queue, the
/// kernel answers with SYN cookies, and a cookie's final ACK that meets a
/// full accept queue is dropped with no state left. The connecting side
/// (the proxy) believes it is connected and waits for a greeting the
/// backend never saw a connection for.
pub fn listen(addr: SocketAddr) -> TcpListener {
    let bind = || -> io::Result<TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    };
    bind().unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Polls `f` every 10 ms until it is true or `timeout` passes; the last
/// answer.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Shared runtime for a test's backends.
pub fn runtime() -> Arc<tokio::runtime::Runtime> {
    Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}")),
    )
}

impl Backend {
    /// Starts a greeting echo backend on `ip` (port chosen by the kernel).
    pub fn start(rt: &Arc<tokio::runtime::Runtime>, name: &str, ip: &str) -> Backend {
        let ip: std::net::IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        Backend::start_at(rt, name, SocketAddr::new(ip, 0))
    }

    /// Starts a greeting echo backend on `addr` (e.g. where a stopped one
    /// was).
    pub fn start_at(rt: &Arc<tokio::runtime::Runtime>, name: &str, addr: SocketAddr) -> Backend {
        let std_l = listen(addr);
        let addr = std_l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let (acc, act, greet) = (accepted.clone(), active.clone(), format!("{name}\n"));
        let accept_loop = rt.spawn(async move {
            let l = match tokio::net::TcpListener::from_std(std_l) {
                Ok(l) => l,
                Err(e) => panic!("listener: {e}"),
            };
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                act.fetch_add(1, Ordering::SeqCst);
                let (act, greet) = (act.clone(), greet.clone());
                tokio::spawn(async move {
                    let _ = echo(s, greet.as_bytes()).await;
                    act.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            name: name.to_owned(),
            addr,
            accepted,
            active,
            accept_loop: accept_loop.abort_handle(),
            _rt: rt.clone(),
        }
    }

    /// Closes the listening socket: new connections are refused (open ones
    /// go on). The accept loop owns the socket, so it is closed once the
    /// runtime has dropped the aborted task; this waits for that.
    pub fn stop(&self) {
        self.accept_loop.abort();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connections this backend accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

async fn echo(mut s: tokio::net::TcpStream, greeting: &[u8]) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(greeting).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await?;
    }
    s.shutdown().await
}

/// A port free for TCP and UDP on 127.0.0.1, for a proxy listener a test
/// binds right after. Chosen below the kernel's ephemeral range (32768 and
/// up by default), so no client socket of a concurrent test can take it in
/// between, and from a per-process cursor, so two tests of one process
/// never get the same one.
pub fn free_port() -> u16 {
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 20_000;
    let offset = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (FIRST + (offset + n) % SPAN) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

static NEXT_PORT: AtomicUsize = AtomicUsize::new(0);

/// Connects and reads the backend's greeting line; returns the stream and
/// the backend's name.
pub fn connect_greeting(addr: SocketAddr) -> io::Result<(TcpStream, String)> {
    connect_greeting_from(None, addr)
}

/// Like [`connect_greeting`], from a chosen local address (e.g. another
/// 127.0.0.0/8 address to vary the client IP).
pub fn connect_greeting_from(
    local: Option<SocketAddr>,
    addr: SocketAddr,
) -> io::Result<(TcpStream, String)> {
    let s = match local {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        Some(l) => {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            sock.bind(&l.into())?;
            sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&s).read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before greeting",
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => name.push(byte[0]),
        }
    }
    Ok((s, String::from_utf8_lossy(&name).into_owned()))
}

/// Sends `msg`, reads the echo, and checks it.
pub fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("echo differs"));
    }
    Ok(())
}

/// Reads one line (without the newline).
pub fn read_line(s: &TcpStream) -> io::Result<String> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// Deterministic pseudo-random bytes (xorshift64*), so a receiver can
/// check a stream byte for byte without keeping a copy. The stream is the
/// same however it is cut into `fill` calls.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Whether tests needing root may run. Without root they skip with a
/// printed reason, unless `SIPHON_REQUIRE_ROOT_TESTS=1` (set by CI), which
/// turns the skip into a failure so CI never passes by skipping.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip_or_fail(test, "needs root (run as root, or in CI)")
}

/// Skips `test` for `why` with a printed reason (`false`), unless
/// `SIPHON_REQUIRE_ROOT_TESTS=1` (CI), which makes it a failure.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if std::env::var("SIPHON_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and SIPHON_REQUIRE_ROOT_TESTS=1 forbids skipping it");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// Raises this process's open-files limit to its hard limit (tests open
/// thousands of sockets).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A UDP backend: answers a datagram `who` with its name and echoes every
/// other datagram unchanged; counts datagrams and the distinct peers
/// (flows, as the proxy opens one socket per flow) it heard from.
#[derive(Debug)]
pub struct UdpBackend {
    pub name: String,
    pub addr: SocketAddr,
    datagrams: Arc<AtomicUsize>,
    peers: Arc<std::sync::Mutex<std::collections::HashSet<SocketAddr>>>,
    _rt: Arc<tokio::runtime::Runtime>,
}

impl UdpBackend {
    pub fn start(rt: &Arc<tokio::runtime::Runtime>, name: &str, ip: &str) -> UdpBackend {
        let std_s = std::net::UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        UdpBackend::serve(rt, name, std_s)
    }

    /// Serves on a socket bound elsewhere (in a network namespace, say).
    pub fn serve(
        rt: &Arc<tokio::runtime::Runtime>,
        name: &str,
        std_s: std::net::UdpSocket,
    ) -> UdpBackend {
        // Bursts of a thousand datagrams must queue, not drop, as on a
        // tuned UDP server; the default buffer holds a few hundred.
        let _ = socket2::SockRef::from(&std_s).set_recv_buffer_size(4 << 20);
        let addr = std_s.local_addr().unwrap_or_else(|e| panic!("{e}"));
        std_s
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        let datagrams = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (count, seen, me) = (datagrams.clone(), peers.clone(), name.as_bytes().to_vec());
        rt.spawn(async move {
            let s = match tokio::net::UdpSocket::from_std(std_s) {
                Ok(s) => s,
                Err(e) => panic!("udp socket: {e}"),
            };
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut p) = seen.lock() {
                    p.insert(peer);
                }
                let reply = if &buf[..n] == b"who" {
                    &me[..]
                } else {
                    &buf[..n]
                };
                let _ = s.send_to(reply, peer).await;
            }
        });
        UdpBackend {
            name: name.to_owned(),
            addr,
            datagrams,
            peers,
            _rt: rt.clone(),
        }
    }

    /// Datagrams received so far.
    pub fn datagrams(&self) -> usize {
        self.datagrams.load(Ordering::SeqCst)
    }

    /// Distinct source addresses heard from so far.
    pub fn peers(&self) -> usize {
        self.peers.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// A UDP client socket on `local` (e.g. `127.0.0.1:0`), with a read timeout.
pub fn udp_client(local: &str) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind {local}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    s
}

/// Sends `msg` to `to` and waits for one datagram back.
pub fn udp_ask(s: &std::net::UdpSocket, to: SocketAddr, msg: &[u8]) -> io::Result<Vec<u8>> {
    s.send_to(msg, to)?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf)?;
    if from != to {
        return Err(io::Error::other(format!("answer from {from}, not {to}")));
    }
    buf.truncate(n);
    Ok(buf)
}

/// Asks `who` and returns the answering backend's name.
pub fn udp_who(s: &std::net::UdpSocket, to: SocketAddr) -> io::Result<String> {
    udp_ask(s, to, b"who").map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A UDP port free on loopback right now.
pub fn free_udp_port() -> u16 {
    free_port()
}
