//! The health thread: a single-threaded tokio runtime running one check
//! loop per monitored member, never on a worker. Results go through each
//! member's [`Tracker`]; a state change leaves as a [`Change`] for the
//! control side, which rebuilds only that member's pool.
//!
//! Workers report passive ejections here too (after
//! `Options::eject_after` refused or `eject_after_timeouts` timed-out
//! connects in a row). One is carried out only if the pool can spare the
//! member: never its last member that is up, and never more than
//! `max_percent` of its members ejected at once (Envoy's
//! `max_ejection_percent`), so an overloaded pool slows down rather than
//! going dark. An ejected member with a monitor comes back after
//! `max_retries` good checks; one without comes back after a [`Backoff`].

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;

use super::probe::{self, Check};
use super::track::{Backoff, Tracker};
use super::{Change, ConnectFailure, MemberKey, Target};
use crate::stats::{MemberStats, LATENCY_BOUNDS_US};

/// What the control side and the workers tell the health thread.
#[derive(Debug)]
pub enum Input {
    /// The members of the new generation (replaces the previous plan),
    /// with their counters.
    Plan(Vec<(Target, Arc<MemberStats>)>),
    /// A worker saw `failures` connect failures of one kind in a row.
    Eject {
        stats: Arc<MemberStats>,
        failures: u32,
        why: ConnectFailure,
    },
    Stop,
}

/// How passive ejection is bounded: the back-off of ejected members that
/// have no monitor, and the share of a pool that may be out at once.
#[derive(Debug, Clone, Copy)]
pub struct EjectPolicy {
    pub base: Duration,
    pub max: Duration,
    /// At most this percentage of a pool's members ejected at once; the
    /// last member that is up is never ejected, whatever the share.
    pub max_percent: u32,
}

/// The running health thread.
#[derive(Debug)]
pub struct Monitor {
    tx: UnboundedSender<Input>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts the thread; state changes are sent to `changes`.
    pub fn spawn(changes: mpsc::Sender<Change>, policy: EjectPolicy) -> std::io::Result<Monitor> {
        let (tx, rx) = unbounded_channel();
        let tls = probe::tls_connector().map_err(std::io::Error::other)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("siphon-health".into())
            .spawn(move || {
                let state = State {
                    entries: HashMap::new(),
                    changes,
                    policy,
                    tls,
                };
                runtime.block_on(state.run(rx));
            })?;
        Ok(Monitor {
            tx,
            thread: Some(thread),
        })
    }

    /// A sender for plans and ejection reports.
    pub fn sender(&self) -> UnboundedSender<Input> {
        self.tx.clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the health thread panicked");
            }
        }
    }
}

#[derive(Debug)]
enum Outcome {
    Checked(Result<(), String>),
    /// An ejected member without a monitor has served its back-off.
    Readmit,
}

#[derive(Debug)]
struct Report {
    key: MemberKey,
    check_id: u64,
    outcome: Outcome,
}

#[derive(Debug)]
struct Entry {
    target: Target,
    tracker: Tracker,
    /// Down by passive ejection (not by a check), until it is up again.
    ejected: bool,
    backoff: Backoff,
    /// The check loop, or the pending re-admission.
    task: Option<AbortHandle>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct State {
    entries: HashMap<MemberKey, Entry>,
    changes: mpsc::Sender<Change>,
    policy: EjectPolicy,
    tls: TlsConnector,
}

impl State {
    async fn run(mut self, mut rx: UnboundedReceiver<Input>) {
        let (report_tx, mut reports) = unbounded_channel::<Report>();
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    None | Some(Input::Stop) => return,
                    Some(Input::Plan(targets)) => self.plan(targets, &report_tx),
                    Some(Input::Eject { stats, failures, why }) => {
                        self.eject(&stats, failures, why, &report_tx);
                    }
                },
                Some(r) = reports.recv() => self.report(r),
            }
        }
    }

    fn plan(
        &mut self,
        targets: Vec<(Target, Arc<MemberStats>)>,
        reports: &UnboundedSender<Report>,
    ) {
        let mut next = HashMap::with_capacity(targets.len());
        for (t, stats) in targets {
            let key = t.key.clone();
            let kept = self
                .entries
                .remove(&key)
                .filter(|e| e.target.check_id == t.check_id);
            let entry = match kept {
                Some(e) => e,
                None => {
                    let task = t.check.clone().map(|check| {
                        let offset = spread(&key, t.delay);
                        let target = t.clone();
                        let (tls, reports) = (self.tls.clone(), reports.clone());
                        tokio::spawn(check_loop(target, check, offset, tls, stats, reports))
                            .abort_handle()
                    });
                    Entry {
                        target: t,
                        tracker: Tracker::default(),
                        ejected: false,
                        backoff: Backoff::new(self.policy.base, self.policy.max),
                        task,
                    }
                }
            };
            next.insert(key, entry);
        }
        // Entries left over belong to removed members: dropping them stops
        // their checks.
        self.entries = next;
    }

    fn eject(
        &mut self,
        stats: &Arc<MemberStats>,
        failures: u32,
        why: ConnectFailure,
        reports: &UnboundedSender<Report>,
    ) {
        let key = MemberKey {
            pool: stats.pool_id.clone(),
            member: stats.id.clone(),
        };
        match self.entries.get(&key) {
            Some(e) if e.tracker.is_up() => {}
            _ => return,
        }
        if !self.can_spare(&key.pool) {
            stats.ejections.held_back.fetch_add(1, Relaxed);
            tracing::debug!(
                pool = %key.pool,
                member = %key.member,
                failures,
                "ejection held back: the pool cannot spare the member"
            );
            return;
        }
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        e.tracker.eject();
        e.ejected = true;
        let reason = match why {
            ConnectFailure::Refused => {
                stats.ejections.refused.fetch_add(1, Relaxed);
                format!("ejected after {failures} refused connects in a row")
            }
            ConnectFailure::TimedOut => {
                stats.ejections.timed_out.fetch_add(1, Relaxed);
                format!("ejected after {failures} connect timeouts in a row")
            }
        };
        tracing::warn!(pool = %key.pool, member = %key.member, "{reason}");
        if e.target.check.is_none() {
            let wait = e.backoff.eject(Instant::now());
            let (key, check_id, reports) = (key.clone(), e.target.check_id, reports.clone());
            e.task = Some(
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = reports.send(Report {
                        key,
                        check_id,
                        outcome: Outcome::Readmit,
                    });
                })
                .abort_handle(),
            );
        }
        let check_id = e.target.check_id;
        self.emit(key, check_id, false, reason);
    }

    /// Whether one more member of `pool` may be ejected: one other member
    /// stays up, and the ejected share stays within the policy.
    fn can_spare(&self, pool: &str) -> bool {
        let (mut total, mut up, mut ejected) = (0u64, 0u64, 0u64);
        for (k, e) in &self.entries {
            if k.pool == pool {
                total += 1;
                up += u64::from(e.tracker.is_up());
                ejected += u64::from(e.ejected);
            }
        }
        up > 1 && (ejected + 1) * 100 <= u64::from(self.policy.max_percent) * total
    }

    fn report(&mut self, r: Report) {
        let Some(e) = self.entries.get_mut(&r.key) else {
            return;
        };
        if e.target.check_id != r.check_id {
            return;
        }
        let (up, reason) = match r.outcome {
            Outcome::Readmit => {
                e.task = None;
                e.backoff.readmit(Instant::now());
                e.tracker = Tracker::default();
                (true, "re-admitted after the ejection back-off".to_owned())
            }
            Outcome::Checked(result) => {
                let ok = result.is_ok();
                let Some(up) = e.tracker.record(ok, e.target.rise, e.target.fall) else {
                    return;
                };
                let reason = match result {
                    Ok(()) => format!("{} passed check(s) in a row", e.target.rise),
                    Err(why) => format!("{} failed check(s) in a row, last: {why}", e.target.fall),
                };
                (up, reason)
            }
        };
        if up {
            e.ejected = false;
            tracing::info!(pool = %r.key.pool, member = %r.key.member, %reason, "member up");
        } else {
            tracing::warn!(pool = %r.key.pool, member = %r.key.member, %reason, "member down");
        }
        self.emit(r.key, r.check_id, up, reason);
    }

    fn emit(&self, key: MemberKey, check_id: u64, up: bool, reason: String) {
        let _ = self.changes.send(Change {
            key,
            check_id,
            up,
            reason,
        });
    }
}

/// Where in its interval a member's checks run: a fixed offset from a
/// hash of its key, so a thousand members checked every second spread
/// over the second instead of firing together.
fn spread(key: &MemberKey, delay: Duration) -> Duration {
    let h = xxhash_rust::xxh3::xxh3_64(format!("{}\0{}", key.pool, key.member).as_bytes());
    let nanos = delay.as_nanos().max(1);
    Duration::from_nanos((u128::from(h) % nanos) as u64)
}

/// Checks `target` (whose monitor is `check`) every `delay`, `offset` into
/// each interval, until aborted.
async fn check_loop(
    target: Target,
    check: Check,
    offset: Duration,
    tls: TlsConnector,
    stats: Arc<MemberStats>,
    reports: UnboundedSender<Report>,
) {
    let Target {
        key,
        check_id,
        delay,
        ..
    } = target;
    let start = tokio::time::Instant::now() + offset;
    let mut ticks = tokio::time::interval_at(start, delay.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = tokio::time::Instant::now();
        let result = probe::run(&check, &tls).await.map_err(|e| e.to_string());
        if result.is_ok() {
            // Only this loop writes its member's histogram.
            stats
                .check_latency
                .observe(LATENCY_BOUNDS_US, started.elapsed());
        }
        let report = Report {
            key: key.clone(),
            check_id,
            outcome: Outcome::Checked(result),
        };
        if reports.send(report).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_spread_over_the_interval() {
        let delay = Duration::from_secs(1);
        let mut buckets = [0u32; 10];
        for i in 0..1000 {
            let key = MemberKey {
                pool: "p".into(),
                member: format!("m{i}"),
            };
            let off = spread(&key, delay);
            assert!(off < delay);
            buckets[(off.as_millis() / 100) as usize] += 1;
        }
        // 100 expected per tenth of the interval.
        assert!(
            buckets.iter().all(|&n| (60..=140).contains(&n)),
            "{buckets:?}"
        );
    }
}
