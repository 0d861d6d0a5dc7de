"""The provider driver Octavia's API loads as `siphon`.

Each call is translated (translate.py) and sent to siphon-control with
Octavia's ids, so both sides name every object alike; siphon-control then
provisions, and the provider agent (agent.py) reports the outcome back.
A driver method only asks: it never reports a status itself (Octavia's API
has not committed the object yet while it runs).
"""

import ipaddress
import random
import uuid

from oslo_config import cfg
from oslo_log import log as logging

from octavia_lib.api.drivers import exceptions
from octavia_lib.api.drivers import provider_base

from siphon_octavia import client as siphon_client
from siphon_octavia import config
from siphon_octavia import translate

LOG = logging.getLogger(__name__)

# vip_port_id for a VIP Siphon allocated: derived from the load balancer's
# id, so Octavia has a stable UUID (it stores it, nothing else uses it).
VIP_PORT_NAMESPACE = uuid.UUID("6f1c3c1e-5b1a-4f8e-9d3a-51b40c0de001")

# Past this many addresses a subnet is sampled, not walked (an IPv6 /64).
WALK_LIMIT = 1 << 16


class SiphonProviderDriver(provider_base.ProviderDriver):
    def __init__(self):
        super().__init__()
        self.conf = config.register(cfg.CONF)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                self._client = siphon_client.Client.from_conf(self.conf)
            except OSError as e:
                raise _driver_error(f"cannot read [siphon] token_file: {e}") from e
        return self._client

    def _call(self, method, path, body=None, params=None):
        try:
            return self.client.call(method, path, body, params)
        except siphon_client.SiphonError as e:
            LOG.warning("siphon-control refused %s %s: %s", method, path, e.message)
            if e.status in (400, 501):
                raise exceptions.UnsupportedOptionError(
                    user_fault_string=e.message, operator_fault_string=str(e)
                ) from e
            raise _driver_error(e.message, str(e)) from e

    # ---- VIPs

    def create_vip_port(self, loadbalancer_id, project_id, vip_dictionary, additional_vip_dicts=None):
        if not self.conf.allocate_vips:
            raise exceptions.NotImplementedError(
                user_fault_string="VIP ports come from Octavia's network driver",
                operator_fault_string="[siphon] allocate_vips = false",
            )
        if vip_dictionary.get("vip_port_id"):
            translate.refuse("vip_port_id", "Siphon allocates the VIP from its own VIP subnets")
        subnets = self._call("GET", "/v2.0/subnets")["subnets"]
        used = self._used_addresses()
        vip = dict(vip_dictionary)
        subnet = _pick_subnet(subnets, vip.get("vip_subnet_id"), vip.get("vip_network_id"))
        vip["vip_subnet_id"] = subnet["id"]
        vip["vip_network_id"] = subnet["network_id"]
        vip["vip_address"] = _pick_address(subnet, vip.get("vip_address"), used)
        used.add(vip["vip_address"])
        vip["vip_port_id"] = str(uuid.uuid5(VIP_PORT_NAMESPACE, loadbalancer_id))
        extra = []
        for i, a in enumerate(additional_vip_dicts or []):
            a = dict(a)
            if a.get("port_id"):
                translate.refuse("port_id in additional_vips", "Siphon allocates VIPs itself")
            s = _pick_subnet(subnets, a.get("subnet_id"), subnet["network_id"])
            a["subnet_id"] = s["id"]
            a["network_id"] = s["network_id"]
            a["ip_address"] = _pick_address(s, a.get("ip_address"), used)
            used.add(a["ip_address"])
            a["port_id"] = str(uuid.uuid5(VIP_PORT_NAMESPACE, f"{loadbalancer_id}/{i + 1}"))
            extra.append(a)
        LOG.info("VIP %s on subnet %s for load balancer %s", vip["vip_address"], subnet["id"], loadbalancer_id)
        return vip, extra

    def _used_addresses(self):
        used = set()
        marker = None
        while True:
            params = {"fields": ["vip_address", "additional_vips", "id"], "limit": 1000}
            if marker:
                params["marker"] = marker
            page = self._call("GET", "lbaas/loadbalancers", params=params)["loadbalancers"]
            for lb in page:
                if lb.get("vip_address"):
                    used.add(_normal(lb["vip_address"]))
                for a in lb.get("additional_vips") or []:
                    if a.get("ip_address"):
                        used.add(_normal(a["ip_address"]))
            if len(page) < 1000:
                return used
            marker = page[-1]["id"]

    # ---- load balancers

    def loadbalancer_create(self, loadbalancer):
        self._call("POST", "lbaas/loadbalancers", {"loadbalancer": translate.loadbalancer_create(loadbalancer)})

    def loadbalancer_update(self, old_loadbalancer, new_loadbalancer):
        body = translate.loadbalancer_update(new_loadbalancer)
        self._call("PUT", f"lbaas/loadbalancers/{old_loadbalancer.loadbalancer_id}", {"loadbalancer": body})

    def loadbalancer_delete(self, loadbalancer, cascade=False):
        params = {"cascade": "true"} if cascade else None
        self._gone_is_fine("DELETE", f"lbaas/loadbalancers/{loadbalancer.loadbalancer_id}", params)

    def loadbalancer_failover(self, loadbalancer_id):
        self._call("PUT", f"lbaas/loadbalancers/{loadbalancer_id}/failover")

    # ---- listeners

    def listener_create(self, listener):
        self._call("POST", "lbaas/listeners", {"listener": translate.listener_create(listener)})

    def listener_update(self, old_listener, new_listener):
        body = translate.listener_update(new_listener)
        self._call("PUT", f"lbaas/listeners/{old_listener.listener_id}", {"listener": body})

    def listener_delete(self, listener):
        self._gone_is_fine("DELETE", f"lbaas/listeners/{listener.listener_id}")

    # ---- pools

    def pool_create(self, pool):
        self._call("POST", "lbaas/pools", {"pool": translate.pool_create(pool)})

    def pool_update(self, old_pool, new_pool):
        self._call("PUT", f"lbaas/pools/{old_pool.pool_id}", {"pool": translate.pool_update(new_pool)})

    def pool_delete(self, pool):
        self._gone_is_fine("DELETE", f"lbaas/pools/{pool.pool_id}")

    # ---- members

    def member_create(self, member):
        body = translate.member_create(member)
        self._call("POST", f"lbaas/pools/{member.pool_id}/members", {"member": body})

    def member_update(self, old_member, new_member):
        body = translate.member_update(new_member)
        path = f"lbaas/pools/{old_member.pool_id}/members/{old_member.member_id}"
        self._call("PUT", path, {"member": body})

    def member_delete(self, member):
        self._gone_is_fine("DELETE", f"lbaas/pools/{member.pool_id}/members/{member.member_id}")

    def member_batch_update(self, pool_id, members):
        body = {"members": translate.member_batch(members)}
        self._call("PUT", f"lbaas/pools/{pool_id}/members", body)

    # ---- health monitors

    def health_monitor_create(self, healthmonitor):
        body = translate.healthmonitor_create(healthmonitor)
        self._call("POST", "lbaas/healthmonitors", {"healthmonitor": body})

    def health_monitor_update(self, old_healthmonitor, new_healthmonitor):
        body = translate.healthmonitor_update(new_healthmonitor)
        path = f"lbaas/healthmonitors/{old_healthmonitor.healthmonitor_id}"
        self._call("PUT", path, {"healthmonitor": body})

    def health_monitor_delete(self, healthmonitor):
        self._gone_is_fine("DELETE", f"lbaas/healthmonitors/{healthmonitor.healthmonitor_id}")

    # ---- L7: not an L4 balancer's business

    def l7policy_create(self, l7policy):
        _no_l7("policies")

    def l7policy_update(self, old_l7policy, new_l7policy):
        _no_l7("policies")

    def l7policy_delete(self, l7policy):
        _no_l7("policies")

    def l7rule_create(self, l7rule):
        _no_l7("rules")

    def l7rule_update(self, old_l7rule, new_l7rule):
        _no_l7("rules")

    def l7rule_delete(self, l7rule):
        _no_l7("rules")

    # ---- flavors and availability zones

    def get_supported_flavor_metadata(self):
        return dict(translate.FLAVOR_METADATA)

    def validate_flavor(self, flavor_metadata):
        translate.validate_flavor(flavor_metadata)

    def get_supported_availability_zone_metadata(self):
        return {}

    def validate_availability_zone(self, availability_zone_metadata):
        translate.validate_availability_zone(availability_zone_metadata)

    def _gone_is_fine(self, method, path, params=None):
        """A delete of what siphon-control no longer has is done: the agent
        reports it DELETED (siphon-control keeps a tombstone)."""
        try:
            self.client.call(method, path, params=params)
        except siphon_client.SiphonError as e:
            if e.status == 404:
                LOG.info("%s %s: already gone from siphon-control", method, path)
                return
            LOG.warning("siphon-control refused %s %s: %s", method, path, e.message)
            raise _driver_error(e.message, str(e)) from e


def _no_l7(what):
    translate.refuse(f"L7 {what}", "Siphon is an L4 (TCP and UDP) balancer")


def _driver_error(user, operator=None):
    return exceptions.DriverError(user_fault_string=user, operator_fault_string=operator or user)


def _normal(address):
    return str(ipaddress.ip_address(address))


def _pick_subnet(subnets, subnet_id, network_id):
    for s in subnets:
        if subnet_id and s["id"] == subnet_id:
            return s
    if subnet_id:
        translate.refuse(
            f"the VIP subnet {subnet_id}",
            "it is not one of siphon-control's VIP subnets ([[vip_subnets]]; "
            f"these are: {', '.join(s['id'] for s in subnets) or 'none'})",
        )
    for s in subnets:
        if network_id and s["network_id"] == network_id:
            return s
    translate.refuse(
        f"the VIP network {network_id}",
        "no VIP subnet of siphon-control is on it",
    )


def _pick_address(subnet, wanted, used):
    net = ipaddress.ip_network(subnet["cidr"], strict=False)
    if wanted:
        a = ipaddress.ip_address(wanted)
        if a not in net:
            translate.refuse(f"the VIP address {wanted}", f"it is not in {net}")
        if str(a) in used:
            raise _driver_error(f"The VIP address {wanted} is in use")
        return str(a)
    skip = {subnet.get("gateway_ip")} | used
    # A random free address, so concurrent creates (which each see the
    # same used set) rarely pick the same one; siphon-control refuses a
    # duplicate at create in any case.
    if net.num_addresses <= WALK_LIMIT:
        free = [str(h) for h in net.hosts() if str(h) not in skip]
        if free:
            return random.choice(free)
    else:
        for _ in range(1000):
            a = str(net[random.randrange(1, net.num_addresses - 1)])
            if a not in skip:
                return a
    raise _driver_error(f"No free VIP address is left in {net} (subnet {subnet['id']})")
