//! Operating status in Octavia's vocabulary, derived from the config, the
//! health book and the live counters: what `GET /v1/status` shows and what
//! an agent reports upstream.
//!
//! Member: `OFFLINE` (admin down), `ERROR` (failed its checks or was
//! ejected), `DRAINING` (weight 0), `ONLINE` (checked and up), `NO_MONITOR`
//! (up, no monitor). Pool: `ERROR` when no member can take a connection,
//! `DEGRADED` when some member is in `ERROR`, else `ONLINE`. Listener:
//! `OFFLINE` (admin down), `DEGRADED` at its `connection_limit`, else
//! `ONLINE`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::health::{Book, MemberKey};
use crate::snapshot::Snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperatingStatus {
    Online,
    Degraded,
    Error,
    NoMonitor,
    Offline,
    Draining,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusReport {
    pub generation: u64,
    pub listeners: Vec<ListenerStatus>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ListenerStatus {
    pub id: String,
    pub operating_status: OperatingStatus,
    pub active_connections: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub id: String,
    pub operating_status: OperatingStatus,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: String,
    pub address: String,
    pub protocol_port: i64,
    pub operating_status: OperatingStatus,
    /// Seconds since the Unix epoch when the health state last changed (or
    /// the member got its current check); absent for admin-down members.
    pub since: Option<u64>,
    /// Why the member is in its health state, once a check said so.
    pub reason: Option<String>,
}

impl StatusReport {
    pub fn build(snapshot: &Snapshot, book: &Book) -> StatusReport {
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
                    operating_status: pool_status(&members),
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

    pub fn member(&self, pool: &str, member: &str) -> Option<&MemberStatus> {
        self.pools
            .iter()
            .find(|p| p.id == pool)?
            .members
            .iter()
            .find(|m| m.id == member)
    }

    pub fn pool(&self, pool: &str) -> Option<&PoolStatus> {
        self.pools.iter().find(|p| p.id == pool)
    }
}

fn pool_status(members: &[MemberStatus]) -> OperatingStatus {
    use OperatingStatus::*;
    let serving = members
        .iter()
        .any(|m| matches!(m.operating_status, Online | NoMonitor));
    let failed = members.iter().any(|m| m.operating_status == Error);
    match (serving, failed) {
        (false, _) => Error,
        (true, true) => Degraded,
        (true, false) => Online,
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use OperatingStatus::*;

    fn m(s: OperatingStatus) -> MemberStatus {
        MemberStatus {
            id: String::new(),
            address: String::new(),
            protocol_port: 1,
            operating_status: s,
            since: None,
            reason: None,
        }
    }

    #[test]
    fn pool_status_follows_its_members() {
        assert_eq!(pool_status(&[m(Online), m(NoMonitor)]), Online);
        assert_eq!(pool_status(&[m(Online), m(Error)]), Degraded);
        assert_eq!(pool_status(&[m(Error), m(Offline)]), Error);
        assert_eq!(pool_status(&[m(Draining)]), Error);
        assert_eq!(pool_status(&[]), Error);
        assert_eq!(pool_status(&[m(Online), m(Offline), m(Draining)]), Online);
    }
}
