//! What the controller knows of each amphora at run time, beside the
//! store: when it was last heard, what it last reported, how its repair
//! and its heartbeat-key push go. Not stored: a restarted controller
//! learns it again from the next heartbeats.
//!
//! The tasks hand this over through [`Liveness`] alone: its table is
//! private, every change is one method (one short lock, never held across
//! an `await` or a store write), and the decisions in [`crate::decide`]
//! read a [`View`], a copy taken at one instant, so a decision never sees
//! half of another task's change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Its BGP sessions and announcements (`None`: it announces nothing
    /// over BGP, or an older agent).
    pub bgp: Option<siphon_proto::bgp::BgpStatus>,
}

/// One amphora's run-time record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    pub report: Option<Report>,
    /// When its last verified heartbeat (and `report`) arrived.
    pub heard: Option<Instant>,
    /// When the last push to it finished (successfully).
    pub pushed: Option<Instant>,
    /// Since when it has been out of step (judged), and why.
    pub drift_since: Option<Instant>,
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
        match (self.heard, self.pushed) {
            (Some(r), Some(p)) => r > p + SETTLE,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// The repairer's verdict on one amphora, recorded by
/// [`Liveness::judged`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    InStep,
    /// Out of step for `reason` since `since`.
    Drift {
        reason: String,
        since: Instant,
    },
}

/// The shared table (see the module doc).
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    /// Shared with the views taken since the last change: a view costs
    /// a reference count, and the next change copies the table once.
    table: Mutex<Arc<HashMap<String, Live>>>,
    /// When other controllers last heard each amphora (read from the
    /// store each check): silence counts a heartbeat heard by any.
    elsewhere: Mutex<Arc<HashMap<String, Instant>>>,
}

impl Liveness {
    /// `started`: when this controller started; an amphora not heard
    /// since gets the same grace as one heard then.
    pub fn new(started: Instant) -> Liveness {
        Liveness {
            started,
            table: Mutex::new(Arc::default()),
            elsewhere: Mutex::new(Arc::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Live>) -> R) -> R {
        // A panic elsewhere cannot leave a record half written (each
        // change is a few plain stores), so a poisoned lock is used as is.
        f(Arc::make_mut(
            &mut self.table.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    fn read<R>(&self, f: impl FnOnce(&Arc<HashMap<String, Live>>) -> R) -> R {
        f(&self.table.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn entry<R>(&self, id: &str, f: impl FnOnce(&mut Live) -> R) -> R {
        self.with(|t| f(t.entry(id.to_owned()).or_default()))
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Everything, as of `now` (shared with the table until its next
    /// change, not copied).
    pub fn view(&self, now: Instant) -> View {
        View {
            now,
            started: self.started,
            live: self.read(Arc::clone),
            elsewhere: self
                .elsewhere
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// When other controllers last heard each amphora, as of now.
    pub fn heard_elsewhere(&self, times: HashMap<String, Instant>) {
        *self.elsewhere.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(times);
    }

    pub fn last_heard(&self, id: &str) -> Option<Instant> {
        self.read(|t| t.get(id).and_then(|l| l.heard))
    }

    /// What `id`'s last heartbeat said of BGP.
    pub fn bgp(&self, id: &str) -> Option<siphon_proto::bgp::BgpStatus> {
        self.read(|t| t.get(id).and_then(|l| l.report.as_ref()?.bgp.clone()))
    }

    /// Every BGP status last heard, for the metrics.
    pub fn bgp_all(&self) -> Vec<siphon_proto::bgp::BgpStatus> {
        self.read(|t| {
            t.values()
                .filter_map(|l| l.report.as_ref()?.bgp.clone())
                .collect()
        })
    }

    /// A verified heartbeat of `id` arrived `at`, saying `report`.
    pub fn heard(&self, id: &str, at: Instant, report: Report) {
        self.entry(id, |l| {
            l.heard = Some(at);
            l.report = Some(report);
        });
    }

    /// A push to `id` succeeded `at`: reports sent before it are not
    /// judged.
    pub fn pushed(&self, id: &str, at: Instant) {
        self.entry(id, |l| l.pushed = Some(at));
    }

    /// Records the repairer's verdicts.
    pub fn judged(&self, verdicts: &[(String, Verdict)]) {
        self.with(|t| {
            for (id, v) in verdicts {
                let l = t.entry(id.clone()).or_default();
                match v {
                    Verdict::InStep => {
                        l.drift = None;
                        l.drift_since = None;
                        l.failures = 0;
                        l.next_try = None;
                    }
                    Verdict::Drift { reason, since } => {
                        l.drift = Some(reason.clone());
                        l.drift_since = Some(*since);
                    }
                }
            }
        })
    }

    /// A repair of `id` ended; after a failure the next waits
    /// `backoff(failures in a row)`. Returns the failures in a row and
    /// that wait.
    pub fn repaired(
        &self,
        id: &str,
        ok: bool,
        now: Instant,
        backoff: impl FnOnce(u32) -> Duration,
    ) -> (u32, Option<Duration>) {
        self.entry(id, |l| {
            if ok {
                l.failures = 0;
                l.next_try = None;
                return (0, None);
            }
            l.failures = l.failures.saturating_add(1);
            let wait = backoff(l.failures);
            l.next_try = Some(now + wait);
            (l.failures, Some(wait))
        })
    }

    /// `id` was failed over: its repair starts afresh if it serves again
    /// (when it was heard stays: spares are chosen by it).
    pub fn failed_over(&self, id: &str) {
        self.with(|t| {
            if let Some(l) = t.get_mut(id) {
                *l = Live {
                    heard: l.heard,
                    report: l.report.take(),
                    ..Live::default()
                };
            }
        })
    }

    /// A heartbeat for registered amphora `id` came signed with the
    /// bootstrap key although its agent held its own: its key is pushed
    /// again (after a controller restart too, when nothing else is known
    /// of it yet). `true` when this is news.
    pub fn request_key(&self, id: &str) -> bool {
        self.entry(id, |l| !std::mem::replace(&mut l.rekey, true))
    }

    /// A key push to `id` ended; see [`Liveness::repaired`].
    pub fn key_pushed(
        &self,
        id: &str,
        ok: bool,
        now: Instant,
        backoff: impl FnOnce(u32) -> Duration,
    ) -> Option<Duration> {
        self.entry(id, |l| {
            if ok {
                l.key_failures = 0;
                l.key_next_try = None;
                l.rekey = false;
                return None;
            }
            l.key_failures = l.key_failures.saturating_add(1);
            let wait = backoff(l.key_failures);
            l.key_next_try = Some(now + wait);
            Some(wait)
        })
    }
}

/// [`Liveness`] as of one instant.
#[derive(Debug, Clone)]
pub struct View {
    pub now: Instant,
    pub started: Instant,
    live: Arc<HashMap<String, Live>>,
    elsewhere: Arc<HashMap<String, Instant>>,
}

impl View {
    /// An empty view: nothing heard yet, started `started`.
    #[cfg(test)]
    pub fn empty(now: Instant, started: Instant) -> View {
        View {
            now,
            started,
            live: Arc::default(),
            elsewhere: Arc::default(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Live> {
        self.live.get(id)
    }

    /// Sets `id`'s record (tests build views by hand).
    #[cfg(test)]
    pub fn set(&mut self, id: &str, live: Live) {
        Arc::make_mut(&mut self.live).insert(id.to_owned(), live);
    }

    /// When any controller last heard `id`.
    pub fn last_heard(&self, id: &str) -> Option<Instant> {
        let here = self.heard_here(id);
        let there = self.elsewhere.get(id).copied();
        here.max(there)
    }

    /// When this controller last heard `id`.
    pub fn heard_here(&self, id: &str) -> Option<Instant> {
        self.live.get(id).and_then(|l| l.heard)
    }

    /// Whether no controller has heard `id` for longer than `timeout`
    /// (counted from this controller's start at the earliest: what others
    /// heard while it was down is no reason to fail over at once).
    pub fn silent(&self, id: &str, timeout: Duration) -> bool {
        let since = self
            .last_heard(id)
            .map_or(self.started, |h| h.max(self.started));
        self.now.saturating_duration_since(since) > timeout
    }

    /// Whether this controller has not heard `id` for longer than
    /// `timeout`: its own reports of `id` are too old to judge by.
    pub fn silent_here(&self, id: &str, timeout: Duration) -> bool {
        let since = self.heard_here(id).unwrap_or(self.started);
        self.now.saturating_duration_since(since) > timeout
    }

    /// Sets when other controllers heard `id` (tests build views by hand).
    #[cfg(test)]
    pub fn set_elsewhere(&mut self, id: &str, at: Instant) {
        Arc::make_mut(&mut self.elsewhere).insert(id.to_owned(), at);
    }

    /// Whether the repairer judged `id` out of step.
    pub fn out_of_step(&self, id: &str) -> bool {
        self.live.get(id).is_some_and(|l| l.drift.is_some())
    }
}

/// Which amphorae the distributor still sends VIP traffic to: until it
/// completed a pass without an error, unknown (the kernel may hold
/// targets from before a restart), so none may be emptied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Routed {
    #[default]
    Unknown,
    Known(std::collections::HashSet<String>),
}

impl Routed {
    /// Whether no VIP traffic can reach `id` any more.
    pub fn unreached(&self, id: &str) -> bool {
        matches!(self, Routed::Known(to) if !to.contains(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_from_the_start_for_the_never_heard() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut v = View::empty(t0 + 3 * s, t0);
        assert!(v.silent("a", 2 * s));
        assert!(!v.silent("a", 4 * s));
        v.set(
            "a",
            Live {
                heard: Some(t0 + 2 * s),
                ..Live::default()
            },
        );
        assert!(!v.silent("a", 2 * s));
        assert!(v.silent("a", s / 2));
    }

    /// A heartbeat another controller heard keeps an amphora from
    /// being silent (a controller cut off from the amphorae fails none
    /// over), but this controller's own reports of it are still too old
    /// to judge by; and nothing heard before this controller started
    /// counts against the amphora.
    #[test]
    fn silence_is_the_fleets_judging_is_this_controllers() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut v = View::empty(t0 + 10 * s, t0 + 5 * s);
        v.set(
            "a",
            Live {
                heard: Some(t0 + 6 * s),
                ..Live::default()
            },
        );
        v.set_elsewhere("a", t0 + 9 * s);
        assert!(!v.silent("a", 2 * s));
        assert!(v.silent_here("a", 2 * s));
        assert_eq!(v.last_heard("a"), Some(t0 + 9 * s));
        // Heard elsewhere long before this controller started.
        v.set_elsewhere("b", t0);
        assert!(!v.silent("b", 6 * s), "counted from this start");
        assert!(v.silent("b", 4 * s));
    }

    #[test]
    fn a_report_right_after_a_push_is_not_judged() {
        let t0 = Instant::now();
        let mut l = Live::default();
        assert!(!l.judgeable(), "never heard");
        l.heard = Some(t0);
        assert!(l.judgeable(), "heard, never pushed");
        l.pushed = Some(t0);
        assert!(!l.judgeable());
        l.heard = Some(t0 + SETTLE);
        assert!(!l.judgeable(), "within the settle time");
        l.heard = Some(t0 + SETTLE + Duration::from_millis(1));
        assert!(l.judgeable());
    }

    #[test]
    fn verdicts_and_repairs_are_recorded_in_one_place() {
        let t0 = Instant::now();
        let live = Liveness::new(t0);
        let wait = |n: u32| Duration::from_millis(100 * u64::from(n));
        live.heard("a", t0, Report::default());
        live.judged(&[(
            "a".into(),
            Verdict::Drift {
                reason: "lost".into(),
                since: t0,
            },
        )]);
        assert_eq!(live.repaired("a", false, t0, wait), (1, Some(wait(1))));
        assert_eq!(live.repaired("a", false, t0, wait), (2, Some(wait(2))));
        let v = live.view(t0);
        assert!(v.out_of_step("a"));
        assert_eq!(v.get("a").and_then(|l| l.next_try), Some(t0 + wait(2)));
        live.judged(&[("a".into(), Verdict::InStep)]);
        let l = live.view(t0).get("a").cloned().unwrap_or_default();
        assert_eq!((l.drift, l.failures, l.next_try), (None, 0, None));
        // A failover forgets the repair, not when it was heard.
        live.judged(&[(
            "a".into(),
            Verdict::Drift {
                reason: "lost".into(),
                since: t0,
            },
        )]);
        live.failed_over("a");
        assert!(!live.view(t0).out_of_step("a"));
        assert_eq!(live.last_heard("a"), Some(t0));
    }

    #[test]
    fn a_key_is_requested_again_once_and_cleared_by_a_push() {
        let t0 = Instant::now();
        let live = Liveness::new(t0);
        // Nothing known of it yet (a restarted controller): still pushed.
        assert!(live.request_key("a"));
        assert!(!live.request_key("a"), "already requested");
        let wait = |_| Duration::from_secs(1);
        assert_eq!(live.key_pushed("a", false, t0, wait), Some(wait(1)));
        assert!(live.view(t0).get("a").is_some_and(|l| l.rekey));
        assert_eq!(live.key_pushed("a", true, t0, wait), None);
        let l = live.view(t0).get("a").cloned().unwrap_or_default();
        assert_eq!((l.rekey, l.key_failures, l.key_next_try), (false, 0, None));
    }

    #[test]
    fn nothing_is_unreached_until_the_routes_are_known() {
        assert!(!Routed::Unknown.unreached("a"));
        let known = Routed::Known(["b".to_owned()].into());
        assert!(known.unreached("a"));
        assert!(!known.unreached("b"));
    }
}
