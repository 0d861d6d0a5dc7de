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
//! The decisions are [`crate::decide::repair`]'s; this is the shell that
//! reads the clock, records verdicts and does the pushes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decide::repair::{Relief, Step};
use crate::liveness::Verdict;
use crate::{Controller, Job};

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
        // Without the database nothing is decided (nor pushed).
        if ctl.db.refresh().await.is_err() {
            continue;
        }
        retry_failed_changes(&ctl).await;
        if ctl.policy.health.is_some() {
            crate::keys_push::provision(&ctl).await;
            for step in judge(&ctl, Instant::now()).await {
                act(&ctl, step).await;
            }
        }
    }
}

/// Load balancers whose own change failed go back to pending once their
/// back-off passed, so the provisioner tries again.
async fn retry_failed_changes(ctl: &Controller) {
    let now = crate::now();
    let r = ctl.db.write(|s, tx| -> Result<usize, crate::store::StoreError> {
        let due = crate::decide::repair::due_retries(s, &now);
        for lb in &due {
            let mut l = (*lb).clone();
            if let Some(retry) = &lb.retry {
                l.common.provisioning_status = retry.status;
                tracing::info!(loadbalancer = %l.common.id, attempt = retry.failures + 1, reason = ?l.common.provisioning_error, "retrying a failed change");
            }
            l.common.next_attempt_at = None;
            l.common.updated_at = Some(now.clone());
            tx.put(l);
        }
        Ok(due.len())
    }).await;
    match r {
        Ok(0) => {}
        Ok(n) => {
            ctl.metrics.add(&ctl.metrics.retries, n as u64);
            ctl.wake.notify_one();
        }
        Err(e) => tracing::error!(error = %e, "retry not stored"),
    }
}

/// Judges every carrying amphora ([`crate::decide::repair::judge`]),
/// stores what it decided, records the verdicts, and returns the steps.
async fn judge(ctl: &Controller, now: Instant) -> Vec<Step> {
    // The view and the verdicts inside the write: a push that finished
    // (and was stored) before is in the view, and none lands between
    // judging and recording.
    let r = ctl
        .db
        .write(|s, tx| -> Result<_, crate::store::StoreError> {
            let view = ctl.liveness.view(now);
            let j = crate::decide::repair::judge(s, &view, &ctl.policy, tx);
            ctl.liveness.judged(&j.verdicts);
            Ok((view, j))
        })
        .await;
    let (view, j) = match r {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "repair statuses not stored");
            return Vec::new();
        }
    };
    for (id, v) in &j.verdicts {
        let was = view.get(id).and_then(|l| l.drift.as_deref());
        match v {
            Verdict::InStep if was.is_some() => {
                tracing::info!(amphora = %id, "amphora in step again")
            }
            Verdict::Drift { reason, .. } if was != Some(reason.as_str()) => {
                tracing::warn!(amphora = %id, %reason, "amphora out of step; repairing")
            }
            _ => {}
        }
    }
    ctl.metrics.set(&ctl.metrics.out_of_step, j.out_of_step);
    j.steps
}

/// Starts what `step` says, unless its load balancer is already being
/// worked on (the next pass sees it again).
async fn act(ctl: &Arc<Controller>, step: Step) {
    match step {
        Step::Repush {
            amphora,
            lb,
            reason,
        } => {
            let Some(claim) = ctl.claim(Job::LoadBalancer(lb)).await else {
                return;
            };
            let ctl = ctl.clone();
            tokio::spawn(claim.run(async move {
                repush(&ctl, &amphora, &reason).await;
            }));
        }
        Step::FailOver {
            amphora,
            lb,
            reason,
        } => fail_over(ctl, &amphora, &lb, &reason).await,
    }
}

/// Pushes the amphora's config and VIP again (a new generation), and
/// schedules the next attempt when that fails.
async fn repush(ctl: &Controller, amphora: &str, reason: &str) {
    ctl.metrics.add(&ctl.metrics.repairs, 1);
    let r = crate::provision::push_one(ctl, amphora).await;
    let (failures, next) = ctl
        .liveness
        .repaired(amphora, r.is_ok(), Instant::now(), |n| {
            ctl.policy.backoff(n)
        });
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
                        a.next_attempt_at = Some(crate::stamp_in(next));
                        tx.put(a);
                    }
                    Ok(())
                })
                .await;
        }
    }
}

/// Replaces an amphora no repair brought in step with a spare.
async fn fail_over(ctl: &Controller, amphora: &str, lb: &str, reason: &str) {
    let r = ctl
        .db
        .write(|s, tx| -> Result<bool, crate::store::StoreError> {
            match crate::decide::repair::relief(s, &ctl.view(), amphora, lb) {
                Relief::Moot => Ok(false),
                Relief::NoSpare => {
                    let why = format!("{reason}; no spare amphora to fail over to");
                    if let Some(a) = s.amphorae.get(amphora) {
                        if a.error.as_deref() != Some(why.as_str()) {
                            tracing::error!(%amphora, loadbalancer = %lb, "{why}");
                            let mut a = a.clone();
                            a.error = Some(why);
                            tx.put(a);
                        }
                    }
                    Ok(false)
                }
                Relief::Spare(spare) => {
                    tracing::warn!(failed = %amphora, %spare, loadbalancer = %lb, reason, "amphora failover");
                    let pairs = [(amphora.to_owned(), spare)];
                    Ok(crate::decide::provision::replace(s, tx, lb, &pairs, reason, &crate::now()) > 0)
                }
            }
        }).await;
    match r {
        Ok(true) => {
            ctl.metrics.add(&ctl.metrics.failovers, 1);
            ctl.liveness.failed_over(amphora);
            ctl.wake.notify_one();
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "failover not stored"),
    }
}
