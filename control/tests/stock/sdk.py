"""openstacksdk's load_balancer proxy against siphon-control.

Usage: sdk.py ENDPOINT SUBNET_ID PORT
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import sys

import openstack

endpoint, subnet, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = openstack.connect(auth_type="none", load_balancer_endpoint_override=endpoint)
lb_proxy = conn.load_balancer
seen = {}

lb = lb_proxy.create_load_balancer(name="sdk-lb", vip_subnet_id=subnet)
seen["created"] = lb.provisioning_status
lb = lb_proxy.wait_for_load_balancer(lb.id, interval=0.2, wait=60)
seen["active"] = lb.provisioning_status
seen["vip"] = lb.vip_address
seen["found"] = lb_proxy.find_load_balancer("sdk-lb").id == lb.id

listener = lb_proxy.create_listener(
    name="sdk-listener", protocol="TCP", protocol_port=port, load_balancer_id=lb.id
)
lb_proxy.wait_for_load_balancer(lb.id, interval=0.2, wait=60)
pool = lb_proxy.create_pool(
    name="sdk-pool", protocol="TCP", lb_algorithm="SOURCE_IP_PORT", listener_id=listener.id
)
lb_proxy.wait_for_load_balancer(lb.id, interval=0.2, wait=60)
seen["listeners"] = [l.name for l in lb_proxy.listeners(load_balancer_id=lb.id)]
seen["pool_listeners"] = [l["id"] for l in lb_proxy.get_pool(pool.id).listeners]
seen["listener_id"] = listener.id

lb_proxy.update_load_balancer(lb.id, description="through the sdk")
lb = lb_proxy.wait_for_load_balancer(lb.id, interval=0.2, wait=60)
seen["description"] = lb.description
stats = lb_proxy.get_load_balancer_statistics(lb.id)
seen["stats_total"] = stats.total_connections
seen["names"] = [x.name for x in lb_proxy.load_balancers(name="sdk-lb")]

lb_proxy.delete_load_balancer(lb.id, cascade=True)
lb_proxy.wait_for_delete(lb, interval=0.2, wait=60)
seen["deleted"] = lb_proxy.find_load_balancer("sdk-lb") is None
print(json.dumps(seen))
