//! VIP plumbing: add and remove addresses on a named interface through
//! rtnetlink (no `ip` command).
//!
//! The agent removes only addresses it added itself: it keeps the set of
//! VIPs it added, per interface, in `vips.json` in its state directory. An
//! address already on the interface when asked to add it (the management
//! address, say) is reported `already_present` and is not recorded, so it
//! can never be removed through this API. A whole request is checked
//! before anything changes: names and addresses first ([`plan`]), then,
//! against the interface's addresses as netlink lists them, that every
//! removal present there is ours ([`check_removals`]). The intent is
//! persisted before an address is added, so a crash leaves at worst a
//! recorded VIP that is absent, which a later removal forgets.
//!
//! Idempotent: adding an address that is there, or removing one that is
//! not (ours and already gone, or forgotten after an earlier removal whose
//! answer was lost), is reported and is not an error.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::announce::{self, Link};
use crate::store::{Store, StoreError, VIPS_FILE};

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;

/// `PUT /v1/vips`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRequest {
    pub interface: String,
    /// `203.0.113.5`, `203.0.113.5/32`, `2001:db8::5`, `2001:db8::5/64`;
    /// a bare address is a host route (/32, /128).
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VipResult {
    pub interface: String,
    pub added: Vec<String>,
    pub already_present: Vec<String>,
    pub removed: Vec<String>,
    pub absent: Vec<String>,
}

#[derive(Debug, Error)]
pub enum VipError {
    #[error("{0:?} is not an IP address or address/prefix")]
    BadAddress(String),
    #[error("{addr} cannot be a VIP: {reason}")]
    Refused { addr: String, reason: &'static str },
    #[error("{addr} on {interface} is not a VIP this agent added: refusing to remove it")]
    NotOurs { addr: String, interface: String },
    #[error("{0} is both added and removed")]
    Both(String),
    #[error("{0:?} is not an interface name")]
    BadInterface(String),
    #[error("no interface {0:?}")]
    NoInterface(String),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("recording the agent's VIPs: {0}")]
    Store(#[from] StoreError),
}

impl VipError {
    /// Whether the request (not the node) is at fault.
    pub fn is_bad_request(&self) -> bool {
        !matches!(self, VipError::Netlink(_) | VipError::Store(_))
    }
}

/// The VIPs this agent added, per interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Owned(pub BTreeMap<String, BTreeSet<IpNet>>);

impl Owned {
    fn has(&self, interface: &str, net: &IpNet) -> bool {
        self.0.get(interface).is_some_and(|s| s.contains(net))
    }

    fn insert(&mut self, interface: &str, net: IpNet) {
        self.0.entry(interface.to_owned()).or_default().insert(net);
    }

    fn forget(&mut self, interface: &str, net: &IpNet) {
        if let Some(set) = self.0.get_mut(interface) {
            set.remove(net);
            if set.is_empty() {
                self.0.remove(interface);
            }
        }
    }
}

fn parse(text: &str) -> Result<IpNet, VipError> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| VipError::BadAddress(text.to_owned()))
}

/// Why `net` cannot be a VIP, if it cannot.
pub fn refusal(net: &IpNet) -> Option<&'static str> {
    match net.addr() {
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_link_local() => Some("a link-local address"),
        IpAddr::V4(_) if net.prefix_len() < 8 => Some("prefixes shorter than /8 are refused"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("an IPv4-mapped address"),
        IpAddr::V6(_) if net.prefix_len() < 16 => Some("prefixes shorter than /16 are refused"),
        _ => None,
    }
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub interface: String,
    pub add: Vec<IpNet>,
    pub remove: Vec<IpNet>,
}

/// Checks a whole request, touching nothing: the interface name, every
/// address parsed, every address to add a possible VIP, no address both
/// added and removed.
pub fn plan(req: &VipRequest) -> Result<Plan, VipError> {
    let name = req.interface.as_str();
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(VipError::BadInterface(req.interface.clone()));
    }
    let add: Vec<IpNet> = req.add.iter().map(|a| parse(a)).collect::<Result<_, _>>()?;
    let remove: Vec<IpNet> = req
        .remove
        .iter()
        .map(|a| parse(a))
        .collect::<Result<_, _>>()?;
    for net in &add {
        // On `lo` itself a host address in 127/8 (not 127.0.0.1) stays
        // possible: a single-host setup, and the controller's tests, put
        // VIPs there.
        let on_lo = name == "lo"
            && matches!(net.addr(), IpAddr::V4(a) if a.is_loopback() && a.octets() != [127, 0, 0, 1])
            && net.prefix_len() == 32;
        if let Some(reason) = refusal(net).filter(|_| !on_lo) {
            return Err(VipError::Refused {
                addr: net.to_string(),
                reason,
            });
        }
    }
    for net in &remove {
        if add.iter().any(|a| a.addr() == net.addr()) {
            return Err(VipError::Both(net.to_string()));
        }
    }
    Ok(Plan {
        interface: name.to_owned(),
        add,
        remove,
    })
}

/// Refuses the plan if it names for removal an address that is on the
/// interface (`present`, with any prefix) and that this agent did not add
/// (with that prefix).
pub fn check_removals(plan: &Plan, owned: &Owned, present: &[IpNet]) -> Result<(), VipError> {
    for net in &plan.remove {
        let there = present.iter().any(|p| p.addr() == net.addr());
        if there && !owned.has(&plan.interface, net) {
            return Err(VipError::NotOurs {
                addr: net.to_string(),
                interface: plan.interface.clone(),
            });
        }
    }
    Ok(())
}

/// The index of the interface called `name`, and the link to announce
/// VIPs on if it has a hardware address; `None` when there is none.
async fn link_of(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<(u32, Option<Link>)>, VipError> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await;
    match link {
        Ok(Some(l)) => {
            let index = l.header.index;
            let announce = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(hw) => Link::ethernet(index, hw),
                _ => None,
            });
            Ok(Some((index, announce)))
        }
        Ok(None) => Ok(None),
        Err(e) if code(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(VipError::Netlink(e.to_string())),
    }
}

fn code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// The address and prefix of an address message.
fn net_of(msg: &AddressMessage) -> Option<IpNet> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpNet::new(local.or(address)?, msg.header.prefix_len).ok()
}

/// The agent's VIPs: what it added, on disk, and the netlink work.
#[derive(Debug)]
pub struct Vips {
    store: Store,
    /// Requests are serialised through it.
    owned: tokio::sync::Mutex<Owned>,
    /// What the controller wants held, read by heartbeats without waiting
    /// for a request in progress: `owned` as of the last request, and
    /// the addresses asked for that were on their interface already (not
    /// ours, so not on disk: known since this agent started).
    wanted: std::sync::Mutex<Wanted>,
}

#[derive(Debug, Clone, Default)]
struct Wanted {
    owned: Owned,
    found: Owned,
}

impl Vips {
    /// Loads `vips.json` (a corrupt one is set aside: the agent then owns
    /// nothing until it adds again).
    pub fn load(store: Store) -> Result<Vips, StoreError> {
        let owned = store
            .read_or_set_aside::<Owned>(VIPS_FILE)?
            .unwrap_or_default();
        Ok(Vips {
            store,
            wanted: std::sync::Mutex::new(Wanted {
                owned: owned.clone(),
                found: Owned::default(),
            }),
            owned: tokio::sync::Mutex::new(owned),
        })
    }

    /// What this agent added.
    pub async fn owned(&self) -> Owned {
        self.owned.lock().await.clone()
    }

    /// The VIPs the controller wants on this node, per interface: those
    /// this agent added (`vips.json`) and those it was asked to add and
    /// found there already (since it started). Never waits for a request
    /// in progress: as of the last one finished.
    pub fn wanted(&self) -> Owned {
        let w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = w.owned.clone();
        for (interface, nets) in &w.found.0 {
            for net in nets {
                all.insert(interface, *net);
            }
        }
        all
    }

    /// The VIPs of [`Vips::wanted`] that are on their interface now, as
    /// netlink lists the addresses (`address/prefix`, sorted by interface
    /// then address). An interface that is gone holds none.
    pub async fn held(&self, handle: &rtnetlink::Handle) -> Result<Vec<String>, VipError> {
        let nl = |e: rtnetlink::Error| VipError::Netlink(e.to_string());
        let mut out = Vec::new();
        for (name, nets) in &self.wanted().0 {
            let Some((index, _)) = link_of(handle, name).await? else {
                continue;
            };
            let present: Vec<IpNet> = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect::<Vec<AddressMessage>>()
                .await
                .map_err(nl)?
                .iter()
                .filter_map(net_of)
                .collect();
            out.extend(
                nets.iter()
                    .filter(|n| present.iter().any(|p| p.addr() == n.addr()))
                    .map(IpNet::to_string),
            );
        }
        Ok(out)
    }

    /// Records, after a request, what is wanted now.
    fn publish(&self, owned: &Owned, interface: &str, result: &Result<VipResult, VipError>) {
        let mut w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        w.owned = owned.clone();
        let Ok(r) = result else { return };
        for net in r.already_present.iter().filter_map(|a| parse(a).ok()) {
            if !owned.has(interface, &net) {
                w.found.insert(interface, net);
            }
        }
        for net in r
            .added
            .iter()
            .chain(&r.removed)
            .chain(&r.absent)
            .filter_map(|a| parse(a).ok())
        {
            w.found.forget(interface, &net);
        }
    }

    /// Applies `req`: checked whole first, then added, then removed.
    pub async fn apply(&self, req: &VipRequest) -> Result<VipResult, VipError> {
        let plan = plan(req)?;
        let mut owned = self.owned.lock().await;
        let name = plan.interface.clone();
        let nl = |e: rtnetlink::Error| VipError::Netlink(e.to_string());
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| VipError::Netlink(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let result = async {
            let (index, link) = link_of(&handle, &name)
                .await?
                .ok_or_else(|| VipError::NoInterface(name.clone()))?;
            let present: Vec<AddressMessage> = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            let nets: Vec<IpNet> = present.iter().filter_map(net_of).collect();
            check_removals(&plan, &owned, &nets)?;
            let on_link = |net: &IpNet| {
                present
                    .iter()
                    .find(|m| net_of(m).is_some_and(|n| n.addr() == net.addr()))
            };
            let mut out = VipResult {
                interface: name.clone(),
                ..VipResult::default()
            };
            // Adds: what is there (with any prefix) is left alone and, if
            // not already ours, never becomes ours.
            let mut to_add = Vec::new();
            for net in &plan.add {
                if on_link(net).is_some() {
                    out.already_present.push(net.to_string());
                } else if !to_add.contains(net) {
                    to_add.push(*net);
                }
            }
            if !to_add.is_empty() {
                let mut next = owned.clone();
                for net in &to_add {
                    next.insert(&name, *net);
                }
                self.store.write(VIPS_FILE, &next)?;
                *owned = next;
            }
            let mut failure = None;
            for net in &to_add {
                if failure.is_some() {
                    owned.forget(&name, net);
                    continue;
                }
                match handle
                    .address()
                    .add(index, net.addr(), net.prefix_len())
                    .execute()
                    .await
                {
                    Ok(()) => out.added.push(net.to_string()),
                    Err(e) if code(&e) == Some(EEXIST) => {
                        // Someone else put it there meanwhile: theirs.
                        owned.forget(&name, net);
                        out.already_present.push(net.to_string());
                    }
                    Err(e) => {
                        owned.forget(&name, net);
                        failure = Some(nl(e));
                    }
                }
            }
            if let Some(e) = failure {
                self.store.write(VIPS_FILE, &*owned)?;
                return Err(e);
            }
            // Removes: only ours (checked above); an absent one is
            // forgotten.
            let mut next = owned.clone();
            for net in &plan.remove {
                let found = present.iter().find(|m| net_of(m) == Some(*net));
                match found {
                    Some(msg) => {
                        handle
                            .address()
                            .del(msg.clone())
                            .execute()
                            .await
                            .map_err(nl)?;
                        out.removed.push(net.to_string());
                    }
                    None => out.absent.push(net.to_string()),
                }
                next.forget(&name, net);
            }
            if next != *owned {
                self.store.write(VIPS_FILE, &next)?;
                *owned = next;
            }
            // Every address asked for is on the link now: the neighbours
            // learn where (again, if it was here already: harmless, and
            // it heals a cache that went wrong).
            if let Some(link) = link {
                let addrs = plan.add.iter().map(IpNet::addr).collect();
                announce::spawn(name.clone(), link, addrs);
            }
            Ok(out)
        }
        .await;
        driver.abort();
        self.publish(&owned, &name, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    fn req(add: &[&str], remove: &[&str]) -> VipRequest {
        VipRequest {
            interface: "vip0".into(),
            add: add.iter().map(|s| (*s).to_owned()).collect(),
            remove: remove.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn addresses_that_cannot_be_vips_are_refused_up_front() {
        for bad in [
            "127.0.0.1",
            "127.0.0.1/8",
            "224.0.0.1",
            "239.1.2.3/32",
            "0.0.0.0",
            "255.255.255.255",
            "169.254.1.1",
            "198.18.0.1/7",
            "::1",
            "ff02::1",
            "::",
            "fe80::1/64",
            "::ffff:198.18.0.1",
            "2001:db8::1/15",
        ] {
            let e = plan(&req(&[bad], &[])).unwrap_err();
            assert!(
                matches!(e, VipError::Refused { .. }) && e.is_bad_request(),
                "{bad}: {e}"
            );
        }
        for good in [
            "198.18.7.10",
            "198.18.7.10/24",
            "198.18.0.0/8",
            "2001:db8::5",
            "2001:db8::/16",
        ] {
            assert!(plan(&req(&[good], &[])).is_ok(), "{good}");
        }
        assert!(matches!(
            plan(&req(&["nope"], &[])),
            Err(VipError::BadAddress(_))
        ));
        let mut r = req(&["198.18.7.10"], &[]);
        r.interface = "a/b".into();
        assert!(matches!(plan(&r), Err(VipError::BadInterface(_))));
    }

    #[test]
    fn only_our_own_addresses_can_be_removed() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let mut owned = Owned::default();
        owned.insert("vip0", net("198.18.7.10/32"));
        let present = [
            net("198.18.7.10/32"),
            net("198.18.6.2/24"),
            net("127.0.0.1/8"),
        ];
        let p = plan(&req(&[], &["198.18.7.10"])).unwrap();
        assert_eq!(p.remove, vec![net("198.18.7.10/32")]);
        assert!(check_removals(&p, &owned, &present).is_ok());
        for (interface, addr) in [
            ("vip0", "198.18.6.2/24"),
            ("vip0", "198.18.6.2"),
            ("vip0", "198.18.7.10/24"),
            ("eth1", "198.18.7.10/32"),
            ("lo", "127.0.0.1/8"),
        ] {
            let mut r = req(&[], &[addr]);
            r.interface = interface.into();
            let e = check_removals(&plan(&r).unwrap(), &owned, &present).unwrap_err();
            assert!(e.to_string().contains("not a VIP this agent added"), "{e}");
            assert!(e.is_bad_request());
        }
        // One bad removal fails the whole request.
        let p = plan(&req(&["198.18.7.11"], &["198.18.7.10", "198.18.6.2/24"])).unwrap();
        assert!(matches!(
            check_removals(&p, &owned, &present),
            Err(VipError::NotOurs { .. })
        ));
        // Not there: nothing to refuse (a retried removal).
        let p = plan(&req(&[], &["198.18.7.99"])).unwrap();
        assert!(check_removals(&p, &owned, &present).is_ok());
        assert!(matches!(
            plan(&req(&["198.18.7.10"], &["198.18.7.10"])),
            Err(VipError::Both(_))
        ));
        owned.forget("vip0", &net("198.18.7.10/32"));
        assert_eq!(owned, Owned::default());
    }
}
