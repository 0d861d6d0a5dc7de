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

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;
use serde_json::json;
use thiserror::Error;

use crate::agent_client::AgentError;
use crate::decide;
use crate::decide::provision::Settled;
use crate::decide::spares::NoSpare;
use crate::model::{Amphora, AmphoraStatus, ProvisioningStatus};
use crate::store::StoreError;
use crate::{Controller, Job};

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
        // Without the database nothing is decided (nor pushed).
        if ctl.db.refresh().await.is_err() {
            continue;
        }
        let routed = ctl.routed.borrow().clone();
        let (jobs, now) = ctl.db.read(|s| {
            let view = ctl.view();
            let jobs = decide::provision::jobs(s, &view, &ctl.policy, &routed, &wipe_tried);
            (jobs, view.now)
        });
        for job in jobs {
            if let Job::Wipe(id) = &job {
                wipe_tried.insert(id.clone(), now);
            }
            let Some(claim) = ctl.claim(job.clone()).await else {
                continue;
            };
            let ctl = ctl.clone();
            tokio::spawn(claim.run(async move {
                match &job {
                    Job::LoadBalancer(id) => converge(&ctl, id).await,
                    Job::Wipe(id) => wipe(&ctl, id).await,
                    Job::Key(_) => {}
                }
            }));
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
    /// The BGP peering cannot be made (a password file unreadable): the
    /// operator must act; every push to an amphora fails until then.
    #[error("the BGP peering for amphora {amphora}: {source}")]
    Peering {
        amphora: String,
        source: crate::config::ConfigError,
    },
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

/// VIPs, then config (the listeners bind the VIPs); for a delete (no
/// `vips`), the reverse.
async fn push_amphora(
    ctl: &Controller,
    a: &Amphora,
    config: &siphon_proto::Config,
    vips: &[String],
    attempts: u32,
) -> Result<(), PushError> {
    let serving = !vips.is_empty();
    let remove: Vec<&String> = a.vips.iter().filter(|v| !vips.contains(v)).collect();
    let vips_body = serde_json::to_vec(&json!({
        "interface": a.vip_interface,
        "add": vips,
        "remove": remove,
    }))?;
    let config = serde_json::to_vec(config)?;
    let n = attempts;
    // Over BGP the agent announces the VIP it serves: its peering goes
    // first (idempotent: the agent answers the same for the same).
    if let (crate::config::Distributor::Bgp(b), true) = (&ctl.config.distributor, serving) {
        let peering = b
            .peering_for(a.data_address())
            .map_err(|source| PushError::Peering {
                amphora: a.id.clone(),
                source,
            })?;
        let body = serde_json::to_vec(&peering)?;
        push(ctl, a, Method::PUT, "/v1/bgp", body, n).await?;
    }
    if serving {
        push(ctl, a, Method::PUT, "/v1/vips", vips_body, n).await?;
        push(ctl, a, Method::PUT, "/v1/config", config, n).await?;
    } else {
        push(ctl, a, Method::PUT, "/v1/config", config, n).await?;
        push(ctl, a, Method::PUT, "/v1/vips", vips_body, n).await?;
    }
    Ok(())
}

/// Reserves the next generation of each amphora (stored first).
async fn next_generations(ctl: &Controller, ids: &[String]) -> Result<Vec<Amphora>, StoreError> {
    ctl.db
        .write(|s, tx| -> Result<Vec<Amphora>, StoreError> {
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
        .await
}

async fn converge(ctl: &Controller, lb_id: &str) {
    // Claimed now: read afresh, as another controller may have pushed
    // this change already.
    if ctl.db.refresh().await.is_err() {
        return;
    }
    let Some((lb, mut amphorae)) = ctl.db.read(|s| {
        let lb = s.load_balancers.get(lb_id)?;
        if !decide::provision::needs_push(s, lb) {
            return None;
        }
        let amphorae: Vec<String> = s.amphorae_of(lb_id).map(|a| a.id.clone()).collect();
        Some((lb.clone(), amphorae))
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
                let spares = decide::spares::take(s, &ctl.view(), lb.amphora_count as usize)?;
                let ids = spares.iter().map(|a| a.id.clone()).collect();
                for a in spares {
                    let mut a = a.clone();
                    a.load_balancer_id = Some(lb_id.to_owned());
                    a.status = AmphoraStatus::Allocated;
                    tx.put(a);
                }
                Ok(ids)
            })
            .await;
        match got {
            Ok(ids) => amphorae = ids,
            Err(e) => return finish(ctl, lb_id, Err(e.to_string()), &[]).await,
        }
    }
    let amphorae = match next_generations(ctl, &amphorae).await {
        Ok(a) => a,
        Err(e) => return finish(ctl, lb_id, Err(e.to_string()), &[]).await,
    };
    let vips = if deleting { Vec::new() } else { lb.vips() };
    let pushes = amphorae.iter().map(|a| {
        let config = ctl.db.read(|s| {
            let lb = s
                .load_balancers
                .get(lb_id)
                .cloned()
                .unwrap_or_else(|| lb.clone());
            crate::render::config(s, &lb, a.generation)
        });
        let vips = &vips;
        async move {
            let attempts = ctl.config.push.attempts;
            (
                a.id.clone(),
                push_amphora(ctl, a, &config, vips, attempts).await,
            )
        }
    });
    let results = futures::future::join_all(pushes).await;
    let mut errors = Vec::new();
    let mut failed = Vec::new();
    for (id, r) in &results {
        match r {
            Ok(()) => ctl.liveness.pushed(id, Instant::now()),
            Err(e) => {
                ctl.metrics.add(&ctl.metrics.push_failures, 1);
                errors.push(e.to_string());
                failed.push(id.clone());
                tracing::error!(amphora = %id, loadbalancer = %lb_id, error = %e, "push failed");
            }
        }
    }
    // Record on each amphora what it carries now.
    let _ = ctl
        .db
        .write(|s, tx| -> Result<(), StoreError> {
            for (id, r) in &results {
                if let Some(a) = s.amphorae.get(id) {
                    let mut a = a.clone();
                    match r {
                        Ok(()) => {
                            a.vips = vips.clone();
                            a.error = None;
                        }
                        Err(e) => a.error = Some(e.to_string()),
                    }
                    tx.put(a);
                }
            }
            Ok(())
        })
        .await;
    let outcome = if errors.is_empty() || deleting {
        // A delete completes whatever the amphorae said: one that did not
        // take the empty config is set aside (ERROR) and wiped when it
        // answers again, like a failed-over one.
        Ok(())
    } else {
        Err(errors.join("; "))
    };
    finish(ctl, lb_id, outcome, &failed).await;
}

/// Pushes an amphora its load balancer's config (a new generation) and
/// VIP again, once: the repairer's step, which has its own back-off.
pub async fn push_one(ctl: &Controller, amphora: &str) -> Result<(), ProvisionError> {
    let mut got = next_generations(ctl, &[amphora.to_owned()]).await?;
    let Some(a) = got.pop() else {
        return Err(ProvisionError::Gone(amphora.to_owned()));
    };
    let Some((config, vips)) = ctl.db.read(|s| {
        let lb = s.load_balancers.get(a.load_balancer_id.as_deref()?)?;
        Some((crate::render::config(s, lb, a.generation), lb.vips()))
    }) else {
        return Err(ProvisionError::Unassigned(amphora.to_owned()));
    };
    let r = push_amphora(ctl, &a, &config, &vips, 1).await;
    if r.is_ok() {
        ctl.liveness.pushed(amphora, Instant::now());
    } else {
        ctl.metrics.add(&ctl.metrics.push_failures, 1);
    }
    let _ = ctl
        .db
        .write(|s, tx| -> Result<(), StoreError> {
            if let Some(a) = s.amphorae.get(amphora) {
                if r.is_ok() {
                    let mut a = a.clone();
                    a.vips = vips.clone();
                    a.error = None;
                    a.next_attempt_at = None;
                    tx.put(a);
                }
            }
            Ok(())
        })
        .await;
    Ok(r?)
}

/// Settles the statuses of everything under `lb_id` after a push
/// ([`decide::provision::settle`]).
async fn finish(ctl: &Controller, lb_id: &str, outcome: Result<(), String>, failed: &[String]) {
    let r = ctl
        .db
        .write(|s, tx| -> Result<Settled, StoreError> {
            let o = outcome.as_ref().map(|_| ()).map_err(String::as_str);
            Ok(decide::provision::settle(
                s,
                tx,
                lb_id,
                o,
                failed,
                &ctl.policy,
                SystemTime::now(),
            ))
        })
        .await;
    ctl.distribute.notify_one();
    match (&outcome, r) {
        (_, Err(e)) => {
            tracing::error!(loadbalancer = %lb_id, error = %e, "could not record the push result")
        }
        (_, Ok(Settled::Gone)) => {}
        (_, Ok(Settled::Deleted)) => {
            tracing::info!(loadbalancer = %lb_id, "load balancer deleted; its amphorae are spares again")
        }
        (Ok(()), Ok(_)) => tracing::info!(loadbalancer = %lb_id, "amphorae in step: ACTIVE"),
        (Err(e), Ok(Settled::Retry { retry_in })) => {
            tracing::error!(loadbalancer = %lb_id, error = %e, next_attempt_in_ms = retry_in.as_millis() as u64, "push failed: ERROR; retried after a back-off")
        }
        (Err(e), Ok(_)) => tracing::error!(loadbalancer = %lb_id, error = %e, "push failed: ERROR"),
    }
}

/// Empties a failed-over amphora (config and VIPs) and makes it a spare.
async fn wipe(ctl: &Controller, id: &str) {
    if ctl.db.refresh().await.is_err()
        || !ctl.db.read(|s| {
            s.amphorae
                .get(id)
                .is_some_and(|a| a.status == AmphoraStatus::Error && a.load_balancer_id.is_none())
        })
    {
        return;
    }
    let Ok(mut got) = next_generations(ctl, &[id.to_owned()]).await else {
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
    match push_amphora(ctl, &a, &empty, &[], ctl.config.push.attempts).await {
        Ok(()) => {
            let _ = ctl
                .db
                .write(|s, tx| -> Result<(), StoreError> {
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
                })
                .await;
            // However it left service (a failover of any kind, a
            // scale-in), its repair starts afresh if it serves again.
            ctl.liveness.failed_over(id);
            tracing::info!(amphora = %id, "failed-over amphora wiped: a spare again");
        }
        Err(e) => tracing::debug!(amphora = %id, error = %e, "amphora not wiped yet"),
    }
}
