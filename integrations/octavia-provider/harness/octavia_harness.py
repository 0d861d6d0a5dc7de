"""Runs a real Octavia (API and driver agent, from PyPI) on SQLite for
Siphon's provider tests (control/tests/octavia.rs), on loopback.

    octavia_harness.py mkdb CONF          create the schema, seed it
    octavia_harness.py api CONF           serve Octavia's API
    octavia_harness.py driver-agent CONF  run Octavia's driver agent
                                          (with Siphon's provider agent)

What a production Octavia has and this does not, and why:

* Schema: Octavia's Alembic migrations do not run on SQLite, so the schema
  is made from its SQLAlchemy models (`models.BASE.metadata.create_all`)
  and the lookup tables are seeded from its constants, as Octavia's own
  functional tests do.
* `[database] pool_timeout` is left empty in the config: SQLAlchemy 2
  refuses the argument for SQLite (Octavia's API then answers 500), and an
  empty value is oslo.db's None, what Octavia's tests pass.
* Two processes write the one SQLite file (the API and the driver agent):
  reads run outside transactions, and a transaction begins (BEGIN
  IMMEDIATE, waiting for the lock) at its first write, so neither fails
  with "database is locked" (see the listeners below). Octavia on MySQL or
  PostgreSQL needs none of this.
* Keystone: `auth_strategy = testing` with a small middleware in
  keystonemiddleware's place that gives each request the identity
  headers Keystone would (`X-Project-Id`, `X-Roles`): the client's own if
  it sent them, else OCTAVIA_TEST_PROJECT (default `siphon-demo`) as an
  admin. `noauth` would do for everything but quotas, which Octavia skips
  under `noauth`.
* `network_driver = network_noop_driver`: no Neutron; the Siphon driver
  allocates VIPs from siphon-control's subnets.
* The stock CLI looks `--vip-subnet-id` up in Neutron first. The API
  server also answers `/neutron/...` (point `OS_NETWORK_ENDPOINT_OVERRIDE`
  at `http://HOST:PORT/neutron/v2.0`) with siphon-control's Neutron-shaped
  subnet and network lookups, asked with the `[siphon]` token: the
  Neutron a real cloud would have, holding the same subnets.
"""

import os
import sys
from wsgiref import simple_server

from sqlalchemy import event
from sqlalchemy.engine import Engine


@event.listens_for(Engine, "connect")
def _connect(dbapi_conn, _record):
    if type(dbapi_conn).__module__.startswith("sqlite3"):
        dbapi_conn.execute("PRAGMA busy_timeout = 30000")


# The no-op network driver's own SQLite file begins its transactions
# itself (EXCLUSIVE) and is left alone.
NOOP_NETWORK_DB = "octavia-network-noop.db"
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")


def _ours(conn):
    return conn.dialect.name == "sqlite" and not (conn.engine.url.database or "").endswith(
        NOOP_NETWORK_DB
    )


@event.listens_for(Engine, "begin")
def _begin(conn):
    # oslo.db would emit a deferred BEGIN here (unless the connection is
    # marked in a transaction, which this listener, running before its,
    # does): reads then run outside a transaction, and the first write
    # begins one (below).
    if _ours(conn):
        conn.info["in_transaction"] = True


@event.listens_for(Engine, "before_cursor_execute")
def _before(conn, cursor, statement, _params, _context, _many):
    # The first write of a transaction takes the database's write lock at
    # once, waiting for it (busy_timeout), instead of upgrading a read
    # lock later, which SQLite refuses outright ("database is locked")
    # when another process wrote meanwhile. Reads hold no lock: Octavia's
    # driver agent leaves read transactions open after it answers a
    # lookup (lazy loads after commit), which would otherwise hold a lock
    # against every writer.
    if not _ours(conn) or not statement.lstrip().upper().startswith(WRITES):
        return
    dbapi = conn.connection.dbapi_connection
    if not dbapi.in_transaction:
        cursor.execute("BEGIN IMMEDIATE")


def mkdb(argv):
    from octavia.common import constants
    from octavia.common import service
    from octavia.db import api as db_api
    from octavia.db import base_models
    from octavia.db import models

    service.prepare_service(argv)
    engine = db_api.get_engine()
    base_models.BASE.metadata.create_all(engine)
    session = db_api.get_session()
    with session.begin():
        for names, cls in (
            (constants.SUPPORTED_PROVISIONING_STATUSES, models.ProvisioningStatus),
            (constants.SUPPORTED_HEALTH_MONITOR_TYPES, models.HealthMonitorType),
            (constants.SUPPORTED_LB_ALGORITHMS, models.Algorithm),
            (constants.SUPPORTED_PROTOCOLS, models.Protocol),
            (constants.SUPPORTED_OPERATING_STATUSES, models.OperatingStatus),
            (constants.SUPPORTED_SP_TYPES, models.SessionPersistenceType),
            (constants.SUPPORTED_AMPHORA_ROLES, models.AmphoraRoles),
            (constants.SUPPORTED_LB_TOPOLOGIES, models.LBTopology),
            (constants.SUPPORTED_VRRP_AUTH, models.VRRPAuthMethod),
            (constants.SUPPORTED_L7RULE_TYPES, models.L7RuleType),
            (constants.SUPPORTED_L7RULE_COMPARE_TYPES, models.L7RuleCompareType),
            (constants.SUPPORTED_L7POLICY_ACTIONS, models.L7PolicyAction),
            (constants.SUPPORTED_CLIENT_AUTH_MODES, models.ClientAuthenticationMode),
        ):
            for name in names:
                session.add(cls(name=name))
        # Octavia's placeholders for the flavor and zone of deleted load
        # balancers (each profile before what names it).
        nil, placeholder = constants.NIL_UUID, "DELETED-PLACEHOLDER"
        for row in (
            models.FlavorProfile(
                id=nil, name=placeholder, provider_name=constants.DELETED, flavor_data="{}"
            ),
            models.Flavor(
                id=nil,
                flavor_profile_id=nil,
                name=placeholder,
                enabled=False,
                description="Placeholder for DELETED LBs with DELETED flavors",
            ),
            models.AvailabilityZoneProfile(
                id=nil,
                name=placeholder,
                provider_name=constants.DELETED,
                availability_zone_data="{}",
            ),
            models.AvailabilityZone(
                availability_zone_profile_id=nil,
                name=nil,
                enabled=False,
                description="Placeholder for DELETED LBs with DELETED availability zones",
            ),
        ):
            session.add(row)
            session.flush()
    print("octavia schema created", flush=True)


class Identity:
    """keystonemiddleware's part for the tests: the identity headers."""

    def __init__(self, app, project):
        self.app = app
        self.project = project

    def __call__(self, environ, start_response):
        environ.setdefault("HTTP_X_PROJECT_ID", self.project)
        environ.setdefault("HTTP_X_ROLES", "admin,member,reader")
        environ.setdefault("HTTP_X_USER_ID", "siphon-test")
        return self.app(environ, start_response)


class Neutron:
    """`/neutron/v2.0/...` answered by siphon-control's `/v2.0/...`."""

    PREFIX = "/neutron"

    def __init__(self, app, client):
        self.app = app
        self.client = client

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.PREFIX + "/") and path != self.PREFIX:
            return self.app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET":
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain")])
            return [b"lookups only"]
        url = self.client.base + path[len(self.PREFIX):]
        query = environ.get("QUERY_STRING")
        r = self.client.session.get(url + ("?" + query if query else ""), timeout=30)
        start_response(
            f"{r.status_code} {r.reason}",
            [("Content-Type", r.headers.get("Content-Type", "application/json"))],
        )
        return [r.content]


class Quiet(simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("octavia-api: " + (fmt % args) + "\n")


def api(argv):
    from oslo_config import cfg

    from octavia.api import app as api_app

    from siphon_octavia import client
    from siphon_octavia import config

    app = api_app.setup_app(argv=argv)
    app = Identity(app, os.environ.get("OCTAVIA_TEST_PROJECT", "siphon-demo"))
    app = Neutron(app, client.Client.from_conf(config.register(cfg.CONF)))
    host = cfg.CONF.api_settings.bind_host
    port = cfg.CONF.api_settings.bind_port
    srv = simple_server.make_server(host, port, app, handler_class=Quiet)
    print(f"octavia-api listening on {host}:{port}", flush=True)
    srv.serve_forever()


def driver_agent(argv):
    from octavia.cmd import driver_agent as agent

    sys.argv = argv
    agent.main()


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("mkdb", "api", "driver-agent"):
        sys.exit(__doc__)
    argv = [sys.argv[0], "--config-file", sys.argv[2]]
    {"mkdb": mkdb, "api": api, "driver-agent": driver_agent}[sys.argv[1]](argv)


if __name__ == "__main__":
    main()
