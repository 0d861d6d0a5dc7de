//! The repairer's decision: amphorae heard but out of step.
//!
//! For every carrying amphora the controller knows what it wants there
//! (the generation last pushed, its load balancer's VIP) and compares it
//! with what the amphora last reported. A difference is re-pushed, with
//! doubling back-off; an amphora still out of step after
//! `repair_timeout` is failed over. Silent amphorae are the health
//! manager's ([`super::failover`]).

use std::collections::HashMap;

use crate::decide::{spares, Policy};
use crate::liveness::{Live, Report, Verdict, View};
use crate::model::{AmphoraStatus, LoadBalancer, OperatingStatus, ProvisioningStatus, State};
use crate::store::Tx;

/// What `a` lacks of what it should run, or `None` when it is in step.
/// `want_generation`: the generation last pushed to it; `vip`: the VIP it
/// must hold.
pub fn drift(want_generation: u64, vips: &[String], r: &Report) -> Option<String> {
    match r.generation {
        None => return Some("its dataplane does not answer its agent".into()),
        Some(g) if g < want_generation => {
            return Some(format!(
                "its dataplane runs generation {g}, generation {want_generation} was pushed"
            ))
        }
        Some(_) => {}
    }
    if let Some(persisted) = r.persisted_generation {
        match persisted {
            Some(g) if g >= want_generation => {}
            Some(g) => {
                return Some(format!(
                    "its agent keeps generation {g}, generation {want_generation} was pushed"
                ))
            }
            None => return Some("its agent keeps no config".into()),
        }
    }
    if let Some(held) = &r.vips {
        if let Some(vip) = vips.iter().find(|v| !holds(held, v)) {
            return Some(format!(
                "its agent does not hold the VIP {vip} (missing from its interface)"
            ));
        }
    }
    None
}

/// Whether `held` (addresses, with or without a prefix) has `vip`: the
/// same text, or the same address however it is written.
fn holds(held: &[String], vip: &str) -> bool {
    let want = vip.parse::<std::net::IpAddr>().ok();
    held.iter().any(|v| {
        let addr = v.split('/').next().unwrap_or(v);
        v == vip
            || addr == vip
            || want.is_some_and(|w| addr.parse::<std::net::IpAddr>().ok() == Some(w))
    })
}

/// A load balancer's operating status from how many of its `amphorae`
/// serve its config: none → `ERROR` (its VIP is not served), some →
/// `DEGRADED`, all → what heartbeats say (`None`: leave it).
pub fn lb_operating(lb: &LoadBalancer, amphorae: usize, in_step: usize) -> Option<OperatingStatus> {
    if !lb.common.admin_state_up || amphorae == 0 {
        return None;
    }
    if in_step == 0 {
        Some(OperatingStatus::Error)
    } else if in_step < amphorae {
        Some(OperatingStatus::Degraded)
    } else {
        None
    }
}

/// What to do for one out-of-step amphora.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Push its config (a new generation) and VIP again.
    Repush {
        amphora: String,
        lb: String,
        reason: String,
    },
    /// Replace it with a spare: no repair brought it in step in time.
    FailOver {
        amphora: String,
        lb: String,
        reason: String,
    },
}

/// One pass of the repairer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// To record in [`crate::liveness::Liveness::judged`].
    pub verdicts: Vec<(String, Verdict)>,
    pub steps: Vec<Step>,
    /// Amphorae out of step (a gauge).
    pub out_of_step: u64,
}

/// Judges every carrying amphora of a settled load balancer against its
/// last report. Records in `tx` what the store shows of it: each
/// amphora's `error` (what it lacks; cleared once in step) and each load
/// balancer's operating status from how many of its amphorae are in step.
pub fn judge(s: &State, view: &View, p: &Policy, tx: &mut Tx) -> Judgement {
    let Some(h) = &p.health else {
        return Judgement::default();
    };
    let mut j = Judgement::default();
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for a in s.amphorae.values() {
        let Some(lb_id) = a.load_balancer_id.as_deref() else {
            continue;
        };
        let Some(lb) = s.load_balancers.get(lb_id) else {
            continue;
        };
        // Mid-change: the provisioner is at it.
        if lb.common.provisioning_status.is_pending() || a.status != AmphoraStatus::Allocated {
            continue;
        }
        let none = Live::default();
        let l = view.get(&a.id).unwrap_or(&none);
        let c = counts.entry(lb_id).or_default();
        c.0 += 1;
        if !l.judgeable() || view.silent_here(&a.id, h.heartbeat_timeout) {
            // Silent ones are the health manager's; unjudged ones count
            // as in step until a report says otherwise. Silent here is
            // enough: this controller's reports of it are old (another
            // that hears it judges it).
            if l.drift.is_none() {
                c.1 += 1;
            }
            continue;
        }
        let unsaid = Report::default();
        let report = l.report.as_ref().unwrap_or(&unsaid);
        // A load balancer whose creation failed never had its VIP placed.
        let vips =
            if lb.common.provisioning_status != ProvisioningStatus::Error || lb.common.deployed {
                lb.vips()
            } else {
                Vec::new()
            };
        match drift(a.generation, &vips, report) {
            None => {
                c.1 += 1;
                j.verdicts.push((a.id.clone(), Verdict::InStep));
                if a.error.is_some() || a.next_attempt_at.is_some() {
                    let mut a = a.clone();
                    a.error = None;
                    a.next_attempt_at = None;
                    tx.put(a);
                }
            }
            Some(reason) => {
                j.out_of_step += 1;
                let since = l.drift_since.unwrap_or(view.now);
                // Its `error` says what is wrong (a failed repair adds
                // why it failed).
                if !a
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with(reason.as_str()))
                {
                    let mut a = a.clone();
                    a.error = Some(reason.clone());
                    tx.put(a);
                }
                if view.now.saturating_duration_since(since) > h.repair_timeout {
                    j.steps.push(Step::FailOver {
                        amphora: a.id.clone(),
                        lb: lb_id.to_owned(),
                        reason: format!(
                            "{reason}, and no repair brought it in step within {} ms",
                            h.repair_timeout.as_millis()
                        ),
                    });
                } else if l.next_try.is_none_or(|t| view.now >= t) {
                    j.steps.push(Step::Repush {
                        amphora: a.id.clone(),
                        lb: lb_id.to_owned(),
                        reason: reason.clone(),
                    });
                }
                j.verdicts
                    .push((a.id.clone(), Verdict::Drift { reason, since }));
            }
        }
    }
    for (lb_id, (n, in_step)) in counts {
        let Some(lb) = s.load_balancers.get(lb_id) else {
            continue;
        };
        if let Some(st) = lb_operating(lb, n, in_step) {
            if lb.common.operating_status != st {
                let mut lb = lb.clone();
                lb.common.operating_status = st;
                tx.put(lb);
            }
        }
    }
    j
}

/// What a repair's failover of `amphora` (of `lb`) comes to, decided
/// against the state when it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relief {
    /// It moved, or its load balancer is gone or mid-change: nothing.
    Moot,
    /// No spare: it stays, with the reason.
    NoSpare,
    /// This spare takes its place.
    Spare(String),
}

pub fn relief(s: &State, view: &View, amphora: &str, lb: &str) -> Relief {
    let (Some(a), Some(l)) = (s.amphorae.get(amphora), s.load_balancers.get(lb)) else {
        return Relief::Moot;
    };
    if a.load_balancer_id.as_deref() != Some(lb) || l.common.provisioning_status.is_pending() {
        return Relief::Moot;
    }
    let failed = [amphora.to_owned()];
    match spares::replacements(s, view, &failed, &Default::default()).pop() {
        Some((_, spare)) => Relief::Spare(spare),
        None => Relief::NoSpare,
    }
}

/// Load balancers whose own change failed and whose back-off has passed
/// at `now` (Octavia's timestamp format): they go back to pending, so the
/// provisioner tries again.
pub fn due_retries<'a>(s: &'a State, now: &str) -> Vec<&'a LoadBalancer> {
    s.load_balancers
        .values()
        .filter(|lb| lb.retry.is_some())
        .filter(|lb| lb.common.provisioning_status == ProvisioningStatus::Error)
        .filter(|lb| {
            lb.common
                .next_attempt_at
                .as_deref()
                .is_none_or(|t| t <= now)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{pair, policy, World, SEC};
    use crate::model::Retry;

    fn report(g: Option<u64>) -> Report {
        Report {
            generation: g,
            ..Report::default()
        }
    }

    /// What the amphora runs when in step with the fixture's defaults.
    fn in_step() -> Report {
        Report {
            generation: Some(1),
            persisted_generation: Some(Some(1)),
            vips: Some(vec!["198.18.0.1/32".into()]),
            bgp: None,
        }
    }

    fn lost_vip() -> Report {
        Report {
            vips: Some(vec![]),
            ..in_step()
        }
    }

    /// [`pair`], both amphorae reporting they are in step.
    fn world() -> World {
        let mut w = pair();
        w.heard("a1", SEC, in_step()).heard("a2", SEC, in_step());
        w
    }

    fn judge_in(w: &mut World) -> Judgement {
        w.write(|s, v, tx| judge(s, v, &policy(), tx))
    }

    fn lb_status(w: &World) -> OperatingStatus {
        w.state.load_balancers["lb"].common.operating_status
    }

    #[test]
    fn drift_names_what_is_missing() {
        assert_eq!(drift(5, &[], &report(Some(5))), None);
        assert_eq!(drift(5, &[], &report(Some(6))), None);
        assert!(drift(5, &[], &report(Some(0)))
            .unwrap()
            .contains("runs generation 0"));
        assert!(drift(5, &[], &report(None))
            .unwrap()
            .contains("does not answer"));
        let lost = Report {
            generation: Some(5),
            persisted_generation: Some(None),
            vips: None,
            bgp: None,
        };
        assert!(drift(5, &[], &lost).unwrap().contains("keeps no config"));
        let old = Report {
            generation: Some(5),
            persisted_generation: Some(Some(4)),
            vips: None,
            bgp: None,
        };
        assert!(drift(5, &[], &old).unwrap().contains("keeps generation 4"));
        let no_vip = Report {
            generation: Some(5),
            persisted_generation: Some(Some(5)),
            vips: Some(vec!["198.18.0.9".into()]),
            bgp: None,
        };
        assert!(drift(5, &["198.18.0.7".into()], &no_vip)
            .unwrap()
            .contains("VIP 198.18.0.7"));
        assert_eq!(drift(5, &["198.18.0.9".into()], &no_vip), None);
        // As agents list them: with a prefix, IPv6 however written.
        let listed = Report {
            vips: Some(vec!["198.18.0.9/32".into(), "2001:db8::9/128".into()]),
            ..no_vip.clone()
        };
        assert_eq!(drift(5, &["198.18.0.9".into()], &listed), None);
        assert_eq!(drift(5, &["2001:db8::9".into()], &listed), None);
        assert_eq!(drift(5, &["2001:DB8:0::9".into()], &listed), None);
        assert!(drift(5, &["198.18.0.90".into()], &listed).is_some());
        // Dual stack: both held, or the missing one named.
        let both = ["198.18.0.9".into(), "2001:db8::9".into()];
        assert_eq!(drift(5, &both, &listed), None);
        assert!(drift(5, &both, &no_vip)
            .unwrap()
            .contains("VIP 2001:db8::9"));
        // None listed: missing; not said: not judged.
        let none = Report {
            vips: Some(vec![]),
            ..no_vip.clone()
        };
        assert!(drift(5, &["198.18.0.9".into()], &none)
            .unwrap()
            .contains("missing"));
        let unsaid = Report {
            vips: None,
            ..no_vip
        };
        assert_eq!(drift(5, &["198.18.0.9".into()], &unsaid), None);
    }

    #[test]
    fn amphorae_in_step_clear_their_error_and_need_nothing() {
        let mut w = world();
        w.amphora("a1", |a| {
            a.error = Some("old trouble".into());
            a.next_attempt_at = Some("2026-12-01T00:00:09".into());
        });
        let j = judge_in(&mut w);
        assert_eq!(j.steps, []);
        assert_eq!(j.out_of_step, 0);
        assert_eq!(
            j.verdicts,
            [
                ("a1".into(), Verdict::InStep),
                ("a2".into(), Verdict::InStep)
            ]
        );
        let a1 = &w.state.amphorae["a1"];
        assert_eq!(
            (a1.error.as_deref(), a1.next_attempt_at.as_deref()),
            (None, None)
        );
        assert_eq!(lb_status(&w), OperatingStatus::Online);
    }

    #[test]
    fn an_amphora_that_lost_its_vip_is_repushed_and_the_lb_degraded() {
        let mut w = world();
        w.heard("a1", SEC, lost_vip());
        let j = judge_in(&mut w);
        let reason = "its agent does not hold the VIP 198.18.0.1 (missing from its interface)";
        assert_eq!(
            j.steps,
            [Step::Repush {
                amphora: "a1".into(),
                lb: "lb".into(),
                reason: reason.into()
            }]
        );
        assert_eq!(
            j.verdicts[0],
            (
                "a1".into(),
                Verdict::Drift {
                    reason: reason.into(),
                    since: w.view.now
                }
            )
        );
        assert_eq!(j.out_of_step, 1);
        assert_eq!(w.state.amphorae["a1"].error.as_deref(), Some(reason));
        assert_eq!(lb_status(&w), OperatingStatus::Degraded);
    }

    #[test]
    fn every_amphora_out_of_step_makes_the_lb_error() {
        let mut w = world();
        w.heard("a1", SEC, report(None))
            .heard("a2", SEC, lost_vip());
        let j = judge_in(&mut w);
        assert_eq!(j.steps.len(), 2);
        assert_eq!(lb_status(&w), OperatingStatus::Error);
    }

    #[test]
    fn a_failed_repair_waits_for_its_back_off() {
        let mut w = world();
        let now = w.view.now;
        w.heard("a1", SEC, lost_vip()).live("a1", |l| {
            l.drift = Some("x".into());
            l.drift_since = Some(now - 5 * SEC);
            l.failures = 2;
            l.next_try = Some(now + SEC);
        });
        w.amphora("a1", |a| {
            a.error = Some(
                "its agent does not hold the VIP 198.18.0.1 (missing from its interface); repair failed: refused".into(),
            )
        });
        let j = judge_in(&mut w);
        assert_eq!(j.steps, []);
        // The drift keeps its start, and the error its added cause.
        assert!(
            matches!(&j.verdicts[0].1, Verdict::Drift { since, .. } if *since == now - 5 * SEC)
        );
        assert!(w.state.amphorae["a1"]
            .error
            .as_deref()
            .is_some_and(|e| e.ends_with("repair failed: refused")));
        w.later(SEC);
        let j = judge_in(&mut w);
        assert!(matches!(&j.steps[..], [Step::Repush { amphora, .. }] if amphora == "a1"));
    }

    #[test]
    fn out_of_step_past_the_repair_timeout_is_failed_over() {
        let mut w = world();
        let now = w.view.now;
        w.heard("a1", SEC, report(Some(0))).live("a1", |l| {
            l.drift_since = Some(now - 31 * SEC);
            l.next_try = Some(now + 10 * SEC);
        });
        let j = judge_in(&mut w);
        match &j.steps[..] {
            [Step::FailOver {
                amphora, reason, ..
            }] => {
                assert_eq!(amphora, "a1");
                assert!(
                    reason.ends_with("no repair brought it in step within 30000 ms"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_report_from_before_the_last_push_is_not_judged() {
        let mut w = world();
        let now = w.view.now;
        w.heard("a1", SEC, report(Some(0)))
            .live("a1", |l| l.pushed = Some(now - SEC - SEC / 2));
        let j = judge_in(&mut w);
        assert_eq!(j.steps, []);
        assert_eq!(j.verdicts, [("a2".into(), Verdict::InStep)]);
        // Unjudged, it counts as in step.
        assert_eq!(lb_status(&w), OperatingStatus::Online);
    }

    #[test]
    fn silent_amphorae_are_left_to_the_health_manager() {
        let mut w = world();
        w.heard("a1", 5 * SEC, report(Some(0)));
        let j = judge_in(&mut w);
        assert_eq!(j.steps, []);
        assert_eq!(j.verdicts, [("a2".into(), Verdict::InStep)]);
        // Judged out of step before it went silent: it still counts so.
        w.live("a1", |l| l.drift = Some("lost".into()));
        judge_in(&mut w);
        assert_eq!(lb_status(&w), OperatingStatus::Degraded);
    }

    #[test]
    fn load_balancers_mid_change_and_amphorae_not_allocated_are_skipped() {
        let mut w = world();
        w.heard("a1", SEC, report(None))
            .heard("a2", SEC, report(None));
        w.amphora("a2", |a| a.status = AmphoraStatus::FailoverStopped);
        let j = judge_in(&mut w);
        assert_eq!(j.verdicts.len(), 1, "a2 is not judged");
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingUpdate
        });
        assert_eq!(judge_in(&mut w), Judgement::default());
    }

    #[test]
    fn a_load_balancer_whose_creation_failed_is_not_asked_for_its_vip() {
        let mut w = world();
        w.heard("a1", SEC, lost_vip()).heard("a2", SEC, lost_vip());
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::Error;
            l.common.deployed = false;
        });
        assert_eq!(judge_in(&mut w).steps, []);
        // Once deployed, a later failed change does not excuse the VIP.
        w.load_balancer("lb", |l| l.common.deployed = true);
        assert_eq!(judge_in(&mut w).steps.len(), 2);
    }

    #[test]
    fn without_a_health_manager_nothing_is_judged() {
        let mut w = world();
        w.heard("a1", SEC, report(None));
        let mut p = policy();
        p.health = None;
        assert_eq!(
            w.write(|s, v, tx| judge(s, v, &p, tx)),
            Judgement::default()
        );
    }

    #[test]
    fn lb_operating_counts_amphorae_in_step() {
        let mut w = world();
        let lb = w.state.load_balancers["lb"].clone();
        assert_eq!(lb_operating(&lb, 2, 2), None);
        assert_eq!(lb_operating(&lb, 2, 1), Some(OperatingStatus::Degraded));
        assert_eq!(lb_operating(&lb, 2, 0), Some(OperatingStatus::Error));
        assert_eq!(lb_operating(&lb, 0, 0), None);
        w.load_balancer("lb", |l| l.common.admin_state_up = false);
        let down = w.state.load_balancers["lb"].clone();
        assert_eq!(
            lb_operating(&down, 2, 0),
            None,
            "an operator's OFFLINE stands"
        );
    }

    #[test]
    fn a_repair_failover_takes_a_spare_unless_moot() {
        let mut w = world();
        assert_eq!(
            relief(&w.state, &w.view, "a1", "lb"),
            Relief::Spare("s1".into())
        );
        assert_eq!(relief(&w.state, &w.view, "a1", "other"), Relief::Moot);
        assert_eq!(relief(&w.state, &w.view, "gone", "lb"), Relief::Moot);
        w.amphora("s1", |a| a.status = AmphoraStatus::Booting);
        assert_eq!(relief(&w.state, &w.view, "a1", "lb"), Relief::NoSpare);
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingUpdate
        });
        assert_eq!(relief(&w.state, &w.view, "a1", "lb"), Relief::Moot);
    }

    #[test]
    fn failed_changes_are_retried_once_their_back_off_passed() {
        let mut w = world();
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::Error;
            l.retry = Some(Retry {
                status: ProvisioningStatus::PendingUpdate,
                failures: 2,
            });
            l.common.next_attempt_at = Some("2026-12-01T10:00:05".into());
        });
        let due = |w: &World, now| {
            due_retries(&w.state, now)
                .iter()
                .map(|l| l.common.id.clone())
                .collect::<Vec<_>>()
        };
        assert!(due(&w, "2026-12-01T10:00:04").is_empty());
        assert_eq!(due(&w, "2026-12-01T10:00:05"), ["lb"]);
        // An ERROR without a retry (a child's failure) is not retried.
        w.load_balancer("lb", |l| l.retry = None);
        assert!(due(&w, "2026-12-01T10:00:05").is_empty());
    }
}
