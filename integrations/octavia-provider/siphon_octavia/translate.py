"""octavia-lib's data models to siphon-control's request bodies.

Everything Siphon does not do is refused here, before siphon-control is
asked, with `UnsupportedOptionError` naming the option (Octavia answers it
with 501 and the message). Options siphon-control itself checks (ranges,
algorithms, monitor types) are passed on, and its refusals come back the
same way (see driver.py).
"""

from octavia_lib.api.drivers import data_models
from octavia_lib.api.drivers import exceptions

# What an L4 balancer serves; the rest of Octavia's protocols need HTTP or
# TLS handling (or SCTP) that Siphon does not have.
LISTENER_PROTOCOLS = ("TCP", "UDP")
POOL_PROTOCOLS = ("TCP", "UDP", "PROXY", "PROXYV2")
TOPOLOGIES = ("SINGLE", "ACTIVE_ACTIVE")
# siphon-control's limit (its API refuses more as well).
MAX_AMPHORA_COUNT = 64

FLAVOR_METADATA = {
    "topology": "SINGLE: one amphora (with spares for failover); "
    "ACTIVE_ACTIVE: the VIP spread over amphora_count amphorae by the "
    "controller's distributor (ECMP or BGP).",
    "amphora_count": "How many amphorae carry an ACTIVE_ACTIVE load "
    "balancer (2 to 64, default 2).",
}


def refuse(option, why):
    msg = f"Siphon does not support {option}: {why}"
    raise exceptions.UnsupportedOptionError(user_fault_string=msg, operator_fault_string=msg)


def fields(obj):
    """The attributes an octavia-lib model carries (Unset ones left out);
    lists kept, nested models left out."""
    out = {}
    for k, v in vars(obj).items():
        if k.startswith("_") or isinstance(v, data_models.UnsetType):
            continue
        if isinstance(v, data_models.BaseDataModel):
            continue
        if isinstance(v, list) and any(isinstance(i, data_models.BaseDataModel) for i in v):
            continue
        out[k] = v
    return out


def _set(f, key):
    """True when `key` is given a value that asks for something."""
    v = f.get(key)
    return v not in (None, "", [], {}, False)


def _copy(f, body, keys):
    for k in keys:
        if k in f:
            body[k] = f[k]
    return body


COMMON = ("name", "description", "admin_state_up", "project_id")


# ---- flavors and availability zones


def validate_flavor(meta):
    unknown = sorted(set(meta or {}) - set(FLAVOR_METADATA))
    if unknown:
        refuse(
            f"the flavor metadata {', '.join(unknown)}",
            f"it takes {', '.join(sorted(FLAVOR_METADATA))}",
        )
    flavor_body(meta or {})


def flavor_body(meta):
    """The load-balancer fields a flavor's metadata sets."""
    body = {}
    topology = meta.get("topology")
    if topology is not None:
        if topology not in TOPOLOGIES:
            refuse(f"topology {topology!r}", f"it is one of {', '.join(TOPOLOGIES)}")
        body["topology"] = topology
    count = meta.get("amphora_count")
    if count is not None:
        try:
            n = int(count)
        except (TypeError, ValueError):
            n = None
        if n is None or isinstance(count, bool) or not 1 <= n <= MAX_AMPHORA_COUNT:
            refuse(
                f"amphora_count {count!r}",
                f"it is a whole number from 1 to {MAX_AMPHORA_COUNT}",
            )
        if body.get("topology", "SINGLE") == "SINGLE" and n != 1:
            refuse(
                f"amphora_count {n} without topology ACTIVE_ACTIVE",
                "a SINGLE load balancer runs on one amphora",
            )
        body["amphora_count"] = n
    return body


def validate_availability_zone(meta):
    if meta:
        refuse(
            f"availability zone metadata ({', '.join(sorted(meta))})",
            "Siphon's amphorae form one pool; it has no availability zones",
        )


# ---- load balancers


def loadbalancer_create(lb):
    f = fields(lb)
    if lb.listeners or lb.pools:
        refuse(
            "creating listeners or pools with the load balancer (a fully "
            "populated create)",
            "create the load balancer, then its listeners, pools and members",
        )
    validate_availability_zone(f.get("availability_zone"))
    if _set(f, "vip_qos_policy_id"):
        refuse("vip_qos_policy_id", "Siphon applies no Neutron QoS policy")
    if _set(f, "vip_sg_ids"):
        refuse("vip_sg_ids", "Siphon applies no Neutron security groups")
    body = _copy(f, {"id": f["loadbalancer_id"]}, COMMON + ("vip_subnet_id", "vip_address"))
    if not f.get("vip_subnet_id") and f.get("vip_network_id"):
        body["vip_network_id"] = f["vip_network_id"]
    extra = []
    for v in f.get("additional_vips") or []:
        v = dict(v)
        entry = {"subnet_id": v.get("subnet_id")}
        if v.get("ip_address"):
            entry["ip_address"] = v["ip_address"]
        extra.append(entry)
    if extra:
        body["additional_vips"] = extra
    body.update(flavor_body(f.get("flavor") or {}))
    return body


def loadbalancer_update(new):
    f = fields(new)
    if _set(f, "vip_qos_policy_id"):
        refuse("vip_qos_policy_id", "Siphon applies no Neutron QoS policy")
    if _set(f, "vip_sg_ids"):
        refuse("vip_sg_ids", "Siphon applies no Neutron security groups")
    return _copy(f, {}, ("name", "description", "admin_state_up"))


# ---- listeners

LISTENER_TLS = (
    "default_tls_container_ref",
    "default_tls_container_data",
    "sni_container_refs",
    "sni_container_data",
    "client_ca_tls_container_ref",
    "client_ca_tls_container_data",
    "client_crl_container_ref",
    "client_crl_container_data",
)
LISTENER_FIELDS = (
    "connection_limit",
    "default_pool_id",
    "timeout_client_data",
    "timeout_member_connect",
    "timeout_member_data",
    "timeout_tcp_inspect",
    "allowed_cidrs",
)


def _protocol_and_tls(f, what, protocols, tls_keys, tls_why):
    proto = f.get("protocol")
    if proto is not None and proto not in protocols:
        refuse(
            f"the {what} protocol {proto}",
            f"Siphon is an L4 balancer: {', '.join(protocols)}",
        )
    for k in tls_keys:
        if _set(f, k):
            refuse(f"the TLS option {k}", tls_why)


def _listener_refusals(f):
    _protocol_and_tls(f, "listener", LISTENER_PROTOCOLS, LISTENER_TLS, "Siphon does not terminate TLS")
    if f.get("client_authentication") not in (None, "NONE"):
        refuse("client_authentication", "Siphon does not terminate TLS")
    for k in ("hsts_max_age", "hsts_include_subdomains", "hsts_preload"):
        if _set(f, k):
            refuse(f"the HTTP option {k}", "Siphon does not speak HTTP")
    if _set(f, "insert_headers"):
        refuse("insert_headers", "Siphon does not speak HTTP")
    if _set(f, "l7policies"):
        refuse("L7 policies", "Siphon is an L4 balancer")


def listener_create(listener):
    f = fields(listener)
    _listener_refusals(f)
    if listener.l7policies:
        refuse("L7 policies", "Siphon is an L4 balancer")
    if listener.default_pool and not isinstance(listener.default_pool, data_models.UnsetType):
        if not f.get("default_pool_id"):
            refuse(
                "creating a pool with its listener",
                "create the pool, then the listener with default_pool_id",
            )
    body = _copy(
        f,
        {"id": f["listener_id"], "loadbalancer_id": f["loadbalancer_id"]},
        COMMON + ("protocol", "protocol_port") + LISTENER_FIELDS,
    )
    if body.get("connection_limit") is None:
        body.pop("connection_limit", None)
    return body


def listener_update(new):
    f = fields(new)
    _listener_refusals(f)
    return _copy(f, {}, ("name", "description", "admin_state_up") + LISTENER_FIELDS)


# ---- pools

POOL_TLS = (
    "tls_container_ref",
    "tls_container_data",
    "ca_tls_container_ref",
    "ca_tls_container_data",
    "crl_container_ref",
    "crl_container_data",
    "tls_enabled",
)


def _pool_refusals(f):
    _protocol_and_tls(f, "pool", POOL_PROTOCOLS, POOL_TLS, "Siphon does not speak TLS to members")
    sp = f.get("session_persistence")
    if sp:
        kind = sp.get("type")
        if kind != "SOURCE_IP":
            refuse(
                f"session persistence {kind}",
                "Siphon keeps sessions by client address only (SOURCE_IP)",
            )


def pool_create(pool):
    f = fields(pool)
    _pool_refusals(f)
    if pool.members or (pool.healthmonitor and not isinstance(pool.healthmonitor, data_models.UnsetType)):
        refuse(
            "creating members or a health monitor with the pool",
            "create the pool, then its members and monitor",
        )
    body = _copy(
        f,
        {"id": f["pool_id"]},
        COMMON + ("protocol", "lb_algorithm", "loadbalancer_id", "listener_id", "session_persistence"),
    )
    if body.get("listener_id"):
        body.pop("loadbalancer_id", None)
    elif not body.get("session_persistence"):
        body.pop("session_persistence", None)
    for k in ("listener_id", "session_persistence"):
        if body.get(k) is None:
            body.pop(k, None)
    return body


def pool_update(new):
    f = fields(new)
    _pool_refusals(f)
    return _copy(f, {}, ("name", "description", "admin_state_up", "lb_algorithm", "session_persistence"))


# ---- members

MEMBER_FIELDS = ("address", "protocol_port", "weight", "backup", "monitor_address", "monitor_port", "subnet_id")


def _member_refusals(f):
    if f.get("vnic_type") not in (None, "normal"):
        refuse(f"the member vnic_type {f['vnic_type']}", "Siphon reaches members over the network as is")


def member_create(member):
    f = fields(member)
    _member_refusals(f)
    body = _copy(f, {"id": f["member_id"]}, COMMON + MEMBER_FIELDS)
    return {k: v for k, v in body.items() if v is not None or k in ("name", "description")}


def member_update(new):
    f = fields(new)
    _member_refusals(f)
    return _copy(f, {}, ("name", "admin_state_up", "weight", "backup", "monitor_address", "monitor_port"))


def member_batch(members):
    """The full desired member list of a pool (siphon-control's batch PUT
    matches members by address and port, as Octavia does)."""
    out = []
    for m in members:
        body = member_create(m)
        body.pop("project_id", None)
        out.append(body)
    return out


# ---- health monitors

MONITOR_FIELDS = (
    "type",
    "delay",
    "timeout",
    "max_retries",
    "max_retries_down",
    "http_method",
    "url_path",
    "expected_codes",
    "http_version",
    "domain_name",
)


def healthmonitor_create(hm):
    f = fields(hm)
    body = _copy(f, {"id": f["healthmonitor_id"], "pool_id": f["pool_id"]}, COMMON + MONITOR_FIELDS)
    return {k: v for k, v in body.items() if v is not None or k in ("name",)}


def healthmonitor_update(new):
    f = fields(new)
    return _copy(
        f,
        {},
        ("name", "admin_state_up") + tuple(k for k in MONITOR_FIELDS if k != "type"),
    )
