"""The provider agent: follows siphon-control's changes and reports them to
Octavia through its driver agent's status and stats sockets.

Octavia's driver agent starts it (entry point
`octavia.driver_agent.provider_agents: siphon`, enabled by
`[driver_agent] enabled_provider_agents = siphon`) in a process of its
own, as `run(exit_event)`.

It long-polls `GET /v2/siphon/changes?since=N&wait=S`, so a status reaches
Octavia within a moment of siphon-control storing it, and starts over from
everything (`since=0`) at start and every `[siphon] resync_interval`,
which heals whatever a lost report left behind. Level-triggered: an
unreachable siphon-control or driver agent is retried with back-off,
never given up on.

What is passed on:
* `ACTIVE`, `ERROR` and `DELETED` provisioning statuses, and operating
  statuses. A `PENDING_*` status is siphon-control's own work in progress:
  Octavia set its own when it asked, so only the operating status goes.
* A terminal status of an object Octavia does not show yet is held and
  tried again (for up to a minute): Octavia's API asks the driver before
  it commits the object, and a status written before that commit would be
  lost. Objects made through siphon-control's own API, which Octavia never
  shows, are dropped after that minute.
* Listener statistics as siphon-control counts them (absolute, summed
  over the amphorae).

siphon-control reports an object with its load balancer and that one's
listeners and pools (Octavia locks them all for a change of any child).
A report read just before Octavia locks a load balancer for the next
change, and written after, releases that lock early: the change itself
still reaches siphon-control (the driver call comes first), and a second
change sent meanwhile is refused by siphon-control (409, the load
balancer is busy) rather than lost.
"""

import time

from oslo_config import cfg
from oslo_log import log as logging

from octavia_lib.api.drivers import driver_lib
from octavia_lib.api.drivers import exceptions

from siphon_octavia import client as siphon_client
from siphon_octavia import config

LOG = logging.getLogger(__name__)

# Children before parents: Octavia removes a DELETED child's row, and a
# load balancer's delete comes last.
KINDS = ("members", "healthmonitors", "pools", "listeners", "loadbalancers")
TERMINAL = ("ACTIVE", "ERROR")
HOLD_SECONDS = 60.0
MAX_BACKOFF = 30.0


def run(exit_event):
    """Entry point for Octavia's driver agent."""
    conf = config.register(cfg.CONF)
    lib = driver_lib.DriverLibrary(
        status_socket=cfg.CONF.driver_agent.status_socket_path,
        stats_socket=cfg.CONF.driver_agent.stats_socket_path,
        get_socket=cfg.CONF.driver_agent.get_socket_path,
    )
    client = siphon_client.Client.from_conf(conf)
    LOG.info("Siphon provider agent following %s", conf.endpoint)
    Follower(client, lib, conf.poll_wait, conf.resync_interval).run(exit_event)


class Follower:
    def __init__(self, client, lib, poll_wait=10, resync_interval=600):
        self.client = client
        self.lib = lib
        self.poll_wait = poll_wait
        self.resync_interval = resync_interval
        self.since = 0
        self.last_full = 0.0
        # (kind, id) -> (record, deadline): terminal statuses Octavia does
        # not show the object for yet.
        self.held = {}
        # (kind, id) Octavia was seen to have; saves a lookup per report.
        self.known = set()
        # Listeners Octavia does not have (made through siphon-control's
        # own API), until when: their counters are not looked up each time.
        self.foreign = {}

    def run(self, exit_event):
        backoff = 1.0
        while not exit_event.is_set():
            if time.monotonic() - self.last_full >= self.resync_interval:
                self.since = 0
            wait = 1 if self.held else self.poll_wait
            try:
                changes = self.client.changes(self.since, wait)
            except siphon_client.SiphonError as e:
                LOG.warning("Siphon provider agent: %s; again in %.0f s", e, backoff)
                exit_event.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            try:
                self.forward(changes)
            except (exceptions.DriverAgentTimeout, exceptions.DriverError, OSError) as e:
                # The driver agent is down or slow: ask for everything again.
                LOG.warning("Siphon provider agent: Octavia's driver agent: %s; again in %.0f s", e, backoff)
                self.since = 0
                exit_event.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            if changes.get("full"):
                self.last_full = time.monotonic()
            self.since = changes["head"]
        LOG.info("Siphon provider agent stopped")

    def forward(self, changes):
        now = time.monotonic()
        for kind in KINDS:
            for rec in changes.get(kind) or []:
                self.status(kind, rec, now)
        self.retry_held(now)
        for stat in changes.get("listener_stats") or []:
            if self.foreign.get(stat["id"], 0) > now:
                continue
            if self.exists("listeners", stat["id"]):
                self.send_stats(stat)
            else:
                self.foreign[stat["id"]] = now + HOLD_SECONDS

    def status(self, kind, rec, now):
        oid = rec["id"]
        prov = rec.get("provisioning_status")
        out = {"id": oid}
        if prov == "DELETED":
            self.held.pop((kind, oid), None)
            self.known.discard((kind, oid))
            self.send(kind, {"id": oid, "provisioning_status": "DELETED"})
            return
        if prov in TERMINAL:
            out["provisioning_status"] = prov
        if rec.get("operating_status"):
            out["operating_status"] = rec["operating_status"]
        if len(out) == 1:
            return
        if not self.exists(kind, oid):
            self.held[(kind, oid)] = (out, now + HOLD_SECONDS)
            return
        self.held.pop((kind, oid), None)
        self.send(kind, out)

    def retry_held(self, now):
        for (kind, oid), (rec, deadline) in list(self.held.items()):
            if self.exists(kind, oid):
                del self.held[(kind, oid)]
                self.send(kind, rec)
            elif now >= deadline:
                del self.held[(kind, oid)]
                LOG.debug("Siphon provider agent: Octavia has no %s %s; not reported", kind, oid)

    def exists(self, kind, oid):
        if (kind, oid) in self.known:
            return True
        getter = {
            "loadbalancers": self.lib.get_loadbalancer,
            "listeners": self.lib.get_listener,
            "pools": self.lib.get_pool,
            "members": self.lib.get_member,
            "healthmonitors": self.lib.get_healthmonitor,
        }[kind]
        if getter(oid) is None:
            return False
        self.known.add((kind, oid))
        return True

    def send(self, kind, rec):
        # One object per update: Octavia stops at the first record it
        # cannot apply, which must not cost the others theirs.
        try:
            self.lib.update_loadbalancer_status({kind: [rec]})
        except exceptions.UpdateStatusError as e:
            LOG.warning("Octavia refused the status of %s %s: %s", kind, rec["id"], e.fault_string)

    def send_stats(self, stat):
        keys = ("id", "bytes_in", "bytes_out", "active_connections", "total_connections", "request_errors")
        try:
            self.lib.update_listener_statistics({"listeners": [{k: stat[k] for k in keys}]})
        except exceptions.UpdateStatisticsError as e:
            LOG.warning("Octavia refused the statistics of listener %s: %s", stat["id"], e.fault_string)
