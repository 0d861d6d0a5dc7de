//! The UDP side of a worker: its listener sockets and its flows.
//!
//! A flow is one client address on one listener socket. It holds a socket
//! connected to the member its first datagram picked, registered in the
//! worker's poll: datagrams from the client go out on it, replies come back
//! on it and leave through the listener socket, from the address the client
//! sent to (`IP_PKTINFO` on wildcard listeners). The kernel's reuseport
//! hash keeps a client on one worker, so a flow lives in exactly one table.
//!
//! Bounded in every direction: a flow ends after `timeout_client_data` with
//! no datagram either way; each listener keeps at most its share of
//! `max_flows` per worker and evicts the least recently used flow to make
//! room; `connection_limit` caps flows across workers (new ones are
//! dropped). Datagrams move in batches (`recvmmsg`/`sendmmsg`) straight
//! from one receive buffer per worker; nothing is allocated per packet.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::balance::FlowKey;
use crate::listen;
use crate::live::LivePools;
use crate::mmsg::{Gso, Outgoing, RecvBatch, Sender, SLOTS};
use crate::snapshot::{ListenerRt, PoolRt, Snapshot};
use crate::timer::TimerWheel;

/// Receive batches per wake-up of one socket before yielding to others.
const BATCHES: usize = 8;
const NIL: usize = usize::MAX;

/// How UDP tokens and timer keys are told apart from the worker's others.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    /// Set on every UDP token and timer key.
    pub udp: usize,
    /// Also set on listener socket tokens.
    pub listener: usize,
}

/// What the worker lends the UDP side for one call.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub timers: &'a mut TimerWheel,
    pub snapshot: &'a Snapshot,
    pub live: &'a mut LivePools,
    pub now: Instant,
}

#[derive(Debug)]
struct ListenSock {
    addr: SocketAddr,
    sock: UdpSocket,
    /// Bound to a wildcard: replies name their source address.
    wildcard: bool,
    group: usize,
    gso: Gso,
    /// The socket's kernel drop count (`SO_RXQ_OVFL`) last seen. Each
    /// reuseport socket has its own, and sockets are always new to the
    /// process, so counting starts from 0.
    drops: u32,
}

/// The flows of one listener in this worker, least recently used last.
#[derive(Debug)]
struct Group {
    listener_id: String,
    head: usize,
    tail: usize,
    len: usize,
    sockets: usize,
}

#[derive(Debug)]
struct Flow {
    listener: Arc<ListenerRt>,
    pool: Arc<PoolRt>,
    member: usize,
    sock: usize,
    group: usize,
    client: SocketAddr,
    /// Where the client sent to, when the listener socket is a wildcard.
    local: Option<IpAddr>,
    up: UdpSocket,
    gso: Gso,
    last: Instant,
    timer: u64,
    prev: usize,
    next: usize,
}

#[derive(Debug)]
pub struct UdpPlane {
    worker: usize,
    workers: usize,
    tokens: Tokens,
    socks: Slab<ListenSock>,
    by_addr: HashMap<SocketAddr, usize>,
    groups: Slab<Group>,
    flows: Slab<Flow>,
    table: hashbrown::HashMap<(SocketAddr, usize), usize>,
    batch: RecvBatch,
    sender: Sender,
    out: Vec<Outgoing>,
    /// GSO state new sockets start with; `Gso::OFF` also means no GRO.
    gso: Gso,
    /// Tokens whose budget ran out with datagrams left.
    again: Vec<usize>,
}

impl UdpPlane {
    pub fn new(worker: usize, workers: usize, offload: bool, tokens: Tokens) -> UdpPlane {
        UdpPlane {
            worker,
            workers: workers.max(1),
            tokens,
            socks: Slab::new(),
            by_addr: HashMap::new(),
            groups: Slab::new(),
            flows: Slab::new(),
            table: hashbrown::HashMap::new(),
            batch: RecvBatch::new(),
            sender: Sender::new(),
            out: Vec::with_capacity(SLOTS),
            gso: if offload { Gso::ON } else { Gso::OFF },
            again: Vec::new(),
        }
    }

    /// Whether some socket still has datagrams waiting from an earlier turn.
    pub fn has_work(&self) -> bool {
        !self.again.is_empty()
    }

    /// Serves sockets whose budget ran out last turn.
    pub fn run_again(&mut self, ctx: &mut Ctx<'_>) {
        let mut tokens = std::mem::take(&mut self.again);
        for t in tokens.drain(..) {
            self.event(t, ctx);
        }
        // Keep the list's capacity unless serving queued new tokens.
        if self.again.is_empty() {
            self.again = tokens;
        }
    }

    /// Readiness on a UDP token.
    pub fn event(&mut self, token: usize, ctx: &mut Ctx<'_>) {
        let key = token & !(self.tokens.udp | self.tokens.listener);
        if token & self.tokens.listener != 0 {
            self.client_datagrams(key, ctx);
        } else {
            self.member_datagrams(key, ctx);
        }
    }

    /// Takes a new generation: sockets for removed addresses close (their
    /// flows end), new sockets start; every remaining flow whose member is
    /// gone from its listener's pool ends, the others move to the new
    /// generation's objects and keep their member.
    pub fn apply(
        &mut self,
        add: Vec<(SocketAddr, std::net::UdpSocket)>,
        remove: &[SocketAddr],
        ctx: &mut Ctx<'_>,
    ) {
        for addr in remove {
            if let Some(k) = self.by_addr.get(addr).copied() {
                self.close_socket(k, ctx.registry);
            }
        }
        for (addr, std_sock) in add {
            let mut sock = UdpSocket::from_std(std_sock);
            let entry = self.socks.vacant_entry();
            let key = entry.key();
            let token = Token(key | self.tokens.udp | self.tokens.listener);
            if let Err(e) = ctx.registry.register(&mut sock, token, Interest::READABLE) {
                tracing::error!(worker = self.worker, %addr, error = %e, "cannot register UDP listener");
                continue;
            }
            entry.insert(ListenSock {
                addr,
                sock,
                wildcard: addr.ip().is_unspecified(),
                group: NIL,
                gso: self.gso,
                drops: 0,
            });
            self.by_addr.insert(addr, key);
            // Datagrams may have queued before registration.
            self.again.push(token.0);
        }
        // Each socket joins the group of the listener that now owns it.
        let keys: Vec<usize> = self.socks.iter().map(|(k, _)| k).collect();
        for k in keys {
            let addr = self.socks[k].addr;
            let Some(l) = ctx.snapshot.udp_by_addr.get(&addr) else {
                continue;
            };
            let old = self.socks[k].group;
            if old != NIL && self.groups[old].listener_id == l.id {
                continue;
            }
            // The address moved to another listener: its flows end.
            self.end_flows_where(ctx.registry, |f| f.sock == k);
            if old != NIL {
                self.leave_group(old);
            }
            let g = self.group_for(&l.id);
            self.groups[g].sockets += 1;
            self.socks[k].group = g;
        }
        self.retarget_flows(ctx);
    }

    /// Ends every flow and closes every socket (drain or exit): a datagram
    /// flow has nothing to finish.
    pub fn close_all(&mut self, registry: &Registry) {
        let keys: Vec<usize> = self.socks.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.close_socket(k, registry);
        }
    }

    /// A flow's idle timer fired.
    pub fn on_timer(&mut self, key: usize, tick: u64, ctx: &mut Ctx<'_>) {
        let key = key & !self.tokens.udp;
        let Some(f) = self.flows.get_mut(key) else {
            return;
        };
        if f.timer != tick {
            return; // superseded entry
        }
        let Some(idle) = f.listener.timeout_client_data else {
            return;
        };
        let at = f.last + idle;
        if ctx.now >= at {
            f.listener.stats.worker(self.worker).timeouts.add(1);
            self.end_flow(key, ctx.registry);
        } else {
            f.timer = ctx.timers.schedule(at, key | self.tokens.udp);
        }
    }

    fn group_for(&mut self, listener_id: &str) -> usize {
        if let Some((g, _)) = self
            .groups
            .iter()
            .find(|(_, g)| g.listener_id == listener_id)
        {
            return g;
        }
        self.groups.insert(Group {
            listener_id: listener_id.to_owned(),
            head: NIL,
            tail: NIL,
            len: 0,
            sockets: 0,
        })
    }

    fn leave_group(&mut self, g: usize) {
        if let Some(group) = self.groups.get_mut(g) {
            group.sockets = group.sockets.saturating_sub(1);
            if group.sockets == 0 && group.len == 0 {
                self.groups.remove(g);
            }
        }
    }

    fn close_socket(&mut self, k: usize, registry: &Registry) {
        if !self.socks.contains(k) {
            return;
        }
        self.end_flows_where(registry, |f| f.sock == k);
        let mut s = self.socks.remove(k);
        let _ = registry.deregister(&mut s.sock);
        self.by_addr.remove(&s.addr);
        if s.group != NIL {
            self.leave_group(s.group);
        }
    }

    fn end_flows_where(&mut self, registry: &Registry, pred: impl Fn(&Flow) -> bool) {
        let doomed: Vec<usize> = self
            .flows
            .iter()
            .filter(|(_, f)| pred(f))
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            self.end_flow(k, registry);
        }
    }

    /// After a reload: flows follow their listener's new objects, or end
    /// when their member left the pool (a drained member, weight 0, stays
    /// in the pool and keeps its flows until they idle out).
    fn retarget_flows(&mut self, ctx: &mut Ctx<'_>) {
        // Member positions of each new pool, built once per pool rather
        // than searched once per flow.
        let snapshot = ctx.snapshot;
        let mut positions: HashMap<usize, HashMap<(&str, SocketAddr), usize>> = HashMap::new();
        let keys: Vec<usize> = self.flows.iter().map(|(k, _)| k).collect();
        for k in keys {
            let f = &self.flows[k];
            let addr = self.socks.get(f.sock).map(|s| s.addr);
            let listener = addr.and_then(|a| snapshot.udp_by_addr.get(&a));
            let old = &f.pool.members[f.member];
            let target = listener.and_then(|l| {
                let pool = l.pool.as_ref()?;
                let i = *positions
                    .entry(pool.index)
                    .or_insert_with(|| {
                        pool.members
                            .iter()
                            .enumerate()
                            .map(|(i, m)| ((m.id.as_str(), m.addr), i))
                            .collect()
                    })
                    .get(&(old.id.as_str(), old.addr))?;
                Some((l.clone(), pool.clone(), i))
            });
            match target {
                Some((listener, pool, member)) => {
                    let f = &mut self.flows[k];
                    // A changed idle timeout needs a new timer; an
                    // unchanged one keeps the flow's pending entry.
                    let idle_changed =
                        f.listener.timeout_client_data != listener.timeout_client_data;
                    f.listener = listener;
                    f.pool = pool;
                    f.member = member;
                    if idle_changed {
                        ctx.timers.cancel(f.timer, k | self.tokens.udp);
                        f.timer = 0;
                    }
                    if let Some(idle) = f.listener.timeout_client_data.filter(|_| idle_changed) {
                        f.timer = ctx.timers.schedule(f.last + idle, k | self.tokens.udp);
                    }
                }
                None => self.end_flow(k, ctx.registry),
            }
        }
    }

    /// Datagrams from clients on listener socket `k`.
    fn client_datagrams(&mut self, k: usize, ctx: &mut Ctx<'_>) {
        for _ in 0..BATCHES {
            let Some(s) = self.socks.get(k) else {
                return;
            };
            let n = match self.batch.recv(s.sock.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(worker = self.worker, error = %e, "UDP receive error");
                    return;
                }
            };
            self.count_kernel_drops(k, ctx);
            self.forward_to_members(k, n, ctx);
            if n < SLOTS {
                return; // drained; the next datagram raises a new edge
            }
        }
        self.again.push(k | self.tokens.udp | self.tokens.listener);
    }

    /// Adds what the kernel dropped on socket `k` since its last report to
    /// the listener's counter. The count is the socket's since it was
    /// made, a `u32` that wraps: the increase is a wrapping difference.
    fn count_kernel_drops(&mut self, k: usize, ctx: &Ctx<'_>) {
        let Some(count) = self.batch.kernel_drops() else {
            return;
        };
        let Some(s) = self.socks.get_mut(k) else {
            return;
        };
        let new = drops_since(s.drops, count);
        s.drops = count;
        if new == 0 {
            return;
        }
        // Drops are rare, so the lookup is off the common path.
        if let Some(l) = ctx.snapshot.udp_by_addr.get(&s.addr) {
            l.stats
                .worker(self.worker)
                .dropped_kernel
                .add(u64::from(new));
        }
    }

    /// Sends the `n` datagrams just received on socket `k` on their flows'
    /// member sockets, one `sendmmsg` per run of datagrams of one flow.
    fn forward_to_members(&mut self, k: usize, n: usize, ctx: &mut Ctx<'_>) {
        let wildcard = self.socks[k].wildcard;
        let mut current = NIL;
        self.out.clear();
        for i in 0..n {
            let Some(client) = self.batch.source(i) else {
                continue;
            };
            let local = if wildcard {
                self.batch.destination(i)
            } else {
                None
            };
            let flow = match self.table.get(&(client, k)) {
                Some(&f) => f,
                None => match self.open_flow(k, client, local, ctx) {
                    Some(f) => f,
                    None => continue,
                },
            };
            let len = self.batch.data(i).len() as u64;
            let f = &mut self.flows[flow];
            let lc = f.listener.stats.worker(self.worker);
            lc.packets_in.add(self.batch.datagrams(i));
            lc.bytes_in.add(len);
            f.last = ctx.now;
            if local.is_some() {
                f.local = local;
            }
            self.touch(flow);
            if flow != current {
                self.flush_to_member(current);
                current = flow;
            }
            self.out.push(Outgoing {
                slot: i,
                to: None,
                from: None,
            });
        }
        self.flush_to_member(current);
    }

    fn flush_to_member(&mut self, flow: usize) {
        if self.out.is_empty() {
            return;
        }
        if let Some(f) = self.flows.get_mut(flow) {
            let sent = self
                .sender
                .send(f.up.as_raw_fd(), &self.batch, &self.out, &mut f.gso);
            let mc = f.pool.members[f.member].stats.worker(self.worker);
            mc.packets_out.add(sent.datagrams);
            mc.bytes_out.add(sent.bytes);
            mc.unreachable.add(sent.unreachable);
            f.listener
                .stats
                .worker(self.worker)
                .dropped_to_member
                .add(sent.dropped);
        }
        self.out.clear();
    }

    /// Replies from the member of flow `k`, sent on to its client.
    fn member_datagrams(&mut self, k: usize, ctx: &mut Ctx<'_>) {
        for _ in 0..BATCHES {
            let Some(f) = self.flows.get_mut(k) else {
                return;
            };
            let mc = f.pool.members[f.member].stats.worker(self.worker);
            let n = match self.batch.recv(f.up.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_unreachable(&e) => {
                    // An ICMP error for an earlier datagram: counted, and
                    // the flow stays (the member may come back).
                    mc.unreachable.add(1);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(worker = self.worker, error = %e, "UDP member receive error");
                    return;
                }
            };
            let Some(s) = self.socks.get_mut(f.sock) else {
                return;
            };
            self.out.clear();
            let (mut datagrams, mut bytes) = (0, 0);
            for slot in 0..n {
                datagrams += self.batch.datagrams(slot);
                bytes += self.batch.data(slot).len() as u64;
                self.out.push(Outgoing {
                    slot,
                    to: Some(f.client),
                    from: f.local,
                });
            }
            mc.packets_in.add(datagrams);
            mc.bytes_in.add(bytes);
            let sent = self
                .sender
                .send(s.sock.as_raw_fd(), &self.batch, &self.out, &mut s.gso);
            self.out.clear();
            let lc = f.listener.stats.worker(self.worker);
            lc.packets_out.add(sent.datagrams);
            lc.bytes_out.add(sent.bytes);
            lc.dropped_to_client.add(sent.dropped);
            if n > 0 {
                f.last = ctx.now;
                self.touch(k);
            }
            if n < SLOTS {
                return;
            }
        }
        self.again.push(k | self.tokens.udp);
    }

    /// A new flow for `client` on socket `k`, or None (and the datagram is
    /// dropped, counted by reason).
    fn open_flow(
        &mut self,
        k: usize,
        client: SocketAddr,
        local: Option<IpAddr>,
        ctx: &mut Ctx<'_>,
    ) -> Option<usize> {
        let s = self.socks.get(k)?;
        let listener = ctx.snapshot.udp_by_addr.get(&s.addr)?.clone();
        let group = s.group;
        let lc = listener.stats.worker(self.worker);
        if !listener.admits(client.ip()) {
            lc.dropped_acl.add(1);
            return None;
        }
        let Some(pool) = listener.pool.clone() else {
            lc.dropped_no_member.add(1);
            return None;
        };
        let before = listener.stats.active.fetch_add(1, Relaxed);
        if listener.connection_limit.is_some_and(|lim| before >= lim) {
            listener.stats.active.fetch_sub(1, Relaxed);
            lc.dropped_limit.add(1);
            return None;
        }
        let dst = SocketAddr::new(local.unwrap_or(s.addr.ip()), s.addr.port());
        let member = self.pick(&pool, FlowKey { src: client, dst }, ctx);
        let Some(member) = member else {
            listener.stats.active.fetch_sub(1, Relaxed);
            lc.dropped_no_member.add(1);
            return None;
        };
        // Room under max_flows: this worker's share of it.
        let share = listener.max_flows.div_ceil(self.workers).max(1);
        while self.groups.get(group).is_some_and(|g| g.len >= share) {
            if !self.evict(group, ctx.registry) {
                break;
            }
        }
        let maddr = pool.members[member].addr;
        let mut up = match connect(maddr, self.gso != Gso::OFF) {
            Ok(up) => up,
            Err(e) => {
                tracing::debug!(member = %maddr, error = %e, "cannot open a UDP flow socket");
                listener.stats.active.fetch_sub(1, Relaxed);
                if crate::worker::local_shortage(&e) {
                    // Out of descriptors or memory: ours, not the member's.
                    lc.local_errors.add(1);
                } else {
                    lc.dropped_to_member.add(1);
                }
                return None;
            }
        };
        let entry = self.flows.vacant_entry();
        let key = entry.key();
        if let Err(e) =
            ctx.registry
                .register(&mut up, Token(key | self.tokens.udp), Interest::READABLE)
        {
            tracing::warn!(error = %e, "cannot register a UDP flow socket");
            listener.stats.active.fetch_sub(1, Relaxed);
            lc.local_errors.add(1);
            return None;
        }
        lc.total_connections.add(1);
        let mc = pool.members[member].stats.worker(self.worker);
        mc.total_connections.add(1);
        mc.active_connections.add(1);
        let timer = listener
            .timeout_client_data
            .map(|idle| ctx.timers.schedule(ctx.now + idle, key | self.tokens.udp))
            .unwrap_or(0);
        entry.insert(Flow {
            listener,
            pool,
            member,
            sock: k,
            group,
            client,
            local,
            up,
            gso: self.gso,
            last: ctx.now,
            timer,
            prev: NIL,
            next: NIL,
        });
        self.table.insert((client, k), key);
        self.link_front(key);
        Some(key)
    }

    fn pick(&self, pool: &Arc<PoolRt>, flow: FlowKey, ctx: &mut Ctx<'_>) -> Option<usize> {
        ctx.live.choose(pool, &flow, &[]).map(usize::from)
    }

    /// Ends the least recently used flow of group `g`; false if it has none.
    fn evict(&mut self, g: usize, registry: &Registry) -> bool {
        let Some(tail) = self.groups.get(g).map(|g| g.tail) else {
            return false;
        };
        if tail == NIL {
            return false;
        }
        if let Some(f) = self.flows.get(tail) {
            f.listener.stats.worker(self.worker).flows_evicted.add(1);
        }
        self.end_flow(tail, registry);
        true
    }

    fn end_flow(&mut self, k: usize, registry: &Registry) {
        if !self.flows.contains(k) {
            return;
        }
        self.unlink(k);
        let mut f = self.flows.remove(k);
        self.table.remove(&(f.client, f.sock));
        let _ = registry.deregister(&mut f.up);
        f.listener.stats.active.fetch_sub(1, Relaxed);
        f.pool.members[f.member]
            .stats
            .worker(self.worker)
            .active_connections
            .sub(1);
        if let Some(g) = self.groups.get(f.group) {
            if g.sockets == 0 && g.len == 0 {
                self.groups.remove(f.group);
            }
        }
    }

    // ---- least-recently-used list per group, threaded through the flows

    fn link_front(&mut self, k: usize) {
        let g = self.flows[k].group;
        let Some(group) = self.groups.get_mut(g) else {
            return;
        };
        let old_head = group.head;
        group.head = k;
        if group.tail == NIL {
            group.tail = k;
        }
        group.len += 1;
        self.flows[k].prev = NIL;
        self.flows[k].next = old_head;
        if old_head != NIL {
            self.flows[old_head].prev = k;
        }
    }

    fn unlink(&mut self, k: usize) {
        let (g, prev, next) = {
            let f = &self.flows[k];
            (f.group, f.prev, f.next)
        };
        let Some(group) = self.groups.get_mut(g) else {
            return;
        };
        if prev == NIL {
            group.head = next;
        } else {
            self.flows[prev].next = next;
        }
        if next == NIL {
            group.tail = prev;
        } else {
            self.flows[next].prev = prev;
        }
        group.len -= 1;
        self.flows[k].prev = NIL;
        self.flows[k].next = NIL;
    }

    fn touch(&mut self, k: usize) {
        let head = self.groups.get(self.flows[k].group).map(|g| g.head);
        if head != Some(k) {
            self.unlink(k);
            self.link_front(k);
        }
    }
}

/// Datagrams dropped between two readings of a socket's `u32` drop count,
/// across a wraparound too (fewer than 2^32 drops between readings).
fn drops_since(last: u32, now: u32) -> u32 {
    now.wrapping_sub(last)
}

fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// A non-blocking UDP socket connected to `member`: the kernel picks the
/// local port, filters out datagrams from anyone else, and reports the
/// member's ICMP errors on it. With `gro`, the member's trains of replies
/// arrive coalesced.
fn connect(member: SocketAddr, gro: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(member),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    if gro {
        listen::enable_gro(&s);
    }
    s.connect(&member.into())?;
    Ok(UdpSocket::from_std(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counts_wrap_around() {
        assert_eq!(drops_since(0, 0), 0);
        assert_eq!(drops_since(10, 25), 15);
        assert_eq!(drops_since(u32::MAX - 2, 4), 7);
        assert_eq!(drops_since(u32::MAX, 0), 1);
    }
}
