"""The driver's translation and refusals on octavia-lib's own models
(run by control/tests/octavia.rs, or `python -m unittest discover tests`
in an environment with octavia-lib)."""

import unittest

from octavia_lib.api.drivers import data_models as m
from octavia_lib.api.drivers import exceptions

from siphon_octavia import driver
from siphon_octavia import translate

LB = "0b0e7d1c-1a57-4c1e-9a3c-5d1b2c3d4e01"
SUBNET = {"id": "s1", "network_id": "n1", "cidr": "198.18.7.0/29", "gateway_ip": "198.18.7.1"}


class Refusals(unittest.TestCase):
    def refused(self, f, *args):
        with self.assertRaises(exceptions.UnsupportedOptionError) as e:
            f(*args)
        return e.exception.user_fault_string

    def test_http_listener_is_refused_by_name(self):
        l = m.Listener(listener_id="l", loadbalancer_id=LB, protocol="HTTP", protocol_port=80)
        msg = self.refused(translate.listener_create, l)
        self.assertIn("the listener protocol HTTP", msg)

    def test_tls_and_cookies_and_l7(self):
        l = m.Listener(
            listener_id="l",
            loadbalancer_id=LB,
            protocol="TCP",
            protocol_port=443,
            default_tls_container_ref="ref",
        )
        self.assertIn("default_tls_container_ref", self.refused(translate.listener_create, l))
        p = m.Pool(pool_id="p", loadbalancer_id=LB, protocol="TCP", lb_algorithm="ROUND_ROBIN",
                   session_persistence={"type": "APP_COOKIE", "cookie_name": "x"})
        self.assertIn("session persistence APP_COOKIE", self.refused(translate.pool_create, p))
        p = m.Pool(pool_id="p", loadbalancer_id=LB, protocol="TCP", lb_algorithm="ROUND_ROBIN", tls_enabled=True)
        self.assertIn("tls_enabled", self.refused(translate.pool_create, p))
        d = driver.SiphonProviderDriver()
        self.assertIn("L7 policies", self.refused(d.l7policy_create, m.L7Policy(l7policy_id="x")))

    def test_a_tcp_listener_passes_with_octavias_ids(self):
        l = m.Listener(
            listener_id="l1",
            loadbalancer_id=LB,
            protocol="TCP",
            protocol_port=80,
            connection_limit=-1,
            allowed_cidrs=["198.18.0.0/15"],
            project_id="p1",
            sni_container_refs=[],
            insert_headers={},
            client_authentication="NONE",
        )
        body = translate.listener_create(l)
        self.assertEqual(body["id"], "l1")
        self.assertEqual(body["project_id"], "p1")
        self.assertEqual(body["allowed_cidrs"], ["198.18.0.0/15"])
        self.assertEqual(body["connection_limit"], -1)


class Flavors(unittest.TestCase):
    def test_active_active(self):
        self.assertEqual(
            translate.flavor_body({"topology": "ACTIVE_ACTIVE", "amphora_count": 3}),
            {"topology": "ACTIVE_ACTIVE", "amphora_count": 3},
        )

    def test_bad_values_and_keys(self):
        for meta in ({"topology": "RING"}, {"amphora_count": 3}, {"amphora_count": "many"},
                     {"topology": "ACTIVE_ACTIVE", "amphora_count": 0}, {"compute_flavor": "x"}):
            with self.assertRaises(exceptions.UnsupportedOptionError, msg=str(meta)):
                translate.validate_flavor(meta)

    def test_no_availability_zones(self):
        translate.validate_availability_zone({})
        with self.assertRaises(exceptions.UnsupportedOptionError):
            translate.validate_availability_zone({"compute_zone": "nova"})


class Vips(unittest.TestCase):
    def test_free_address_skips_gateway_and_used(self):
        used = {"198.18.7.2", "198.18.7.3", "198.18.7.4", "198.18.7.5"}
        self.assertEqual(driver._pick_address(SUBNET, None, used), "198.18.7.6")

    def test_asked_address_must_be_in_subnet_and_free(self):
        self.assertEqual(driver._pick_address(SUBNET, "198.18.7.5", set()), "198.18.7.5")
        with self.assertRaises(exceptions.UnsupportedOptionError):
            driver._pick_address(SUBNET, "198.18.8.5", set())
        with self.assertRaises(exceptions.DriverError):
            driver._pick_address(SUBNET, "198.18.7.5", {"198.18.7.5"})

    def test_full_subnet(self):
        used = {f"198.18.7.{i}" for i in range(2, 7)}
        with self.assertRaises(exceptions.DriverError):
            driver._pick_address(SUBNET, None, used)

    def test_unknown_subnet_names_the_known_ones(self):
        with self.assertRaises(exceptions.UnsupportedOptionError) as e:
            driver._pick_subnet([SUBNET], "other", None)
        self.assertIn("s1", e.exception.user_fault_string)


if __name__ == "__main__":
    unittest.main()
