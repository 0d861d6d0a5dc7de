//! Distributors: how a VIP's traffic is spread over the amphorae of its
//! load balancer.
//!
//! A [`Driver`] is told, per VIP, the exact set of amphorae that should
//! receive it ([`Spread`]); [`run`] keeps every driver call in step with
//! the store and the health manager:
//!
//! - an amphora is a target of its load balancer's VIP once its config
//!   and the VIP were pushed to it (a spare is added only after that);
//! - a silent one is removed as soon as it is stale (per-amphora
//!   staleness, checked every `check_interval_ms`), before any failover,
//!   and added back when heard again;
//! - unless the failover circuit breaker holds: when too many are silent
//!   at once the fault is likely on the controller's side, and the
//!   amphorae keep their traffic (as `FAILOVER_STOPPED` ones do).
//!
//! Drivers: `noop` (the network delivers the VIP; nothing to program) and
//! `linux-ecmp` ([`LinuxEcmp`]: the VIP routed on a Linux router over a
//! resilient nexthop group, one nexthop per amphora, through [`nexthop`]).

pub mod nexthop;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::config::{self, Health};
use crate::model::{AmphoraStatus, ProvisioningStatus, State};
use crate::Controller;

use nexthop::{NetlinkError, Rtnl};

/// One amphora as a distributor sees it: its id there and its address on
/// the VIP network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub id: u32,
    pub address: IpAddr,
    pub amphora: String,
}

/// One VIP and the amphorae that receive it (never empty, sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    pub group: u32,
    pub vip: IpAddr,
    pub targets: Vec<Target>,
}

#[derive(Debug, Error)]
pub enum DistributorError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// What a distributor must do; every call is idempotent (create or
/// replace), so repeating one after a failure or a restart is harmless.
pub trait Driver: Send + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Sends `spread.vip` to exactly `spread.targets`.
    fn apply(&mut self, spread: &Spread) -> Result<(), DistributorError>;
    /// Sends `vip` (of group `group`) nowhere.
    fn withdraw(&mut self, group: u32, vip: IpAddr) -> Result<(), DistributorError>;
    /// `target` is in no group any more.
    fn forget(&mut self, target: &Target) -> Result<(), DistributorError>;
}

/// The network delivers VIPs by itself: nothing to program.
#[derive(Debug)]
pub struct Noop;

impl Driver for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn apply(&mut self, _: &Spread) -> Result<(), DistributorError> {
        Ok(())
    }
    fn withdraw(&mut self, _: u32, _: IpAddr) -> Result<(), DistributorError> {
        Ok(())
    }
    fn forget(&mut self, _: &Target) -> Result<(), DistributorError> {
        Ok(())
    }
}

/// A Linux router (this host, or a namespace of it): each amphora is a
/// gateway nexthop on `interface`, each VIP a host route to a resilient
/// group of them. The router hashes each flow (with
/// `fib_multipath_hash_policy=1`, on its addresses and ports) to a bucket
/// and each bucket to a nexthop; removing a nexthop moves only its
/// buckets, adding one takes only buckets idle for `idle_timer_s`.
#[derive(Debug)]
pub struct LinuxEcmp {
    rtnl: Rtnl,
    netns: Option<PathBuf>,
    interface: String,
    ifindex: u32,
    buckets: u16,
    idle_timer_s: u32,
}

impl LinuxEcmp {
    pub fn open(c: &config::LinuxEcmp) -> Result<LinuxEcmp, DistributorError> {
        let netns = c.netns.clone();
        let rtnl = Rtnl::open(netns.as_deref())?;
        let ifindex = nexthop::ifindex(netns.as_deref(), &c.interface)?;
        Ok(LinuxEcmp {
            rtnl,
            netns,
            interface: c.interface.clone(),
            ifindex,
            buckets: c.buckets,
            idle_timer_s: c.idle_timer_s,
        })
    }

    fn try_apply(&mut self, spread: &Spread) -> Result<(), DistributorError> {
        for t in &spread.targets {
            self.rtnl.set_gateway(t.id, t.address, self.ifindex)?;
        }
        let ids: Vec<u32> = spread.targets.iter().map(|t| t.id).collect();
        self.rtnl
            .set_group(spread.group, &ids, self.buckets, self.idle_timer_s)?;
        self.rtnl.set_route(spread.vip, spread.group)?;
        Ok(())
    }
}

impl Driver for LinuxEcmp {
    fn name(&self) -> &'static str {
        "linux-ecmp"
    }

    fn apply(&mut self, spread: &Spread) -> Result<(), DistributorError> {
        match self.try_apply(spread) {
            Ok(()) => Ok(()),
            Err(first) => {
                // The interface may have been re-created (a new index).
                match nexthop::ifindex(self.netns.as_deref(), &self.interface) {
                    Ok(i) if i != self.ifindex => {
                        self.ifindex = i;
                        self.try_apply(spread)
                    }
                    _ => Err(first),
                }
            }
        }
    }

    fn withdraw(&mut self, group: u32, vip: IpAddr) -> Result<(), DistributorError> {
        self.rtnl.delete_route(vip)?;
        self.rtnl.delete_nexthop(group)?;
        Ok(())
    }

    fn forget(&mut self, target: &Target) -> Result<(), DistributorError> {
        Ok(self.rtnl.delete_nexthop(target.id)?)
    }
}

/// The driver the config names.
pub fn open(c: &config::Distributor) -> Result<Box<dyn Driver>, DistributorError> {
    Ok(match c {
        config::Distributor::Noop => Box::new(Noop),
        config::Distributor::LinuxEcmp(e) => Box::new(LinuxEcmp::open(e)?),
    })
}

/// The first id the driver gives out.
fn first_id(c: &config::Distributor) -> u32 {
    match c {
        config::Distributor::LinuxEcmp(e) => e.first_id,
        config::Distributor::Noop => 1,
    }
}

/// What every VIP should be spread over now.
pub fn desired(s: &State, ctl: &Controller) -> BTreeMap<String, Spread> {
    let health: Option<&Health> = ctl.config.health.as_ref();
    let silent =
        |id: &str| health.is_some_and(|h| crate::health::silent(ctl, id, h.heartbeat_timeout()));
    // The same rule as the failover's: too many silent at once keep their
    // traffic.
    let hold = health.is_some_and(|h| crate::health::breaker_open(ctl, s, h));
    let mut out = BTreeMap::new();
    for lb in s.load_balancers.values() {
        if lb.common.provisioning_status == ProvisioningStatus::PendingDelete {
            continue;
        }
        let (Some(group), Ok(vip)) = (lb.distributor_id, lb.vip_address.parse::<IpAddr>()) else {
            continue;
        };
        let mut targets: Vec<Target> = s
            .amphorae_of(&lb.common.id)
            .filter(|a| a.vips.iter().any(|v| v == &lb.vip_address))
            .filter(|a| match a.status {
                AmphoraStatus::Allocated => hold || !silent(&a.id),
                AmphoraStatus::FailoverStopped => true,
                _ => false,
            })
            .filter_map(|a| {
                Some(Target {
                    id: a.distributor_id?,
                    address: a.data_address()?,
                    amphora: a.id.clone(),
                })
            })
            .collect();
        targets.sort();
        if !targets.is_empty() {
            out.insert(
                lb.common.id.clone(),
                Spread {
                    group,
                    vip,
                    targets,
                },
            );
        }
    }
    out
}

/// Gives every load balancer and allocated amphora lacking one a
/// distributor id (stored, so it survives a restart); ids start at
/// `first` and are never reused while their holder exists.
fn assign_ids(ctl: &Controller, first: u32) {
    let missing = ctl.db.read(|s| {
        s.load_balancers
            .values()
            .any(|lb| lb.distributor_id.is_none())
            || s.amphorae
                .values()
                .any(|a| a.load_balancer_id.is_some() && a.distributor_id.is_none())
    });
    if !missing {
        return;
    }
    let r = ctl
        .db
        .write(|s, tx| -> Result<(), crate::store::StoreError> {
            let used = s
                .load_balancers
                .values()
                .filter_map(|lb| lb.distributor_id)
                .chain(s.amphorae.values().filter_map(|a| a.distributor_id))
                .max();
            let mut next = used.map_or(first, |m| m.saturating_add(1).max(first));
            for lb in s.load_balancers.values() {
                if lb.distributor_id.is_none() {
                    let mut lb = lb.clone();
                    lb.distributor_id = Some(next);
                    next = next.saturating_add(1);
                    tx.put(lb);
                }
            }
            for a in s.amphorae.values() {
                if a.load_balancer_id.is_some() && a.distributor_id.is_none() {
                    let mut a = a.clone();
                    a.distributor_id = Some(next);
                    next = next.saturating_add(1);
                    tx.put(a);
                }
            }
            Ok(())
        });
    if let Err(e) = r {
        tracing::error!(error = %e, "distributor ids not stored");
    }
}

/// What the driver was last told, to call it only for changes.
#[derive(Debug)]
struct Reconciler {
    driver: Box<dyn Driver>,
    applied: HashMap<String, Spread>,
    /// Targets in some applied group, to forget the ones that leave all.
    known: HashMap<u32, Target>,
    /// The last error per load balancer, logged once, not every tick.
    errors: HashMap<String, String>,
}

impl Reconciler {
    fn pass(&mut self, ctl: &Controller) {
        assign_ids(ctl, first_id(&ctl.config.distributor));
        let desired = ctl.db.read(|s| desired(s, ctl));
        for (lb, spread) in &desired {
            if self.applied.get(lb) == Some(spread) {
                continue;
            }
            match self.driver.apply(spread) {
                Ok(()) => {
                    let targets: Vec<String> = spread
                        .targets
                        .iter()
                        .map(|t| t.address.to_string())
                        .collect();
                    tracing::info!(
                        loadbalancer = %lb,
                        vip = %spread.vip,
                        driver = self.driver.name(),
                        ?targets,
                        "VIP distributed"
                    );
                    for t in &spread.targets {
                        self.known.insert(t.id, t.clone());
                    }
                    self.applied.insert(lb.clone(), spread.clone());
                    self.errors.remove(lb);
                }
                Err(e) => self.failed(lb, &e),
            }
        }
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|lb| !desired.contains_key(*lb))
            .cloned()
            .collect();
        for lb in gone {
            let Some(was) = self.applied.get(&lb) else {
                continue;
            };
            match self.driver.withdraw(was.group, was.vip) {
                Ok(()) => {
                    tracing::warn!(loadbalancer = %lb, vip = %was.vip, driver = self.driver.name(), "VIP withdrawn: no amphora to send it to");
                    self.applied.remove(&lb);
                    self.errors.remove(&lb);
                }
                Err(e) => self.failed(&lb, &e),
            }
        }
        let in_use: HashSet<u32> = self
            .applied
            .values()
            .flat_map(|s| s.targets.iter().map(|t| t.id))
            .collect();
        let unused: Vec<Target> = self
            .known
            .values()
            .filter(|t| !in_use.contains(&t.id))
            .cloned()
            .collect();
        for t in unused {
            match self.driver.forget(&t) {
                Ok(()) => {
                    self.known.remove(&t.id);
                }
                Err(e) => self.failed(&format!("target {}", t.address), &e),
            }
        }
        self.publish(ctl);
    }

    /// Amphorae some VIP is still sent to (kept from being emptied).
    fn publish(&self, ctl: &Controller) {
        let now: HashSet<String> = self
            .applied
            .values()
            .flat_map(|s| s.targets.iter().map(|t| t.amphora.clone()))
            .collect();
        *ctl.targeted.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    fn failed(&mut self, what: &str, e: &DistributorError) {
        let msg = e.to_string();
        if self.errors.get(what) != Some(&msg) {
            tracing::error!(object = %what, driver = self.driver.name(), error = %msg, "distributor change failed; retrying every check");
            self.errors.insert(what.to_owned(), msg);
        }
    }
}

/// Keeps the driver in step; runs until `stopped`. Woken by
/// `ctl.distribute` after pushes, and every check interval for staleness.
pub async fn run(
    ctl: Arc<Controller>,
    driver: Box<dyn Driver>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let every = ctl
        .config
        .health
        .as_ref()
        .map_or(Duration::from_secs(1), Health::check_interval);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut r = Some(Reconciler {
        driver,
        applied: HashMap::new(),
        known: HashMap::new(),
        errors: HashMap::new(),
    });
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctl.distribute.notified() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let Some(mut rec) = r.take() else { return };
        let c = ctl.clone();
        // Netlink calls block (briefly): off the runtime's threads.
        match tokio::task::spawn_blocking(move || {
            rec.pass(&c);
            rec
        })
        .await
        {
            Ok(rec) => r = Some(rec),
            Err(e) => {
                tracing::error!(error = %e, "distributor pass failed; distributor stopped");
                return;
            }
        }
    }
}
