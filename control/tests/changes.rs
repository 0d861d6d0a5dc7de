#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! Following the controller from outside, as the Octavia provider's
//! agent does: objects created under the caller's ids, and
//! `GET /v2/siphon/changes` long polls that report every status, counter
//! and delete as it happens, on a real amphora with real traffic.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{json, Value};
use siphon_testkit::{free_port, root_or_skip, Backend};

const LB: &str = "0b0e7d1c-1a57-4c1e-9a3c-5d1b2c3d4e01";
const LISTENER: &str = "0b0e7d1c-1a57-4c1e-9a3c-5d1b2c3d4e02";
const POOL: &str = "0b0e7d1c-1a57-4c1e-9a3c-5d1b2c3d4e03";
const MEMBER: &str = "0b0e7d1c-1a57-4c1e-9a3c-5d1b2c3d4e04";
const MONITOR: &str = "0b0e7d1c-1a57-4c1e-9a3c-5d1b2c3d4e05";

/// One answer of the changes feed.
fn changes(rig: &Rig, since: i64, wait: u64) -> Value {
    let a = rig.get(&format!("/v2/siphon/changes?since={since}&wait={wait}"));
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["changes"].clone()
}

/// The entry for `id` in list `kind` of an answer.
fn entry<'a>(answer: &'a Value, kind: &str, id: &str) -> Option<&'a Value> {
    answer[kind]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
}

/// Follows the feed from `since` until `done` holds for what was seen
/// last of each object; the head then.
fn follow_until(
    rig: &Rig,
    mut since: i64,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (i64, Value) {
    let start = Instant::now();
    let mut seen = json!({});
    loop {
        let answer = changes(rig, since, 5);
        for kind in [
            "loadbalancers",
            "listeners",
            "pools",
            "members",
            "healthmonitors",
            "listener_stats",
        ] {
            for e in answer[kind].as_array().unwrap() {
                seen[kind][e["id"].as_str().unwrap()] = e.clone();
            }
        }
        assert!(answer["head"].as_i64().unwrap() >= since);
        since = answer["head"].as_i64().unwrap();
        if done(&seen) {
            return (since, seen);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not seen in 20 s: {seen}"
        );
    }
}

fn status(seen: &Value, kind: &str, id: &str) -> String {
    seen[kind][id]["provisioning_status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_follower_sees_every_status_counter_and_delete_as_it_happens() {
    if !root_or_skip("changes feed (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &Rig::new("changes", &["amp-f1"]);
    let b1 = Backend::start(&rig.rt, "b1", "127.0.0.1");
    let port = free_port();

    // Everything, at first: no load balancer yet.
    let first = changes(rig, 0, 0);
    assert_eq!(first["full"], true, "{first}");
    assert_eq!(first["loadbalancers"], json!([]), "{first}");
    let head = first["head"].as_i64().unwrap();

    // A long poll waiting when the create comes is answered with it.
    let poll = {
        let client = rig.client.clone();
        let rt = rig.rt.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let path = format!("/v2/siphon/changes?since={head}&wait=20");
            let a = rt.block_on(client.call(Method::GET, &path, None)).unwrap();
            (start.elapsed(), a.body)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let created = Instant::now();
    let a = rig.call(
        Method::POST,
        "/v2/lbaas/loadbalancers",
        Some(json!({"loadbalancer": {"id": LB, "name": "followed", "project_id": "project-a", "vip_subnet_id": SUBNET}})),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["loadbalancer"]["id"], LB);
    assert_eq!(a.body["loadbalancer"]["project_id"], "project-a");
    let (waited, body) = poll.join().unwrap();
    let answer = &body["changes"];
    assert!(
        entry(answer, "loadbalancers", LB).is_some(),
        "the long poll did not report the create: {body}"
    );
    assert_eq!(answer["full"], false);
    assert!(
        waited >= Duration::from_millis(250),
        "answered before the change: {waited:?}"
    );
    println!(
        "long poll answered {:?} after the create",
        created.elapsed()
    );
    assert!(created.elapsed() < Duration::from_secs(2));

    // An id may not be given twice, nor be anything but a UUID.
    let again = rig.call(
        Method::POST,
        "/v2/lbaas/loadbalancers",
        Some(json!({"loadbalancer": {"id": LB, "vip_subnet_id": SUBNET}})),
    );
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(
        again.fault().unwrap().contains("already exists"),
        "{}",
        again.body
    );
    let bad = rig.call(
        Method::POST,
        "/v2/lbaas/loadbalancers",
        Some(json!({"loadbalancer": {"id": "lb-1", "vip_subnet_id": SUBNET}})),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.fault().unwrap().contains("UUID"), "{}", bad.body);
    let listed = rig.get("/v2/lbaas/loadbalancers");
    assert_eq!(listed.body["loadbalancers"].as_array().unwrap().len(), 1);

    let (head, _) = follow_until(rig, head, "load balancer ACTIVE", |s| {
        status(s, "loadbalancers", LB) == "ACTIVE"
    });

    // Children under the caller's ids, each followed to ACTIVE.
    let create = |path: &str, key: &str, body: Value| {
        let a = rig.call(Method::POST, path, Some(json!({ key: body })));
        assert_eq!(a.status, 201, "{}", a.body);
        a.body[key]["id"].as_str().unwrap().to_owned()
    };
    let id = create(
        "/v2/lbaas/listeners",
        "listener",
        json!({"id": LISTENER, "protocol": "TCP", "protocol_port": port, "loadbalancer_id": LB}),
    );
    assert_eq!(id, LISTENER);
    let (head, _) = follow_until(rig, head, "listener ACTIVE", |s| {
        status(s, "listeners", LISTENER) == "ACTIVE" && status(s, "loadbalancers", LB) == "ACTIVE"
    });
    create(
        "/v2/lbaas/pools",
        "pool",
        json!({"id": POOL, "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN", "listener_id": LISTENER}),
    );
    let (head, _) = follow_until(rig, head, "pool ACTIVE", |s| {
        status(s, "pools", POOL) == "ACTIVE" && status(s, "loadbalancers", LB) == "ACTIVE"
    });
    create(
        &format!("/v2/lbaas/pools/{POOL}/members"),
        "member",
        json!({"id": MEMBER, "address": "127.0.0.1", "protocol_port": b1.addr.port()}),
    );
    let (head, _) = follow_until(rig, head, "member ACTIVE", |s| {
        status(s, "members", MEMBER) == "ACTIVE" && status(s, "loadbalancers", LB) == "ACTIVE"
    });
    create(
        "/v2/lbaas/healthmonitors",
        "healthmonitor",
        json!({"id": MONITOR, "pool_id": POOL, "type": "TCP", "delay": 1, "timeout": 1, "max_retries": 1}),
    );
    // The monitor brings the member ONLINE: an operating status change
    // alone is followed too.
    let (head, seen) = follow_until(rig, head, "member ONLINE", |s| {
        s["members"][MEMBER]["operating_status"] == "ONLINE"
            && status(s, "healthmonitors", MONITOR) == "ACTIVE"
    });
    assert_eq!(status(&seen, "healthmonitors", MONITOR), "ACTIVE");

    // Traffic moves the listener's counters, which are followed too.
    let vip: SocketAddr = format!("{}.1:{port}", rig.vip_net).parse().unwrap();
    assert_eq!(greetings(vip, 3), ["b1", "b1", "b1"]);
    let (head, seen) = follow_until(rig, head, "listener counters", |s| {
        s["listener_stats"][LISTENER]["total_connections"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    });
    assert!(
        seen["listener_stats"][LISTENER]["bytes_out"]
            .as_u64()
            .unwrap()
            > 0
    );

    // A member taken out is reported DELETED.
    let a = rig.call(
        Method::DELETE,
        &format!("/v2/lbaas/pools/{POOL}/members/{MEMBER}"),
        None,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    let (head, _) = follow_until(rig, head, "member DELETED", |s| {
        status(s, "members", MEMBER) == "DELETED" && status(s, "loadbalancers", LB) == "ACTIVE"
    });

    // A cascade delete reports every object DELETED.
    let a = rig.call(
        Method::DELETE,
        &format!("/v2/lbaas/loadbalancers/{LB}?cascade=true"),
        None,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    follow_until(rig, head, "cascade delete", |s| {
        [
            ("loadbalancers", LB),
            ("listeners", LISTENER),
            ("pools", POOL),
            ("healthmonitors", MONITOR),
        ]
        .iter()
        .all(|(k, id)| status(s, k, id) == "DELETED")
    });

    // A follower starting over (its number lost) reads everything again,
    // deletes included: nothing it may have missed stays pending.
    let all = changes(rig, 0, 0);
    assert_eq!(all["full"], true);
    for (kind, id) in [
        ("loadbalancers", LB),
        ("listeners", LISTENER),
        ("pools", POOL),
        ("members", MEMBER),
        ("healthmonitors", MONITOR),
    ] {
        assert_eq!(
            entry(&all, kind, id).map(|e| e["provisioning_status"].clone()),
            Some(json!("DELETED")),
            "{kind} {id}: {all}"
        );
    }
    // A number from the future (a store restored from a backup) is
    // answered at once, with everything.
    let start = Instant::now();
    let future = changes(rig, 1 << 40, 10);
    assert_eq!(future["full"], true);
    assert!(start.elapsed() < Duration::from_secs(2));

    // Bad numbers are refused.
    for q in ["since=-1", "wait=61", "since=x", "after=3"] {
        let a = rig.get(&format!("/v2/siphon/changes?{q}"));
        assert_eq!(a.status, 400, "{q}: {}", a.body);
    }
}
