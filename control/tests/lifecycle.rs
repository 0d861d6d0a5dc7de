#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The controller end to end, on loopback: its API, a real SQLite file,
//! real agents (mutual TLS, certificates from a test CA) driving real
//! dataplanes, heartbeats, traffic through the VIP to real backends,
//! failover to a spare, and a controller restart.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{json, Value};
use siphon_control::client::Client;
use siphon_control::config::Auth;
use siphon_testkit::{connect_greeting, free_port, root_or_skip, Backend};

#[test]
fn a_load_balancer_lives_through_the_api_restarts_fails_over_and_is_deleted() {
    if !root_or_skip("control lifecycle (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &mut Rig::new("life", &["amp-a", "amp-b"]);
    let rt = rig.rt.clone();
    let b1 = Backend::start(&rt, "b1", "127.0.0.1");
    let b2 = Backend::start(&rt, "b2", "127.0.0.1");
    let port = free_port();
    let (lb, listener, pool, members) = rig.build_lb(&[&b1, &b2], port);
    let vip: SocketAddr = format!("{}.1:{port}", rig.vip_net).parse().unwrap();

    // Traffic through the VIP reaches both members.
    let got = greetings(vip, 20);
    assert_eq!(got.iter().filter(|g| *g == "b1").count(), 10, "{got:?}");
    assert_eq!(got.iter().filter(|g| *g == "b2").count(), 10, "{got:?}");

    // Heartbeats bring the status tree ONLINE and the counters in.
    rig.wait_field(
        &format!("/v2/lbaas/loadbalancers/{lb}"),
        "loadbalancer",
        "operating_status",
        "ONLINE",
        Duration::from_secs(5),
    );
    let tree = rig.get(&format!("/v2/lbaas/loadbalancers/{lb}/status"));
    assert_eq!(tree.status, 200);
    let l0 = &tree.body["statuses"]["loadbalancer"]["listeners"][0];
    assert_eq!(l0["id"], listener.as_str());
    assert_eq!(l0["operating_status"], "ONLINE");
    assert_eq!(l0["pools"][0]["id"], pool.as_str());
    assert_eq!(l0["pools"][0]["members"].as_array().unwrap().len(), 2);
    assert_eq!(
        l0["pools"][0]["members"][0]["operating_status"],
        "NO_MONITOR"
    );
    let start = Instant::now();
    loop {
        let s = rig.get(&format!("/v2/lbaas/loadbalancers/{lb}/stats"));
        if s.body["stats"]["total_connections"].as_u64() >= Some(20) {
            let l = rig.get(&format!("/v2/lbaas/listeners/{listener}/stats"));
            assert_eq!(
                l.body["stats"]["total_connections"],
                s.body["stats"]["total_connections"]
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stats never counted: {}",
            s.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let holder = rig.get(&format!("/v2/octavia/amphorae?loadbalancer_id={lb}"));
    assert_eq!(
        holder.body["amphorae"].as_array().unwrap().len(),
        1,
        "{}",
        holder.body
    );
    let dead = holder.body["amphorae"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let amp_stats = rig.get(&format!("/v2/octavia/amphorae/{dead}/stats"));
    assert_eq!(
        amp_stats.body["amphora_stats"][0]["listener_id"],
        listener.as_str()
    );

    // A health monitor, then a drained member: new connections avoid it.
    let a = rig.call(
        Method::POST,
        "/v2/lbaas/healthmonitors",
        Some(json!({"healthmonitor": {"pool_id": pool, "type": "TCP", "delay": 1, "timeout": 1, "max_retries": 1}})),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    rig.wait_active(&lb);
    rig.wait_field(
        &format!("/v2/lbaas/pools/{pool}/members/{}", members[0]),
        "member",
        "operating_status",
        "ONLINE",
        Duration::from_secs(5),
    );
    let a = rig.call(
        Method::PUT,
        &format!("/v2/lbaas/pools/{pool}/members/{}", members[0]),
        Some(json!({"member": {"weight": 0}})),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    rig.wait_active(&lb);
    assert!(greetings(vip, 10).iter().all(|g| g == "b2"));

    // A name change is not a push: ACTIVE at once.
    let a = rig.call(
        Method::PUT,
        &format!("/v2/lbaas/listeners/{listener}"),
        Some(json!({"listener": {"name": "renamed"}})),
    );
    assert_eq!(
        a.body["listener"]["provisioning_status"], "ACTIVE",
        "{}",
        a.body
    );
    assert_eq!(
        rig.get(&format!("/v2/lbaas/loadbalancers/{lb}")).body["loadbalancer"]
            ["provisioning_status"],
        "ACTIVE"
    );

    // The controller restarts: everything is still there.
    let before = rig.get(&format!("/v2/lbaas/pools/{pool}/members"));
    rig.restart();
    let after = rig.get(&format!("/v2/lbaas/pools/{pool}/members"));
    assert_eq!(before.body, after.body);
    assert_eq!(
        rig.get(&format!("/v2/lbaas/listeners/{listener}")).body["listener"]["name"],
        "renamed"
    );
    // Last-seen times are in the store: there after the restart.
    for a in ["amp-a", "amp-b"] {
        let v = rig.get(&format!("/v2/octavia/amphorae/{a}")).body;
        assert!(v["amphora"]["last_heartbeat"].is_string(), "{v}");
    }
    assert!(greetings(vip, 4).iter().all(|g| g == "b2"));

    // amp-a dies: amp-b takes over within the heartbeat timeout and a push.
    let spare = if dead == "amp-a" { "amp-b" } else { "amp-a" };
    let killed = Instant::now();
    rig.amphorae
        .iter_mut()
        .find(|a| a.id == dead)
        .unwrap()
        .kill();
    let served = loop {
        if connect_greeting(vip).is_ok_and(|(_, g)| g == "b2") {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no failover: {} {}",
            rig.get("/v2/octavia/amphorae").body,
            rig.get(&format!("/v2/lbaas/loadbalancers/{lb}")).body
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("failover: traffic through the VIP again {served:?} after the amphora died (heartbeat timeout 1 s)");
    rig.wait_active(&lb);
    let now_on = rig.get(&format!("/v2/octavia/amphorae?loadbalancer_id={lb}"));
    assert_eq!(now_on.body["amphorae"][0]["id"], spare, "{}", now_on.body);
    assert_eq!(
        rig.get(&format!("/v2/octavia/amphorae/{dead}")).body["amphora"]["status"],
        "ERROR"
    );
    assert!(greetings(vip, 6).iter().all(|g| g == "b2"));

    // Delete, cascading: gone, and the spare is a spare again.
    let a = rig.call(
        Method::DELETE,
        &format!("/v2/lbaas/loadbalancers/{lb}"),
        None,
    );
    assert_eq!(a.status, 400, "children without cascade: {}", a.body);
    let a = rig.call(
        Method::DELETE,
        &format!("/v2/lbaas/loadbalancers/{lb}?cascade=true"),
        None,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    let start = Instant::now();
    while rig.get(&format!("/v2/lbaas/loadbalancers/{lb}")).status != 404 {
        assert!(start.elapsed() < Duration::from_secs(10), "never deleted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        rig.get(&format!("/v2/lbaas/listeners/{listener}")).status,
        404
    );
    assert_eq!(
        rig.get(&format!("/v2/octavia/amphorae/{spare}")).body["amphora"]["status"],
        "READY"
    );
    assert!(
        connect_greeting(vip).is_err(),
        "the VIP still answers after the delete"
    );
}

/// Ids and provisioning statuses of everything: what a refused request
/// must leave as it was.
fn inventory(rig: &Rig, pool: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, key) in [
        ("/v2/lbaas/loadbalancers".to_owned(), "loadbalancers"),
        ("/v2/lbaas/listeners".to_owned(), "listeners"),
        ("/v2/lbaas/pools".to_owned(), "pools"),
        (format!("/v2/lbaas/pools/{pool}/members"), "members"),
        ("/v2/lbaas/healthmonitors".to_owned(), "healthmonitors"),
    ] {
        for o in rig.get(&path).body[key].as_array().unwrap() {
            out.push((
                format!("{key}:{}:{}", o["id"], o["name"]),
                o["provisioning_status"].to_string(),
            ));
        }
    }
    out
}

#[test]
fn bad_requests_get_octavias_errors_and_change_nothing() {
    if !root_or_skip("control bad requests (VIPs are plumbed through netlink)") {
        return;
    }
    let mut rig = Rig::new("bad", &["amp-c"]);
    let addr = rig.handle.as_ref().unwrap().addr;
    let b1 = Backend::start(&rig.rt, "b1", "127.0.0.1");
    let port = free_port();

    // Auth: none or a wrong token is 401; discovery needs none.
    for token in [None, Some("wrong".to_owned())] {
        let c = Client::new(&format!("http://{addr}"), token).unwrap();
        let a = rig
            .rt
            .block_on(c.call(Method::GET, "/v2/lbaas/loadbalancers", None))
            .unwrap();
        assert_eq!(a.status, 401, "{}", a.body);
        assert_eq!(a.body["faultcode"], "Client");
        let v = rig.rt.block_on(c.call(Method::GET, "/v2.0", None)).unwrap();
        assert_eq!(v.body["version"]["id"], "v2.0", "{}", v.body);
    }

    let (lb, listener, pool, members) = rig.build_lb(&[&b1], port);
    let before = inventory(&rig, &pool);
    let cases: Vec<(Method, String, Value, u16, &str)> = vec![
        (
            Method::POST,
            "/v2/lbaas/pools".into(),
            json!({"pool": {"protocol": "TCP", "lb_algorithm": "FASTEST", "loadbalancer_id": lb}}),
            400,
            "lb_algorithm",
        ),
        (
            Method::POST,
            "/v2/lbaas/listeners".into(),
            json!({"listener": {"protocol": "TCP", "protocol_port": 70000, "loadbalancer_id": lb}}),
            400,
            "protocol_port",
        ),
        (
            Method::POST,
            "/v2/lbaas/listeners".into(),
            json!({"listener": {"protocol": "TCP", "protocol_port": port, "loadbalancer_id": lb}}),
            409,
            "already using protocol_port",
        ),
        (
            Method::POST,
            "/v2/lbaas/listeners".into(),
            json!({"listener": {"protocol": "HTTP", "protocol_port": 81, "loadbalancer_id": lb}}),
            501,
            "protocol = HTTP",
        ),
        (
            Method::POST,
            "/v2/lbaas/listeners".into(),
            json!({"listener": {"protocol": "TCP", "protocol_port": 82, "loadbalancer_id": "no-such-lb"}}),
            404,
            "no-such-lb",
        ),
        (
            Method::POST,
            "/v2/lbaas/pools/no-such-pool/members".into(),
            json!({"member": {"address": "127.0.0.1", "protocol_port": 80}}),
            404,
            "no-such-pool",
        ),
        (
            Method::POST,
            format!("/v2/lbaas/pools/{pool}/members"),
            json!({"member": {"address": "127.0.0.1", "protocol_port": 80, "weight": 257}}),
            400,
            "weight",
        ),
        (
            Method::POST,
            format!("/v2/lbaas/pools/{pool}/members"),
            json!({"member": {"address": "not-an-ip", "protocol_port": 80}}),
            400,
            "address",
        ),
        (
            Method::POST,
            format!("/v2/lbaas/pools/{pool}/members"),
            json!({"member": {"address": "127.0.0.1", "protocol_port": b1.addr.port()}}),
            409,
            "already using",
        ),
        (
            Method::POST,
            "/v2/lbaas/healthmonitors".into(),
            json!({"healthmonitor": {"pool_id": pool, "type": "TCP", "delay": 1, "timeout": 5, "max_retries": 1}}),
            400,
            "timeout",
        ),
        (
            Method::POST,
            "/v2/lbaas/healthmonitors".into(),
            json!({"healthmonitor": {"pool_id": pool, "type": "TCP", "delay": 5, "timeout": 1, "max_retries": 11}}),
            400,
            "max_retries",
        ),
        (
            Method::PUT,
            format!("/v2/lbaas/listeners/{listener}"),
            json!({"listener": {"protocol_port": 90}}),
            400,
            "protocol_port",
        ),
        (
            Method::POST,
            "/v2/lbaas/listeners".into(),
            json!({"protocol": "TCP"}),
            400,
            "listener",
        ),
        (
            Method::POST,
            "/v2/lbaas/listeners".into(),
            json!({"listener": {"protocol": "TCP", "protocol_port": 83, "loadbalancer_id": lb, "colour": "red"}}),
            400,
            "colour",
        ),
        (
            Method::POST,
            "/v2/lbaas/loadbalancers".into(),
            json!({"loadbalancer": {"vip_subnet_id": "no-such-subnet"}}),
            400,
            "no-such-subnet",
        ),
        (
            Method::POST,
            "/v2/lbaas/loadbalancers".into(),
            json!({"loadbalancer": {"vip_subnet_id": SUBNET}}),
            503,
            "No spare amphora",
        ),
        (
            Method::DELETE,
            format!("/v2/lbaas/loadbalancers/{lb}"),
            Value::Null,
            400,
            "has children",
        ),
        (
            Method::GET,
            format!("/v2/lbaas/pools/{pool}/members/{}", "nope"),
            Value::Null,
            404,
            "Member nope",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let body = (!body.is_null()).then_some(body);
        let a = rig.call(method.clone(), &path, body.clone());
        assert_eq!(a.status, status, "{method} {path} {body:?}: {}", a.body);
        let fault = a.fault().unwrap_or_default();
        assert!(
            fault.contains(needle),
            "{method} {path}: {fault:?} lacks {needle:?}"
        );
        assert_eq!(a.body["debuginfo"], Value::Null);
    }
    let raw = rig.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = "{not json";
        let req = format!("POST /v2/lbaas/pools HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    });
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    // While a change is pushed, the load balancer refuses others (409).
    let m = &members[0];
    let first = rig.call(
        Method::PUT,
        &format!("/v2/lbaas/pools/{pool}/members/{m}"),
        Some(json!({"member": {"weight": 7}})),
    );
    assert_eq!(first.status, 200);
    let second = rig.call(
        Method::PUT,
        &format!("/v2/lbaas/pools/{pool}/members/{m}"),
        Some(json!({"member": {"weight": 8}})),
    );
    if second.status == 409 {
        assert!(
            second.fault().unwrap().contains("immutable"),
            "{}",
            second.body
        );
    }
    rig.wait_active(&lb);
    let a = rig.call(
        Method::PUT,
        &format!("/v2/lbaas/pools/{pool}/members/{m}"),
        Some(json!({"member": {"weight": 1}})),
    );
    assert_eq!(a.status, 200);
    rig.wait_active(&lb);
    assert_eq!(
        inventory(&rig, &pool),
        before,
        "a refused request changed something"
    );

    // Lists: filters, fields, pagination links.
    let by_name = rig.get("/v2/lbaas/loadbalancers?name=web");
    assert_eq!(by_name.body["loadbalancers"].as_array().unwrap().len(), 1);
    assert_eq!(
        rig.get("/v2/lbaas/loadbalancers?name=nope").body["loadbalancers"],
        json!([])
    );
    let by_id = rig.get(&format!(
        "/v2/lbaas/listeners?id={listener}&fields=id&fields=name"
    ));
    assert_eq!(
        by_id.body["listeners"],
        json!([{"id": listener, "name": "web-80"}])
    );
    assert_eq!(
        rig.get(&format!("/v2/lbaas/pools?loadbalancer_id={lb}"))
            .body["pools"][0]["id"],
        pool.as_str()
    );
    let page = rig.get("/v2/octavia/amphorae?limit=1");
    assert_eq!(page.body["amphorae"].as_array().unwrap().len(), 1);
    assert_eq!(
        rig.get("/v2/lbaas/loadbalancers?provisioning_status=ACTIVE")
            .body["loadbalancers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The Neutron lookups of the stock CLI, and providers.
    let subnets = rig.get(&format!("/v2.0/subnets?id={SUBNET}"));
    assert_eq!(
        subnets.body["subnets"][0]["network_id"], NETWORK,
        "{}",
        subnets.body
    );
    assert_eq!(rig.get("/v2.0/subnets?id=other").body["subnets"], json!([]));
    assert_eq!(
        rig.get(&format!("/v2.0/networks/{NETWORK}")).body["network"]["subnets"],
        json!([SUBNET])
    );
    assert_eq!(
        rig.get("/v2/lbaas/providers").body["providers"][0]["name"],
        "siphon"
    );

    // The amphora stops answering: a change ends in ERROR with the reason,
    // and the load balancer is ACTIVE again (Octavia's revert).
    rig.amphorae[0].kill();
    let a = rig.call(
        Method::POST,
        &format!("/v2/lbaas/pools/{pool}/members"),
        Some(json!({"member": {"address": "127.0.0.1", "protocol_port": 9}})),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let member = a.body["member"]["id"].as_str().unwrap().to_owned();
    let path = format!("/v2/lbaas/pools/{pool}/members/{member}");
    rig.wait_field(
        &path,
        "member",
        "provisioning_status",
        "ERROR",
        Duration::from_secs(15),
    );
    let m = rig.get(&path).body;
    assert!(
        m["member"]["provisioning_error"]
            .as_str()
            .unwrap()
            .contains("amp-c"),
        "{m}"
    );
    let l = rig.get(&format!("/v2/lbaas/loadbalancers/{lb}")).body;
    assert_eq!(l["loadbalancer"]["provisioning_status"], "ACTIVE", "{l}");
    // Only what changed is in ERROR: the listener in front of the pool
    // was locked, not changed, and is ACTIVE (and still rendered).
    let l = rig.get(&format!("/v2/lbaas/listeners/{listener}")).body;
    assert_eq!(l["listener"]["provisioning_status"], "ACTIVE", "{l}");
    let p = rig.get(&format!("/v2/lbaas/pools/{pool}")).body;
    assert_eq!(p["pool"]["provisioning_status"], "ACTIVE", "{p}");
    // An object in ERROR can be deleted.
    assert_eq!(rig.call(Method::DELETE, &path, None).status, 204);
}

#[test]
fn the_stock_openstack_cli_and_sdk_drive_it_unchanged() {
    if !root_or_skip("stock clients (VIPs are plumbed through netlink)") {
        return;
    }
    let venv = stock_clients();
    let rig = Rig::with_auth("stock", &["amp-s1", "amp-s2"], Auth::Noauth);
    let endpoint = format!("http://{}/v2.0", rig.handle.as_ref().unwrap().addr);
    let b1 = Backend::start(&rig.rt, "b1", "127.0.0.1");
    let port = free_port();
    let os = |args: &[&str]| openstack(&venv, &endpoint, args);

    // The CLI: create and wait, show by name, list, children, status,
    // stats, update, delete.
    let lb = os(&[
        "loadbalancer",
        "create",
        "--name",
        "cli-lb",
        "--vip-subnet-id",
        SUBNET,
        "--wait",
        "-f",
        "json",
    ]);
    assert_eq!(lb["provisioning_status"], "ACTIVE", "{lb}");
    let vip = lb["vip_address"].as_str().unwrap().to_owned();
    let shown = os(&["loadbalancer", "show", "cli-lb", "-f", "json"]);
    assert_eq!(shown["id"], lb["id"]);
    let listed = os(&["loadbalancer", "list", "-f", "json"]);
    assert!(lists(&listed, "name", "cli-lb"), "{listed}");
    let p = port.to_string();
    os(&[
        "loadbalancer",
        "listener",
        "create",
        "--name",
        "cli-l",
        "--protocol",
        "TCP",
        "--protocol-port",
        &p,
        "cli-lb",
        "--wait",
        "-f",
        "json",
    ]);
    os(&[
        "loadbalancer",
        "pool",
        "create",
        "--name",
        "cli-p",
        "--protocol",
        "TCP",
        "--lb-algorithm",
        "ROUND_ROBIN",
        "--listener",
        "cli-l",
        "--wait",
        "-f",
        "json",
    ]);
    let bp = b1.addr.port().to_string();
    let m = os(&[
        "loadbalancer",
        "member",
        "create",
        "--address",
        "127.0.0.1",
        "--protocol-port",
        &bp,
        "cli-p",
        "--wait",
        "-f",
        "json",
    ]);
    assert_eq!(m["provisioning_status"], "ACTIVE", "{m}");
    let addr: SocketAddr = format!("{vip}:{port}").parse().unwrap();
    assert_eq!(greetings(addr, 3), ["b1", "b1", "b1"]);
    let status = os(&["loadbalancer", "status", "show", "cli-lb"]);
    assert_eq!(
        status["loadbalancer"]["listeners"][0]["name"], "cli-l",
        "{status}"
    );
    let start = Instant::now();
    loop {
        let stats = os(&["loadbalancer", "stats", "show", "cli-lb", "-f", "json"]);
        if stats["total_connections"].as_u64() >= Some(3) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{stats}");
        std::thread::sleep(Duration::from_millis(300));
    }
    os(&[
        "loadbalancer",
        "set",
        "--name",
        "cli-lb-2",
        "cli-lb",
        "--wait",
    ]);
    assert_eq!(
        os(&["loadbalancer", "show", "cli-lb-2", "-f", "json"])["id"],
        lb["id"]
    );
    os(&["loadbalancer", "delete", "--cascade", "cli-lb-2", "--wait"]);
    assert_eq!(
        rig.get(&format!(
            "/v2/lbaas/loadbalancers/{}",
            lb["id"].as_str().unwrap()
        ))
        .status,
        404
    );

    // The SDK.
    let mut sdk = std::process::Command::new(venv.join("bin/python"));
    sdk.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stock/sdk.py"))
        .args([endpoint.as_str(), SUBNET, &free_port().to_string()]);
    let stdout = stock_output(sdk, "sdk.py");
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["created"], "PENDING_CREATE", "{seen}");
    assert_eq!(seen["active"], "ACTIVE", "{seen}");
    assert_eq!(seen["found"], true, "{seen}");
    assert_eq!(seen["listeners"], json!(["sdk-listener"]), "{seen}");
    assert_eq!(
        seen["pool_listeners"],
        json!([seen["listener_id"]]),
        "{seen}"
    );
    assert_eq!(seen["description"], "through the sdk", "{seen}");
    assert_eq!(seen["names"], json!(["sdk-lb"]), "{seen}");
    assert_eq!(seen["deleted"], true, "{seen}");
}

/// Follows `next` links from `first`; the ids of each page, and the
/// links seen (every one must point under `prefix`).
fn follow(rig: &Rig, first: &str, key: &str, prefix: &str) -> (Vec<Vec<String>>, Value) {
    let origin = format!("http://{}", rig.handle.as_ref().unwrap().addr);
    let mut pages = Vec::new();
    let mut path = first.to_owned();
    loop {
        let a = rig.get(&path);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        let ids: Vec<String> = a.body[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        pages.push(ids);
        let last_links = a.body[format!("{key}_links")].clone();
        for l in last_links.as_array().unwrap() {
            let href = l["href"].as_str().unwrap();
            assert!(
                href.starts_with(&format!("{origin}{prefix}")),
                "{href} is not under {origin}{prefix}"
            );
        }
        let next = last_links
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["rel"] == "next");
        match next {
            Some(l) => path = l["href"].as_str().unwrap()[origin.len()..].to_owned(),
            None => return (pages, last_links),
        }
        assert!(pages.len() < 10, "{first}: more pages than members");
    }
}

#[test]
fn lists_longer_than_a_page_are_followed_to_the_end_by_links_and_the_stock_sdk() {
    if !root_or_skip("paging (VIPs are plumbed through netlink)") {
        return;
    }
    let venv = stock_clients();
    let rig = Rig::with_auth("paging", &["amp-p1"], Auth::Noauth);
    let (lb, _, pool, _) = rig.build_lb(&[], free_port());
    let batch: Vec<Value> = (0..1200)
        .map(|i| json!({"address": "127.0.0.1", "protocol_port": 20_000 + i}))
        .collect();
    let a = rig.call(
        Method::PUT,
        &format!("/v2/lbaas/pools/{pool}/members"),
        Some(json!({"members": batch})),
    );
    assert_eq!(a.status, 202, "{}", a.body);
    rig.wait_active(&lb);
    // What the pool says it holds: the truth each way of paging must meet.
    let p = rig.get(&format!("/v2/lbaas/pools/{pool}")).body;
    let all: std::collections::BTreeSet<String> = p["pool"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 1200);
    let check = |pages: &[Vec<String>], sizes: &[usize]| {
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), sizes);
        let seen: Vec<&String> = pages.iter().flatten().collect();
        let unique: std::collections::BTreeSet<String> =
            seen.iter().map(|s| s.to_string()).collect();
        assert_eq!(seen.len(), unique.len(), "a member came twice");
        assert_eq!(unique, all);
    };

    // No limit: Octavia's page of 1,000, then a link to the rest, under
    // the prefix the client used.
    let v2 = format!("/v2/lbaas/pools/{pool}/members");
    let (pages, _) = follow(&rig, &v2, "members", &v2);
    check(&pages, &[1000, 200]);
    let v20 = format!("/v2.0/lbaas/pools/{pool}/members");
    let (pages, last) = follow(&rig, &format!("{v20}?limit=500"), "members", &v20);
    check(&pages, &[500, 500, 200]);
    // The last page links back to the one before it.
    let prev = last
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["rel"] == "previous")
        .unwrap_or_else(|| panic!("no previous link: {last}"));
    let origin = format!("http://{}", rig.handle.as_ref().unwrap().addr);
    let back = rig.get(&prev["href"].as_str().unwrap()[origin.len()..]);
    let back: Vec<String> = back.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(back, pages[1]);

    // The stock SDK, asked for every member, gets each exactly once.
    let mut sdk = std::process::Command::new(venv.join("bin/python"));
    sdk.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stock/members.py"))
        .args([&format!("{origin}/v2.0"), &pool]);
    let seen: Value = serde_json::from_str(stock_output(sdk, "members.py").trim()).unwrap();
    let ids: Vec<String> = seen["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1200, "the SDK saw {} members", ids.len());
    check(&[ids], &[1200]);
}

#[test]
fn a_controller_killed_mid_push_finishes_the_change_after_its_restart() {
    if !root_or_skip("controller crash (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &mut Rig::new("crash", &["amp-k1", "amp-k2"]);
    let rt = rig.rt.clone();
    let b1 = Backend::start(&rt, "b1", "127.0.0.1");
    let b2 = Backend::start(&rt, "b2", "127.0.0.1");
    let b3 = Backend::start(&rt, "b3", "127.0.0.1");
    let port = free_port();
    let (lb, _listener, pool, _members) = rig.build_lb(&[&b1, &b2], port);
    let vip: SocketAddr = format!("{}.1:{port}", rig.vip_net).parse().unwrap();
    let mut control = rig.controller_process();

    // The carrier's dataplane is down, so the next change's push can only
    // fail and be retried: the controller is mid-push when it is killed.
    let a = rig.get(&format!("/v2/octavia/amphorae?loadbalancer_id={lb}"));
    let carrier_id = a.body["amphorae"][0]["id"].as_str().unwrap().to_owned();
    let carrier = rig
        .amphorae
        .iter()
        .position(|x| x.id == carrier_id)
        .unwrap();
    rig.amphorae[carrier].stop_dataplane();
    let a = rig.call(
        Method::POST,
        &format!("/v2/lbaas/pools/{pool}/members"),
        Some(json!({"member": {"address": "127.0.0.1", "protocol_port": b3.addr.port()}})),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let member = a.body["member"]["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let a = rig.get(&format!("/v2/lbaas/loadbalancers/{lb}"));
    assert_ne!(
        a.body["loadbalancer"]["provisioning_status"], "ACTIVE",
        "the push finished before the kill: {}",
        a.body
    );
    control.kill();

    // The amphora recovers while no controller runs; the controller comes
    // back on the same store and finishes what it was doing, unasked.
    rig.amphorae[carrier].start_dataplane();
    control.start(&rig.rt, &rig.client);
    let started = Instant::now();
    rig.wait_field(
        &format!("/v2/lbaas/pools/{pool}/members/{member}"),
        "member",
        "provisioning_status",
        "ACTIVE",
        Duration::from_secs(30),
    );
    rig.wait_active(&lb);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = greetings(vip, 9);
        if ["b1", "b2", "b3"]
            .iter()
            .all(|b| got.iter().any(|g| g == b))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new member is not served after the restart: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "after SIGKILL mid-push: change finished and served {:.1} s after the restart",
        started.elapsed().as_secs_f64()
    );
}
