//! The health manager: heartbeats in, statuses and stats out, failover.
//!
//! - [`receive`] checks each datagram ([`Gate`]: the sender's own key,
//!   clock window, sequence numbers kept across restarts), records when
//!   the amphora was heard and what it runs (for the repairer), and folds
//!   its report into operating
//!   statuses and counters, written in batches (at most once per
//!   [`FLUSH`]) so a fleet of sub-second heartbeats is not a write each.
//! - [`watch`] looks for amphorae silent for `heartbeat_timeout` and
//!   fails their load balancers over to spares, unless so many went
//!   silent at once that the fault is more likely on this side (the
//!   circuit breaker, `failover_threshold`); the decision is
//!   [`crate::decide::failover`]'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use siphon_proto::heartbeat::Heartbeat;
use tokio::net::UdpSocket;

use crate::config::Health;
use crate::decide::failover::Failover;
use crate::decide::heartbeat::{fold, report, Batch, RESTAMP_EVERY};
use crate::heartbeat_keys::{Gate, Refusal};
use crate::model::{AmphoraStatus, Counters, State};
use crate::store::{Heard, Tx};
use crate::{Controller, StartError};

/// Longest time heartbeat-driven changes wait before they are stored.
const FLUSH: Duration = Duration::from_millis(500);

pub async fn bind(h: &Health) -> Result<(UdpSocket, Option<Vec<u8>>), StartError> {
    let key = h.bootstrap_key()?;
    let socket = UdpSocket::bind(h.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: h.listen,
            source,
        })?;
    Ok((socket, key))
}

pub async fn receive(
    ctl: Arc<Controller>,
    socket: UdpSocket,
    bootstrap: Option<Vec<u8>>,
    h: Health,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut seqs: std::collections::HashMap<String, u64> = ctl.db.read(|s| {
        s.amphorae
            .values()
            .map(|a| (a.id.clone(), a.heartbeat_seq))
            .collect()
    });
    // What every controller took: a replayed beat is refused here too.
    match ctl.db.store().heard_seqs().await {
        Ok(taken) => {
            for (id, seq) in taken {
                let s = seqs.entry(id).or_default();
                *s = (*s).max(seq);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat sequence numbers of other controllers not read; starting from the stored ones")
        }
    }
    let started = SystemTime::now() - ctl.liveness.started().elapsed();
    let mut gate = Gate::new(
        bootstrap,
        Duration::from_millis(h.clock_window_ms),
        started,
        seqs,
    );
    let mut buf = vec![0u8; 65_536];
    // One flush at a time, off this loop: receiving never waits on the
    // database.
    let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
    let mut pending: Vec<(Heartbeat, u32, Instant)> = Vec::new();
    let stored: Stored = Arc::default();
    let mut flush_at: Option<tokio::time::Instant> = None;
    let mut rejected: u64 = 0;
    loop {
        let deadline =
            flush_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let checked = ctl.db.read(|s| gate.check(s, &buf[..n], SystemTime::now()));
                if let Err(Refusal::Bootstrap(id)) = &checked {
                    // Its agent may have lost its own key: push it again.
                    crate::keys_push::request_key(&ctl, id);
                }
                match checked {
                    Ok((beat, key_id)) => {
                        // `Gate` took it only from a registered amphora: a
                        // stranger's beats never get here.
                        let now = Instant::now();
                        ctl.liveness.heard(&beat.amphora_id, now, report(&beat));
                        ctl.metrics.add(&ctl.metrics.heartbeats_accepted, 1);
                        pending.push((beat, key_id, now));
                        flush_at.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH);
                    }
                    Err(e) => {
                        rejected += 1;
                        ctl.metrics.add(&ctl.metrics.heartbeats_rejected, 1);
                        // The first and then every 100th: a flood of forged
                        // datagrams must not flood the log too.
                        if rejected % 100 == 1 {
                            tracing::warn!(%from, error = %e, rejected, "heartbeat rejected");
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline), if flush_at.is_some() && flushing.is_none() => {
                flush_at = None;
                let beats = std::mem::take(&mut pending);
                flushing = Some(tokio::spawn(flush(ctl.clone(), beats, stored.clone())));
            }
            r = async {
                match flushing.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if flushing.is_some() => {
                flushing = None;
                if let Err(e) = r {
                    tracing::error!(error = %e, "heartbeat flush failed");
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// Counters as this controller last stored them, per (listener,
/// amphora): a beat whose counters did not move stores none.
type Stored = Arc<Mutex<HashMap<(String, String), Counters>>>;

/// Stores what a batch of verified beats changed: when this controller
/// heard each amphora (for every controller to see), and, only when there
/// is any, what changed in documents and counters.
///
/// The `heard` rows are this controller's own and go in a statement of
/// their own; the writers' turn (shared by every controller) is taken
/// only for documents and for counters that moved, so a fleet that
/// merely keeps beating costs the other controllers' decisions no wait.
async fn flush(ctl: Arc<Controller>, beats: Vec<(Heartbeat, u32, Instant)>, stored: Stored) {
    let stamp = crate::now();
    let restamp_before = crate::stamp(SystemTime::now() - RESTAMP_EVERY);
    let fold_all = |s: &State, tx: &mut Tx| {
        // Inside a read or write: everything stored before is in the
        // view too (see `Controller::view`).
        let view = ctl.view();
        let mut batch = Batch::default();
        for (beat, key_id, _) in &beats {
            fold(
                &view,
                &ctl.policy,
                s,
                tx,
                beat,
                *key_id,
                &mut batch,
                &stamp,
                &restamp_before,
            );
        }
        batch
    };
    let moved = |batch: Batch| -> Vec<((String, String), (u64, Counters))> {
        let stored = stored.lock().unwrap_or_else(|e| e.into_inner());
        batch
            .counters
            .into_iter()
            .filter(|(k, (_, raw))| stored.get(k) != Some(raw))
            .collect()
    };
    let (heard, to_write) = ctl.db.read(|s| {
        let mut scratch = Tx::default();
        let mut batch = fold_all(s, &mut scratch);
        let heard = std::mem::take(&mut batch.heard);
        (heard, !scratch.is_empty() || !moved(batch).is_empty())
    });

    // When each was heard, as an age: the database stamps it on its own
    // clock minus that, so a beat counts from when it came, not from
    // when its batch was stored (up to FLUSH later, which would stretch
    // every other controller's silence by as much).
    let now = Instant::now();
    let mut came: HashMap<&str, Instant> = HashMap::new();
    for (beat, _, at) in &beats {
        let t = came.entry(beat.amphora_id.as_str()).or_insert(*at);
        *t = (*t).max(*at);
    }
    let rows: Vec<Heard> = heard
        .iter()
        .map(|(amphora, seq)| Heard {
            amphora,
            controller: &ctl.name,
            seq: *seq,
            age: came
                .get(amphora.as_str())
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t)),
        })
        .collect();
    if let Err(e) = ctl.db.hear(&rows).await {
        tracing::error!(error = %e, "heartbeats heard not stored");
    }
    if !to_write {
        return;
    }
    let r = ctl
        .db
        .write(|s, tx| -> Result<_, crate::store::StoreError> {
            let mut batch = fold_all(s, tx);
            let back = std::mem::take(&mut batch.back);
            let moved = moved(batch);
            for ((l, a), (seq, raw)) in &moved {
                tx.stats(l, a, *seq, *raw);
            }
            Ok((moved, back))
        })
        .await;
    match r {
        Ok((moved, back)) => {
            for (amphora, status) in back {
                tracing::info!(%amphora, ?status, "amphora heard");
            }
            let mut stored = stored.lock().unwrap_or_else(|e| e.into_inner());
            stored.extend(moved.into_iter().map(|(k, (_, raw))| (k, raw)));
            // Forget listeners that are gone.
            ctl.db
                .read(|s| stored.retain(|(l, _), _| s.listeners.contains_key(l)));
        }
        Err(e) => tracing::error!(error = %e, "heartbeat results not stored"),
    }
}

/// Fails over what went silent ([`crate::decide::failover::watch`]);
/// runs until `stopped`.
pub async fn watch(
    ctl: Arc<Controller>,
    h: Health,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(h.check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        // What the other controllers heard, so silence is the whole
        // fleet's; without the store, nothing is decided.
        match ctl.db.store().heard_elsewhere(&ctl.name).await {
            Ok(ages) => {
                let now = Instant::now();
                ctl.liveness.heard_elsewhere(
                    ages.into_iter()
                        .filter_map(|(id, ms)| {
                            Some((id, now.checked_sub(Duration::from_millis(ms as u64))?))
                        })
                        .collect(),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeats of other controllers not read; no failover decided this round");
                continue;
            }
        }
        // Decided on the (caught-up) cache first: the write, which takes
        // the writers' turn on every controller, only when there is
        // something to write. It decides again on the state it holds.
        if ctl.db.refresh().await.is_err() {
            continue;
        }
        let quiet = ctl
            .db
            .read(|s| crate::decide::failover::watch(s, &ctl.view(), &ctl.policy).is_empty());
        if quiet {
            continue;
        }
        let r = ctl
            .db
            .write(|s, tx| -> Result<bool, crate::store::StoreError> {
                let view = ctl.view();
                let actions = crate::decide::failover::watch(s, &view, &ctl.policy);
                Ok(execute(&ctl, s, tx, actions))
            })
            .await;
        match r {
            Ok(true) => ctl.wake.notify_one(),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "failover not stored"),
        }
    }
}

/// Records the health manager's decisions in `tx`; `true` when a
/// failover needs a push.
fn execute(ctl: &Controller, s: &State, tx: &mut Tx, actions: Vec<Failover>) -> bool {
    let Some(h) = &ctl.policy.health else {
        return false;
    };
    let silence = format!("no heartbeat for {} ms", h.heartbeat_timeout.as_millis());
    let now = crate::now();
    let mut changed = false;
    let held = actions
        .iter()
        .filter(|a| matches!(a, Failover::Hold { .. }))
        .count();
    if held > 0 {
        tracing::error!(
            stale = held,
            threshold = h.failover_threshold,
            "circuit breaker: too many amphorae silent at once; failover stopped (FAILOVER_STOPPED) until they are heard again"
        );
    }
    for action in actions {
        match action {
            Failover::Quiet { amphora } => tx.edit(&s.amphorae, &amphora, |a| {
                a.status = AmphoraStatus::Booting;
                a.error = Some(silence.clone());
            }),
            Failover::Hold { amphora } => tx.edit(&s.amphorae, &amphora, |a| {
                a.status = AmphoraStatus::FailoverStopped;
                a.updated_at = Some(now.clone());
            }),
            Failover::Replace { lb, pairs } => {
                for (failed, spare) in &pairs {
                    tracing::warn!(%failed, %spare, loadbalancer = %lb, reason = %silence, "amphora failover");
                }
                ctl.metrics.add(&ctl.metrics.failovers, pairs.len() as u64);
                crate::decide::provision::replace(s, tx, &lb, &pairs, &silence, &now);
                changed = true;
            }
            Failover::Short {
                lb,
                amphorae,
                status,
            } => {
                let why = format!("{silence} and no spare amphora to fail over to");
                for id in &amphorae {
                    let Some(a) = s.amphorae.get(id) else {
                        continue;
                    };
                    if a.error.as_deref() != Some(why.as_str()) {
                        tracing::error!(amphora = %id, loadbalancer = %lb, "{why}");
                        let mut a = a.clone();
                        a.error = Some(why.clone());
                        tx.put(a);
                    }
                }
                if let Some(l) = s.load_balancers.get(&lb) {
                    if l.common.operating_status != status {
                        let mut l = l.clone();
                        l.common.operating_status = status;
                        tx.put(l);
                    }
                }
            }
        }
    }
    changed
}
