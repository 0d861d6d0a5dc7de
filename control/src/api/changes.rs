//! `GET /v2/siphon/changes?since=N&wait=S` (Siphon extension): the
//! statuses and counters that moved after change `N`, for a front end
//! that mirrors them (the Octavia provider's agent reports them to
//! Octavia's driver agent as they come).
//!
//! The answer is shaped like octavia-lib's status and statistics updates:
//! one list per kind of `{id, provisioning_status, operating_status}`,
//! `provisioning_status` `DELETED` for an object gone, and the counters of
//! every listener whose counters moved. `head` is the change the answer
//! is as of: the next request asks `since=head`. With `wait`, the answer
//! waits (up to 60 s, and under the API's idle timeout, 30 s by default)
//! until something changes: a long poll, answered as
//! soon as this controller writes and within a second of another
//! controller's write. `since=0`, or a number further back than the
//! change log reaches, answers everything (`full: true`) with every
//! delete of the last week.
//!
//! Every status is reported as it is, `PENDING_*` included: the follower
//! decides what to pass on. An object reported comes with its load
//! balancer and that one's listeners and pools, whether they moved or
//! not: Octavia locks them all (`PENDING_UPDATE`) for a change of any
//! child and waits to hear them back, where Siphon locks the load
//! balancer only, and not at all for a change the amphorae do not see.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::fault::Fault;
use super::{wrapped, ApiResult, Ctl};
use crate::model::{Common, State};
use crate::store::{Followed, Kind};
use crate::Controller;

/// Longest long poll asked for; the wait is also kept under the API's
/// idle timeout (`[limits] idle_timeout_ms`), which would cut it.
const MAX_WAIT: u64 = 60;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new().route("/siphon/changes", get(changes))
}

async fn changes(ctl: Ctl, RawQuery(q): RawQuery) -> ApiResult {
    let mut since = 0;
    let mut wait = 0;
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        match &*k {
            "since" => {
                since = v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    Fault::invalid("since", &v, "Value should be a change number (0 or more)")
                })?;
            }
            "wait" => {
                wait = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= MAX_WAIT)
                    .ok_or_else(|| {
                        Fault::invalid(
                            "wait",
                            &v,
                            &format!("Value should be seconds from 0 to {MAX_WAIT}"),
                        )
                    })?;
            }
            other => {
                return Err(Fault::bad_request(format!(
                    "Unknown query parameter '{other}': changes takes since and wait"
                )))
            }
        }
    }
    let idle = Duration::from_millis(ctl.config.limits.idle_timeout_ms);
    let wait = Duration::from_secs(wait).min(idle.mul_f64(0.8));
    ctl.db.wait_past(since, wait).await?;
    let (head, followed) = ctl.db.changed_since(since).await?;
    let v = ctl.db.read(|s| report(s, head, &followed));
    Ok(wrapped(StatusCode::OK, "changes", v))
}

/// The lists of one answer.
#[derive(Default)]
struct Report {
    loadbalancers: Vec<Value>,
    listeners: Vec<Value>,
    pools: Vec<Value>,
    members: Vec<Value>,
    healthmonitors: Vec<Value>,
    listener_stats: Vec<Value>,
}

impl Report {
    fn list(&mut self, kind: Kind) -> Option<&mut Vec<Value>> {
        match kind {
            Kind::LoadBalancer => Some(&mut self.loadbalancers),
            Kind::Listener => Some(&mut self.listeners),
            Kind::Pool => Some(&mut self.pools),
            Kind::Member => Some(&mut self.members),
            Kind::HealthMonitor => Some(&mut self.healthmonitors),
            Kind::Amphora => None,
        }
    }

    /// The object `id` of `kind` as `s` has it, or `DELETED`.
    fn object(&mut self, s: &State, kind: Kind, id: &str) {
        let entry = found(s, kind, id).map(|(c, _)| c).map_or_else(
            || json!({ "id": id, "provisioning_status": "DELETED" }),
            status,
        );
        if let Some(list) = self.list(kind) {
            list.push(entry);
        }
    }

    fn stats(&mut self, s: &State, listener: &str) {
        if s.listeners.contains_key(listener) {
            let mut v = super::loadbalancers::stats_view(&s.listener_counters(listener));
            v["id"] = json!(listener);
            self.listener_stats.push(v);
        }
    }
}

/// The object `id` of `kind`, if it is still there, and the load balancer
/// it belongs to.
fn found<'a>(s: &'a State, kind: Kind, id: &str) -> Option<(&'a Common, &'a str)> {
    match kind {
        Kind::LoadBalancer => s.load_balancers.get(id).map(|v| (&v.common, &*v.common.id)),
        Kind::Listener => s
            .listeners
            .get(id)
            .map(|v| (&v.common, &*v.load_balancer_id)),
        Kind::Pool => s.pools.get(id).map(|v| (&v.common, &*v.load_balancer_id)),
        Kind::Member => s.members.get(id).map(|v| (&v.common, &*v.load_balancer_id)),
        Kind::HealthMonitor => s
            .health_monitors
            .get(id)
            .map(|v| (&v.common, &*v.load_balancer_id)),
        Kind::Amphora => None,
    }
}

fn status(c: &Common) -> Value {
    json!({
        "id": c.id,
        "provisioning_status": c.provisioning_status,
        "operating_status": c.operating_status,
    })
}

fn kind_of(table: &str) -> Option<Kind> {
    [
        Kind::LoadBalancer,
        Kind::Listener,
        Kind::Pool,
        Kind::Member,
        Kind::HealthMonitor,
    ]
    .into_iter()
    .find(|k| k.table() == table)
}

fn report(s: &State, head: i64, followed: &Followed) -> Value {
    let mut r = Report::default();
    let full = matches!(followed, Followed::Everything { .. });
    match followed {
        Followed::Rows(rows) => {
            let mut seen = std::collections::HashSet::new();
            let mut lbs = Vec::new();
            for (table, id) in rows {
                if table == crate::store::sql::STATS {
                    r.stats(s, id);
                } else if let Some(kind) = kind_of(table) {
                    seen.insert((kind, id.as_str()));
                    r.object(s, kind, id);
                    lbs.extend(found(s, kind, id).map(|(_, lb)| lb));
                }
            }
            // Octavia locks a change's load balancer, its listeners and
            // the pool with the object; Siphon may not touch them (a
            // rename is ACTIVE at once), so they are reported with it.
            lbs.sort_unstable();
            lbs.dedup();
            for lb in lbs {
                if seen.insert((Kind::LoadBalancer, lb)) {
                    r.object(s, Kind::LoadBalancer, lb);
                }
                for l in s.listeners_of(lb) {
                    if seen.insert((Kind::Listener, l.common.id.as_str())) {
                        r.listeners.push(status(&l.common));
                    }
                }
                for p in s.pools_of(lb) {
                    if seen.insert((Kind::Pool, p.common.id.as_str())) {
                        r.pools.push(status(&p.common));
                    }
                }
            }
        }
        Followed::Everything { deleted } => {
            r.loadbalancers = s
                .load_balancers
                .values()
                .map(|v| status(&v.common))
                .collect();
            r.listeners = s.listeners.values().map(|v| status(&v.common)).collect();
            r.pools = s.pools.values().map(|v| status(&v.common)).collect();
            r.members = s.members.values().map(|v| status(&v.common)).collect();
            r.healthmonitors = s
                .health_monitors
                .values()
                .map(|v| status(&v.common))
                .collect();
            for (table, id) in deleted {
                // Deleted, then made again under the same id: shown as it
                // is now, above.
                if let Some(kind) = kind_of(table).filter(|k| found(s, *k, id).is_none()) {
                    r.object(s, kind, id);
                }
            }
            for id in s.listeners.keys() {
                r.stats(s, id);
            }
        }
    }
    json!({
        "head": head,
        "full": full,
        "loadbalancers": r.loadbalancers,
        "listeners": r.listeners,
        "pools": r.pools,
        "members": r.members,
        "healthmonitors": r.healthmonitors,
        "listener_stats": r.listener_stats,
    })
}
