//! The controller's decisions, as pure functions of what is stored (a
//! [`State`](crate::model::State)), what is known of the amphorae at run
//! time (a [`View`](crate::liveness::View), which carries `now`) and the
//! [`Policy`]. They return what to do; the tasks around them
//! ([`crate::health`], [`crate::repair`], [`crate::provision`],
//! [`crate::distributor`], the API's scale-out) read the clock, write the
//! store, log and push. So every branch is tested here with plain values,
//! no socket, no root, no sleep.
//!
//! - [`spares`]: which spare amphorae are handed out, scale-out and
//!   scale-in.
//! - [`failover`]: silent amphorae, the circuit breaker, failover.
//! - [`heartbeat`]: what a verified heartbeat changes in the store.
//! - [`repair`]: amphorae heard but out of step: re-push, then failover.
//! - [`provision`]: what the provisioner works on, and the statuses a
//!   push leaves.
//! - [`distribution`]: which amphorae each VIP goes to, and in which
//!   order the driver is told.

pub mod distribution;
pub mod failover;
pub mod heartbeat;
pub mod provision;
pub mod repair;
pub mod spares;

#[cfg(test)]
pub(crate) mod fixture;

use std::time::Duration;

use crate::config::ControlConfig;

/// The settings the decisions depend on, read once from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The health manager's settings; `None`: there is none (no
    /// heartbeats, so no amphora is ever judged silent).
    pub health: Option<HealthPolicy>,
    /// The first wait after a failed push; doubled each time.
    pub backoff: Duration,
    /// The longest wait between two attempts of a repair or retry.
    pub retry_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Silence after which an amphora is failed over.
    pub heartbeat_timeout: Duration,
    /// How long an amphora stays out of step before it is failed over.
    pub repair_timeout: Duration,
    /// The circuit breaker: this many silent together stop failover.
    pub failover_threshold: Option<usize>,
}

impl Policy {
    pub fn of(c: &ControlConfig) -> Policy {
        Policy {
            health: c.health.as_ref().map(|h| HealthPolicy {
                heartbeat_timeout: h.heartbeat_timeout(),
                repair_timeout: h.repair_timeout(),
                failover_threshold: h.failover_threshold,
            }),
            backoff: c.push.backoff(),
            retry_max: c
                .health
                .as_ref()
                .map_or(Duration::from_secs(30), |h| h.retry_max()),
        }
    }

    /// Whether `id` is silent by the health manager's measure (never,
    /// without one).
    pub fn silent(&self, view: &crate::liveness::View, id: &str) -> bool {
        self.health
            .as_ref()
            .is_some_and(|h| view.silent(id, h.heartbeat_timeout))
    }

    /// The wait after `failures` failed attempts in a row.
    pub fn backoff(&self, failures: u32) -> Duration {
        backoff(failures, self.backoff, self.retry_max)
    }
}

/// The wait after `failures` failed attempts in a row: `first`, doubled
/// each time, at most `max`.
pub fn backoff(failures: u32, first: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let f = Duration::from_millis(200);
        let m = Duration::from_secs(30);
        assert_eq!(backoff(0, f, m), f);
        assert_eq!(backoff(1, f, m), f);
        assert_eq!(backoff(2, f, m), f * 2);
        assert_eq!(backoff(4, f, m), f * 8);
        assert_eq!(backoff(60, f, m), m);
    }
}
