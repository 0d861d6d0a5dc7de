//! Member health: active checks ([`probe`], [`ping`]) run by the health
//! thread ([`monitor`]) with rise/fall counting ([`track`]), passive
//! ejection reported by the workers ([`Ejector`]), and the control side's
//! record of every member's state ([`Book`]).
//!
//! The book is what balancing uses: a member is usable when it is admin-up
//! and its record says up. Only the health thread's [`Change`]s and a new
//! config move it; each change rebuilds just that member's pool.

pub mod monitor;
pub mod ping;
pub mod probe;
pub mod track;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::UnboundedSender;

use crate::config::{HttpMethod, MonitorType, ParsedMember, Pool, Valid};
use crate::stats::MemberStats;
use monitor::Input;
use probe::{Check, HttpCheck};

/// A member, by its pool's and its own id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub pool: String,
    pub member: String,
}

/// What the health thread watches for one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: MemberKey,
    /// Where the member's connections go. Its health belongs to this
    /// address: re-pointing a member starts it over, up.
    pub addr: SocketAddr,
    /// Changes when anything below changes: results of an older check are
    /// then ignored, and the member starts over (up, counts at zero).
    pub check_id: u64,
    /// `None`: no (enabled) monitor; only passive ejection applies.
    pub check: Option<Check>,
    pub delay: Duration,
    /// Successes in a row to go up (`max_retries`).
    pub rise: u32,
    /// Failures in a row to go down (`max_retries_down`).
    pub fall: u32,
}

impl Target {
    fn same_check(&self, other: &Target) -> bool {
        (self.addr, &self.check, self.delay, self.rise, self.fall)
            == (
                other.addr,
                &other.check,
                other.delay,
                other.rise,
                other.fall,
            )
    }
}

/// A member went up or down.
#[derive(Debug, Clone)]
pub struct Change {
    pub key: MemberKey,
    pub check_id: u64,
    pub up: bool,
    pub reason: String,
}

/// The control side's view of one member's health.
#[derive(Debug, Clone)]
pub struct Record {
    pub target: Target,
    pub up: bool,
    /// When `up` last changed (or the member got its current check).
    pub since: SystemTime,
    /// Why it is in its state, once a check or ejection said so.
    pub reason: Option<String>,
}

/// Health records of the admin-up members of one generation.
#[derive(Debug, Clone, Default)]
pub struct Book {
    records: HashMap<MemberKey, Record>,
    next_id: u64,
}

impl Book {
    /// The records for `config`: a member whose address and check are
    /// unchanged keeps its state; a new member, or one whose address or
    /// check changed, starts up.
    /// Addresses and codes come from what validation parsed.
    pub fn plan(&self, valid: &Valid, now: SystemTime) -> Book {
        let mut next_id = self.next_id;
        let mut records = HashMap::new();
        for (pool, parsed) in valid.config().pools.iter().zip(&valid.parsed().pools) {
            let members = pool.members.iter().zip(&parsed.members);
            for (m, pm) in members.filter(|(m, _)| m.admin_state_up) {
                let key = MemberKey {
                    pool: pool.id.clone(),
                    member: m.id.clone(),
                };
                let expected = parsed.expected_codes.as_deref();
                let mut target = target(pool, pm, expected, key.clone());
                let record = match self.records.get(&key) {
                    Some(old) if old.target.same_check(&target) => old.clone(),
                    _ => {
                        next_id += 1;
                        target.check_id = next_id;
                        Record {
                            target,
                            up: true,
                            since: now,
                            reason: None,
                        }
                    }
                };
                records.insert(key, record);
            }
        }
        Book { records, next_id }
    }

    /// Whether new connections may go to this member (admin state aside).
    pub fn is_up(&self, pool: &str, member: &str) -> bool {
        let key = MemberKey {
            pool: pool.to_owned(),
            member: member.to_owned(),
        };
        self.records.get(&key).is_none_or(|r| r.up)
    }

    pub fn get(&self, key: &MemberKey) -> Option<&Record> {
        self.records.get(key)
    }

    /// Records a change; false if it is stale (an older check) or says
    /// nothing new.
    pub fn apply(&mut self, change: Change, now: SystemTime) -> bool {
        let Some(r) = self.records.get_mut(&change.key) else {
            return false;
        };
        if r.target.check_id != change.check_id || r.up == change.up {
            return false;
        }
        r.up = change.up;
        r.since = now;
        r.reason = Some(change.reason);
        true
    }
}

/// The check of member `m` of `pool`, from what validation parsed.
fn target(
    pool: &Pool,
    m: &ParsedMember,
    expected: Option<&[(u16, u16)]>,
    key: MemberKey,
) -> Target {
    let hm = pool.healthmonitor.as_ref().filter(|h| h.admin_state_up);
    let secs = |v: i64| Duration::from_secs(u64::try_from(v).unwrap_or(1).max(1));
    let count = |v: i64| u32::try_from(v).unwrap_or(1).max(1);
    let check = hm.map(|h| {
        let http = matches!(h.kind, MonitorType::Http | MonitorType::Https).then(|| HttpCheck {
            method: h.http_method.unwrap_or(HttpMethod::Get),
            path: h.url_path.clone().unwrap_or_else(|| "/".to_owned()),
            expected: expected.map_or_else(|| vec![(200, 200)], <[_]>::to_vec),
        });
        Check {
            kind: h.kind,
            target: m.monitor,
            timeout: secs(h.timeout),
            http,
        }
    });
    Target {
        key,
        addr: m.addr,
        check_id: 0,
        check,
        delay: hm.map_or(Duration::ZERO, |h| secs(h.delay)),
        rise: hm.map_or(1, |h| count(h.max_retries)),
        fall: hm.map_or(1, |h| count(h.max_retries_down)),
    }
}

/// Why a connect to a member failed, as far as the member is to blame.
/// Failures on the proxy's own side (descriptors, memory, local ports) are
/// not reported at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused, reset or unreachable: the member (or its host) said no.
    Refused,
    /// No answer within `timeout_member_connect`: possibly only overload.
    TimedOut,
}

/// How workers report connect failures in a row: every `after` refusals
/// (or `after_timeouts` timeouts) in a row send one ejection to the health
/// thread, which decides whether the pool can spare the member. 0 = never.
#[derive(Debug, Clone, Default)]
pub struct Ejector {
    pub after: u32,
    pub after_timeouts: u32,
    pub tx: Option<UnboundedSender<Input>>,
}

impl Ejector {
    /// A connect to the member failed for a reason of the member's.
    pub fn failed(&self, stats: &Arc<MemberStats>, worker: usize, why: ConnectFailure) {
        let counters = stats.worker(worker);
        counters.connect_errors.add(1);
        let (row, after) = match why {
            ConnectFailure::Refused => (&stats.failures_in_row, self.after),
            ConnectFailure::TimedOut => {
                counters.connect_timeouts.add(1);
                (&stats.timeouts_in_row, self.after_timeouts)
            }
        };
        let n = row.fetch_add(1, Relaxed).wrapping_add(1);
        if after == 0 || n % after != 0 {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Input::Eject {
                stats: stats.clone(),
                failures: n,
                why,
            });
        }
    }

    /// A connect to the member succeeded.
    #[inline]
    pub fn connected(stats: &MemberStats) {
        if stats.failures_in_row.load(Relaxed) != 0 {
            stats.failures_in_row.store(0, Relaxed);
        }
        if stats.timeouts_in_row.load(Relaxed) != 0 {
            stats.timeouts_in_row.store(0, Relaxed);
        }
    }

    /// Starts both counts over (re-admission, a new address).
    pub fn reset(stats: &MemberStats) {
        stats.failures_in_row.store(0, Relaxed);
        stats.timeouts_in_row.store(0, Relaxed);
    }
}
