"""openstacksdk lists every member of one pool (following the API's
`members_links`, as any stock client does).

Usage: members.py ENDPOINT POOL_ID
Prints {"ids": [...]} in the order the SDK yielded them.
"""
import json
import sys

import openstack

endpoint, pool = sys.argv[1], sys.argv[2]
conn = openstack.connect(auth_type="none", load_balancer_endpoint_override=endpoint)
print(json.dumps({"ids": [m.id for m in conn.load_balancer.members(pool)]}))
