//! The controller's Prometheus page (`GET /metrics`, no token: counts
//! only, no ids), rendered through the `metrics` crate's Prometheus
//! exporter into a recorder made for each scrape, like the dataplane's.

use std::sync::atomic::{AtomicU64, Ordering};

use ::metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use siphon_proto::bgp::BgpStatus;

use crate::model::{AmphoraStatus, ProvisioningStatus, State};

/// Counters the controller's tasks move.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Re-pushes to an amphora out of step.
    pub repairs: AtomicU64,
    pub repair_failures: AtomicU64,
    /// Amphorae replaced by a spare (silent, or out of step too long).
    pub failovers: AtomicU64,
    /// Failed load-balancer changes tried again.
    pub retries: AtomicU64,
    /// Pushes to an agent that failed (after their own retries).
    pub push_failures: AtomicU64,
    /// Heartbeats refused (bad MAC, replayed, stale, unknown sender).
    pub heartbeats_rejected: AtomicU64,
    pub heartbeats_accepted: AtomicU64,
    /// Amphorae judged out of step on the last pass (a gauge).
    pub out_of_step: AtomicU64,
}

impl Metrics {
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, g: &AtomicU64, v: u64) {
        g.store(v, Ordering::Relaxed);
    }

    /// The page, with the store's object counts by status and what the
    /// amphorae last said of BGP (`bgp`: one status per amphora heard).
    pub fn render(&self, s: &State, bgp: &[BgpStatus]) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ::metrics::with_local_recorder(&recorder, || {
            describe_counter!(
                "siphon_control_repairs_total",
                "Re-pushes of config and VIP to an amphora out of step"
            );
            describe_counter!(
                "siphon_control_repair_failures_total",
                "Re-pushes that failed"
            );
            describe_counter!(
                "siphon_control_failovers_total",
                "Amphorae replaced by a spare"
            );
            describe_counter!(
                "siphon_control_retries_total",
                "Failed load-balancer changes tried again"
            );
            describe_counter!(
                "siphon_control_push_failures_total",
                "Pushes to an agent that failed after their retries"
            );
            describe_counter!(
                "siphon_control_heartbeats_total",
                "Heartbeats received, by result"
            );
            describe_gauge!(
                "siphon_control_amphorae_out_of_step",
                "Amphorae whose last report differs from what was pushed to them"
            );
            describe_gauge!("siphon_control_amphorae", "Amphorae by status");
            describe_gauge!(
                "siphon_control_loadbalancers",
                "Load balancers by provisioning status"
            );
            counter!("siphon_control_repairs_total").absolute(get(&self.repairs));
            counter!("siphon_control_repair_failures_total").absolute(get(&self.repair_failures));
            counter!("siphon_control_failovers_total").absolute(get(&self.failovers));
            counter!("siphon_control_retries_total").absolute(get(&self.retries));
            counter!("siphon_control_push_failures_total").absolute(get(&self.push_failures));
            counter!("siphon_control_heartbeats_total", "result" => "accepted")
                .absolute(get(&self.heartbeats_accepted));
            counter!("siphon_control_heartbeats_total", "result" => "rejected")
                .absolute(get(&self.heartbeats_rejected));
            gauge!("siphon_control_amphorae_out_of_step").set(get(&self.out_of_step) as f64);
            if !bgp.is_empty() {
                describe_gauge!(
                    "siphon_control_bgp_sessions",
                    "Amphorae's BGP sessions, by state, as last heard"
                );
                describe_gauge!(
                    "siphon_control_bgp_announced_vips",
                    "VIPs the amphorae announce over BGP, as last heard"
                );
                let sessions = || bgp.iter().flat_map(|b| &b.sessions);
                let up = sessions().filter(|x| x.state == "Established").count();
                let bfd_down = sessions()
                    .filter(|x| x.bfd.as_deref().is_some_and(|b| b != "Up"))
                    .count();
                gauge!("siphon_control_bgp_sessions", "state" => "established").set(up as f64);
                gauge!("siphon_control_bgp_sessions", "state" => "other")
                    .set((sessions().count() - up) as f64);
                gauge!("siphon_control_bgp_sessions", "state" => "bfd_down").set(bfd_down as f64);
                let announced: usize = bgp.iter().map(|b| b.announced.len()).sum();
                gauge!("siphon_control_bgp_announced_vips").set(announced as f64);
            }
            for (status, name) in [
                (AmphoraStatus::Booting, "BOOTING"),
                (AmphoraStatus::Ready, "READY"),
                (AmphoraStatus::Allocated, "ALLOCATED"),
                (AmphoraStatus::Error, "ERROR"),
                (AmphoraStatus::FailoverStopped, "FAILOVER_STOPPED"),
            ] {
                let n = s.amphorae.values().filter(|a| a.status == status).count();
                gauge!("siphon_control_amphorae", "status" => name).set(n as f64);
            }
            for status in [
                ProvisioningStatus::Active,
                ProvisioningStatus::PendingCreate,
                ProvisioningStatus::PendingUpdate,
                ProvisioningStatus::PendingDelete,
                ProvisioningStatus::Error,
            ] {
                let n = s
                    .load_balancers
                    .values()
                    .filter(|l| l.common.provisioning_status == status)
                    .count();
                gauge!("siphon_control_loadbalancers", "provisioning_status" => status.as_str())
                    .set(n as f64);
            }
        });
        handle.render()
    }
}
