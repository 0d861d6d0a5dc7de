//! The REST API, shaped like Octavia's v2 so openstacksdk and the
//! `openstack loadbalancer` CLI drive it unchanged. Served under `/v2` and
//! `/v2.0` (Octavia's alias), with version discovery at `/`, `/v2` and
//! `/v2.0`, and the few Neutron lookups the CLI makes (`subnets`,
//! `networks`) answered from the configured VIP subnets.
//!
//! Writes follow Octavia's lifecycle: the object goes `PENDING_*`, its load
//! balancer `PENDING_UPDATE` (writes to it meanwhile get 409), and the
//! provisioner moves everything to `ACTIVE` (or `ERROR`) once every
//! amphora took the new config. A change that does not alter what the
//! amphorae run (a name, a description, tags) is `ACTIVE` at once.

pub mod absent;
pub mod amphorae;
pub mod body;
pub mod changes;
pub mod fault;
pub mod healthmonitors;
pub mod listeners;
pub mod loadbalancers;
pub mod members;
pub mod network;
pub mod pools;
pub mod query;
pub mod view;

use std::sync::Arc;

use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::model::{LoadBalancer, ProvisioningStatus, State};
use crate::store::{Op, Tx};
use crate::Controller;
use fault::Fault;

pub type Ctl = AxState<Arc<Controller>>;
pub type ApiResult = Result<Response, Fault>;

/// Largest request body: a batch of thousands of members fits.
const MAX_BODY: usize = 16 << 20;

pub fn router(ctl: Arc<Controller>) -> Router {
    let v2 = Router::new()
        .merge(loadbalancers::routes())
        .merge(listeners::routes())
        .merge(pools::routes())
        .merge(members::routes())
        .merge(healthmonitors::routes())
        .merge(amphorae::routes())
        .merge(network::routes())
        .merge(changes::routes())
        .route("/lbaas/providers", get(providers))
        .merge(absent::routes());
    Router::new()
        .nest("/v2", v2.clone())
        .nest("/v2.0", v2)
        .layer(axum::middleware::from_fn_with_state(ctl.clone(), fresh))
        .layer(axum::middleware::from_fn_with_state(ctl.clone(), auth))
        // Discovery goes without a token, as in Octavia.
        .route("/", get(versions))
        .route("/v2", get(version))
        .route("/v2/", get(version))
        .route("/v2.0", get(version))
        .route("/v2.0/", get(version))
        // Counts only, no ids: scraped without a token.
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(remember_path))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(fault_bodies))
        .with_state(ctl)
}

fn digest(s: &str) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
}

/// `X-Auth-Token` must equal the admin token (unless in no-auth mode).
/// Compared as SHA-256 digests, so timing says nothing about the token.
async fn auth(AxState(ctl): Ctl, req: Request, next: Next) -> Response {
    if let Some(token) = &ctl.token {
        let given = req
            .headers()
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if digest(given).as_ref() != digest(token).as_ref() {
            static REFUSED: crate::log_limit::LogLimit =
                crate::log_limit::LogLimit::new(std::time::Duration::from_secs(10));
            if let Some(held) = REFUSED.hit(std::time::Instant::now()) {
                let peer = crate::serve::peer(&req);
                tracing::warn!(
                    peer = ?peer,
                    path = %req.uri().path(),
                    token = if given.is_empty() { "missing" } else { "wrong" },
                    held_back = held,
                    "API request refused: bad X-Auth-Token"
                );
            }
            return Fault::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Reads first catch up with every controller's committed writes (one
/// query when nothing changed). When the database does not answer (in
/// [`crate::store::READ_WAIT`]), a read is served from this controller's
/// cache at once and says so:
/// `Warning: 110 - "Response is Stale"` and `X-Siphon-Stale`, the seconds
/// since the database last answered. (Writes answer 503 meanwhile.)
async fn fresh(AxState(ctl): Ctl, req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return next.run(req).await;
    }
    let stale = match ctl.db.refresh_read().await {
        Ok(()) => None,
        Err(e) => {
            static STALE: crate::log_limit::LogLimit =
                crate::log_limit::LogLimit::new(std::time::Duration::from_secs(10));
            if let Some(held) = STALE.hit(std::time::Instant::now()) {
                tracing::warn!(error = %e, held_back = held, "database not reachable: reads answered from the cache, marked stale");
            }
            Some(ctl.db.stale_for().unwrap_or_default())
        }
    };
    let mut resp = next.run(req).await;
    if let Some(d) = stale {
        let h = resp.headers_mut();
        h.insert(
            hyper::header::WARNING,
            HeaderValue::from_static("110 - \"Response is Stale\""),
        );
        h.insert("x-siphon-stale", HeaderValue::from(d.as_secs()));
    }
    resp
}

async fn metrics(AxState(ctl): Ctl) -> Response {
    let bgp = ctl.liveness.bgp_all();
    let page = ctl.db.read(|s| ctl.metrics.render(s, &bgp));
    (
        [(
            hyper::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

/// Every error answer carries Octavia's fault body. axum's own answers
/// (405 for a method a path does not take, 413 for a body over the limit,
/// 400 for a path it cannot decode) come with an empty or plain-text body;
/// they are rewrapped here, keeping their status (and `Allow`).
async fn fault_bodies(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let allow = resp.headers().get(hyper::header::ALLOW).cloned();
    let text = axum::body::to_bytes(resp.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        format!("The method {method} is not allowed for the resource {path}.")
    } else if text.is_empty() {
        format!("{}.", status.canonical_reason().unwrap_or("Error"))
    } else {
        text
    };
    let mut out = Fault::new(status, message).into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(hyper::header::ALLOW, a);
    }
    out
}

async fn not_found() -> Response {
    Fault::new(StatusCode::NOT_FOUND, "The resource could not be found.").into_response()
}

/// The path a request was sent to, before nesting took `/v2` or `/v2.0`
/// off it: what a list's links repeat.
#[derive(Debug, Clone)]
struct AskedPath(String);

async fn remember_path(mut req: Request, next: Next) -> Response {
    let path = AskedPath(req.uri().path().to_owned());
    req.extensions_mut().insert(path);
    next.run(req).await
}

/// The URL a list was asked at (`http://host/v2.0/lbaas/...`, as the
/// client spelt it), which its `next`/`previous` links point to, as in
/// Octavia (`request.path_url`).
#[derive(Debug, Clone)]
pub struct SelfUrl(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SelfUrl {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<SelfUrl, Self::Rejection> {
        let path = parts
            .extensions
            .get::<AskedPath>()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.0.clone());
        Ok(SelfUrl(format!("{}{path}", base_url(&parts.headers))))
    }
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn version_doc(base: &str, id: &str) -> Value {
    json!({
        "id": id,
        "status": if id == "v2.0" { "SUPPORTED" } else { "CURRENT" },
        "updated": "2026-11-30T00:00:00Z",
        "links": [{ "rel": "self", "href": format!("{base}/{}/", if id == "v2.0" { "v2.0" } else { "v2" }) }],
    })
}

async fn versions(headers: HeaderMap) -> Response {
    let base = base_url(&headers);
    Json(json!({ "versions": [version_doc(&base, "v2.0"), version_doc(&base, "v2.30")] }))
        .into_response()
}

async fn version(headers: HeaderMap, uri: axum::http::Uri) -> Response {
    let base = base_url(&headers);
    let mut doc = version_doc(&base, "v2.30");
    if uri.path().starts_with("/v2.0") {
        doc["id"] = json!("v2.0");
        doc["status"] = json!("CURRENT");
        doc["links"] = json!([{ "rel": "self", "href": format!("{base}/v2.0/") }]);
    }
    Json(json!({ "version": doc })).into_response()
}

async fn providers() -> Response {
    Json(json!({
        "providers": [{ "name": "siphon", "description": "Siphon: L4 (TCP, UDP) userspace load balancer with Maglev hashing" }],
        "providers_links": [],
    }))
    .into_response()
}

/// `{"<key>": value}` with `status`.
pub fn wrapped(status: StatusCode, key: &str, value: Value) -> Response {
    let mut m = serde_json::Map::new();
    m.insert(key.to_owned(), value);
    (status, Json(Value::Object(m))).into_response()
}

/// A list answer: the query applied to `items`.
pub fn listing(
    items: Vec<Value>,
    raw_query: Option<&str>,
    plural: &str,
    at: &SelfUrl,
) -> ApiResult {
    let q = query::ListQuery::parse(raw_query)?;
    Ok(Json(query::list(items, &q, plural, &at.0)?).into_response())
}

/// A list answer drawn from the state: `list` runs under the read lock
/// with the parsed query and answers the page's JSON
/// ([`query::Listing::json`]), written there as its views borrow from the
/// state.
pub fn listing_state(
    ctl: &Controller,
    raw_query: Option<&str>,
    list: impl FnOnce(&State, &query::ListQuery) -> Result<Vec<u8>, Fault>,
) -> ApiResult {
    let q = query::ListQuery::parse(raw_query)?;
    let body = ctl.db.read(|s| list(s, &q))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// A single object answer, `fields` applied.
pub fn showing(key: &str, item: Value, raw_query: Option<&str>) -> ApiResult {
    let q = query::ListQuery::parse(raw_query)?;
    Ok(wrapped(
        StatusCode::OK,
        key,
        query::project(item, &q.fields),
    ))
}

/// The load balancer, which must exist and be `ACTIVE` for a child write.
pub fn lb_for_write<'a>(s: &'a State, id: &str) -> Result<&'a LoadBalancer, Fault> {
    let lb = s
        .load_balancers
        .get(id)
        .ok_or_else(|| Fault::not_found("Load Balancer", id))?;
    if lb.common.provisioning_status != ProvisioningStatus::Active {
        return Err(Fault::immutable("Load Balancer", id));
    }
    Ok(lb)
}

/// The load balancer, which must exist and be `ACTIVE` or `ERROR`: what a
/// delete or a failover needs (Octavia's deletable/failoverable states).
pub fn lb_settled<'a>(s: &'a State, id: &str) -> Result<&'a LoadBalancer, Fault> {
    let lb = s
        .load_balancers
        .get(id)
        .ok_or_else(|| Fault::not_found("Load Balancer", id))?;
    if !matches!(
        lb.common.provisioning_status,
        ProvisioningStatus::Active | ProvisioningStatus::Error
    ) {
        return Err(Fault::immutable("Load Balancer", id));
    }
    Ok(lb)
}

/// The state of load balancer `lb` once `ops` are applied, checked the
/// way the dataplane will check it: a change the amphorae would refuse is
/// refused here, with the dataplane's words, before anything is stored.
pub fn proposed(s: &State, ops: &[Op], lb: &str) -> Result<State, Fault> {
    let mut p = s.subset(lb);
    crate::store::apply(&mut p, ops.to_vec());
    if let Some(l) = p.load_balancers.get(lb) {
        if let Err(e) = crate::render::config(&p, l, 1).validate() {
            let problems: Vec<String> = e.0.iter().map(ToString::to_string).collect();
            return Err(Fault::bad_request(format!(
                "Invalid configuration: {}",
                problems.join("; ")
            )));
        }
    }
    Ok(p)
}

/// Whether what the amphorae of `lb` run differs between two states.
pub fn dataplane_changes(before: &State, after: &State, lb: &str) -> bool {
    let render = |s: &State| {
        s.load_balancers
            .get(lb)
            .map(|l| crate::render::config(s, l, 0))
    };
    render(before) != render(after)
}

/// Marks the load balancer `PENDING_UPDATE` (locked until the push ends).
/// Only the objects a request changes go `PENDING_*` themselves: on a
/// failed push exactly those go to `ERROR`, nothing merely locked.
pub fn lock(tx: &mut Tx, s: &State, lb: &str) {
    if let Some(l) = s.load_balancers.get(lb) {
        let mut l = l.clone();
        l.common.provisioning_status = ProvisioningStatus::PendingUpdate;
        l.common.updated_at = Some(crate::now());
        tx.put(l);
    }
}

/// The part of every create body that all objects share.
pub fn new_common(
    b: &mut body::Body,
    operating: crate::model::OperatingStatus,
    has_description: bool,
) -> Result<crate::model::Common, Fault> {
    Ok(crate::model::Common {
        id: chosen_id(b)?.unwrap_or_else(crate::new_id),
        name: b.string("name", 255)?.or_default(),
        description: if has_description {
            b.string("description", 255)?.or_default()
        } else {
            String::new()
        },
        project_id: {
            let p = b.string("project_id", 36)?.or_default();
            let t = b.string("tenant_id", 36)?.or_default();
            if p.is_empty() {
                t
            } else {
                p
            }
        },
        admin_state_up: b.bool("admin_state_up")?.or(true),
        provisioning_status: ProvisioningStatus::PendingCreate,
        operating_status: operating,
        tags: b.strings("tags")?.or_default(),
        created_at: crate::now(),
        updated_at: None,
        provisioning_error: None,
        deployed: false,
        next_attempt_at: None,
    })
}

/// Siphon extension: a create may name the id of the new object (a
/// UUID), so that a front end with ids of its own (Octavia, through the
/// provider driver) keeps them, and a create it retries after a lost
/// answer is refused as a duplicate ([`unused_id`]) instead of made twice.
fn chosen_id(b: &mut body::Body) -> Result<Option<String>, Fault> {
    let Some(id) = b.string("id", 36)?.set() else {
        return Ok(None);
    };
    match uuid::Uuid::try_parse(&id) {
        Ok(u) if id.len() == 36 => Ok(Some(u.hyphenated().to_string())),
        _ => Err(Fault::invalid("id", &id, "Value should be a UUID")),
    }
}

/// 409 when `id` is taken in `table`: a create naming an id twice.
pub fn unused_id<T>(table: &crate::model::Table<T>, what: &str, id: &str) -> Result<(), Fault> {
    if table.contains_key(id) {
        return Err(Fault::conflict(format!("{what} {id} already exists.")));
    }
    Ok(())
}

/// Applies the shared updatable fields.
pub fn update_common(
    b: &mut body::Body,
    c: &mut crate::model::Common,
    has_description: bool,
) -> Result<(), Fault> {
    if let Some(v) = b.string("name", 255)?.update() {
        c.name = v.unwrap_or_default();
    }
    if has_description {
        if let Some(v) = b.string("description", 255)?.update() {
            c.description = v.unwrap_or_default();
        }
    }
    if let Some(v) = b.bool("admin_state_up")?.update() {
        c.admin_state_up = v.unwrap_or(true);
    }
    if let Some(v) = b.strings("tags")?.update() {
        c.tags = v.unwrap_or_default();
    }
    c.updated_at = Some(crate::now());
    Ok(())
}

impl<T: Default> body::Field<T> {
    pub fn or_default(self) -> T {
        self.or(T::default())
    }
}

/// The object must not be mid-change itself.
pub fn mutable(c: &crate::model::Common, what: &str) -> Result<(), Fault> {
    if c.provisioning_status.is_pending() {
        return Err(Fault::immutable(what, &c.id));
    }
    Ok(())
}
