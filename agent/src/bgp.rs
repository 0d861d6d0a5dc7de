//! Announcing this amphora's VIPs over BGP through a local BIRD 2
//! daemon, only while the dataplane serves them.
//!
//! The controller sets the peering (`PUT /v1/bgp`: our AS, the routers,
//! timers, BFD); the agent owns BIRD's config file: it renders the whole
//! file from the peering and the VIPs to announce, has BIRD check it
//! (`configure check`), moves it in place and reloads (`configure`). The
//! VIPs are static `unreachable` routes in BIRD only (no kernel protocol:
//! nothing reaches this node's routing table), exported to each peer with
//! this node's session address as next hop. IPv4 VIPs go to IPv4 peers,
//! IPv6 VIPs to IPv6 peers.
//!
//! Why BIRD: one small daemon with one config file and one control
//! socket, BFD built in, several instances side by side (one per network
//! namespace in the tests), and a reload that keeps established sessions
//! when only the routes change.
//!
//! The gate: a VIP is announced only while the dataplane answers the
//! agent and runs the config last pushed (`Serving`), and only while the
//! agent holds it on its interface. When either stops, the VIPs are
//! withdrawn at the next check ([`CHECK_EVERY`]).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use siphon_proto::http::Target;
use tokio::sync::watch;

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::bird::{Bird, BirdError};
use crate::heartbeat::Netlink;
use crate::vips::Vips;
pub use siphon_proto::bgp::*;

/// How often the gate is checked and BIRD's config brought in line: a
/// dataplane that dies is withdrawn within about twice this plus BIRD's
/// reload (milliseconds).
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The agent's own settings for BGP (`[bgp]` in its config): where its
/// BIRD is. Present only on amphorae that run one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSettings {
    /// BIRD's control socket.
    #[serde(default = "default_socket")]
    pub bird_socket: PathBuf,
    /// The config file BIRD was started with (`bird -c`): the agent owns
    /// it and rewrites it whole.
    #[serde(default = "default_config")]
    pub bird_config: PathBuf,
    /// On the agent's SIGTERM: withdraw everything, then wait this long
    /// for the routers to converge before exiting (the dataplane, stopped
    /// after the agent, then drains with no new connection coming).
    #[serde(default = "default_withdraw_delay")]
    pub withdraw_delay_ms: u64,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/bird/bird.ctl")
}

fn default_config() -> PathBuf {
    PathBuf::from("/etc/bird/bird.conf")
}

fn default_withdraw_delay() -> u64 {
    1_000
}

/// The route a VIP is announced as: the address alone (/32, /128).
fn host_route(vip: &IpNet) -> IpNet {
    IpNet::from(vip.addr())
}

/// BIRD's whole config for `peering` announcing `vips` (none when the
/// gate is shut, or with no peering: then no BGP at all).
pub fn render(peering: Option<&Peering>, vips: &BTreeSet<IpNet>) -> String {
    let mut c = String::from(
        "# Written by siphon-agent from the controller's peering: any change\n\
         # made here is overwritten.\n\
         log stderr { warning, error, fatal };\n\
         protocol device {}\n",
    );
    let Some(p) = peering else {
        return c;
    };
    if let Some(id) = p.router_id {
        let _ = writeln!(c, "router id {id};");
    }
    if let Some(b) = &p.bfd {
        let _ = writeln!(
            c,
            "protocol bfd siphon_bfd {{\n  interface \"*\" {{ min rx interval {} ms; min tx interval {} ms; multiplier {}; }};\n  multihop {{ min rx interval {} ms; min tx interval {} ms; multiplier {}; }};\n}}",
            b.min_rx_ms, b.min_tx_ms, b.multiplier, b.min_rx_ms, b.min_tx_ms, b.multiplier
        );
    }
    for (family, v4) in [("ipv4", true), ("ipv6", false)] {
        let _ = writeln!(c, "protocol static siphon_vips_{family} {{\n  {family};");
        for v in vips.iter().filter(|v| matches!(v, IpNet::V4(_)) == v4) {
            let _ = writeln!(c, "  route {} unreachable;", host_route(v));
        }
        c.push_str("}\n");
    }
    let keepalive = (p.hold_time_s / 3).max(1);
    for (i, peer) in p.peers.iter().enumerate() {
        let family = if peer.address.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        let _ = writeln!(
            c,
            "protocol bgp siphon_peer{i} {{\n  local as {};\n  neighbor {} as {};\n  hold time {};\n  keepalive time {keepalive};\n  connect retry time 1;\n  error wait time 1, 10;",
            p.local_as, peer.address, peer.asn, p.hold_time_s
        );
        if p.bfd.is_some() {
            c.push_str("  bfd on;\n");
        }
        if let Some(pw) = &peer.password {
            let _ = writeln!(c, "  password \"{pw}\";");
        }
        let _ = writeln!(
            c,
            "  {family} {{ import none; export where proto = \"siphon_vips_{family}\"; next hop self; }};\n}}"
        );
    }
    c
}

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("writing BIRD's config {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bird(#[from] BirdError),
}

/// BIRD's config file and daemon, as the agent drives them.
#[derive(Debug)]
pub struct Speaker {
    pub bird: Bird,
    pub config: PathBuf,
    /// The text BIRD last took from us.
    applied: Option<String>,
}

impl Speaker {
    pub fn new(settings: &BgpSettings) -> Speaker {
        Speaker {
            bird: Bird::new(&settings.bird_socket),
            config: settings.bird_config.clone(),
            applied: None,
        }
    }

    /// Brings BIRD to `text`: checked by BIRD from a file beside the
    /// config, moved in place, reloaded. Nothing happens when BIRD took
    /// this text already; a refused text leaves the running config alone.
    pub async fn apply(&mut self, text: &str) -> Result<bool, ApplyError> {
        if self.applied.as_deref() == Some(text) {
            return Ok(false);
        }
        let next = sibling(&self.config, "siphon-next");
        write_readable(&next, text)?;
        if let Err(e) = self.bird.check(&next).await {
            let _ = std::fs::remove_file(&next);
            return Err(e.into());
        }
        std::fs::rename(&next, &self.config).map_err(|source| ApplyError::Write {
            path: self.config.clone(),
            source,
        })?;
        self.bird.configure().await?;
        self.applied = Some(text.to_owned());
        Ok(true)
    }

    /// The sessions' states, for the heartbeat.
    pub async fn sessions(&self, peering: &Peering) -> Result<Vec<Session>, BirdError> {
        let protocols = self.bird.protocols().await?;
        let bfd = if peering.bfd.is_some() {
            self.bird.bfd_sessions().await?
        } else {
            Vec::new()
        };
        Ok(peering
            .peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                let name = format!("siphon_peer{i}");
                let state =
                    protocols
                        .iter()
                        .find(|p| p.name == name)
                        .map_or("absent".to_owned(), |p| {
                            if p.state == "up" {
                                "Established".to_owned()
                            } else {
                                p.info
                                    .split_whitespace()
                                    .next()
                                    .unwrap_or(&p.state)
                                    .to_owned()
                            }
                        });
                let peer_text = peer.address.to_string();
                Session {
                    bfd: peering.bfd.as_ref().map(|_| {
                        bfd.iter()
                            .find(|s| s.peer == peer_text)
                            .map_or("Down".to_owned(), |s| s.state.clone())
                    }),
                    peer: peer_text,
                    state,
                }
            })
            .collect())
    }
}

/// `path` with its file name prefixed: a file in the same directory (so
/// a rename replaces the config atomically).
fn sibling(path: &Path, prefix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "bird.conf".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{prefix}-{name}"))
}

/// BIRD runs as its own user: the file must be readable by it (it holds
/// MD5 passwords, so it is not world-readable: group `bird` where the
/// agent is in it, else only the owner and BIRD as root).
fn write_readable(path: &Path, text: &str) -> Result<(), ApplyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| ApplyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// The latest BGP status, written by the announcer, read by heartbeats
/// and `GET /v1/bgp`.
#[derive(Debug, Clone, Default)]
pub struct Shared(Arc<Mutex<BgpStatus>>);

impl Shared {
    pub fn get(&self) -> BgpStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut BgpStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// What the announcer works from.
#[derive(Debug)]
pub struct Announcer {
    pub speaker: Speaker,
    /// The controller's peering (`PUT /v1/bgp`); `None`: no BGP.
    pub peering: watch::Receiver<Option<Peering>>,
    pub dataplane: Target,
    /// The generation of the config last pushed (persisted).
    pub persisted: watch::Receiver<Option<u64>>,
    pub vips: Arc<Vips>,
    pub status: Shared,
    pub withdraw_delay: Duration,
}

/// Whether the dataplane serves what was pushed: it answers within
/// [`CHECK_EVERY`] and runs the persisted generation (or a newer one).
async fn serving(dataplane: &Target, persisted: Option<u64>) -> bool {
    let Some(want) = persisted else {
        return false;
    };
    let asked = crate::running_generation(dataplane);
    let Ok(Ok(Some(running))) = tokio::time::timeout(CHECK_EVERY, asked).await else {
        return false;
    };
    running >= want
}

/// Every [`CHECK_EVERY`]: the VIPs to announce (those held, while the
/// dataplane serves), BIRD brought in line; the sessions read about
/// once a second. On `stop`: everything withdrawn, then a wait of
/// `withdraw_delay` for the routers to converge.
pub async fn run(mut a: Announcer, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut netlink = Netlink::default();
    let mut last_error: Option<String> = None;
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
        }
        round += 1;
        let peering = a.peering.borrow().clone();
        let persisted = *a.persisted.borrow();
        let up = serving(&a.dataplane, persisted).await;
        let held: BTreeSet<IpNet> = if up && peering.is_some() {
            netlink
                .held(&a.vips, CHECK_EVERY)
                .await
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.parse().ok())
                .collect()
        } else {
            BTreeSet::new()
        };
        let text = render(peering.as_ref(), &held);
        match a.speaker.apply(&text).await {
            Ok(changed) => {
                if changed {
                    let list: Vec<String> =
                        held.iter().map(|v| host_route(v).to_string()).collect();
                    tracing::info!(announced = ?list, serving = up, "BGP announcements changed");
                    a.status.update(|s| s.announced = list);
                }
                if last_error.take().is_some() {
                    tracing::info!("BIRD took the config again");
                }
                a.status.update(|s| s.error = None);
            }
            Err(e) => {
                let why = e.to_string();
                if last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!(error = %why, "cannot bring BIRD in line; retrying");
                }
                a.status.update(|s| s.error = Some(why.clone()));
                last_error = Some(why);
            }
        }
        if round % 10 == 1 {
            let sessions = match &peering {
                Some(p) => a.speaker.sessions(p).await.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "cannot read BIRD's sessions");
                    Vec::new()
                }),
                None => Vec::new(),
            };
            a.status.update(|s| s.sessions = sessions);
        }
    }
    let peering = a.peering.borrow().clone();
    if peering.is_none() {
        return;
    }
    match a
        .speaker
        .apply(&render(peering.as_ref(), &BTreeSet::new()))
        .await
    {
        Ok(_) => {
            tracing::info!(
                wait_ms = a.withdraw_delay.as_millis() as u64,
                "stopping: every VIP withdrawn; waiting for the routers"
            );
            tokio::time::sleep(a.withdraw_delay).await;
        }
        Err(e) => tracing::error!(error = %e, "stopping: cannot withdraw the VIPs"),
    }
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
            router_id: Some("198.18.1.11".parse().unwrap()),
            hold_time_s: 3,
            bfd: Some(Bfd {
                min_rx_ms: 100,
                min_tx_ms: 100,
                multiplier: 3,
            }),
        }
    }

    #[test]
    fn each_family_goes_to_its_own_peers_with_this_node_as_next_hop() {
        let vips: BTreeSet<IpNet> = [
            "198.18.100.10/32",
            "2001:db8:100::10/128",
            "198.18.100.11/24",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let c = render(Some(&peering()), &vips);
        assert!(c.contains("route 198.18.100.10/32 unreachable;"), "{c}");
        assert!(
            c.contains("route 198.18.100.11/32 unreachable;"),
            "a host route: {c}"
        );
        assert!(c.contains("route 2001:db8:100::10/128 unreachable;"), "{c}");
        assert!(c.contains("neighbor 198.18.1.1 as 64512;"));
        assert!(c.contains(
            "ipv4 { import none; export where proto = \"siphon_vips_ipv4\"; next hop self; };"
        ));
        assert!(c.contains(
            "ipv6 { import none; export where proto = \"siphon_vips_ipv6\"; next hop self; };"
        ));
        assert!(c.contains("password \"s3cret pass\";"));
        assert!(c.contains("bfd on;") && c.contains("multiplier 3;"));
        assert!(c.contains("hold time 3;") && c.contains("keepalive time 1;"));
        assert!(!c.contains("protocol kernel"), "nothing goes to the kernel");
        assert!(c.contains("router id 198.18.1.11;"));
    }

    #[test]
    fn with_the_gate_shut_the_sessions_stay_and_nothing_is_announced() {
        let c = render(Some(&peering()), &BTreeSet::new());
        assert!(!c.contains("route "), "{c}");
        assert!(c.contains("protocol bgp siphon_peer0"));
        assert!(!render(None, &BTreeSet::new()).contains("protocol bgp"));
    }
}
