//! Heartbeats and their keys.
//!
//! Every amphora gets its own HMAC key, made here and pushed to its agent
//! over mutual TLS (`PUT /v1/heartbeat-key`), so no amphora can sign for
//! another. The fleet's bootstrap key (`health.key_file`, key id 0), when
//! configured, speaks for an amphora only until its agent holds its own
//! key. A rotation makes a new key and keeps the previous one valid for
//! `health.key_grace_ms`, so no heartbeat is dropped while the agent
//! switches.
//!
//! [`Gate`] checks each datagram, in order: its shape and who it claims
//! to be (an amphora this controller does not know is refused before
//! anything is kept about it, so strangers cost no memory), the key it
//! names, the MAC, the clock window, and the sequence number: newer than
//! the last one taken (stored with each batch, so a restart keeps it),
//! not ahead of the clock (sequence numbers start at the agent's start
//! time in microseconds, so one forged huge number cannot lock an amphora
//! out), and, for the first beats after a restart, not sent before this
//! controller started (a replay of what was taken but not yet stored).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use siphon_proto::heartbeat::{self, Heartbeat, HeartbeatError, BOOTSTRAP_KEY_ID};
use siphon_proto::keys::{PushedKey, KEY_LEN};
use thiserror::Error;

use crate::model::{Amphora, State};

#[derive(Debug, Error)]
pub enum Refusal {
    #[error(transparent)]
    Format(#[from] HeartbeatError),
    #[error("from {0:?}, which is not a registered amphora")]
    Unknown(String),
    #[error("signed with key {key_id}, which is not {amphora}'s")]
    WrongKey { amphora: String, key_id: u32 },
    #[error("signed with the bootstrap key, but {0} holds its own key")]
    Bootstrap(String),
    #[error("signed with the bootstrap key, and none is configured")]
    NoBootstrap,
    #[error("sequence {seq} from {amphora} is ahead of the clock")]
    Implausible { amphora: String, seq: u64 },
    #[error("sent before this controller started: a replay")]
    BeforeStart,
}

/// A new random key with `key_id`.
pub fn generate(key_id: u32) -> Result<PushedKey, String> {
    use ring::rand::SecureRandom;
    let mut secret = [0u8; KEY_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "no randomness for a heartbeat key".to_owned())?;
    PushedKey::new(key_id, secret).map_err(|e| e.to_string())
}

/// The key `key_id` names for `a`, if it may sign for it at `now_utc`.
fn key_for<'a>(
    a: &'a Amphora,
    key_id: u32,
    bootstrap: Option<&'a [u8]>,
    now_utc: &str,
) -> Result<&'a [u8], Refusal> {
    if key_id == BOOTSTRAP_KEY_ID {
        return bootstrap.ok_or(Refusal::NoBootstrap);
    }
    if let Some(k) = a.heartbeat_key.as_ref().filter(|k| k.key_id == key_id) {
        return Ok(k.secret());
    }
    let grace = a
        .previous_key_valid_until
        .as_deref()
        .is_some_and(|until| until > now_utc);
    if let Some(k) = a
        .previous_heartbeat_key
        .as_ref()
        .filter(|k| k.key_id == key_id && grace)
    {
        return Ok(k.secret());
    }
    match a
        .older_heartbeat_keys
        .iter()
        .find(|r| r.key.key_id == key_id && r.valid_until.as_str() > now_utc)
    {
        Some(r) => Ok(r.key.secret()),
        None => Err(Refusal::WrongKey {
            amphora: a.id.clone(),
            key_id,
        }),
    }
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Checks heartbeats; remembers the last sequence number per registered
/// amphora.
#[derive(Debug)]
pub struct Gate {
    bootstrap: Option<Vec<u8>>,
    window: Duration,
    started_ms: u128,
    seqs: HashMap<String, u64>,
}

impl Gate {
    /// `seqs`: the last sequence numbers stored; `started`: when this
    /// controller started.
    pub fn new(
        bootstrap: Option<Vec<u8>>,
        window: Duration,
        started: SystemTime,
        seqs: HashMap<String, u64>,
    ) -> Gate {
        Gate {
            bootstrap,
            window,
            started_ms: millis(started),
            seqs,
        }
    }

    /// Checks one datagram received at `now` against what `s` knows of
    /// its sender. `Ok` carries the heartbeat and the key id it was
    /// signed with.
    pub fn check(
        &mut self,
        s: &State,
        datagram: &[u8],
        now: SystemTime,
    ) -> Result<(Heartbeat, u32), Refusal> {
        let env = heartbeat::envelope(datagram)?;
        let a = s
            .amphorae
            .get(env.amphora_id)
            .ok_or_else(|| Refusal::Unknown(env.amphora_id.chars().take(64).collect()))?;
        let now_utc = crate::stamp(now);
        let secret = key_for(a, env.key_id, self.bootstrap.as_deref(), &now_utc)?;
        let beat = heartbeat::open(datagram, &heartbeat::key(secret))?;
        if env.key_id == BOOTSTRAP_KEY_ID && a.bootstrap_refused() {
            return Err(Refusal::Bootstrap(a.id.clone()));
        }
        let now_ms = millis(now);
        let age_ms = now_ms as i128 - i128::from(beat.sent_ms);
        if age_ms.unsigned_abs() > self.window.as_millis() {
            return Err(HeartbeatError::Stale {
                age_ms,
                window_ms: self.window.as_millis(),
            }
            .into());
        }
        let last = self
            .seqs
            .get(&a.id)
            .copied()
            .unwrap_or(a.heartbeat_seq)
            .max(a.heartbeat_seq);
        if beat.seq <= last {
            return Err(HeartbeatError::Replayed {
                amphora: a.id.clone(),
                seq: beat.seq,
                last,
            }
            .into());
        }
        let ahead = (now_ms + self.window.as_millis()).saturating_mul(1_000);
        if u128::from(beat.seq) > ahead {
            return Err(Refusal::Implausible {
                amphora: a.id.clone(),
                seq: beat.seq,
            });
        }
        if u128::from(beat.sent_ms) + 1_000 < self.started_ms {
            return Err(Refusal::BeforeStart);
        }
        self.seqs.insert(a.id.clone(), beat.seq);
        Ok((beat, env.key_id))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn amphora(id: &str, key: Option<PushedKey>) -> Amphora {
        serde_json::from_value(serde_json::json!({
            "id": id, "load_balancer_id": null, "status": "READY",
            "lb_network_ip": "127.0.0.1", "agent_port": 1, "server_name": id,
            "ca_certificate": null, "vip_interface": "lo", "generation": 0,
            "vips": [], "created_at": "2026-01-01T00:00:00", "updated_at": null,
        }))
        .map(|mut a: Amphora| {
            a.heartbeat_key = key;
            a
        })
        .unwrap()
    }

    fn beat(id: &str, seq: u64, now: SystemTime) -> Heartbeat {
        Heartbeat {
            amphora_id: id.into(),
            seq,
            sent_ms: millis(now) as u64,
            generation: Some(1),
            persisted_generation: Some(1),
            listeners: vec![],
            members: vec![],
            truncated: false,
            vips: None,
            bgp: None,
        }
    }

    #[test]
    fn only_the_amphoras_own_key_speaks_for_it() {
        let now = SystemTime::now();
        let seq = (millis(now) * 1_000) as u64;
        let k1 = generate(1).unwrap();
        let k2 = generate(7).unwrap();
        let mut s = State::default();
        s.amphorae.insert(amphora("a1", Some(k1.clone())));
        s.amphorae.insert(amphora("a2", Some(k2.clone())));
        let boot = b"a bootstrap key of the fleet".to_vec();
        let mut gate = Gate::new(
            Some(boot.clone()),
            Duration::from_secs(30),
            now - Duration::from_secs(5),
            HashMap::new(),
        );
        let sign = |k: &PushedKey, b: &Heartbeat| {
            heartbeat::seal(&heartbeat::key(k.secret()), k.key_id, b)
        };
        // Its own key.
        let ok = sign(&k1, &beat("a1", seq, now));
        assert_eq!(gate.check(&s, &ok, now).unwrap().1, 1);
        // a2's key, claiming to be a1: refused.
        let forged = sign(&k2, &beat("a1", seq + 1, now));
        assert!(matches!(
            gate.check(&s, &forged, now),
            Err(Refusal::WrongKey { .. })
        ));
        // Replayed, and a number ahead of the clock.
        assert!(matches!(
            gate.check(&s, &ok, now),
            Err(Refusal::Format(HeartbeatError::Replayed { .. }))
        ));
        let huge = sign(&k1, &beat("a1", u64::MAX - 1, now));
        assert!(matches!(
            gate.check(&s, &huge, now),
            Err(Refusal::Implausible { .. })
        ));
        // The next real one still passes: nothing was locked out.
        assert!(gate
            .check(&s, &sign(&k1, &beat("a1", seq + 2, now)), now)
            .is_ok());
        // The bootstrap key speaks for a1 only until its key is held.
        let boot_signed = heartbeat::seal(&heartbeat::key(&boot), 0, &beat("a1", seq + 3, now));
        assert!(gate.check(&s, &boot_signed, now).is_ok());
        let mut held = s.amphorae["a1"].clone();
        held.heartbeat_key_acked = true;
        s.amphorae.insert(held);
        let boot_signed = heartbeat::seal(&heartbeat::key(&boot), 0, &beat("a1", seq + 4, now));
        assert!(matches!(
            gate.check(&s, &boot_signed, now),
            Err(Refusal::Bootstrap(_))
        ));
        // Strangers are refused before anything is kept about them.
        let stranger = sign(&k1, &beat("a9", seq, now));
        assert!(matches!(
            gate.check(&s, &stranger, now),
            Err(Refusal::Unknown(_))
        ));
        assert!(!gate.seqs.contains_key("a9"));
    }

    #[test]
    fn the_largest_heartbeat_is_taken_and_the_largest_junk_refused() {
        let now = SystemTime::now();
        let seq = (millis(now) * 1_000) as u64;
        let k = generate(3).unwrap();
        let mut s = State::default();
        s.amphorae.insert(amphora("a1", Some(k.clone())));
        let mut gate = Gate::new(None, Duration::from_secs(30), now, HashMap::new());
        let sign = |b: &Heartbeat| heartbeat::seal(&heartbeat::key(k.secret()), 3, b);
        // As many members as fit the largest datagram an agent sends.
        let mut big = beat("a1", seq, now);
        let mut i = 0;
        loop {
            big.members.push(heartbeat::MemberBeat {
                pool_id: format!("{i:036}"),
                id: format!("{:036}", i + 1),
                operating_status: siphon_proto::OperatingStatus::Online,
            });
            if sign(&big).len() > heartbeat::MAX_DATAGRAM {
                big.members.pop();
                break;
            }
            i += 1;
        }
        let datagram = sign(&big);
        assert!(datagram.len() > heartbeat::MAX_DATAGRAM - 200);
        let (taken, _) = gate.check(&s, &datagram, now).unwrap();
        assert_eq!(taken.members.len(), big.members.len());
        // The largest UDP payload of junk, and of a known amphora's
        // envelope with a forged MAC: typed refusals, nothing kept.
        let junk = vec![0xa5u8; 65_507];
        assert!(matches!(
            gate.check(&s, &junk, now),
            Err(Refusal::Format(_))
        ));
        let mut forged = sign(&beat("a1", seq + 1, now));
        let pad = 65_507 - forged.len();
        forged.extend(std::iter::repeat_n(b' ', pad));
        assert!(gate.check(&s, &forged, now).is_err());
        assert_eq!(gate.seqs.get("a1"), Some(&seq));
    }

    #[test]
    fn replay_protection_survives_a_restart() {
        let now = SystemTime::now();
        let seq = (millis(now) * 1_000) as u64;
        let k = generate(2).unwrap();
        let mut s = State::default();
        let mut a = amphora("a1", Some(k.clone()));
        a.heartbeat_seq = seq;
        s.amphorae.insert(a);
        let sign = |b: &Heartbeat| heartbeat::seal(&heartbeat::key(k.secret()), 2, b);
        // A fresh controller: the stored number holds.
        let mut gate = Gate::new(None, Duration::from_secs(30), now, HashMap::new());
        let old = sign(&beat("a1", seq, now - Duration::from_secs(3)));
        assert!(matches!(
            gate.check(&s, &old, now),
            Err(Refusal::Format(HeartbeatError::Replayed { .. }))
        ));
        // Taken after the last store, but sent before the start: refused.
        let unstored = sign(&beat("a1", seq + 1, now - Duration::from_secs(3)));
        assert!(matches!(
            gate.check(&s, &unstored, now),
            Err(Refusal::BeforeStart)
        ));
        assert!(gate
            .check(&s, &sign(&beat("a1", seq + 2, now)), now)
            .is_ok());
    }

    /// Rotates `id` in `s` as the API does.
    fn rotate(s: &mut State, id: &str, grace: Duration) -> u32 {
        let mut tx = crate::store::Tx::default();
        let key_id = crate::keys_push::rotate(s, &mut tx, id, grace).unwrap();
        crate::store::apply(s, tx.ops().to_vec());
        key_id
    }

    #[test]
    fn rotations_faster_than_the_agent_takes_them_leave_its_key_taken() {
        let now = SystemTime::now();
        let seq = (millis(now) * 1_000) as u64;
        let held = generate(1).unwrap();
        let mut s = State::default();
        let mut a = amphora("a1", Some(held.clone()));
        a.heartbeat_key_acked = true;
        s.amphorae.insert(a);
        let boot = b"a bootstrap key of the fleet".to_vec();
        let mut gate = Gate::new(
            Some(boot.clone()),
            Duration::from_secs(30),
            now - Duration::from_secs(5),
            HashMap::new(),
        );
        let grace = Duration::from_secs(60);
        // Three rotations before the agent took any: it still signs with
        // key 1, which is taken; so would it with 2 or 3 had one of those
        // pushes landed.
        assert_eq!(rotate(&mut s, "a1", grace), 2);
        let two = s.amphorae["a1"].heartbeat_key.clone().unwrap();
        assert_eq!(rotate(&mut s, "a1", grace), 3);
        let three = s.amphorae["a1"].heartbeat_key.clone().unwrap();
        assert_eq!(rotate(&mut s, "a1", grace), 4);
        let four = s.amphorae["a1"].heartbeat_key.clone().unwrap();
        for (i, k) in [&held, &two, &three, &four].into_iter().enumerate() {
            let b = heartbeat::seal(
                &heartbeat::key(k.secret()),
                k.key_id,
                &beat("a1", seq + i as u64, now),
            );
            assert_eq!(gate.check(&s, &b, now).unwrap().1, k.key_id);
        }
        // While it takes the new key, the bootstrap key still does not
        // speak for it.
        assert!(!s.amphorae["a1"].heartbeat_key_acked);
        let boot_signed = heartbeat::seal(&heartbeat::key(&boot), 0, &beat("a1", seq + 9, now));
        assert!(matches!(
            gate.check(&s, &boot_signed, now),
            Err(Refusal::Bootstrap(_))
        ));
        // Past their grace, the retired keys are refused; and no more than
        // MAX_OLDER_KEYS are ever kept.
        let later = now + Duration::from_secs(61);
        let b = heartbeat::seal(
            &heartbeat::key(held.secret()),
            1,
            &beat("a1", seq + 10, later),
        );
        assert!(matches!(
            gate.check(&s, &b, later),
            Err(Refusal::WrongKey { .. })
        ));
        for _ in 0..20 {
            rotate(&mut s, "a1", grace);
        }
        assert_eq!(
            s.amphorae["a1"].older_heartbeat_keys.len(),
            crate::model::MAX_OLDER_KEYS
        );
        // An amphora whose agent never held a key of its own is still
        // spoken for by the bootstrap key after a rotation.
        s.amphorae.insert(amphora("a2", Some(generate(1).unwrap())));
        rotate(&mut s, "a2", grace);
        let boot_signed = heartbeat::seal(&heartbeat::key(&boot), 0, &beat("a2", seq, now));
        assert!(gate.check(&s, &boot_signed, now).is_ok());
    }

    #[test]
    fn the_previous_key_holds_for_its_grace_window() {
        let now = SystemTime::now();
        let seq = (millis(now) * 1_000) as u64;
        let old = generate(1).unwrap();
        let new = generate(2).unwrap();
        let mut s = State::default();
        let mut a = amphora("a1", Some(new));
        a.previous_heartbeat_key = Some(old.clone());
        a.previous_key_valid_until = Some(crate::stamp(now + Duration::from_secs(60)));
        s.amphorae.insert(a);
        let mut gate = Gate::new(None, Duration::from_secs(30), now, HashMap::new());
        let b = heartbeat::seal(&heartbeat::key(old.secret()), 1, &beat("a1", seq, now));
        assert!(gate.check(&s, &b, now).is_ok());
        let later = now + Duration::from_secs(61);
        let b = heartbeat::seal(
            &heartbeat::key(old.secret()),
            1,
            &beat("a1", seq + 1, later),
        );
        assert!(matches!(
            gate.check(&s, &b, later),
            Err(Refusal::WrongKey { .. })
        ));
    }
}
