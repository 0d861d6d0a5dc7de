#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The controller's API where no amphora is needed, on loopback: what
//! Octavia answers for what an L4 provider lacks (L7, flavors,
//! availability zones), fault bodies on every error, and the load
//! balancer create checks that come before any amphora is taken.

use hyper::Method;
use serde_json::{json, Value};
use siphon_control::client::{Answer, Client};
use siphon_control::config::{Auth, ControlConfig, Distributor, Limits, LinuxEcmp, VipSubnet};
use siphon_testkit::free_port;
use siphon_testkit::TempDir;

const TOKEN: &str = "api-test-admin-token";

struct Api {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    handle: Option<siphon_control::Handle>,
    client: Client,
    _dir: TempDir,
}

impl Api {
    fn start(tag: &str) -> Api {
        Api::start_with(tag, Limits::default())
    }

    fn start_with(tag: &str, limits: Limits) -> Api {
        Api::start_configured(tag, |c| c.limits = limits)
    }

    /// With the VIP network's subnets `vips` (198.18.7.0/24) and `vips6`
    /// (2001:db8:7::/64), and `elsewhere` on another network; `tune`
    /// changes the rest.
    fn start_configured(tag: &str, tune: impl FnOnce(&mut ControlConfig)) -> Api {
        let rt = siphon_testkit::runtime();
        let dir = TempDir::new(tag);
        let subnet = |id: &str, network: &str, cidr: &str| VipSubnet {
            id: id.into(),
            name: id.into(),
            network_id: network.into(),
            network_name: String::new(),
            cidr: cidr.parse().unwrap(),
            gateway_ip: None,
        };
        let subnets = vec![
            subnet("vips", "net", "198.18.7.0/24"),
            subnet("vips6", "net", "2001:db8:7::/64"),
            subnet("elsewhere", "other", "198.18.8.0/24"),
        ];
        let auth = Auth::Token {
            token: Some(TOKEN.into()),
            token_file: None,
        };
        let mut config = ControlConfig {
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            ..ControlConfig::local(dir.path("control.db").into(), auth, subnets)
        };
        tune(&mut config);
        let handle = rt.block_on(siphon_control::start(config)).unwrap();
        let client = Client::new(&format!("http://{}", handle.addr), Some(TOKEN.into())).unwrap();
        Api {
            rt,
            handle: Some(handle),
            client,
            _dir: dir,
        }
    }

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.rt
            .block_on(self.client.call(method, path, body.as_ref()))
            .unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
    }
}

/// `(method, path, body, status, words the faultstring holds)`.
type Case = (Method, &'static str, Option<Value>, u16, &'static str);

fn expect_faults(api: &Api, cases: Vec<Case>) {
    for (method, path, body, status, needle) in cases {
        let a = api.call(method.clone(), path, body.clone());
        assert_eq!(a.status, status, "{method} {path}: {}", a.body);
        assert_eq!(
            a.body["faultcode"],
            if status >= 500 && status != 501 {
                "Server"
            } else {
                "Client"
            },
            "{method} {path}: {}",
            a.body
        );
        let fault = a
            .fault()
            .unwrap_or_else(|| panic!("{method} {path}: no fault body: {}", a.body));
        assert!(
            fault.contains(needle),
            "{method} {path}: {fault:?} lacks {needle:?}"
        );
        assert_eq!(a.body["debuginfo"], Value::Null, "{method} {path}");
    }
}

#[test]
fn what_siphon_lacks_answers_with_octavias_faults_never_an_empty_body() {
    let api = Api::start("api-absent");
    let policy = json!({"l7policy": {"listener_id": "x", "action": "REJECT"}});
    let rule = json!({"rule": {"type": "PATH", "compare_type": "EQUAL_TO", "value": "/"}});
    let flavor = json!({"flavor": {"name": "gold", "flavor_profile_id": "p"}});
    let profile =
        json!({"flavorprofile": {"name": "p", "provider_name": "siphon", "flavor_data": "{}"}});
    let zone = json!({"availability_zone": {"name": "az1", "availability_zone_profile_id": "p"}});
    let zone_profile = json!({"availability_zone_profile": {"name": "p", "provider_name": "siphon", "availability_zone_data": "{}"}});
    let l7 = "does not support a requested action: L7";
    let flavors = "does not support a requested action: flavors";
    let zones = "does not support a requested action: availability zones";
    expect_faults(
        &api,
        vec![
            // L7: every write is 501; nothing is ever found.
            (
                Method::POST,
                "/v2/lbaas/l7policies",
                Some(policy.clone()),
                501,
                l7,
            ),
            (
                Method::PUT,
                "/v2/lbaas/l7policies/p1",
                Some(policy.clone()),
                501,
                l7,
            ),
            (Method::DELETE, "/v2.0/lbaas/l7policies/p1", None, 501, l7),
            (
                Method::POST,
                "/v2/lbaas/l7policies/p1/rules",
                Some(rule.clone()),
                501,
                l7,
            ),
            (
                Method::PUT,
                "/v2/lbaas/l7policies/p1/rules/r1",
                Some(rule),
                501,
                l7,
            ),
            (
                Method::DELETE,
                "/v2/lbaas/l7policies/p1/rules/r1",
                None,
                501,
                l7,
            ),
            (
                Method::GET,
                "/v2/lbaas/l7policies/p1",
                None,
                404,
                "L7 Policy p1",
            ),
            (
                Method::GET,
                "/v2/lbaas/l7policies/p1/rules",
                None,
                404,
                "L7 Policy p1",
            ),
            (
                Method::GET,
                "/v2/lbaas/l7policies/p1/rules/r1",
                None,
                404,
                "L7 Policy p1",
            ),
            // Flavors, zones and their profiles: creating one is 501,
            // changing, deleting or showing one that does not exist 404.
            (
                Method::POST,
                "/v2/lbaas/flavors",
                Some(flavor.clone()),
                501,
                flavors,
            ),
            (
                Method::PUT,
                "/v2/lbaas/flavors/gold",
                Some(flavor),
                404,
                "Flavor gold",
            ),
            (
                Method::DELETE,
                "/v2/lbaas/flavors/gold",
                None,
                404,
                "Flavor gold",
            ),
            (
                Method::GET,
                "/v2/lbaas/flavors/gold",
                None,
                404,
                "Flavor gold",
            ),
            (
                Method::POST,
                "/v2/lbaas/flavorprofiles",
                Some(profile.clone()),
                501,
                flavors,
            ),
            (
                Method::PUT,
                "/v2/lbaas/flavorprofiles/p",
                Some(profile),
                404,
                "Flavor Profile p",
            ),
            (
                Method::DELETE,
                "/v2.0/lbaas/flavorprofiles/p",
                None,
                404,
                "Flavor Profile p",
            ),
            (
                Method::POST,
                "/v2/lbaas/availabilityzones",
                Some(zone.clone()),
                501,
                zones,
            ),
            (
                Method::PUT,
                "/v2/lbaas/availabilityzones/az1",
                Some(zone),
                404,
                "Availability Zone az1",
            ),
            (
                Method::DELETE,
                "/v2/lbaas/availabilityzones/az1",
                None,
                404,
                "Availability Zone az1",
            ),
            (
                Method::POST,
                "/v2/lbaas/availabilityzoneprofiles",
                Some(zone_profile.clone()),
                501,
                zones,
            ),
            (
                Method::PUT,
                "/v2/lbaas/availabilityzoneprofiles/p",
                Some(zone_profile),
                404,
                "Availability Zone Profile p",
            ),
            (
                Method::DELETE,
                "/v2/lbaas/availabilityzoneprofiles/p",
                None,
                404,
                "Availability Zone Profile p",
            ),
            // axum's own refusals come with a fault body too.
            (
                Method::PATCH,
                "/v2/lbaas/loadbalancers",
                None,
                405,
                "PATCH is not allowed",
            ),
            (
                Method::PUT,
                "/v2/lbaas/flavors",
                None,
                405,
                "PUT is not allowed",
            ),
            (
                Method::DELETE,
                "/v2/lbaas/pools",
                None,
                405,
                "DELETE is not allowed",
            ),
            (
                Method::GET,
                "/v2/lbaas/quotas",
                None,
                404,
                "could not be found",
            ),
            (Method::GET, "/v3", None, 404, "could not be found"),
        ],
    );
    // The lists are there, empty.
    for (path, key) in [
        ("/v2/lbaas/l7policies", "l7policies"),
        ("/v2/lbaas/flavors", "flavors"),
        ("/v2/lbaas/flavorprofiles", "flavorprofiles"),
        ("/v2.0/lbaas/availabilityzones", "availability_zones"),
        (
            "/v2/lbaas/availabilityzoneprofiles",
            "availability_zone_profiles",
        ),
    ] {
        let a = api.call(Method::GET, path, None);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert_eq!(a.body[key], json!([]), "{path}: {}", a.body);
        assert_eq!(
            a.body[format!("{key}_links")],
            json!([]),
            "{path}: {}",
            a.body
        );
    }
    let caps = api.call(
        Method::GET,
        "/v2/lbaas/providers/siphon/flavor_capabilities",
        None,
    );
    assert_eq!(caps.body, json!({"flavor_capabilities": []}));
}

/// Octavia's words are checked before anything is looked up: a word
/// outside Octavia's set is 400 listing every word, one of Octavia's that
/// an L4 provider cannot honour is 501 naming the field.
#[test]
fn words_outside_octavias_sets_are_invalid_and_non_l4_ones_unsupported() {
    let api = Api::start("api-words");
    let pool = |protocol: &str, algorithm: &str, sp: Value| {
        Some(
            json!({"pool": {"loadbalancer_id": "x", "protocol": protocol,
                             "lb_algorithm": algorithm, "session_persistence": sp}}),
        )
    };
    let listener = |protocol: &str| {
        Some(
            json!({"listener": {"loadbalancer_id": "x", "protocol": protocol,
                                 "protocol_port": 443}}),
        )
    };
    let monitor = |kind: &str| {
        Some(
            json!({"healthmonitor": {"pool_id": "x", "type": kind, "delay": 5,
                                      "timeout": 3, "max_retries": 3}}),
        )
    };
    let lb = |topology: &str| {
        Some(json!({"loadbalancer": {"vip_subnet_id": "vips", "topology": topology}}))
    };
    let (pools, listeners) = ("/v2/lbaas/pools", "/v2/lbaas/listeners");
    let monitors = "/v2/lbaas/healthmonitors";
    expect_faults(
        &api,
        vec![
            (
                Method::POST,
                pools,
                pool("TCP", "FASTEST", Value::Null),
                400,
                "Value should be one of: ROUND_ROBIN, LEAST_CONNECTIONS, SOURCE_IP, SOURCE_IP_PORT, MAGLEV",
            ),
            (
                Method::POST,
                pools,
                pool("QUIC", "MAGLEV", Value::Null),
                400,
                "Value should be one of: TCP, UDP, PROXY, PROXYV2, HTTP, HTTPS, SCTP",
            ),
            (
                Method::POST,
                pools,
                pool("HTTP", "MAGLEV", Value::Null),
                501,
                "requested option: protocol = HTTP",
            ),
            (
                Method::POST,
                pools,
                pool("TCP", "MAGLEV", json!({"type": "HTTP_COOKIE"})),
                501,
                "requested option: session_persistence.type = HTTP_COOKIE",
            ),
            (
                Method::POST,
                listeners,
                listener("TERMINATED_HTTPS"),
                501,
                "requested option: protocol = TERMINATED_HTTPS",
            ),
            (
                Method::POST,
                listeners,
                listener("PROXY"),
                400,
                "Value should be one of: TCP, UDP, HTTP",
            ),
            (
                Method::POST,
                monitors,
                monitor("SCTP"),
                501,
                "requested option: type = SCTP",
            ),
            (
                Method::POST,
                monitors,
                monitor("ICMP"),
                400,
                "Value should be one of: HTTP, HTTPS, PING, TCP, TLS-HELLO, UDP-CONNECT, SCTP",
            ),
            (
                Method::POST,
                "/v2/lbaas/loadbalancers",
                lb("ACTIVE_STANDBY"),
                400,
                "Value should be one of: SINGLE, ACTIVE_ACTIVE",
            ),
        ],
    );
}

#[test]
fn a_load_balancer_with_an_unknown_zone_or_a_non_host_vip_is_refused() {
    let api = Api::start("api-create");
    let lb = |extra: Value| {
        let mut b = json!({"name": "x", "vip_subnet_id": "vips"});
        if let (Some(b), Value::Object(e)) = (b.as_object_mut(), extra) {
            b.extend(e);
        }
        Some(json!({ "loadbalancer": b }))
    };
    let path = "/v2/lbaas/loadbalancers";
    expect_faults(
        &api,
        vec![
            (
                Method::POST,
                path,
                lb(json!({"availability_zone": "az1"})),
                400,
                "Validation failure: Invalid availability_zone 'az1'",
            ),
            (
                Method::POST,
                path,
                lb(json!({"vip_address": "198.18.7.0"})),
                400,
                "network or broadcast address of subnet vips",
            ),
            (
                Method::POST,
                path,
                lb(json!({"vip_address": "198.18.7.255"})),
                400,
                "network or broadcast address of subnet vips",
            ),
            // What passes these checks goes on to the next: no spare
            // amphora here.
            (
                Method::POST,
                path,
                lb(json!({"availability_zone": null})),
                503,
                "No spare amphora",
            ),
            (
                Method::POST,
                path,
                lb(json!({"vip_address": "198.18.7.1"})),
                503,
                "No spare amphora",
            ),
            (
                Method::POST,
                path,
                lb(json!({"vip_address": "198.18.7.254"})),
                503,
                "No spare amphora",
            ),
        ],
    );
    let a = api.call(Method::GET, path, None);
    assert_eq!(a.body["loadbalancers"], json!([]), "{}", a.body);
}

#[test]
fn additional_vips_are_checked_before_any_amphora_is_taken() {
    let lb = |additional: Value| {
        Some(json!({ "loadbalancer": {
            "vip_subnet_id": "vips", "vip_address": "198.18.7.5", "additional_vips": additional
        }}))
    };
    let path = "/v2/lbaas/loadbalancers";
    let api = Api::start("api-additional-vips");
    expect_faults(
        &api,
        vec![
            (
                Method::POST,
                path,
                lb(json!("vips6")),
                400,
                "Expected 'list'",
            ),
            (
                Method::POST,
                path,
                lb(Value::Array(vec![json!({"subnet_id": "vips6"}); 5])),
                400,
                "At most 4 additional VIPs",
            ),
            (
                Method::POST,
                path,
                lb(json!([{"ip_address": "2001:db8:7::5"}])),
                400,
                "Mandatory field missing: additional_vips.subnet_id",
            ),
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "nope"}])),
                400,
                "Subnet nope could not be found",
            ),
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "elsewhere"}])),
                400,
                "not on the VIP network net",
            ),
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "vips6", "ip_address": "2001:db8:8::5"}])),
                400,
                "not in subnet vips6",
            ),
            // The first VIP's own address, or twice the same one.
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "vips", "ip_address": "198.18.7.5"}])),
                409,
                "already allocated",
            ),
            (
                Method::POST,
                path,
                lb(json!([
                    {"subnet_id": "vips6", "ip_address": "2001:db8:7::5"},
                    {"subnet_id": "vips6", "ip_address": "2001:db8:7::5"}
                ])),
                409,
                "already allocated",
            ),
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "vips6", "port_id": "p"}])),
                501,
                "port_id",
            ),
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "vips6", "name": "x"}])),
                400,
                "Unknown attribute",
            ),
            // Dual stack passes every check (no spare amphora here).
            (
                Method::POST,
                path,
                lb(json!([{"subnet_id": "vips6"}])),
                503,
                "No spare amphora",
            ),
        ],
    );
    drop(api);
    // linux-ecmp routes one VIP per load balancer.
    let api = Api::start_configured("api-additional-vips-ecmp", |c| {
        c.distributor = Distributor::LinuxEcmp(LinuxEcmp {
            netns: None,
            interface: "lo".into(),
            buckets: 128,
            idle_timer_s: 120,
            idle_margin_s: 5,
            unbalanced_timer_s: 0,
            first_id: 1_000_000,
            resync_s: 10,
        })
    });
    expect_faults(
        &api,
        vec![(
            Method::POST,
            path,
            lb(json!([{"subnet_id": "vips6"}])),
            400,
            "not supported with the linux-ecmp distributor",
        )],
    );
}

/// How long until the server closes `conn` (reads give end of file or an
/// error), at most `limit`; `None` if it is still open then.
fn closed_after(
    conn: &mut std::net::TcpStream,
    limit: std::time::Duration,
) -> Option<std::time::Duration> {
    use std::io::Read;
    let t = std::time::Instant::now();
    conn.set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while t.elapsed() < limit {
        match conn.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t.elapsed()),
        }
    }
    None
}

#[test]
fn slow_stalled_and_idle_clients_are_cut_off_while_the_api_keeps_answering() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let (head, idle) = (Duration::from_millis(400), Duration::from_millis(800));
    let api = Api::start_with(
        "api-slow",
        Limits {
            header_read_timeout_ms: head.as_millis() as u64,
            idle_timeout_ms: idle.as_millis() as u64,
            ..Limits::default()
        },
    );
    let addr = api.handle.as_ref().unwrap().addr;
    let limit = Duration::from_secs(5);

    // Half a request head, then nothing.
    let half = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /v2/lbaas/loadbalancers HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        closed_after(&mut c, limit)
    });
    // A head trickled a byte every 50 ms: bytes keep moving, so only the
    // head's own deadline can end it.
    let trickle = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let head = format!(
            "GET /v2/lbaas/loadbalancers HTTP/1.1\r\nX-Auth-Token: {TOKEN}\r\nX-Pad: {}",
            "a".repeat(200)
        );
        for b in head.bytes() {
            if c.write_all(&[b]).is_err() || t.elapsed() > limit {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    // A whole head promising 1,000 bytes of body, 10 sent, then nothing.
    let stalled = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        let req = format!(
            "POST /v2/lbaas/loadbalancers HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"loadbala"
        );
        c.write_all(req.as_bytes()).unwrap();
        closed_after(&mut c, limit)
    });
    // One request answered, then the kept-alive connection sits idle.
    let kept = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        let req = format!(
            "GET /v2/lbaas/loadbalancers HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut c, &mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        closed_after(&mut c, limit)
    });

    // Meanwhile the API answers as ever.
    for _ in 0..5 {
        let a = api.call(Method::GET, "/v2/lbaas/loadbalancers", None);
        assert_eq!(a.status, 200, "{}", a.body);
        std::thread::sleep(Duration::from_millis(100));
    }

    let half = half
        .join()
        .unwrap()
        .expect("a half-sent head is never cut off");
    let trickle = trickle
        .join()
        .unwrap()
        .expect("a trickled head is never cut off");
    let stalled = stalled
        .join()
        .unwrap()
        .expect("a stalled body is never cut off");
    let kept = kept
        .join()
        .unwrap()
        .expect("an idle kept-alive connection is never closed");
    // Cut off near their deadlines, not at once and not much later.
    for (what, took, deadline) in [
        ("half head", half, head),
        ("trickled head", trickle, head),
        ("stalled body", stalled, idle),
        ("idle keep-alive", kept, head),
    ] {
        assert!(
            took >= deadline.mul_f32(0.8) && took < deadline * 3,
            "{what}: closed after {took:?}, deadline {deadline:?}"
        );
    }
}
