//! `/lbaas/listeners`: CRUD and `stats`.

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
use crate::config::Distributor;
use crate::model::{
    By, Listener, ListenerProtocol, OperatingStatus, Pool, ProvisioningStatus, State,
    MAX_TIMEOUT_MS,
};
use crate::store::Op;
use crate::Controller;

/// Octavia's listener protocols that are not L4: refused as unsupported.
const NOT_L4: &[&str] = &["HTTP", "HTTPS", "TERMINATED_HTTPS", "SCTP", "PROMETHEUS"];
/// TLS and L7 fields of Octavia listeners, refused when set.
const UNSUPPORTED: &[&str] = &[
    "default_pool",
    "default_tls_container_ref",
    "sni_container_refs",
    "insert_headers",
    "l7policies",
    "client_ca_tls_container_ref",
    "client_crl_container_ref",
    "tls_ciphers",
    "tls_versions",
    "alpn_protocols",
    "hsts_max_age",
    "hsts_include_subdomains",
    "hsts_preload",
];

/// Filters a listener list through an index.
const INDEXED: &[(&str, By)] = &[
    ("loadbalancer_id", By::LoadBalancer),
    ("load_balancer_id", By::LoadBalancer),
    ("loadbalancers", By::LoadBalancer),
    ("default_pool_id", By::Pool),
];

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/lbaas/listeners", get(list).post(create))
        .route(
            "/lbaas/listeners/{id}",
            get(show).put(update).delete(delete),
        )
        .route("/lbaas/listeners/{id}/stats", get(stats))
}

async fn list(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    listing_state(&ctl, q.as_deref(), |s, q| {
        let rows = Rows::of(&s.listeners, q, INDEXED);
        list_rows(rows, |l| view::listener(s, l), q, "listeners", &at.0)?.json()
    })
}

fn get_listener<'a>(s: &'a State, id: &str) -> Result<&'a Listener, Fault> {
    s.listeners
        .get(id)
        .ok_or_else(|| Fault::not_found("Listener", id))
}

async fn show(ctl: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let v = ctl
        .db
        .read(|s| get_listener(s, &id).map(|l| view::value(&view::listener(s, l))))?;
    showing("listener", v, q.as_deref())
}

fn cidrs(b: &mut Body) -> Result<Field<Vec<String>>, Fault> {
    let f = b.strings("allowed_cidrs")?;
    if let Field::Set(list) = &f {
        for c in list {
            if c.parse::<ipnet::IpNet>().is_err() {
                return Err(Fault::invalid(
                    "allowed_cidrs",
                    c,
                    "Value should be a valid CIDR",
                ));
            }
        }
    }
    Ok(f)
}

fn timeouts(b: &mut Body) -> Result<[Field<i64>; 4], Fault> {
    Ok([
        b.int("timeout_client_data", 0, MAX_TIMEOUT_MS)?,
        b.int("timeout_member_connect", 0, MAX_TIMEOUT_MS)?,
        b.int("timeout_member_data", 0, MAX_TIMEOUT_MS)?,
        b.int("timeout_tcp_inspect", 0, MAX_TIMEOUT_MS)?,
    ])
}

/// Under `linux-ecmp` a joining amphora takes the router's buckets that
/// stayed idle for the group's idle timer, which is derived from the
/// listeners' data timeouts (see [`crate::distributor::LinuxEcmp`]): a
/// listener that never closes an idle connection would have it moved to
/// an amphora that has no socket for it, and reset. Refused.
fn check_idle_bound(ctl: &Controller, l: &Listener) -> Result<(), Fault> {
    if l.idle_bound_ms().is_some() || !matches!(ctl.config.distributor, Distributor::LinuxEcmp(_)) {
        return Ok(());
    }
    Err(Fault::bad_request(format!(
        "Validation failure: timeout_client_data ({}) and timeout_member_data ({}) must both be above 0 \
         with the linux-ecmp distributor: an idle connection that never times out would be reset \
         when an amphora joins the load balancer",
        l.timeout_client_data, l.timeout_member_data
    )))
}

fn refuse_tls(b: &mut Body) -> Result<(), Fault> {
    for f in UNSUPPORTED {
        b.unsupported(f)?;
    }
    match b.string("client_authentication", 16)? {
        Field::Set(v) if v != "NONE" => {
            Err(Fault::unsupported(format!("client_authentication = {v}")))
        }
        _ => Ok(()),
    }
}

/// A pool a listener may take as its default.
fn check_default_pool<'a>(
    s: &'a State,
    pool: &str,
    lb: &str,
    protocol: ListenerProtocol,
    listener: Option<&str>,
) -> Result<&'a Pool, Fault> {
    let p = s
        .pools
        .get(pool)
        .ok_or_else(|| Fault::not_found("Pool", pool))?;
    if p.load_balancer_id != lb {
        return Err(Fault::bad_request(format!(
            "Pool {pool} is on another load balancer"
        )));
    }
    if p.protocol.transport() != protocol {
        return Err(Fault::bad_request(format!(
            "The pool protocol '{}' is invalid while the listener protocol is '{protocol}'.",
            p.protocol
        )));
    }
    if let Some(other) = s
        .listeners_using(pool)
        .find(|l| Some(l.common.id.as_str()) != listener)
    {
        return Err(Fault::conflict(format!(
            "Pool {pool} is already in use by listener {}",
            other.common.id
        )));
    }
    Ok(p)
}

async fn create(ctl: Ctl, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "listener")?;
    let common = new_common(&mut b, OperatingStatus::Offline, true)?;
    let protocol: ListenerProtocol = b
        .word("protocol", NOT_L4)?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: protocol"))?;
    let port = b
        .int("protocol_port", 1, 65535)?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: protocol_port"))?
        as u16;
    let lb_id = b
        .string("loadbalancer_id", 36)?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: loadbalancer_id"))?;
    let connection_limit = b.int("connection_limit", -1, i64::from(i32::MAX))?.or(-1);
    let default_pool_id = b.string("default_pool_id", 36)?.set();
    let [client, connect, member, inspect] = timeouts(&mut b)?;
    let allowed_cidrs = cidrs(&mut b)?.or_default();
    refuse_tls(&mut b)?;
    b.finish()?;

    let id = common.id.clone();
    let v = ctl.db.write(|s, tx| -> Result<Value, Fault> {
        unused_id(&s.listeners, "Listener", &id)?;
        lb_for_write(s, &lb_id)?;
        if let Some(other) = s.listeners_of(&lb_id).find(|l| {
            l.protocol_port == port && l.protocol == protocol
        }) {
            return Err(Fault::conflict(format!(
                "Another Listener on this Load Balancer is already using protocol_port {port} (listener {})",
                other.common.id
            )));
        }
        if let Some(pool) = &default_pool_id {
            check_default_pool(s, pool, &lb_id, protocol, None)?;
        }
        let l = Listener {
            common,
            load_balancer_id: lb_id.clone(),
            protocol,
            protocol_port: port,
            connection_limit,
            default_pool_id,
            timeout_client_data: client.or(50_000),
            timeout_member_connect: connect.or(5_000),
            timeout_member_data: member.or(50_000),
            timeout_tcp_inspect: inspect.or(0),
            allowed_cidrs,
        };
        check_idle_bound(&ctl, &l)?;
        lock(tx, s, &lb_id);
        tx.put(l.clone());
        let after = proposed(s, tx.ops(), &lb_id)?;
        Ok(view::value(&view::listener(&after, &l)))
    }).await?;
    ctl.wake.notify_one();
    tracing::info!(listener = %id, "listener created");
    Ok(wrapped(StatusCode::CREATED, "listener", v))
}

async fn update(ctl: Ctl, Path(id): Path<String>, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "listener")?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            let mut l = get_listener(s, &id)?.clone();
            lb_for_write(s, &l.load_balancer_id)?;
            mutable(&l.common, "Listener")?;
            update_common(&mut b, &mut l.common, true)?;
            for f in ["protocol", "protocol_port", "loadbalancer_id"] {
                b.immutable(f)?;
            }
            if let Some(v) = b.int("connection_limit", -1, i64::from(i32::MAX))?.update() {
                l.connection_limit = v.unwrap_or(-1);
            }
            if let Some(v) = b.string("default_pool_id", 36)?.update() {
                if let Some(pool) = &v {
                    check_default_pool(s, pool, &l.load_balancer_id, l.protocol, Some(&id))?;
                }
                l.default_pool_id = v;
            }
            let [client, connect, member, inspect] = timeouts(&mut b)?;
            for (field, value, default) in [
                (&mut l.timeout_client_data, client, 50_000),
                (&mut l.timeout_member_connect, connect, 5_000),
                (&mut l.timeout_member_data, member, 50_000),
                (&mut l.timeout_tcp_inspect, inspect, 0),
            ] {
                if let Some(v) = value.update() {
                    *field = v.unwrap_or(default);
                }
            }
            if let Some(v) = cidrs(&mut b)?.update() {
                l.allowed_cidrs = v.unwrap_or_default();
            }
            refuse_tls(&mut b)?;
            b.finish()?;
            check_idle_bound(&ctl, &l)?;
            let lb = l.load_balancer_id.clone();
            let after = proposed(s, &[Op::put(l.clone())], &lb)?;
            if super::dataplane_changes(s, &after, &lb) {
                l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
                lock(tx, s, &lb);
            }
            tx.put(l.clone());
            Ok(view::value(&view::listener(&after, &l)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::OK, "listener", v))
}

async fn delete(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            let mut l = get_listener(s, &id)?.clone();
            lb_for_write(s, &l.load_balancer_id)?;
            mutable(&l.common, "Listener")?;
            lock(tx, s, &l.load_balancer_id);
            l.common.provisioning_status = ProvisioningStatus::PendingDelete;
            tx.put(l);
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn stats(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    let c = ctl
        .db
        .read(|s| get_listener(s, &id).map(|l| s.listener_counters(&l.common.id)))?;
    Ok(wrapped(
        StatusCode::OK,
        "stats",
        super::loadbalancers::stats_view(&c),
    ))
}
