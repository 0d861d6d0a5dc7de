//! Spreading accepted connections over the workers.
//!
//! `SO_REUSEPORT` picks a worker by hashing the 4-tuple: fair over many
//! connections, lopsided over a few. With four long transfers on two
//! workers, one worker gets three or all four an eighth of the time, and
//! that worker's core caps them while the other idles. So each worker
//! publishes how many connections it holds, and a worker that accepts a
//! connection while it holds clearly more than the least-loaded one hands
//! the connection over (after the ACL check; the new owner does the rest).
//! "Clearly": more than a quarter over (with few connections, any
//! difference), so many short connections, which even out by themselves,
//! are rarely moved: at 50 concurrent short connections on two workers an
//! eighth moved two in five of them, each a wake-up of the other worker.
//!
//! The counts are one relaxed store per event-loop pass and one load per
//! worker per accept; a handoff is a channel send and a wake-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_channel::Sender;
use crossbeam_utils::CachePadded;
use mio::Waker;

use crate::mailbox::Command;

/// A worker that takes no handoffs (draining) publishes this load.
pub const CLOSED: usize = usize::MAX / 2;

#[derive(Debug)]
struct Peer {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

/// Shared by all workers of one server.
#[derive(Debug)]
pub struct Spread {
    load: Box<[CachePadded<AtomicUsize>]>,
    peers: OnceLock<Box<[Peer]>>,
    enabled: bool,
}

impl Spread {
    pub fn new(workers: usize, enabled: bool) -> Arc<Spread> {
        Arc::new(Spread {
            load: (0..workers).map(|_| CachePadded::default()).collect(),
            peers: OnceLock::new(),
            enabled: enabled && workers > 1,
        })
    }

    /// The workers' mailboxes, once they all exist.
    pub fn connect(&self, peers: Vec<(Sender<Command>, Arc<Waker>)>) {
        let _ = self.peers.set(
            peers
                .into_iter()
                .map(|(tx, waker)| Peer { tx, waker })
                .collect(),
        );
    }

    /// Publishes worker `id`'s connection count.
    pub fn publish(&self, id: usize, connections: usize) {
        if let Some(l) = self.load.get(id) {
            l.store(connections, Ordering::Relaxed);
        }
    }

    /// Every worker's published connection count.
    pub fn loads(&self) -> Vec<usize> {
        self.load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect()
    }

    /// The worker a connection accepted by `me` (holding `mine`) should go
    /// to, if any.
    pub fn target(&self, me: usize, mine: usize) -> Option<usize> {
        if !self.enabled {
            return None;
        }
        let (to, least) = self
            .load
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(i, l)| (i, l.load(Ordering::Relaxed)))
            .min_by_key(|(_, l)| *l)?;
        (mine > least + least / 4).then_some(to)
    }

    /// Sends `command` to worker `to`; gives it back if `to` is gone.
    pub fn hand(&self, to: usize, command: Command) -> Result<(), Command> {
        let Some(peer) = self.peers.get().and_then(|p| p.get(to)) else {
            return Err(command);
        };
        // Counted now, so the next accept before `to` publishes sees it.
        if let Some(l) = self.load.get(to) {
            l.fetch_add(1, Ordering::Relaxed);
        }
        peer.tx.send(command).map_err(|e| e.into_inner())?;
        let _ = peer.waker.wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_loads(loads: &[usize]) -> Arc<Spread> {
        let s = Spread::new(loads.len(), true);
        for (i, l) in loads.iter().enumerate() {
            s.publish(i, *l);
        }
        s
    }

    #[test]
    fn a_few_long_connections_end_up_even() {
        // Four connections all hashed to worker 0 of two.
        let s = with_loads(&[0, 0]);
        let mut held = [0usize; 2];
        for _ in 0..4 {
            match s.target(0, held[0]) {
                Some(to) => {
                    held[to] += 1;
                    s.publish(to, held[to]);
                }
                None => held[0] += 1,
            }
            s.publish(0, held[0]);
        }
        assert_eq!(held, [2, 2]);
    }

    #[test]
    fn small_differences_between_busy_workers_stay_put() {
        let s = with_loads(&[100, 95, 96]);
        assert_eq!(s.target(0, 100), None, "within a quarter");
        assert_eq!(s.target(0, 118), None, "within a quarter");
        assert_eq!(s.target(0, 119), Some(1), "the least loaded");
        assert_eq!(
            with_loads(&[0, CLOSED]).target(0, 50),
            None,
            "a draining worker takes nothing"
        );
        assert_eq!(Spread::new(1, true).target(0, 50), None);
        let off = Spread::new(2, false);
        off.publish(1, 0);
        assert_eq!(off.target(0, 50), None);
    }
}
