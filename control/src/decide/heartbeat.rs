//! What a verified heartbeat changes in the store: when its amphora was
//! heard, its status, traffic counters and the operating statuses of its
//! load balancer's objects.

use std::collections::HashMap;

use siphon_proto::heartbeat::Heartbeat;

use crate::decide::Policy;
use crate::liveness::{Report, View};
use crate::model::{AmphoraStatus, Counters, OperatingStatus, State};
use crate::store::Tx;

/// Counters as last reported, to turn absolute values into increments.
#[derive(Debug, Default)]
pub struct Last {
    reported: HashMap<(String, String), Counters>,
}

impl Last {
    /// The increment since the last report; a counter that went down
    /// means the dataplane restarted, so the new value is all new.
    pub fn delta(&mut self, key: (String, String), now: Counters) -> Counters {
        let prev = self.reported.insert(key, now).unwrap_or_default();
        let d = |n: u64, p: u64| if n >= p { n - p } else { n };
        Counters {
            bytes_in: d(now.bytes_in, prev.bytes_in),
            bytes_out: d(now.bytes_out, prev.bytes_out),
            active_connections: now.active_connections,
            total_connections: d(now.total_connections, prev.total_connections),
            request_errors: d(now.request_errors, prev.request_errors),
        }
    }
}

/// What the amphora says it runs, for the repairer.
pub fn report(beat: &Heartbeat) -> Report {
    Report {
        generation: beat.generation,
        persisted_generation: Some(beat.persisted_generation),
        vips: reported_vips(beat),
    }
}

/// The VIPs a heartbeat says its agent holds; `None` when it does not
/// say, or its list was cut to fit the datagram (a VIP left out is not a
/// VIP missing).
fn reported_vips(beat: &Heartbeat) -> Option<Vec<String>> {
    beat.vips
        .clone()
        .filter(|v| !(beat.truncated && v.len() >= siphon_proto::heartbeat::MAX_VIPS))
}

/// Folds one heartbeat (signed with key `key_id`) into `tx`: when the
/// amphora was heard, its status (a spare or a held amphora back in
/// service), counter increments into `totals` (per listener and
/// amphora), and operating statuses, from a dataplane that runs the
/// config last pushed and is in step. `stamp`: now, for what is stored.
#[allow(clippy::too_many_arguments)]
pub fn fold(
    view: &View,
    p: &Policy,
    s: &State,
    tx: &mut Tx,
    beat: &Heartbeat,
    key_id: u32,
    last: &mut Last,
    totals: &mut HashMap<(String, String), Counters>,
    stamp: &str,
) {
    let Some(a) = s.amphorae.get(&beat.amphora_id) else {
        tracing::debug!(amphora = %beat.amphora_id, "heartbeat from an unregistered amphora");
        return;
    };
    // Last seen, stored; and a spare or a recovered amphora is back in
    // service.
    // Replay protection across restarts, and proof its agent holds its
    // own key.
    let mut heard = a.clone();
    heard.last_heartbeat = Some(stamp.to_owned());
    heard.heartbeat_seq = heard.heartbeat_seq.max(beat.seq);
    if heard
        .heartbeat_key
        .as_ref()
        .is_some_and(|k| k.key_id == key_id)
    {
        heard.heartbeat_key_acked = true;
    }
    let next = match (a.status, &a.load_balancer_id) {
        (AmphoraStatus::Booting, None) => Some(AmphoraStatus::Ready),
        (AmphoraStatus::FailoverStopped, Some(_)) => Some(AmphoraStatus::Allocated),
        _ => None,
    };
    if let Some(status) = next {
        heard.status = status;
        heard.updated_at = heard.last_heartbeat.clone();
        tracing::info!(amphora = %a.id, status = ?status, "amphora heard");
    }
    tx.put(heard);
    let Some(lb_id) = &a.load_balancer_id else {
        return;
    };
    for l in &beat.listeners {
        if s.listeners
            .get(&l.id)
            .is_some_and(|x| &x.load_balancer_id == lb_id)
        {
            let now = Counters {
                bytes_in: l.bytes_in,
                bytes_out: l.bytes_out,
                active_connections: l.active_connections,
                total_connections: l.total_connections,
                request_errors: 0,
            };
            let key = (l.id.clone(), a.id.clone());
            let d = last.delta(key.clone(), now);
            let stored = s.stats.get(&key).copied().unwrap_or_default();
            let total = totals.entry(key).or_insert(stored);
            let active = d.active_connections;
            total.add(&Counters {
                active_connections: 0,
                ..d
            });
            total.active_connections = active;
        }
    }
    // Statuses only from a dataplane running the config last pushed: an
    // older one reports objects that are being changed.
    let Some(lb) = s.load_balancers.get(lb_id) else {
        return;
    };
    // Nor from one the repairer judged out of step (it lost its config
    // or its VIP): the repairer's `ERROR`/`DEGRADED` stands until it is
    // in step again.
    if beat.generation != Some(a.generation)
        || lb.common.provisioning_status.is_pending()
        || view.out_of_step(&a.id)
    {
        return;
    }
    // Another amphora of it gone silent (active-active): it serves, but
    // on fewer amphorae than it should.
    let short = s.amphorae_of(lb_id).any(|x| {
        x.id != a.id
            && x.status == AmphoraStatus::Allocated
            && (p.silent(view, &x.id) || view.out_of_step(&x.id))
    });
    statuses(s, tx, lb_id, beat, short);
}

/// Operating statuses of `lb_id`'s objects from what `beat` reports:
/// members as reported; a pool `ERROR` when no member is up, `DEGRADED`
/// when some are down; a listener as reported (`ERROR` when missing,
/// unless left out to fit the datagram); the load balancer the worst of
/// them, `DEGRADED` too when `short` (another amphora of it is silent or
/// out of step); `OFFLINE` wherever the operator set it down.
pub fn statuses(s: &State, tx: &mut Tx, lb_id: &str, beat: &Heartbeat, short: bool) {
    use OperatingStatus as O;
    let members: HashMap<&str, O> = beat
        .members
        .iter()
        .map(|m| (m.id.as_str(), m.operating_status))
        .collect();
    let mut pool_status: HashMap<String, O> = HashMap::new();
    for p in s.pools_of(lb_id) {
        let mut up = 0;
        let mut err = 0;
        for m in s.members_of(&p.common.id) {
            let st = members
                .get(m.common.id.as_str())
                .copied()
                .unwrap_or(m.common.operating_status);
            if st != m.common.operating_status && !m.common.provisioning_status.is_pending() {
                let mut m = m.clone();
                m.common.operating_status = st;
                tx.put(m);
            }
            match st {
                O::Error => err += 1,
                O::Online | O::NoMonitor | O::Draining => up += 1,
                _ => {}
            }
        }
        let st = if !p.common.admin_state_up {
            O::Offline
        } else if err > 0 && up == 0 {
            O::Error
        } else if err > 0 {
            O::Degraded
        } else {
            O::Online
        };
        pool_status.insert(p.common.id.clone(), st);
        if st != p.common.operating_status {
            let mut p = p.clone();
            p.common.operating_status = st;
            tx.put(p);
        }
        if let Some(h) = s.monitor_of(&p.common.id) {
            let hs = if h.common.admin_state_up {
                O::Online
            } else {
                O::Offline
            };
            if hs != h.common.operating_status {
                let mut h = h.clone();
                h.common.operating_status = hs;
                tx.put(h);
            }
        }
    }
    let mut degraded = short || pool_status.values().any(|s| *s == O::Degraded);
    let mut error = pool_status.values().any(|s| *s == O::Error);
    for l in s.listeners_of(lb_id) {
        let reported = beat.listeners.iter().find(|b| b.id == l.common.id);
        let st = match reported.map(|r| r.operating_status) {
            Some(st) => st,
            // Left out to fit the datagram: unknown, not missing.
            None if beat.truncated => l.common.operating_status,
            None if l.common.admin_state_up => O::Error,
            None => O::Offline,
        };
        degraded |= st == O::Degraded;
        error |= st == O::Error;
        if st != l.common.operating_status {
            let mut l = l.clone();
            l.common.operating_status = st;
            tx.put(l);
        }
    }
    if let Some(lb) = s.load_balancers.get(lb_id) {
        let st = if !lb.common.admin_state_up {
            O::Offline
        } else if error {
            O::Error
        } else if degraded {
            O::Degraded
        } else {
            O::Online
        };
        if st != lb.common.operating_status {
            let mut lb = lb.clone();
            lb.common.operating_status = st;
            tx.put(lb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{policy, World, SEC};
    use crate::model::ProvisioningStatus;
    use siphon_proto::heartbeat::{ListenerBeat, MemberBeat};

    /// `lb` on a1 and a2 (generation 1), listener l1, pool p1 with m1 and
    /// m2.
    fn world() -> World {
        let mut w = World::new();
        let active = ProvisioningStatus::Active;
        w.lb("lb", 1, 2)
            .amp("a1", Some("lb"), Some(SEC))
            .amp("a2", Some("lb"), Some(SEC))
            .listener("l1", "lb", active)
            .pool("p1", "lb")
            .member("m1", "p1", "lb", active)
            .member("m2", "p1", "lb", active);
        w
    }

    fn beat(from: &str, members: &[(&str, OperatingStatus)]) -> Heartbeat {
        Heartbeat {
            amphora_id: from.into(),
            seq: 7,
            sent_ms: 0,
            generation: Some(1),
            persisted_generation: Some(1),
            listeners: vec![ListenerBeat {
                id: "l1".into(),
                operating_status: OperatingStatus::Online,
                active_connections: 3,
                total_connections: 10,
                bytes_in: 100,
                bytes_out: 200,
            }],
            members: members
                .iter()
                .map(|(id, st)| MemberBeat {
                    pool_id: "p1".into(),
                    id: (*id).into(),
                    operating_status: *st,
                })
                .collect(),
            truncated: false,
            vips: None,
        }
    }

    fn fold_in(
        w: &mut World,
        b: &Heartbeat,
        last: &mut Last,
    ) -> HashMap<(String, String), Counters> {
        let mut totals = HashMap::new();
        w.write(|s, v, tx| fold(v, &policy(), s, tx, b, 1, last, &mut totals, "T"));
        totals
    }

    fn op(w: &World) -> [OperatingStatus; 4] {
        let s = &w.state;
        [
            s.members["m1"].common.operating_status,
            s.pools["p1"].common.operating_status,
            s.listeners["l1"].common.operating_status,
            s.load_balancers["lb"].common.operating_status,
        ]
    }

    use OperatingStatus::{Degraded, Error, Offline, Online};

    #[test]
    fn a_heartbeat_is_stored_as_heard_and_brings_spares_and_held_amphorae_back() {
        let mut w = world();
        w.amp("s1", None, None).amp("held", Some("lb"), None);
        w.amphora("s1", |a| a.status = AmphoraStatus::Booting);
        w.amphora("held", |a| a.status = AmphoraStatus::FailoverStopped);
        let mut last = Last::default();
        for id in ["s1", "held"] {
            fold_in(&mut w, &beat(id, &[]), &mut last);
        }
        assert_eq!(w.status("s1"), Some(AmphoraStatus::Ready));
        assert_eq!(w.status("held"), Some(AmphoraStatus::Allocated));
        let a = &w.state.amphorae["s1"];
        assert_eq!(
            (a.last_heartbeat.as_deref(), a.heartbeat_seq),
            (Some("T"), 7)
        );
    }

    #[test]
    fn members_pools_listeners_and_the_load_balancer_follow_the_report() {
        let mut w = world();
        let mut last = Last::default();
        fold_in(
            &mut w,
            &beat("a1", &[("m1", Online), ("m2", Online)]),
            &mut last,
        );
        assert_eq!(op(&w), [Online, Online, Online, Online]);
        fold_in(
            &mut w,
            &beat("a1", &[("m1", Error), ("m2", Online)]),
            &mut last,
        );
        assert_eq!(op(&w), [Error, Degraded, Online, Degraded]);
        fold_in(
            &mut w,
            &beat("a1", &[("m1", Error), ("m2", Error)]),
            &mut last,
        );
        assert_eq!(op(&w), [Error, Error, Online, Error]);
    }

    #[test]
    fn a_missing_listener_is_an_error_unless_the_datagram_was_cut() {
        let mut w = world();
        let mut last = Last::default();
        let mut b = beat("a1", &[]);
        b.listeners.clear();
        b.truncated = true;
        fold_in(&mut w, &b, &mut last);
        assert_eq!(w.state.listeners["l1"].common.operating_status, Online);
        b.truncated = false;
        fold_in(&mut w, &b, &mut last);
        assert_eq!(w.state.listeners["l1"].common.operating_status, Error);
        // Set down by the operator: OFFLINE, not missing.
        let mut l = w.state.listeners["l1"].clone();
        l.common.admin_state_up = false;
        w.put(l);
        fold_in(&mut w, &b, &mut last);
        assert_eq!(w.state.listeners["l1"].common.operating_status, Offline);
    }

    #[test]
    fn another_amphora_silent_or_out_of_step_degrades_the_load_balancer() {
        let mut w = world();
        let mut last = Last::default();
        let b = beat("a1", &[("m1", Online), ("m2", Online)]);
        w.heard("a2", 5 * SEC, Default::default());
        fold_in(&mut w, &b, &mut last);
        assert_eq!(op(&w)[3], Degraded);
        w.heard("a2", SEC, Default::default())
            .live("a2", |l| l.drift = Some("lost its VIP".into()));
        fold_in(&mut w, &b, &mut last);
        assert_eq!(op(&w)[3], Degraded);
        w.live("a2", |l| l.drift = None);
        fold_in(&mut w, &b, &mut last);
        assert_eq!(op(&w)[3], Online);
    }

    #[test]
    fn statuses_are_not_taken_from_an_old_config_a_change_or_an_amphora_out_of_step() {
        let mut w = world();
        let mut last = Last::default();
        let down = beat("a1", &[("m1", Error), ("m2", Error)]);
        let mut old = down.clone();
        old.generation = Some(0);
        fold_in(&mut w, &old, &mut last);
        assert_eq!(op(&w), [Online; 4], "older generation");
        w.live("a1", |l| l.drift = Some("x".into()));
        fold_in(&mut w, &down, &mut last);
        assert_eq!(op(&w), [Online; 4], "out of step");
        w.live("a1", |l| l.drift = None);
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingUpdate
        });
        fold_in(&mut w, &down, &mut last);
        assert_eq!(op(&w), [Online; 4], "mid-change");
    }

    #[test]
    fn counters_add_increments_and_survive_a_dataplane_restart() {
        let mut w = world();
        let mut last = Last::default();
        let key = ("l1".to_owned(), "a1".to_owned());
        let mut b = beat("a1", &[]);
        let t = fold_in(&mut w, &b, &mut last);
        assert_eq!((t[&key].bytes_in, t[&key].total_connections), (100, 10));
        w.state.stats.insert(key.clone(), t[&key]);
        b.listeners[0].bytes_in = 150;
        b.listeners[0].total_connections = 12;
        let t = fold_in(&mut w, &b, &mut last);
        assert_eq!((t[&key].bytes_in, t[&key].total_connections), (150, 12));
        w.state.stats.insert(key.clone(), t[&key]);
        // The dataplane restarted: its counters start again from zero,
        // and all of the new value is new.
        b.listeners[0].bytes_in = 30;
        b.listeners[0].total_connections = 1;
        b.listeners[0].active_connections = 1;
        let t = fold_in(&mut w, &b, &mut last);
        let c = t[&key];
        assert_eq!(
            (c.bytes_in, c.total_connections, c.active_connections),
            (180, 13, 1)
        );
    }

    #[test]
    fn a_listener_of_another_load_balancer_is_not_counted() {
        let mut w = world();
        w.lb("other", 2, 1)
            .listener("l2", "other", ProvisioningStatus::Active);
        let mut b = beat("a1", &[]);
        b.listeners[0].id = "l2".into();
        assert!(fold_in(&mut w, &b, &mut Last::default()).is_empty());
    }

    #[test]
    fn a_vip_list_cut_to_fit_is_not_taken_as_missing_vips() {
        let mut b = beat("a1", &[]);
        b.vips = Some(vec!["198.18.0.1/32".into()]);
        assert_eq!(report(&b).vips, b.vips);
        b.vips = Some(vec!["x".into(); siphon_proto::heartbeat::MAX_VIPS]);
        b.truncated = true;
        assert_eq!(report(&b).vips, None);
        assert_eq!(report(&b).persisted_generation, Some(Some(1)));
    }
}
