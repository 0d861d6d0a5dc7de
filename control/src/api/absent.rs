//! What Octavia has and an L4 provider without flavors or zones does not:
//! L7 policies and rules, flavors, flavor profiles, availability zones and
//! their profiles. Lists are empty, an id is never found (404), and
//! writes get Octavia's fault body: 501 for L7 (the provider driver's
//! `NotImplementedError`) and for creating a flavor, zone or profile (what
//! Octavia answers when the provider cannot validate one), 404 for
//! changing or deleting one, since none exists.

use std::sync::Arc;

use axum::extract::{Path, RawQuery};
use axum::routing::get;
use axum::Router;

use super::fault::Fault;
use super::{listing, ApiResult, SelfUrl};
use crate::Controller;

const L7: &str = "L7 policies and rules (Siphon balances TCP and UDP, below HTTP)";
const FLAVORS: &str = "flavors and flavor profiles (Siphon has none)";
const ZONES: &str = "availability zones and their profiles (Siphon has none)";

/// Collections: (path, list key, what one is called, what creating one
/// answers).
const KINDS: &[(&str, &str, &str, &str)] = &[
    ("/lbaas/flavors", "flavors", "Flavor", FLAVORS),
    (
        "/lbaas/flavorprofiles",
        "flavorprofiles",
        "Flavor Profile",
        FLAVORS,
    ),
    (
        "/lbaas/availabilityzones",
        "availability_zones",
        "Availability Zone",
        ZONES,
    ),
    (
        "/lbaas/availabilityzoneprofiles",
        "availability_zone_profiles",
        "Availability Zone Profile",
        ZONES,
    ),
];

pub fn routes() -> Router<Arc<Controller>> {
    let mut r = Router::new()
        .route("/lbaas/l7policies", get(l7_list).post(l7_write))
        .route(
            "/lbaas/l7policies/{id}",
            get(no_policy).put(l7_write).delete(l7_write),
        )
        .route(
            "/lbaas/l7policies/{id}/rules",
            get(no_policy).post(l7_write),
        )
        .route(
            "/lbaas/l7policies/{id}/rules/{rule}",
            get(no_policy_rule).put(l7_write).delete(l7_write),
        )
        .route(
            "/lbaas/providers/{provider}/flavor_capabilities",
            get(|p: Path<String>| capabilities(p, "flavor_capabilities")),
        )
        .route(
            "/lbaas/providers/{provider}/availability_zone_capabilities",
            get(|p: Path<String>| capabilities(p, "availability_zone_capabilities")),
        );
    for &(path, plural, what, action) in KINDS {
        let none = move |Path(id): Path<String>| async move { Fault::not_found(what, &id) };
        r = r
            .route(
                path,
                get(move |RawQuery(q): RawQuery, at: SelfUrl| async move {
                    listing(Vec::new(), q.as_deref(), plural, &at)
                })
                .post(move || async move { Fault::not_implemented(action) }),
            )
            .route(&format!("{path}/{{id}}"), get(none).put(none).delete(none));
    }
    r
}

async fn l7_list(RawQuery(q): RawQuery, at: SelfUrl) -> ApiResult {
    listing(Vec::new(), q.as_deref(), "l7policies", &at)
}

async fn l7_write() -> Fault {
    Fault::not_implemented(L7)
}

async fn no_policy(Path(id): Path<String>) -> Fault {
    Fault::not_found("L7 Policy", &id)
}

async fn no_policy_rule(Path((id, _rule)): Path<(String, String)>) -> Fault {
    Fault::not_found("L7 Policy", &id)
}

/// The provider's flavor or zone capabilities: none for Siphon.
async fn capabilities(Path(provider): Path<String>, key: &'static str) -> ApiResult {
    if provider != "siphon" {
        return Err(Fault::bad_request(format!(
            "Provider '{provider}' is not enabled. Enabled providers: siphon"
        )));
    }
    Ok(super::wrapped(
        axum::http::StatusCode::OK,
        key,
        serde_json::json!([]),
    ))
}
