//! The distributor's decisions: which amphorae each VIP goes to, and the
//! order in which the driver is told.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use crate::decide::{failover, Policy};
use crate::distributor::{IdleBound, Spread, Target};
use crate::liveness::View;
use crate::model::{AmphoraStatus, ProvisioningStatus, State};

/// What every VIP should be spread over now, given what it is spread over
/// (`applied`).
///
/// - An amphora is a target once its config and the VIP were pushed to
///   it (it holds the VIP), so a spare joins only after its push.
/// - A silent one leaves, and comes back when heard again;
/// - unless the failover circuit breaker is open: then the silent ones
///   that were targets stay (the fault is likely on the controller's
///   side), as `FAILOVER_STOPPED` ones do.
/// - When no amphora qualifies (all silent, or all being replaced at
///   once) the last set stays: replacements are added before the old
///   ones leave, and a VIP is withdrawn only when its load balancer is
///   deleted.
pub fn desired(
    s: &State,
    view: &View,
    p: &Policy,
    applied: &HashMap<String, Spread>,
) -> BTreeMap<String, Spread> {
    let silent = |id: &str| p.silent(view, id);
    let hold = p
        .health
        .as_ref()
        .is_some_and(|h| failover::breaker_open(s, view, h));
    let mut out = BTreeMap::new();
    for lb in s.load_balancers.values() {
        if lb.common.provisioning_status == ProvisioningStatus::PendingDelete {
            continue;
        }
        let (Some(group), Ok(vip)) = (lb.distributor_id, lb.vip_address.parse::<IpAddr>()) else {
            continue;
        };
        let before = applied.get(&lb.common.id);
        let was_in = |id: &str| before.is_some_and(|b| b.targets.iter().any(|t| t.amphora == id));
        let mut targets: Vec<Target> = s
            .amphorae_of(&lb.common.id)
            .filter(|a| a.vips.iter().any(|v| v == &lb.vip_address))
            .filter(|a| match a.status {
                AmphoraStatus::Allocated => !silent(&a.id) || (hold && was_in(&a.id)),
                AmphoraStatus::FailoverStopped => !silent(&a.id) || was_in(&a.id),
                _ => false,
            })
            .filter_map(|a| {
                Some(Target {
                    id: a.distributor_id?,
                    address: a.data_address()?,
                    amphora: a.id.clone(),
                })
            })
            .collect();
        targets.sort();
        if targets.is_empty() {
            if let Some(b) = before {
                out.insert(lb.common.id.clone(), b.clone());
            }
            continue;
        }
        out.insert(
            lb.common.id.clone(),
            Spread {
                group,
                vip,
                targets,
                idle: idle_bound(s, &lb.common.id),
            },
        );
    }
    out
}

/// How long a connection to load balancer `lb`'s VIP can stay idle: the
/// longest of its listeners' bounds.
pub fn idle_bound(s: &State, lb: &str) -> IdleBound {
    s.listeners_of(lb)
        .try_fold(0, |longest, l| Some(longest.max(l.idle_bound_ms()?)))
        .map_or(IdleBound::Unbounded, IdleBound::Within)
}

/// One call to the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// Send the VIP of load balancer `lb` to exactly these targets.
    Apply { lb: String, spread: Spread },
    /// Send `vip` nowhere: its load balancer is gone.
    Withdraw { lb: String, group: u32, vip: IpAddr },
}

/// The calls that bring the driver from `applied` to `desired`: first
/// every changed (or, on a `full` pass, every) spread, so a VIP moves to
/// its new targets in one replace and never has none; then the VIPs no
/// longer wanted are withdrawn. Targets that left every group are
/// forgotten after these went through ([`unused`]).
pub fn plan(
    desired: &BTreeMap<String, Spread>,
    applied: &HashMap<String, Spread>,
    full: bool,
) -> Vec<Call> {
    let applies = desired
        .iter()
        .filter(|(lb, spread)| full || applied.get(*lb) != Some(*spread))
        .map(|(lb, spread)| Call::Apply {
            lb: lb.clone(),
            spread: spread.clone(),
        });
    let mut gone: Vec<(&String, &Spread)> = applied
        .iter()
        .filter(|(lb, _)| !desired.contains_key(*lb))
        .collect();
    gone.sort_by_key(|(lb, _)| *lb);
    let withdraws = gone.into_iter().map(|(lb, was)| Call::Withdraw {
        lb: lb.clone(),
        group: was.group,
        vip: was.vip,
    });
    applies.chain(withdraws).collect()
}

/// Targets the driver knows (`known`) that no applied spread uses any
/// more: to forget, once the applies and withdrawals went through.
pub fn unused(applied: &HashMap<String, Spread>, known: &HashMap<u32, Target>) -> Vec<Target> {
    let in_use: HashSet<u32> = applied
        .values()
        .flat_map(|s| s.targets.iter().map(|t| t.id))
        .collect();
    let mut out: Vec<Target> = known
        .values()
        .filter(|t| !in_use.contains(&t.id))
        .cloned()
        .collect();
    out.sort();
    out
}

/// At start, the VIPs of load balancers a previous run was deleting: the
/// kernel may still route them.
pub fn leftovers(s: &State) -> Vec<(String, u32, IpAddr)> {
    s.load_balancers
        .values()
        .filter(|lb| lb.common.provisioning_status == ProvisioningStatus::PendingDelete)
        .filter_map(|lb| {
            Some((
                lb.common.id.clone(),
                lb.distributor_id?,
                lb.vip_address.parse().ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{policy, World, SEC};

    fn world() -> World {
        let mut w = World::new();
        w.lb("lb", 1, 3)
            .amp("a1", Some("lb"), Some(SEC))
            .amp("a2", Some("lb"), Some(SEC))
            .amp("a3", Some("lb"), Some(SEC));
        w
    }

    fn targets(d: &BTreeMap<String, Spread>, lb: &str) -> Vec<String> {
        d.get(lb)
            .map(|s| s.targets.iter().map(|t| t.amphora.clone()).collect())
            .unwrap_or_default()
    }

    fn want(w: &World, applied: &HashMap<String, Spread>) -> BTreeMap<String, Spread> {
        desired(&w.state, &w.view, &policy(), applied)
    }

    #[test]
    fn a_vip_goes_to_every_heard_amphora_holding_it() {
        let w = world();
        let d = want(&w, &HashMap::new());
        assert_eq!(targets(&d, "lb"), ["a1", "a2", "a3"]);
        let s = &d["lb"];
        assert_eq!((s.group, s.vip), (1, "198.18.0.1".parse().unwrap()));
        assert_eq!(
            s.targets[0].address,
            "198.19.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_vips_idle_bound_is_its_slowest_listeners_unless_one_never_times_out() {
        let mut w = world();
        assert_eq!(want(&w, &HashMap::new())["lb"].idle, IdleBound::Within(0));
        w.listener("l1", "lb", ProvisioningStatus::Active).listener(
            "l2",
            "lb",
            ProvisioningStatus::Active,
        );
        let set = |w: &mut World, id: &str, client: i64, member: i64| {
            let mut l = w.state.listeners.get(id).cloned().unwrap();
            (l.timeout_client_data, l.timeout_member_data) = (client, member);
            w.state.listeners.insert(l);
        };
        set(&mut w, "l1", 1_000, 90_000);
        assert_eq!(
            want(&w, &HashMap::new())["lb"].idle,
            IdleBound::Within(90_000)
        );
        set(&mut w, "l2", 0, 1_000);
        assert_eq!(want(&w, &HashMap::new())["lb"].idle, IdleBound::Unbounded);
    }

    #[test]
    fn a_spare_joins_only_once_its_vip_was_pushed() {
        let mut w = world();
        w.amp("s1", None, Some(SEC));
        w.amphora("s1", |a| {
            a.load_balancer_id = Some("lb".into());
            a.status = AmphoraStatus::Allocated;
        });
        assert_eq!(
            targets(&want(&w, &HashMap::new()), "lb"),
            ["a1", "a2", "a3"]
        );
        w.amphora("s1", |a| a.vips = vec!["198.18.0.1".into()]);
        assert_eq!(
            targets(&want(&w, &HashMap::new()), "lb"),
            ["a1", "a2", "a3", "s1"]
        );
    }

    #[test]
    fn a_silent_amphora_leaves_and_comes_back_when_heard() {
        let mut w = world();
        w.heard("a2", 4 * SEC, Default::default());
        let d = want(&w, &HashMap::new());
        assert_eq!(targets(&d, "lb"), ["a1", "a3"]);
        w.heard("a2", SEC, Default::default());
        assert_eq!(
            targets(&want(&w, &d.into_iter().collect()), "lb"),
            ["a1", "a2", "a3"]
        );
    }

    #[test]
    fn with_the_breaker_open_silent_targets_keep_their_place_but_none_joins() {
        let mut w = world();
        let before: HashMap<String, Spread> = want(&w, &HashMap::new()).into_iter().collect();
        w.amp("late", Some("lb"), Some(SEC));
        for id in ["a1", "a2", "a3", "late"] {
            w.heard(id, 4 * SEC, Default::default());
        }
        // Three silent together: the breaker holds; "late" was never a
        // target, so it does not become one while silent.
        assert_eq!(targets(&want(&w, &before), "lb"), ["a1", "a2", "a3"]);
    }

    #[test]
    fn failover_stopped_amphorae_stay_targets_until_heard_or_replaced() {
        let mut w = world();
        let before: HashMap<String, Spread> = want(&w, &HashMap::new()).into_iter().collect();
        w.heard("a1", 4 * SEC, Default::default());
        w.amphora("a1", |a| a.status = AmphoraStatus::FailoverStopped);
        assert_eq!(targets(&want(&w, &before), "lb"), ["a1", "a2", "a3"]);
        // Not a target before: not made one while silent.
        assert_eq!(targets(&want(&w, &HashMap::new()), "lb"), ["a2", "a3"]);
    }

    #[test]
    fn with_no_amphora_left_the_last_set_stays_rather_than_unrouting_the_vip() {
        let mut w = world();
        let before: HashMap<String, Spread> = want(&w, &HashMap::new()).into_iter().collect();
        let mut p = policy();
        if let Some(h) = &mut p.health {
            h.failover_threshold = None;
        }
        for id in ["a1", "a2", "a3"] {
            w.heard(id, 10 * SEC, Default::default());
        }
        let d = desired(&w.state, &w.view, &p, &before);
        assert_eq!(d.get("lb"), before.get("lb"));
        // Never applied: nothing to keep, nothing to route.
        assert!(desired(&w.state, &w.view, &p, &HashMap::new()).is_empty());
    }

    #[test]
    fn being_deleted_or_unaddressable_load_balancers_get_no_spread() {
        let mut w = world();
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingDelete
        });
        assert!(want(&w, &HashMap::new()).is_empty());
        assert_eq!(
            leftovers(&w.state),
            [("lb".into(), 1, "198.18.0.1".parse().unwrap())]
        );
        let mut w = world();
        w.load_balancer("lb", |l| l.distributor_id = None);
        assert!(want(&w, &HashMap::new()).is_empty());
    }

    #[test]
    fn only_changes_are_applied_except_on_a_full_pass() {
        let w = world();
        let d = want(&w, &HashMap::new());
        let applied: HashMap<String, Spread> = d.clone().into_iter().collect();
        assert_eq!(plan(&d, &applied, false), []);
        assert_eq!(
            plan(&d, &applied, true),
            [Call::Apply {
                lb: "lb".into(),
                spread: d["lb"].clone()
            }]
        );
    }

    #[test]
    fn new_targets_are_applied_before_deleted_vips_are_withdrawn_and_targets_forgotten() {
        let mut w = world();
        w.lb("old", 2, 1).amp("o1", Some("old"), Some(SEC));
        let before: HashMap<String, Spread> = want(&w, &HashMap::new()).into_iter().collect();
        // "old" deleted; a3 replaced by s1 in "lb".
        w.load_balancer("old", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingDelete
        });
        w.amp("s1", None, Some(SEC));
        w.amphora("s1", |a| {
            a.load_balancer_id = Some("lb".into());
            a.status = AmphoraStatus::Allocated;
            a.vips = vec!["198.18.0.1".into()];
        });
        w.amphora("a3", |a| {
            a.load_balancer_id = None;
            a.status = AmphoraStatus::Error;
        });
        let d = want(&w, &before);
        let calls = plan(&d, &before, false);
        assert_eq!(
            calls,
            [
                Call::Apply {
                    lb: "lb".into(),
                    spread: d["lb"].clone()
                },
                Call::Withdraw {
                    lb: "old".into(),
                    group: 2,
                    vip: "198.18.0.2".parse().unwrap()
                }
            ]
        );
        assert_eq!(targets(&d, "lb"), ["a1", "a2", "s1"]);
        // Once applied, a3 and o1 are in no group: forgotten.
        let known: HashMap<u32, Target> = before
            .values()
            .flat_map(|s| s.targets.iter().map(|t| (t.id, t.clone())))
            .collect();
        let now: HashMap<String, Spread> = d.into_iter().collect();
        let gone: Vec<String> = unused(&now, &known)
            .into_iter()
            .map(|t| t.amphora)
            .collect();
        assert_eq!(gone, ["a3", "o1"]);
        // While an apply has not gone through, its old targets stay.
        assert_eq!(unused(&before, &known), []);
    }
}
