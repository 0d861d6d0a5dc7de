//! `/lbaas/pools`: CRUD.

use std::sync::Arc;

use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use super::body::{self, Body, Field};
use super::fault::Fault;
use super::query::{list_rows, Rows};
use super::{
    lb_for_write, listing_state, lock, mutable, new_common, proposed, showing, unused_id,
    update_common, view, wrapped, ApiResult, Ctl, SelfUrl,
};
use crate::model::{
    By, OperatingStatus, PersistenceType, Pool, PoolProtocol, ProvisioningStatus,
    SessionPersistence, State,
};
use crate::store::{Op, Tx};
use crate::Controller;

/// Octavia's pool protocols that are not L4: refused as unsupported.
const NOT_L4: &[&str] = &["HTTP", "HTTPS", "SCTP"];
const UNSUPPORTED: &[&str] = &[
    "healthmonitor",
    "members",
    "tls_enabled",
    "tls_container_ref",
    "ca_tls_container_ref",
    "crl_container_ref",
    "tls_ciphers",
    "tls_versions",
    "alpn_protocols",
];

/// Filters a pool list through an index.
const INDEXED: &[(&str, By)] = &[
    ("loadbalancer_id", By::LoadBalancer),
    ("load_balancer_id", By::LoadBalancer),
    ("loadbalancers", By::LoadBalancer),
];

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/lbaas/pools", get(list).post(create))
        .route("/lbaas/pools/{id}", get(show).put(update).delete(delete))
}

async fn list(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    listing_state(&ctl, q.as_deref(), |s, q| {
        let rows = Rows::of(&s.pools, q, INDEXED);
        list_rows(rows, |p| view::pool(s, p), q, "pools", &at.0)?.json()
    })
}

pub fn get_pool<'a>(s: &'a State, id: &str) -> Result<&'a Pool, Fault> {
    s.pools.get(id).ok_or_else(|| Fault::not_found("Pool", id))
}

async fn show(ctl: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let v = ctl
        .db
        .read(|s| get_pool(s, &id).map(|p| view::value(&view::pool(s, p))))?;
    showing("pool", v, q.as_deref())
}

fn session_persistence(b: &mut Body) -> Result<Field<SessionPersistence>, Fault> {
    Ok(match b.value("session_persistence") {
        Field::Set(v) => {
            let mut sp = Body::from_value(v, "session_persistence")?;
            let kind: PersistenceType = sp
                .word("type", &["HTTP_COOKIE", "APP_COOKIE"])?
                .set()
                .ok_or_else(|| {
                    Fault::bad_request("Mandatory field missing: session_persistence.type")
                })?;
            if sp.string("cookie_name", 255)?.set().is_some() {
                return Err(Fault::bad_request(
                    "Cookie names are not supported for SOURCE_IP persistence",
                ));
            }
            let out = SessionPersistence {
                kind,
                cookie_name: None,
                persistence_timeout: sp.int("persistence_timeout", 0, i64::from(i32::MAX))?.set(),
                persistence_granularity: sp.string("persistence_granularity", 64)?.set(),
            };
            sp.finish()?;
            Field::Set(out)
        }
        Field::Null => Field::Null,
        Field::Absent => Field::Absent,
    })
}

fn refuse_tls(b: &mut Body) -> Result<(), Fault> {
    for f in UNSUPPORTED {
        b.unsupported(f)?;
    }
    Ok(())
}

async fn create(ctl: Ctl, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "pool")?;
    let common = new_common(&mut b, OperatingStatus::Offline, true)?;
    let listener_id = b.string("listener_id", 36)?.set();
    let lb_given = b.string("loadbalancer_id", 36)?.set();
    let protocol: PoolProtocol = b
        .word("protocol", NOT_L4)?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: protocol"))?;
    let lb_algorithm = b
        .word("lb_algorithm", &[])?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: lb_algorithm"))?;
    let sp = session_persistence(&mut b)?.set();
    refuse_tls(&mut b)?;
    b.finish()?;
    if listener_id.is_none() && lb_given.is_none() {
        return Err(Fault::bad_request(
            "Either listener_id or loadbalancer_id must be specified.",
        ));
    }

    let id = common.id.clone();
    let v = ctl.db.write(|s, tx| -> Result<Value, Fault> {
        unused_id(&s.pools, "Pool", &id)?;
        let lb_id = match &listener_id {
            Some(lid) => {
                let l = s
                    .listeners
                    .get(lid)
                    .ok_or_else(|| Fault::not_found("Listener", lid))?;
                if lb_given.as_ref().is_some_and(|g| *g != l.load_balancer_id) {
                    return Err(Fault::bad_request(
                        "The listener is on another load balancer than loadbalancer_id",
                    ));
                }
                if let Some(p) = &l.default_pool_id {
                    return Err(Fault::conflict(format!(
                        "Listener {lid} already has default pool {p}"
                    )));
                }
                if l.protocol != protocol.transport() {
                    return Err(Fault::bad_request(format!(
                        "The pool protocol '{protocol}' is invalid while the listener protocol is '{}'.",
                        l.protocol
                    )));
                }
                l.load_balancer_id.clone()
            }
            None => lb_given.clone().unwrap_or_default(),
        };
        lb_for_write(s, &lb_id)?;
        let p = Pool {
            common,
            load_balancer_id: lb_id.clone(),
            protocol,
            lb_algorithm,
            session_persistence: sp,
        };
        lock(tx, s, &lb_id);
        tx.put(p.clone());
        if let Some(lid) = &listener_id {
            // The listener now points at the pool (after `lock` marked it).
            let mut l = s.listeners[lid].clone();
            l.default_pool_id = Some(p.common.id.clone());
            if l.common.provisioning_status == ProvisioningStatus::Active {
                l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
            }
            tx.put(l);
        }
        let after = proposed(s, tx.ops(), &lb_id)?;
        Ok(view::value(&view::pool(&after, &p)))
    }).await?;
    ctl.wake.notify_one();
    tracing::info!(pool = %id, "pool created");
    Ok(wrapped(StatusCode::CREATED, "pool", v))
}

async fn update(ctl: Ctl, Path(id): Path<String>, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "pool")?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            let mut p = get_pool(s, &id)?.clone();
            lb_for_write(s, &p.load_balancer_id)?;
            mutable(&p.common, "Pool")?;
            update_common(&mut b, &mut p.common, true)?;
            for f in ["protocol", "listener_id", "loadbalancer_id"] {
                b.immutable(f)?;
            }
            if let Some(a) = b.word("lb_algorithm", &[])?.set() {
                p.lb_algorithm = a;
            }
            if let Some(sp) = session_persistence(&mut b)?.update() {
                p.session_persistence = sp;
            }
            refuse_tls(&mut b)?;
            b.finish()?;
            let lb = p.load_balancer_id.clone();
            let after = proposed(s, &[Op::put(p.clone())], &lb)?;
            if super::dataplane_changes(s, &after, &lb) {
                p.common.provisioning_status = ProvisioningStatus::PendingUpdate;
                lock(tx, s, &lb);
            }
            tx.put(p.clone());
            Ok(view::value(&view::pool(&after, &p)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::OK, "pool", v))
}

/// The pool, its members and monitor go `PENDING_DELETE`; listeners that
/// used it lose it as their default.
pub fn mark_pool_deleted(s: &State, tx: &mut Tx, pool: &Pool) {
    let pd = ProvisioningStatus::PendingDelete;
    let id = pool.common.id.as_str();
    for m in s.members_of(id) {
        let mut m = m.clone();
        m.common.provisioning_status = pd;
        tx.put(m);
    }
    if let Some(h) = s.monitor_of(id) {
        let mut h = h.clone();
        h.common.provisioning_status = pd;
        tx.put(h);
    }
    for l in s.listeners_using(id) {
        let mut l = l.clone();
        l.default_pool_id = None;
        if l.common.provisioning_status == ProvisioningStatus::Active {
            l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
        }
        tx.put(l);
    }
    let mut p = pool.clone();
    p.common.provisioning_status = pd;
    tx.put(p);
}

async fn delete(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            let p = get_pool(s, &id)?;
            lb_for_write(s, &p.load_balancer_id)?;
            mutable(&p.common, "Pool")?;
            lock(tx, s, &p.load_balancer_id);
            mark_pool_deleted(s, tx, p);
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}
