//! Backend choice for one pool: the pure part of balancing. No sockets, no
//! clocks; the worker passes the flow, its own pick state and a view of
//! active connection counts.
//!
//! Members are grouped into *primary* (non-backup) and *backup*; a member
//! is eligible when it is admin-up and has weight > 0 (weight 0 drains: it
//! keeps its connections but gets no new ones). Backups are used only when
//! no primary is eligible (or every primary was already tried).
//!
//! Cost of a pick, n eligible members:
//!
//! * `ROUND_ROBIN`: O(log k) for k distinct weights (O(1) when all weights
//!   are equal). One sequence number per group is shared by every worker
//!   (one relaxed `fetch_add` a pick), so workers interleave instead of
//!   each going round on its own; the number is mapped onto a fixed
//!   interleaved weighted schedule built with the balancer.
//! * `LEAST_CONNECTIONS`: O(log n), a per-worker binary heap ordered by
//!   `(active + 1) / weight` (haproxy's key), least recently picked first
//!   among equals. Counts come from the caller and may change behind the
//!   heap's back (other workers, closes): the heap's top is checked
//!   against the current count before it is taken (so an increase is
//!   never missed), and two members a pick are re-read in turn (so a
//!   decrease is seen within n / 2 picks).
//! * hashing algorithms: one flow hash and one table load (Maglev table
//!   holding pool positions, remainder by multiplication).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

use crate::config::LbAlgorithm;
use crate::maglev::{self, Backend, MaglevTable};

/// What the balancer needs to know of a member.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub weight: u32,
    pub backup: bool,
    pub usable: bool,
}

/// The two ends of a new flow.
#[derive(Debug, Clone, Copy)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// One set of eligible members (positions into the pool's member list),
/// ordered by member id, with their Maglev table when the algorithm hashes.
#[derive(Debug, Default)]
struct Group {
    members: Vec<u16>,
    weights: Vec<u32>,
    /// Slots hold pool positions (the group's table, remapped).
    table: Option<MaglevTable>,
    schedule: Schedule,
    /// The round-robin position, shared by all workers. Padded so the
    /// constant `fetch_add`s do not evict the read-only fields above from
    /// other workers' caches.
    sequence: CachePadded<AtomicU64>,
}

impl Group {
    fn build(all: &[Candidate], backup: bool, algorithm: LbAlgorithm, table_size: u32) -> Group {
        let mut members: Vec<u16> = (0..all.len())
            .filter(|&i| all[i].backup == backup && all[i].usable && all[i].weight > 0)
            .map(|i| i as u16)
            .collect();
        members.sort_by(|&a, &b| all[usize::from(a)].id.cmp(&all[usize::from(b)].id));
        let weights: Vec<u32> = members
            .iter()
            .map(|&i| all[usize::from(i)].weight)
            .collect();
        let table = if hashes(algorithm) && !members.is_empty() {
            let backends: Vec<Backend<'_>> = members
                .iter()
                .map(|&i| Backend {
                    id: &all[usize::from(i)].id,
                    weight: all[usize::from(i)].weight,
                })
                .collect();
            MaglevTable::build(&backends, table_size)
                .map(|t| t.map_members(|k| members.get(usize::from(k)).copied().unwrap_or(0)))
        } else {
            None
        };
        let schedule = if algorithm == LbAlgorithm::RoundRobin {
            Schedule::new(&weights)
        } else {
            Schedule::default()
        };
        Group {
            members,
            weights,
            table,
            schedule,
            sequence: CachePadded::new(AtomicU64::new(0)),
        }
    }
}

fn hashes(algorithm: LbAlgorithm) -> bool {
    matches!(
        algorithm,
        LbAlgorithm::Maglev | LbAlgorithm::SourceIp | LbAlgorithm::SourceIpPort
    )
}

/// Per-worker mutable state of one pool's balancer: the least-connections
/// heap of each group. Round robin keeps its position in the balancer,
/// shared by the workers.
#[derive(Debug, Default, Clone)]
pub struct PickState {
    heaps: [LcHeap; 2],
}

/// An immutable, prebuilt balancer for one pool (its only mutable part is
/// the shared round-robin position).
#[derive(Debug)]
pub struct Balancer {
    algorithm: LbAlgorithm,
    groups: [Group; 2],
}

impl Balancer {
    pub fn new(members: &[Candidate], algorithm: LbAlgorithm, table_size: u32) -> Balancer {
        Balancer {
            algorithm,
            groups: [
                Group::build(members, false, algorithm, table_size),
                Group::build(members, true, algorithm, table_size),
            ],
        }
    }

    pub fn algorithm(&self) -> LbAlgorithm {
        self.algorithm
    }

    /// Number of members new connections can go to (primary, backup).
    pub fn eligible(&self) -> (usize, usize) {
        (self.groups[0].members.len(), self.groups[1].members.len())
    }

    /// The flow hash the hashing algorithms use.
    pub fn flow_hash(algorithm: LbAlgorithm, flow: &FlowKey) -> u64 {
        match algorithm {
            LbAlgorithm::SourceIp => maglev::hash_source_ip(flow.src.ip()),
            LbAlgorithm::SourceIpPort => maglev::hash_source(flow.src),
            _ => maglev::hash_flow(flow.src, flow.dst),
        }
    }

    /// Picks a member position for a new flow, never one in `tried`.
    /// `active(i)` is member i's current connection count (for
    /// `LEAST_CONNECTIONS`).
    pub fn choose(
        &self,
        flow: &FlowKey,
        state: &mut PickState,
        active: &dyn Fn(u16) -> u64,
        tried: &[u16],
    ) -> Option<u16> {
        for (group, heap) in self.groups.iter().zip(state.heaps.iter_mut()) {
            if group.members.iter().all(|m| tried.contains(m)) {
                continue;
            }
            let pick = match self.algorithm {
                LbAlgorithm::RoundRobin => round_robin(group, tried),
                LbAlgorithm::LeastConnections => heap.pick(group, active, tried),
                _ => {
                    let hash = Balancer::flow_hash(self.algorithm, flow);
                    hashed(group, hash, tried)
                }
            };
            if pick.is_some() {
                return pick;
            }
        }
        None
    }
}

/// Interleaved weighted round robin over a group, as a function of a
/// sequence number. Weights are divided by their greatest common divisor;
/// with `w` the largest, a cycle has `w` rounds and round `r` visits, in
/// order, every member whose weight is above `r` (heaviest first, then by
/// id). Rounds in which the same members take part form a band, so the
/// schedule is one band per distinct weight, not one entry per turn: a
/// pick is a binary search over the bands and one remainder.
#[derive(Debug, Default, Clone)]
struct Schedule {
    /// Group indexes, heaviest first (by id among equals).
    order: Vec<u32>,
    /// Per band: first position in the cycle, and how many members of
    /// `order` (a prefix) take part in each of its rounds.
    bands: Vec<(u64, u32)>,
    /// Sum of the reduced weights.
    cycle: u64,
}

impl Schedule {
    fn new(weights: &[u32]) -> Schedule {
        let g = weights.iter().fold(0u32, |g, &w| gcd(g, w)).max(1);
        let reduced: Vec<u32> = weights.iter().map(|&w| w / g).collect();
        let mut order: Vec<u32> = (0..weights.len() as u32).collect();
        // Stable: equal weights stay in id order.
        order.sort_by_key(|&i| std::cmp::Reverse(reduced[i as usize]));
        let mut bands = Vec::new();
        let (mut at, mut done_rounds) = (0u64, 0u32);
        // Walk the distinct weights from the lightest: the members still
        // taking part are a prefix of `order`.
        let mut k = order.len();
        while k > 0 {
            let w = reduced[order[k - 1] as usize];
            if w > done_rounds {
                bands.push((at, k as u32));
                at += u64::from(w - done_rounds) * k as u64;
                done_rounds = w;
            }
            k -= 1;
        }
        Schedule {
            order,
            bands,
            cycle: at,
        }
    }

    /// The group index at position `seq` of the endless schedule.
    #[inline]
    fn at(&self, seq: u64) -> Option<u32> {
        if self.cycle == 0 {
            return None;
        }
        let x = seq % self.cycle;
        // The last band starting at or before x (bands[0] starts at 0).
        let b = self.bands.partition_point(|&(start, _)| start <= x);
        let &(start, width) = self.bands.get(b.checked_sub(1)?)?;
        let i = ((x - start) % u64::from(width)) as usize;
        self.order.get(i).copied()
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Turns of the schedule a retry looks at before it walks the group in id
/// order instead (a heavy member that was tried can fill long runs).
const RETRY_TURNS: u64 = 4;

fn round_robin(group: &Group, tried: &[u16]) -> Option<u16> {
    // Relaxed: the number only has to be unique, it orders nothing else.
    let seq = group.sequence.fetch_add(1, Relaxed);
    let member = |k: u32| group.members.get(k as usize).copied();
    if tried.is_empty() {
        return group.schedule.at(seq).and_then(member);
    }
    for k in 0..RETRY_TURNS {
        if let Some(m) = group.schedule.at(seq.wrapping_add(k)).and_then(member) {
            if !tried.contains(&m) {
                return Some(m);
            }
        }
    }
    // Tried members are distinct, so this walk ends within |tried| + 1.
    let n = group.members.len();
    let from = (seq % n.max(1) as u64) as usize;
    (0..n)
        .map(|k| group.members[(from + k) % n])
        .find(|m| !tried.contains(m))
}

/// Members re-read from `active` each pick, besides the heap's top.
const SCRUB_PER_PICK: usize = 2;

/// Weighted least connections over one group as a binary min-heap of group
/// indexes. `count[i]` is member i's count as last read; the heap orders
/// by `(count + 1) / weight` (compared crosswise), then by the pick clock
/// (least recently picked first), then by index.
#[derive(Debug, Default, Clone)]
struct LcHeap {
    heap: Vec<u32>,
    /// Group index -> its slot in `heap` (`u32::MAX` while set aside).
    slot: Vec<u32>,
    count: Vec<u64>,
    picked: Vec<u64>,
    clock: u64,
    /// Next member to re-read.
    scrub: usize,
    /// Tops set aside during one pick because they were tried.
    aside: Vec<u32>,
}

impl LcHeap {
    fn pick(&mut self, group: &Group, active: &dyn Fn(u16) -> u64, tried: &[u16]) -> Option<u16> {
        let n = group.members.len();
        if self.slot.len() != n {
            self.rebuild(group, active);
        }
        for _ in 0..SCRUB_PER_PICK.min(n) {
            let i = self.scrub;
            self.scrub = if i + 1 >= n { 0 } else { i + 1 };
            self.set(group, i, active(group.members[i]));
        }
        // Each turn either fixes one member's count or sets one aside, so
        // n + |tried| turns suffice unless counts move under us all the
        // time; then the top as it stands is good enough.
        let mut chosen = None;
        for _ in 0..n + tried.len() + 2 {
            let Some(&top) = self.heap.first() else {
                break;
            };
            let i = top as usize;
            let m = group.members[i];
            let now = active(m);
            if now != self.count[i] {
                self.set(group, i, now);
                continue;
            }
            if tried.contains(&m) {
                self.pop_top(group);
                self.aside.push(top);
                continue;
            }
            chosen = Some(top);
            break;
        }
        while let Some(i) = self.aside.pop() {
            self.push(group, i);
        }
        if chosen.is_none() {
            // Out of turns (counts kept moving): the best untried member by
            // the counts as read.
            chosen = self
                .heap
                .iter()
                .copied()
                .filter(|&i| !tried.contains(&group.members[i as usize]))
                .reduce(|a, b| if self.before(group, a, b) { a } else { b });
        }
        let i = chosen? as usize;
        self.clock += 1;
        self.picked[i] = self.clock;
        // Picked last now: it moves behind members of equal load.
        self.sift_down(group, self.slot[i] as usize);
        Some(group.members[i])
    }

    fn rebuild(&mut self, group: &Group, active: &dyn Fn(u16) -> u64) {
        let n = group.members.len();
        self.count = group.members.iter().map(|&m| active(m)).collect();
        self.picked = vec![0; n];
        self.heap = (0..n as u32).collect();
        self.slot = (0..n as u32).collect();
        self.clock = 0;
        self.scrub = 0;
        self.aside.clear();
        for s in (0..n / 2).rev() {
            self.sift_down(group, s);
        }
    }

    /// Records member i's count and restores the heap order around it.
    fn set(&mut self, group: &Group, i: usize, count: u64) {
        let old = self.count[i];
        if old == count {
            return;
        }
        self.count[i] = count;
        let s = self.slot[i];
        if s == u32::MAX {
            return; // set aside; placed when pushed back
        }
        if count < old {
            self.sift_up(group, s as usize);
        } else {
            self.sift_down(group, s as usize);
        }
    }

    /// Whether group index a goes before b.
    #[inline]
    fn before(&self, group: &Group, a: u32, b: u32) -> bool {
        let (a, b) = (a as usize, b as usize);
        let ka = u128::from(self.count[a] + 1) * u128::from(group.weights[b]);
        let kb = u128::from(self.count[b] + 1) * u128::from(group.weights[a]);
        (ka, self.picked[a], a) < (kb, self.picked[b], b)
    }

    fn sift_up(&mut self, group: &Group, mut s: usize) {
        while s > 0 {
            let parent = (s - 1) / 2;
            if !self.before(group, self.heap[s], self.heap[parent]) {
                break;
            }
            self.swap(s, parent);
            s = parent;
        }
    }

    fn sift_down(&mut self, group: &Group, mut s: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * s + 1, 2 * s + 2);
            let mut best = s;
            if l < n && self.before(group, self.heap[l], self.heap[best]) {
                best = l;
            }
            if r < n && self.before(group, self.heap[r], self.heap[best]) {
                best = r;
            }
            if best == s {
                break;
            }
            self.swap(s, best);
            s = best;
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.slot[self.heap[a] as usize] = a as u32;
        self.slot[self.heap[b] as usize] = b as u32;
    }

    fn pop_top(&mut self, group: &Group) {
        let last = self.heap.len() - 1;
        self.swap(0, last);
        if let Some(top) = self.heap.pop() {
            self.slot[top as usize] = u32::MAX;
        }
        self.sift_down(group, 0);
    }

    fn push(&mut self, group: &Group, i: u32) {
        self.heap.push(i);
        let s = self.heap.len() - 1;
        self.slot[i as usize] = s as u32;
        self.sift_up(group, s);
    }
}

/// Maglev lookup; on a retry, walk the table from the flow's slot to the
/// next member not yet tried, so every node retries the same way.
fn hashed(group: &Group, hash: u64, tried: &[u16]) -> Option<u16> {
    let table = group.table.as_ref()?;
    if tried.is_empty() {
        return Some(table.lookup(hash));
    }
    let start = table.slot_of(hash);
    (0..table.len())
        .map(|k| table.at(start + k))
        .find(|m| !tried.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate {
                id: format!("m{i}"),
                weight: w,
                backup: false,
                usable: true,
            })
            .collect()
    }

    fn flow(port: u16) -> FlowKey {
        FlowKey {
            src: SocketAddr::from(([192, 0, 2, 1], port)),
            dst: SocketAddr::from(([198, 51, 100, 1], 80)),
        }
    }

    #[test]
    fn round_robin_honours_weights_exactly() {
        let b = Balancer::new(&cands(&[1, 2, 3]), LbAlgorithm::RoundRobin, 251);
        let mut st = PickState::default();
        let mut count = [0; 3];
        for p in 0..600 {
            let m = b.choose(&flow(p), &mut st, &|_| 0, &[]).expect("member");
            count[usize::from(m)] += 1;
        }
        assert_eq!(count, [100, 200, 300]);
    }

    #[test]
    fn least_connections_prefers_least_loaded_per_weight() {
        let b = Balancer::new(&cands(&[1, 2]), LbAlgorithm::LeastConnections, 251);
        let mut st = PickState::default();
        let active = [3u64, 4];
        // 3/1 vs 4/2: member 1 is less loaded per weight
        let m = b.choose(&flow(1), &mut st, &|i| active[usize::from(i)], &[]);
        assert_eq!(m, Some(1));
    }

    #[test]
    fn backups_only_when_no_primary() {
        let mut c = cands(&[1, 1, 1]);
        c[2].backup = true;
        let b = Balancer::new(&c, LbAlgorithm::RoundRobin, 251);
        let mut st = PickState::default();
        for p in 0..10 {
            assert_ne!(b.choose(&flow(p), &mut st, &|_| 0, &[]), Some(2));
        }
        c[0].usable = false;
        c[1].weight = 0;
        let b = Balancer::new(&c, LbAlgorithm::RoundRobin, 251);
        assert_eq!(b.choose(&flow(1), &mut st, &|_| 0, &[]), Some(2));
    }

    #[test]
    fn retries_skip_tried_members_then_fall_back_to_backup() {
        let mut c = cands(&[1, 1, 1]);
        c[2].backup = true;
        for algo in [
            LbAlgorithm::RoundRobin,
            LbAlgorithm::LeastConnections,
            LbAlgorithm::Maglev,
            LbAlgorithm::SourceIp,
        ] {
            let b = Balancer::new(&c, algo, 251);
            let mut st = PickState::default();
            let first = b.choose(&flow(7), &mut st, &|_| 0, &[]).expect("first");
            let second = b
                .choose(&flow(7), &mut st, &|_| 0, &[first])
                .expect("second");
            assert_ne!(first, second, "{algo:?}");
            let third = b.choose(&flow(7), &mut st, &|_| 0, &[first, second]);
            assert_eq!(third, Some(2), "{algo:?}");
            assert_eq!(b.choose(&flow(7), &mut st, &|_| 0, &[0, 1, 2]), None);
        }
    }

    /// Two workers (two pick states) sharing one balancer, as the workers
    /// of a process share a pool's balancer.
    #[test]
    fn round_robin_is_even_across_workers() {
        let b = Balancer::new(&cands(&[1, 1]), LbAlgorithm::RoundRobin, 251);
        let mut workers = [PickState::default(), PickState::default()];
        let mut count = [0i64; 2];
        // An uneven interleaving: worker 0 takes 2 of every 3 picks.
        for p in 0..600u16 {
            let w = usize::from(p % 3 == 2);
            let m = b
                .choose(&flow(p), &mut workers[w], &|_| 0, &[])
                .expect("member");
            count[usize::from(m)] += 1;
            assert!((count[0] - count[1]).abs() <= 1, "after {p}: {count:?}");
        }
        // The demo's case: six connections, two members, two workers.
        let b = Balancer::new(&cands(&[1, 1]), LbAlgorithm::RoundRobin, 251);
        let mut count = [0; 2];
        for p in 0..6u16 {
            let w = usize::from(p < 4); // 4 on one worker, 2 on the other
            let m = b.choose(&flow(p), &mut workers[w], &|_| 0, &[]);
            count[usize::from(m.expect("member"))] += 1;
        }
        assert_eq!(count, [3, 3]);
    }

    #[test]
    fn round_robin_interleaves_weights() {
        // Heaviest first, then every member still owed a turn this round.
        let b = Balancer::new(&cands(&[1, 2, 3]), LbAlgorithm::RoundRobin, 251);
        let mut st = PickState::default();
        let seq: Vec<u16> = (0..12)
            .map(|p| b.choose(&flow(p), &mut st, &|_| 0, &[]).expect("member"))
            .collect();
        assert_eq!(seq, [2, 1, 0, 2, 1, 2, 2, 1, 0, 2, 1, 2]);
        // Equal weights go in id order, from the first member.
        let b = Balancer::new(&cands(&[5, 5, 5]), LbAlgorithm::RoundRobin, 251);
        let seq: Vec<u16> = (0..6)
            .map(|p| b.choose(&flow(p), &mut st, &|_| 0, &[]).expect("member"))
            .collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_retry_past_a_heavy_member() {
        // Rounds 1..99 hold only the heavy member: a retry that excludes
        // it must still find the light one at once.
        let b = Balancer::new(&cands(&[100, 1]), LbAlgorithm::RoundRobin, 251);
        let mut st = PickState::default();
        for p in 0..300 {
            assert_eq!(b.choose(&flow(p), &mut st, &|_| 0, &[0]), Some(1));
        }
    }

    #[test]
    fn least_connections_follows_counts_that_change_elsewhere() {
        let b = Balancer::new(&cands(&[1, 1, 1, 1, 1]), LbAlgorithm::LeastConnections, 251);
        let mut st = PickState::default();
        let counts = std::cell::RefCell::new(vec![5u64, 5, 5, 5, 5]);
        let active = |i: u16| counts.borrow()[usize::from(i)];
        assert_eq!(b.choose(&flow(1), &mut st, &active, &[]), Some(0));
        // Another worker's connections raise member 0 and 1: the heap's
        // top is re-read before it is taken.
        counts.borrow_mut()[0] = 9;
        counts.borrow_mut()[1] = 9;
        let m = b.choose(&flow(2), &mut st, &active, &[]);
        assert_eq!(m, Some(2));
        // Member 4 drops to 0: seen within n / 2 picks (three here).
        counts.borrow_mut()[4] = 0;
        let picks: Vec<u16> = (0..3)
            .map(|p| b.choose(&flow(p), &mut st, &active, &[]).expect("member"))
            .collect();
        assert!(picks.contains(&4), "{picks:?}");
        // Once seen, it keeps winning while it stays the least loaded.
        for p in 0..5 {
            assert_eq!(b.choose(&flow(p), &mut st, &active, &[]), Some(4));
        }
    }

    #[test]
    fn least_connections_goes_round_equal_members() {
        let b = Balancer::new(&cands(&[2, 2, 2]), LbAlgorithm::LeastConnections, 251);
        let mut st = PickState::default();
        let seq: Vec<u16> = (0..6)
            .map(|p| b.choose(&flow(p), &mut st, &|_| 3, &[]).expect("member"))
            .collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    }

    const ALGORITHMS: [LbAlgorithm; 5] = [
        LbAlgorithm::RoundRobin,
        LbAlgorithm::LeastConnections,
        LbAlgorithm::SourceIp,
        LbAlgorithm::SourceIpPort,
        LbAlgorithm::Maglev,
    ];

    /// A pool from generated parts: (weight, backup, usable) per member.
    fn pool(parts: &[(u32, bool, bool)]) -> Vec<Candidate> {
        parts
            .iter()
            .enumerate()
            .map(|(i, &(weight, backup, usable))| Candidate {
                id: format!("m{i:03}"),
                weight,
                backup,
                usable,
            })
            .collect()
    }

    fn eligible(c: &Candidate) -> bool {
        c.usable && c.weight > 0
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Over a full cycle of the schedule (the weights' sum over their
        /// gcd), each member gets exactly its weight's share, whichever
        /// of two workers makes each pick.
        #[test]
        fn weighted_round_robin_shares_are_exact_per_cycle(
            weights in prop::collection::vec(1u32..=12, 1..12),
            which in prop::collection::vec(any::<bool>(), 256),
        ) {
            let g = weights.iter().fold(0, |g, &w| gcd(g, w));
            let cycle: u32 = weights.iter().map(|w| w / g).sum();
            let b = Balancer::new(&cands(&weights), LbAlgorithm::RoundRobin, 251);
            let mut workers = [PickState::default(), PickState::default()];
            let mut count = vec![0u32; weights.len()];
            for p in 0..cycle * 3 {
                let w = usize::from(which[p as usize % which.len()]);
                let m = b.choose(&flow(p as u16), &mut workers[w], &|_| 0, &[]);
                count[usize::from(m.expect("member"))] += 1;
            }
            for (i, &w) in weights.iter().enumerate() {
                prop_assert_eq!(count[i], 3 * w / g, "member {} of {:?}", i, weights);
            }
        }

        /// Least connections takes a member of the smallest
        /// (active + 1) / weight among the untried eligible primaries.
        #[test]
        fn least_connections_takes_the_least_loaded_per_weight(
            parts in prop::collection::vec((0u32..=5, Just(false), prop::bool::weighted(0.8)), 1..20),
            counts in prop::collection::vec(0u64..50, 20),
            tried in prop::collection::vec(0u16..20, 0..3),
        ) {
            let c = pool(&parts);
            let b = Balancer::new(&c, LbAlgorithm::LeastConnections, 251);
            let mut st = PickState::default();
            let active = |i: u16| counts[usize::from(i)];
            let key = |i: usize| (counts[i] + 1) as f64 / f64::from(c[i].weight);
            let open: Vec<usize> = (0..c.len())
                .filter(|&i| eligible(&c[i]) && !tried.contains(&(i as u16)))
                .collect();
            let got = b.choose(&flow(1), &mut st, &active, &tried);
            match got {
                None => prop_assert!(open.is_empty()),
                Some(m) => {
                    let m = usize::from(m);
                    prop_assert!(open.contains(&m));
                    let best = open.iter().map(|&i| key(i)).fold(f64::INFINITY, f64::min);
                    prop_assert!((key(m) - best).abs() < 1e-9, "{} vs {}", key(m), best);
                }
            }
        }

        /// Whatever the algorithm: tried, down and drained members are never
        /// picked, and a backup only when no primary is left to try.
        #[test]
        fn never_tried_down_or_drained_and_backups_last(
            parts in prop::collection::vec((0u32..=3, any::<bool>(), prop::bool::weighted(0.7)), 1..16),
            tried in prop::collection::vec(0u16..16, 0..4),
            counts in prop::collection::vec(0u64..10, 16),
            port in any::<u16>(),
        ) {
            let c = pool(&parts);
            let primary_left = (0..c.len())
                .any(|i| !c[i].backup && eligible(&c[i]) && !tried.contains(&(i as u16)));
            let any_left = (0..c.len())
                .any(|i| eligible(&c[i]) && !tried.contains(&(i as u16)));
            for algo in ALGORITHMS {
                let b = Balancer::new(&c, algo, 251);
                let mut st = PickState::default();
                let active = |i: u16| counts[usize::from(i)];
                for k in 0..4u16 {
                    let got = b.choose(&flow(port.wrapping_add(k)), &mut st, &active, &tried);
                    match got {
                        None => prop_assert!(!any_left, "{:?}: none picked", algo),
                        Some(m) => {
                            let m = usize::from(m);
                            prop_assert!(m < c.len());
                            prop_assert!(eligible(&c[m]), "{:?} picked {:?}", algo, c[m]);
                            prop_assert!(!tried.contains(&(m as u16)), "{:?} picked tried {}", algo, m);
                            prop_assert_eq!(c[m].backup, !primary_left, "{:?}", algo);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn hashing_is_sticky_per_key() {
        let b = Balancer::new(&cands(&[1, 1, 1, 1]), LbAlgorithm::SourceIpPort, 251);
        let mut st = PickState::default();
        for p in 0..50 {
            let a = b.choose(&flow(p), &mut st, &|_| 0, &[]);
            assert_eq!(a, b.choose(&flow(p), &mut st, &|_| 0, &[]));
        }
    }
}
