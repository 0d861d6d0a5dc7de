//! The provisioner: brings amphorae in line with the store.
//!
//! Woken after every change (and every second, so work left by a restart
//! or a failed attempt is picked up), it finds load balancers with
//! anything `PENDING_*`, renders their config, bumps each amphora's
//! generation (stored *before* the push, so a generation is never reused
//! for other content), plumbs the VIP and pushes the config through the
//! agent, with retries and back-off. When every amphora acknowledged,
//! pending objects become `ACTIVE` (or are removed, for deletes);
//! otherwise they go to `ERROR` with the reason, as in Octavia.
//!
//! Amphorae taken out of service (failed over) are wiped once they answer
//! again (empty config, VIPs removed) and return to the spare pool.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;
use thiserror::Error;

use crate::agent_client::AgentError;
use crate::model::{
    Amphora, AmphoraStatus, By, LoadBalancer, OperatingStatus, ProvisioningStatus, State,
};
use crate::store::{Kind, StoreError, Tx};
use crate::{Controller, Job};

/// How long a wiped-but-unreachable amphora waits before the next try.
const WIPE_RETRY: Duration = Duration::from_secs(5);

/// Every spare amphora (`READY`, no load balancer), the most recently
/// heard first.
pub fn all_spares(s: &State, ctl: &Controller) -> Vec<Amphora> {
    let mut ready: Vec<&Amphora> = s
        .amphorae
        .values()
        .filter(|a| a.status == AmphoraStatus::Ready && a.load_balancer_id.is_none())
        .collect();
    ready.sort_by_key(|a| (std::cmp::Reverse(ctl.last_heard(&a.id)), a.id.clone()));
    ready.into_iter().cloned().collect()
}

/// Fewer spare amphorae than a load balancer needs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("No spare amphora available: {needed} needed, {ready} READY. Register amphorae in the controller config or with POST /v2/octavia/amphorae.")]
pub struct NoSpare {
    pub needed: usize,
    pub ready: usize,
}

/// `n` spare amphorae, or how many there are.
pub fn spares(s: &State, ctl: &Controller, n: usize) -> Result<Vec<Amphora>, NoSpare> {
    let mut ready = all_spares(s, ctl);
    if ready.len() < n {
        return Err(NoSpare {
            needed: n,
            ready: ready.len(),
        });
    }
    ready.truncate(n);
    Ok(ready)
}

/// Replaces `replace` (amphorae of `lb`) with spares where there are
/// some; the load balancer goes `PENDING_UPDATE` so the provisioner
/// pushes its config (and VIP) to whichever amphorae carry it now.
/// Returns how many were replaced.
pub fn fail_over(
    s: &State,
    tx: &mut Tx,
    ctl: &Controller,
    lb: &str,
    replace: &[String],
    reason: &str,
    taken: &mut HashSet<String>,
) -> usize {
    let Some(l) = s.load_balancers.get(lb) else {
        return 0;
    };
    let mut free = all_spares(s, ctl);
    free.retain(|a| !replace.contains(&a.id) && !taken.contains(&a.id));
    let mut free = free.into_iter();
    let mut replaced = 0;
    let now = crate::now();
    for id in replace {
        let Some(old) = s.amphorae.get(id) else {
            continue;
        };
        let Some(mut spare) = free.next() else {
            tracing::warn!(amphora = %id, loadbalancer = %lb, "no spare amphora: keeping the failed one");
            break;
        };
        taken.insert(spare.id.clone());
        let mut old = old.clone();
        old.load_balancer_id = None;
        old.status = AmphoraStatus::Error;
        old.error = Some(reason.to_owned());
        old.updated_at = Some(now.clone());
        spare.load_balancer_id = Some(lb.to_owned());
        spare.status = AmphoraStatus::Allocated;
        spare.updated_at = Some(now.clone());
        tracing::warn!(failed = %old.id, spare = %spare.id, loadbalancer = %lb, reason, "amphora failover");
        tx.put(old);
        tx.put(spare);
        replaced += 1;
    }
    let mut l = l.clone();
    l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
    l.common.provisioning_error = None;
    l.common.updated_at = Some(now);
    tx.put(l);
    replaced
}

/// Whether anything of `lb` waits for a push.
fn needs_push(s: &State, lb: &LoadBalancer) -> bool {
    lb.common.provisioning_status.is_pending() || needs_child_push(s, &lb.common.id)
}

/// Runs until `stopped`.
pub async fn run(ctl: Arc<Controller>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut wipe_tried: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        tokio::select! {
            _ = ctl.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if ctl.agents.is_none() {
            continue;
        }
        let (lbs, wipes) = ctl.db.read(|s| {
            let lbs: Vec<String> = s
                .load_balancers
                .values()
                .filter(|lb| needs_push(s, lb))
                .map(|lb| lb.common.id.clone())
                .collect();
            // Emptied only once no VIP is sent to it any more.
            let settled = ctl.distributed.load(std::sync::atomic::Ordering::Acquire);
            let targeted = ctl.targeted.lock().unwrap_or_else(|e| e.into_inner());
            let wipes: Vec<String> = s
                .amphorae
                .values()
                .filter(|a| a.status == AmphoraStatus::Error && a.load_balancer_id.is_none())
                .filter(|a| settled && !targeted.contains(&a.id))
                .map(|a| a.id.clone())
                .collect();
            (lbs, wipes)
        });
        for job in lbs
            .into_iter()
            .map(Job::LoadBalancer)
            .chain(wipes.into_iter().filter_map(|id| {
                let heard_since_tried = match (wipe_tried.get(&id), ctl.last_heard(&id)) {
                    (None, _) => true,
                    (Some(t), Some(h)) if h > *t => true,
                    (Some(t), _) => t.elapsed() >= WIPE_RETRY && ctl.config.health.is_none(),
                };
                heard_since_tried.then(|| {
                    wipe_tried.insert(id.clone(), Instant::now());
                    Job::Wipe(id)
                })
            }))
        {
            let Some(claim) = ctl.claim(job) else {
                continue;
            };
            let ctl = ctl.clone();
            tokio::spawn(async move {
                match claim.job() {
                    Job::LoadBalancer(id) => converge(&ctl, id).await,
                    Job::Wipe(id) => wipe(&ctl, id).await,
                    Job::Key(_) => {}
                }
            });
        }
    }
}

/// Why a push to an amphora's agent did not take.
#[derive(Debug, Error)]
pub enum PushError {
    #[error("no agent TLS configured")]
    NoAgentTls,
    /// A 4xx: the agent will refuse it again, so it is not retried.
    #[error("amphora {amphora} refused {path} ({status}): {body}")]
    Refused {
        amphora: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("amphora {amphora} answered {path} with {status}: {body}")]
    Failed {
        amphora: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("amphora {amphora}: {source}")]
    Unreachable { amphora: String, source: AgentError },
    #[error("encoding the push: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Why a load balancer's change, or an amphora's re-push, did not reach
/// its amphorae.
#[derive(Debug, Error)]
pub enum ProvisionError {
    #[error(transparent)]
    NoSpare(#[from] NoSpare),
    #[error(transparent)]
    Push(#[from] PushError),
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error("amphora {0} is gone")]
    Gone(String),
    #[error("amphora {0} carries no load balancer")]
    Unassigned(String),
}

/// Pushes `body` to `path` on `amphora`'s agent, retrying what may pass
/// later (no answer, 5xx) and stopping at a refusal (4xx).
pub async fn push(
    ctl: &Controller,
    amphora: &Amphora,
    method: Method,
    path: &str,
    body: Vec<u8>,
    attempts: u32,
) -> Result<String, PushError> {
    let Some(agents) = &ctl.agents else {
        return Err(PushError::NoAgentTls);
    };
    let mut backoff = ctl.config.push.backoff();
    let mut attempt = 1;
    loop {
        let e = match agents
            .request(amphora, method.clone(), path, Some(body.clone()))
            .await
        {
            Ok(r) if r.is_success() => return Ok(r.body),
            Ok(r) if (400..500).contains(&r.status) => {
                return Err(PushError::Refused {
                    amphora: amphora.id.clone(),
                    path: path.to_owned(),
                    status: r.status,
                    body: r.body.trim().to_owned(),
                })
            }
            Ok(r) => PushError::Failed {
                amphora: amphora.id.clone(),
                path: path.to_owned(),
                status: r.status,
                body: r.body.trim().to_owned(),
            },
            Err(source) => PushError::Unreachable {
                amphora: amphora.id.clone(),
                source,
            },
        };
        if attempt >= attempts {
            return Err(e);
        }
        tracing::debug!(amphora = %amphora.id, attempt, error = %e, "push failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        attempt += 1;
    }
}

/// VIPs, then config (the listeners bind the VIP); for a delete, the
/// reverse.
async fn push_amphora(
    ctl: &Controller,
    a: &Amphora,
    config: &siphon_proto::Config,
    vip: Option<&str>,
    attempts: u32,
) -> Result<(), PushError> {
    let remove: Vec<&String> = a.vips.iter().filter(|v| Some(v.as_str()) != vip).collect();
    let vips = serde_json::to_vec(&json!({
        "interface": a.vip_interface,
        "add": vip.into_iter().collect::<Vec<_>>(),
        "remove": remove,
    }))?;
    let config = serde_json::to_vec(config)?;
    let n = attempts;
    if vip.is_some() {
        push(ctl, a, Method::PUT, "/v1/vips", vips, n).await?;
        push(ctl, a, Method::PUT, "/v1/config", config, n).await?;
    } else {
        push(ctl, a, Method::PUT, "/v1/config", config, n).await?;
        push(ctl, a, Method::PUT, "/v1/vips", vips, n).await?;
    }
    Ok(())
}

/// Reserves the next generation of each amphora (stored first).
fn next_generations(ctl: &Controller, ids: &[String]) -> Result<Vec<Amphora>, StoreError> {
    ctl.db.write(|s, tx| -> Result<Vec<Amphora>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(a) = s.amphorae.get(id) {
                let mut a = a.clone();
                a.generation += 1;
                tx.put(a.clone());
                out.push(a);
            }
        }
        Ok(out)
    })
}

async fn converge(ctl: &Controller, lb_id: &str) {
    let Some((lb, mut amphorae)) = ctl.db.read(|s| {
        s.load_balancers.get(lb_id).map(|lb| {
            (
                lb.clone(),
                s.amphorae_of(lb_id)
                    .map(|a| a.id.clone())
                    .collect::<Vec<_>>(),
            )
        })
    }) else {
        return;
    };
    let deleting = lb.common.provisioning_status == ProvisioningStatus::PendingDelete;
    if amphorae.is_empty() && !deleting {
        // Its amphorae were all taken away (failed over with no spare);
        // take spares now if there are any.
        let got = ctl
            .db
            .write(|s, tx| -> Result<Vec<String>, ProvisionError> {
                let spares = spares(s, ctl, lb.amphora_count as usize)?;
                let ids = spares.iter().map(|a| a.id.clone()).collect();
                for mut a in spares {
                    a.load_balancer_id = Some(lb_id.to_owned());
                    a.status = AmphoraStatus::Allocated;
                    tx.put(a);
                }
                Ok(ids)
            });
        match got {
            Ok(ids) => amphorae = ids,
            Err(e) => return finish(ctl, lb_id, Err(e.to_string()), &[]),
        }
    }
    let amphorae = match next_generations(ctl, &amphorae) {
        Ok(a) => a,
        Err(e) => return finish(ctl, lb_id, Err(e.to_string()), &[]),
    };
    let vip = (!deleting).then(|| lb.vip_address.clone());
    let pushes = amphorae.iter().map(|a| {
        let config = ctl.db.read(|s| {
            let lb = s
                .load_balancers
                .get(lb_id)
                .cloned()
                .unwrap_or_else(|| lb.clone());
            crate::render::config(s, &lb, a.generation)
        });
        let vip = vip.clone();
        async move {
            let attempts = ctl.config.push.attempts;
            (
                a.id.clone(),
                push_amphora(ctl, a, &config, vip.as_deref(), attempts).await,
            )
        }
    });
    let results = futures::future::join_all(pushes).await;
    let mut errors = Vec::new();
    let mut failed = Vec::new();
    for (id, r) in &results {
        match r {
            Ok(()) => ctl.pushed(id),
            Err(e) => {
                ctl.metrics.add(&ctl.metrics.push_failures, 1);
                errors.push(e.to_string());
                failed.push(id.clone());
                tracing::error!(amphora = %id, loadbalancer = %lb_id, error = %e, "push failed");
            }
        }
    }
    // Record on each amphora what it carries now.
    let _ = ctl.db.write(|s, tx| -> Result<(), StoreError> {
        for (id, r) in &results {
            if let Some(a) = s.amphorae.get(id) {
                let mut a = a.clone();
                match r {
                    Ok(()) => {
                        a.vips = vip.iter().cloned().collect();
                        a.error = None;
                    }
                    Err(e) => a.error = Some(e.to_string()),
                }
                tx.put(a);
            }
        }
        Ok(())
    });
    let outcome = if errors.is_empty() || deleting {
        // A delete completes whatever the amphorae said: one that did not
        // take the empty config is set aside (ERROR) and wiped when it
        // answers again, like a failed-over one.
        Ok(())
    } else {
        Err(errors.join("; "))
    };
    finish(ctl, lb_id, outcome, &failed);
}

/// Pushes an amphora its load balancer's config (a new generation) and
/// VIP again, once: the repairer's step, which has its own back-off.
pub async fn push_one(ctl: &Controller, amphora: &str) -> Result<(), ProvisionError> {
    let mut got = next_generations(ctl, &[amphora.to_owned()])?;
    let Some(a) = got.pop() else {
        return Err(ProvisionError::Gone(amphora.to_owned()));
    };
    let Some((config, vip)) = ctl.db.read(|s| {
        let lb = s.load_balancers.get(a.load_balancer_id.as_deref()?)?;
        Some((
            crate::render::config(s, lb, a.generation),
            lb.vip_address.clone(),
        ))
    }) else {
        return Err(ProvisionError::Unassigned(amphora.to_owned()));
    };
    let r = push_amphora(ctl, &a, &config, Some(&vip), 1).await;
    if r.is_ok() {
        ctl.pushed(amphora);
    } else {
        ctl.metrics.add(&ctl.metrics.push_failures, 1);
    }
    let _ = ctl.db.write(|s, tx| -> Result<(), StoreError> {
        if let Some(a) = s.amphorae.get(amphora) {
            if r.is_ok() {
                let mut a = a.clone();
                a.vips = vec![vip.clone()];
                a.error = None;
                a.next_attempt_at = None;
                tx.put(a);
            }
        }
        Ok(())
    });
    Ok(r?)
}

/// Settles the statuses of everything under `lb_id` after a push.
fn finish(ctl: &Controller, lb_id: &str, outcome: Result<(), String>, failed: &[String]) {
    let no_health = ctl.config.health.is_none();
    let mut retry_in = None;
    let r = ctl.db.write(|s, tx| -> Result<(), StoreError> {
        let Some(lb) = s.load_balancers.get(lb_id) else {
            return Ok(());
        };
        let children_pending = needs_child_push(s, lb_id);
        let settle = |c: &mut crate::model::Common, ok: bool, reason: &Option<String>| -> bool {
            if !c.provisioning_status.is_pending() {
                return false;
            }
            if ok {
                c.provisioning_status = ProvisioningStatus::Active;
                c.provisioning_error = None;
                c.deployed = true;
                if no_health {
                    c.operating_status = if c.admin_state_up {
                        OperatingStatus::Online
                    } else {
                        OperatingStatus::Offline
                    };
                }
            } else {
                c.provisioning_status = ProvisioningStatus::Error;
                c.provisioning_error = reason.clone();
            }
            true
        };
        let ok = outcome.is_ok();
        let reason = outcome.as_ref().err().cloned();
        let deleting = |c: &crate::model::Common| c.provisioning_status == ProvisioningStatus::PendingDelete;
        // Children first (deletes must precede their parents').
        for m in s.members.with(By::LoadBalancer, lb_id) {
            if ok && deleting(&m.common) {
                tx.delete(Kind::Member, &m.common.id);
            } else {
                let mut m = m.clone();
                let monitored = s.monitor_of(&m.pool_id).is_some();
                if settle(&mut m.common, ok, &reason) {
                    if no_health && ok {
                        m.common.operating_status = if monitored { OperatingStatus::Online } else { OperatingStatus::NoMonitor };
                    }
                    tx.put(m);
                }
            }
        }
        settle_all(
            tx,
            s.health_monitors.with(By::LoadBalancer, lb_id),
            Kind::HealthMonitor,
            |h| &mut h.common,
            ok,
            &|c| settle(c, ok, &reason),
        );
        settle_all(tx, s.pools_of(lb_id), Kind::Pool, |p| &mut p.common, ok, &|c| {
            settle(c, ok, &reason)
        });
        settle_all(tx, s.listeners_of(lb_id), Kind::Listener, |l| &mut l.common, ok, &|c| {
            settle(c, ok, &reason)
        });
        let mut lb = lb.clone();
        if ok && deleting(&lb.common) {
            for a in s.amphorae_of(lb_id) {
                let mut a = a.clone();
                a.load_balancer_id = None;
                if failed.contains(&a.id) {
                    // Still holds the config and VIP: wiped when it answers.
                    a.status = AmphoraStatus::Error;
                } else {
                    a.status = AmphoraStatus::Ready;
                    a.vips.clear();
                }
                tx.put(a);
            }
            tx.delete(Kind::LoadBalancer, lb_id);
            tracing::info!(loadbalancer = %lb_id, "load balancer deleted; its amphorae are spares again");
            return Ok(());
        }
        // Octavia: a failed child change leaves the child in ERROR and the
        // load balancer ACTIVE; a failed change of the LB itself, ERROR.
        let lb_ok = ok || (lb.common.provisioning_status == ProvisioningStatus::PendingUpdate && children_pending);
        let was = lb.common.provisioning_status;
        if settle(&mut lb.common, lb_ok, &reason) {
            if lb_ok {
                lb.retry = None;
                lb.common.next_attempt_at = None;
            } else {
                // Its own change failed: tried again after a back-off,
                // until it succeeds or the load balancer is deleted.
                let failures = lb.retry.as_ref().map_or(0, |r| r.failures).saturating_add(1);
                let wait = crate::repair::backoff(failures, ctl.config.push.backoff(), ctl.retry_max());
                lb.retry = Some(crate::model::Retry { status: was, failures });
                lb.common.next_attempt_at = Some(crate::repair::at(wait));
                retry_in = Some(wait);
            }
            tx.put(lb);
        }
        Ok(())
    });
    ctl.distribute.notify_one();
    match (&outcome, r) {
        (_, Err(e)) => {
            tracing::error!(loadbalancer = %lb_id, error = %e, "could not record the push result")
        }
        (Ok(()), Ok(())) => tracing::info!(loadbalancer = %lb_id, "amphorae in step: ACTIVE"),
        (Err(e), Ok(())) => match retry_in {
            Some(wait) => {
                tracing::error!(loadbalancer = %lb_id, error = %e, next_attempt_in_ms = wait.as_millis() as u64, "push failed: ERROR; retried after a back-off")
            }
            None => tracing::error!(loadbalancer = %lb_id, error = %e, "push failed: ERROR"),
        },
    }
}

/// Settles each of `items`: removed when its delete went through, else
/// put back with its status moved on (when `settle` changed it).
fn settle_all<'a, T: Clone + Into<crate::store::Object> + 'a>(
    tx: &mut Tx,
    items: impl Iterator<Item = &'a T>,
    kind: Kind,
    common: fn(&mut T) -> &mut crate::model::Common,
    ok: bool,
    settle: &dyn Fn(&mut crate::model::Common) -> bool,
) {
    for item in items {
        let mut item = item.clone();
        let c = common(&mut item);
        if ok && c.provisioning_status == ProvisioningStatus::PendingDelete {
            let id = c.id.clone();
            tx.delete(kind, &id);
        } else if settle(c) {
            tx.put(item);
        }
    }
}

fn needs_child_push(s: &State, id: &str) -> bool {
    s.listeners_of(id)
        .any(|l| l.common.provisioning_status.is_pending())
        || s.pools_of(id)
            .any(|p| p.common.provisioning_status.is_pending())
        || s.members
            .with(By::LoadBalancer, id)
            .any(|m| m.common.provisioning_status.is_pending())
        || s.health_monitors
            .with(By::LoadBalancer, id)
            .any(|h| h.common.provisioning_status.is_pending())
}

/// Empties a failed-over amphora (config and VIPs) and makes it a spare.
async fn wipe(ctl: &Controller, id: &str) {
    let Ok(mut got) = next_generations(ctl, &[id.to_owned()]) else {
        return;
    };
    let Some(a) = got.pop() else {
        return;
    };
    let empty = siphon_proto::Config {
        generation: a.generation,
        listeners: Vec::new(),
        pools: Vec::new(),
    };
    match push_amphora(ctl, &a, &empty, None, ctl.config.push.attempts).await {
        Ok(()) => {
            let _ = ctl.db.write(|s, tx| -> Result<(), StoreError> {
                if let Some(a) = s.amphorae.get(id) {
                    if a.status == AmphoraStatus::Error && a.load_balancer_id.is_none() {
                        let mut a = a.clone();
                        a.status = AmphoraStatus::Ready;
                        a.vips.clear();
                        a.error = None;
                        a.updated_at = Some(crate::now());
                        tx.put(a);
                    }
                }
                Ok(())
            });
            tracing::info!(amphora = %id, "failed-over amphora wiped: a spare again");
        }
        Err(e) => tracing::debug!(amphora = %id, error = %e, "amphora not wiped yet"),
    }
}
