//! A load balancer, rendered into the dataplane config each of its
//! amphorae runs. Every amphora of one load balancer gets the same
//! document (same members, same order, so the same Maglev tables); only
//! the generation is per amphora.
//!
//! What is left out: objects being deleted, and objects whose creation
//! failed (`ERROR`, never deployed), so one bad object cannot block every
//! later push. An object whose later change failed stays: it is still on
//! the amphorae, and a later push carries its current values.

use siphon_proto::config::model as dp;

use crate::model::{
    Common, HealthMonitor, Listener, LoadBalancer, Member, PersistenceType, Pool,
    ProvisioningStatus, SessionPersistence, State,
};

/// Rendered: everything but what is being deleted and what failed before
/// it ever reached the amphorae.
fn live(c: &Common) -> bool {
    match c.provisioning_status {
        ProvisioningStatus::PendingDelete => false,
        ProvisioningStatus::Error => c.deployed,
        _ => true,
    }
}

/// The dataplane config for `lb` (empty when the LB is being deleted).
pub fn config(s: &State, lb: &LoadBalancer, generation: u64) -> dp::Config {
    let mut c = dp::Config {
        generation,
        listeners: Vec::new(),
        pools: Vec::new(),
    };
    if lb.common.provisioning_status == ProvisioningStatus::PendingDelete {
        return c;
    }
    let id = lb.common.id.as_str();
    let pools: Vec<&Pool> = s.pools_of(id).filter(|p| live(&p.common)).collect();
    for l in s.listeners_of(id).filter(|l| live(&l.common)) {
        let pool = l
            .default_pool_id
            .as_deref()
            .filter(|p| pools.iter().any(|x| x.common.id == *p));
        c.listeners.push(listener(lb, l, pool));
    }
    for p in pools {
        let members = s
            .members_of(&p.common.id)
            .filter(|m| live(&m.common))
            .map(|m| member(p, m))
            .collect();
        let monitor = s
            .monitor_of(&p.common.id)
            .filter(|h| live(&h.common))
            .map(monitor);
        c.pools.push(dp::Pool {
            id: p.common.id.clone(),
            protocol: p.protocol,
            lb_algorithm: algorithm(p),
            members,
            healthmonitor: monitor,
            maglev_table_size: dp::DEFAULT_MAGLEV_TABLE_SIZE,
        });
    }
    c
}

fn listener(lb: &LoadBalancer, l: &Listener, pool: Option<&str>) -> dp::Listener {
    dp::Listener {
        id: l.common.id.clone(),
        protocol: l.protocol,
        bind_addresses: lb.vips(),
        protocol_port: i64::from(l.protocol_port),
        connection_limit: l.connection_limit,
        timeout_client_data: l.timeout_client_data.max(0) as u64,
        timeout_member_connect: l.timeout_member_connect.max(0) as u64,
        timeout_member_data: l.timeout_member_data.max(0) as u64,
        connect_retries: dp::DEFAULT_CONNECT_RETRIES,
        max_flows: dp::DEFAULT_MAX_FLOWS,
        allowed_cidrs: l.allowed_cidrs.clone(),
        default_pool_id: pool.map(str::to_owned),
        admin_state_up: l.common.admin_state_up && lb.common.admin_state_up,
    }
}

/// `session_persistence: SOURCE_IP` pins a client to a member: on the
/// dataplane that is the SOURCE_IP (Maglev on the source address)
/// algorithm, which every amphora computes alike.
fn algorithm(p: &Pool) -> dp::LbAlgorithm {
    match &p.session_persistence {
        Some(SessionPersistence {
            kind: PersistenceType::SourceIp,
            ..
        }) => dp::LbAlgorithm::SourceIp,
        None => p.lb_algorithm,
    }
}

fn member(p: &Pool, m: &Member) -> dp::Member {
    dp::Member {
        id: m.common.id.clone(),
        address: m.address.clone(),
        protocol_port: i64::from(m.protocol_port),
        weight: m.weight,
        backup: m.backup,
        admin_state_up: m.common.admin_state_up && p.common.admin_state_up,
        monitor_address: m.monitor_address.clone(),
        monitor_port: m.monitor_port.map(i64::from),
    }
}

fn monitor(h: &HealthMonitor) -> dp::HealthMonitor {
    let http = matches!(h.kind, dp::MonitorType::Http | dp::MonitorType::Https);
    dp::HealthMonitor {
        kind: h.kind,
        delay: h.delay,
        timeout: h.timeout,
        max_retries: h.max_retries,
        max_retries_down: h.max_retries_down,
        http_method: if http { h.http_method } else { None },
        url_path: if http { h.url_path.clone() } else { None },
        expected_codes: if http { h.expected_codes.clone() } else { None },
        admin_state_up: h.common.admin_state_up,
    }
}
