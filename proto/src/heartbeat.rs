//! Heartbeats: a signed UDP datagram to every health manager, every
//! interval, saying this amphora is alive and what it runs.
//!
//! Wire format, version 2 (all integers big-endian):
//!
//! ```text
//! 0      4       5        6          8          12           12+n        44+n
//! | SPHB | ver=2 | id_len | 0 0      | key_id   | amphora id | HMAC-SHA256 | payload (JSON) |
//! |  4   |   1   | n (1)  | reserved | u32 (4)  | n bytes    | 32 bytes    |                |
//! ```
//!
//! `id_len` is 1..=255 and the id is UTF-8. The MAC covers every byte
//! before it (the 12-byte fixed header and the id), then the payload. The
//! payload is a [`Heartbeat`] in JSON whose `amphora_id` must equal the
//! header's id. `key_id` names the key: [`BOOTSTRAP_KEY_ID`] (0) is the
//! fleet's shared bootstrap key, used until the controller pushes the
//! amphora a key of its own (`PUT /v1/heartbeat-key`, key ids from 1).
//!
//! A receiver first reads the [`envelope`] (shape only: length, magic,
//! version, id length, UTF-8 id; no JSON), picks the key that amphora and
//! key id should use, then [`open`]s the datagram (MAC in constant time,
//! JSON, id match). It then checks age (`sent_ms` within its window either
//! way) and that `seq` is newer than the last one accepted from that
//! amphora (replays and reordered old datagrams are dropped). [`Verifier`]
//! does all of it with one key whatever the key id.
//!
//! `seq` starts at the agent's start time in microseconds since the Unix
//! epoch and counts up by one per heartbeat, so it keeps growing across
//! agent restarts without state on disk.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::status::OperatingStatus;

pub const MAGIC: &[u8; 4] = b"SPHB";
pub const VERSION: u8 = 2;
/// The key id of the fleet's shared bootstrap key; pushed keys use 1 and up.
pub const BOOTSTRAP_KEY_ID: u32 = 0;
/// Magic, version, id length, two reserved bytes, key id.
pub const HEADER: usize = 12;
pub const MAC: usize = 32;
/// Largest datagram sent: what fits a UDP datagram over IPv4 and IPv6.
pub const MAX_DATAGRAM: usize = 65_000;
/// Most VIPs a heartbeat lists; room for them is kept in every datagram.
pub const MAX_VIPS: usize = 64;
/// The longest VIP as listed (`ffff:…:255.255.255.255/128`).
pub const MAX_VIP_LEN: usize = 49;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub amphora_id: String,
    pub seq: u64,
    /// Milliseconds since the Unix epoch when it was sent.
    pub sent_ms: u64,
    /// The generation the dataplane runs; `None` when it did not answer.
    pub generation: Option<u64>,
    /// The generation of the config the agent has persisted on disk;
    /// `None` when it has none.
    #[serde(default)]
    pub persisted_generation: Option<u64>,
    #[serde(default)]
    pub listeners: Vec<ListenerBeat>,
    #[serde(default)]
    pub members: Vec<MemberBeat>,
    /// Details were left out to fit the datagram.
    #[serde(default)]
    pub truncated: bool,
    /// The VIPs the agent holds: of those the controller asked it to add
    /// (the ones it added, kept in `vips.json`, and the ones it found
    /// there already), those on their interface now (`address/prefix`).
    /// `None`: not said (an older agent, or the address dump failed).
    /// At most [`MAX_VIPS`]; a longer list is cut and `truncated` set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vips: Option<Vec<String>>,
    /// Its BGP sessions and the VIPs it announces, on an amphora that
    /// announces over BGP; `None` elsewhere. At most
    /// [`crate::bgp::MAX_PEERS`] sessions and [`MAX_VIPS`] VIPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::bgp::BgpStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerBeat {
    pub id: String,
    pub operating_status: OperatingStatus,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberBeat {
    pub pool_id: String,
    pub id: String,
    pub operating_status: OperatingStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeartbeatError {
    #[error("{0} bytes is too short for a heartbeat")]
    Short(usize),
    #[error("not a heartbeat (bad magic)")]
    BadMagic,
    #[error("unsupported heartbeat version {0}")]
    UnsupportedVersion(u8),
    #[error("MAC does not verify (forged, corrupted, or another key)")]
    BadMac,
    #[error("malformed heartbeat: {0}")]
    Malformed(String),
    #[error("sent {age_ms} ms away from now, outside the {window_ms} ms window")]
    Stale { age_ms: i128, window_ms: u128 },
    #[error("sequence {seq} from {amphora} is not newer than {last}: replayed or reordered")]
    Replayed {
        amphora: String,
        seq: u64,
        last: u64,
    },
}

/// Serialises and signs a heartbeat with `key`, naming it `key_id`.
///
/// An `amphora_id` that is empty or longer than 255 bytes cannot be
/// framed: the datagram then carries id length 0, which every receiver
/// refuses (the agent's config refuses such ids up front).
pub fn seal(key: &hmac::Key, key_id: u32, beat: &Heartbeat) -> Vec<u8> {
    let payload = serde_json::to_vec(beat).unwrap_or_default();
    let id = beat.amphora_id.as_bytes();
    let (n, id) = match u8::try_from(id.len()) {
        Ok(n) => (n, id),
        Err(_) => (0, &[][..]),
    };
    let mut out = Vec::with_capacity(HEADER + id.len() + MAC + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, n, 0, 0]);
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(id);
    let tag = mac(key, &out, &payload);
    out.extend_from_slice(tag.as_ref());
    out.extend_from_slice(&payload);
    out
}

fn mac(key: &hmac::Key, signed_header: &[u8], payload: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(signed_header);
    ctx.update(payload);
    ctx.sign()
}

/// What a datagram says of itself, read without verifying anything but its
/// shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub amphora_id: &'a str,
    pub key_id: u32,
}

/// The datagram's parts, once its shape is checked.
struct Parts<'a> {
    envelope: Envelope<'a>,
    /// Header and id: what the MAC covers before the payload.
    signed_header: &'a [u8],
    tag: &'a [u8],
    payload: &'a [u8],
}

fn parts(datagram: &[u8]) -> Result<Parts<'_>, HeartbeatError> {
    if datagram.len() < HEADER {
        return Err(HeartbeatError::Short(datagram.len()));
    }
    if &datagram[..4] != MAGIC {
        return Err(HeartbeatError::BadMagic);
    }
    if datagram[4] != VERSION {
        return Err(HeartbeatError::UnsupportedVersion(datagram[4]));
    }
    let n = usize::from(datagram[5]);
    if n == 0 {
        return Err(HeartbeatError::Malformed("empty amphora id".into()));
    }
    if datagram[6..8] != [0, 0] {
        return Err(HeartbeatError::Malformed(
            "reserved header bytes are not zero".into(),
        ));
    }
    if datagram.len() < HEADER + n + MAC {
        return Err(HeartbeatError::Short(datagram.len()));
    }
    let key_id = u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
    let (signed_header, rest) = datagram.split_at(HEADER + n);
    let amphora_id = std::str::from_utf8(&signed_header[HEADER..])
        .map_err(|_| HeartbeatError::Malformed("amphora id is not UTF-8".into()))?;
    let (tag, payload) = rest.split_at(MAC);
    Ok(Parts {
        envelope: Envelope { amphora_id, key_id },
        signed_header,
        tag,
        payload,
    })
}

/// Reads who a datagram claims to be from and which key it claims to be
/// signed with: length, magic, version, id length and UTF-8 id are
/// checked; nothing is verified and no JSON is parsed.
pub fn envelope(datagram: &[u8]) -> Result<Envelope<'_>, HeartbeatError> {
    parts(datagram).map(|p| p.envelope)
}

/// Verifies a datagram with `key`: its shape, the MAC (constant time),
/// the JSON payload, and that the payload's `amphora_id` is the header's.
/// Age and sequence are the receiver's to check.
pub fn open(datagram: &[u8], key: &hmac::Key) -> Result<Heartbeat, HeartbeatError> {
    let p = parts(datagram)?;
    let mut signed = Vec::with_capacity(p.signed_header.len() + p.payload.len());
    signed.extend_from_slice(p.signed_header);
    signed.extend_from_slice(p.payload);
    hmac::verify(key, &signed, p.tag).map_err(|_| HeartbeatError::BadMac)?;
    let beat: Heartbeat = serde_json::from_slice(p.payload)
        .map_err(|e| HeartbeatError::Malformed(format!("payload: {e}")))?;
    if beat.amphora_id != p.envelope.amphora_id {
        return Err(HeartbeatError::Malformed(format!(
            "payload amphora_id {:?} is not the header's {:?}",
            beat.amphora_id, p.envelope.amphora_id
        )));
    }
    Ok(beat)
}

/// The HMAC key from the shared secret's bytes.
pub fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// Checks heartbeats signed with one key (whatever key id they carry) and
/// remembers the last sequence per amphora.
#[derive(Debug)]
pub struct Verifier {
    key: hmac::Key,
    window: Duration,
    last: HashMap<String, u64>,
}

impl Verifier {
    /// `window`: how far `sent_ms` may be from the receiver's clock.
    pub fn new(secret: &[u8], window: Duration) -> Verifier {
        Verifier {
            key: key(secret),
            window,
            last: HashMap::new(),
        }
    }

    /// Verifies one datagram received at `now`.
    pub fn verify(
        &mut self,
        datagram: &[u8],
        now: SystemTime,
    ) -> Result<Heartbeat, HeartbeatError> {
        let beat = open(datagram, &self.key)?;
        let now_ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) as i128;
        let age_ms = now_ms - i128::from(beat.sent_ms);
        if age_ms.unsigned_abs() > self.window.as_millis() {
            return Err(HeartbeatError::Stale {
                age_ms,
                window_ms: self.window.as_millis(),
            });
        }
        if let Some(&last) = self.last.get(&beat.amphora_id) {
            if beat.seq <= last {
                return Err(HeartbeatError::Replayed {
                    amphora: beat.amphora_id.clone(),
                    seq: beat.seq,
                    last,
                });
            }
        }
        self.last.insert(beat.amphora_id.clone(), beat.seq);
        Ok(beat)
    }
}

/// A key the sender signs with, and its id.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub key_id: u32,
    key: hmac::Key,
}

impl SigningKey {
    pub fn new(key_id: u32, secret: &[u8]) -> SigningKey {
        SigningKey {
            key_id,
            key: key(secret),
        }
    }

    /// [`seal`]s `beat` with this key, naming its id.
    pub fn seal(&self, beat: &Heartbeat) -> Vec<u8> {
        seal(&self.key, self.key_id, beat)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    fn beat(seq: u64, sent_ms: u64) -> Heartbeat {
        Heartbeat {
            amphora_id: "amp".into(),
            seq,
            sent_ms,
            generation: Some(3),
            persisted_generation: Some(3),
            listeners: vec![],
            members: vec![],
            truncated: false,
            vips: Some(vec!["198.18.0.7/32".into()]),
            bgp: None,
        }
    }

    fn now_ms(now: SystemTime) -> u64 {
        now.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
    }

    #[test]
    fn the_layout_is_as_documented() {
        let k = key(b"a key of sixteen bytes or more");
        let b = beat(1, 2);
        let d = seal(&k, 0x0102_0304, &b);
        assert_eq!(&d[..4], b"SPHB");
        assert_eq!(d[4], 2);
        assert_eq!(d[5], 3);
        assert_eq!(&d[6..8], &[0, 0]);
        assert_eq!(&d[8..12], &[1, 2, 3, 4]);
        assert_eq!(&d[12..15], b"amp");
        let payload = &d[15 + 32..];
        assert_eq!(serde_json::from_slice::<Heartbeat>(payload).unwrap(), b);
        // The MAC: header and id, then the payload.
        let mut signed = d[..15].to_vec();
        signed.extend_from_slice(payload);
        assert_eq!(hmac::sign(&k, &signed).as_ref(), &d[15..47]);
    }

    #[test]
    fn seal_envelope_open_round_trip() {
        let k = key(b"per-amphora key, 32 bytes long..");
        let b = beat(7, 1234);
        let d = seal(&k, 42, &b);
        assert_eq!(
            envelope(&d).unwrap(),
            Envelope {
                amphora_id: "amp",
                key_id: 42
            }
        );
        assert_eq!(open(&d, &k).unwrap(), b);
        // The bootstrap key id too.
        let d = seal(&k, BOOTSTRAP_KEY_ID, &b);
        assert_eq!(envelope(&d).unwrap().key_id, 0);
        assert_eq!(open(&d, &k).unwrap(), b);
        // A payload without persisted_generation (an older agent) reads as None.
        let mut old = serde_json::to_value(&b).unwrap();
        old.as_object_mut().unwrap().remove("persisted_generation");
        old.as_object_mut().unwrap().remove("vips");
        let old: Heartbeat = serde_json::from_value(old).unwrap();
        assert_eq!(old.persisted_generation, None);
        // Nor VIPs: not said.
        assert_eq!(old.vips, None);
    }

    #[test]
    fn wrong_key_tampered_id_and_mismatched_ids_are_refused() {
        let k = key(b"per-amphora key, 32 bytes long..");
        let d = seal(&k, 5, &beat(1, 1));
        assert_eq!(
            open(&d, &key(b"another key entirely")),
            Err(HeartbeatError::BadMac)
        );
        // The header's id changed (same length): the MAC covers it.
        let mut other = d.clone();
        other[12] = b'b';
        assert_eq!(envelope(&other).unwrap().amphora_id, "bmp");
        assert_eq!(open(&other, &k), Err(HeartbeatError::BadMac));
        // The key id changed: covered too.
        let mut other = d.clone();
        other[11] = 6;
        assert_eq!(open(&other, &k), Err(HeartbeatError::BadMac));
        // Correctly signed, but the payload speaks for another amphora.
        let mut lie = beat(1, 1);
        lie.amphora_id = "bmp".into();
        let payload = serde_json::to_vec(&lie).unwrap();
        let mut forged = d[..15].to_vec();
        let tag = mac(&k, &forged, &payload);
        forged.extend_from_slice(tag.as_ref());
        forged.extend_from_slice(&payload);
        assert!(
            matches!(open(&forged, &k), Err(HeartbeatError::Malformed(m)) if m.contains("not the header's")),
        );
    }

    #[test]
    fn envelopes_check_shape_only() {
        let k = key(b"k");
        let d = seal(&k, 9, &beat(1, 1));
        assert_eq!(envelope(&d[..11]), Err(HeartbeatError::Short(11)));
        // Header and id but no room for the MAC.
        assert_eq!(envelope(&d[..40]), Err(HeartbeatError::Short(40)));
        let mut bad = d.clone();
        bad[0] = b'X';
        assert_eq!(envelope(&bad), Err(HeartbeatError::BadMagic));
        let mut bad = d.clone();
        bad[4] = 1;
        assert_eq!(envelope(&bad), Err(HeartbeatError::UnsupportedVersion(1)));
        let mut bad = d.clone();
        bad[5] = 0;
        assert!(matches!(envelope(&bad), Err(HeartbeatError::Malformed(_))));
        let mut bad = d.clone();
        bad[7] = 1;
        assert!(matches!(envelope(&bad), Err(HeartbeatError::Malformed(_))));
        let mut bad = d.clone();
        bad[12] = 0xff;
        assert!(matches!(envelope(&bad), Err(HeartbeatError::Malformed(_))));
        // Garbage after a good envelope is the MAC's business, not the
        // envelope's.
        let mut bad = d.clone();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        assert!(envelope(&bad).is_ok());
        // An id that cannot be framed gives a datagram nobody accepts.
        let mut long = beat(1, 1);
        long.amphora_id = "x".repeat(256);
        assert!(envelope(&seal(&k, 1, &long)).is_err());
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let k = key(b"per-amphora key, 32 bytes long..");
        let d = seal(&k, 3, &beat(11, 1));
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut bad = d.clone();
                bad[i] ^= 1 << bit;
                assert!(open(&bad, &k).is_err(), "flip of bit {bit} at byte {i}");
            }
        }
    }

    #[test]
    fn the_verifier_checks_age_and_sequence_whatever_the_key_id() {
        let now = SystemTime::now();
        let ms = now_ms(now);
        let k = key(b"secret");
        let d = seal(&k, 0, &beat(10, ms));
        let mut v = Verifier::new(b"secret", Duration::from_secs(10));
        assert_eq!(v.verify(&d, now).unwrap().seq, 10);
        // Replay, and an older sequence (under another key id).
        assert!(matches!(
            v.verify(&d, now),
            Err(HeartbeatError::Replayed { .. })
        ));
        assert!(matches!(
            v.verify(&seal(&k, 7, &beat(9, ms)), now),
            Err(HeartbeatError::Replayed { .. })
        ));
        let d = seal(&k, 7, &beat(11, ms));
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 1;
            assert!(v.verify(&bad, now).is_err(), "flip at byte {i}");
        }
        let mut other = Verifier::new(b"other", Duration::from_secs(10));
        assert_eq!(other.verify(&d, now), Err(HeartbeatError::BadMac));
        // Too old, and too far in the future.
        let later = now + Duration::from_secs(60);
        assert!(matches!(
            v.verify(&d, later),
            Err(HeartbeatError::Stale { .. })
        ));
        let earlier = now - Duration::from_secs(60);
        assert!(matches!(
            v.verify(&d, earlier),
            Err(HeartbeatError::Stale { .. })
        ));
        assert_eq!(v.verify(&d, now).unwrap().seq, 11);
        assert_eq!(v.verify(&d[..20], now), Err(HeartbeatError::Short(20)));
    }
}
