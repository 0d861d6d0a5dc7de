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

use crossbeam_utils::CachePadded;
use serde::Serialize;

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
    /// UDP flows ended to make room under `max_flows`.
    pub flows_evicted: Counter,
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
    pub connect_errors: Counter,
    /// UDP: datagrams received from and sent to the member.
    pub packets_in: Counter,
    pub packets_out: Counter,
    /// UDP: ICMP errors the member's flows got (port unreachable and such).
    pub unreachable: Counter,
}

#[derive(Debug)]
pub struct MemberStats {
    pub pool_id: String,
    pub id: String,
    /// Connect failures since the last successful connect, over all
    /// workers (passive ejection). Written only on failures and on the
    /// first success after one, so the forwarding path just reads it.
    pub failures_in_row: AtomicU32,
    workers: Box<[CachePadded<MemberCounters>]>,
}

impl MemberStats {
    fn new(pool_id: &str, id: &str, workers: usize) -> MemberStats {
        MemberStats {
            pool_id: pool_id.to_owned(),
            id: id.to_owned(),
            failures_in_row: AtomicU32::new(0),
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
                timeouts: l.sum(|c| &c.timeouts),
                packets_in: l.sum(|c| &c.packets_in),
                packets_out: l.sum(|c| &c.packets_out),
                dropped_acl: l.sum(|c| &c.dropped_acl),
                dropped_limit: l.sum(|c| &c.dropped_limit),
                dropped_no_member: l.sum(|c| &c.dropped_no_member),
                dropped_to_member: l.sum(|c| &c.dropped_to_member),
                dropped_to_client: l.sum(|c| &c.dropped_to_client),
                flows_evicted: l.sum(|c| &c.flows_evicted),
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
                packets_in: m.sum(|c| &c.packets_in),
                packets_out: m.sum(|c| &c.packets_out),
                unreachable: m.sum(|c| &c.unreachable),
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

/// A point-in-time reading of all counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsReport {
    pub generation: u64,
    pub listeners: Vec<ListenerReport>,
    pub members: Vec<MemberReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ListenerReport {
    pub id: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub refused_acl: u64,
    pub refused_limit: u64,
    pub no_member: u64,
    pub timeouts: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub dropped_acl: u64,
    pub dropped_limit: u64,
    pub dropped_no_member: u64,
    pub dropped_to_member: u64,
    pub dropped_to_client: u64,
    pub flows_evicted: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberReport {
    pub pool_id: String,
    pub id: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_errors: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub unreachable: u64,
}

impl StatsReport {
    pub fn listener(&self, id: &str) -> Option<&ListenerReport> {
        self.listeners.iter().find(|l| l.id == id)
    }
    pub fn member(&self, pool: &str, id: &str) -> Option<&MemberReport> {
        self.members
            .iter()
            .find(|m| m.pool_id == pool && m.id == id)
    }
}
