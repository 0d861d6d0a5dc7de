//! The repairer: the controller is level-triggered. For every amphora it
//! knows what it wants there (the config generation last pushed, the VIP
//! of its load balancer) and compares it with what the amphora last
//! reported in a heartbeat, on every pass. A difference is repaired:
//!
//! 1. **re-push** (a new generation of the same rendered config, and the
//!    VIP), retried with doubling back-off;
//! 2. **fail over** when the amphora stays out of step for longer than
//!    `health.repair_timeout_ms` (and a spare is there);
//! 3. a **failed change of a load balancer** (a failover whose push
//!    failed, a create no spare could take) is retried with the same
//!    back-off until it succeeds or the load balancer is deleted.
//!
//! The decisions ([`drift`], [`backoff`], [`lb_operating`]) are pure
//! functions of what is stored, what was reported and the time; [`run`]
//! is the shell that reads the clock and does the pushes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{AmphoraStatus, LoadBalancer, OperatingStatus, ProvisioningStatus};
use crate::{Controller, Job};

/// A heartbeat sent this soon after a push finished may describe the
/// amphora from before it: such reports are not judged.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What an amphora said of itself in its last verified heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The generation its dataplane runs; `None`: the dataplane did not
    /// answer the agent.
    pub generation: Option<u64>,
    /// The generation its agent keeps on disk (`None`: not reported).
    pub persisted_generation: Option<Option<u64>>,
    /// The VIPs its agent holds (`None`: not reported).
    pub vips: Option<Vec<String>>,
}

/// What the controller knows of one amphora at run time (not stored: a
/// restarted controller learns it again from the next heartbeats).
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub report: Option<Report>,
    /// When `report` arrived.
    pub received: Option<Instant>,
    /// When the last push to it finished (successfully).
    pub pushed: Option<Instant>,
    /// Since when it has been out of step (judged).
    pub drift_since: Option<Instant>,
    /// Why, as last judged.
    pub drift: Option<String>,
    /// Repairs that failed in a row, and when the next one may start.
    pub failures: u32,
    pub next_try: Option<Instant>,
    /// Heartbeat-key pushes that failed in a row, and when the next may
    /// start.
    pub key_failures: u32,
    pub key_next_try: Option<Instant>,
    /// A heartbeat signed with the bootstrap key came for it although it
    /// holds its own: its key is pushed again.
    pub rekey: bool,
}

impl Live {
    /// Whether `report` can be judged: it arrived after the last push
    /// settled.
    pub fn judgeable(&self) -> bool {
        match (self.received, self.pushed) {
            (Some(r), Some(p)) => r > p + SETTLE,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// What `a` lacks of what it should run, or `None` when it is in step.
/// `want_generation`: the generation last pushed to it; `vip`: the VIP it
/// must hold.
pub fn drift(want_generation: u64, vip: Option<&str>, r: &Report) -> Option<String> {
    match r.generation {
        None => return Some("its dataplane does not answer its agent".into()),
        Some(g) if g < want_generation => {
            return Some(format!(
                "its dataplane runs generation {g}, generation {want_generation} was pushed"
            ))
        }
        Some(_) => {}
    }
    if let Some(persisted) = r.persisted_generation {
        match persisted {
            Some(g) if g >= want_generation => {}
            Some(g) => {
                return Some(format!(
                    "its agent keeps generation {g}, generation {want_generation} was pushed"
                ))
            }
            None => return Some("its agent keeps no config".into()),
        }
    }
    if let (Some(vip), Some(held)) = (vip, &r.vips) {
        if !holds(held, vip) {
            return Some(format!(
                "its agent does not hold the VIP {vip} (missing from its interface)"
            ));
        }
    }
    None
}

/// Whether `held` (addresses, with or without a prefix) has `vip`: the
/// same text, or the same address however it is written.
fn holds(held: &[String], vip: &str) -> bool {
    let want = vip.parse::<std::net::IpAddr>().ok();
    held.iter().any(|v| {
        let addr = v.split('/').next().unwrap_or(v);
        v == vip
            || addr == vip
            || want.is_some_and(|w| addr.parse::<std::net::IpAddr>().ok() == Some(w))
    })
}

/// The wait after `failures` failed attempts in a row: `first`, doubled
/// each time, at most `max`.
pub fn backoff(failures: u32, first: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(max)
}

/// A load balancer's operating status from how many of its `amphorae`
/// serve its config: none → `ERROR` (its VIP is not served), some →
/// `DEGRADED`, all → what heartbeats say (`None`: leave it).
pub fn lb_operating(lb: &LoadBalancer, amphorae: usize, in_step: usize) -> Option<OperatingStatus> {
    if !lb.common.admin_state_up || amphorae == 0 {
        return None;
    }
    if in_step == 0 {
        Some(OperatingStatus::Error)
    } else if in_step < amphorae {
        Some(OperatingStatus::Degraded)
    } else {
        None
    }
}

/// `now + d` in Octavia's timestamp format.
pub fn at(d: Duration) -> String {
    at_time(std::time::SystemTime::now() + d)
}

/// `t` in Octavia's timestamp format (UTC, no zone).
pub fn at_time(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    t.format(&format).unwrap_or_default()
}

/// One pass's decision for an amphora.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Repush {
        amphora: String,
        lb: String,
        reason: String,
    },
    FailOver {
        amphora: String,
        lb: String,
        reason: String,
    },
}

/// Runs until `stopped`.
pub async fn run(ctl: Arc<Controller>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let every = ctl
        .config
        .health
        .as_ref()
        .map_or(Duration::from_millis(500), |h| {
            h.check_interval().max(Duration::from_millis(100))
        });
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if ctl.agents.is_none() {
            continue;
        }
        retry_failed_changes(&ctl);
        if ctl.config.health.is_some() {
            crate::keys_push::provision(&ctl);
            for step in judge(&ctl, Instant::now()) {
                act(&ctl, step);
            }
        }
    }
}

/// Load balancers whose own change failed go back to pending once their
/// back-off passed, so the provisioner tries again.
fn retry_failed_changes(ctl: &Controller) {
    let now = crate::now();
    let r = ctl.db.write(|s, tx| -> Result<usize, crate::store::StoreError> {
        let mut n = 0;
        for lb in s.load_balancers.values() {
            let Some(retry) = &lb.retry else { continue };
            if lb.common.provisioning_status != ProvisioningStatus::Error {
                continue;
            }
            if lb.common.next_attempt_at.as_deref().is_some_and(|t| t > now.as_str()) {
                continue;
            }
            let mut l = lb.clone();
            l.common.provisioning_status = retry.status;
            l.common.next_attempt_at = None;
            l.common.updated_at = Some(now.clone());
            tracing::info!(loadbalancer = %l.common.id, attempt = retry.failures + 1, reason = ?l.common.provisioning_error, "retrying a failed change");
            tx.put(l);
            n += 1;
        }
        Ok(n)
    });
    match r {
        Ok(0) => {}
        Ok(n) => {
            ctl.metrics.add(&ctl.metrics.retries, n as u64);
            ctl.wake.notify_one();
        }
        Err(e) => tracing::error!(error = %e, "retry not stored"),
    }
}

/// Compares every carrying amphora with its last report; records the
/// verdicts in `ctl.live` and operating statuses in the store; returns
/// what to do.
fn judge(ctl: &Controller, now: Instant) -> Vec<Step> {
    let Some(h) = &ctl.config.health else {
        return Vec::new();
    };
    let timeout = h.repair_timeout();
    let mut steps = Vec::new();
    let mut out_of_step = 0u64;
    let r = ctl.db.write(|s, tx| -> Result<(), crate::store::StoreError> {
        let mut live = ctl.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
        for a in s.amphorae.values() {
            let Some(lb_id) = a.load_balancer_id.as_deref() else {
                continue;
            };
            let Some(lb) = s.load_balancers.get(lb_id) else {
                continue;
            };
            // Mid-change: the provisioner is at it.
            if lb.common.provisioning_status.is_pending() || a.status != AmphoraStatus::Allocated {
                continue;
            }
            let l = live.entry(a.id.clone()).or_default();
            let c = counts.entry(lb_id).or_default();
            c.0 += 1;
            if !l.judgeable() || crate::health::silent(ctl, &a.id, h.heartbeat_timeout()) {
                // Silent ones are the health manager's; unjudged ones
                // count as in step until a report says otherwise.
                if l.drift.is_none() {
                    c.1 += 1;
                }
                continue;
            }
            let report = l.report.clone().unwrap_or_default();
            let vip = (lb.common.provisioning_status != ProvisioningStatus::Error
                || lb.common.deployed)
                .then_some(lb.vip_address.as_str());
            match drift(a.generation, vip, &report) {
                None => {
                    c.1 += 1;
                    if l.drift.take().is_some() {
                        tracing::info!(amphora = %a.id, loadbalancer = %lb_id, "amphora in step again");
                    }
                    l.drift_since = None;
                    l.failures = 0;
                    l.next_try = None;
                    if a.error.is_some() || a.next_attempt_at.is_some() {
                        let mut a = a.clone();
                        a.error = None;
                        a.next_attempt_at = None;
                        tx.put(a);
                    }
                }
                Some(reason) => {
                    out_of_step += 1;
                    let since = *l.drift_since.get_or_insert(now);
                    if l.drift.as_deref() != Some(reason.as_str()) {
                        tracing::warn!(amphora = %a.id, loadbalancer = %lb_id, %reason, "amphora out of step; repairing");
                        l.drift = Some(reason.clone());
                    }
                    // Its `error` says what is wrong (a failed repair adds
                    // why it failed).
                    if !a.error.as_deref().is_some_and(|e| e.starts_with(reason.as_str())) {
                        let mut a = a.clone();
                        a.error = Some(reason.clone());
                        tx.put(a);
                    }
                    if now.duration_since(since) > timeout {
                        steps.push(Step::FailOver {
                            amphora: a.id.clone(),
                            lb: lb_id.to_owned(),
                            reason: format!(
                                "{reason}, and no repair brought it in step within {} ms",
                                timeout.as_millis()
                            ),
                        });
                    } else if l.next_try.is_none_or(|t| now >= t) {
                        steps.push(Step::Repush {
                            amphora: a.id.clone(),
                            lb: lb_id.to_owned(),
                            reason,
                        });
                    }
                }
            }
        }
        for (lb_id, (n, in_step)) in counts {
            let Some(lb) = s.load_balancers.get(lb_id) else {
                continue;
            };
            if let Some(st) = lb_operating(lb, n, in_step) {
                if lb.common.operating_status != st {
                    let mut lb = lb.clone();
                    lb.common.operating_status = st;
                    tx.put(lb);
                }
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        tracing::error!(error = %e, "repair statuses not stored");
    }
    ctl.metrics.set(&ctl.metrics.out_of_step, out_of_step);
    steps
}

/// Starts what `step` says, unless its load balancer is already being
/// worked on (the next pass sees it again).
fn act(ctl: &Arc<Controller>, step: Step) {
    match step {
        Step::Repush {
            amphora,
            lb,
            reason,
        } => {
            let Some(claim) = ctl.claim(Job::LoadBalancer(lb)) else {
                return;
            };
            let ctl = ctl.clone();
            tokio::spawn(async move {
                repush(&ctl, &amphora, &reason).await;
                drop(claim);
            });
        }
        Step::FailOver {
            amphora,
            lb,
            reason,
        } => fail_over(ctl, &amphora, &lb, &reason),
    }
}

/// Pushes the amphora's config and VIP again (a new generation), and
/// schedules the next attempt when that fails.
async fn repush(ctl: &Controller, amphora: &str, reason: &str) {
    ctl.metrics.add(&ctl.metrics.repairs, 1);
    let r = crate::provision::push_one(ctl, amphora).await;
    let now = Instant::now();
    let (failures, next) = {
        let mut live = ctl.live.lock().unwrap_or_else(|e| e.into_inner());
        let l = live.entry(amphora.to_owned()).or_default();
        match &r {
            Ok(()) => {
                l.failures = 0;
                l.next_try = None;
                (0, None)
            }
            Err(_) => {
                l.failures = l.failures.saturating_add(1);
                let d = backoff(l.failures, ctl.config.push.backoff(), ctl.retry_max());
                l.next_try = Some(now + d);
                (l.failures, Some(d))
            }
        }
    };
    match r {
        Ok(()) => {
            tracing::info!(%amphora, %reason, "amphora repaired: config and VIP pushed again")
        }
        Err(e) => {
            ctl.metrics.add(&ctl.metrics.repair_failures, 1);
            let next = next.unwrap_or_default();
            tracing::error!(%amphora, %reason, error = %e, failures, next_attempt_in_ms = next.as_millis() as u64, "repair failed");
            let error = format!("{reason}; repair failed: {e}");
            let _ = ctl
                .db
                .write(|s, tx| -> Result<(), crate::store::StoreError> {
                    if let Some(a) = s.amphorae.get(amphora) {
                        let mut a = a.clone();
                        a.error = Some(error);
                        a.next_attempt_at = Some(at(next));
                        tx.put(a);
                    }
                    Ok(())
                });
        }
    }
}

/// Replaces an amphora no repair brought in step with a spare.
fn fail_over(ctl: &Controller, amphora: &str, lb: &str, reason: &str) {
    let r = ctl
        .db
        .write(|s, tx| -> Result<bool, crate::store::StoreError> {
            let Some(a) = s.amphorae.get(amphora) else {
                return Ok(false);
            };
            let Some(l) = s.load_balancers.get(lb) else {
                return Ok(false);
            };
            if a.load_balancer_id.as_deref() != Some(lb)
                || l.common.provisioning_status.is_pending()
            {
                return Ok(false);
            }
            let mut taken = std::collections::HashSet::new();
            let spares = crate::provision::all_spares(s, ctl);
            if spares.is_empty() {
                let why = format!("{reason}; no spare amphora to fail over to");
                if a.error.as_deref() != Some(why.as_str()) {
                    tracing::error!(%amphora, loadbalancer = %lb, "{why}");
                    let mut a = a.clone();
                    a.error = Some(why);
                    tx.put(a);
                }
                return Ok(false);
            }
            Ok(crate::provision::fail_over(
                s,
                tx,
                ctl,
                lb,
                &[amphora.to_owned()],
                reason,
                &mut taken,
            ) > 0)
        });
    match r {
        Ok(true) => {
            ctl.metrics.add(&ctl.metrics.failovers, 1);
            ctl.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(amphora);
            ctl.wake.notify_one();
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "failover not stored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(g: Option<u64>) -> Report {
        Report {
            generation: g,
            ..Report::default()
        }
    }

    #[test]
    fn drift_names_what_is_missing() {
        assert_eq!(drift(5, None, &report(Some(5))), None);
        assert_eq!(drift(5, None, &report(Some(6))), None);
        assert!(drift(5, None, &report(Some(0)))
            .unwrap()
            .contains("runs generation 0"));
        assert!(drift(5, None, &report(None))
            .unwrap()
            .contains("does not answer"));
        let lost = Report {
            generation: Some(5),
            persisted_generation: Some(None),
            vips: None,
        };
        assert!(drift(5, None, &lost).unwrap().contains("keeps no config"));
        let no_vip = Report {
            generation: Some(5),
            persisted_generation: Some(Some(5)),
            vips: Some(vec!["198.18.0.9".into()]),
        };
        assert!(drift(5, Some("198.18.0.7"), &no_vip)
            .unwrap()
            .contains("VIP 198.18.0.7"));
        assert_eq!(drift(5, Some("198.18.0.9"), &no_vip), None);
        // As agents list them: with a prefix, IPv6 however written.
        let listed = Report {
            vips: Some(vec!["198.18.0.9/32".into(), "2001:db8::9/128".into()]),
            ..no_vip.clone()
        };
        assert_eq!(drift(5, Some("198.18.0.9"), &listed), None);
        assert_eq!(drift(5, Some("2001:db8::9"), &listed), None);
        assert_eq!(drift(5, Some("2001:DB8:0::9"), &listed), None);
        assert!(drift(5, Some("198.18.0.90"), &listed).is_some());
        // None listed: missing; not said: not judged.
        let none = Report {
            vips: Some(vec![]),
            ..no_vip.clone()
        };
        assert!(drift(5, Some("198.18.0.9"), &none)
            .unwrap()
            .contains("missing"));
        let unsaid = Report {
            vips: None,
            ..no_vip
        };
        assert_eq!(drift(5, Some("198.18.0.9"), &unsaid), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let f = Duration::from_millis(200);
        let m = Duration::from_secs(30);
        assert_eq!(backoff(1, f, m), f);
        assert_eq!(backoff(2, f, m), f * 2);
        assert_eq!(backoff(4, f, m), f * 8);
        assert_eq!(backoff(60, f, m), m);
    }
}
