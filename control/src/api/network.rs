//! The Neutron lookups the stock CLI makes before `loadbalancer create`
//! (`GET /v2.0/subnets?id=...`, and networks), answered from the VIP
//! subnets in the controller's config.

use std::sync::Arc;

use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::fault::Fault;
use super::{listing, wrapped, ApiResult, Ctl, SelfUrl};
use crate::vip::{network_view, subnet_view};
use crate::Controller;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/subnets", get(subnets))
        .route("/subnets/{id}", get(subnet))
        .route("/networks", get(networks))
        .route("/networks/{id}", get(network))
}

async fn subnets(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    let items = ctl.config.vip_subnets.iter().map(subnet_view).collect();
    listing(items, q.as_deref(), "subnets", &at)
}

async fn subnet(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    let s = ctl
        .config
        .vip_subnets
        .iter()
        .find(|s| s.id == id || s.name == id)
        .ok_or_else(|| Fault::not_found("Subnet", &id))?;
    Ok(wrapped(StatusCode::OK, "subnet", subnet_view(s)))
}

fn network_ids(ctl: &Controller) -> Vec<String> {
    let mut ids: Vec<String> = ctl
        .config
        .vip_subnets
        .iter()
        .map(|s| s.network_id.clone())
        .collect();
    ids.dedup();
    ids
}

async fn networks(ctl: Ctl, RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    let items = network_ids(&ctl)
        .iter()
        .map(|id| network_view(id, &ctl.config.vip_subnets))
        .collect();
    listing(items, q.as_deref(), "networks", &at)
}

async fn network(ctl: Ctl, Path(id): Path<String>) -> ApiResult {
    if !network_ids(&ctl).contains(&id) {
        return Err(Fault::not_found("Network", &id));
    }
    Ok(wrapped(
        StatusCode::OK,
        "network",
        network_view(&id, &ctl.config.vip_subnets),
    ))
}
