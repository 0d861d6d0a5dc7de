//! Operating status in Octavia's vocabulary: what the dataplane's
//! `GET /v1/status` answers and what an agent reports upstream.
//!
//! Member: `OFFLINE` (admin down), `ERROR` (failed its checks or was
//! ejected), `DRAINING` (weight 0), `ONLINE` (checked and up), `NO_MONITOR`
//! (up, no monitor). Pool: `ERROR` when no member can take a connection,
//! `DEGRADED` when some member is in `ERROR`, else `ONLINE`
//! ([`OperatingStatus::of_pool`]). Listener: `OFFLINE` (admin down),
//! `DEGRADED` at its `connection_limit`, else `ONLINE`.

use serde::{Deserialize, Serialize};

words! {
    /// Octavia's `operating_status` (health as observed): the dataplane's,
    /// the heartbeat's and the controller's one vocabulary.
    pub enum OperatingStatus {
        Online = "ONLINE",
        Draining = "DRAINING",
        Offline = "OFFLINE",
        Degraded = "DEGRADED",
        Error = "ERROR",
        NoMonitor = "NO_MONITOR",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub generation: u64,
    pub listeners: Vec<ListenerStatus>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerStatus {
    pub id: String,
    pub operating_status: OperatingStatus,
    pub active_connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub id: String,
    pub operating_status: OperatingStatus,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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

impl OperatingStatus {
    /// A pool's status from its members'.
    pub fn of_pool(members: &[MemberStatus]) -> OperatingStatus {
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
}

impl StatusReport {
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
        let pool = OperatingStatus::of_pool;
        assert_eq!(pool(&[m(Online), m(NoMonitor)]), Online);
        assert_eq!(pool(&[m(Online), m(Error)]), Degraded);
        assert_eq!(pool(&[m(Error), m(Offline)]), Error);
        assert_eq!(pool(&[m(Draining)]), Error);
        assert_eq!(pool(&[]), Error);
        assert_eq!(pool(&[m(Online), m(Offline), m(Draining)]), Online);
    }

    #[test]
    fn a_report_reads_back_what_it_wrote() {
        let report = StatusReport {
            generation: 7,
            listeners: vec![ListenerStatus {
                id: "l".into(),
                operating_status: Degraded,
                active_connections: 3,
            }],
            pools: vec![PoolStatus {
                id: "p".into(),
                operating_status: Online,
                members: vec![MemberStatus {
                    since: Some(1_700_000_000),
                    reason: Some("L4 check passed".into()),
                    ..m(NoMonitor)
                }],
            }],
        };
        let text = serde_json::to_string(&report).expect("serialize");
        assert!(text.contains("\"NO_MONITOR\""), "{text}");
        let back: StatusReport = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, report);
        for s in [Online, Degraded, Error, NoMonitor, Offline, Draining] {
            let json = serde_json::to_string(&s).expect("serialize");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
    }
}
