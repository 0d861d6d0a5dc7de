//! Counters, kept per worker so the forwarding path never contends: each
//! worker writes only its own cache-padded slot (a plain load + store, no
//! locked instruction), and readers sum the slots. The one shared counter
//! is a listener's active-connection (for UDP: active-flow) count, which
//! `connection_limit` must see across all workers.
//!
//! Counter objects live in a [`Registry`] keyed by listener id and by
//! (pool id, member id), so they survive reloads for objects that stay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_utils::CachePadded;
pub use siphon_proto::stats::*;

/// A counter with one writer (its worker) and any number of readers.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker calls this, so load + store is
    /// exact and avoids a locked read-modify-write on the hot path.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds (µs) of latency buckets: connects and health checks.
pub const LATENCY_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
/// Upper bounds (µs) of TCP session duration buckets: 10 ms to 4 h.
pub const SESSION_BOUNDS_US: &[u64] = &[
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    60_000_000,
    300_000_000,
    1_800_000_000,
    3_600_000_000,
    14_400_000_000,
];
/// Buckets a histogram can have (the longest bounds list, plus +Inf).
const BUCKETS: usize = 17;

/// A latency histogram with one writer (a worker, or the health thread):
/// counts per bucket and the sum, summed over writers on scrape. An
/// observation is a scan of at most 16 bounds and two plain stores.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [Counter; BUCKETS],
    sum_us: Counter,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, bounds: &[u64], d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = bounds.iter().position(|&b| us <= b).unwrap_or(bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.add(1);
        }
        self.sum_us.add(us);
    }
}

/// Sums per-worker histograms into one report.
fn histogram_sum<'a>(
    bounds: &'static [u64],
    hs: impl Iterator<Item = &'a Histogram>,
) -> HistogramReport {
    let mut r = HistogramReport {
        bounds,
        counts: vec![0; bounds.len() + 1],
        sum_us: 0,
    };
    for h in hs {
        for (acc, c) in r.counts.iter_mut().zip(&h.counts) {
            *acc += c.get();
        }
        r.sum_us += h.sum_us.get();
    }
    r
}

/// One worker's counters for a listener.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// Bytes received from clients.
    pub bytes_in: Counter,
    /// Bytes sent to clients.
    pub bytes_out: Counter,
    pub total_connections: Counter,
    pub refused_acl: Counter,
    pub refused_limit: Counter,
    /// Connections closed because no member could take them.
    pub no_member: Counter,
    /// Connections refused because this process ran short of descriptors,
    /// memory or local ports: the proxy's problem, never the member's.
    pub local_errors: Counter,
    /// Times accepting paused because the process ran short (the clients
    /// meanwhile wait in the kernel's backlog).
    pub accept_pauses: Counter,
    /// Connections or UDP flows ended by an idle timeout.
    pub timeouts: Counter,
    /// UDP: datagrams from clients, and replies sent to them.
    pub packets_in: Counter,
    pub packets_out: Counter,
    /// UDP datagrams dropped, by reason: client not in `allowed_cidrs`;
    /// `connection_limit` flows reached; no usable member; the member
    /// socket would not take it (buffer full or error); the reply could
    /// not be sent to the client.
    pub dropped_acl: Counter,
    pub dropped_limit: Counter,
    pub dropped_no_member: Counter,
    pub dropped_to_member: Counter,
    pub dropped_to_client: Counter,
    /// UDP datagrams the kernel dropped on the listener's sockets before
    /// the worker read them (receive queue full, mostly): the sum of the
    /// increases of each socket's `SO_RXQ_OVFL` count that this worker saw.
    pub dropped_kernel: Counter,
    /// UDP flows ended to make room under `max_flows`.
    pub flows_evicted: Counter,
    /// How long TCP sessions lasted, accept to close (established ones).
    pub sessions: Histogram,
}

#[derive(Debug)]
pub struct ListenerStats {
    pub id: String,
    /// Shared by all workers: checked against `connection_limit`.
    pub active: AtomicU64,
    workers: Box<[CachePadded<ListenerCounters>]>,
}

impl ListenerStats {
    fn new(id: &str, workers: usize) -> ListenerStats {
        ListenerStats {
            id: id.to_owned(),
            active: AtomicU64::new(0),
            workers: (0..workers).map(|_| CachePadded::default()).collect(),
        }
    }
    #[inline]
    pub fn worker(&self, w: usize) -> &ListenerCounters {
        &self.workers[w]
    }
    fn sum(&self, f: impl Fn(&ListenerCounters) -> &Counter) -> u64 {
        self.workers.iter().map(|c| f(c).get()).sum()
    }
}

/// One worker's counters for a member.
#[derive(Debug, Default)]
pub struct MemberCounters {
    /// Bytes received from the member.
    pub bytes_in: Counter,
    /// Bytes sent to the member.
    pub bytes_out: Counter,
    pub active_connections: Counter,
    pub total_connections: Counter,
    /// Failed connects (refused, unreachable, reset or timed out).
    pub connect_errors: Counter,
    /// Of those, the ones that timed out.
    pub connect_timeouts: Counter,
    /// UDP: datagrams received from and sent to the member.
    pub packets_in: Counter,
    pub packets_out: Counter,
    /// UDP: ICMP errors the member's flows got (port unreachable and such).
    pub unreachable: Counter,
    /// How long connects to the member took, start to established.
    pub connect_time: Histogram,
}

#[derive(Debug)]
pub struct MemberStats {
    pub pool_id: String,
    pub id: String,
    /// Connect failures since the last successful connect, over all
    /// workers (passive ejection). Written only on failures and on the
    /// first success after one, so the forwarding path just reads it.
    pub failures_in_row: AtomicU32,
    /// The same for connects that timed out, counted apart: a slow but
    /// working member (overload) is not a refusing one.
    pub timeouts_in_row: AtomicU32,
    /// Written by the health thread only.
    pub ejections: Ejections,
    /// How long the member's passing health checks took (health thread).
    pub check_latency: Histogram,
    workers: Box<[CachePadded<MemberCounters>]>,
}

/// Passive ejections of one member, by reason, and those held back because
/// the pool could not spare the member.
#[derive(Debug, Default)]
pub struct Ejections {
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
    pub held_back: AtomicU64,
}

impl MemberStats {
    fn new(pool_id: &str, id: &str, workers: usize) -> MemberStats {
        MemberStats {
            pool_id: pool_id.to_owned(),
            id: id.to_owned(),
            failures_in_row: AtomicU32::new(0),
            timeouts_in_row: AtomicU32::new(0),
            ejections: Ejections::default(),
            check_latency: Histogram::default(),
            workers: (0..workers).map(|_| CachePadded::default()).collect(),
        }
    }
    #[inline]
    pub fn worker(&self, w: usize) -> &MemberCounters {
        &self.workers[w]
    }
    /// Active connections over all workers (for `LEAST_CONNECTIONS`).
    #[inline]
    pub fn active(&self) -> u64 {
        self.sum(|c| &c.active_connections)
    }
    fn sum(&self, f: impl Fn(&MemberCounters) -> &Counter) -> u64 {
        self.workers.iter().map(|c| f(c).get()).sum()
    }
}

/// Counter objects by id, reused across reloads.
#[derive(Debug, Clone)]
pub struct Registry {
    workers: usize,
    listeners: HashMap<String, Arc<ListenerStats>>,
    members: HashMap<(String, String), Arc<MemberStats>>,
}

impl Registry {
    pub fn new(workers: usize) -> Registry {
        Registry {
            workers,
            listeners: HashMap::new(),
            members: HashMap::new(),
        }
    }
    pub fn listener(&mut self, id: &str) -> Arc<ListenerStats> {
        let w = self.workers;
        self.listeners
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(ListenerStats::new(id, w)))
            .clone()
    }
    pub fn member(&mut self, pool: &str, id: &str) -> Arc<MemberStats> {
        let w = self.workers;
        self.members
            .entry((pool.to_owned(), id.to_owned()))
            .or_insert_with(|| Arc::new(MemberStats::new(pool, id, w)))
            .clone()
    }
    /// Forgets counters of objects no longer configured (connections that
    /// still hold them keep counting into their own copy until they end).
    pub fn retain(&mut self, listeners: &[&str], members: &[(&str, &str)]) {
        self.listeners
            .retain(|k, _| listeners.contains(&k.as_str()));
        self.members
            .retain(|(p, m), _| members.contains(&(p.as_str(), m.as_str())));
    }

    pub fn report(&self, generation: u64) -> StatsReport {
        let mut listeners: Vec<ListenerReport> = self
            .listeners
            .values()
            .map(|l| ListenerReport {
                id: l.id.clone(),
                active_connections: l.active.load(Relaxed),
                total_connections: l.sum(|c| &c.total_connections),
                bytes_in: l.sum(|c| &c.bytes_in),
                bytes_out: l.sum(|c| &c.bytes_out),
                refused_acl: l.sum(|c| &c.refused_acl),
                refused_limit: l.sum(|c| &c.refused_limit),
                no_member: l.sum(|c| &c.no_member),
                local_errors: l.sum(|c| &c.local_errors),
                accept_pauses: l.sum(|c| &c.accept_pauses),
                timeouts: l.sum(|c| &c.timeouts),
                packets_in: l.sum(|c| &c.packets_in),
                packets_out: l.sum(|c| &c.packets_out),
                dropped_acl: l.sum(|c| &c.dropped_acl),
                dropped_limit: l.sum(|c| &c.dropped_limit),
                dropped_no_member: l.sum(|c| &c.dropped_no_member),
                dropped_to_member: l.sum(|c| &c.dropped_to_member),
                dropped_to_client: l.sum(|c| &c.dropped_to_client),
                dropped_kernel: l.sum(|c| &c.dropped_kernel),
                flows_evicted: l.sum(|c| &c.flows_evicted),
                sessions: histogram_sum(SESSION_BOUNDS_US, l.workers.iter().map(|c| &c.sessions)),
            })
            .collect();
        listeners.sort_by(|a, b| a.id.cmp(&b.id));
        let mut members: Vec<MemberReport> = self
            .members
            .values()
            .map(|m| MemberReport {
                pool_id: m.pool_id.clone(),
                id: m.id.clone(),
                active_connections: m.active(),
                total_connections: m.sum(|c| &c.total_connections),
                bytes_in: m.sum(|c| &c.bytes_in),
                bytes_out: m.sum(|c| &c.bytes_out),
                connect_errors: m.sum(|c| &c.connect_errors),
                connect_timeouts: m.sum(|c| &c.connect_timeouts),
                ejected_refused: m.ejections.refused.load(Relaxed),
                ejected_timed_out: m.ejections.timed_out.load(Relaxed),
                ejections_held_back: m.ejections.held_back.load(Relaxed),
                packets_in: m.sum(|c| &c.packets_in),
                packets_out: m.sum(|c| &c.packets_out),
                unreachable: m.sum(|c| &c.unreachable),
                connect_time: histogram_sum(
                    LATENCY_BOUNDS_US,
                    m.workers.iter().map(|c| &c.connect_time),
                ),
                check_latency: histogram_sum(LATENCY_BOUNDS_US, std::iter::once(&m.check_latency)),
            })
            .collect();
        members.sort_by(|a, b| (&a.pool_id, &a.id).cmp(&(&b.pool_id, &b.id)));
        StatsReport {
            generation,
            listeners,
            members,
        }
    }
}
