//! Distributors: how a VIP's traffic is spread over the amphorae of its
//! load balancer.
//!
//! A [`Driver`] is told, per VIP, the exact set of amphorae that should
//! receive it ([`Spread`]); [`run`] keeps every driver call in step with
//! the store and the health manager (the decisions are
//! [`crate::decide::distribution`]'s):
//!
//! - an amphora is a target of its load balancer's VIP once its config
//!   and the VIP were pushed to it (a spare is added only after that);
//! - a silent one is removed once it is stale (per-amphora staleness,
//!   checked every `check_interval_ms`), and added back when heard again;
//! - unless the failover circuit breaker holds: when too many fell silent
//!   together the fault is likely on the controller's side, and the ones
//!   in the group stay there (as `FAILOVER_STOPPED` ones do);
//! - a VIP is withdrawn only when its load balancer is deleted; when no
//!   amphora qualifies (all silent, or all being replaced at once) the
//!   last set stays, so replacements are added before the old ones leave;
//! - everything is applied again every `resync_s` (create or replace,
//!   harmless when nothing changed), which repairs what changed under the
//!   controller: a flushed route, nexthops the kernel dropped when the
//!   link lost carrier, an interface or namespace created anew.
//!
//! Drivers: `noop` (the network delivers the VIP; nothing to program),
//! `linux-ecmp` ([`LinuxEcmp`]: the VIP routed on a Linux router over a
//! resilient nexthop group, one nexthop per amphora, through [`nexthop`]),
//! and `bgp` (each amphora announces its VIPs to the operator's routers:
//! nothing to program here either; the peering is pushed with the VIPs,
//! see [`crate::provision`]).

pub mod nexthop;

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{self, Health};
use crate::decide::distribution::{self as decide, Call};
use crate::liveness::Routed;
use crate::Controller;

use nexthop::{NetlinkError, Resilience, Rtnl};

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
    /// How long a connection to the VIP can stay idle before the
    /// dataplane closes it.
    pub idle: IdleBound,
}

/// The longest a connection to a VIP stays open while idle, from its
/// listeners' data timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleBound {
    /// Every listener closes idle connections, the slowest after this
    /// many ms (0: the VIP has no listener).
    Within(u64),
    /// Some listener never does (a data timeout of 0).
    Unbounded,
}

#[derive(Debug, Error)]
pub enum DistributorError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("no target of VIP {vip} could be set up")]
    NoTarget { vip: IpAddr },
}

/// What a distributor must do; every call is idempotent (create or
/// replace), so repeating one after a failure or a restart is harmless.
pub trait Driver: Send + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Sends `spread.vip` to `spread.targets`. A target that cannot be set
    /// up is left out (and returned with why); the others still get the
    /// traffic.
    fn apply(&mut self, spread: &Spread) -> Result<Vec<(Target, String)>, DistributorError>;
    /// Sends `vip` (of group `group`) nowhere.
    fn withdraw(&mut self, group: u32, vip: IpAddr) -> Result<(), DistributorError>;
    /// `target` is in no group any more.
    fn forget(&mut self, target: &Target) -> Result<(), DistributorError>;
    /// Looks at its surroundings again (before a full re-apply): an
    /// interface or namespace created anew is picked up.
    fn refresh(&mut self) -> Result<(), DistributorError> {
        Ok(())
    }
    /// How often everything is applied again in full (`None`: never).
    fn resync(&self) -> Option<Duration> {
        None
    }
}

/// The network delivers VIPs by itself: nothing to program.
#[derive(Debug)]
pub struct Noop;

impl Driver for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn apply(&mut self, _: &Spread) -> Result<Vec<(Target, String)>, DistributorError> {
        Ok(Vec::new())
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
/// buckets, adding one takes only buckets idle for the group's idle timer.
///
/// That timer is per VIP: at least `idle_timer_s`, and at least the
/// longest data timeout of the VIP's listeners plus `idle_margin_s`. A
/// bucket is idle only while no packet of its flows comes from clients,
/// so once it is idle that long the dataplane has closed every
/// connection in it, and the amphora that takes it over resets nothing
/// that was still open. A listener without a timeout (refused by the API
/// under this driver; one stored before gets 24 days, Octavia's largest
/// timeout, and a warning) cannot have that guarantee.
///
/// Ids from `first_id` up are Siphon's: an object of the wrong kind found
/// at one (left by an earlier run) is replaced.
#[derive(Debug)]
pub struct LinuxEcmp {
    rtnl: Rtnl,
    netns: Option<PathBuf>,
    /// The namespace file's inode when the socket was made.
    netns_inode: Option<u64>,
    interface: String,
    ifindex: u32,
    resilience: Resilience,
    idle_margin_s: u32,
    resync: Duration,
    /// Groups already warned about for an unbounded idle time.
    warned: std::collections::HashSet<u32>,
}

fn inode(netns: &Option<PathBuf>) -> Option<u64> {
    netns
        .as_deref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.ino())
}

impl LinuxEcmp {
    pub fn open(c: &config::LinuxEcmp) -> Result<LinuxEcmp, DistributorError> {
        let netns = c.netns.clone();
        let rtnl = Rtnl::open(netns.as_deref())?;
        let ifindex = nexthop::ifindex(netns.as_deref(), &c.interface)?;
        Ok(LinuxEcmp {
            rtnl,
            netns_inode: inode(&netns),
            netns,
            interface: c.interface.clone(),
            ifindex,
            resilience: Resilience {
                buckets: c.buckets,
                idle_timer_s: c.idle_timer_s,
                unbalanced_timer_s: c.unbalanced_timer_s,
            },
            idle_margin_s: c.idle_margin_s,
            resync: Duration::from_secs(u64::from(c.resync_s)),
            warned: Default::default(),
        })
    }

    /// The group's resilience for `spread`: its idle timer outlasts every
    /// idle connection to the VIP (see [`LinuxEcmp`]).
    fn resilience(&mut self, spread: &Spread) -> Resilience {
        let longest_ms = match spread.idle {
            IdleBound::Within(ms) => {
                self.warned.remove(&spread.group);
                ms
            }
            IdleBound::Unbounded => {
                if self.warned.insert(spread.group) {
                    tracing::warn!(vip = %spread.vip, "a listener of this VIP has a data timeout of 0: an idle connection to it may be reset when an amphora joins; its idle timer is set for 24 days");
                }
                crate::model::MAX_TIMEOUT_MS.unsigned_abs()
            }
        };
        let derived = u32::try_from(longest_ms.div_ceil(1000))
            .unwrap_or(u32::MAX)
            .saturating_add(self.idle_margin_s);
        Resilience {
            idle_timer_s: self.resilience.idle_timer_s.max(derived),
            ..self.resilience
        }
    }

    fn gateway(&mut self, t: &Target) -> Result<(), NetlinkError> {
        match self.rtnl.set_gateway(t.id, t.address, self.ifindex) {
            Ok(()) => Ok(()),
            // A group left at this id by an earlier run: ours to replace.
            Err(e) if e.is_invalid() => {
                self.rtnl.delete_nexthop(t.id)?;
                self.rtnl.set_gateway(t.id, t.address, self.ifindex)
            }
            Err(e) => Err(e),
        }
    }

    fn group(&mut self, spread: &Spread, members: &[u32]) -> Result<(), NetlinkError> {
        let resilience = self.resilience(spread);
        match self.rtnl.set_group(spread.group, members, &resilience) {
            Ok(()) => Ok(()),
            // Another bucket count than the existing group's (the kernel
            // keeps it fixed), or a plain nexthop at this id: made anew,
            // and the route with it.
            Err(e) if e.is_invalid() => {
                self.rtnl.delete_nexthop(spread.group)?;
                self.rtnl.set_group(spread.group, members, &resilience)
            }
            Err(e) => Err(e),
        }
    }
}

impl Driver for LinuxEcmp {
    fn name(&self) -> &'static str {
        "linux-ecmp"
    }

    fn apply(&mut self, spread: &Spread) -> Result<Vec<(Target, String)>, DistributorError> {
        let mut ok = Vec::new();
        let mut skipped = Vec::new();
        for t in &spread.targets {
            match self.gateway(t) {
                Ok(()) => ok.push(t.id),
                Err(e) => skipped.push((t.clone(), e.to_string())),
            }
        }
        if ok.is_empty() {
            return Err(DistributorError::NoTarget { vip: spread.vip });
        }
        self.group(spread, &ok)?;
        self.rtnl.set_route(spread.vip, spread.group)?;
        Ok(skipped)
    }

    fn withdraw(&mut self, group: u32, vip: IpAddr) -> Result<(), DistributorError> {
        self.rtnl.delete_route(vip)?;
        self.rtnl.delete_nexthop(group)?;
        Ok(())
    }

    fn forget(&mut self, target: &Target) -> Result<(), DistributorError> {
        Ok(self.rtnl.delete_nexthop(target.id)?)
    }

    fn refresh(&mut self) -> Result<(), DistributorError> {
        let now = inode(&self.netns);
        if now != self.netns_inode {
            self.rtnl = Rtnl::open(self.netns.as_deref())?;
            self.netns_inode = now;
        }
        self.ifindex = nexthop::ifindex(self.netns.as_deref(), &self.interface)?;
        Ok(())
    }

    fn resync(&self) -> Option<Duration> {
        Some(self.resync)
    }
}

/// The driver the config names.
pub fn open(c: &config::Distributor) -> Result<Box<dyn Driver>, DistributorError> {
    Ok(match c {
        // Over BGP the amphorae announce their VIPs themselves (the
        // peering goes with each push): nothing to program here.
        config::Distributor::Noop | config::Distributor::Bgp(_) => Box::new(Noop),
        config::Distributor::LinuxEcmp(e) => Box::new(LinuxEcmp::open(e)?),
    })
}

/// Runs a store call from the pass, which runs on a blocking thread (its
/// netlink calls block): the runtime's handle is there to wait on.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}

/// Gives every load balancer and allocated amphora lacking one (or holding
/// one below `first`, from an earlier setting) a distributor id, stored so
/// it survives a restart.
fn assign_ids(ctl: &Controller, first: u32) {
    let lacks = |id: Option<u32>| id.is_none_or(|i| i < first);
    let missing = ctl.db.read(|s| {
        s.load_balancers.values().any(|lb| lacks(lb.distributor_id))
            || s.amphorae
                .values()
                .any(|a| a.load_balancer_id.is_some() && lacks(a.distributor_id))
    });
    if !missing {
        return;
    }
    let r = block_on(
        ctl.db
            .write(|s, tx| -> Result<(), crate::store::StoreError> {
                let used = s
                    .load_balancers
                    .values()
                    .filter_map(|lb| lb.distributor_id)
                    .chain(s.amphorae.values().filter_map(|a| a.distributor_id))
                    .max();
                let mut next = used.map_or(first, |m| m.saturating_add(1).max(first));
                for lb in s.load_balancers.values() {
                    if lacks(lb.distributor_id) {
                        let mut lb = lb.clone();
                        lb.distributor_id = Some(next);
                        next = next.saturating_add(1);
                        tx.put(lb);
                    }
                }
                for a in s.amphorae.values() {
                    if a.load_balancer_id.is_some() && lacks(a.distributor_id) {
                        let mut a = a.clone();
                        a.distributor_id = Some(next);
                        next = next.saturating_add(1);
                        tx.put(a);
                    }
                }
                Ok(())
            }),
    );
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
    /// The last error per object, logged once, not every check.
    errors: HashMap<String, String>,
    /// When everything was last applied in full; `None`: never (start).
    full_at: Option<Instant>,
    /// A pass completed without an error: from then on `applied` is all
    /// the kernel holds of ours (a restart forgets what it applied).
    settled: bool,
}

impl Reconciler {
    fn new(driver: Box<dyn Driver>) -> Reconciler {
        Reconciler {
            driver,
            applied: HashMap::new(),
            known: HashMap::new(),
            errors: HashMap::new(),
            full_at: None,
            settled: false,
        }
    }

    fn pass(&mut self, ctl: &Controller) {
        // Without the database nothing is decided: what the kernel holds
        // stays as it is until the state can be read fresh again.
        if let Err(e) = block_on(ctl.db.refresh()) {
            self.failed("database", &e.to_string());
            return;
        }
        self.errors.remove("database");
        if let config::Distributor::LinuxEcmp(e) = &ctl.config.distributor {
            assign_ids(ctl, e.first_id);
        }
        let first = self.full_at.is_none();
        // Everything applied again below, whatever was applied before.
        let full = match (self.full_at, self.driver.resync()) {
            (None, _) => true,
            (Some(t), Some(every)) => t.elapsed() >= every,
            (Some(_), None) => false,
        };
        if full {
            if let Err(e) = self.driver.refresh() {
                self.failed("driver", &e.to_string());
            }
            self.full_at = Some(Instant::now());
        }
        let (desired, leftovers) = ctl.db.read(|s| {
            let view = ctl.view();
            let leftovers = if first {
                decide::leftovers(s)
            } else {
                Vec::new()
            };
            (
                decide::desired(s, &view, &ctl.policy, &self.applied),
                leftovers,
            )
        });
        let mut clean = true;
        for (lb, group, vip) in leftovers {
            if let Err(e) = self.driver.withdraw(group, vip) {
                clean = false;
                self.failed(&lb, &e.to_string());
            }
        }
        let mut target_errors: Vec<(String, Option<String>)> = Vec::new();
        for call in decide::plan(&desired, &self.applied, full) {
            match call {
                Call::Apply { lb, spread } => {
                    if !self.apply(&lb, spread, &mut target_errors) {
                        clean = false;
                    }
                }
                Call::Withdraw { lb, group, vip } => match self.driver.withdraw(group, vip) {
                    Ok(()) => {
                        tracing::info!(loadbalancer = %lb, %vip, driver = self.driver.name(), "VIP withdrawn: load balancer deleted");
                        self.applied.remove(&lb);
                        self.errors.remove(&lb);
                    }
                    Err(e) => {
                        clean = false;
                        self.failed(&lb, &e.to_string());
                    }
                },
            }
        }
        for t in decide::unused(&self.applied, &self.known) {
            let what = format!("target {}", t.address);
            match self.driver.forget(&t) {
                Ok(()) => {
                    self.known.remove(&t.id);
                    self.errors.remove(&what);
                }
                Err(e) => {
                    clean = false;
                    self.failed(&what, &e.to_string());
                }
            }
        }
        self.settled |= clean;
        self.note_on_amphorae(ctl, &target_errors);
        self.publish(ctl);
    }

    /// Sends `spread` to the driver; `false` when some of it failed.
    fn apply(
        &mut self,
        lb: &str,
        spread: Spread,
        target_errors: &mut Vec<(String, Option<String>)>,
    ) -> bool {
        let changed = self
            .applied
            .get(lb)
            .is_none_or(|b| b.targets != spread.targets || b.idle != spread.idle);
        let skipped = match self.driver.apply(&spread) {
            Ok(skipped) => skipped,
            Err(e) => {
                self.failed(lb, &e.to_string());
                return false;
            }
        };
        if changed {
            let targets: Vec<String> = spread
                .targets
                .iter()
                .map(|t| t.address.to_string())
                .collect();
            tracing::info!(loadbalancer = %lb, vip = %spread.vip, driver = self.driver.name(), ?targets, idle = ?spread.idle, "VIP distributed");
        }
        let mut clean = true;
        for t in &spread.targets {
            self.known.insert(t.id, t.clone());
            let why = skipped.iter().find(|(s, _)| s == t).map(|(_, e)| e.clone());
            if let Some(e) = &why {
                clean = false;
                self.failed(&format!("amphora {}", t.amphora), e);
            }
            target_errors.push((t.amphora.clone(), why));
        }
        // Failed targets are tried again at the next full re-apply, not
        // every check.
        self.applied.insert(lb.to_owned(), spread);
        self.errors.remove(lb);
        clean
    }

    /// Why an amphora gets no VIP traffic, on the amphora (`error`), and
    /// cleared once it does; written only when something changes.
    fn note_on_amphorae(&self, ctl: &Controller, notes: &[(String, Option<String>)]) {
        const PREFIX: &str = "distributor: ";
        let changes: Vec<(String, Option<String>)> = ctl.db.read(|s| {
            notes
                .iter()
                .filter_map(|(id, why)| {
                    let a = s.amphorae.get(id)?;
                    let ours = a.error.as_deref().is_some_and(|e| e.starts_with(PREFIX));
                    let want = match why {
                        Some(w) => Some(format!("{PREFIX}{w}")),
                        // Another kind of error is not ours to clear.
                        None if !ours => return None,
                        None => None,
                    };
                    (a.error != want).then(|| (id.clone(), want))
                })
                .collect()
        });
        if changes.is_empty() {
            return;
        }
        let _ = block_on(
            ctl.db
                .write(|s, tx| -> Result<(), crate::store::StoreError> {
                    for (id, want) in &changes {
                        if let Some(a) = s.amphorae.get(id) {
                            let mut a = a.clone();
                            a.error = want.clone();
                            tx.put(a);
                        }
                    }
                    Ok(())
                }),
        );
    }

    /// Amphorae some VIP is still sent to (kept from being emptied);
    /// unknown until a pass went through clean.
    fn publish(&self, ctl: &Controller) {
        let routed = if self.settled {
            Routed::Known(
                self.applied
                    .values()
                    .flat_map(|s| s.targets.iter().map(|t| t.amphora.clone()))
                    .collect(),
            )
        } else {
            Routed::Unknown
        };
        ctl.routed.send_if_modified(|r| {
            let changed = *r != routed;
            *r = routed;
            changed
        });
    }

    fn failed(&mut self, what: &str, msg: &str) {
        if self.errors.get(what).map(String::as_str) != Some(msg) {
            tracing::error!(object = %what, driver = self.driver.name(), error = %msg, "distributor change failed; tried again at the next check");
            self.errors.insert(what.to_owned(), msg.to_owned());
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
    let mut r = Some(Reconciler::new(driver));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctl.distribute.notified() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let rec = match r.take() {
            Some(rec) => rec,
            // The last pass panicked: start over with a new driver (a
            // full re-apply, as at start).
            None => match open(&ctl.config.distributor) {
                Ok(d) => Reconciler::new(d),
                Err(e) => {
                    tracing::error!(error = %e, "distributor cannot start again; retrying");
                    continue;
                }
            },
        };
        let c = ctl.clone();
        // Netlink calls block (briefly): off the runtime's threads.
        let mut rec = rec;
        match tokio::task::spawn_blocking(move || {
            rec.pass(&c);
            rec
        })
        .await
        {
            Ok(rec) => r = Some(rec),
            Err(e) => tracing::error!(error = %e, "distributor pass failed; starting it over"),
        }
    }
}
