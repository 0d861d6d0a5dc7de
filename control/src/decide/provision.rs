//! The provisioner's decisions: what to work on, what a failover changes
//! in the store, and the statuses a push leaves behind.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::decide::Policy;
use crate::liveness::{Routed, View};
use crate::model::{
    AmphoraStatus, By, Common, LoadBalancer, OperatingStatus, ProvisioningStatus, Retry, State,
};
use crate::store::{Kind, Tx};
use crate::Job;

/// How long a wiped-but-unreachable amphora waits before the next try
/// when no heartbeat can say it is back.
pub const WIPE_RETRY: Duration = Duration::from_secs(5);

/// Whether anything of `lb` waits for a push.
pub fn needs_push(s: &State, lb: &LoadBalancer) -> bool {
    lb.common.provisioning_status.is_pending() || children_pending(s, &lb.common.id)
}

/// Whether a listener, pool, member or monitor of `lb` waits for a push.
pub fn children_pending(s: &State, lb: &str) -> bool {
    s.listeners_of(lb)
        .any(|l| l.common.provisioning_status.is_pending())
        || s.pools_of(lb)
            .any(|p| p.common.provisioning_status.is_pending())
        || s.members
            .with(By::LoadBalancer, lb)
            .any(|m| m.common.provisioning_status.is_pending())
        || s.health_monitors
            .with(By::LoadBalancer, lb)
            .any(|h| h.common.provisioning_status.is_pending())
}

/// What the provisioner starts now: every load balancer with something
/// pending, and every amphora taken out of service (`ERROR`, carrying
/// nothing) that no VIP traffic reaches any more and that is worth a try:
/// never tried, heard since the last try, or (with no heartbeats to tell)
/// [`WIPE_RETRY`] after it. `tried`: when each wipe was last started.
pub fn jobs(
    s: &State,
    view: &View,
    p: &Policy,
    routed: &Routed,
    tried: &HashMap<String, Instant>,
) -> Vec<Job> {
    let lbs = s
        .load_balancers
        .values()
        .filter(|lb| needs_push(s, lb))
        .map(|lb| Job::LoadBalancer(lb.common.id.clone()));
    let wipes = s
        .amphorae
        .values()
        .filter(|a| a.status == AmphoraStatus::Error && a.load_balancer_id.is_none())
        .filter(|a| routed.unreached(&a.id))
        .filter(|a| match (tried.get(&a.id), view.last_heard(&a.id)) {
            (None, _) => true,
            (Some(t), Some(h)) if h > *t => true,
            (Some(t), _) => {
                p.health.is_none() && view.now.saturating_duration_since(*t) >= WIPE_RETRY
            }
        })
        .map(|a| Job::Wipe(a.id.clone()));
    lbs.chain(wipes).collect()
}

/// Records a failover in `tx`: each (failed, spare) pair swaps places,
/// the failed one `ERROR` with `reason` (wiped and a spare again once it
/// answers), and the load balancer goes `PENDING_UPDATE` so its config
/// and VIP are pushed to whichever amphorae carry it now. Returns how many
/// were replaced.
pub fn replace(
    s: &State,
    tx: &mut Tx,
    lb: &str,
    pairs: &[(String, String)],
    reason: &str,
    stamp: &str,
) -> usize {
    let Some(l) = s.load_balancers.get(lb) else {
        return 0;
    };
    let mut replaced = 0;
    for (old, spare) in pairs {
        let (Some(old), Some(spare)) = (s.amphorae.get(old), s.amphorae.get(spare)) else {
            continue;
        };
        let mut old = old.clone();
        old.load_balancer_id = None;
        old.status = AmphoraStatus::Error;
        old.error = Some(reason.to_owned());
        old.updated_at = Some(stamp.to_owned());
        let mut spare = spare.clone();
        spare.load_balancer_id = Some(lb.to_owned());
        spare.status = AmphoraStatus::Allocated;
        spare.updated_at = Some(stamp.to_owned());
        tx.put(old);
        tx.put(spare);
        replaced += 1;
    }
    let mut l = l.clone();
    l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
    l.common.provisioning_error = None;
    l.common.updated_at = Some(stamp.to_owned());
    tx.put(l);
    replaced
}

/// How a push left a load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// It is gone (deleted meanwhile): nothing to settle.
    Gone,
    /// Its delete went through: removed, its amphorae spares again (or,
    /// those that did not take the empty config, `ERROR` until wiped).
    Deleted,
    /// Everything pending is `ACTIVE`.
    Active,
    /// A change of its children failed: they are `ERROR`, it stays.
    ChildrenFailed,
    /// Its own change failed: `ERROR`, tried again after `retry_in`.
    Retry { retry_in: Duration },
}

/// Settles everything under `lb_id` after a push: `outcome` is the push's
/// (`Err`: why it failed), `failed` the amphorae that did not take it.
/// As in Octavia, a failed child change leaves the child `ERROR` and the
/// load balancer `ACTIVE`; a failed change of the load balancer itself
/// leaves it `ERROR`, and is retried after a back-off. Without a health
/// manager, operating statuses follow the admin state (no heartbeat will
/// say). `wall`: the time now, for the stored timestamps.
pub fn settle(
    s: &State,
    tx: &mut Tx,
    lb_id: &str,
    outcome: Result<(), &str>,
    failed: &[String],
    p: &Policy,
    wall: SystemTime,
) -> Settled {
    let Some(lb) = s.load_balancers.get(lb_id) else {
        return Settled::Gone;
    };
    let no_health = p.health.is_none();
    let ok = outcome.is_ok();
    let reason = outcome.err().map(str::to_owned);
    let settle = |c: &mut Common, ok: bool| -> bool {
        if !c.provisioning_status.is_pending() {
            return false;
        }
        if ok {
            c.provisioning_status = ProvisioningStatus::Active;
            c.provisioning_error = None;
            c.deployed = true;
            if no_health {
                c.operating_status = if c.admin_state_up {
                    OperatingStatus::Online
                } else {
                    OperatingStatus::Offline
                };
            }
        } else {
            c.provisioning_status = ProvisioningStatus::Error;
            c.provisioning_error = reason.clone();
        }
        true
    };
    let deleting = |c: &Common| c.provisioning_status == ProvisioningStatus::PendingDelete;
    let children_were_pending = children_pending(s, lb_id);
    // Children first (deletes must precede their parents').
    for m in s.members.with(By::LoadBalancer, lb_id) {
        if ok && deleting(&m.common) {
            tx.delete(Kind::Member, &m.common.id);
            continue;
        }
        let mut m = m.clone();
        let monitored = s.monitor_of(&m.pool_id).is_some();
        if settle(&mut m.common, ok) {
            if no_health && ok {
                m.common.operating_status = if monitored {
                    OperatingStatus::Online
                } else {
                    OperatingStatus::NoMonitor
                };
            }
            tx.put(m);
        }
    }
    macro_rules! settle_all {
        ($items:expr, $kind:expr) => {
            for item in $items {
                let mut item = item.clone();
                if ok && deleting(&item.common) {
                    tx.delete($kind, &item.common.id);
                } else if settle(&mut item.common, ok) {
                    tx.put(item);
                }
            }
        };
    }
    settle_all!(
        s.health_monitors.with(By::LoadBalancer, lb_id),
        Kind::HealthMonitor
    );
    settle_all!(s.pools_of(lb_id), Kind::Pool);
    settle_all!(s.listeners_of(lb_id), Kind::Listener);
    let mut lb = lb.clone();
    if ok && deleting(&lb.common) {
        for a in s.amphorae_of(lb_id) {
            let mut a = a.clone();
            a.load_balancer_id = None;
            if failed.contains(&a.id) {
                // Still holds the config and VIP: wiped when it answers.
                a.status = AmphoraStatus::Error;
            } else {
                a.status = AmphoraStatus::Ready;
                a.vips.clear();
            }
            tx.put(a);
        }
        tx.delete(Kind::LoadBalancer, lb_id);
        return Settled::Deleted;
    }
    let lb_ok = ok
        || (lb.common.provisioning_status == ProvisioningStatus::PendingUpdate
            && children_were_pending);
    let was = lb.common.provisioning_status;
    if !settle(&mut lb.common, lb_ok) {
        return if ok {
            Settled::Active
        } else {
            Settled::ChildrenFailed
        };
    }
    let settled = if lb_ok {
        lb.retry = None;
        lb.common.next_attempt_at = None;
        if ok {
            Settled::Active
        } else {
            Settled::ChildrenFailed
        }
    } else {
        let failures = lb
            .retry
            .as_ref()
            .map_or(0, |r| r.failures)
            .saturating_add(1);
        let wait = p.backoff(failures);
        lb.retry = Some(Retry {
            status: was,
            failures,
        });
        lb.common.next_attempt_at = Some(crate::stamp(wall + wait));
        Settled::Retry { retry_in: wait }
    };
    tx.put(lb);
    settled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{policy, World, SEC};

    use crate::decide::fixture::pair as world;

    fn lb_status(w: &World) -> ProvisioningStatus {
        w.state.load_balancers["lb"].common.provisioning_status
    }

    fn pending(w: &mut World, st: ProvisioningStatus) {
        w.load_balancer("lb", |l| l.common.provisioning_status = st);
    }

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn pending_load_balancers_and_their_children_are_pushed() {
        let mut w = world();
        let none = |w: &World| {
            jobs(
                &w.state,
                &w.view,
                &policy(),
                &Routed::Unknown,
                &HashMap::new(),
            )
        };
        assert_eq!(none(&w), []);
        w.listener("l1", "lb", ProvisioningStatus::PendingCreate);
        assert_eq!(none(&w), [Job::LoadBalancer("lb".into())]);
        w.listener("l1", "lb", ProvisioningStatus::Active);
        pending(&mut w, ProvisioningStatus::PendingDelete);
        assert_eq!(none(&w), [Job::LoadBalancer("lb".into())]);
    }

    #[test]
    fn a_failed_over_amphora_is_wiped_only_once_no_vip_reaches_it() {
        let mut w = world();
        w.amphora("a1", |a| {
            a.status = AmphoraStatus::Error;
            a.load_balancer_id = None;
        });
        let p = policy();
        let none = HashMap::new();
        let wipe = [Job::Wipe("a1".into())];
        assert_eq!(jobs(&w.state, &w.view, &p, &Routed::Unknown, &none), []);
        let to_a1 = Routed::Known(["a1".to_owned()].into());
        assert_eq!(jobs(&w.state, &w.view, &p, &to_a1, &none), []);
        let elsewhere = Routed::Known(["a2".to_owned()].into());
        assert_eq!(jobs(&w.state, &w.view, &p, &elsewhere, &none), wipe);
    }

    #[test]
    fn a_wipe_is_tried_again_once_the_amphora_is_heard_or_without_heartbeats_after_a_while() {
        let mut w = world();
        w.amphora("a1", |a| {
            a.status = AmphoraStatus::Error;
            a.load_balancer_id = None;
        });
        let routed = Routed::Known(Default::default());
        let tried: HashMap<String, Instant> = [("a1".to_owned(), w.view.now - SEC / 2)].into();
        let wipe = [Job::Wipe("a1".into())];
        let p = policy();
        assert_eq!(
            jobs(&w.state, &w.view, &p, &routed, &tried),
            [],
            "heard before the try"
        );
        w.heard("a1", SEC / 4, Default::default());
        assert_eq!(
            jobs(&w.state, &w.view, &p, &routed, &tried),
            wipe,
            "heard since"
        );
        let mut no_health = policy();
        no_health.health = None;
        let tried: HashMap<String, Instant> = [("a1".to_owned(), w.view.now)].into();
        assert_eq!(jobs(&w.state, &w.view, &no_health, &routed, &tried), []);
        w.later(WIPE_RETRY);
        assert_eq!(jobs(&w.state, &w.view, &no_health, &routed, &tried), wipe);
    }

    #[test]
    fn a_failover_swaps_amphora_and_spare_and_pushes_the_load_balancer_again() {
        let mut w = world();
        let pairs = [("a1".to_owned(), "s1".to_owned())];
        let n = w.write(|s, _, tx| replace(s, tx, "lb", &pairs, "silent", "T"));
        assert_eq!(n, 1);
        assert_eq!(w.status("a1"), Some(AmphoraStatus::Error));
        assert_eq!(w.carrier("a1"), None);
        assert_eq!(w.state.amphorae["a1"].error.as_deref(), Some("silent"));
        assert_eq!(w.status("s1"), Some(AmphoraStatus::Allocated));
        assert_eq!(w.carrier("s1"), Some("lb"));
        assert_eq!(lb_status(&w), ProvisioningStatus::PendingUpdate);
        // No pair (no spare): the load balancer is pushed again all the
        // same, to the amphorae it has.
        pending(&mut w, ProvisioningStatus::Active);
        let n = w.write(|s, _, tx| replace(s, tx, "lb", &[], "silent", "T"));
        assert_eq!(n, 0);
        assert_eq!(lb_status(&w), ProvisioningStatus::PendingUpdate);
        assert_eq!(
            w.write(|s, _, tx| replace(s, tx, "gone", &pairs, "x", "T")),
            0
        );
    }

    #[test]
    fn a_successful_push_makes_everything_pending_active() {
        let mut w = world();
        pending(&mut w, ProvisioningStatus::PendingUpdate);
        w.listener("l1", "lb", ProvisioningStatus::PendingCreate);
        w.member("m1", "pool", "lb", ProvisioningStatus::PendingCreate);
        let got = w.write(|s, _, tx| settle(s, tx, "lb", Ok(()), &[], &policy(), wall()));
        assert_eq!(got, Settled::Active);
        assert_eq!(lb_status(&w), ProvisioningStatus::Active);
        let l1 = &w.state.listeners["l1"].common;
        assert_eq!(
            (l1.provisioning_status, l1.deployed),
            (ProvisioningStatus::Active, true)
        );
        assert_eq!(
            w.state.members["m1"].common.provisioning_status,
            ProvisioningStatus::Active
        );
    }

    #[test]
    fn without_a_health_manager_operating_statuses_follow_the_admin_state() {
        let mut w = world();
        let mut p = policy();
        p.health = None;
        pending(&mut w, ProvisioningStatus::PendingUpdate);
        w.member("m1", "pool", "lb", ProvisioningStatus::PendingCreate);
        w.listener("l1", "lb", ProvisioningStatus::PendingCreate);
        let mut l1 = w.state.listeners["l1"].clone();
        l1.common.admin_state_up = false;
        w.put(l1);
        w.write(|s, _, tx| settle(s, tx, "lb", Ok(()), &[], &p, wall()));
        assert_eq!(
            w.state.listeners["l1"].common.operating_status,
            OperatingStatus::Offline
        );
        assert_eq!(
            w.state.members["m1"].common.operating_status,
            OperatingStatus::NoMonitor
        );
        assert_eq!(
            w.state.load_balancers["lb"].common.operating_status,
            OperatingStatus::Online
        );
    }

    #[test]
    fn a_failed_child_change_leaves_the_child_error_and_the_load_balancer_active() {
        let mut w = world();
        pending(&mut w, ProvisioningStatus::PendingUpdate);
        w.listener("l1", "lb", ProvisioningStatus::PendingCreate);
        let got = w.write(|s, _, tx| {
            settle(
                s,
                tx,
                "lb",
                Err("refused"),
                &["a1".into()],
                &policy(),
                wall(),
            )
        });
        assert_eq!(got, Settled::ChildrenFailed);
        assert_eq!(lb_status(&w), ProvisioningStatus::Active);
        let l1 = &w.state.listeners["l1"].common;
        assert_eq!(l1.provisioning_status, ProvisioningStatus::Error);
        assert_eq!(l1.provisioning_error.as_deref(), Some("refused"));
    }

    #[test]
    fn a_failed_change_of_the_load_balancer_is_retried_with_a_doubling_back_off() {
        let mut w = world();
        pending(&mut w, ProvisioningStatus::PendingUpdate);
        let got =
            w.write(|s, _, tx| settle(s, tx, "lb", Err("unreachable"), &[], &policy(), wall()));
        assert_eq!(
            got,
            Settled::Retry {
                retry_in: Duration::from_millis(200)
            }
        );
        let lb = &w.state.load_balancers["lb"];
        assert_eq!(lb.common.provisioning_status, ProvisioningStatus::Error);
        assert_eq!(
            lb.retry,
            Some(Retry {
                status: ProvisioningStatus::PendingUpdate,
                failures: 1
            })
        );
        assert_eq!(
            lb.common.next_attempt_at,
            Some(crate::stamp(wall() + Duration::from_millis(200)))
        );
        // Retried (back to pending) and failed again: twice the wait.
        pending(&mut w, ProvisioningStatus::PendingUpdate);
        let got =
            w.write(|s, _, tx| settle(s, tx, "lb", Err("unreachable"), &[], &policy(), wall()));
        assert_eq!(
            got,
            Settled::Retry {
                retry_in: Duration::from_millis(400)
            }
        );
        // Then a success clears the retry.
        pending(&mut w, ProvisioningStatus::PendingUpdate);
        w.write(|s, _, tx| settle(s, tx, "lb", Ok(()), &[], &policy(), wall()));
        let lb = &w.state.load_balancers["lb"];
        assert_eq!(
            (lb.retry.as_ref(), lb.common.next_attempt_at.as_deref()),
            (None, None)
        );
    }

    #[test]
    fn a_delete_completes_and_frees_the_amphorae_whatever_they_said() {
        let mut w = world();
        pending(&mut w, ProvisioningStatus::PendingDelete);
        w.listener("l1", "lb", ProvisioningStatus::PendingDelete);
        w.member("m1", "pool", "lb", ProvisioningStatus::PendingDelete);
        let got =
            w.write(|s, _, tx| settle(s, tx, "lb", Ok(()), &["a2".into()], &policy(), wall()));
        assert_eq!(got, Settled::Deleted);
        assert!(w.state.load_balancers.is_empty());
        assert!(w.state.listeners.is_empty() && w.state.members.is_empty());
        assert_eq!(w.status("a1"), Some(AmphoraStatus::Ready));
        assert!(w.state.amphorae["a1"].vips.is_empty());
        // It did not take the empty config: set aside to be wiped.
        assert_eq!(w.status("a2"), Some(AmphoraStatus::Error));
        assert_eq!(w.carrier("a2"), None);
        assert_eq!(
            w.write(|s, _, tx| settle(s, tx, "lb", Ok(()), &[], &policy(), wall())),
            Settled::Gone
        );
    }
}
