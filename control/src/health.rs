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
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use siphon_proto::heartbeat::Heartbeat;
use tokio::net::UdpSocket;

use crate::config::Health;
use crate::decide::failover::Failover;
use crate::heartbeat_keys::{Gate, Refusal};
use crate::liveness::{Report, View};
use crate::model::{AmphoraStatus, Counters, OperatingStatus, State};
use crate::store::Tx;
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

/// Counters as last reported, to turn absolute values into increments.
#[derive(Debug, Default)]
struct Last {
    reported: HashMap<(String, String), Counters>,
}

impl Last {
    /// The increment since the last report; a counter that went down
    /// means the dataplane restarted, so the new value is all new.
    fn delta(&mut self, key: (String, String), now: Counters) -> Counters {
        let prev = self.reported.insert(key, now).unwrap_or_default();
        let d = |n: u64, p: u64| if n >= p { n - p } else { n };
        Counters {
            bytes_in: d(now.bytes_in, prev.bytes_in),
            bytes_out: d(now.bytes_out, prev.bytes_out),
            active_connections: now.active_connections,
            total_connections: d(now.total_connections, prev.total_connections),
            request_errors: d(now.request_errors, prev.request_errors),
        }
    }
}

pub async fn receive(
    ctl: Arc<Controller>,
    socket: UdpSocket,
    bootstrap: Option<Vec<u8>>,
    h: Health,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let seqs = ctl.db.read(|s| {
        s.amphorae
            .values()
            .map(|a| (a.id.clone(), a.heartbeat_seq))
            .collect()
    });
    let started = SystemTime::now() - ctl.liveness.started().elapsed();
    let mut gate = Gate::new(
        bootstrap,
        Duration::from_millis(h.clock_window_ms),
        started,
        seqs,
    );
    let mut buf = vec![0u8; 65_536];
    let mut last = Last::default();
    let mut pending: Vec<(Heartbeat, u32)> = Vec::new();
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
                        ctl.liveness.heard(&beat.amphora_id, Instant::now(), report(&beat));
                        ctl.metrics.add(&ctl.metrics.heartbeats_accepted, 1);
                        pending.push((beat, key_id));
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
            _ = tokio::time::sleep_until(deadline), if flush_at.is_some() => {
                flush_at = None;
                let beats = std::mem::take(&mut pending);
                let view = ctl.view();
                if let Err(e) = ctl.db.write(|s, tx| -> Result<(), crate::store::StoreError> {
                    // Totals move through every beat of the batch, not
                    // from the stored value each time.
                    let mut totals = HashMap::new();
                    for (beat, key_id) in &beats {
                        apply_beat(&view, &h, s, tx, beat, *key_id, &mut last, &mut totals);
                    }
                    for ((l, a), c) in totals {
                        tx.stats(&l, &a, c);
                    }
                    Ok(())
                }) {
                    tracing::error!(error = %e, "heartbeat results not stored");
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// What the amphora says it runs, for the repairer.
fn report(beat: &Heartbeat) -> Report {
    Report {
        generation: beat.generation,
        persisted_generation: Some(beat.persisted_generation),
        vips: reported_vips(beat),
    }
}

/// The VIPs a heartbeat says its agent holds; `None` when it does not
/// say, or its list was cut to fit the datagram (a VIP left out is not a
/// VIP missing).
fn reported_vips(beat: &Heartbeat) -> Option<Vec<String>> {
    beat.vips
        .clone()
        .filter(|v| !(beat.truncated && v.len() >= siphon_proto::heartbeat::MAX_VIPS))
}

/// Folds one heartbeat into `tx`.
#[allow(clippy::too_many_arguments)]
fn apply_beat(
    view: &View,
    h: &Health,
    s: &State,
    tx: &mut Tx,
    beat: &Heartbeat,
    key_id: u32,
    last: &mut Last,
    totals: &mut HashMap<(String, String), Counters>,
) {
    let Some(a) = s.amphorae.get(&beat.amphora_id) else {
        tracing::debug!(amphora = %beat.amphora_id, "heartbeat from an unregistered amphora");
        return;
    };
    // Last seen, stored; and a spare or a recovered amphora is back in
    // service.
    // Replay protection across restarts, and proof its agent holds its
    // own key.
    let mut heard = a.clone();
    heard.last_heartbeat = Some(crate::now());
    heard.heartbeat_seq = heard.heartbeat_seq.max(beat.seq);
    if heard
        .heartbeat_key
        .as_ref()
        .is_some_and(|k| k.key_id == key_id)
    {
        heard.heartbeat_key_acked = true;
    }
    let next = match (a.status, &a.load_balancer_id) {
        (AmphoraStatus::Booting, None) => Some(AmphoraStatus::Ready),
        (AmphoraStatus::FailoverStopped, Some(_)) => Some(AmphoraStatus::Allocated),
        _ => None,
    };
    if let Some(status) = next {
        heard.status = status;
        heard.updated_at = heard.last_heartbeat.clone();
        tracing::info!(amphora = %a.id, status = ?status, "amphora heard");
    }
    tx.put(heard);
    let Some(lb_id) = &a.load_balancer_id else {
        return;
    };
    for l in &beat.listeners {
        if s.listeners
            .get(&l.id)
            .is_some_and(|x| &x.load_balancer_id == lb_id)
        {
            let now = Counters {
                bytes_in: l.bytes_in,
                bytes_out: l.bytes_out,
                active_connections: l.active_connections,
                total_connections: l.total_connections,
                request_errors: 0,
            };
            let key = (l.id.clone(), a.id.clone());
            let d = last.delta(key.clone(), now);
            let stored = s.stats.get(&key).copied().unwrap_or_default();
            let total = totals.entry(key).or_insert(stored);
            let active = d.active_connections;
            total.add(&Counters {
                active_connections: 0,
                ..d
            });
            total.active_connections = active;
        }
    }
    // Statuses only from a dataplane running the config last pushed: an
    // older one reports objects that are being changed.
    let Some(lb) = s.load_balancers.get(lb_id) else {
        return;
    };
    // Nor from one the repairer judged out of step (it lost its config
    // or its VIP): the repairer's `ERROR`/`DEGRADED` stands until it is
    // in step again.
    if beat.generation != Some(a.generation)
        || lb.common.provisioning_status.is_pending()
        || view.out_of_step(&a.id)
    {
        return;
    }
    // Another amphora of it gone silent (active-active): it serves, but
    // on fewer amphorae than it should.
    let short = s.amphorae_of(lb_id).any(|x| {
        x.id != a.id
            && x.status == AmphoraStatus::Allocated
            && (view.silent(&x.id, h.heartbeat_timeout()) || view.out_of_step(&x.id))
    });
    update_statuses(s, tx, lb_id, beat, short);
}

fn update_statuses(s: &State, tx: &mut Tx, lb_id: &str, beat: &Heartbeat, short: bool) {
    use OperatingStatus as O;
    let members: HashMap<&str, O> = beat
        .members
        .iter()
        .map(|m| (m.id.as_str(), m.operating_status))
        .collect();
    let mut pool_status: HashMap<String, O> = HashMap::new();
    for p in s.pools_of(lb_id) {
        let mut up = 0;
        let mut err = 0;
        for m in s.members_of(&p.common.id) {
            let st = members
                .get(m.common.id.as_str())
                .copied()
                .unwrap_or(m.common.operating_status);
            if st != m.common.operating_status && !m.common.provisioning_status.is_pending() {
                let mut m = m.clone();
                m.common.operating_status = st;
                tx.put(m);
            }
            match st {
                O::Error => err += 1,
                O::Online | O::NoMonitor | O::Draining => up += 1,
                _ => {}
            }
        }
        let st = if !p.common.admin_state_up {
            O::Offline
        } else if err > 0 && up == 0 {
            O::Error
        } else if err > 0 {
            O::Degraded
        } else {
            O::Online
        };
        pool_status.insert(p.common.id.clone(), st);
        if st != p.common.operating_status {
            let mut p = p.clone();
            p.common.operating_status = st;
            tx.put(p);
        }
        if let Some(h) = s.monitor_of(&p.common.id) {
            let hs = if h.common.admin_state_up {
                O::Online
            } else {
                O::Offline
            };
            if hs != h.common.operating_status {
                let mut h = h.clone();
                h.common.operating_status = hs;
                tx.put(h);
            }
        }
    }
    let mut degraded = short || pool_status.values().any(|s| *s == O::Degraded);
    let mut error = pool_status.values().any(|s| *s == O::Error);
    for l in s.listeners_of(lb_id) {
        let reported = beat.listeners.iter().find(|b| b.id == l.common.id);
        let st = match reported.map(|r| r.operating_status) {
            Some(st) => st,
            // Left out to fit the datagram: unknown, not missing.
            None if beat.truncated => l.common.operating_status,
            None if l.common.admin_state_up => O::Error,
            None => O::Offline,
        };
        degraded |= st == O::Degraded;
        error |= st == O::Error;
        if st != l.common.operating_status {
            let mut l = l.clone();
            l.common.operating_status = st;
            tx.put(l);
        }
    }
    if let Some(lb) = s.load_balancers.get(lb_id) {
        let st = if !lb.common.admin_state_up {
            O::Offline
        } else if error {
            O::Error
        } else if degraded {
            O::Degraded
        } else {
            O::Online
        };
        if st != lb.common.operating_status {
            let mut lb = lb.clone();
            lb.common.operating_status = st;
            tx.put(lb);
        }
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
        let view = ctl.view();
        let r = ctl
            .db
            .write(|s, tx| -> Result<bool, crate::store::StoreError> {
                let actions = crate::decide::failover::watch(s, &view, &ctl.policy);
                Ok(execute(&ctl, &h, s, tx, actions))
            });
        match r {
            Ok(true) => ctl.wake.notify_one(),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "failover not stored"),
        }
    }
}

/// Records the health manager's decisions in `tx`; `true` when a
/// failover needs a push.
fn execute(ctl: &Controller, h: &Health, s: &State, tx: &mut Tx, actions: Vec<Failover>) -> bool {
    let silence = format!("no heartbeat for {} ms", h.heartbeat_timeout().as_millis());
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
            Failover::Quiet { amphora } => {
                if let Some(a) = s.amphorae.get(&amphora) {
                    let mut a = a.clone();
                    a.status = AmphoraStatus::Booting;
                    a.error = Some(silence.clone());
                    tx.put(a);
                }
            }
            Failover::Hold { amphora } => {
                if let Some(a) = s.amphorae.get(&amphora) {
                    let mut a = a.clone();
                    a.status = AmphoraStatus::FailoverStopped;
                    a.updated_at = Some(now.clone());
                    tx.put(a);
                }
            }
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
