//! A worker: one thread, one `mio::Poll`, its own `SO_REUSEPORT` socket per
//! listener address, its connections, timer wheel, pipe pool and counters.
//! Shared nothing on the forwarding path; the control thread talks to it
//! through a channel plus a `Waker`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::balance::FlowKey;
use crate::config::{LbAlgorithm, PoolProtocol};
use crate::health::{ConnectFailure, Ejector};
use crate::live::LivePools;
use crate::mailbox::{Bound, Command, Update};
use crate::pipe::PipePool;
use crate::proxy_protocol;
use crate::relay::{Half, Lent, Ready};
use crate::snapshot::{ListenerRt, PoolRt, Snapshot};
use crate::spread::{self, Spread};
use crate::stats::{MemberStats, LATENCY_BOUNDS_US, SESSION_BOUNDS_US};
use crate::timer::{Expired, TimerWheel};
use crate::udp::{self, UdpPlane};

pub const WAKER: Token = Token(usize::MAX);
/// Listener tokens have this bit set; connection tokens are `key * 2 + side`.
const LISTENER_BIT: usize = 1 << (usize::BITS - 2);
/// UDP tokens (listener sockets also carry `LISTENER_BIT`) and UDP timer
/// keys have this bit set; the UDP side owns them.
const UDP_BIT: usize = 1 << (usize::BITS - 3);
const CLIENT: usize = 0;
const MEMBER: usize = 1;
/// Connections accepted per listener wake-up before serving others.
const ACCEPT_BATCH: usize = 64;
/// Longest pause of accepting after the process ran out of file
/// descriptors, memory or local ports; a connection of this worker closing
/// (a descriptor freed) ends it sooner.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The worker's one copy buffer, lent to whichever connection is pumped.
const SCRATCH: usize = 64 * 1024;

/// How a worker forwards.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub splice: bool,
    pub pipe_size: usize,
    pub udp_offload: bool,
    /// Where connect failures in a row are reported (passive ejection).
    pub ejector: Ejector,
}

#[derive(Debug)]
struct ListenSock {
    addr: SocketAddr,
    sock: TcpListener,
    /// Accepting paused after running out of descriptors or memory.
    paused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Established,
}

#[derive(Debug)]
struct Upstream {
    stream: TcpStream,
    stats: Arc<MemberStats>,
}

#[derive(Debug)]
struct Conn {
    listener: Arc<ListenerRt>,
    pool: Arc<PoolRt>,
    client: TcpStream,
    peer: SocketAddr,
    member: Option<Upstream>,
    phase: Phase,
    tried: Vec<u16>,
    c2m: Half,
    m2c: Half,
    client_io: Ready,
    member_io: Ready,
    /// For the session-duration histogram.
    accepted: Instant,
    last_client: Instant,
    /// While connecting: when the current attempt started.
    last_member: Instant,
    connect_deadline: Option<Instant>,
    /// Tick of this connection's one live timer entry.
    timer: u64,
}

pub struct Worker {
    id: usize,
    poll: Poll,
    rx: Receiver<Command>,
    snapshot: Arc<Snapshot>,
    listeners: Slab<ListenSock>,
    by_addr: HashMap<SocketAddr, usize>,
    conns: Slab<Conn>,
    timers: TimerWheel,
    pipes: PipePool,
    scratch: Box<[u8]>,
    live: LivePools,
    opts: WorkerOptions,
    again: Vec<usize>,
    accept_again: Vec<usize>,
    /// Spare list swapped with `again`/`accept_again` so neither loses its
    /// capacity each loop iteration.
    spare: Vec<usize>,
    /// Listeners with accepting paused, and until when: the rare case is
    /// kept apart so the loop never scans every listener.
    paused: Vec<(Instant, usize)>,
    /// A connection closed since accepting was paused: descriptors may be
    /// free again.
    freed: bool,
    /// When a local shortage was last logged (at most one line a second).
    shortage_logged: Option<Instant>,
    udp: UdpPlane,
    drain: Option<Instant>,
    spread: Arc<Spread>,
    now: Instant,
}

/// The worker's parts the UDP side borrows for one call.
macro_rules! udp_ctx {
    ($w:expr) => {
        udp::Ctx {
            registry: $w.poll.registry(),
            timers: &mut $w.timers,
            snapshot: &$w.snapshot,
            live: &mut $w.live,
            now: $w.now,
        }
    };
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Worker {
    pub fn new(
        id: usize,
        workers: usize,
        rx: Receiver<Command>,
        opts: WorkerOptions,
        spread: Arc<Spread>,
    ) -> io::Result<(Worker, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let now = Instant::now();
        let udp_offload = opts.udp_offload;
        Ok((
            Worker {
                id,
                poll,
                rx,
                snapshot: Arc::new(Snapshot::empty()),
                listeners: Slab::new(),
                by_addr: HashMap::new(),
                conns: Slab::with_capacity(1024),
                timers: TimerWheel::new(now),
                pipes: PipePool::new(opts.pipe_size, 256),
                scratch: vec![0u8; SCRATCH].into_boxed_slice(),
                live: LivePools::default(),
                opts,
                again: Vec::new(),
                accept_again: Vec::new(),
                spare: Vec::new(),
                paused: Vec::new(),
                freed: false,
                shortage_logged: None,
                udp: UdpPlane::new(
                    id,
                    workers,
                    udp_offload,
                    udp::Tokens {
                        udp: UDP_BIT,
                        listener: LISTENER_BIT,
                    },
                ),
                drain: None,
                spread,
                now,
            },
            waker,
        ))
    }

    /// The event loop; returns when drained or when the control side is gone.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut expired = Vec::new();
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.id, error = %e, "poll failed; worker stops");
                    return;
                }
            }
            self.now = Instant::now();
            for ev in events.iter() {
                let t = ev.token().0;
                if ev.token() == WAKER {
                    if !self.commands() {
                        return;
                    }
                } else if t & UDP_BIT != 0 {
                    self.udp.event(t, &mut udp_ctx!(self));
                } else if t & LISTENER_BIT != 0 {
                    self.accept(t & !LISTENER_BIT);
                } else {
                    let key = t >> 1;
                    let hup = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
                    if let Some(c) = self.conns.get_mut(key) {
                        let io = if t & 1 == CLIENT {
                            &mut c.client_io
                        } else {
                            &mut c.member_io
                        };
                        io.read |= ev.is_readable() || hup;
                        io.write |= ev.is_writable() || hup;
                        io.closing |= hup;
                        io.fin |= ev.is_read_closed() && !ev.is_error();
                    }
                    self.service(key, t & 1);
                }
            }
            let mut batch = std::mem::replace(&mut self.again, std::mem::take(&mut self.spare));
            for key in batch.drain(..) {
                self.service(key, CLIENT);
            }
            let mut lbatch = std::mem::replace(&mut self.accept_again, batch);
            for l in lbatch.drain(..) {
                self.accept(l);
            }
            self.spare = lbatch;
            if self.udp.has_work() {
                self.udp.run_again(&mut udp_ctx!(self));
            }
            self.resume_paused_accepts();
            self.timers.expire(self.now, &mut expired);
            for e in expired.drain(..) {
                self.on_timer(e);
            }
            self.spread.publish(
                self.id,
                if self.drain.is_some() {
                    spread::CLOSED
                } else {
                    self.conns.len()
                },
            );
            if let Some(deadline) = self.drain {
                if self.conns.is_empty() {
                    return;
                }
                if self.now >= deadline {
                    tracing::info!(
                        worker = self.id,
                        open = self.conns.len(),
                        "drain timeout: closing remaining connections"
                    );
                    // A reset, not a FIN: a transfer cut short must not
                    // look complete to either side.
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for k in keys {
                        if let Some(c) = self.conns.get(k) {
                            refuse(&c.client);
                            if let Some(up) = &c.member {
                                refuse(&up.stream);
                            }
                        }
                        self.close(k);
                    }
                    return;
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() || !self.accept_again.is_empty() || self.udp.has_work() {
            return Some(Duration::ZERO);
        }
        let mut t = self.timers.next_timeout(self.now);
        if let Some(until) = self.paused.iter().map(|(t, _)| *t).min() {
            let wait = until.saturating_duration_since(self.now);
            t = Some(t.map_or(wait, |t| t.min(wait)));
        }
        if self.drain.is_some() {
            t = Some(t.map_or(Duration::from_millis(50), |t| {
                t.min(Duration::from_millis(50))
            }));
        }
        t
    }

    /// Handles control commands; false when the control side is gone.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Apply(u)) => self.apply(u),
                Ok(Command::Balancer { pool, balancer }) => self.live.set_balancer(&pool, balancer),
                Ok(Command::Quiesce { ack }) => {
                    for (_, l) in self.listeners.iter() {
                        if let Err(e) = drop_syns(&l.sock) {
                            tracing::warn!(worker = self.id, addr = %l.addr, error = %e, "cannot make the listener drop new connection attempts: they are refused when it closes");
                        }
                    }
                    let _ = ack.send(self.id);
                }
                Ok(Command::Drain { deadline }) => {
                    let keys: Vec<usize> = self.listeners.iter().map(|(k, _)| k).collect();
                    for k in keys {
                        self.unlisten(k);
                    }
                    self.udp.close_all(self.poll.registry());
                    // A second drain (SIGTERM again) only ever shortens it.
                    self.drain = Some(self.drain.map_or(deadline, |d| d.min(deadline)));
                    self.spread.publish(self.id, spread::CLOSED);
                }
                Ok(Command::Adopt {
                    listener,
                    client,
                    peer,
                }) => self.admit(listener, client, peer),
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    // Control is gone without a drain: finish what we have.
                    if self.drain.is_none() {
                        self.drain = Some(self.now + Duration::from_secs(30));
                    }
                    return true;
                }
            }
        }
    }

    fn apply(&mut self, u: Update) {
        let mut udp_remove = Vec::new();
        for e in &u.remove {
            if e.udp {
                udp_remove.push(e.addr);
            } else if let Some(k) = self.by_addr.get(&e.addr).copied() {
                self.unlisten(k);
            }
        }
        let mut udp_add = Vec::new();
        for (addr, bound) in u.add {
            let std_sock = match bound {
                Bound::Tcp(s) => s,
                Bound::Udp(s) => {
                    udp_add.push((addr, s));
                    continue;
                }
            };
            let mut sock = TcpListener::from_std(std_sock);
            let entry = self.listeners.vacant_entry();
            let key = entry.key();
            match self.poll.registry().register(
                &mut sock,
                Token(key | LISTENER_BIT),
                Interest::READABLE,
            ) {
                Ok(()) => {
                    entry.insert(ListenSock {
                        addr,
                        sock,
                        paused: false,
                    });
                    self.by_addr.insert(addr, key);
                    // Connections may have queued before registration.
                    self.accept_again.push(key);
                }
                Err(e) => {
                    tracing::error!(worker = self.id, %addr, error = %e, "cannot register listener")
                }
            }
        }
        self.live.reset(&u.snapshot);
        self.snapshot = u.snapshot;
        self.udp.apply(udp_add, &udp_remove, &mut udp_ctx!(self));
        let _ = u.ack.send(self.id);
    }

    fn unlisten(&mut self, key: usize) {
        if self.listeners.contains(key) {
            let mut l = self.listeners.remove(key);
            let _ = self.poll.registry().deregister(&mut l.sock);
            self.by_addr.remove(&l.addr);
        }
    }

    fn resume_paused_accepts(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let now = self.now;
        let freed = std::mem::take(&mut self.freed);
        let mut due = Vec::new();
        self.paused.retain(|&(until, k)| {
            let resume = freed || now >= until;
            if resume {
                due.push(k);
            }
            !resume
        });
        for k in due {
            if let Some(l) = self.listeners.get_mut(k) {
                l.paused = false;
                self.accept(k);
            }
        }
    }

    fn accept(&mut self, lkey: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = self.listeners.get_mut(lkey) else {
                return;
            };
            if l.paused {
                return;
            }
            let addr = l.addr;
            match l.sock.accept() {
                Ok((stream, peer)) => self.on_accept(addr, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if local_shortage(&e) => {
                    // Spinning on EMFILE would burn the core; the pending
                    // connections wait in the backlog meanwhile.
                    self.log_shortage(&e);
                    if let Some(l) = self.snapshot.tcp_by_addr.get(&addr) {
                        l.stats.worker(self.id).accept_pauses.add(1);
                    }
                    self.pause_accepting();
                    return;
                }
                Err(e) => {
                    tracing::debug!(worker = self.id, %addr, error = %e, "accept error");
                }
            }
        }
        self.accept_again.push(lkey);
    }

    /// Stops accepting on every listener of this worker until a connection
    /// closes or `ACCEPT_BACKOFF` passes: with no descriptor (or memory)
    /// to spare, new clients wait in the kernel's backlog instead of being
    /// accepted only to be dropped.
    fn pause_accepting(&mut self) {
        let until = self.now + ACCEPT_BACKOFF;
        self.freed = false;
        for (k, l) in self.listeners.iter_mut() {
            if !l.paused {
                l.paused = true;
                self.paused.push((until, k));
            }
        }
    }

    /// The proxy itself ran short (descriptors, memory, local ports) while
    /// taking connection `key` in: the client is refused with a reset, no
    /// member is blamed, and accepting pauses.
    fn refuse_for_shortage(&mut self, key: usize, e: &io::Error) {
        self.log_shortage(e);
        if let Some(c) = self.conns.get(key) {
            c.listener.stats.worker(self.id).local_errors.add(1);
            refuse(&c.client);
        }
        self.close(key);
        self.pause_accepting();
    }

    /// At most one line a second: a shortage repeats at every resume.
    fn log_shortage(&mut self, e: &io::Error) {
        let quiet = self
            .shortage_logged
            .is_some_and(|t| self.now.saturating_duration_since(t) < Duration::from_secs(1));
        if !quiet {
            self.shortage_logged = Some(self.now);
            tracing::warn!(
                worker = self.id,
                error = %e,
                "out of local resources: accepting paused (see local_errors, accept_pauses)"
            );
        }
    }

    fn on_accept(&mut self, local: SocketAddr, client: TcpStream, peer: SocketAddr) {
        let Some(listener) = self.snapshot.tcp_by_addr.get(&local).cloned() else {
            return;
        };
        if !listener.admits(peer.ip()) {
            listener.stats.worker(self.id).refused_acl.add(1);
            refuse(&client);
            return;
        }
        if let Some(to) = self.spread.target(self.id, self.conns.len()) {
            match self.spread.hand(
                to,
                Command::Adopt {
                    listener,
                    client,
                    peer,
                },
            ) {
                Ok(()) => return,
                Err(Command::Adopt {
                    listener,
                    client,
                    peer,
                }) => return self.admit(listener, client, peer),
                Err(_) => return,
            }
        }
        self.admit(listener, client, peer);
    }

    /// Takes a connection in: the limit, then a member.
    fn admit(&mut self, listener: Arc<ListenerRt>, client: TcpStream, peer: SocketAddr) {
        let counters = listener.stats.worker(self.id);
        let active = &listener.stats.active;
        let before = active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if listener.connection_limit.is_some_and(|lim| before >= lim) {
            active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            counters.refused_limit.add(1);
            refuse(&client);
            return;
        }
        counters.total_connections.add(1);
        let Some(pool) = listener.pool.clone() else {
            active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            counters.no_member.add(1);
            refuse(&client);
            return;
        };
        // TCP_NODELAY comes from the listening socket (accepted sockets
        // inherit it): one setsockopt less per connection.
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = Conn {
            listener,
            pool,
            client,
            peer,
            member: None,
            phase: Phase::Connecting,
            tried: Vec::new(),
            c2m: Half::new(),
            m2c: Half::new(),
            // Data may already wait; reading will tell.
            client_io: Ready {
                read: true,
                write: true,
                closing: false,
                fin: false,
            },
            member_io: Ready::default(),
            accepted: self.now,
            last_client: self.now,
            last_member: self.now,
            connect_deadline: None,
            timer: 0,
        };
        if let Err(e) = self.poll.registry().register(
            &mut conn.client,
            Token(key << 1 | CLIENT),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            // epoll could not take it (memory, max_user_watches): ours.
            tracing::warn!(worker = self.id, error = %e, "cannot register client");
            conn.listener.stats.worker(self.id).local_errors.add(1);
            refuse(&conn.client);
            conn.listener
                .stats
                .active
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.pause_accepting();
            return;
        }
        entry.insert(conn);
        self.connect_next(key);
    }

    /// Starts a connect to the next member, or closes the client when no
    /// member (or no retry) is left.
    fn connect_next(&mut self, key: usize) {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            if c.tried.len() > c.listener.connect_retries as usize {
                c.listener.stats.worker(self.id).no_member.add(1);
                refuse(&c.client);
                self.close(key);
                return;
            }
            let pool = c.pool.clone();
            let dst = if needs_local(&pool) {
                c.client.local_addr().unwrap_or(c.peer)
            } else {
                c.peer
            };
            let flow = FlowKey { src: c.peer, dst };
            let choice = self.live.choose(&pool, &flow, &c.tried);
            let Some(index) = choice else {
                c.listener.stats.worker(self.id).no_member.add(1);
                refuse(&c.client);
                self.close(key);
                return;
            };
            c.tried.push(index);
            let member = &pool.members[usize::from(index)];
            match connect(member.addr) {
                Ok(mut stream) => {
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(key << 1 | MEMBER),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        self.refuse_for_shortage(key, &e);
                        return;
                    }
                    c.member = Some(Upstream {
                        stream,
                        stats: member.stats.clone(),
                    });
                    c.phase = Phase::Connecting;
                    c.member_io = Ready::default();
                    c.last_member = self.now;
                    c.connect_deadline = c.listener.timeout_member_connect.map(|t| self.now + t);
                    self.timers.cancel(c.timer, key);
                    c.timer = 0;
                    if let Some(d) = c.connect_deadline {
                        c.timer = self.timers.schedule(d, key);
                    }
                    return;
                }
                Err(e) if local_shortage(&e) => {
                    // Try no other member: they would fail alike.
                    self.refuse_for_shortage(key, &e);
                    return;
                }
                Err(e) => {
                    tracing::debug!(member = %member.addr, error = %e, "connect failed");
                    self.opts
                        .ejector
                        .failed(&member.stats, self.id, ConnectFailure::Refused);
                }
            }
        }
    }

    fn service(&mut self, key: usize, side: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        match c.phase {
            Phase::Connecting if side == MEMBER => self.check_connect(key),
            Phase::Connecting => {}
            Phase::Established => self.pump(key),
        }
    }

    fn check_connect(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(up) = c.member.as_ref() else {
            return;
        };
        // On Linux a connecting socket turns writable only once the connect
        // finished; a readable-only wake-up (no writable yet) waits for the
        // next event. A failed connect also raises EPOLLERR/EPOLLHUP
        // (`closing`), so a clean writable event means connected and only
        // a closing one needs SO_ERROR (one syscall less per connection).
        if !c.member_io.write {
            return;
        }
        if c.member_io.closing {
            match up.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) if local_shortage(&e) => {
                    self.refuse_for_shortage(key, &e);
                    return;
                }
                Ok(Some(_)) | Err(_) => {
                    self.connect_failed(key, ConnectFailure::Refused);
                    return;
                }
            }
        }
        c.phase = Phase::Established;
        c.connect_deadline = None;
        Ejector::connected(&up.stats);
        let w = up.stats.worker(self.id);
        w.active_connections.add(1);
        w.total_connections.add(1);
        w.connect_time.observe(
            LATENCY_BOUNDS_US,
            self.now.saturating_duration_since(c.last_member),
        );
        let header = match c.pool.protocol {
            PoolProtocol::Proxy | PoolProtocol::ProxyV2 => {
                let local = c.client.local_addr().unwrap_or(c.peer);
                Some(if c.pool.protocol == PoolProtocol::Proxy {
                    proxy_protocol::v1(c.peer, local)
                } else {
                    proxy_protocol::v2(c.peer, local)
                })
            }
            _ => None,
        };
        if let Some(h) = header {
            c.c2m.set_prefix(h);
        }
        c.last_client = self.now;
        c.last_member = self.now;
        self.schedule_idle(key);
        self.pump(key);
    }

    fn connect_failed(&mut self, key: usize, why: ConnectFailure) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(mut up) = c.member.take() {
            self.opts.ejector.failed(&up.stats, self.id, why);
            let _ = self.poll.registry().deregister(&mut up.stream);
        }
        self.connect_next(key);
    }

    fn pump(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(up) = c.member.as_ref() else {
            return;
        };
        let lc = c.listener.stats.worker(self.id);
        let mc = up.stats.worker(self.id);
        let mut lent = Lent {
            scratch: &mut self.scratch,
            pipes: &mut self.pipes,
            splice: self.opts.splice,
        };
        let m2c_shut = c.m2c.shut;
        let res = c
            .c2m
            .pump(
                &c.client,
                &up.stream,
                &mut c.client_io,
                &mut c.member_io,
                m2c_shut,
                &mut lent,
            )
            .and_then(|a| {
                let c2m_shut = c.c2m.shut;
                c.m2c
                    .pump(
                        &up.stream,
                        &c.client,
                        &mut c.member_io,
                        &mut c.client_io,
                        c2m_shut,
                        &mut lent,
                    )
                    .map(|b| (a, b))
            });
        match res {
            Ok((up_dir, down_dir)) => {
                lc.bytes_in.add(up_dir.read);
                mc.bytes_out.add(up_dir.written);
                mc.bytes_in.add(down_dir.read);
                lc.bytes_out.add(down_dir.written);
                if up_dir.read > 0 || down_dir.written > 0 {
                    c.last_client = self.now;
                }
                if up_dir.written > 0 || down_dir.read > 0 {
                    c.last_member = self.now;
                }
                if c.c2m.shut && c.m2c.shut {
                    self.close(key);
                } else if up_dir.more || down_dir.more {
                    self.again.push(key);
                }
            }
            Err(e) => {
                tracing::trace!(error = %e, "connection ended by error");
                self.close(key);
            }
        }
    }

    /// Schedules the connection's next idle check.
    fn schedule_idle(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        self.timers.cancel(c.timer, key);
        c.timer = 0;
        if let Some(at) = idle_deadline(c) {
            c.timer = self.timers.schedule(at, key);
        }
    }

    fn on_timer(&mut self, e: Expired) {
        if e.key & UDP_BIT != 0 {
            self.udp.on_timer(e.key, e.tick, &mut udp_ctx!(self));
            return;
        }
        let Some(c) = self.conns.get_mut(e.key) else {
            return;
        };
        if c.timer != e.tick {
            return; // superseded entry
        }
        match c.phase {
            Phase::Connecting => match c.connect_deadline {
                Some(d) if self.now >= d => {
                    tracing::debug!(peer = %c.peer, "member connect timed out");
                    self.connect_failed(e.key, ConnectFailure::TimedOut);
                }
                Some(d) => c.timer = self.timers.schedule(d, e.key),
                None => {}
            },
            Phase::Established => match idle_deadline(c) {
                Some(at) if self.now >= at => {
                    c.listener.stats.worker(self.id).timeouts.add(1);
                    self.close(e.key);
                }
                Some(at) => c.timer = self.timers.schedule(at, e.key),
                None => {}
            },
        }
    }

    fn close(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let c = self.conns.remove(key);
        self.timers.cancel(c.timer, key);
        self.freed = true;
        c.listener
            .stats
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(up) = &c.member {
            if c.phase == Phase::Established {
                up.stats.worker(self.id).active_connections.sub(1);
                c.listener.stats.worker(self.id).sessions.observe(
                    SESSION_BOUNDS_US,
                    self.now.saturating_duration_since(c.accepted),
                );
            }
        }
        // Dropping the streams closes them (and removes them from epoll).
        c.c2m.recycle(&mut self.pipes);
        c.m2c.recycle(&mut self.pipes);
    }
}

/// When an established connection next times out for inactivity: a side is
/// active while bytes are read from or written to it.
fn idle_deadline(c: &Conn) -> Option<Instant> {
    let a = c.listener.timeout_client_data.map(|t| c.last_client + t);
    let b = c.listener.timeout_member_data.map(|t| c.last_member + t);
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether the flow's local address feeds the choice or the PROXY header.
fn needs_local(pool: &PoolRt) -> bool {
    pool.algorithm() == LbAlgorithm::Maglev
}

/// Has the kernel drop new connection attempts to `listener` (a socket
/// filter): a SYN is dropped silently, not answered with a reset as once
/// the listener is closed, so the client sends it again (after 1 s, 3 s,
/// ...), by which time the routers have sent the VIP elsewhere. Every
/// other packet passes: a handshake under way completes and is accepted.
fn drop_syns(listener: &TcpListener) -> io::Result<()> {
    use libc::{
        sock_filter, BPF_ABS, BPF_ALU, BPF_AND, BPF_B, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET,
    };
    const fn op(code: u32, jt: u8, jf: u8, k: u32) -> sock_filter {
        sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    // A TCP socket's filter sees the packet from the TCP header on: byte
    // 13 holds the flags. SYN without ACK: drop (keep 0 bytes); anything
    // else: keep it whole.
    const SYN_ONLY: [sock_filter; 5] = [
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 13),
        op(BPF_ALU | BPF_AND | BPF_K, 0, 0, 0x12),
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0x02),
        op(BPF_RET | BPF_K, 0, 0, 0),
        op(BPF_RET | BPF_K, 0, 0, u32::MAX),
    ];
    SockRef::from(listener).attach_filter(&SYN_ONLY)
}

/// Makes the coming close a reset (`SO_LINGER` 0), so the peer sees a
/// clear refusal or a cut rather than a connection that ended cleanly.
fn refuse(client: &TcpStream) {
    let _ = SockRef::from(client).set_linger(Some(Duration::ZERO));
}

/// Errors that say this process or host ran short, not that a peer
/// failed: descriptors, memory, buffers, local ports (`EADDRNOTAVAIL` on
/// connect), epoll watches (`ENOSPC`).
pub(crate) fn local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::ENOSPC
        )
    )
}

/// A non-blocking connect with `TCP_NODELAY`; `EINPROGRESS` is success.
/// The socket is created non-blocking and close-on-exec in one syscall:
/// on the connection-rate path every syscall shows.
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let ty = Type::STREAM.nonblocking().cloexec();
    let s = Socket::new_raw(Domain::for_address(addr), ty, Some(Protocol::TCP))?;
    s.set_nodelay(true)?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}
