//! The dataplane's counters as `GET /v1/stats` reports them: per listener
//! and per member, summed over the workers.

use serde::{Deserialize, Serialize};

/// A point-in-time reading of all counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsReport {
    pub generation: u64,
    pub listeners: Vec<ListenerReport>,
    pub members: Vec<MemberReport>,
}

/// A counter an older dataplane does not report reads as 0.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ListenerReport {
    pub id: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub refused_acl: u64,
    pub refused_limit: u64,
    pub no_member: u64,
    pub local_errors: u64,
    pub accept_pauses: u64,
    pub timeouts: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub dropped_acl: u64,
    pub dropped_limit: u64,
    pub dropped_no_member: u64,
    pub dropped_to_member: u64,
    pub dropped_to_client: u64,
    pub dropped_kernel: u64,
    pub flows_evicted: u64,
    /// Prometheus only: too bulky for every status poll.
    #[serde(skip)]
    pub sessions: HistogramReport,
}

/// A counter an older dataplane does not report reads as 0.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MemberReport {
    pub pool_id: String,
    pub id: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_errors: u64,
    pub connect_timeouts: u64,
    /// Passive ejections after refused connects, after timed-out ones, and
    /// ejections not done because the pool could not spare the member.
    pub ejected_refused: u64,
    pub ejected_timed_out: u64,
    pub ejections_held_back: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub unreachable: u64,
    #[serde(skip)]
    pub connect_time: HistogramReport,
    #[serde(skip)]
    pub check_latency: HistogramReport,
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

/// A histogram read out: per-bucket counts (not cumulative; the last one
/// is above every bound, in microseconds) and the sum. Prometheus only:
/// not part of the JSON report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramReport {
    pub bounds: &'static [u64],
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl HistogramReport {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_what_it_wrote_and_missing_counters_are_zero() {
        let report = StatsReport {
            generation: 4,
            listeners: vec![ListenerReport {
                id: "l".into(),
                total_connections: 9,
                dropped_kernel: 2,
                ..ListenerReport::default()
            }],
            members: vec![MemberReport {
                pool_id: "p".into(),
                id: "m".into(),
                ejected_timed_out: 1,
                ..MemberReport::default()
            }],
        };
        let text = serde_json::to_string(&report).expect("serialize");
        let back: StatsReport = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, report);
        assert!(!text.contains("sessions"), "histograms stay out of JSON");
        let old: StatsReport = serde_json::from_str(
            r#"{"generation":1,"listeners":[{"id":"l","bytes_in":5}],"members":[]}"#,
        )
        .expect("a report without the newer counters");
        assert_eq!(old.listeners[0].bytes_in, 5);
        assert_eq!(old.listeners[0].dropped_kernel, 0);
    }
}
