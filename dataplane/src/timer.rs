//! A hashed timer wheel: O(1) to schedule, expiry visits only the slots of
//! the ticks that passed. Pure: the caller passes `now`.
//!
//! Activity on a connection costs no timer operation: the owner keeps the
//! tick of its one live entry and ignores any other that fires (lazy
//! cancellation), rescheduling only when a stale deadline fires. Entries
//! an owner no longer needs at all (a closed connection, a connect deadline
//! once connected) are cancelled, so an idle worker holds no entries and
//! sleeps instead of waking every tick for timers of connections long gone.

use std::time::{Duration, Instant};

/// Granularity of timeouts.
pub const TICK: Duration = Duration::from_millis(10);
const SLOTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub key: usize,
    pub tick: u64,
}

#[derive(Debug)]
pub struct TimerWheel {
    start: Instant,
    /// Last tick whose slot was processed.
    done: u64,
    slots: Vec<Vec<Expired>>,
    len: usize,
    /// No entry is due before this tick (a lower bound: the first
    /// non-empty slot ahead may hold only a later lap's entries). The loop
    /// sleeps until then, so a worker whose connections have long idle
    /// timers does not wake every tick.
    next: u64,
}

impl TimerWheel {
    pub fn new(now: Instant) -> TimerWheel {
        TimerWheel {
            start: now,
            done: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
            next: u64::MAX,
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.start);
        // round up: never fire early
        d.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// Schedules `key` to fire at or after `at`; returns the entry's tick,
    /// which identifies it.
    pub fn schedule(&mut self, at: Instant, key: usize) -> u64 {
        let tick = self.tick_of(at).max(self.done + 1);
        self.slots[(tick % SLOTS as u64) as usize].push(Expired { key, tick });
        self.len += 1;
        self.next = self.next.min(tick);
        tick
    }

    /// Removes the pending entry of `key` at `tick` (as `schedule` returned
    /// it); nothing when it already fired. Costs a scan of one slot, which
    /// holds about `len / 1024` entries.
    pub fn cancel(&mut self, tick: u64, key: usize) {
        if tick <= self.done {
            return;
        }
        let slot = &mut self.slots[(tick % SLOTS as u64) as usize];
        if let Some(i) = slot.iter().position(|e| e.tick == tick && e.key == key) {
            slot.swap_remove(i);
            self.len -= 1;
            if self.len == 0 {
                self.next = u64::MAX;
            }
        }
    }

    /// Moves every entry due by `now` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Expired>) {
        let now_tick = self.tick_of(now);
        if now_tick <= self.done {
            return;
        }
        // After a long pause, one lap over the slots covers every tick.
        let from = self.done + 1;
        let to = now_tick.min(self.done + SLOTS as u64);
        for t in from..=to {
            let slot = &mut self.slots[(t % SLOTS as u64) as usize];
            let mut i = 0;
            while i < slot.len() {
                if slot[i].tick <= now_tick {
                    out.push(slot.swap_remove(i));
                    self.len -= 1;
                } else {
                    i += 1;
                }
            }
        }
        self.done = now_tick;
        if self.next <= now_tick {
            self.next = self.first_pending();
        }
    }

    /// The tick of the first non-empty slot after `done`, one lap at most.
    fn first_pending(&self) -> u64 {
        if self.len == 0 {
            return u64::MAX;
        }
        (self.done + 1..=self.done + SLOTS as u64)
            .find(|t| !self.slots[(t % SLOTS as u64) as usize].is_empty())
            .unwrap_or(u64::MAX)
    }

    /// How long the event loop may sleep before an entry may be due.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let tick = self.next.max(self.done + 1);
        let next = self.start + TICK * u32::try_from(tick).unwrap_or(u32::MAX);
        Some(next.saturating_duration_since(now))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_after_deadline_never_before() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let tick = w.schedule(t0 + Duration::from_millis(35), 7);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(30), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_millis(40), &mut out);
        assert_eq!(out, vec![Expired { key: 7, tick }]);
        assert!(w.is_empty());
    }

    #[test]
    fn the_loop_sleeps_until_the_first_entry_not_every_tick() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        assert_eq!(w.next_timeout(t0), None);
        w.schedule(t0 + Duration::from_secs(5), 1);
        assert_eq!(w.next_timeout(t0), Some(Duration::from_secs(5)));
        w.schedule(t0 + Duration::from_millis(200), 2);
        assert_eq!(w.next_timeout(t0), Some(Duration::from_millis(200)));
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out.len(), 1);
        let now = t0 + Duration::from_millis(200);
        assert_eq!(w.next_timeout(now), Some(Duration::from_millis(4800)));
        // Beyond one lap (10.24 s) the wait is a lower bound: woken once a
        // lap, nothing fires early.
        w.schedule(t0 + Duration::from_secs(30), 3);
        w.expire(t0 + Duration::from_secs(5), &mut out);
        assert_eq!(out.len(), 2);
        let now = t0 + Duration::from_secs(5);
        let wait = w.next_timeout(now).unwrap();
        assert!(wait > Duration::from_secs(1), "{wait:?}");
        w.expire(now + wait, &mut out);
        assert_eq!(out.len(), 2, "nothing due yet");
        let now = now + wait;
        let wait = w.next_timeout(now).unwrap();
        // One lap on, still not past the entry.
        assert!(wait >= Duration::from_secs(10) && now + wait <= t0 + Duration::from_secs(30));
    }

    #[test]
    fn cancelled_entries_neither_fire_nor_keep_the_loop_awake() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let a = w.schedule(t0 + Duration::from_millis(50), 1);
        let b = w.schedule(t0 + Duration::from_millis(50), 2);
        w.cancel(a, 1);
        w.cancel(a, 1); // twice: no harm
        assert_eq!(w.len(), 1);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(60), &mut out);
        assert_eq!(out, vec![Expired { key: 2, tick: b }]);
        w.cancel(b, 2); // already fired: nothing
        let c = w.schedule(t0 + Duration::from_secs(50), 3);
        w.cancel(c, 3);
        assert_eq!(w.next_timeout(t0), None, "nothing left to wake for");
    }

    #[test]
    fn long_timers_survive_laps() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        w.schedule(t0 + Duration::from_secs(25), 1); // 2,500 ticks: > 2 laps
        let mut out = Vec::new();
        for ms in (0..25_000).step_by(100) {
            w.expire(t0 + Duration::from_millis(ms), &mut out);
            assert!(out.is_empty(), "fired early at {ms} ms");
        }
        w.expire(t0 + Duration::from_millis(25_010), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_long_pause_fires_everything_due() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        for k in 0..100 {
            w.schedule(t0 + Duration::from_millis(10 * k as u64), k);
        }
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_secs(60), &mut out);
        assert_eq!(out.len(), 100);
        assert_eq!(w.next_timeout(t0), None);
    }
}
