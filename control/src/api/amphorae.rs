//! `/octavia/amphorae`: list, show, `stats`, `failover`, `config`, and
//! (Siphon's addition, since amphorae are not booted by the controller)
//! `POST` to register one and `DELETE` to unregister a spare.

use std::sync::Arc;

use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};

use super::body;
use super::fault::Fault;
use super::query::{list_rows, Rows};
use super::{listing_state, showing, view, wrapped, ApiResult, Ctl, SelfUrl};
use crate::model::{Amphora, AmphoraStatus, By, ProvisioningStatus, State};
use crate::store::Kind;
use crate::{Controller, StartError};

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/octavia/amphorae", get(list).post(register))
        .route("/octavia/amphorae/{id}", get(show).delete(unregister))
        .route("/octavia/amphorae/{id}/stats", get(stats))
        .route("/octavia/amphorae/{id}/failover", put(failover))
        .route("/octavia/amphorae/{id}/config", put(reconfigure))
        .route("/octavia/amphorae/{id}/heartbeat_key", put(rotate_key))
}

fn amphora_view(ctl: &Controller, a: &Amphora) -> Value {
    let ago = ctl
        .liveness
        .last_heard(&a.id)
        .map(|t| t.elapsed().as_millis() as u64);
    view::amphora(a, ago, ctl.liveness.bgp(&a.id).as_ref())
}

async fn list(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    listing_state(&ctl, q.as_deref(), |s, q| {
        let rows = Rows::of(
            &s.amphorae,
            q,
            &[
                ("loadbalancer_id", By::LoadBalancer),
                ("load_balancer_id", By::LoadBalancer),
            ],
        );
        list_rows(rows, |a| amphora_view(&ctl, a), q, "amphorae", &at.0)?.json()
    })
}

fn get_amphora<'a>(s: &'a State, id: &str) -> Result<&'a Amphora, Fault> {
    s.amphorae
        .get(id)
        .ok_or_else(|| Fault::not_found("Amphora", id))
}

async fn show(ctl: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let v = ctl
        .db
        .read(|s| get_amphora(s, &id).map(|a| amphora_view(&ctl, a)))?;
    showing("amphora", v, q.as_deref())
}

/// A new amphora's status: `READY` where heartbeats cannot tell, else
/// `BOOTING` until its first heartbeat.
fn initial_status(ctl: &Controller) -> AmphoraStatus {
    if ctl.config.health.is_some() {
        AmphoraStatus::Booting
    } else {
        AmphoraStatus::Ready
    }
}

/// What registration sets, for the config file and the API alike.
struct Registration {
    id: String,
    address: String,
    port: u16,
    server_name: Option<String>,
    ca: Option<String>,
    vip_interface: String,
    vrrp_ip: Option<String>,
}

fn upsert(ctl: &Controller, s: &State, r: Registration) -> Result<Amphora, Fault> {
    if r.address.parse::<std::net::IpAddr>().is_err() {
        return Err(Fault::invalid(
            "lb_network_ip",
            &r.address,
            "Value should be IPv4 or IPv6 format",
        ));
    }
    if let Some(v) = r.vrrp_ip.as_deref() {
        if v.parse::<std::net::IpAddr>().is_err() {
            return Err(Fault::invalid(
                "vrrp_ip",
                v,
                "Value should be IPv4 or IPv6 format",
            ));
        }
    }
    if let (Some(pem), Some(agents)) = (&r.ca, &ctl.agents) {
        agents
            .check_ca(pem)
            .map_err(|e| Fault::invalid("ca_certificate", "(PEM)", &e.to_string()))?;
    }
    let server_name = r.server_name.unwrap_or_else(|| r.id.clone());
    if rustls::pki_types::ServerName::try_from(server_name.clone()).is_err() {
        return Err(Fault::invalid(
            "server_name",
            &server_name,
            "Value should be a DNS name or an IP address",
        ));
    }
    Ok(match s.amphorae.get(&r.id) {
        Some(a) => Amphora {
            lb_network_ip: r.address,
            agent_port: r.port,
            server_name,
            ca_certificate: r.ca,
            vip_interface: r.vip_interface,
            vrrp_ip: r.vrrp_ip,
            updated_at: Some(crate::now()),
            ..a.clone()
        },
        None => Amphora {
            id: r.id,
            load_balancer_id: None,
            status: initial_status(ctl),
            lb_network_ip: r.address,
            agent_port: r.port,
            server_name,
            ca_certificate: r.ca,
            vip_interface: r.vip_interface,
            generation: 0,
            vips: Vec::new(),
            created_at: crate::now(),
            updated_at: None,
            error: None,
            last_heartbeat: None,
            vrrp_ip: r.vrrp_ip,
            distributor_id: None,
            next_attempt_at: None,
            heartbeat_key: None,
            previous_heartbeat_key: None,
            previous_key_valid_until: None,
            older_heartbeat_keys: Vec::new(),
            heartbeat_key_acked: false,
            own_key_held: false,
            heartbeat_seq: 0,
        },
    })
}

/// Registers (or updates) the amphorae of the config file.
pub async fn register_configured(ctl: &Controller) -> Result<(), StartError> {
    for e in &ctl.config.amphorae {
        let ca = match &e.ca {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|err| StartError::Amphora {
                    id: e.id.clone(),
                    message: format!("{}: {err}", p.display()),
                })?,
            ),
            None => None,
        };
        let r = Registration {
            id: e.id.clone(),
            address: e.address.to_string(),
            port: e.port,
            server_name: e.server_name.clone(),
            ca,
            vip_interface: e.vip_interface.clone(),
            vrrp_ip: e.vrrp_ip.map(|a| a.to_string()),
        };
        ctl.db
            .write(|s, tx| -> Result<(), Fault> {
                let a = upsert(ctl, s, r)?;
                if s.amphorae.get(&a.id) != Some(&a) {
                    tx.put(a);
                }
                Ok(())
            })
            .await
            .map_err(|f| StartError::Amphora {
                id: e.id.clone(),
                message: f.message,
            })?;
    }
    Ok(())
}

async fn register(ctl: Ctl, bytes: axum::body::Bytes) -> ApiResult {
    let mut b = body::parse(&bytes, "amphora")?;
    let id = b.string("id", 64)?.set().unwrap_or_else(crate::new_id);
    let address = b
        .string("lb_network_ip", 64)?
        .set()
        .ok_or_else(|| Fault::bad_request("Mandatory field missing: lb_network_ip"))?;
    let port = b
        .int("agent_port", 1, 65535)?
        .or(i64::from(siphon_proto::AGENT_PORT)) as u16;
    let server_name = b.string("server_name", 253)?.set();
    let ca = b.string("ca_certificate", 64 << 10)?.set();
    let vip_interface = b
        .string("vip_interface", 15)?
        .set()
        .unwrap_or_else(|| "lo".to_owned());
    let vrrp_ip = b.string("vrrp_ip", 64)?.set();
    b.finish()?;
    let v = ctl
        .db
        .write(|s, tx| -> Result<Value, Fault> {
            if s.amphorae.contains_key(&id) {
                return Err(Fault::conflict(format!(
                    "Amphora {id} is already registered"
                )));
            }
            let a = upsert(
                &ctl,
                s,
                Registration {
                    id: id.clone(),
                    address,
                    port,
                    server_name,
                    ca,
                    vip_interface,
                    vrrp_ip,
                },
            )?;
            tx.put(a.clone());
            Ok(amphora_view(&ctl, &a))
        })
        .await?;
    ctl.wake.notify_one();
    tracing::info!(amphora = %id, "amphora registered");
    Ok(wrapped(StatusCode::CREATED, "amphora", v))
}

async fn unregister(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            let a = get_amphora(s, &id)?;
            if let Some(lb) = &a.load_balancer_id {
                return Err(Fault::conflict(format!(
                    "Amphora {id} carries load balancer {lb}: fail it over first"
                )));
            }
            tx.delete(Kind::Amphora, &id);
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn stats(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    let v = ctl.db.read(|s| -> Result<Value, Fault> {
        get_amphora(s, &id)?;
        let rows: Vec<Value> = s
            .stats
            .iter()
            .filter(|((_, a), _)| *a == id)
            .map(|((l, _), c)| {
                json!({
                    "id": id,
                    "listener_id": l,
                    "loadbalancer_id": s.listeners.get(l).map(|l| l.load_balancer_id.clone()),
                    "active_connections": c.active_connections,
                    "bytes_in": c.bytes_in,
                    "bytes_out": c.bytes_out,
                    "request_errors": c.request_errors,
                    "total_connections": c.total_connections,
                })
            })
            .collect();
        Ok(Value::Array(rows))
    })?;
    Ok(wrapped(StatusCode::OK, "amphora_stats", v))
}

fn lb_of_amphora(s: &State, id: &str) -> Result<Option<String>, Fault> {
    let a = get_amphora(s, id)?;
    let Some(lb) = a.load_balancer_id.clone() else {
        return Ok(None);
    };
    super::lb_settled(s, &lb)?;
    Ok(Some(lb))
}

/// Replaces this amphora with a spare (202). A spare itself is simply
/// wiped and checked again.
async fn failover(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            match lb_of_amphora(s, &id)? {
                Some(lb) => {
                    let failed = std::slice::from_ref(&id);
                    let pairs = crate::decide::spares::replacements(
                        s,
                        &ctl.view(),
                        failed,
                        &Default::default(),
                    );
                    let why = "failover requested through the API";
                    if crate::decide::provision::replace(s, tx, &lb, &pairs, why, &crate::now())
                        == 0
                    {
                        return Err(Fault::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("No spare amphora to replace {id} with"),
                        ));
                    }
                }
                None => {
                    let mut a = s.amphorae[&id].clone();
                    a.status = AmphoraStatus::Error;
                    a.error = Some("failover requested through the API".into());
                    tx.put(a);
                }
            }
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Pushes this amphora's config again (202).
async fn reconfigure(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    ctl.db
        .write(|s, tx| -> Result<(), Fault> {
            if let Some(lb) = lb_of_amphora(s, &id)? {
                let mut l = s.load_balancers[&lb].clone();
                l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
                tx.put(l);
            }
            Ok(())
        })
        .await?;
    ctl.wake.notify_one();
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Siphon extension: gives the amphora a new heartbeat key (pushed to its
/// agent at once); the current one is still taken for `health.key_grace_ms`,
/// so no heartbeat is dropped (202, with the new key id).
async fn rotate_key(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    let grace = ctl
        .config
        .health
        .as_ref()
        .map_or(std::time::Duration::from_secs(60), |h| h.key_grace());
    let key_id = ctl
        .db
        .write(|s, tx| -> Result<u32, Fault> {
            get_amphora(s, &id)?;
            crate::keys_push::rotate(s, tx, &id, grace)
                .map_err(|e| Fault::new(StatusCode::INTERNAL_SERVER_ERROR, e))
        })
        .await?;
    tracing::info!(amphora = %id, key_id, "heartbeat key rotated");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "heartbeat_key_id": key_id })),
    )
        .into_response())
}
