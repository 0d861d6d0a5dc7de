//! The operating status of what runs, derived from the config, the health
//! book and the live counters (the vocabulary is `siphon_proto::status`).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

pub use siphon_proto::status::*;

use crate::health::{Book, MemberKey};
use crate::snapshot::Snapshot;

/// `GET /v1/status`: every listener, pool and member of the running config.
pub fn report(snapshot: &Snapshot, book: &Book) -> StatusReport {
    let config = &snapshot.config;
    let running: std::collections::HashMap<&str, &crate::snapshot::ListenerRt> = snapshot
        .listeners
        .iter()
        .map(|l| (l.id.as_str(), &**l))
        .collect();
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let rt = running.get(l.id.as_str());
            let active = rt.map_or(0, |r| r.stats.active.load(Relaxed));
            let full = rt
                .and_then(|r| r.connection_limit)
                .is_some_and(|lim| active >= lim);
            let operating_status = if !l.admin_state_up {
                OperatingStatus::Offline
            } else if full {
                OperatingStatus::Degraded
            } else {
                OperatingStatus::Online
            };
            ListenerStatus {
                id: l.id.clone(),
                operating_status,
                active_connections: active,
            }
        })
        .collect();
    let pools = config
        .pools
        .iter()
        .map(|p| {
            let members: Vec<MemberStatus> = p
                .members
                .iter()
                .map(|m| {
                    let key = MemberKey {
                        pool: p.id.clone(),
                        member: m.id.clone(),
                    };
                    let record = book.get(&key).filter(|_| m.admin_state_up);
                    let operating_status = match record {
                        None => OperatingStatus::Offline,
                        Some(r) if !r.up => OperatingStatus::Error,
                        Some(_) if m.weight == 0 => OperatingStatus::Draining,
                        Some(r) if r.target.check.is_some() => OperatingStatus::Online,
                        Some(_) => OperatingStatus::NoMonitor,
                    };
                    MemberStatus {
                        id: m.id.clone(),
                        address: m.address.clone(),
                        protocol_port: m.protocol_port,
                        operating_status,
                        since: record.map(|r| unix_seconds(r.since)),
                        reason: record.and_then(|r| r.reason.clone()),
                    }
                })
                .collect();
            PoolStatus {
                id: p.id.clone(),
                operating_status: OperatingStatus::of_pool(&members),
                members,
            }
        })
        .collect();
    StatusReport {
        generation: config.generation,
        listeners,
        pools,
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
