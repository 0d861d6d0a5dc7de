//! The Prometheus page (`GET /metrics`), rendered through the `metrics`
//! crate and its Prometheus exporter.
//!
//! The counters live in the workers' own slots ([`crate::stats`]); a scrape
//! reads them once and records them into a recorder made for that scrape.
//! A fresh recorder per scrape means a listener or member removed by a
//! reload disappears from the page instead of lingering as a stale series.

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::stats::{HistogramReport, StatsReport};
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
            c("siphon_listener_accept_pauses_total", l.accept_pauses);
            for (reason, v) in [
                ("acl", l.refused_acl),
                ("limit", l.refused_limit),
                ("no_member", l.no_member),
                ("local_resources", l.local_errors),
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
            counter!("siphon_member_connect_timeouts_total", &labels).absolute(m.connect_timeouts);
            for (reason, v) in [
                ("refused", m.ejected_refused),
                ("timed_out", m.ejected_timed_out),
            ] {
                counter!(
                    "siphon_member_ejections_total",
                    "pool" => m.pool_id.clone(),
                    "member" => m.id.clone(),
                    "reason" => reason
                )
                .absolute(v);
            }
            counter!("siphon_member_ejections_held_back_total", &labels)
                .absolute(m.ejections_held_back);
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
    let mut page = handle.render();
    histograms(&mut page, stats);
    page
}

const HISTOGRAMS: [(&str, &str); 3] = [
    (
        "siphon_listener_session_seconds",
        "How long TCP sessions lasted, accept to close",
    ),
    (
        "siphon_member_connect_seconds",
        "How long connects to the member took",
    ),
    (
        "siphon_member_check_seconds",
        "How long the member's passing health checks took",
    ),
];

/// The latency histograms, written out directly: the workers bucket them
/// as they go (the `metrics` crate's histograms would want every sample).
fn histograms(page: &mut String, stats: &StatsReport) {
    use std::fmt::Write;
    let [sessions, connects, checks] = HISTOGRAMS;
    let head = |page: &mut String, (name, help): (&str, &str)| {
        let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} histogram");
    };
    head(page, sessions);
    for l in &stats.listeners {
        histogram(page, sessions.0, &[("listener", &l.id)], &l.sessions);
    }
    head(page, connects);
    for m in &stats.members {
        let labels = [("pool", m.pool_id.as_str()), ("member", m.id.as_str())];
        histogram(page, connects.0, &labels, &m.connect_time);
    }
    head(page, checks);
    for m in &stats.members {
        let labels = [("pool", m.pool_id.as_str()), ("member", m.id.as_str())];
        histogram(page, checks.0, &labels, &m.check_latency);
    }
}

/// Appends one histogram series in Prometheus text format (cumulative
/// buckets, `le` in seconds). The `metrics` crate's histograms take raw
/// samples; these are already bucketed by the workers, so they are written
/// out directly.
fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], h: &HistogramReport) {
    use std::fmt::Write;
    let mut base = String::new();
    for (k, v) in labels {
        let _ = write!(base, "{k}=\"{}\",", escape(v));
    }
    let mut cumulative = 0;
    for (i, c) in h.counts.iter().enumerate() {
        cumulative += c;
        let le = h
            .bounds
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |us| seconds(*us));
        let _ = writeln!(out, "{name}_bucket{{{base}le=\"{le}\"}} {cumulative}");
    }
    let labels = base.trim_end_matches(',');
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(h.sum_us));
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

fn seconds(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// A label value as Prometheus' text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
            "siphon_listener_accept_pauses_total",
            Unit::Count,
            "Times accepting paused because the process ran short of descriptors or memory",
        ),
        (
            "siphon_listener_refused_total",
            Unit::Count,
            "Connections refused or reset, by reason (local_resources: this process ran short of descriptors, memory or ports)",
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
            "Failed connects to the member (refused, reset, unreachable or timed out)",
        ),
        (
            "siphon_member_connect_timeouts_total",
            Unit::Count,
            "Connects to the member that timed out",
        ),
        (
            "siphon_member_ejections_total",
            Unit::Count,
            "Passive ejections, by reason (refused or timed_out connects in a row)",
        ),
        (
            "siphon_member_ejections_held_back_total",
            Unit::Count,
            "Ejections not done because the pool could not spare the member",
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
