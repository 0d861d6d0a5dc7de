//! The health manager's decision: what to do about amphorae gone silent.

use std::collections::{BTreeMap, HashSet};

use crate::decide::{spares, HealthPolicy, Policy};
use crate::liveness::View;
use crate::model::{AmphoraStatus, OperatingStatus, State};

/// One thing the health manager does this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failover {
    /// A spare went quiet: back to `BOOTING`, not handed out until heard
    /// again.
    Quiet { amphora: String },
    /// The circuit breaker is open: the amphora stays where it is,
    /// `FAILOVER_STOPPED`, until it is heard again.
    Hold { amphora: String },
    /// Silent amphorae of `lb` replaced by spares: (failed, spare) pairs.
    Replace {
        lb: String,
        pairs: Vec<(String, String)>,
    },
    /// Silent amphorae of `lb` and not enough spares for all of them: kept,
    /// with the reason on each; the load balancer's operating status is
    /// `status` (`DEGRADED` while others still carry it, else `ERROR`).
    Short {
        lb: String,
        amphorae: Vec<String>,
        status: OperatingStatus,
    },
}

/// The circuit breaker: whether so many carrying amphorae fell silent
/// together that the fault is more likely on the controller's side than
/// in that many amphorae. It counts those whose silence began recently:
/// longer than half the timeout (a fault silences them all within one
/// heartbeat interval, which must be under half the timeout, so when the
/// first goes stale the others are counted too), but not longer than
/// twice the timeout (an amphora dead for long is not part of a new
/// fault, and must not hold failover back for ever). `FAILOVER_STOPPED`
/// ones count while in that window, so the breaker holds for all the
/// amphorae of one fault, tick after tick.
pub fn breaker_open(s: &State, view: &View, h: &HealthPolicy) -> bool {
    let Some(limit) = h.failover_threshold else {
        return false;
    };
    let timeout = h.heartbeat_timeout;
    s.amphorae
        .values()
        .filter(|a| {
            matches!(
                a.status,
                AmphoraStatus::Allocated | AmphoraStatus::FailoverStopped
            ) && view.silent(&a.id, timeout / 2)
                && !view.silent(&a.id, timeout * 2)
        })
        .count()
        >= limit
}

/// What to do about silence, this tick.
///
/// - Silent spares go back to `BOOTING` (and are not handed out now).
/// - With the breaker open, silent carrying amphorae are held.
/// - Otherwise each load balancer with silent amphorae gets a spare for
///   each, all or none (a partial failover would leave the rest on dead
///   amphorae anyway, and spend spares another one may need whole); one
///   mid-change is left for a later tick.
pub fn watch(s: &State, view: &View, p: &Policy) -> Vec<Failover> {
    let Some(h) = &p.health else {
        return Vec::new();
    };
    let silent = |id: &str| view.silent(id, h.heartbeat_timeout);
    let mut out = Vec::new();
    let mut taken = HashSet::new();
    for a in s.amphorae.values() {
        if a.status == AmphoraStatus::Ready && silent(&a.id) {
            taken.insert(a.id.clone());
            out.push(Failover::Quiet {
                amphora: a.id.clone(),
            });
        }
    }
    let stale: Vec<&crate::model::Amphora> = s
        .amphorae
        .values()
        .filter(|a| a.status == AmphoraStatus::Allocated && silent(&a.id))
        .collect();
    if stale.is_empty() {
        return out;
    }
    if breaker_open(s, view, h) {
        out.extend(stale.iter().map(|a| Failover::Hold {
            amphora: a.id.clone(),
        }));
        return out;
    }
    // In id order, so which load balancer gets the last spares does not
    // depend on hashing.
    let mut by_lb: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for a in &stale {
        if let Some(lb) = &a.load_balancer_id {
            by_lb.entry(lb).or_default().push(a.id.clone());
        }
    }
    for (lb, ids) in by_lb {
        let Some(l) = s.load_balancers.get(lb) else {
            continue;
        };
        if l.common.provisioning_status.is_pending() {
            continue;
        }
        let pairs = spares::replacements(s, view, &ids, &taken);
        if pairs.len() < ids.len() {
            // Amphorae still heard carry it (active-active): degraded,
            // not down.
            let status = if s.amphorae_of(lb).any(|a| !ids.contains(&a.id)) {
                OperatingStatus::Degraded
            } else {
                OperatingStatus::Error
            };
            out.push(Failover::Short {
                lb: lb.to_owned(),
                amphorae: ids,
                status,
            });
            continue;
        }
        taken.extend(pairs.iter().map(|(_, spare)| spare.clone()));
        out.push(Failover::Replace {
            lb: lb.to_owned(),
            pairs,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{policy, World, SEC};
    use crate::model::ProvisioningStatus;
    use std::time::Duration;

    fn replace(lb: &str, pairs: &[(&str, &str)]) -> Failover {
        Failover::Replace {
            lb: lb.into(),
            pairs: pairs
                .iter()
                .map(|(a, b)| ((*a).into(), (*b).into()))
                .collect(),
        }
    }

    #[test]
    fn nothing_happens_while_everything_is_heard() {
        let mut w = World::new();
        w.lb("lb", 1, 2)
            .amp("a1", Some("lb"), Some(SEC))
            .amp("a2", Some("lb"), Some(2 * SEC))
            .amp("s1", None, Some(SEC));
        assert_eq!(watch(&w.state, &w.view, &policy()), []);
    }

    #[test]
    fn without_a_health_manager_nothing_is_ever_silent() {
        let mut w = World::new();
        w.lb("lb", 1, 1)
            .amp("a1", Some("lb"), None)
            .amp("s1", None, None);
        let mut p = policy();
        p.health = None;
        assert_eq!(watch(&w.state, &w.view, &p), []);
    }

    #[test]
    fn a_silent_amphora_is_replaced_by_the_freshest_spare() {
        let mut w = World::new();
        w.lb("lb", 1, 2)
            .amp("a1", Some("lb"), Some(4 * SEC))
            .amp("a2", Some("lb"), Some(SEC))
            .amp("s-old", None, Some(2 * SEC))
            .amp("s-new", None, Some(SEC));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [replace("lb", &[("a1", "s-new")])]
        );
    }

    #[test]
    fn one_never_heard_since_the_start_gets_the_timeout_from_the_start() {
        let mut w = World::new();
        w.lb("lb", 1, 1)
            .amp("a1", Some("lb"), None)
            .amp("s1", None, Some(SEC));
        // 100 s after the start: stale.
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [replace("lb", &[("a1", "s1")])]
        );
        // 2 s after the start: still in its grace.
        w.view.now = w.t0 + 2 * SEC;
        w.heard("s1", Duration::ZERO, Default::default());
        assert_eq!(watch(&w.state, &w.view, &policy()), []);
    }

    #[test]
    fn a_silent_spare_is_marked_booting_and_not_handed_out() {
        let mut w = World::new();
        w.lb("lb", 1, 1)
            .amp("a1", Some("lb"), Some(5 * SEC))
            .amp("s-quiet", None, Some(4 * SEC));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [
                Failover::Quiet {
                    amphora: "s-quiet".into()
                },
                Failover::Short {
                    lb: "lb".into(),
                    amphorae: vec!["a1".into()],
                    status: OperatingStatus::Error
                }
            ]
        );
    }

    #[test]
    fn without_enough_spares_an_active_active_one_is_degraded_not_half_moved() {
        let mut w = World::new();
        w.lb("lb", 1, 3)
            .amp("a1", Some("lb"), Some(4 * SEC))
            .amp("a2", Some("lb"), Some(4 * SEC))
            .amp("a3", Some("lb"), Some(SEC))
            .amp("s1", None, Some(SEC));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [Failover::Short {
                lb: "lb".into(),
                amphorae: vec!["a1".into(), "a2".into()],
                status: OperatingStatus::Degraded
            }]
        );
    }

    #[test]
    fn a_load_balancer_mid_change_is_failed_over_on_a_later_tick() {
        let mut w = World::new();
        w.lb("lb", 1, 1)
            .amp("a1", Some("lb"), Some(4 * SEC))
            .amp("s1", None, Some(SEC));
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingUpdate
        });
        assert_eq!(watch(&w.state, &w.view, &policy()), []);
    }

    #[test]
    fn two_load_balancers_do_not_get_the_same_spare() {
        let mut w = World::new();
        w.lb("lb-a", 1, 1)
            .lb("lb-b", 2, 1)
            .amp("a1", Some("lb-a"), Some(4 * SEC))
            .amp("b1", Some("lb-b"), Some(4 * SEC))
            .amp("s1", None, Some(SEC));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [
                replace("lb-a", &[("a1", "s1")]),
                Failover::Short {
                    lb: "lb-b".into(),
                    amphorae: vec!["b1".into()],
                    status: OperatingStatus::Error
                }
            ]
        );
    }

    #[test]
    fn the_breaker_holds_when_too_many_fall_silent_together() {
        let mut w = World::new();
        w.lb("lb-a", 1, 2).lb("lb-b", 2, 1);
        w.amp("a1", Some("lb-a"), Some(4 * SEC))
            .amp("a2", Some("lb-a"), Some(2 * SEC))
            .amp("b1", Some("lb-b"), Some(2 * SEC))
            .amp("s1", None, Some(SEC))
            .amp("s2", None, Some(SEC));
        // a1 stale; a2 and b1 silent for over half the timeout: 3 of one
        // fault, the threshold.
        let h = policy().health.unwrap();
        assert!(breaker_open(&w.state, &w.view, &h));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [Failover::Hold {
                amphora: "a1".into()
            }]
        );
        // Heard again, a2 no longer counts: the breaker closes.
        w.heard("a2", SEC / 10, Default::default());
        assert!(!breaker_open(&w.state, &w.view, &h));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [replace("lb-a", &[("a1", "s1")])]
        );
    }

    #[test]
    fn held_amphorae_keep_the_breaker_open_until_their_silence_is_old() {
        let mut w = World::new();
        w.lb("lb", 1, 3)
            .amp("a1", Some("lb"), Some(4 * SEC))
            .amp("a2", Some("lb"), Some(4 * SEC))
            .amp("a3", Some("lb"), Some(4 * SEC))
            .amp("s1", None, Some(SEC));
        for id in ["a2", "a3"] {
            w.amphora(id, |a| a.status = AmphoraStatus::FailoverStopped);
        }
        let h = policy().health.unwrap();
        assert!(breaker_open(&w.state, &w.view, &h));
        // Silent for over twice the timeout, they are not part of a new
        // fault: failover goes ahead.
        w.later(3 * SEC).heard("s1", SEC, Default::default());
        assert!(!breaker_open(&w.state, &w.view, &h));
        assert_eq!(
            watch(&w.state, &w.view, &policy()),
            [replace("lb", &[("a1", "s1")])]
        );
    }

    #[test]
    fn without_a_threshold_the_breaker_never_opens() {
        let mut w = World::new();
        w.lb("lb", 1, 3)
            .amp("a1", Some("lb"), Some(4 * SEC))
            .amp("a2", Some("lb"), Some(4 * SEC))
            .amp("a3", Some("lb"), Some(4 * SEC));
        let mut p = policy();
        if let Some(h) = &mut p.health {
            h.failover_threshold = None;
        }
        assert!(!breaker_open(&w.state, &w.view, p.health.as_ref().unwrap()));
    }

    #[test]
    fn spares_and_unassigned_amphorae_do_not_count_towards_the_breaker() {
        let mut w = World::new();
        w.amp("s1", None, Some(2 * SEC))
            .amp("s2", None, Some(2 * SEC))
            .amp("s3", None, Some(2 * SEC));
        let h = policy().health.unwrap();
        assert!(!breaker_open(&w.state, &w.view, &h));
    }
}
