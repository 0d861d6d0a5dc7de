//! What a verified heartbeat changes in the store: when its amphora was
//! heard, its status, traffic counters and the operating statuses of its
//! load balancer's objects.

use std::collections::HashMap;

use siphon_proto::heartbeat::Heartbeat;

use crate::decide::Policy;
use crate::liveness::{Report, View};
use crate::model::{AmphoraStatus, Counters, OperatingStatus, State};
use crate::store::Tx;

/// What a batch of heartbeats leaves to store beside documents: the
/// newest sequence number taken from each amphora, and the newest
/// counters of each listener on it, as reported (the store turns them
/// into totals, so every controller may store the same beat).
#[derive(Debug, Default)]
pub struct Batch {
    pub heard: HashMap<String, u64>,
    pub counters: HashMap<(String, String), (u64, Counters)>,
    /// Amphorae back in service, and their new status (logged once
    /// stored).
    pub back: Vec<(String, AmphoraStatus)>,
}

/// How often an amphora's document is rewritten only to say when it was
/// last heard: when is the `heard` table's (per controller, every beat);
/// the document's stamp is for people reading the API.
pub const RESTAMP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// What the amphora says it runs, for the repairer.
pub fn report(beat: &Heartbeat) -> Report {
    Report {
        generation: beat.generation,
        persisted_generation: Some(beat.persisted_generation),
        vips: reported_vips(beat),
        bgp: beat.bgp.clone(),
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

/// Folds one heartbeat (signed with key `key_id`) into `tx` and `batch`:
/// that the amphora was heard, its status (a spare or a held amphora
/// back in service), its counters, and operating statuses, from a
/// dataplane that runs the config last pushed and is in step. `stamp`:
/// now, for what is stored; the document is rewritten for a new status,
/// a key now held, or a stamp older than `restamp_before`.
#[allow(clippy::too_many_arguments)]
pub fn fold(
    view: &View,
    p: &Policy,
    s: &State,
    tx: &mut Tx,
    beat: &Heartbeat,
    key_id: u32,
    batch: &mut Batch,
    stamp: &str,
    restamp_before: &str,
) {
    let Some(a) = s.amphorae.get(&beat.amphora_id) else {
        tracing::debug!(amphora = %beat.amphora_id, "heartbeat from an unregistered amphora");
        return;
    };
    // Replay protection across restarts (every controller's).
    let seq = batch.heard.entry(a.id.clone()).or_default();
    *seq = (*seq).max(beat.seq);
    let mut heard = a.clone();
    // Proof its agent holds its own key.
    let acked =
        !a.heartbeat_key_acked && a.heartbeat_key.as_ref().is_some_and(|k| k.key_id == key_id);
    heard.heartbeat_key_acked |= acked;
    // A spare or a recovered amphora is back in service.
    let next = match (a.status, &a.load_balancer_id) {
        (AmphoraStatus::Booting, None) => Some(AmphoraStatus::Ready),
        (AmphoraStatus::FailoverStopped, Some(_)) => Some(AmphoraStatus::Allocated),
        _ => None,
    };
    if let Some(status) = next {
        heard.status = status;
        heard.updated_at = Some(stamp.to_owned());
        batch.back.push((a.id.clone(), status));
    }
    let restamp = a
        .last_heartbeat
        .as_deref()
        .is_none_or(|t| t < restamp_before);
    if acked || next.is_some() || restamp {
        heard.last_heartbeat = Some(stamp.to_owned());
        heard.heartbeat_seq = heard.heartbeat_seq.max(beat.seq);
        tx.put(heard);
    }
    let Some(lb_id) = &a.load_balancer_id else {
        return;
    };
    for l in &beat.listeners {
        if s.listeners
            .get(&l.id)
            .is_some_and(|x| &x.load_balancer_id == lb_id)
        {
            let raw = Counters {
                bytes_in: l.bytes_in,
                bytes_out: l.bytes_out,
                active_connections: l.active_connections,
                total_connections: l.total_connections,
                request_errors: 0,
            };
            let e = batch
                .counters
                .entry((l.id.clone(), a.id.clone()))
                .or_insert((beat.seq, raw));
            if beat.seq >= e.0 {
                *e = (beat.seq, raw);
            }
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
            bgp: None,
        }
    }

    fn fold_in(w: &mut World, b: &Heartbeat) -> Batch {
        let mut batch = Batch::default();
        w.write(|s, v, tx| fold(v, &policy(), s, tx, b, 1, &mut batch, "T", "S"));
        batch
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
        for id in ["s1", "held"] {
            fold_in(&mut w, &beat(id, &[]));
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
        fold_in(&mut w, &beat("a1", &[("m1", Online), ("m2", Online)]));
        assert_eq!(op(&w), [Online, Online, Online, Online]);
        fold_in(&mut w, &beat("a1", &[("m1", Error), ("m2", Online)]));
        assert_eq!(op(&w), [Error, Degraded, Online, Degraded]);
        fold_in(&mut w, &beat("a1", &[("m1", Error), ("m2", Error)]));
        assert_eq!(op(&w), [Error, Error, Online, Error]);
    }

    #[test]
    fn a_missing_listener_is_an_error_unless_the_datagram_was_cut() {
        let mut w = world();
        let mut b = beat("a1", &[]);
        b.listeners.clear();
        b.truncated = true;
        fold_in(&mut w, &b);
        assert_eq!(w.state.listeners["l1"].common.operating_status, Online);
        b.truncated = false;
        fold_in(&mut w, &b);
        assert_eq!(w.state.listeners["l1"].common.operating_status, Error);
        // Set down by the operator: OFFLINE, not missing.
        let mut l = w.state.listeners["l1"].clone();
        l.common.admin_state_up = false;
        w.put(l);
        fold_in(&mut w, &b);
        assert_eq!(w.state.listeners["l1"].common.operating_status, Offline);
    }

    #[test]
    fn another_amphora_silent_or_out_of_step_degrades_the_load_balancer() {
        let mut w = world();
        let b = beat("a1", &[("m1", Online), ("m2", Online)]);
        w.heard("a2", 5 * SEC, Default::default());
        fold_in(&mut w, &b);
        assert_eq!(op(&w)[3], Degraded);
        w.heard("a2", SEC, Default::default())
            .live("a2", |l| l.drift = Some("lost its VIP".into()));
        fold_in(&mut w, &b);
        assert_eq!(op(&w)[3], Degraded);
        w.live("a2", |l| l.drift = None);
        fold_in(&mut w, &b);
        assert_eq!(op(&w)[3], Online);
    }

    #[test]
    fn statuses_are_not_taken_from_an_old_config_a_change_or_an_amphora_out_of_step() {
        let mut w = world();
        let down = beat("a1", &[("m1", Error), ("m2", Error)]);
        let mut old = down.clone();
        old.generation = Some(0);
        fold_in(&mut w, &old);
        assert_eq!(op(&w), [Online; 4], "older generation");
        w.live("a1", |l| l.drift = Some("x".into()));
        fold_in(&mut w, &down);
        assert_eq!(op(&w), [Online; 4], "out of step");
        w.live("a1", |l| l.drift = None);
        w.load_balancer("lb", |l| {
            l.common.provisioning_status = ProvisioningStatus::PendingUpdate
        });
        fold_in(&mut w, &down);
        assert_eq!(op(&w), [Online; 4], "mid-change");
    }

    #[test]
    fn counters_are_kept_as_reported_newest_beat_first() {
        let mut w = world();
        let key = ("l1".to_owned(), "a1".to_owned());
        let mut b = beat("a1", &[]);
        let t = fold_in(&mut w, &b).counters;
        assert_eq!((t[&key].0, t[&key].1.bytes_in), (7, 100));
        // Two beats in one batch, the newer first: the newer stands.
        let mut batch = Batch::default();
        let older = b.clone();
        b.seq = 8;
        b.listeners[0].bytes_in = 150;
        w.write(|s, v, tx| {
            for x in [&b, &older] {
                fold(v, &policy(), s, tx, x, 1, &mut batch, "T", "S");
            }
        });
        assert_eq!(batch.counters[&key].1.bytes_in, 150);
        assert_eq!(batch.heard["a1"], 8);
    }

    #[test]
    fn the_document_is_rewritten_only_when_something_changed_or_its_stamp_is_old() {
        let mut w = world();
        let b = beat("a1", &[]);
        w.amphora("a1", |a| a.last_heartbeat = Some("U".into()));
        let mut batch = Batch::default();
        let tx = w.write(|s, v, tx| {
            fold(v, &policy(), s, tx, &b, 1, &mut batch, "V", "S");
            tx.ops()
                .iter()
                .any(|o| matches!(o, crate::store::Op::Put(x) if x.id() == "a1"))
        });
        assert!(
            !tx,
            "a recent stamp and nothing new: no write of the document"
        );
        fold_in(&mut w, &b);
        assert_eq!(w.state.amphorae["a1"].last_heartbeat.as_deref(), Some("U"));
        w.amphora("a1", |a| a.last_heartbeat = Some("R".into()));
        fold_in(&mut w, &b);
        let a = &w.state.amphorae["a1"];
        assert_eq!(
            (a.last_heartbeat.as_deref(), a.heartbeat_seq),
            (Some("T"), 7)
        );
    }

    #[test]
    fn a_listener_of_another_load_balancer_is_not_counted() {
        let mut w = world();
        w.lb("other", 2, 1)
            .listener("l2", "other", ProvisioningStatus::Active);
        let mut b = beat("a1", &[]);
        b.listeners[0].id = "l2".into();
        assert!(fold_in(&mut w, &b).counters.is_empty());
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
