//! Stored state and liveness built by hand, for the decisions' tests.

use std::time::{Duration, Instant};

use crate::decide::{HealthPolicy, Policy};
use crate::liveness::{Live, Report, View};
use crate::model::*;
use crate::store::{Op, Tx};

pub const SEC: Duration = Duration::from_secs(1);

/// Heartbeat timeout 3 s, repair timeout 30 s, breaker at 3.
pub fn policy() -> Policy {
    Policy {
        health: Some(HealthPolicy {
            heartbeat_timeout: 3 * SEC,
            repair_timeout: 30 * SEC,
            failover_threshold: Some(3),
        }),
        backoff: Duration::from_millis(200),
        retry_max: 30 * SEC,
    }
}

pub fn common(id: &str) -> Common {
    Common {
        id: id.into(),
        name: String::new(),
        description: String::new(),
        project_id: "p".into(),
        admin_state_up: true,
        provisioning_status: ProvisioningStatus::Active,
        operating_status: OperatingStatus::Online,
        tags: Vec::new(),
        created_at: "2026-12-01T00:00:00".into(),
        updated_at: None,
        provisioning_error: None,
        deployed: true,
        next_attempt_at: None,
    }
}

/// `lb` (VIP 198.18.0.1, two amphorae) on a1 and a2, and a spare s1, all
/// heard 1 s ago.
pub fn pair() -> World {
    let mut w = World::new();
    w.lb("lb", 1, 2)
        .amp("a1", Some("lb"), Some(SEC))
        .amp("a2", Some("lb"), Some(SEC))
        .amp("s1", None, Some(SEC));
    w
}

/// A stored world and the liveness of its amphorae, 100 s after the
/// controller started.
pub struct World {
    pub state: State,
    pub view: View,
    pub t0: Instant,
}

impl World {
    pub fn new() -> World {
        let t0 = Instant::now();
        World {
            state: State::default(),
            view: View::empty(t0 + 100 * SEC, t0),
            t0,
        }
    }

    pub fn put(&mut self, o: impl Into<crate::store::Object>) {
        crate::store::apply(&mut self.state, vec![Op::put(o)]);
    }

    /// An `ACTIVE_ACTIVE` load balancer with VIP 198.18.0.`n`.
    pub fn lb(&mut self, id: &str, n: u8, count: u32) -> &mut World {
        self.put(LoadBalancer {
            common: common(id),
            vip_address: format!("198.18.0.{n}"),
            vip_subnet_id: "s".into(),
            vip_network_id: "n".into(),
            vip_port_id: "port".into(),
            vip_qos_policy_id: None,
            provider: "siphon".into(),
            flavor_id: String::new(),
            availability_zone: None,
            topology: Topology::ActiveActive,
            amphora_count: count,
            distributor_id: Some(u32::from(n)),
            retry: None,
            additional_vips: Vec::new(),
        });
        self
    }

    /// An amphora: `lb` carries it (`ALLOCATED`, holding its VIP) or it is
    /// a spare (`READY`); heard `ago` before now.
    pub fn amp(&mut self, id: &str, lb: Option<&str>, ago: Option<Duration>) -> &mut World {
        let vip = lb
            .and_then(|l| self.state.load_balancers.get(l))
            .map(|l| l.vip_address.clone());
        let n = self.state.amphorae.len() as u32 + 100;
        self.put(Amphora {
            id: id.into(),
            load_balancer_id: lb.map(Into::into),
            status: if lb.is_some() {
                AmphoraStatus::Allocated
            } else {
                AmphoraStatus::Ready
            },
            lb_network_ip: format!("198.19.0.{}", n - 99),
            agent_port: 9443,
            server_name: id.into(),
            ca_certificate: None,
            vip_interface: "eth1".into(),
            generation: 1,
            vips: vip.into_iter().collect(),
            created_at: format!("2026-12-01T00:00:{:02}", n - 100),
            updated_at: None,
            error: None,
            last_heartbeat: None,
            vrrp_ip: None,
            distributor_id: Some(n),
            next_attempt_at: None,
            heartbeat_key: None,
            previous_heartbeat_key: None,
            previous_key_valid_until: None,
            older_heartbeat_keys: Vec::new(),
            heartbeat_key_acked: true,
            own_key_held: false,
            heartbeat_seq: 0,
        });
        if let Some(ago) = ago {
            self.heard(id, ago, Report::default());
        }
        self
    }

    /// `id` heard `ago` before now, saying `report`.
    pub fn heard(&mut self, id: &str, ago: Duration, report: Report) -> &mut World {
        let at = self.view.now - ago;
        self.live(id, |l| {
            l.heard = Some(at);
            l.report = Some(report);
        })
    }

    pub fn live(&mut self, id: &str, f: impl FnOnce(&mut Live)) -> &mut World {
        let mut l = self.view.get(id).cloned().unwrap_or_default();
        f(&mut l);
        self.view.set(id, l);
        self
    }

    pub fn amphora(&mut self, id: &str, f: impl FnOnce(&mut Amphora)) -> &mut World {
        if let Some(mut a) = self.state.amphorae.get(id).cloned() {
            f(&mut a);
            self.put(a);
        }
        self
    }

    pub fn load_balancer(&mut self, id: &str, f: impl FnOnce(&mut LoadBalancer)) -> &mut World {
        if let Some(mut l) = self.state.load_balancers.get(id).cloned() {
            f(&mut l);
            self.put(l);
        }
        self
    }

    /// Moves the clock on.
    pub fn later(&mut self, d: Duration) -> &mut World {
        self.view.now += d;
        self
    }

    /// Runs a decision that writes a change, and applies the change.
    pub fn write<R>(&mut self, f: impl FnOnce(&State, &View, &mut Tx) -> R) -> R {
        let mut tx = Tx::default();
        let r = f(&self.state, &self.view, &mut tx);
        crate::store::apply(&mut self.state, tx.ops().to_vec());
        r
    }

    pub fn status(&self, amphora: &str) -> Option<AmphoraStatus> {
        self.state.amphorae.get(amphora).map(|a| a.status)
    }

    pub fn carrier(&self, amphora: &str) -> Option<&str> {
        self.state
            .amphorae
            .get(amphora)
            .and_then(|a| a.load_balancer_id.as_deref())
    }

    /// A TCP listener of `lb` on port 80.
    pub fn listener(&mut self, id: &str, lb: &str, status: ProvisioningStatus) -> &mut World {
        let mut c = common(id);
        c.provisioning_status = status;
        self.put(Listener {
            common: c,
            load_balancer_id: lb.into(),
            protocol: ListenerProtocol::Tcp,
            protocol_port: 80,
            connection_limit: -1,
            default_pool_id: None,
            timeout_client_data: 50_000,
            timeout_member_connect: 5_000,
            timeout_member_data: 50_000,
            timeout_tcp_inspect: 0,
            allowed_cidrs: Vec::new(),
        });
        self
    }

    /// A round-robin TCP pool of `lb`.
    pub fn pool(&mut self, id: &str, lb: &str) -> &mut World {
        self.put(Pool {
            common: common(id),
            load_balancer_id: lb.into(),
            protocol: PoolProtocol::Tcp,
            lb_algorithm: LbAlgorithm::RoundRobin,
            session_persistence: None,
        });
        self
    }

    /// A member of `pool` (of `lb`).
    pub fn member(
        &mut self,
        id: &str,
        pool: &str,
        lb: &str,
        status: ProvisioningStatus,
    ) -> &mut World {
        let mut c = common(id);
        c.provisioning_status = status;
        self.put(Member {
            common: c,
            load_balancer_id: lb.into(),
            pool_id: pool.into(),
            address: "198.18.1.1".into(),
            protocol_port: 80,
            weight: 1,
            backup: false,
            subnet_id: None,
            monitor_address: None,
            monitor_port: None,
        });
        self
    }
}
