//! `/lbaas/pools/{pool_id}/members`: CRUD and the batch `PUT`.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use super::body::{self, Body};
use super::fault::Fault;
use super::pools::get_pool;
use super::query::{list_rows, Rows};
use super::{
    lb_for_write, listing_state, lock, mutable, new_common, proposed, showing, unused_id,
    update_common, view, wrapped, ApiResult, Ctl, SelfUrl,
};
use crate::model::{Member, OperatingStatus, Pool, ProvisioningStatus, State};
use crate::store::{Op, Tx};
use crate::Controller;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route(
            "/lbaas/pools/{pool_id}/members",
            get(list).post(create).put(batch),
        )
        .route(
            "/lbaas/pools/{pool_id}/members/{id}",
            get(show).put(update).delete(delete),
        )
}

async fn list(
    ctl: Ctl,
    Path(pool_id): Path<String>,
    RawQuery(q): RawQuery,
    at: SelfUrl,
) -> ApiResult {
    listing_state(&ctl, q.as_deref(), |s, q| {
        get_pool(s, &pool_id)?;
        let rows = Rows::only(&s.members, s.members_of(&pool_id).collect());
        list_rows(rows, view::member, q, "members", &at.0)?.json()
    })
}

fn get_member<'a>(s: &'a State, pool: &str, id: &str) -> Result<&'a Member, Fault> {
    get_pool(s, pool)?;
    s.members
        .get(id)
        .filter(|m| m.pool_id == pool)
        .ok_or_else(|| Fault::not_found("Member", id))
}

async fn show(
    ctl: Ctl,
    Path((pool_id, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let v = ctl
        .db
        .read(|s| get_member(s, &pool_id, &id).map(|m| view::value(&view::member(m))))?;
    showing("member", v, q.as_deref())
}

fn ip(b: &mut Body, field: &str) -> Result<Option<Option<String>>, Fault> {
    match b.string(field, 64)?.update() {
        Some(Some(a)) => {
            let parsed: IpAddr = a
                .parse()
                .map_err(|_| Fault::invalid(field, &a, "Value should be IPv4 or IPv6 format"))?;
            Ok(Some(Some(parsed.to_string())))
        }
        other => Ok(other),
    }
}

/// A new member from its create body.
fn new_member(b: &mut Body, pool: &Pool, s: &State) -> Result<Member, Fault> {
    let monitored = s.monitor_of(&pool.common.id).is_some();
    let common = new_common(
        b,
        if monitored {
            OperatingStatus::Offline
        } else {
            OperatingStatus::NoMonitor
        },
        false,
    )?;
    let address = ip(b, "address")?
        .flatten()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: address"))?;
    let protocol_port = b
        .int("protocol_port", 1, 65535)?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: protocol_port"))?
        as u16;
    let m = Member {
        common,
        load_balancer_id: pool.load_balancer_id.clone(),
        pool_id: pool.common.id.clone(),
        address,
        protocol_port,
        weight: b.int("weight", 0, 256)?.or(1),
        backup: b.bool("backup")?.or(false),
        subnet_id: b.string("subnet_id", 36)?.set(),
        monitor_address: ip(b, "monitor_address")?.flatten(),
        monitor_port: b.int("monitor_port", 1, 65535)?.set().map(|p| p as u16),
    };
    b.unsupported("request_sriov")?;
    Ok(m)
}

/// Applies an update body to `m`.
fn update_member(b: &mut Body, m: &mut Member) -> Result<(), Fault> {
    update_common(b, &mut m.common, false)?;
    for f in ["address", "protocol_port", "subnet_id"] {
        // The batch PUT repeats them to match members; equal is fine.
        if let Some(v) = b.value(f).set() {
            let same = match f {
                "address" => {
                    v.as_str()
                        .and_then(|a| a.parse::<IpAddr>().ok())
                        .map(|a| a.to_string())
                        == Some(m.address.clone())
                }
                "protocol_port" => v.as_i64() == Some(i64::from(m.protocol_port)),
                _ => v.as_str() == m.subnet_id.as_deref(),
            };
            if !same {
                return Err(Fault::bad_request(format!(
                    "Invalid input for field/attribute {f}: it cannot be changed after creation."
                )));
            }
        }
    }
    if let Some(v) = b.int("weight", 0, 256)?.update() {
        m.weight = v.unwrap_or(1);
    }
    if let Some(v) = b.bool("backup")?.update() {
        m.backup = v.unwrap_or(false);
    }
    if let Some(v) = ip(b, "monitor_address")? {
        m.monitor_address = v;
    }
    if let Some(v) = b.int("monitor_port", 1, 65535)?.update() {
        m.monitor_port = v.map(|p| p as u16);
    }
    b.unsupported("request_sriov")?;
    Ok(())
}

fn duplicate(s: &State, pool: &str, m: &Member) -> Result<(), Fault> {
    if let Some(other) = s.members_of(pool).find(|o| {
        o.common.id != m.common.id && o.address == m.address && o.protocol_port == m.protocol_port
    }) {
        return Err(Fault::conflict(format!(
            "Another member {} on this pool is already using ip {} on protocol_port {}",
            other.common.id, m.address, m.protocol_port
        )));
    }
    Ok(())
}

async fn create(ctl: Ctl, Path(pool_id): Path<String>, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "member")?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            let pool = get_pool(s, &pool_id)?;
            lb_for_write(s, &pool.load_balancer_id)?;
            mutable(&pool.common, "Pool")?;
            let m = new_member(&mut b, pool, s)?;
            b.finish()?;
            unused_id(&s.members, "Member", &m.common.id)?;
            duplicate(s, &pool_id, &m)?;
            lock(tx, s, &pool.load_balancer_id);
            tx.put(m.clone());
            proposed(s, tx.ops(), &pool.load_balancer_id)?;
            Ok(view::value(&view::member(&m)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::CREATED, "member", v))
}

async fn update(
    ctl: Ctl,
    Path((pool_id, id)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> ApiResult {
    let mut b = body::parse(&bytes, "member")?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            let mut m = get_member(s, &pool_id, &id)?.clone();
            lb_for_write(s, &m.load_balancer_id)?;
            mutable(&m.common, "Member")?;
            update_member(&mut b, &mut m)?;
            b.finish()?;
            let lb = m.load_balancer_id.clone();
            let after = proposed(s, &[Op::put(m.clone())], &lb)?;
            if super::dataplane_changes(s, &after, &lb) {
                m.common.provisioning_status = ProvisioningStatus::PendingUpdate;
                lock(tx, s, &lb);
            }
            tx.put(m.clone());
            Ok(view::value(&view::member(&m)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::OK, "member", v))
}

fn mark_deleted(tx: &mut Tx, m: &Member) {
    let mut m = m.clone();
    m.common.provisioning_status = ProvisioningStatus::PendingDelete;
    tx.put(m);
}

async fn delete(ctl: Ctl, Path((pool_id, id)): Path<(String, String)>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            let m = get_member(s, &pool_id, &id)?;
            lb_for_write(s, &m.load_balancer_id)?;
            mutable(&m.common, "Member")?;
            lock(tx, s, &m.load_balancer_id);
            mark_deleted(tx, m);
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT .../members` `{"members": [...]}`: the pool's members become the
/// list, matched by address and port; `?additive_only=true` keeps members
/// the list does not name. 202.
async fn batch(
    ctl: Ctl,
    Path(pool_id): Path<String>,
    RawQuery(q): RawQuery,
    bytes: axum::body::Bytes,
) -> ApiResult {
    let additive = url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()).any(|(k, v)| {
        k == "additive_only" && matches!(v.to_ascii_lowercase().as_str(), "true" | "1")
    });
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Fault::bad_request(format!("Invalid JSON body: {e}")))?;
    let Some(Value::Array(items)) = v.get("members").cloned() else {
        return Err(Fault::bad_request(
            "Invalid input: the body must be {\"members\": [...]}.",
        ));
    };
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            let pool = get_pool(s, &pool_id)?;
            let lb = lb_for_write(s, &pool.load_balancer_id)?;
            mutable(&pool.common, "Pool")?;
            let mut kept = std::collections::HashSet::new();
            let mut changes: Vec<Member> = Vec::new();
            let mut unchanged: Vec<Member> = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                let mut b = Body::from_value(item, &format!("members[{i}]"))?;
                let mut new = new_member(&mut b, pool, s)?;
                b.finish()?;
                if !kept.insert((new.address.clone(), new.protocol_port)) {
                    return Err(Fault::bad_request(format!(
                        "members[{i}]: {}:{} is listed twice",
                        new.address, new.protocol_port
                    )));
                }
                match s
                    .members_of(&pool_id)
                    .find(|m| m.address == new.address && m.protocol_port == new.protocol_port)
                {
                    Some(old) => {
                        let mut m = old.clone();
                        m.common.name = new.common.name;
                        m.common.admin_state_up = new.common.admin_state_up;
                        m.common.tags = new.common.tags;
                        m.weight = new.weight;
                        m.backup = new.backup;
                        m.monitor_address = new.monitor_address;
                        m.monitor_port = new.monitor_port;
                        if m != *old {
                            mutable(&old.common, "Member")?;
                            m.common.updated_at = Some(crate::now());
                            m.common.provisioning_status = ProvisioningStatus::PendingUpdate;
                            changes.push(m);
                        } else {
                            unchanged.push(m);
                        }
                    }
                    None => {
                        unused_id(&s.members, "Member", &new.common.id)?;
                        if changes.iter().any(|m| m.common.id == new.common.id) {
                            return Err(Fault::bad_request(format!(
                                "members[{i}]: id {} is listed twice",
                                new.common.id
                            )));
                        }
                        new.common.provisioning_status = ProvisioningStatus::PendingCreate;
                        changes.push(new);
                    }
                }
            }
            for m in changes {
                tx.put(m);
            }
            if !additive {
                for m in s.members_of(&pool_id) {
                    if !kept.contains(&(m.address.clone(), m.protocol_port)) {
                        mutable(&m.common, "Member")?;
                        mark_deleted(tx, m);
                    }
                }
            }
            let moved = !tx.is_empty();
            if moved {
                lock(tx, s, &pool.load_balancer_id);
                proposed(s, tx.ops(), &pool.load_balancer_id)?;
            }
            // Written as they are, so the changes feed reports them: Octavia
            // marks every member a batch lists PENDING_UPDATE (and locks the
            // load balancer) even when nothing about it changes, and waits
            // to hear them back (api/changes.rs).
            for m in unchanged {
                tx.put(m);
            }
            if !moved {
                tx.put(lb.clone());
            }
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::ACCEPTED.into_response())
}
