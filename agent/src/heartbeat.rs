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
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"SPHB";
pub const VERSION: u8 = 2;
/// The key id of the fleet's shared bootstrap key; pushed keys use 1 and up.
pub const BOOTSTRAP_KEY_ID: u32 = 0;
/// Magic, version, id length, two reserved bytes, key id.
const HEADER: usize = 12;
const MAC: usize = 32;
/// Largest datagram sent: what fits a UDP datagram over IPv4 and IPv6.
pub const MAX_DATAGRAM: usize = 65_000;
/// Most VIPs a heartbeat lists; room for them is kept in every datagram.
pub const MAX_VIPS: usize = 64;
/// The longest VIP as listed (`ffff:…:255.255.255.255/128`).
const MAX_VIP_LEN: usize = 49;
/// Room kept for `"vips":[...]` with [`MAX_VIPS`] of the longest: quotes
/// and a comma each, plus the key, and the persisted generation set after
/// [`from_dataplane`] (a few bytes: 64 are kept).
const RESERVED: usize = MAX_VIPS * (MAX_VIP_LEN + 3) + 16 + 64;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerBeat {
    pub id: String,
    pub operating_status: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberBeat {
    pub pool_id: String,
    pub id: String,
    pub operating_status: String,
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
}

/// The key heartbeats are signed with now, shared between the API (which
/// replaces it when the controller pushes one) and the sender.
#[derive(Debug, Clone, Default)]
pub struct Keys(Arc<RwLock<Option<SigningKey>>>);

impl Keys {
    pub fn new(current: Option<SigningKey>) -> Keys {
        Keys(Arc::new(RwLock::new(current)))
    }

    pub fn current(&self) -> Option<SigningKey> {
        self.0
            .read()
            .map_or_else(|e| e.into_inner().clone(), |k| k.clone())
    }

    pub fn key_id(&self) -> Option<u32> {
        self.current().map(|k| k.key_id)
    }

    pub fn replace(&self, key: SigningKey) {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(key);
    }
}

/// Builds the payload from the dataplane's status and stats (JSON as the
/// dataplane API returns them), fitting it into one datagram.
pub fn from_dataplane(
    amphora_id: &str,
    seq: u64,
    now: SystemTime,
    status: Option<&serde_json::Value>,
    stats: Option<&serde_json::Value>,
) -> Heartbeat {
    let sent_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut beat = Heartbeat {
        amphora_id: amphora_id.to_owned(),
        seq,
        sent_ms,
        generation: status.and_then(|s| s["generation"].as_u64()),
        persisted_generation: None,
        listeners: Vec::new(),
        members: Vec::new(),
        truncated: false,
        vips: None,
    };
    let Some(status) = status else {
        return beat;
    };
    let empty = Vec::new();
    let counters = stats
        .and_then(|s| s["listeners"].as_array())
        .unwrap_or(&empty);
    for l in status["listeners"].as_array().unwrap_or(&empty) {
        let id = l["id"].as_str().unwrap_or_default();
        let c = counters.iter().find(|c| c["id"].as_str() == Some(id));
        let n = |field: &str| c.and_then(|c| c[field].as_u64()).unwrap_or(0);
        beat.listeners.push(ListenerBeat {
            id: id.to_owned(),
            operating_status: l["operating_status"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            active_connections: n("active_connections"),
            total_connections: n("total_connections"),
            bytes_in: n("bytes_in"),
            bytes_out: n("bytes_out"),
        });
    }
    for p in status["pools"].as_array().unwrap_or(&empty) {
        for m in p["members"].as_array().unwrap_or(&empty) {
            beat.members.push(MemberBeat {
                pool_id: p["id"].as_str().unwrap_or_default().to_owned(),
                id: m["id"].as_str().unwrap_or_default().to_owned(),
                operating_status: m["operating_status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            });
        }
    }
    // Members first, then listeners, go when the datagram would not fit.
    // (Room is kept for what is set later: the persisted generation and
    // the VIPs, see `set_vips`.)
    let size = |b: &Heartbeat| {
        serde_json::to_vec(b).map_or(0, |v| v.len()) + HEADER + amphora_id.len() + MAC + RESERVED
    };
    if size(&beat) > MAX_DATAGRAM {
        beat.members.clear();
        beat.truncated = true;
    }
    if size(&beat) > MAX_DATAGRAM {
        beat.listeners.clear();
    }
    beat
}

/// Sets the VIPs the agent holds on a payload from [`from_dataplane`]:
/// at most [`MAX_VIPS`] (then `truncated`), any longer than a VIP can be
/// left out (then `truncated` too), so they always fit the room kept.
pub fn set_vips(beat: &mut Heartbeat, vips: Option<Vec<String>>) {
    beat.vips = vips.map(|mut v| {
        let n = v.len();
        // What JSON would escape is not an address either.
        v.retain(|a| {
            a.len() <= MAX_VIP_LEN
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":./".contains(&b))
        });
        if v.len() > MAX_VIPS || v.len() != n {
            v.truncate(MAX_VIPS);
            beat.truncated = true;
        }
        v
    });
}

/// What the sender needs.
#[derive(Debug, Clone)]
pub struct Sender {
    pub amphora_id: String,
    /// The dataplane's control socket (status and stats).
    pub dataplane: std::path::PathBuf,
    pub destinations: Vec<SocketAddr>,
    pub interval: Duration,
    /// The key to sign with, read at each heartbeat.
    pub keys: Keys,
    /// The generation of the persisted config.
    pub persisted: tokio::sync::watch::Receiver<Option<u64>>,
    /// The agent's VIPs, listed in every heartbeat as present on their
    /// interface (`None`: none are listed).
    pub vips: Option<Arc<crate::vips::Vips>>,
}

/// How long a heartbeat waits for the address dump before it goes without
/// VIPs (`vips: None`).
const DUMP_TIMEOUT: Duration = Duration::from_millis(500);

/// A netlink connection kept across heartbeats (remade after a failure).
#[derive(Default)]
struct Netlink(Option<(rtnetlink::Handle, tokio::task::JoinHandle<()>)>);

impl Netlink {
    /// The VIPs `vips` holds now, or `None` when netlink did not say
    /// within `limit`.
    async fn held(&mut self, vips: &crate::vips::Vips, limit: Duration) -> Option<Vec<String>> {
        if self.0.is_none() {
            match rtnetlink::new_connection() {
                Ok((conn, handle, _)) => self.0 = Some((handle, tokio::spawn(conn))),
                Err(e) => {
                    tracing::debug!(error = %e, "no netlink socket: heartbeat without VIPs");
                    return None;
                }
            }
        }
        let (handle, _) = self.0.as_ref()?;
        match tokio::time::timeout(limit, vips.held(handle)).await {
            Ok(Ok(held)) => Some(held),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "address dump failed: heartbeat without VIPs");
                self.close();
                None
            }
            Err(_) => {
                tracing::debug!("address dump timed out: heartbeat without VIPs");
                self.close();
                None
            }
        }
    }

    fn close(&mut self) {
        if let Some((_, driver)) = self.0.take() {
            driver.abort();
        }
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sends heartbeats until `stop` says so. With no key yet, sends nothing
/// (and says so once) until one is pushed.
pub async fn run(sender: Sender, mut stop: tokio::sync::watch::Receiver<bool>) {
    use hyper::Method;
    use siphon_dataplane::api::client::request_async;
    let v4 = tokio::net::UdpSocket::bind("0.0.0.0:0").await;
    let v6 = tokio::net::UdpSocket::bind("[::]:0").await;
    let mut seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut ticks = tokio::time::interval(sender.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keyless_noted = false;
    let mut netlink = Netlink::default();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
        }
        let Some(signing) = sender.keys.current() else {
            if !keyless_noted {
                tracing::warn!(
                    "no heartbeat key (no heartbeat.key_file and none pushed): \
                     no heartbeats are sent until the controller pushes one"
                );
                keyless_noted = true;
            }
            continue;
        };
        if keyless_noted {
            tracing::info!(
                key_id = signing.key_id,
                "heartbeat key pushed: sending heartbeats"
            );
            keyless_noted = false;
        }
        let get = |path: &'static str| {
            let dataplane = sender.dataplane.clone();
            async move {
                let r = request_async(&dataplane, Method::GET, path, None)
                    .await
                    .ok()?;
                serde_json::from_str::<serde_json::Value>(&r.body).ok()
            }
        };
        let limit = DUMP_TIMEOUT.min(sender.interval);
        let held = async {
            match &sender.vips {
                Some(v) => netlink.held(v, limit).await,
                None => None,
            }
        };
        let (status, stats, held) = tokio::join!(get("/v1/status"), get("/v1/stats"), held);
        seq += 1;
        let mut beat = from_dataplane(
            &sender.amphora_id,
            seq,
            SystemTime::now(),
            status.as_ref(),
            stats.as_ref(),
        );
        beat.persisted_generation = *sender.persisted.borrow();
        set_vips(&mut beat, held);
        let datagram = seal(&signing.key, signing.key_id, &beat);
        for d in &sender.destinations {
            let sock = if d.is_ipv6() { &v6 } else { &v4 };
            match sock {
                Ok(s) => {
                    if let Err(e) = s.send_to(&datagram, d).await {
                        tracing::debug!(destination = %d, error = %e, "heartbeat not sent");
                    }
                }
                Err(e) => tracing::debug!(destination = %d, error = %e, "no socket for heartbeats"),
            }
        }
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

    #[test]
    fn big_status_is_cut_to_fit_one_datagram() {
        let members: Vec<serde_json::Value> = (0..5000)
            .map(|i| serde_json::json!({"id": format!("member-{i:05}"), "operating_status": "ONLINE"}))
            .collect();
        let status = serde_json::json!({"generation": 7, "listeners": [{"id": "l", "operating_status": "ONLINE"}],
                                        "pools": [{"id": "p", "members": members}]});
        let mut b = from_dataplane("amp", 1, SystemTime::now(), Some(&status), None);
        assert!(b.truncated);
        assert!(b.members.is_empty());
        assert_eq!(b.listeners.len(), 1);
        b.persisted_generation = Some(u64::MAX);
        set_vips(&mut b, Some(longest_vips(MAX_VIPS)));
        assert!(seal(&key(b"k"), u32::MAX, &b).len() <= MAX_DATAGRAM);
    }

    /// `n` VIPs of the longest form.
    fn longest_vips(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "ffff:ffff:ffff:ffff:ffff:ffff:255.255.{:03}.{:03}/128",
                    i / 256,
                    i % 256
                )
            })
            .collect()
    }

    #[test]
    fn vips_never_make_a_datagram_too_big() {
        assert_eq!(longest_vips(1)[0].len(), MAX_VIP_LEN);
        // Statuses that fill the datagram right up to the room kept, with
        // the longest id, generation and key id, then the most VIPs.
        let id = "a".repeat(255);
        let mut cut = 0;
        for n in (850..1000).step_by(3) {
            let members: Vec<serde_json::Value> = (0..n)
                .map(|i| serde_json::json!({"id": format!("member-{i:05}"), "operating_status": "ONLINE"}))
                .collect();
            let status = serde_json::json!({"generation": u64::MAX, "listeners": [{"id": "l", "operating_status": "ONLINE"}],
                                            "pools": [{"id": "p", "members": members}]});
            let mut b = from_dataplane(&id, u64::MAX, SystemTime::now(), Some(&status), None);
            cut += usize::from(b.truncated);
            b.persisted_generation = Some(u64::MAX);
            set_vips(&mut b, Some(longest_vips(MAX_VIPS + 5)));
            assert!(b.truncated);
            assert_eq!(b.vips.as_ref().unwrap().len(), MAX_VIPS);
            let d = seal(&key(b"k"), u32::MAX, &b);
            assert!(d.len() <= MAX_DATAGRAM, "{n} members: {} bytes", d.len());
        }
        // Some of those fitted whole, some were cut: the edge was crossed.
        assert!(cut > 0 && cut < 50, "{cut}");
        // A short list is kept whole and does not set `truncated`; none
        // said stays none, and is left out of the JSON (older controllers).
        let mut b = beat(1, 1);
        set_vips(
            &mut b,
            Some(vec!["198.18.0.7/32".into(), "2001:db8::7/128".into()]),
        );
        assert!(!b.truncated);
        assert_eq!(b.vips.as_ref().unwrap().len(), 2);
        // Anything that is not an address is left out, and says so.
        set_vips(&mut b, Some(vec!["198.18.0.7/32".into(), "\"x\"".into()]));
        assert!(b.truncated);
        assert_eq!(b.vips, Some(vec!["198.18.0.7/32".to_owned()]));
        let mut b = beat(1, 1);
        set_vips(&mut b, None);
        assert!(!serde_json::to_string(&b).unwrap().contains("vips"));
        let back: Heartbeat = serde_json::from_slice(&serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(back.vips, None);
    }
}
