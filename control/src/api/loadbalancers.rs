//! `/lbaas/loadbalancers`: CRUD, `status` tree, `stats`, `failover`.

use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;

use super::body::{self, Body, Field};
use super::fault::Fault;
use super::query::{list_rows, Rows};
use super::{
    lb_for_write, listing_state, new_common, showing, unused_id, update_common, view, wrapped,
    ApiResult, Ctl, SelfUrl,
};
use crate::config::Distributor;
use crate::decide::spares::Scale;
use crate::model::{
    AdditionalVip, AmphoraStatus, By, Counters, LoadBalancer, OperatingStatus, ProvisioningStatus,
    State, Topology,
};
use crate::Controller;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/lbaas/loadbalancers", get(list).post(create))
        .route(
            "/lbaas/loadbalancers/{id}",
            get(show).put(update).delete(delete),
        )
        .route("/lbaas/loadbalancers/{id}/status", get(status))
        .route("/lbaas/loadbalancers/{id}/statuses", get(status))
        .route("/lbaas/loadbalancers/{id}/stats", get(stats))
        .route("/lbaas/loadbalancers/{id}/failover", put(failover))
}

async fn list(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    listing_state(&ctl, q.as_deref(), |s, q| {
        let rows = Rows::of(&s.load_balancers, q, &[]);
        list_rows(
            rows,
            |lb| view::load_balancer(s, lb),
            q,
            "loadbalancers",
            &at.0,
        )?
        .json()
    })
}

async fn show(ctl: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let v = ctl.db.read(|s| {
        s.load_balancers
            .get(&id)
            .map(|lb| view::value(&view::load_balancer(s, lb)))
            .ok_or_else(|| Fault::not_found("Load Balancer", &id))
    })?;
    showing("loadbalancer", v, q.as_deref())
}

async fn create(ctl: Ctl, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "loadbalancer")?;
    let mut common = new_common(&mut b, OperatingStatus::Offline, true)?;
    let subnet_id = b.string("vip_subnet_id", 36)?.set();
    let network_id = b.string("vip_network_id", 36)?.set();
    let address = b.string("vip_address", 64)?.set();
    let qos = b.string("vip_qos_policy_id", 36)?.set();
    let additional = additional_vips(&mut b)?;
    for unsupported in [
        "vip_port_id",
        "vip_sg_ids",
        "listeners",
        "pools",
        "flavor_id",
    ] {
        b.unsupported(unsupported)?;
    }
    if let Field::Set(p) = b.string("provider", 64)? {
        if p != "siphon" {
            return Err(Fault::bad_request(format!(
                "Provider '{p}' is not enabled. Enabled providers: siphon"
            )));
        }
    }
    let availability_zone = b.string("availability_zone", 255)?.set();
    let topology = b.word("topology", &[])?.or(Topology::Single);
    let count = b.int("amphora_count", 1, 64)?.set();
    b.finish()?;
    // Siphon defines no availability zones, so any named one is unknown:
    // refused as Octavia refuses a zone it has no record of, rather than
    // stored and shown as if it meant something.
    if let Some(az) = &availability_zone {
        return Err(Fault::bad_request(format!(
            "Validation failure: Invalid availability_zone '{az}': this provider has no availability zones."
        )));
    }
    let amphora_count = match (topology, count) {
        (Topology::Single, None | Some(1)) => 1,
        (Topology::Single, Some(n)) => {
            return Err(Fault::invalid(
                "amphora_count",
                n,
                "A SINGLE load balancer has exactly one amphora",
            ))
        }
        (Topology::ActiveActive, n) => n.unwrap_or(2) as u32,
    };
    let id = common.id.clone();
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            unused_id(&s.load_balancers, "Load Balancer", &id)?;
            let vip = crate::vip::allocate(
                &ctl.config.vip_subnets,
                s,
                subnet_id.as_deref(),
                network_id.as_deref(),
                address.as_deref(),
                &[],
            )?;
            let additional_vips = allocate_additional(&ctl, s, &vip, &additional)?;
            let spares = crate::decide::spares::take(s, &ctl.view(), amphora_count as usize)?;
            if common.project_id.is_empty() {
                common.project_id = String::new();
            }
            let lb = LoadBalancer {
                common,
                vip_address: vip.address.to_string(),
                vip_subnet_id: vip.subnet.id.clone(),
                vip_network_id: vip.subnet.network_id.clone(),
                vip_port_id: crate::new_id(),
                vip_qos_policy_id: qos,
                provider: "siphon".to_owned(),
                flavor_id: String::new(),
                availability_zone,
                topology,
                amphora_count,
                distributor_id: None,
                retry: None,
                additional_vips,
            };
            tx.put(lb.clone());
            for a in spares {
                let mut a = a.clone();
                a.load_balancer_id = Some(id.clone());
                a.status = AmphoraStatus::Allocated;
                a.updated_at = Some(crate::now());
                tx.put(a);
            }
            Ok(view::value(&view::load_balancer(s, &lb)))
        })
        .await?;
    ctl.wake.notify_one();
    tracing::info!(loadbalancer = %id, "load balancer created");
    Ok(wrapped(StatusCode::CREATED, "loadbalancer", v))
}

/// Octavia's `additional_vips`: `[{"subnet_id": ..., "ip_address": ...}]`,
/// the address optional (`port_id` refused: Siphon makes no ports).
fn additional_vips(b: &mut Body) -> Result<Vec<(String, Option<String>)>, Fault> {
    let items = match b.value("additional_vips") {
        Field::Absent | Field::Null => return Ok(Vec::new()),
        Field::Set(Value::Array(items)) => items,
        Field::Set(v) => {
            return Err(Fault::invalid(
                "additional_vips",
                v,
                "Wrong type. Expected 'list'",
            ))
        }
    };
    if items.len() > MAX_ADDITIONAL_VIPS {
        return Err(Fault::invalid(
            "additional_vips",
            items.len(),
            &format!("At most {MAX_ADDITIONAL_VIPS} additional VIPs"),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let mut v = Body::from_value(item, "additional_vips")?;
        let subnet = v.string("subnet_id", 36)?.set().ok_or_else(|| {
            Fault::bad_request("Mandatory field missing: additional_vips.subnet_id")
        })?;
        let address = v.string("ip_address", 64)?.set();
        v.unsupported("port_id")?;
        v.finish()?;
        out.push((subnet, address));
    }
    Ok(out)
}

/// Additional VIPs a load balancer may have.
const MAX_ADDITIONAL_VIPS: usize = 4;

/// Each additional VIP from its subnet, which must be of the first VIP's
/// network (as in Octavia), with an address no other VIP holds. Only
/// where the amphorae deliver every VIP themselves: `linux-ecmp` routes
/// one VIP per load balancer over its group.
fn allocate_additional(
    ctl: &crate::Controller,
    s: &crate::model::State,
    first: &crate::vip::Vip,
    wanted: &[(String, Option<String>)],
) -> Result<Vec<AdditionalVip>, Fault> {
    if !wanted.is_empty() && matches!(ctl.config.distributor, Distributor::LinuxEcmp(_)) {
        return Err(Fault::bad_request(
            "Validation failure: additional_vips are not supported with the linux-ecmp distributor (one route per load balancer); use bgp or noop",
        ));
    }
    let mut taken = vec![first.address];
    let mut out = Vec::new();
    for (subnet, address) in wanted {
        let v = crate::vip::allocate(
            &ctl.config.vip_subnets,
            s,
            Some(subnet),
            None,
            address.as_deref(),
            &taken,
        )?;
        if v.subnet.network_id != first.subnet.network_id {
            return Err(Fault::bad_request(format!(
                "Validation failure: additional VIP subnet {subnet} is not on the VIP network {}",
                first.subnet.network_id
            )));
        }
        taken.push(v.address);
        out.push(AdditionalVip {
            subnet_id: v.subnet.id.clone(),
            ip_address: v.address.to_string(),
        });
    }
    Ok(out)
}

async fn update(ctl: Ctl, Path(id): Path<String>, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "loadbalancer")?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            let mut lb = lb_for_write(s, &id)?.clone();
            update_common(&mut b, &mut lb.common, true)?;
            if let Some(q) = b.string("vip_qos_policy_id", 36)?.update() {
                lb.vip_qos_policy_id = q;
            }
            b.unsupported("vip_sg_ids")?;
            let count = b.int("amphora_count", 1, 64)?.set();
            b.finish()?;
            let after = super::proposed(s, &[crate::store::Op::put(lb.clone())], &id)?;
            if super::dataplane_changes(s, &after, &id) {
                lb.common.provisioning_status = ProvisioningStatus::PendingUpdate;
            }
            if let Some(n) = count.map(|n| n as u32).filter(|n| *n != lb.amphora_count) {
                rescale(&ctl, s, tx, &mut lb, n)?;
            }
            tx.put(lb.clone());
            Ok(view::value(&view::load_balancer(s, &lb)))
        })
        .await?;
    ctl.wake.notify_one();
    Ok(wrapped(StatusCode::OK, "loadbalancer", v))
}

/// Siphon extension: an `ACTIVE_ACTIVE` load balancer changes its number
/// of amphorae. Scale-out takes spares (503 without enough); their config
/// is pushed before the distributor sends them traffic. Scale-in releases
/// silent ones first, then the most recently registered: the distributor
/// stops sending them traffic before they are emptied and become spares
/// again.
fn rescale(
    ctl: &crate::Controller,
    s: &crate::model::State,
    tx: &mut crate::store::Tx,
    lb: &mut LoadBalancer,
    n: u32,
) -> Result<(), Fault> {
    if lb.topology != Topology::ActiveActive {
        return Err(Fault::invalid(
            "amphora_count",
            n,
            "A SINGLE load balancer has exactly one amphora",
        ));
    }
    let now = crate::now();
    match crate::decide::spares::scale(s, &ctl.view(), &ctl.policy, lb, n)? {
        Scale::Take(ids) => {
            for id in ids {
                let mut a = s.amphorae[&id].clone();
                a.load_balancer_id = Some(lb.common.id.clone());
                a.status = AmphoraStatus::Allocated;
                a.updated_at = Some(now.clone());
                tx.put(a);
            }
        }
        Scale::Release(ids) => {
            for id in ids {
                let mut a = s.amphorae[&id].clone();
                a.load_balancer_id = None;
                a.status = AmphoraStatus::Error;
                a.error = Some(format!("released by scale-in of {}", lb.common.id));
                a.updated_at = Some(now.clone());
                tx.put(a);
            }
        }
    }
    tracing::info!(loadbalancer = %lb.common.id, from = lb.amphora_count, to = n, "amphora count changed");
    lb.amphora_count = n;
    lb.common.provisioning_status = ProvisioningStatus::PendingUpdate;
    lb.common.updated_at = Some(now);
    Ok(())
}

async fn delete(ctl: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let cascade = url::form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "cascade" && v.eq_ignore_ascii_case("true"));
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            super::lb_settled(s, &id)?;
            let has_children =
                s.listeners_of(&id).next().is_some() || s.pools_of(&id).next().is_some();
            if has_children && !cascade {
                return Err(Fault::bad_request(format!(
                    "Cannot delete Load Balancer {id} - it has children"
                )));
            }
            mark_deleted(s, tx, &id);
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Everything of `lb` goes `PENDING_DELETE`.
fn mark_deleted(s: &State, tx: &mut crate::store::Tx, lb: &str) {
    let pd = ProvisioningStatus::PendingDelete;
    for m in s.members.with(By::LoadBalancer, lb) {
        let mut m = m.clone();
        m.common.provisioning_status = pd;
        tx.put(m);
    }
    for h in s.health_monitors.with(By::LoadBalancer, lb) {
        let mut h = h.clone();
        h.common.provisioning_status = pd;
        tx.put(h);
    }
    for p in s.pools_of(lb) {
        let mut p = p.clone();
        p.common.provisioning_status = pd;
        tx.put(p);
    }
    for l in s.listeners_of(lb) {
        let mut l = l.clone();
        l.common.provisioning_status = pd;
        tx.put(l);
    }
    if let Some(l) = s.load_balancers.get(lb) {
        let mut l = l.clone();
        l.common.provisioning_status = pd;
        l.common.updated_at = Some(crate::now());
        tx.put(l);
    }
}

/// Octavia's status tree: load balancer → listeners → (default) pool →
/// health monitor and members.
pub fn status_tree(s: &State, lb: &LoadBalancer) -> Value {
    let id = lb.common.id.as_str();
    let listeners: Vec<Value> = s
        .listeners_of(id)
        .map(|l| {
            let pools: Vec<Value> = l
                .default_pool_id
                .as_deref()
                .and_then(|p| s.pools.get(p))
                .map(|p| {
                    let members: Vec<Value> = s
                        .members_of(&p.common.id)
                        .map(|m| {
                            json!({
                                "id": m.common.id,
                                "name": m.common.name,
                                "address": m.address,
                                "protocol_port": m.protocol_port,
                                "provisioning_status": m.common.provisioning_status,
                                "operating_status": m.common.operating_status,
                            })
                        })
                        .collect();
                    let mut pv = json!({
                        "id": p.common.id,
                        "name": p.common.name,
                        "provisioning_status": p.common.provisioning_status,
                        "operating_status": p.common.operating_status,
                        "members": members,
                    });
                    if let Some(h) = s.monitor_of(&p.common.id) {
                        pv["health_monitor"] = json!({
                            "id": h.common.id,
                            "name": h.common.name,
                            "type": h.kind,
                            "provisioning_status": h.common.provisioning_status,
                            "operating_status": h.common.operating_status,
                        });
                    }
                    pv
                })
                .into_iter()
                .collect();
            json!({
                "id": l.common.id,
                "name": l.common.name,
                "provisioning_status": l.common.provisioning_status,
                "operating_status": l.common.operating_status,
                "pools": pools,
            })
        })
        .collect();
    json!({
        "loadbalancer": {
            "id": id,
            "name": lb.common.name,
            "provisioning_status": lb.common.provisioning_status,
            "operating_status": lb.common.operating_status,
            "listeners": listeners,
        }
    })
}

async fn status(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    let v = ctl.db.read(|s| {
        s.load_balancers
            .get(&id)
            .map(|lb| status_tree(s, lb))
            .ok_or_else(|| Fault::not_found("Load Balancer", &id))
    })?;
    Ok(wrapped(StatusCode::OK, "statuses", v))
}

pub fn stats_view(c: &Counters) -> Value {
    json!({
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "active_connections": c.active_connections,
        "total_connections": c.total_connections,
        "request_errors": c.request_errors,
    })
}

async fn stats(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    let c = ctl.db.read(|s| {
        if !s.load_balancers.contains_key(&id) {
            return Err(Fault::not_found("Load Balancer", &id));
        }
        let mut c = Counters::default();
        for l in s.listeners_of(&id) {
            c.add(&s.listener_counters(&l.common.id));
        }
        Ok(c)
    })?;
    Ok(wrapped(StatusCode::OK, "stats", stats_view(&c)))
}

/// Replaces each amphora of the load balancer with a spare where one is
/// free (keeping it where none is, which re-pushes its config), 202.
async fn failover(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db.write(|s, tx| -> Result<(), Fault> {
        super::lb_settled(s, &id)?;
        let amphorae: Vec<String> = s.amphorae_of(&id).map(|a| a.id.clone()).collect();
        let pairs =
            crate::decide::spares::replacements(s, &ctl.view(), &amphorae, &Default::default());
        if pairs.len() < amphorae.len() {
            tracing::warn!(loadbalancer = %id, failed = amphorae.len(), spares = pairs.len(), "not enough spare amphorae: keeping the rest, whose config is pushed again");
        }
        let why = "failover requested through the API";
        crate::decide::provision::replace(s, tx, &id, &pairs, why, &crate::now());
        Ok(())
    }).await?;
    ctl.wake.notify_one();
    Ok(StatusCode::ACCEPTED.into_response())
}
