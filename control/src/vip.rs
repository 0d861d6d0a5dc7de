//! VIP allocation from the subnets the controller is given, and the
//! Neutron-shaped views of those subnets that the stock CLI looks up.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{json, Value};

use crate::api::fault::Fault;
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

/// Picks the subnet (by id, or the network's first that fits) and the
/// address (the one asked for, or the first free host address).
pub fn allocate(
    subnets: &[VipSubnet],
    s: &State,
    subnet_id: Option<&str>,
    network_id: Option<&str>,
    address: Option<&str>,
) -> Result<Vip, Fault> {
    let wanted: Option<IpAddr> = match address {
        Some(a) => Some(a.parse().map_err(|_| {
            Fault::invalid("vip_address", a, "Value should be IPv4 or IPv6 format")
        })?),
        None => None,
    };
    let subnet = match (subnet_id, network_id) {
        (Some(id), _) => subnets
            .iter()
            .find(|x| x.id == id)
            .ok_or_else(|| Fault::bad_request(format!("Subnet {id} could not be found.")))?,
        (None, Some(net)) => {
            let mut on_net = subnets.iter().filter(|x| x.network_id == net).peekable();
            if on_net.peek().is_none() {
                return Err(Fault::bad_request(format!(
                    "Network {net} could not be found."
                )));
            }
            on_net
                .find(|x| wanted.is_none_or(|a| x.cidr.contains(&a)))
                .ok_or_else(|| {
                    Fault::bad_request(format!(
                        "No subnet of network {net} holds the address {}",
                        address.unwrap_or_default()
                    ))
                })?
        }
        (None, None) => {
            return Err(Fault::bad_request(
                "Must provide at least one of: vip_port_id, vip_network_id, vip_subnet_id",
            ))
        }
    };
    let used: HashSet<IpAddr> = s
        .load_balancers
        .values()
        .filter_map(|lb| lb.vip_address.parse().ok())
        .collect();
    let address = match wanted {
        Some(a) => {
            if !subnet.cidr.contains(&a) {
                return Err(Fault::bad_request(format!(
                    "The VIP address {a} is not in subnet {} ({})",
                    subnet.id, subnet.cidr
                )));
            }
            if !is_host(&subnet.cidr, a) {
                return Err(Fault::invalid(
                    "vip_address",
                    a,
                    &format!(
                        "It is the network or broadcast address of subnet {} ({}), not a host address",
                        subnet.id, subnet.cidr
                    ),
                ));
            }
            if used.contains(&a) {
                return Err(Fault::conflict(format!(
                    "IP address {a} already allocated in subnet {}",
                    subnet.id
                )));
            }
            a
        }
        None => subnet
            .cidr
            .hosts()
            .find(|a| Some(*a) != subnet.gateway_ip && !used.contains(a))
            .ok_or_else(|| {
                Fault::conflict(format!("Subnet {} has no free address left", subnet.id))
            })?,
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

    fn status(cidr: &str, address: &str) -> u16 {
        match allocate(
            &[subnet(cidr)],
            &State::default(),
            Some("s"),
            None,
            Some(address),
        ) {
            Ok(_) => 200,
            Err(f) => f.status.as_u16(),
        }
    }

    #[test]
    fn network_and_broadcast_addresses_are_not_vips() {
        assert_eq!(status("198.18.7.0/24", "198.18.7.0"), 400);
        assert_eq!(status("198.18.7.0/24", "198.18.7.255"), 400);
        assert_eq!(status("198.18.7.0/24", "198.18.7.1"), 200);
        assert_eq!(status("198.18.7.0/24", "198.18.7.254"), 200);
        assert_eq!(status("198.18.7.0/31", "198.18.7.0"), 200);
        assert_eq!(status("198.18.7.9/32", "198.18.7.9"), 200);
        assert_eq!(status("2001:db8::/64", "2001:db8::"), 400);
        assert_eq!(
            status("2001:db8::/64", "2001:db8::ffff:ffff:ffff:ffff"),
            200
        );
        assert_eq!(status("2001:db8::/127", "2001:db8::"), 200);
    }
}
