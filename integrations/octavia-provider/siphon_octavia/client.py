"""A small client of siphon-control's REST API (Octavia v2's shapes)."""

import json

import requests


class SiphonError(Exception):
    """A call to siphon-control failed: `status` is its HTTP status (0 when
    it could not be reached) and `message` its words (the faultstring)."""

    def __init__(self, status, message):
        super().__init__(f"siphon-control: {message}" if status else message)
        self.status = status
        self.message = message


class Client:
    def __init__(self, endpoint, token=None, timeout=10.0, ca_file=None):
        self.base = endpoint.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["X-Auth-Token"] = token
        if ca_file:
            self.session.verify = ca_file

    @classmethod
    def from_conf(cls, conf):
        """From the `[siphon]` section (config.register)."""
        token = conf.token
        if conf.token_file:
            with open(conf.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        return cls(conf.endpoint, token, conf.request_timeout, conf.ca_file)

    def call(self, method, path, body=None, params=None, timeout=None):
        # "lbaas/..." is under /v2; "/v2.0/subnets" (the Neutron-shaped
        # lookups) is taken as is.
        url = f"{self.base}{path}" if path.startswith("/") else f"{self.base}/v2/{path}"
        try:
            r = self.session.request(
                method,
                url,
                json=body,
                params=params,
                timeout=timeout or self.timeout,
            )
        except requests.RequestException as e:
            raise SiphonError(0, f"siphon-control at {self.base} did not answer: {e}") from e
        if r.status_code >= 400:
            raise SiphonError(r.status_code, _fault(r))
        if r.status_code == 204 or not r.content:
            return None
        try:
            return r.json()
        except ValueError as e:
            raise SiphonError(r.status_code, f"{method} {path}: an answer that is not JSON") from e

    def get(self, path, params=None, timeout=None):
        return self.call("GET", path, params=params, timeout=timeout)

    def post(self, path, body=None):
        return self.call("POST", path, body)

    def put(self, path, body=None, params=None):
        return self.call("PUT", path, body, params)

    def delete(self, path, params=None):
        return self.call("DELETE", path, params=params)

    def changes(self, since, wait):
        """`GET /v2/siphon/changes`: what moved after change `since`."""
        v = self.get(
            "siphon/changes",
            params={"since": since, "wait": wait},
            timeout=wait + self.timeout,
        )
        return v["changes"]


def _fault(r):
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    if isinstance(body, dict):
        for key in ("faultstring", "description", "message"):
            if body.get(key):
                return str(body[key])
    return f"HTTP {r.status_code}: {json.dumps(body)[:200]}"
