//! The health thread: a single-threaded tokio runtime running one check
//! loop per monitored member, never on a worker. Results go through each
//! member's [`Tracker`]; a state change leaves as a [`Change`] for the
//! control side, which rebuilds only that member's pool.
//!
//! Workers report passive ejections here too (after
//! `Options::eject_after` connect failures in a row). An ejected member
//! with a monitor comes back after `max_retries` good checks; one without
//! comes back after a [`Backoff`].

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;

use super::probe::{self, Check};
use super::track::{Backoff, Tracker};
use super::{Change, MemberKey, Target};

/// What the control side and the workers tell the health thread.
#[derive(Debug)]
pub enum Input {
    /// The members of the new generation (replaces the previous plan).
    Plan(Vec<Target>),
    /// A worker saw `failures` connect failures in a row.
    Eject {
        key: MemberKey,
        failures: u32,
    },
    Stop,
}

/// Back-off of ejected members that have no monitor.
#[derive(Debug, Clone, Copy)]
pub struct EjectBackoff {
    pub base: Duration,
    pub max: Duration,
}

/// The running health thread.
#[derive(Debug)]
pub struct Monitor {
    tx: UnboundedSender<Input>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts the thread; state changes are sent to `changes`.
    pub fn spawn(changes: mpsc::Sender<Change>, backoff: EjectBackoff) -> std::io::Result<Monitor> {
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
                    backoff,
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

    pub fn send(&self, input: Input) {
        // The thread ends only on Stop; nothing to do if it is gone.
        let _ = self.tx.send(input);
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
    backoff: EjectBackoff,
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
                    Some(Input::Eject { key, failures }) => self.eject(key, failures, &report_tx),
                },
                Some(r) = reports.recv() => self.report(r),
            }
        }
    }

    fn plan(&mut self, targets: Vec<Target>, reports: &UnboundedSender<Report>) {
        let mut next = HashMap::with_capacity(targets.len());
        for t in targets {
            let key = t.key.clone();
            let kept = self
                .entries
                .remove(&key)
                .filter(|e| e.target.check_id == t.check_id);
            let entry = match kept {
                Some(e) => e,
                None => {
                    let task = t.check.clone().map(|check| {
                        let delay = t.delay;
                        let offset = spread(&key, delay);
                        tokio::spawn(check_loop(
                            key.clone(),
                            t.check_id,
                            check,
                            delay,
                            offset,
                            self.tls.clone(),
                            reports.clone(),
                        ))
                        .abort_handle()
                    });
                    Entry {
                        target: t,
                        tracker: Tracker::default(),
                        backoff: Backoff::new(self.backoff.base, self.backoff.max),
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

    fn eject(&mut self, key: MemberKey, failures: u32, reports: &UnboundedSender<Report>) {
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        if !e.tracker.eject() {
            return;
        }
        let reason = format!("ejected after {failures} connect failures in a row");
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

async fn check_loop(
    key: MemberKey,
    check_id: u64,
    check: Check,
    delay: Duration,
    offset: Duration,
    tls: TlsConnector,
    reports: UnboundedSender<Report>,
) {
    let start = tokio::time::Instant::now() + offset;
    let mut ticks = tokio::time::interval_at(start, delay.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe::run(&check, &tls).await.map_err(|e| e.to_string());
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
