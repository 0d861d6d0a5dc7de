//! What the API shows for each object: Octavia's response fields, with
//! the relationships (`listeners: [{id}]`, ...) filled in from the state
//! and the fields of features an L4 provider lacks present with their
//! empty values, as clients expect every key.

use serde_json::{json, Map, Value};

use crate::model::{Amphora, Common, HealthMonitor, Listener, LoadBalancer, Member, Pool, State};

fn ids<'a>(it: impl Iterator<Item = &'a str>) -> Value {
    Value::Array(it.map(|id| json!({ "id": id })).collect())
}

fn common(c: &Common) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(c.id));
    m.insert("name".into(), json!(c.name));
    m.insert("description".into(), json!(c.description));
    m.insert("project_id".into(), json!(c.project_id));
    m.insert("tenant_id".into(), json!(c.project_id));
    m.insert("admin_state_up".into(), json!(c.admin_state_up));
    m.insert("provisioning_status".into(), json!(c.provisioning_status));
    m.insert("operating_status".into(), json!(c.operating_status));
    m.insert("tags".into(), json!(c.tags));
    m.insert("created_at".into(), json!(c.created_at));
    m.insert("updated_at".into(), json!(c.updated_at));
    if c.provisioning_error.is_some() {
        m.insert("provisioning_error".into(), json!(c.provisioning_error));
    }
    if c.next_attempt_at.is_some() {
        m.insert("next_attempt_at".into(), json!(c.next_attempt_at));
    }
    m
}

fn with(mut m: Map<String, Value>, extra: Value) -> Value {
    if let Value::Object(e) = extra {
        m.extend(e);
    }
    Value::Object(m)
}

pub fn load_balancer(s: &State, lb: &LoadBalancer) -> Value {
    let id = lb.common.id.as_str();
    with(
        common(&lb.common),
        json!({
            "vip_address": lb.vip_address,
            "vip_port_id": lb.vip_port_id,
            "vip_subnet_id": lb.vip_subnet_id,
            "vip_network_id": lb.vip_network_id,
            "vip_qos_policy_id": lb.vip_qos_policy_id,
            "vip_vnic_type": "normal",
            "vip_sg_ids": [],
            "additional_vips": [],
            "provider": lb.provider,
            "flavor_id": lb.flavor_id,
            "availability_zone": lb.availability_zone,
            "listeners": ids(s.listeners_of(id).map(|l| l.common.id.as_str())),
            "pools": ids(s.pools_of(id).map(|p| p.common.id.as_str())),
            "topology": lb.topology,
            "amphora_count": lb.amphora_count,
            "distributor_id": lb.distributor_id,
        }),
    )
}

pub fn listener(s: &State, l: &Listener) -> Value {
    let _ = s;
    with(
        common(&l.common),
        json!({
            "protocol": l.protocol,
            "protocol_port": l.protocol_port,
            "connection_limit": l.connection_limit,
            "default_pool_id": l.default_pool_id,
            "loadbalancers": [{ "id": l.load_balancer_id }],
            "timeout_client_data": l.timeout_client_data,
            "timeout_member_connect": l.timeout_member_connect,
            "timeout_member_data": l.timeout_member_data,
            "timeout_tcp_inspect": l.timeout_tcp_inspect,
            "allowed_cidrs": if l.allowed_cidrs.is_empty() { Value::Null } else { json!(l.allowed_cidrs) },
            "l7policies": [],
            "insert_headers": {},
            "default_tls_container_ref": null,
            "sni_container_refs": [],
            "client_ca_tls_container_ref": null,
            "client_authentication": "NONE",
            "client_crl_container_ref": null,
            "tls_ciphers": null,
            "tls_versions": null,
            "alpn_protocols": null,
            "hsts_max_age": null,
            "hsts_include_subdomains": null,
            "hsts_preload": null,
        }),
    )
}

pub fn pool(s: &State, p: &Pool) -> Value {
    let id = p.common.id.as_str();
    with(
        common(&p.common),
        json!({
            "protocol": p.protocol,
            "lb_algorithm": p.lb_algorithm,
            "session_persistence": p.session_persistence,
            "loadbalancers": [{ "id": p.load_balancer_id }],
            "listeners": ids(s.listeners_using(id).map(|l| l.common.id.as_str())),
            "members": ids(s.members_of(id).map(|m| m.common.id.as_str())),
            "healthmonitor_id": s.monitor_of(id).map(|h| h.common.id.as_str()),
            "tls_enabled": false,
            "tls_container_ref": null,
            "ca_tls_container_ref": null,
            "crl_container_ref": null,
            "tls_ciphers": null,
            "tls_versions": null,
            "alpn_protocols": null,
        }),
    )
}

pub fn member(m: &Member) -> Value {
    with(
        common(&m.common),
        json!({
            "address": m.address,
            "protocol_port": m.protocol_port,
            "weight": m.weight,
            "backup": m.backup,
            "subnet_id": m.subnet_id,
            "monitor_address": m.monitor_address,
            "monitor_port": m.monitor_port,
            "vnic_type": "normal",
        }),
    )
}

pub fn health_monitor(h: &HealthMonitor) -> Value {
    let mut m = common(&h.common);
    // A monitor has no description in Octavia.
    m.remove("description");
    with(
        m,
        json!({
            "type": h.kind,
            "delay": h.delay,
            "timeout": h.timeout,
            "max_retries": h.max_retries,
            "max_retries_down": h.max_retries_down,
            "http_method": h.http_method,
            "url_path": h.url_path,
            "expected_codes": h.expected_codes,
            "http_version": h.http_version,
            "domain_name": h.domain_name,
            "pools": [{ "id": h.pool_id }],
        }),
    )
}

pub fn amphora(a: &Amphora, last_seen_ms_ago: Option<u64>) -> Value {
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
    })
}
