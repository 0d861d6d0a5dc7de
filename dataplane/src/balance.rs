//! Backend choice for one pool: the pure part of balancing. No sockets, no
//! clocks; the worker passes the flow, its own round-robin state and a view
//! of active connection counts.
//!
//! Members are grouped into *primary* (non-backup) and *backup*; a member
//! is eligible when it is admin-up and has weight > 0 (weight 0 drains: it
//! keeps its connections but gets no new ones). Backups are used only when
//! no primary is eligible (or every primary was already tried).

use std::net::SocketAddr;

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
pub struct Flow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// One set of eligible members (positions into the pool's member list),
/// ordered by member id, with their Maglev table when the algorithm hashes.
#[derive(Debug, Clone, Default)]
struct Group {
    members: Vec<u16>,
    weights: Vec<u32>,
    table: Option<MaglevTable>,
}

impl Group {
    fn build(all: &[Candidate], backup: bool, algorithm: LbAlgorithm, table_size: u32) -> Group {
        let mut members: Vec<u16> = (0..all.len())
            .filter(|&i| all[i].backup == backup && all[i].usable && all[i].weight > 0)
            .map(|i| i as u16)
            .collect();
        members.sort_by(|&a, &b| all[usize::from(a)].id.cmp(&all[usize::from(b)].id));
        let weights = members
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
        } else {
            None
        };
        Group {
            members,
            weights,
            table,
        }
    }
}

fn hashes(algorithm: LbAlgorithm) -> bool {
    matches!(
        algorithm,
        LbAlgorithm::Maglev | LbAlgorithm::SourceIp | LbAlgorithm::SourceIpPort
    )
}

/// Per-worker mutable state of one pool's balancer: smooth weighted
/// round-robin weights and the least-connections tie-break cursor.
#[derive(Debug, Default, Clone)]
pub struct PickState {
    current: [Vec<i64>; 2],
    cursor: usize,
}

/// An immutable, prebuilt balancer for one pool.
#[derive(Debug, Clone)]
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
    pub fn flow_hash(algorithm: LbAlgorithm, flow: &Flow) -> u64 {
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
        flow: &Flow,
        state: &mut PickState,
        active: &dyn Fn(u16) -> u64,
        tried: &[u16],
    ) -> Option<u16> {
        for (g, group) in self.groups.iter().enumerate() {
            if group.members.iter().all(|m| tried.contains(m)) {
                continue;
            }
            let pick = match self.algorithm {
                LbAlgorithm::RoundRobin => smooth_wrr(group, &mut state.current[g], tried),
                LbAlgorithm::LeastConnections => {
                    least_connections(group, &mut state.cursor, active, tried)
                }
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

/// nginx's smooth weighted round robin: every pick adds each weight to its
/// member's current value and takes the largest, which then pays back the
/// total. Shares are exact and the sequence interleaves.
fn smooth_wrr(group: &Group, current: &mut Vec<i64>, tried: &[u16]) -> Option<u16> {
    if current.len() != group.members.len() {
        *current = vec![0; group.members.len()];
    }
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, &m) in group.members.iter().enumerate() {
        if tried.contains(&m) {
            continue;
        }
        let w = i64::from(group.weights[i]);
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(group.members[b])
}

/// Weighted least connections: the smallest `active / weight`, compared
/// as `a_i * w_j < a_j * w_i`; ties go round from a moving cursor so equal
/// members share new connections.
fn least_connections(
    group: &Group,
    cursor: &mut usize,
    active: &dyn Fn(u16) -> u64,
    tried: &[u16],
) -> Option<u16> {
    let n = group.members.len();
    let mut best: Option<(usize, u64)> = None;
    for k in 0..n {
        let i = (*cursor + k) % n;
        let m = group.members[i];
        if tried.contains(&m) {
            continue;
        }
        let a = active(m);
        let better = match best {
            None => true,
            Some((b, ab)) => {
                u128::from(a) * u128::from(group.weights[b])
                    < u128::from(ab) * u128::from(group.weights[i])
            }
        };
        if better {
            best = Some((i, a));
        }
    }
    let (b, _) = best?;
    *cursor = (b + 1) % n;
    Some(group.members[b])
}

/// Maglev lookup; on a retry, walk the table from the flow's slot to the
/// next member not yet tried, so every node retries the same way.
fn hashed(group: &Group, hash: u64, tried: &[u16]) -> Option<u16> {
    let table = group.table.as_ref()?;
    let start = table.slot_of(hash);
    for k in 0..table.len() {
        let m = group.members[usize::from(table.at(start + k))];
        if !tried.contains(&m) {
            return Some(m);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn flow(port: u16) -> Flow {
        Flow {
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
