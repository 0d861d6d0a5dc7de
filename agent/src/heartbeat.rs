//! Sending heartbeats: every interval, the dataplane's status and
//! stats, the persisted generation and the VIPs held, sealed with the
//! current key (`siphon_proto::heartbeat` holds the wire format, the
//! sealing and the verifying) and sent to every health manager.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use siphon_proto::heartbeat::*;
use siphon_proto::http::{self, Request, Target};
use siphon_proto::stats::{ListenerReport, StatsReport};
use siphon_proto::StatusReport;

/// Room kept for `"vips":[...]` with [`MAX_VIPS`] of the longest: quotes
/// and a comma each, plus the key, and the persisted generation set after
/// [`from_dataplane`] (a few bytes: 64 are kept).
const RESERVED: usize = MAX_VIPS * (MAX_VIP_LEN + 3) + 16 + 64 + BGP_ROOM;

/// Room kept for `"bgp":{...}`: the VIPs announced (as the VIPs), each
/// session (peer, state, BFD state: [`BGP_WORD`] each at most), and an
/// error of at most [`BGP_ERROR`] bytes.
const BGP_ROOM: usize = 64
    + MAX_VIPS * (MAX_VIP_LEN + 3)
    + siphon_proto::bgp::MAX_PEERS * (3 * (BGP_WORD + 12) + 8)
    + BGP_ERROR
    + 16;
const BGP_WORD: usize = 48;
const BGP_ERROR: usize = 300;

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

/// Builds the payload from the dataplane's status and stats, fitting it
/// into one datagram.
pub fn from_dataplane(
    amphora_id: &str,
    seq: u64,
    now: SystemTime,
    status: Option<&StatusReport>,
    stats: Option<&StatsReport>,
) -> Heartbeat {
    let sent_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut beat = Heartbeat {
        amphora_id: amphora_id.to_owned(),
        seq,
        sent_ms,
        generation: status.map(|s| s.generation),
        persisted_generation: None,
        listeners: Vec::new(),
        members: Vec::new(),
        truncated: false,
        vips: None,
        bgp: None,
    };
    let Some(status) = status else {
        return beat;
    };
    for l in &status.listeners {
        let c = stats.and_then(|s| s.listener(&l.id));
        let n = |f: fn(&ListenerReport) -> u64| c.map_or(0, f);
        beat.listeners.push(ListenerBeat {
            id: l.id.clone(),
            operating_status: l.operating_status,
            active_connections: n(|c| c.active_connections),
            total_connections: n(|c| c.total_connections),
            bytes_in: n(|c| c.bytes_in),
            bytes_out: n(|c| c.bytes_out),
        });
    }
    for p in &status.pools {
        for m in &p.members {
            beat.members.push(MemberBeat {
                pool_id: p.id.clone(),
                id: m.id.clone(),
                operating_status: m.operating_status,
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

/// Sets the BGP status on a payload, cut to fit the room kept for it:
/// words that JSON would escape or that are too long are left out (then
/// `truncated`), the error shortened.
pub fn set_bgp(beat: &mut Heartbeat, status: Option<siphon_proto::bgp::BgpStatus>) {
    let fits = |w: &str, max: usize| {
        w.len() <= max
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":./-_".contains(&b))
    };
    let plain = |w: &str| fits(w, BGP_WORD);
    beat.bgp = status.map(|mut s| {
        let (sessions, announced) = (s.sessions.len(), s.announced.len());
        s.sessions
            .retain(|x| plain(&x.peer) && plain(&x.state) && x.bfd.as_deref().is_none_or(plain));
        s.sessions.truncate(siphon_proto::bgp::MAX_PEERS);
        s.announced.retain(|a| fits(a, MAX_VIP_LEN));
        s.announced.truncate(MAX_VIPS);
        if s.sessions.len() != sessions || s.announced.len() != announced {
            beat.truncated = true;
        }
        if let Some(e) = &mut s.error {
            // A character is at most 4 bytes, escaped or not.
            let short: String = e
                .chars()
                .filter(|c| !c.is_control())
                .take(BGP_ERROR / 4)
                .collect();
            *e = short;
        }
        s
    });
}

/// What the sender needs.
#[derive(Debug, Clone)]
pub struct Sender {
    pub amphora_id: String,
    /// The dataplane's control socket (status and stats).
    pub dataplane: Target,
    pub destinations: Vec<SocketAddr>,
    pub interval: Duration,
    /// The key to sign with, read at each heartbeat.
    pub keys: Keys,
    /// The generation of the persisted config.
    pub persisted: tokio::sync::watch::Receiver<Option<u64>>,
    /// The agent's VIPs, listed in every heartbeat as present on their
    /// interface (`None`: none are listed).
    pub vips: Option<Arc<crate::vips::Vips>>,
    /// The BGP announcer's status, on an agent with `[bgp]`.
    pub bgp: Option<crate::bgp::Shared>,
}

/// How long a heartbeat waits for the address dump before it goes without
/// VIPs (`vips: None`).
const DUMP_TIMEOUT: Duration = Duration::from_millis(500);

/// A netlink connection kept across heartbeats (remade after a failure).
#[derive(Default)]
pub(crate) struct Netlink(Option<(rtnetlink::Handle, tokio::task::JoinHandle<()>)>);

impl Netlink {
    /// The VIPs `vips` holds now, or `None` when netlink did not say
    /// within `limit`.
    pub(crate) async fn held(
        &mut self,
        vips: &crate::vips::Vips,
        limit: Duration,
    ) -> Option<Vec<String>> {
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
/// One of the dataplane's reports, or `None` when it did not answer with
/// one (the heartbeat then says so: no generation, no statuses).
async fn get<T: serde::de::DeserializeOwned>(dataplane: &Target, path: &'static str) -> Option<T> {
    let r = http::send(dataplane, Request::get(path)).await.ok()?;
    match serde_json::from_str(&r.body) {
        Ok(report) => Some(report),
        Err(e) => {
            tracing::warn!(path, error = %e, "the dataplane's answer does not parse");
            None
        }
    }
}

pub async fn run(sender: Sender, mut stop: tokio::sync::watch::Receiver<bool>) {
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
        let dataplane = &sender.dataplane;
        let limit = DUMP_TIMEOUT.min(sender.interval);
        let held = async {
            match &sender.vips {
                Some(v) => netlink.held(v, limit).await,
                None => None,
            }
        };
        let (status, stats, held) = tokio::join!(
            get::<StatusReport>(dataplane, "/v1/status"),
            get::<StatsReport>(dataplane, "/v1/stats"),
            held
        );
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
        set_bgp(&mut beat, sender.bgp.as_ref().map(crate::bgp::Shared::get));
        let datagram = signing.seal(&beat);
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

    /// A status of one listener and one pool of `members` members.
    fn status(generation: u64, members: usize) -> StatusReport {
        use siphon_proto::status::{ListenerStatus, MemberStatus, PoolStatus};
        use siphon_proto::OperatingStatus::Online;
        StatusReport {
            generation,
            listeners: vec![ListenerStatus {
                id: "l".into(),
                operating_status: Online,
                active_connections: 0,
            }],
            pools: vec![PoolStatus {
                id: "p".into(),
                operating_status: Online,
                members: (0..members)
                    .map(|i| MemberStatus {
                        id: format!("member-{i:05}"),
                        address: "198.18.0.1".into(),
                        protocol_port: 80,
                        operating_status: Online,
                        since: None,
                        reason: None,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn big_status_is_cut_to_fit_one_datagram() {
        let status = status(7, 5000);
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

    /// The biggest BGP status there can be (and some more, to be cut).
    fn biggest_bgp() -> siphon_proto::bgp::BgpStatus {
        use siphon_proto::bgp::{BgpStatus, Session, MAX_PEERS};
        let word = "x".repeat(BGP_WORD);
        BgpStatus {
            sessions: (0..MAX_PEERS + 3)
                .map(|_| Session {
                    peer: word.clone(),
                    state: word.clone(),
                    bfd: Some(word.clone()),
                })
                .collect(),
            announced: longest_vips(MAX_VIPS + 5),
            error: Some("\u{1F600}\"".repeat(500)),
        }
    }

    #[test]
    fn bgp_words_that_json_would_escape_are_left_out_and_say_so() {
        use siphon_proto::bgp::{BgpStatus, Session};
        let mut b = from_dataplane("amp", 1, SystemTime::now(), None, None);
        let session = |peer: &str| Session {
            peer: peer.into(),
            state: "Established".into(),
            bfd: Some("Up".into()),
        };
        let status = BgpStatus {
            sessions: vec![session("198.18.9.1"), session("2001:db8:9::1")],
            announced: vec!["198.18.109.10/32".into()],
            error: None,
        };
        set_bgp(&mut b, Some(status.clone()));
        assert!(!b.truncated);
        assert_eq!(b.bgp.as_ref(), Some(&status));
        let mut odd = status;
        odd.sessions.push(session("\"x\""));
        set_bgp(&mut b, Some(odd));
        assert!(b.truncated);
        assert_eq!(b.bgp.unwrap().sessions.len(), 2);
    }

    #[test]
    fn vips_never_make_a_datagram_too_big() {
        assert_eq!(longest_vips(1)[0].len(), MAX_VIP_LEN);
        // Statuses that fill the datagram right up to the room kept, with
        // the longest id, generation and key id, then the most VIPs.
        let id = "a".repeat(255);
        let mut cut = 0;
        for n in (850..1000).step_by(3) {
            let status = status(u64::MAX, n);
            let mut b = from_dataplane(&id, u64::MAX, SystemTime::now(), Some(&status), None);
            cut += usize::from(b.truncated);
            b.persisted_generation = Some(u64::MAX);
            set_vips(&mut b, Some(longest_vips(MAX_VIPS + 5)));
            assert!(b.truncated);
            assert_eq!(b.vips.as_ref().unwrap().len(), MAX_VIPS);
            set_bgp(&mut b, Some(biggest_bgp()));
            assert_eq!(b.bgp.as_ref().unwrap().announced.len(), MAX_VIPS);
            let d = seal(&key(b"k"), u32::MAX, &b);
            assert!(d.len() <= MAX_DATAGRAM, "{n} members: {} bytes", d.len());
        }
        // Some of those fitted whole, some were cut: the edge was crossed.
        assert!(cut > 0 && cut < 50, "{cut}");
        // A short list is kept whole and does not set `truncated`; none
        // said stays none, and is left out of the JSON (older controllers).
        let mut b = from_dataplane("amp", 1, SystemTime::now(), None, None);
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
        let mut b = from_dataplane("amp", 1, SystemTime::now(), None, None);
        set_vips(&mut b, None);
        assert!(!serde_json::to_string(&b).unwrap().contains("vips"));
        let back: Heartbeat = serde_json::from_slice(&serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(back.vips, None);
    }
}
