//! Log lines a client can trigger at will (a refused token, a forged
//! heartbeat, an accept error under descriptor exhaustion) are written at
//! most once per interval, with a count of what was held back: a flood of
//! bad requests must not become a flood of log lines too.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    pub const fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            state: Mutex::new(Window {
                last: None,
                held: 0,
            }),
        }
    }

    /// One more event at `now`: `Some(held back since the last line)` when
    /// a line should be written for it, `None` when it is only counted.
    pub fn hit(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match w.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                w.held = w.held.saturating_add(1);
                None
            }
            _ => {
                w.last = Some(now);
                Some(std::mem::take(&mut w.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let l = LogLimit::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(l.hit(t), Some(0));
        for i in 1..=5 {
            assert_eq!(l.hit(t + Duration::from_secs(i)), None);
        }
        assert_eq!(l.hit(t + Duration::from_secs(10)), Some(5));
        assert_eq!(l.hit(t + Duration::from_secs(11)), None);
        assert_eq!(l.hit(t + Duration::from_secs(25)), Some(1));
    }
}
