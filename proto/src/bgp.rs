//! BGP between the controller and an agent: the peering the controller
//! asks an amphora for (`PUT /v1/bgp` on the agent), checked here so that
//! both sides refuse the same things, and what the agent's heartbeat says
//! of its sessions and announcements.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most peers of one amphora (a heartbeat keeps room for this many
/// sessions).
pub const MAX_PEERS: usize = 8;

/// The peering the controller asks for (`PUT /v1/bgp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peering {
    /// This amphora's AS.
    pub local_as: u32,
    pub peers: Vec<Peer>,
    /// The BGP router id: the amphora's IPv4 address facing the routers
    /// (absent: BIRD picks one of its addresses, which may be a VIP that
    /// every amphora shares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<std::net::Ipv4Addr>,
    /// BGP hold time, seconds (3 to 65535; keepalives a third of it).
    #[serde(default = "default_hold")]
    pub hold_time_s: u16,
    /// BFD on every session, when set.
    #[serde(default)]
    pub bfd: Option<Bfd>,
}

fn default_hold() -> u16 {
    9
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub address: IpAddr,
    pub asn: u32,
    /// TCP MD5 password of the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bfd {
    #[serde(default = "default_bfd_interval")]
    pub min_rx_ms: u32,
    #[serde(default = "default_bfd_interval")]
    pub min_tx_ms: u32,
    /// Missed packets before the peer is declared down.
    #[serde(default = "default_multiplier")]
    pub multiplier: u8,
}

fn default_bfd_interval() -> u32 {
    100
}

fn default_multiplier() -> u8 {
    3
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeeringError {
    #[error("{0} is not an AS number a session can use (0, 23456 and 4294967295 are reserved)")]
    Asn(u32),
    #[error("1 to {MAX_PEERS} peers are needed")]
    Peers,
    #[error("peer {0} is listed twice")]
    Duplicate(IpAddr),
    #[error("peer {0}: not a unicast address")]
    NotUnicast(IpAddr),
    #[error("hold_time_s must be 3 to 65535 (got {0})")]
    Hold(u16),
    #[error("bfd: intervals must be 10 to 60000 ms and the multiplier 1 to 255")]
    Bfd,
    #[error("peer {0}: a password of 1 to 80 printable characters, without '\"' or '\\'")]
    Password(IpAddr),
}

impl Peering {
    /// Everything BIRD would refuse, or that would make a config BIRD
    /// takes but that is not what was meant, refused up front.
    pub fn check(&self) -> Result<(), PeeringError> {
        let asn_ok = |a: u32| a != 0 && a != 23456 && a != u32::MAX;
        if !asn_ok(self.local_as) {
            return Err(PeeringError::Asn(self.local_as));
        }
        if self.peers.is_empty() || self.peers.len() > MAX_PEERS {
            return Err(PeeringError::Peers);
        }
        let mut seen = BTreeSet::new();
        for p in &self.peers {
            if !asn_ok(p.asn) {
                return Err(PeeringError::Asn(p.asn));
            }
            if !seen.insert(p.address) {
                return Err(PeeringError::Duplicate(p.address));
            }
            let unicast = match p.address {
                IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
                IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
            };
            if !unicast {
                return Err(PeeringError::NotUnicast(p.address));
            }
            if let Some(pw) = &p.password {
                let printable = pw.chars().all(|c| c.is_ascii_graphic() || c == ' ');
                if pw.is_empty() || pw.len() > 80 || !printable || pw.contains(['"', '\\']) {
                    return Err(PeeringError::Password(p.address));
                }
            }
        }
        if self.hold_time_s < 3 {
            return Err(PeeringError::Hold(self.hold_time_s));
        }
        if let Some(b) = &self.bfd {
            let ok = |ms: u32| (10..=60_000).contains(&ms);
            if !ok(b.min_rx_ms) || !ok(b.min_tx_ms) || b.multiplier == 0 {
                return Err(PeeringError::Bfd);
            }
        }
        Ok(())
    }
}

/// What the heartbeat says of BGP (`Heartbeat::bgp`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpStatus {
    /// Each peer's session: BGP state and BFD state.
    pub sessions: Vec<Session>,
    /// The VIPs announced now.
    pub announced: Vec<String>,
    /// Why the last change could not be applied, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub peer: String,
    /// `Established`, `Active`, `Connect`, `Idle`, ... or `down`.
    pub state: String,
    /// `Up`, `Down`, `Init`; absent without BFD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    fn peering() -> Peering {
        Peering {
            local_as: 64513,
            peers: vec![
                Peer {
                    address: "198.18.1.1".parse().unwrap(),
                    asn: 64512,
                    password: Some("s3cret pass".into()),
                },
                Peer {
                    address: "2001:db8:1::1".parse().unwrap(),
                    asn: 64512,
                    password: None,
                },
            ],
            router_id: None,
            hold_time_s: 3,
            bfd: Some(Bfd {
                min_rx_ms: 100,
                min_tx_ms: 100,
                multiplier: 3,
            }),
        }
    }

    #[test]
    fn peerings_bird_would_refuse_or_misread_are_refused_up_front() {
        assert!(peering().check().is_ok());
        let mut p = peering();
        p.local_as = 0;
        assert_eq!(p.check(), Err(PeeringError::Asn(0)));
        let mut p = peering();
        p.peers.clear();
        assert_eq!(p.check(), Err(PeeringError::Peers));
        let mut p = peering();
        p.peers[1].address = p.peers[0].address;
        assert!(matches!(p.check(), Err(PeeringError::Duplicate(_))));
        let mut p = peering();
        p.peers[0].password = Some("a\";} protocol kernel { ipv4 { export all; }; } #".into());
        assert!(matches!(p.check(), Err(PeeringError::Password(_))));
        let mut p = peering();
        p.peers[0].address = "224.0.0.5".parse().unwrap();
        assert!(matches!(p.check(), Err(PeeringError::NotUnicast(_))));
        let mut p = peering();
        p.hold_time_s = 2;
        assert_eq!(p.check(), Err(PeeringError::Hold(2)));
        let mut p = peering();
        p.bfd.as_mut().unwrap().min_rx_ms = 1;
        assert_eq!(p.check(), Err(PeeringError::Bfd));
    }
}
