"""The `[siphon]` section of octavia.conf, read by the driver (in the
Octavia API) and by the provider agent (in the driver agent)."""

from oslo_config import cfg

GROUP = "siphon"

OPTS = [
    cfg.StrOpt(
        "endpoint",
        default="http://127.0.0.1:9876",
        help="siphon-control's API, without the /v2 suffix.",
    ),
    cfg.StrOpt(
        "token",
        secret=True,
        help="siphon-control's admin token ([auth] token there). "
        "Prefer token_file.",
    ),
    cfg.StrOpt(
        "token_file",
        help="A file holding siphon-control's admin token (read at each "
        "start; keep it mode 0600).",
    ),
    cfg.StrOpt(
        "ca_file",
        help="CA bundle for an https endpoint (default: the system's).",
    ),
    cfg.FloatOpt(
        "request_timeout",
        default=10.0,
        min=1.0,
        help="Seconds a call to siphon-control may take.",
    ),
    cfg.BoolOpt(
        "allocate_vips",
        default=True,
        help="Allocate VIP addresses from siphon-control's VIP subnets "
        "(create_vip_port). False leaves VIP ports to Octavia's network "
        "driver (Neutron); the Neutron subnet must then also be one of "
        "siphon-control's [[vip_subnets]], under the same id.",
    ),
    cfg.IntOpt(
        "resync_interval",
        default=600,
        min=10,
        help="Seconds between full status reports from the provider agent "
        "(besides the changes it reports as they come).",
    ),
    cfg.IntOpt(
        "poll_wait",
        default=10,
        min=1,
        max=25,
        help="Seconds one long poll of siphon-control's changes waits.",
    ),
]


def register(conf=None):
    conf = conf or cfg.CONF
    conf.register_opts(OPTS, group=GROUP)
    return conf[GROUP]


def list_opts():
    """For oslo-config-generator."""
    return [(GROUP, OPTS)]
