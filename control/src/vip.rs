//! VIP allocation from the subnets the controller is given, and the
//! Neutron-shaped views of those subnets that the stock CLI looks up.

use std::net::IpAddr;

use serde_json::{json, Value};
use thiserror::Error;

use crate::config::VipSubnet;
use crate::model::State;

/// `host:port`, bracketing IPv6.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Which subnet a load balancer's VIP comes from, and which address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub subnet: VipSubnet,
    pub address: IpAddr,
}

/// Why no VIP can be given; the API turns each into Octavia's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VipError {
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    NotAnAddress(String),
    #[error("Subnet {0} could not be found.")]
    NoSuchSubnet(String),
    #[error("Network {0} could not be found.")]
    NoSuchNetwork(String),
    #[error("No subnet of network {network} holds the address {address}")]
    NoSubnetHolds { network: String, address: String },
    #[error("Must provide at least one of: vip_port_id, vip_network_id, vip_subnet_id")]
    NoneGiven,
    #[error("The VIP address {address} is not in subnet {subnet} ({cidr})")]
    OutsideSubnet {
        address: IpAddr,
        subnet: String,
        cidr: ipnet::IpNet,
    },
    #[error(
        "It is the network or broadcast address of subnet {subnet} ({cidr}), not a host address"
    )]
    NotAHost {
        address: IpAddr,
        subnet: String,
        cidr: ipnet::IpNet,
    },
    #[error("IP address {address} already allocated in subnet {subnet}")]
    Taken { address: IpAddr, subnet: String },
    #[error("Subnet {0} has no free address left")]
    Exhausted(String),
}

/// Picks the subnet (by id, or the network's first that fits) and the
/// address (the one asked for, or the first free host address); an
/// address held by a load balancer, or in `also_taken` (given to the same
/// load balancer already), is not free.
pub fn allocate(
    subnets: &[VipSubnet],
    s: &State,
    subnet_id: Option<&str>,
    network_id: Option<&str>,
    address: Option<&str>,
    also_taken: &[IpAddr],
) -> Result<Vip, VipError> {
    let wanted: Option<IpAddr> = match address {
        Some(a) => Some(
            a.parse()
                .map_err(|_| VipError::NotAnAddress(a.to_owned()))?,
        ),
        None => None,
    };
    let subnet = match (subnet_id, network_id) {
        (Some(id), _) => subnets
            .iter()
            .find(|x| x.id == id)
            .ok_or_else(|| VipError::NoSuchSubnet(id.to_owned()))?,
        (None, Some(net)) => {
            let mut on_net = subnets.iter().filter(|x| x.network_id == net).peekable();
            if on_net.peek().is_none() {
                return Err(VipError::NoSuchNetwork(net.to_owned()));
            }
            on_net
                .find(|x| wanted.is_none_or(|a| x.cidr.contains(&a)))
                .ok_or_else(|| VipError::NoSubnetHolds {
                    network: net.to_owned(),
                    address: address.unwrap_or_default().to_owned(),
                })?
        }
        (None, None) => return Err(VipError::NoneGiven),
    };
    let used = |a: &IpAddr| s.load_balancers.holds_address(a) || also_taken.contains(a);
    let address = match wanted {
        Some(a) => {
            let (subnet, cidr) = (subnet.id.clone(), subnet.cidr);
            if !cidr.contains(&a) {
                return Err(VipError::OutsideSubnet {
                    address: a,
                    subnet,
                    cidr,
                });
            }
            if !is_host(&cidr, a) {
                return Err(VipError::NotAHost {
                    address: a,
                    subnet,
                    cidr,
                });
            }
            if used(&a) {
                return Err(VipError::Taken { address: a, subnet });
            }
            a
        }
        None => subnet
            .cidr
            .hosts()
            .find(|a| Some(*a) != subnet.gateway_ip && !used(a))
            .ok_or_else(|| VipError::Exhausted(subnet.id.clone()))?,
    };
    Ok(Vip {
        subnet: subnet.clone(),
        address,
    })
}

/// Whether `a` (inside `net`) can be a host's address: not the network
/// address (IPv6: the Subnet-Router anycast address) nor the IPv4
/// broadcast address, except on /31 and /32 (and /127, /128), where every
/// address is a host's (RFC 3021, RFC 6164).
pub fn is_host(net: &ipnet::IpNet, a: IpAddr) -> bool {
    match net {
        ipnet::IpNet::V4(n) if n.prefix_len() < 31 => {
            a != IpAddr::V4(n.network()) && a != IpAddr::V4(n.broadcast())
        }
        ipnet::IpNet::V6(n) if n.prefix_len() < 127 => a != IpAddr::V6(n.network()),
        _ => true,
    }
}

/// The subnet as Neutron shows it (what the CLI reads: id, network_id).
pub fn subnet_view(s: &VipSubnet) -> Value {
    let v4 = matches!(s.cidr, ipnet::IpNet::V4(_));
    json!({
        "id": s.id,
        "name": s.name,
        "network_id": s.network_id,
        "cidr": s.cidr.to_string(),
        "ip_version": if v4 { 4 } else { 6 },
        "gateway_ip": s.gateway_ip,
        "enable_dhcp": false,
        "allocation_pools": [],
        "host_routes": [],
        "dns_nameservers": [],
        "project_id": "",
        "tenant_id": "",
        "tags": [],
    })
}

pub fn network_view(id: &str, subnets: &[VipSubnet]) -> Value {
    let mine: Vec<&VipSubnet> = subnets.iter().filter(|s| s.network_id == id).collect();
    json!({
        "id": id,
        "name": mine.first().map(|s| s.network_name.clone()).unwrap_or_default(),
        "subnets": mine.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        "status": "ACTIVE",
        "admin_state_up": true,
        "shared": true,
        "project_id": "",
        "tenant_id": "",
        "tags": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(cidr: &str) -> VipSubnet {
        VipSubnet {
            id: "s".into(),
            name: String::new(),
            network_id: "n".into(),
            network_name: String::new(),
            cidr: cidr.parse().unwrap_or_else(|e| panic!("{cidr}: {e}")),
            gateway_ip: None,
        }
    }

    /// Whether `address` may be a VIP in `cidr`: true, or false when it
    /// is not a host's address (any other refusal fails the test).
    fn host(cidr: &str, address: &str) -> bool {
        match allocate(
            &[subnet(cidr)],
            &State::default(),
            Some("s"),
            None,
            Some(address),
            &[],
        ) {
            Ok(v) => v.address.to_string() == address,
            Err(VipError::NotAHost { .. }) => false,
            Err(e) => panic!("{cidr} {address}: {e}"),
        }
    }

    #[test]
    fn network_and_broadcast_addresses_are_not_vips() {
        assert!(!host("198.18.7.0/24", "198.18.7.0"));
        assert!(!host("198.18.7.0/24", "198.18.7.255"));
        assert!(host("198.18.7.0/24", "198.18.7.1"));
        assert!(host("198.18.7.0/24", "198.18.7.254"));
        assert!(host("198.18.7.0/31", "198.18.7.0"));
        assert!(host("198.18.7.9/32", "198.18.7.9"));
        assert!(!host("2001:db8::/64", "2001:db8::"));
        assert!(host("2001:db8::/64", "2001:db8::ffff:ffff:ffff:ffff"));
        assert!(host("2001:db8::/127", "2001:db8::"));
    }

    #[test]
    fn each_refusal_says_why() {
        let s = State::default();
        let subnets = [subnet("198.18.7.0/24")];
        let alloc = |id: Option<&str>, net: Option<&str>, a: Option<&str>| {
            allocate(&subnets, &s, id, net, a, &[]).unwrap_err()
        };
        assert!(matches!(
            alloc(Some("s"), None, Some("x")),
            VipError::NotAnAddress(_)
        ));
        assert!(matches!(
            alloc(Some("t"), None, None),
            VipError::NoSuchSubnet(_)
        ));
        assert!(matches!(
            alloc(None, Some("m"), None),
            VipError::NoSuchNetwork(_)
        ));
        assert!(matches!(
            alloc(None, Some("n"), Some("198.18.8.1")),
            VipError::NoSubnetHolds { .. }
        ));
        assert!(matches!(alloc(None, None, None), VipError::NoneGiven));
        assert!(matches!(
            alloc(Some("s"), None, Some("198.18.8.1")),
            VipError::OutsideSubnet { .. }
        ));
        let tiny = [subnet("198.18.7.9/32")];
        let mut taken = State::default();
        let lb: crate::model::LoadBalancer = serde_json::from_value(json!({
            "id": "lb", "name": "", "description": "", "project_id": "",
            "admin_state_up": true, "provisioning_status": "ACTIVE",
            "operating_status": "ONLINE", "tags": [], "created_at": "", "updated_at": null,
            "vip_address": "198.18.7.9", "vip_subnet_id": "s", "vip_network_id": "n",
            "vip_port_id": "", "vip_qos_policy_id": null, "provider": "siphon",
            "flavor_id": "", "availability_zone": null, "topology": "SINGLE",
            "amphora_count": 1
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        taken.load_balancers.insert(lb);
        assert!(matches!(
            allocate(&tiny, &taken, Some("s"), None, Some("198.18.7.9"), &[]),
            Err(VipError::Taken { .. })
        ));
        assert!(matches!(
            allocate(&tiny, &taken, Some("s"), None, None, &[]),
            Err(VipError::Exhausted(_))
        ));
        assert!(allocate(&tiny, &State::default(), Some("s"), None, None, &[]).is_ok());
        // Given back with its load balancer (the address index follows).
        taken.load_balancers.remove("lb");
        assert!(allocate(&tiny, &taken, Some("s"), None, None, &[]).is_ok());
    }
}
