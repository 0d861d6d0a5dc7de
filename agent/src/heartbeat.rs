//! Heartbeats: a signed UDP datagram to every health manager, every
//! interval, saying this amphora is alive and what it runs.
//!
//! Wire format, version 1 (all integers big-endian):
//!
//! ```text
//! 0      4        5          8                     40
//! | SPHB | ver=1  | 0 0 0    | HMAC-SHA256 (32 B)   | payload (JSON) |
//! ```
//!
//! The MAC covers the 8 header bytes and the payload, keyed with the
//! shared key. The payload is a [`Heartbeat`] in JSON. A receiver checks,
//! in order: length and magic, version, MAC (constant time), JSON shape,
//! age (`sent_ms` within the window either way), and that `seq` is newer
//! than the last one accepted from that amphora (replays and reordered old
//! datagrams are dropped). [`Verifier`] does all of it; the control plane
//! uses it as is.
//!
//! `seq` starts at the agent's start time in microseconds since the Unix
//! epoch and counts up by one per heartbeat, so it keeps growing across
//! agent restarts without state on disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"SPHB";
pub const VERSION: u8 = 1;
const HEADER: usize = 8;
const MAC: usize = 32;
/// Largest datagram sent: what fits a UDP datagram over IPv4 and IPv6.
pub const MAX_DATAGRAM: usize = 65_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub amphora_id: String,
    pub seq: u64,
    /// Milliseconds since the Unix epoch when it was sent.
    pub sent_ms: u64,
    /// The generation the dataplane runs; `None` when it did not answer.
    pub generation: Option<u64>,
    #[serde(default)]
    pub listeners: Vec<ListenerBeat>,
    #[serde(default)]
    pub members: Vec<MemberBeat>,
    /// Details were left out to fit the datagram.
    #[serde(default)]
    pub truncated: bool,
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
    #[error("malformed payload: {0}")]
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

/// Serialises and signs a heartbeat.
pub fn seal(key: &hmac::Key, beat: &Heartbeat) -> Vec<u8> {
    let payload = serde_json::to_vec(beat).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + MAC + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    let tag = mac(key, &out[..HEADER], &payload);
    out.extend_from_slice(tag.as_ref());
    out.extend_from_slice(&payload);
    out
}

fn mac(key: &hmac::Key, header: &[u8], payload: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(header);
    ctx.update(payload);
    ctx.sign()
}

/// The HMAC key from the shared secret's bytes.
pub fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// Checks heartbeats and remembers the last sequence per amphora.
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
        if datagram.len() < HEADER + MAC {
            return Err(HeartbeatError::Short(datagram.len()));
        }
        let (header, rest) = datagram.split_at(HEADER);
        if &header[..4] != MAGIC {
            return Err(HeartbeatError::BadMagic);
        }
        if header[4] != VERSION {
            return Err(HeartbeatError::UnsupportedVersion(header[4]));
        }
        let (tag, payload) = rest.split_at(MAC);
        let mut signed = Vec::with_capacity(HEADER + payload.len());
        signed.extend_from_slice(header);
        signed.extend_from_slice(payload);
        hmac::verify(&self.key, &signed, tag).map_err(|_| HeartbeatError::BadMac)?;
        let beat: Heartbeat = serde_json::from_slice(payload)
            .map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
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
        listeners: Vec::new(),
        members: Vec::new(),
        truncated: false,
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
    let size = |b: &Heartbeat| serde_json::to_vec(b).map_or(0, |v| v.len()) + HEADER + MAC;
    if size(&beat) > MAX_DATAGRAM {
        beat.members.clear();
        beat.truncated = true;
    }
    if size(&beat) > MAX_DATAGRAM {
        beat.listeners.clear();
    }
    beat
}

/// Sends heartbeats until `stop` says so.
pub async fn run(
    amphora_id: String,
    dataplane: std::path::PathBuf,
    destinations: Vec<SocketAddr>,
    interval: Duration,
    secret: Arc<[u8]>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper::Method;
    use siphon_dataplane::api::client::request_async;
    let key = key(&secret);
    let v4 = tokio::net::UdpSocket::bind("0.0.0.0:0").await;
    let v6 = tokio::net::UdpSocket::bind("[::]:0").await;
    let mut seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
        }
        let get = |path: &'static str| {
            let dataplane = dataplane.clone();
            async move {
                let r = request_async(&dataplane, Method::GET, path, None)
                    .await
                    .ok()?;
                serde_json::from_str::<serde_json::Value>(&r.body).ok()
            }
        };
        let (status, stats) = tokio::join!(get("/v1/status"), get("/v1/stats"));
        seq += 1;
        let beat = from_dataplane(
            &amphora_id,
            seq,
            SystemTime::now(),
            status.as_ref(),
            stats.as_ref(),
        );
        let datagram = seal(&key, &beat);
        for d in &destinations {
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
    use super::*;

    fn beat(seq: u64, sent_ms: u64) -> Heartbeat {
        Heartbeat {
            amphora_id: "amp".into(),
            seq,
            sent_ms,
            generation: Some(3),
            listeners: vec![],
            members: vec![],
            truncated: false,
        }
    }

    #[test]
    fn sealed_heartbeats_verify_and_tampering_does_not() {
        let now = SystemTime::now();
        let ms = now.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let k = key(b"secret");
        let d = seal(&k, &beat(10, ms));
        let mut v = Verifier::new(b"secret", Duration::from_secs(10));
        assert_eq!(v.verify(&d, now).unwrap().seq, 10);
        // Replay, and an older sequence.
        assert!(matches!(
            v.verify(&d, now),
            Err(HeartbeatError::Replayed { .. })
        ));
        assert!(matches!(
            v.verify(&seal(&k, &beat(9, ms)), now),
            Err(HeartbeatError::Replayed { .. })
        ));
        // Every single-bit flip is caught.
        let d = seal(&k, &beat(11, ms));
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 1;
            assert!(v.verify(&bad, now).is_err(), "flip at byte {i}");
        }
        // Another key.
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
        let b = from_dataplane("amp", 1, SystemTime::now(), Some(&status), None);
        assert!(b.truncated);
        assert!(b.members.is_empty());
        assert_eq!(b.listeners.len(), 1);
        assert!(seal(&key(b"k"), &b).len() <= MAX_DATAGRAM);
    }
}
