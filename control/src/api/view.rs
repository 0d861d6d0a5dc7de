//! What the API shows for each object: Octavia's response fields, with
//! the relationships (`listeners: [{id}]`, ...) filled in from the state
//! and the fields of features an L4 provider lacks present with their
//! empty values, as clients expect every key.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Value};

use crate::model::{
    Amphora, By, Common, HealthMonitor, HttpMethod, LbAlgorithm, Listener, ListenerProtocol,
    LoadBalancer, Member, MonitorType, OperatingStatus, Pool, PoolProtocol, ProvisioningStatus,
    Row, SessionPersistence, State, Table, Topology,
};

// Views are typed and borrow from the state, so a list page is written
// straight to JSON: no tree of `Value`s built and dropped per object
// (which cost about 15 µs a load balancer and bounded list throughput).
// `fields` and filters, which need a tree, go through [`value`].

/// A view as a JSON tree: for `fields`, filters and answers that add to it.
pub fn value(view: &impl Serialize) -> Value {
    // Views hold strings, numbers, options and lists with string keys,
    // which always convert; `Null` is there for the type's sake.
    serde_json::to_value(view).unwrap_or(Value::Null)
}

/// `{"id": ...}`, how Octavia shows a related object.
#[derive(Debug, Serialize)]
pub struct Ref<'a> {
    id: &'a str,
}

/// The ids an index of `table` holds under `key`, as refs: read off the
/// index, without looking each object up.
fn refs<'a, T: Row>(table: &'a Table<T>, by: By, key: &str) -> Vec<Ref<'a>> {
    table
        .ids(by, key)
        .into_iter()
        .flatten()
        .map(|id| Ref { id })
        .collect()
}

/// `{}`: an empty object, for fields of features an L4 provider lacks.
#[derive(Debug)]
pub struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

/// `[]`, likewise.
type EmptyList = [(); 0];
/// `null`, likewise.
type Nothing = Option<()>;

/// The fields every object shows.
#[derive(Debug, Serialize)]
pub struct CommonView<'a> {
    id: &'a str,
    name: &'a str,
    /// A monitor has no description in Octavia.
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    project_id: &'a str,
    tenant_id: &'a str,
    admin_state_up: bool,
    provisioning_status: ProvisioningStatus,
    operating_status: OperatingStatus,
    tags: &'a [String],
    created_at: &'a str,
    updated_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provisioning_error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<&'a str>,
}

fn common(c: &Common) -> CommonView<'_> {
    CommonView {
        id: &c.id,
        name: &c.name,
        description: Some(&c.description),
        project_id: &c.project_id,
        tenant_id: &c.project_id,
        admin_state_up: c.admin_state_up,
        provisioning_status: c.provisioning_status,
        operating_status: c.operating_status,
        tags: &c.tags,
        created_at: &c.created_at,
        updated_at: c.updated_at.as_deref(),
        provisioning_error: c.provisioning_error.as_deref(),
        next_attempt_at: c.next_attempt_at.as_deref(),
    }
}

#[derive(Debug, Serialize)]
pub struct LoadBalancerView<'a> {
    #[serde(flatten)]
    common: CommonView<'a>,
    vip_address: &'a str,
    vip_port_id: &'a str,
    vip_subnet_id: &'a str,
    vip_network_id: &'a str,
    vip_qos_policy_id: Option<&'a str>,
    vip_vnic_type: &'static str,
    vip_sg_ids: EmptyList,
    additional_vips: &'a [crate::model::AdditionalVip],
    provider: &'a str,
    flavor_id: &'a str,
    availability_zone: Option<&'a str>,
    listeners: Vec<Ref<'a>>,
    pools: Vec<Ref<'a>>,
    topology: Topology,
    amphora_count: u32,
    distributor_id: Option<u32>,
}

pub fn load_balancer<'a>(s: &'a State, lb: &'a LoadBalancer) -> LoadBalancerView<'a> {
    let id = lb.common.id.as_str();
    LoadBalancerView {
        common: common(&lb.common),
        vip_address: &lb.vip_address,
        vip_port_id: &lb.vip_port_id,
        vip_subnet_id: &lb.vip_subnet_id,
        vip_network_id: &lb.vip_network_id,
        vip_qos_policy_id: lb.vip_qos_policy_id.as_deref(),
        vip_vnic_type: "normal",
        vip_sg_ids: [],
        additional_vips: &lb.additional_vips,
        provider: &lb.provider,
        flavor_id: &lb.flavor_id,
        availability_zone: lb.availability_zone.as_deref(),
        listeners: refs(&s.listeners, By::LoadBalancer, id),
        pools: refs(&s.pools, By::LoadBalancer, id),
        topology: lb.topology,
        amphora_count: lb.amphora_count,
        distributor_id: lb.distributor_id,
    }
}

#[derive(Debug, Serialize)]
pub struct ListenerView<'a> {
    #[serde(flatten)]
    common: CommonView<'a>,
    protocol: ListenerProtocol,
    protocol_port: u16,
    connection_limit: i64,
    default_pool_id: Option<&'a str>,
    loadbalancers: [Ref<'a>; 1],
    timeout_client_data: i64,
    timeout_member_connect: i64,
    timeout_member_data: i64,
    timeout_tcp_inspect: i64,
    allowed_cidrs: Option<&'a [String]>,
    l7policies: EmptyList,
    insert_headers: EmptyObject,
    default_tls_container_ref: Nothing,
    sni_container_refs: EmptyList,
    client_ca_tls_container_ref: Nothing,
    client_authentication: &'static str,
    client_crl_container_ref: Nothing,
    tls_ciphers: Nothing,
    tls_versions: Nothing,
    alpn_protocols: Nothing,
    hsts_max_age: Nothing,
    hsts_include_subdomains: Nothing,
    hsts_preload: Nothing,
}

pub fn listener<'a>(s: &'a State, l: &'a Listener) -> ListenerView<'a> {
    let _ = s;
    ListenerView {
        common: common(&l.common),
        protocol: l.protocol,
        protocol_port: l.protocol_port,
        connection_limit: l.connection_limit,
        default_pool_id: l.default_pool_id.as_deref(),
        loadbalancers: [Ref {
            id: &l.load_balancer_id,
        }],
        timeout_client_data: l.timeout_client_data,
        timeout_member_connect: l.timeout_member_connect,
        timeout_member_data: l.timeout_member_data,
        timeout_tcp_inspect: l.timeout_tcp_inspect,
        allowed_cidrs: (!l.allowed_cidrs.is_empty()).then_some(l.allowed_cidrs.as_slice()),
        l7policies: [],
        insert_headers: EmptyObject,
        default_tls_container_ref: None,
        sni_container_refs: [],
        client_ca_tls_container_ref: None,
        client_authentication: "NONE",
        client_crl_container_ref: None,
        tls_ciphers: None,
        tls_versions: None,
        alpn_protocols: None,
        hsts_max_age: None,
        hsts_include_subdomains: None,
        hsts_preload: None,
    }
}

#[derive(Debug, Serialize)]
pub struct PoolView<'a> {
    #[serde(flatten)]
    common: CommonView<'a>,
    protocol: PoolProtocol,
    lb_algorithm: LbAlgorithm,
    session_persistence: Option<&'a SessionPersistence>,
    loadbalancers: [Ref<'a>; 1],
    listeners: Vec<Ref<'a>>,
    members: Vec<Ref<'a>>,
    healthmonitor_id: Option<&'a str>,
    tls_enabled: bool,
    tls_container_ref: Nothing,
    ca_tls_container_ref: Nothing,
    crl_container_ref: Nothing,
    tls_ciphers: Nothing,
    tls_versions: Nothing,
    alpn_protocols: Nothing,
}

pub fn pool<'a>(s: &'a State, p: &'a Pool) -> PoolView<'a> {
    let id = p.common.id.as_str();
    PoolView {
        common: common(&p.common),
        protocol: p.protocol,
        lb_algorithm: p.lb_algorithm,
        session_persistence: p.session_persistence.as_ref(),
        loadbalancers: [Ref {
            id: &p.load_balancer_id,
        }],
        listeners: refs(&s.listeners, By::Pool, id),
        members: refs(&s.members, By::Pool, id),
        healthmonitor_id: s.monitor_of(id).map(|h| h.common.id.as_str()),
        tls_enabled: false,
        tls_container_ref: None,
        ca_tls_container_ref: None,
        crl_container_ref: None,
        tls_ciphers: None,
        tls_versions: None,
        alpn_protocols: None,
    }
}

#[derive(Debug, Serialize)]
pub struct MemberView<'a> {
    #[serde(flatten)]
    common: CommonView<'a>,
    address: &'a str,
    protocol_port: u16,
    weight: i64,
    backup: bool,
    subnet_id: Option<&'a str>,
    monitor_address: Option<&'a str>,
    monitor_port: Option<u16>,
    vnic_type: &'static str,
}

pub fn member(m: &Member) -> MemberView<'_> {
    MemberView {
        common: common(&m.common),
        address: &m.address,
        protocol_port: m.protocol_port,
        weight: m.weight,
        backup: m.backup,
        subnet_id: m.subnet_id.as_deref(),
        monitor_address: m.monitor_address.as_deref(),
        monitor_port: m.monitor_port,
        vnic_type: "normal",
    }
}

#[derive(Debug, Serialize)]
pub struct HealthMonitorView<'a> {
    #[serde(flatten)]
    common: CommonView<'a>,
    #[serde(rename = "type")]
    kind: MonitorType,
    delay: i64,
    timeout: i64,
    max_retries: i64,
    max_retries_down: i64,
    http_method: Option<HttpMethod>,
    url_path: Option<&'a str>,
    expected_codes: Option<&'a str>,
    http_version: Option<f64>,
    domain_name: Option<&'a str>,
    pools: [Ref<'a>; 1],
}

pub fn health_monitor(h: &HealthMonitor) -> HealthMonitorView<'_> {
    let mut c = common(&h.common);
    c.description = None;
    HealthMonitorView {
        common: c,
        kind: h.kind,
        delay: h.delay,
        timeout: h.timeout,
        max_retries: h.max_retries,
        max_retries_down: h.max_retries_down,
        http_method: h.http_method,
        url_path: h.url_path.as_deref(),
        expected_codes: h.expected_codes.as_deref(),
        http_version: h.http_version,
        domain_name: h.domain_name.as_deref(),
        pools: [Ref { id: &h.pool_id }],
    }
}

/// An amphora as the API shows it; `bgp`: what its last heartbeat said
/// of its BGP sessions and announcements (Siphon's extension).
pub fn amphora(
    a: &Amphora,
    last_seen_ms_ago: Option<u64>,
    bgp: Option<&siphon_proto::bgp::BgpStatus>,
) -> Value {
    json!({
        "id": a.id,
        "loadbalancer_id": a.load_balancer_id,
        "compute_id": null,
        "lb_network_ip": a.lb_network_ip,
        "vrrp_ip": a.vrrp_ip,
        "ha_ip": a.vips.first(),
        "vrrp_port_id": null,
        "ha_port_id": null,
        "cert_expiration": null,
        "cert_busy": false,
        "role": if a.load_balancer_id.is_some() { Value::from("STANDALONE") } else { Value::Null },
        "status": a.status,
        "vrrp_interface": null,
        "vrrp_id": null,
        "vrrp_priority": null,
        "cached_zone": null,
        "image_id": null,
        "compute_flavor": null,
        "created_at": a.created_at,
        "updated_at": a.updated_at,
        "agent_port": a.agent_port,
        "vip_interface": a.vip_interface,
        "generation": a.generation,
        "last_heartbeat": a.last_heartbeat,
        "last_heartbeat_ms_ago": last_seen_ms_ago,
        "distributor_id": a.distributor_id,
        "error": a.error,
        "next_attempt_at": a.next_attempt_at,
        "heartbeat_key_id": a.heartbeat_key.as_ref().map(|k| k.key_id),
        "heartbeat_key_acked": a.heartbeat_key_acked,
        "bgp": bgp,
    })
}
