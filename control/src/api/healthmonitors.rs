//! `/lbaas/healthmonitors`: CRUD (one monitor per pool).

use std::sync::Arc;

use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use super::body::{self, Body, Field};
use super::fault::Fault;
use super::pools::get_pool;
use super::query::{list_rows, Rows};
use super::{
    lb_for_write, listing_state, lock, mutable, new_common, proposed, showing, unused_id,
    update_common, view, wrapped, ApiResult, Ctl, SelfUrl,
};
use crate::model::{
    By, HealthMonitor, HttpMethod, MonitorType, OperatingStatus, ProvisioningStatus, State,
};
use crate::store::Op;
use crate::Controller;

const MAX_SECONDS: i64 = i32::MAX as i64;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/lbaas/healthmonitors", get(list).post(create))
        .route(
            "/lbaas/healthmonitors/{id}",
            get(show).put(update).delete(delete),
        )
}

async fn list(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    listing_state(&ctl, q.as_deref(), |s, q| {
        let rows = Rows::of(
            &s.health_monitors,
            q,
            &[("pool_id", By::Pool), ("pools", By::Pool)],
        );
        list_rows(rows, view::health_monitor, q, "healthmonitors", &at.0)?.json()
    })
}

fn get_monitor<'a>(s: &'a State, id: &str) -> Result<&'a HealthMonitor, Fault> {
    s.health_monitors
        .get(id)
        .ok_or_else(|| Fault::not_found("Health Monitor", id))
}

async fn show(ctl: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let v = ctl
        .db
        .read(|s| get_monitor(s, &id).map(|h| view::value(&view::health_monitor(h))))?;
    showing("healthmonitor", v, q.as_deref())
}

fn http_version(b: &mut Body) -> Result<Field<f64>, Fault> {
    Ok(match b.value("http_version") {
        Field::Set(v) => {
            let n = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()));
            match n {
                Some(n) if n == 1.0 || n == 1.1 => Field::Set(n),
                _ => {
                    return Err(Fault::invalid(
                        "http_version",
                        v,
                        "Value should be one of: 1.0, 1.1",
                    ))
                }
            }
        }
        Field::Null => Field::Null,
        Field::Absent => Field::Absent,
    })
}

/// The optional fields, applied to `h` (create and update alike).
fn optional_fields(b: &mut Body, h: &mut HealthMonitor) -> Result<(), Fault> {
    if let Some(v) = b.int("max_retries_down", 1, 10)?.update() {
        h.max_retries_down = v.unwrap_or(3);
    }
    if let Some(v) = b.word("http_method", &[])?.update() {
        h.http_method = v;
    }
    if let Some(v) = b.string("url_path", 2048)?.update() {
        h.url_path = v;
    }
    if let Some(v) = b.string("expected_codes", 64)?.update() {
        h.expected_codes = v;
    }
    if let Some(v) = http_version(b)?.update() {
        h.http_version = v;
    }
    if let Some(v) = b.string("domain_name", 255)?.update() {
        h.domain_name = v;
    }
    let http = matches!(h.kind, MonitorType::Http | MonitorType::Https);
    if http {
        // Octavia's defaults for HTTP checks.
        h.http_method.get_or_insert(HttpMethod::Get);
        h.url_path.get_or_insert_with(|| "/".to_owned());
        h.expected_codes.get_or_insert_with(|| "200".to_owned());
    } else if h.http_method.is_some()
        || h.url_path.is_some()
        || h.expected_codes.is_some()
        || h.http_version.is_some()
        || h.domain_name.is_some()
    {
        return Err(Fault::bad_request(format!(
            "http_method, url_path, expected_codes, http_version and domain_name are only valid for HTTP and HTTPS health monitors, not {}",
            h.kind
        )));
    }
    if h.timeout > h.delay {
        return Err(Fault::bad_request(format!(
            "The timeout ({}) must be less than or equal to the delay ({}).",
            h.timeout, h.delay
        )));
    }
    Ok(())
}

async fn create(ctl: Ctl, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "healthmonitor")?;
    let common = new_common(&mut b, OperatingStatus::Offline, false)?;
    let mandatory = |f: &str| Fault::bad_request(format!("Mandatory field missing: {f}"));
    let pool_id = b
        .string("pool_id", 36)?
        .set()
        .ok_or_else(|| mandatory("pool_id"))?;
    let kind = b
        .word("type", &["SCTP"])?
        .set()
        .ok_or_else(|| mandatory("type"))?;
    let delay = b
        .int("delay", 0, MAX_SECONDS)?
        .set()
        .ok_or_else(|| mandatory("delay"))?;
    let timeout = b
        .int("timeout", 0, MAX_SECONDS)?
        .set()
        .ok_or_else(|| mandatory("timeout"))?;
    let max_retries = b
        .int("max_retries", 1, 10)?
        .set()
        .ok_or_else(|| mandatory("max_retries"))?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            unused_id(&s.health_monitors, "Health Monitor", &common.id)?;
            let pool = get_pool(s, &pool_id)?;
            lb_for_write(s, &pool.load_balancer_id)?;
            mutable(&pool.common, "Pool")?;
            if let Some(h) = s.monitor_of(&pool_id) {
                return Err(Fault::conflict(format!(
                    "Pool {pool_id} already has health monitor {}",
                    h.common.id
                )));
            }
            let mut h = HealthMonitor {
                common,
                load_balancer_id: pool.load_balancer_id.clone(),
                pool_id: pool_id.clone(),
                kind,
                delay,
                timeout,
                max_retries,
                max_retries_down: 3,
                http_method: None,
                url_path: None,
                expected_codes: None,
                http_version: None,
                domain_name: None,
            };
            optional_fields(&mut b, &mut h)?;
            b.finish()?;
            lock(tx, s, &pool.load_balancer_id);
            tx.put(h.clone());
            proposed(s, tx.ops(), &pool.load_balancer_id)?;
            Ok(view::value(&view::health_monitor(&h)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::CREATED, "healthmonitor", v))
}

async fn update(ctl: Ctl, Path(id): Path<String>, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "healthmonitor")?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            let mut h = get_monitor(s, &id)?.clone();
            lb_for_write(s, &h.load_balancer_id)?;
            mutable(&h.common, "Health Monitor")?;
            update_common(&mut b, &mut h.common, false)?;
            for f in ["type", "pool_id"] {
                b.immutable(f)?;
            }
            if let Some(v) = b.int("delay", 0, MAX_SECONDS)?.set() {
                h.delay = v;
            }
            if let Some(v) = b.int("timeout", 0, MAX_SECONDS)?.set() {
                h.timeout = v;
            }
            if let Some(v) = b.int("max_retries", 1, 10)?.set() {
                h.max_retries = v;
            }
            optional_fields(&mut b, &mut h)?;
            b.finish()?;
            let lb = h.load_balancer_id.clone();
            let after = proposed(s, &[Op::put(h.clone())], &lb)?;
            if super::dataplane_changes(s, &after, &lb) {
                h.common.provisioning_status = ProvisioningStatus::PendingUpdate;
                lock(tx, s, &lb);
            }
            tx.put(h.clone());
            Ok(view::value(&view::health_monitor(&h)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::OK, "healthmonitor", v))
}

async fn delete(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            let mut h = get_monitor(s, &id)?.clone();
            lb_for_write(s, &h.load_balancer_id)?;
            mutable(&h.common, "Health Monitor")?;
            lock(tx, s, &h.load_balancer_id);
            h.common.provisioning_status = ProvisioningStatus::PendingDelete;
            tx.put(h);
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}
