//! The Prometheus page (`GET /metrics`), rendered through the `metrics`
//! crate and its Prometheus exporter.
//!
//! The counters live in the workers' own slots ([`crate::stats`]); a scrape
//! reads them once and records them into a recorder made for that scrape.
//! A fresh recorder per scrape means a listener or member removed by a
//! reload disappears from the page instead of lingering as a stale series.

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::stats::StatsReport;
use crate::status::{OperatingStatus, StatusReport};

const STATUSES: [(OperatingStatus, &str); 6] = [
    (OperatingStatus::Online, "ONLINE"),
    (OperatingStatus::Degraded, "DEGRADED"),
    (OperatingStatus::Error, "ERROR"),
    (OperatingStatus::NoMonitor, "NO_MONITOR"),
    (OperatingStatus::Offline, "OFFLINE"),
    (OperatingStatus::Draining, "DRAINING"),
];

/// Renders every counter and status as Prometheus text (format 0.0.4).
/// `workers`: TCP connections each worker holds.
pub fn render(stats: &StatsReport, status: &StatusReport, workers: &[usize]) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        describe();
        gauge!("siphon_config_generation").set(stats.generation as f64);
        for (i, n) in workers.iter().enumerate() {
            gauge!("siphon_worker_connections", "worker" => i.to_string()).set(*n as f64);
        }
        for l in &stats.listeners {
            let id = l.id.clone();
            let c =
                |name: &'static str, v: u64| counter!(name, "listener" => id.clone()).absolute(v);
            c("siphon_listener_bytes_in_total", l.bytes_in);
            c("siphon_listener_bytes_out_total", l.bytes_out);
            c("siphon_listener_connections_total", l.total_connections);
            c("siphon_listener_packets_in_total", l.packets_in);
            c("siphon_listener_packets_out_total", l.packets_out);
            c("siphon_listener_idle_timeouts_total", l.timeouts);
            c("siphon_listener_flows_evicted_total", l.flows_evicted);
            for (reason, v) in [
                ("acl", l.refused_acl),
                ("limit", l.refused_limit),
                ("no_member", l.no_member),
            ] {
                counter!("siphon_listener_refused_total", "listener" => id.clone(), "reason" => reason)
                    .absolute(v);
            }
            for (reason, v) in [
                ("acl", l.dropped_acl),
                ("limit", l.dropped_limit),
                ("no_member", l.dropped_no_member),
                ("to_member", l.dropped_to_member),
                ("to_client", l.dropped_to_client),
                ("kernel", l.dropped_kernel),
            ] {
                counter!("siphon_listener_dropped_packets_total", "listener" => id.clone(), "reason" => reason)
                    .absolute(v);
            }
            gauge!("siphon_listener_active_connections", "listener" => id.clone())
                .set(l.active_connections as f64);
        }
        for m in &stats.members {
            let labels = [("pool", m.pool_id.clone()), ("member", m.id.clone())];
            counter!("siphon_member_bytes_in_total", &labels).absolute(m.bytes_in);
            counter!("siphon_member_bytes_out_total", &labels).absolute(m.bytes_out);
            counter!("siphon_member_connections_total", &labels).absolute(m.total_connections);
            counter!("siphon_member_connect_errors_total", &labels).absolute(m.connect_errors);
            counter!("siphon_member_packets_in_total", &labels).absolute(m.packets_in);
            counter!("siphon_member_packets_out_total", &labels).absolute(m.packets_out);
            counter!("siphon_member_unreachable_total", &labels).absolute(m.unreachable);
            gauge!("siphon_member_active_connections", &labels).set(m.active_connections as f64);
        }
        for p in &status.pools {
            for m in &p.members {
                // One series per status, 1 for the current one: the
                // Prometheus idiom for an enum.
                for (s, name) in STATUSES {
                    gauge!(
                        "siphon_member_status",
                        "pool" => p.id.clone(),
                        "member" => m.id.clone(),
                        "status" => name
                    )
                    .set(if m.operating_status == s { 1.0 } else { 0.0 });
                }
            }
        }
    });
    handle.render()
}

fn describe() {
    describe_gauge!(
        "siphon_config_generation",
        "Generation of the running config"
    );
    describe_gauge!(
        "siphon_worker_connections",
        "TCP connections a worker holds (accepts are spread toward the least busy)"
    );
    let counters = [
        (
            "siphon_listener_bytes_in_total",
            Unit::Bytes,
            "Bytes received from clients",
        ),
        (
            "siphon_listener_bytes_out_total",
            Unit::Bytes,
            "Bytes sent to clients",
        ),
        (
            "siphon_listener_connections_total",
            Unit::Count,
            "Connections (TCP) or flows (UDP) accepted",
        ),
        (
            "siphon_listener_packets_in_total",
            Unit::Count,
            "UDP datagrams from clients",
        ),
        (
            "siphon_listener_packets_out_total",
            Unit::Count,
            "UDP datagrams sent to clients",
        ),
        (
            "siphon_listener_idle_timeouts_total",
            Unit::Count,
            "Connections or flows ended by an idle timeout",
        ),
        (
            "siphon_listener_flows_evicted_total",
            Unit::Count,
            "UDP flows evicted under max_flows",
        ),
        (
            "siphon_listener_refused_total",
            Unit::Count,
            "Connections refused or closed, by reason",
        ),
        (
            "siphon_listener_dropped_packets_total",
            Unit::Count,
            "UDP datagrams dropped, by reason",
        ),
        (
            "siphon_member_bytes_in_total",
            Unit::Bytes,
            "Bytes received from the member",
        ),
        (
            "siphon_member_bytes_out_total",
            Unit::Bytes,
            "Bytes sent to the member",
        ),
        (
            "siphon_member_connections_total",
            Unit::Count,
            "Connections established to the member",
        ),
        (
            "siphon_member_connect_errors_total",
            Unit::Count,
            "Failed connects to the member",
        ),
        (
            "siphon_member_packets_in_total",
            Unit::Count,
            "UDP datagrams from the member",
        ),
        (
            "siphon_member_packets_out_total",
            Unit::Count,
            "UDP datagrams sent to the member",
        ),
        (
            "siphon_member_unreachable_total",
            Unit::Count,
            "ICMP errors on the member's UDP flows",
        ),
    ];
    for (name, unit, help) in counters {
        describe_counter!(name, unit, help);
    }
    describe_gauge!(
        "siphon_listener_active_connections",
        "Open connections (TCP) or flows (UDP)"
    );
    describe_gauge!(
        "siphon_member_active_connections",
        "Open connections to the member"
    );
    describe_gauge!(
        "siphon_member_status",
        "1 for the member's operating status (ONLINE, ERROR, ...), 0 for the others"
    );
}
