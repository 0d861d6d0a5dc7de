//! Rise/fall bookkeeping for one checked member, and the back-off that
//! re-admits an ejected member that has no monitor. Pure: no sockets, no
//! clocks; the monitor passes results and times in.

use std::time::{Duration, Instant};

/// Consecutive results of one member's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    up: bool,
    successes: u32,
    failures: u32,
}

impl Default for Tracker {
    /// A member starts up: a config push must not take traffic away from
    /// members that have not been checked yet (haproxy does the same); one
    /// that never answers goes down after `fall` failed checks.
    fn default() -> Tracker {
        Tracker {
            up: true,
            successes: 0,
            failures: 0,
        }
    }
}

impl Tracker {
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check result; `rise` successes in a row bring a down
    /// member up, `fall` failures in a row take an up member down. Returns
    /// the new state when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    /// Passive ejection: down at once, and `rise` good checks to come back.
    /// Returns true when the member was up.
    pub fn eject(&mut self) -> bool {
        let was_up = self.up;
        self.up = false;
        self.successes = 0;
        was_up
    }
}

/// Re-admission of ejected members without a monitor: the first ejection
/// keeps a member out for `base`, each one that follows within `reset`
/// of the last re-admission doubles it, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
    readmitted: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            current: base,
            readmitted: None,
        }
    }

    /// An ejection at `now`: how long the member stays out.
    pub fn eject(&mut self, now: Instant) -> Duration {
        // A member that stayed healthy for a while starts over at `base`.
        let recent = self
            .readmitted
            .is_some_and(|t| now.saturating_duration_since(t) < self.max);
        self.current = if recent {
            self.current.saturating_mul(2).min(self.max)
        } else {
            self.base
        };
        self.current
    }

    /// The member went back in at `now`.
    pub fn readmit(&mut self, now: Instant) {
        self.readmitted = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut t = Tracker::default();
        assert!(t.is_up());
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        // A success in between starts the failure count over.
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), Some(false));
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), Some(true));
        assert!(t.is_up());
    }

    #[test]
    fn ejection_needs_rise_successes_to_come_back() {
        let mut t = Tracker::default();
        assert!(t.eject());
        assert!(!t.eject());
        assert_eq!(t.record(true, 3, 3), None);
        assert_eq!(t.record(true, 3, 3), None);
        assert_eq!(t.record(true, 3, 3), Some(true));
    }

    #[test]
    fn backoff_doubles_while_ejections_repeat_and_resets_later() {
        let s = Duration::from_secs(1);
        let mut b = Backoff::new(s, 8 * s);
        let t0 = Instant::now();
        assert_eq!(b.eject(t0), s);
        b.readmit(t0 + s);
        assert_eq!(b.eject(t0 + 2 * s), 2 * s);
        b.readmit(t0 + 4 * s);
        assert_eq!(b.eject(t0 + 5 * s), 4 * s);
        b.readmit(t0 + 9 * s);
        assert_eq!(b.eject(t0 + 10 * s), 8 * s);
        b.readmit(t0 + 18 * s);
        assert_eq!(b.eject(t0 + 19 * s), 8 * s, "capped");
        b.readmit(t0 + 27 * s);
        // Healthy for longer than the cap: back to the base.
        assert_eq!(b.eject(t0 + 60 * s), s);
    }
}
