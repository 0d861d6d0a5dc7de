#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The controller heals what fails, with no operator call: a failover
//! whose push failed is retried, an amphora that lost its config is
//! re-pushed, and idle clients cannot freeze the API or stop a failover.
//! Real agents and dataplanes on loopback, as in `lifecycle.rs`.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use siphon_testkit::{free_port, root_or_skip, Backend};

/// The amphora carrying `lb`, and the other one.
fn carrier_and_spare(rig: &Rig, lb: &str) -> (usize, usize) {
    let a = rig.get(&format!("/v2/octavia/amphorae?loadbalancer_id={lb}"));
    let id = a.body["amphorae"][0]["id"].as_str().unwrap().to_owned();
    let c = rig.amphorae.iter().position(|x| x.id == id).unwrap();
    (c, 1 - c)
}

fn vip(rig: &Rig, port: u16) -> SocketAddr {
    format!("{}.1:{port}", rig.vip_net).parse().unwrap()
}

/// Waits until connections to `vip` reach both backends.
fn wait_served(vip: SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = greetings(vip, 4);
        if got.iter().any(|g| g == "b1") && got.iter().any(|g| g == "b2") {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "VIP not served: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(rig: &Rig, name: &str) -> f64 {
    let page = rig
        .rt
        .block_on(async {
            let addr = rig.handle.as_ref().unwrap().addr;
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            std::io::Result::Ok(out)
        })
        .unwrap();
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not on the page:\n{page}"))
}

#[test]
fn a_spare_whose_dataplane_was_down_during_failover_is_healed_without_a_call() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &mut Rig::new("heal", &["amp-h1", "amp-h2"]);
    let rt = rig.rt.clone();
    let b1 = Backend::start(&rt, "b1", "127.0.0.1");
    let b2 = Backend::start(&rt, "b2", "127.0.0.1");
    let port = free_port();
    let (lb, ..) = rig.build_lb(&[&b1, &b2], port);
    let vip = vip(rig, port);
    wait_served(vip, Duration::from_secs(5));
    let (c, s) = carrier_and_spare(rig, &lb);
    let spare = rig.amphorae[s].id.clone();

    // The spare's dataplane is down when the carrier dies: the failover's
    // push fails.
    rig.amphorae[s].stop_dataplane();
    rig.amphorae[c].kill();
    let path = format!("/v2/lbaas/loadbalancers/{lb}");
    rig.wait_field(
        &path,
        "loadbalancer",
        "provisioning_status",
        "ERROR",
        Duration::from_secs(15),
    );
    let shown = rig.get(&path).body["loadbalancer"].clone();
    // The reason and the next attempt are shown; the VIP is not served,
    // so it is not ONLINE.
    assert!(
        shown["provisioning_error"]
            .as_str()
            .is_some_and(|e| e.contains(&spare)),
        "{shown}"
    );
    assert!(shown["next_attempt_at"].is_string(), "{shown}");
    rig.wait_field(
        &path,
        "loadbalancer",
        "operating_status",
        "ERROR",
        Duration::from_secs(5),
    );
    let a = rig.get(&format!("/v2/octavia/amphorae/{spare}")).body["amphora"].clone();
    assert_eq!(a["status"], "ALLOCATED", "{a}");

    // Two seconds later the dataplane is back (empty): healed with no
    // call.
    std::thread::sleep(Duration::from_secs(2));
    let back = Instant::now();
    rig.amphorae[s].start_dataplane();
    rig.wait_field(
        &path,
        "loadbalancer",
        "provisioning_status",
        "ACTIVE",
        Duration::from_secs(15),
    );
    let served = back.elapsed() + wait_served(vip, Duration::from_secs(10));
    rig.wait_field(
        &path,
        "loadbalancer",
        "operating_status",
        "ONLINE",
        Duration::from_secs(5),
    );
    let shown = rig.get(&path).body["loadbalancer"].clone();
    assert!(shown.get("provisioning_error").is_none(), "{shown}");
    assert!(shown.get("next_attempt_at").is_none(), "{shown}");
    assert!(metric(rig, "siphon_control_push_failures_total") >= 1.0);
    assert!(
        metric(rig, "siphon_control_retries_total") + metric(rig, "siphon_control_repairs_total")
            >= 1.0
    );
    println!("spare's dataplane back → VIP served again in {served:?}");
}

#[test]
fn a_dataplane_restarted_empty_with_its_agent_state_deleted_is_repaired_by_a_re_push() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &mut Rig::new("lost", &["amp-l1", "amp-l2"]);
    let rt = rig.rt.clone();
    let b1 = Backend::start(&rt, "b1", "127.0.0.1");
    let b2 = Backend::start(&rt, "b2", "127.0.0.1");
    let port = free_port();
    let (lb, ..) = rig.build_lb(&[&b1, &b2], port);
    let vip = vip(rig, port);
    wait_served(vip, Duration::from_secs(5));
    let (c, s) = carrier_and_spare(rig, &lb);
    let (carrier, spare) = (rig.amphorae[c].id.clone(), rig.amphorae[s].id.clone());
    let path = format!("/v2/lbaas/loadbalancers/{lb}");
    rig.wait_field(
        &path,
        "loadbalancer",
        "operating_status",
        "ONLINE",
        Duration::from_secs(5),
    );
    let repairs = metric(rig, "siphon_control_repairs_total");

    // Everything the amphora knew is gone; the agent comes back empty.
    let amp = &mut rig.amphorae[c];
    amp.stop_agent();
    amp.start_dataplane();
    std::fs::remove_dir_all(&amp.cfg.state_dir).unwrap();
    let lost = Instant::now();
    amp.start_agent();
    let took = wait_served(vip, Duration::from_secs(10));
    println!(
        "config lost → VIP served again {:?} after the agent came back",
        lost.elapsed().min(took + Duration::from_secs(1))
    );
    // Repaired in place: no failover.
    let a = rig.get(&format!("/v2/octavia/amphorae/{carrier}")).body["amphora"].clone();
    assert_eq!(a["status"], "ALLOCATED", "{a}");
    assert_eq!(a["loadbalancer_id"], Value::from(lb.clone()), "{a}");
    let sp = rig.get(&format!("/v2/octavia/amphorae/{spare}")).body["amphora"].clone();
    assert_eq!(sp["status"], "READY", "{sp}");
    assert!(metric(rig, "siphon_control_repairs_total") > repairs);
    assert_eq!(metric(rig, "siphon_control_failovers_total"), 0.0);
    rig.wait_field(
        &path,
        "loadbalancer",
        "operating_status",
        "ONLINE",
        Duration::from_secs(5),
    );
}

#[test]
fn idle_connections_cannot_freeze_the_api_nor_stop_a_failover() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &mut Rig::new("idle", &["amp-i1", "amp-i2"]);
    let rt = rig.rt.clone();
    let b1 = Backend::start(&rt, "b1", "127.0.0.1");
    let b2 = Backend::start(&rt, "b2", "127.0.0.1");
    let port = free_port();
    let (lb, ..) = rig.build_lb(&[&b1, &b2], port);
    let vip = vip(rig, port);
    wait_served(vip, Duration::from_secs(5));
    let api = rig.handle.as_ref().unwrap().addr;

    // 1,100 connections that never send a byte: more than the API's cap
    // (1,000 by default).
    let idle: Vec<TcpStream> = (0..1_100)
        .map(|_| TcpStream::connect(api).unwrap())
        .collect();
    let start = Instant::now();
    let a = rig.get(&format!("/v2/lbaas/loadbalancers/{lb}"));
    assert_eq!(a.status, 200, "{}", a.body);
    println!(
        "API answered in {:?} beside 1,100 idle connections",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    // A failover still gets its pushes through.
    let (c, s) = carrier_and_spare(rig, &lb);
    let spare = rig.amphorae[s].id.clone();
    rig.amphorae[c].kill();
    rig.wait_field(
        &format!("/v2/octavia/amphorae/{spare}"),
        "amphora",
        "status",
        "ALLOCATED",
        Duration::from_secs(10),
    );
    rig.wait_active(&lb);
    wait_served(vip, Duration::from_secs(10));

    // The oldest idle connections were closed to make room.
    let closed = idle
        .into_iter()
        .take(200)
        .filter(|mut c| {
            c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            match c.read(&mut [0u8; 1]) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .count();
    assert!(closed > 0, "no idle connection was closed");
}
