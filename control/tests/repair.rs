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

/// A rig whose load balancer serves two backends through its VIP.
struct Served {
    rig: Rig,
    lb: String,
    vip: SocketAddr,
    _backends: [Backend; 2],
}

impl Served {
    fn new(tag: &str, amphorae: &[&str]) -> Served {
        let rig = Rig::new(tag, amphorae);
        let rt = rig.rt.clone();
        let backends = [
            Backend::start(&rt, "b1", "127.0.0.1"),
            Backend::start(&rt, "b2", "127.0.0.1"),
        ];
        let port = free_port();
        let (lb, ..) = rig.build_lb(&[&backends[0], &backends[1]], port);
        let vip = format!("{}.1:{port}", rig.vip_net).parse().unwrap();
        wait_served(vip, Duration::from_secs(5));
        Served {
            rig,
            lb,
            vip,
            _backends: backends,
        }
    }
}

impl Served {
    /// Once the load balancer is `ONLINE`: the index and id of the
    /// amphora carrying it, and the spare's id.
    fn online_pair(&self) -> (usize, String, String) {
        self.rig.wait_field(
            &format!("/v2/lbaas/loadbalancers/{}", self.lb),
            "loadbalancer",
            "operating_status",
            "ONLINE",
            Duration::from_secs(5),
        );
        let (c, s) = carrier_and_spare(&self.rig, &self.lb);
        let ids = (
            self.rig.amphorae[c].id.clone(),
            self.rig.amphorae[s].id.clone(),
        );
        (c, ids.0, ids.1)
    }
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
    find_metric(&scrape(rig), name)
}

/// A series with one `result` label.
fn metric_labeled(rig: &Rig, name: &str, result: &str) -> f64 {
    find_metric(&scrape(rig), &format!("{name}{{result=\"{result}\"}}"))
}

fn find_metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not on the page:\n{page}"))
}

fn scrape(rig: &Rig) -> String {
    rig.rt
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
        .unwrap()
}

#[test]
fn a_spare_whose_dataplane_was_down_during_failover_is_healed_without_a_call() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let mut served = Served::new("heal", &["amp-h1", "amp-h2"]);
    let (rig, lb, vip) = (&mut served.rig, served.lb.clone(), served.vip);
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
    let mut served = Served::new("lost", &["amp-l1", "amp-l2"]);
    let (c, carrier, spare) = served.online_pair();
    let (rig, lb, vip) = (&mut served.rig, served.lb.clone(), served.vip);
    let path = format!("/v2/lbaas/loadbalancers/{lb}");
    let repairs = metric(rig, "siphon_control_repairs_total");

    // Everything the amphora knew is gone; the agent comes back empty.
    let amp = &mut rig.amphorae[c];
    amp.stop_agent();
    amp.start_dataplane();
    std::fs::remove_dir_all(&amp.state_dir).unwrap();
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
    let mut served = Served::new("idle", &["amp-i1", "amp-i2"]);
    let (rig, lb, vip) = (&mut served.rig, served.lb.clone(), served.vip);
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

/// Waits until every amphora of the rig holds its own heartbeat key.
fn wait_keys_held(rig: &Rig) {
    let start = Instant::now();
    for a in &rig.amphorae {
        loop {
            let v = rig.get(&format!("/v2/octavia/amphorae/{}", a.id)).body["amphora"].clone();
            if v["heartbeat_key_acked"] == true {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Calls `send` until `amphora` is failed over (at most 10 s); how long
/// that took.
fn failed_over_despite(rig: &Rig, amphora: &str, what: &str, mut send: impl FnMut()) -> Duration {
    let start = Instant::now();
    loop {
        send();
        let a = rig.get(&format!("/v2/octavia/amphorae/{amphora}")).body["amphora"].clone();
        if a["status"] == "ERROR" {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} kept {amphora} alive: {a}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn seq_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[test]
fn a_heartbeat_signed_with_another_amphoras_key_is_refused() {
    use siphon_proto::heartbeat::{key, seal, Heartbeat};
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let mut served = Served::new("forge", &["amp-f1", "amp-f2"]);
    let (rig, lb) = (&mut served.rig, served.lb.clone());
    wait_keys_held(rig);
    let (c, s) = carrier_and_spare(rig, &lb);
    let carrier = rig.amphorae[c].id.clone();
    // The spare's own key, as its agent keeps it; and the fleet's
    // bootstrap key.
    let held: Value = serde_json::from_slice(
        &std::fs::read(rig.amphorae[s].state_dir.join("heartbeat-key.json")).unwrap(),
    )
    .unwrap();
    let spare_key_id = held["key_id"].as_u64().unwrap() as u32;
    let spare_secret: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&held["key"].as_str().unwrap()[i * 2..i * 2 + 2], 16).unwrap())
        .collect();
    let bootstrap = std::fs::read_to_string(&rig.amphorae[c].heartbeat_key)
        .unwrap()
        .trim()
        .to_owned();
    let hb = rig.handle.as_ref().unwrap().heartbeat_addr.unwrap();
    let before = metric_labeled(rig, "siphon_control_heartbeats_total", "rejected");

    // The carrier dies; the spare's holder (or anyone with the bootstrap
    // key) tries to keep it "alive".
    rig.amphorae[c].kill();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let forge = |k: &[u8], id: u32| {
        let now = std::time::SystemTime::now();
        let beat = Heartbeat {
            amphora_id: carrier.clone(),
            seq: seq_now(),
            sent_ms: now
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
            generation: Some(u64::MAX / 4),
            persisted_generation: Some(u64::MAX / 4),
            listeners: vec![],
            members: vec![],
            truncated: false,
            vips: None,
            bgp: None,
        };
        sock.send_to(&seal(&key(k), id, &beat), hb).unwrap();
    };
    let mut sent = 0;
    let took = failed_over_despite(rig, &carrier, "forged heartbeats", || {
        forge(&spare_secret, spare_key_id);
        forge(bootstrap.as_bytes(), 0);
        sent += 2;
    });
    println!("{carrier} failed over {took:?} after its death despite {sent} forged heartbeats");
    let after = metric_labeled(rig, "siphon_control_heartbeats_total", "rejected");
    assert!(
        after - before >= sent as f64 - 2.0,
        "{before} → {after} of {sent}"
    );
    rig.wait_active(&lb);
}

#[test]
fn a_captured_heartbeat_replayed_after_a_controller_restart_is_refused() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let mut served = Served::new("replay", &["amp-r1", "amp-r2"]);
    let (rig, lb) = (&mut served.rig, served.lb.clone());
    wait_keys_held(rig);
    let (c, _) = carrier_and_spare(rig, &lb);
    let carrier = rig.amphorae[c].id.clone();

    // A copy of every heartbeat the carrier sends, as a listener on the
    // path would capture it.
    let capture = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    capture
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let amp = &mut rig.amphorae[c];
    amp.heartbeat_to.push(capture.local_addr().unwrap());
    amp.start_agent();
    let mut captured = Vec::new();
    let mut buf = [0u8; 65_536];
    let start = Instant::now();
    while captured.len() < 10 && start.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = capture.recv(&mut buf) {
            captured.push(buf[..n].to_vec());
        }
    }
    assert_eq!(captured.len(), 10);

    // The carrier dies, the controller restarts, and the captured
    // heartbeats are replayed: none may keep the carrier alive.
    rig.amphorae[c].kill();
    rig.restart();
    let hb = rig.handle.as_ref().unwrap().heartbeat_addr.unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let took = failed_over_despite(rig, &carrier, "replayed heartbeats", || {
        for d in &captured {
            sock.send_to(d, hb).unwrap();
        }
    });
    println!("{carrier} failed over {took:?} after the restart despite replays");
    assert!(metric_labeled(rig, "siphon_control_heartbeats_total", "rejected") >= 10.0);
    rig.wait_active(&lb);
}

#[test]
fn a_corrupt_agent_state_file_leaves_the_agent_up_and_the_amphora_repaired_without_failover() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let mut served = Served::new("corrupt", &["amp-c1", "amp-c2"]);
    let (c, carrier, spare) = served.online_pair();
    let (rig, lb, vip) = (&mut served.rig, served.lb.clone(), served.vip);
    let repairs = metric(rig, "siphon_control_repairs_total");

    // The agent restarts over a config file that does not parse.
    let amp = &mut rig.amphorae[c];
    let state = amp.state_dir.clone();
    amp.stop_agent();
    std::fs::write(state.join("config.json"), b"{ half a config").unwrap();
    amp.start_agent();
    assert_eq!(
        std::fs::read(state.join("config.json.corrupt")).unwrap(),
        b"{ half a config",
        "the bad file is kept aside"
    );
    // It reports that it keeps no config; the controller pushes it again.
    let start = Instant::now();
    while metric(rig, "siphon_control_repairs_total") <= repairs
        || siphon_proto::Config::load(&state.join("config.json")).is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not repaired: the agent keeps no config"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("corrupt agent state repaired in {:?}", start.elapsed());
    wait_served(vip, Duration::from_secs(5));
    let a = rig.get(&format!("/v2/octavia/amphorae/{carrier}")).body["amphora"].clone();
    assert_eq!(a["status"], "ALLOCATED", "{a}");
    assert_eq!(a["loadbalancer_id"], Value::from(lb.clone()), "{a}");
    let sp = rig.get(&format!("/v2/octavia/amphorae/{spare}")).body["amphora"].clone();
    assert_eq!(sp["status"], "READY", "{sp}");
    assert_eq!(metric(rig, "siphon_control_failovers_total"), 0.0);
}

/// Whether `ip` is on `lo` (as a host address or with any prefix).
fn on_lo(ip: std::net::IpAddr) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("inet {ip}/"))
}

/// Polls until `f` says yes; panics with `what` after `limit`. How long it
/// took.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

#[test]
fn a_vip_deleted_from_the_amphoras_interface_is_put_back_by_a_re_push_without_failover() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let mut served = Served::new("vipgone", &["amp-v1", "amp-v2"]);
    let (c, carrier, spare) = served.online_pair();
    let (rig, lb, vip) = (&mut served.rig, served.lb.clone(), served.vip);
    let path = format!("/v2/lbaas/loadbalancers/{lb}");
    let amp_path = format!("/v2/octavia/amphorae/{carrier}");
    assert!(on_lo(vip.ip()), "the VIP is plumbed on lo");
    let failovers = metric(rig, "siphon_control_failovers_total");
    // Back ONLINE, counted in step, and the amphora's error cleared.
    let in_step_again = |rig: &Rig| {
        rig.wait_field(
            &path,
            "loadbalancer",
            "operating_status",
            "ONLINE",
            Duration::from_secs(5),
        );
        until(Duration::from_secs(5), "in step again", || {
            metric(rig, "siphon_control_amphorae_out_of_step") == 0.0
                && rig.get(&amp_path).body["amphora"]["error"].is_null()
        });
    };
    let in_place = |rig: &Rig| {
        let a = rig.get(&amp_path).body["amphora"].clone();
        assert_eq!(a["status"], "ALLOCATED", "{a}");
        assert_eq!(a["loadbalancer_id"], Value::from(lb.clone()), "{a}");
        let sp = rig.get(&format!("/v2/octavia/amphorae/{spare}")).body["amphora"].clone();
        assert_eq!(sp["status"], "READY", "{sp}");
        assert!(sp["loadbalancer_id"].is_null(), "{sp}");
        assert_eq!(metric(rig, "siphon_control_failovers_total"), failovers);
    };
    let delete = || {
        let st = std::process::Command::new("ip")
            .args(["addr", "del", &format!("{}/32", vip.ip()), "dev", "lo"])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(!on_lo(vip.ip()));
    };

    // 1. Someone deletes the VIP from the amphora's interface: its next
    // heartbeat says so, and the controller pushes it again, in place.
    // (Past the second after the last push, when reports are judged.)
    std::thread::sleep(Duration::from_millis(1_200));
    let repairs = metric(rig, "siphon_control_repairs_total");
    delete();
    let back = until(Duration::from_secs(5), "the VIP put back on lo", || {
        on_lo(vip.ip())
    });
    let served_in = wait_served(vip, Duration::from_secs(5));
    println!("VIP deleted by hand → back on lo in {back:?}, served {served_in:?} later");
    assert!(metric(rig, "siphon_control_repairs_total") > repairs);
    in_place(rig);
    in_step_again(rig);

    // 2. Again, while every connection slot of its agent is taken, so the
    // re-push waits: meanwhile the amphora says what is wrong, it counts
    // as out of step, and its load balancer's VIP is not served.
    let agent = SocketAddr::from(([127, 0, 0, 1], rig.amphorae[c].port()));
    let slots: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(agent).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let repairs = metric(rig, "siphon_control_repairs_total");
    delete();
    until(Duration::from_secs(3), "the reason shown", || {
        rig.get(&amp_path).body["amphora"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("does not hold the VIP {}", vip.ip())))
    });
    until(Duration::from_secs(2), "counted out of step", || {
        metric(rig, "siphon_control_amphorae_out_of_step") == 1.0
    });
    rig.wait_field(
        &path,
        "loadbalancer",
        "operating_status",
        "ERROR",
        Duration::from_secs(2),
    );
    drop(slots);
    let back = until(Duration::from_secs(5), "the VIP put back on lo", || {
        on_lo(vip.ip())
    });
    println!("agent free again → VIP back on lo in {back:?}");
    wait_served(vip, Duration::from_secs(5));
    assert!(metric(rig, "siphon_control_repairs_total") > repairs);
    in_step_again(rig);
    in_place(rig);
}

/// The amphora as the API shows it.
fn amphora(rig: &Rig, id: &str) -> Value {
    rig.get(&format!("/v2/octavia/amphorae/{id}")).body["amphora"].clone()
}

/// Rotates `id`'s heartbeat key through the API; the new key id.
fn rotate(rig: &Rig, id: &str) -> u64 {
    let a = rig.call(
        hyper::Method::PUT,
        &format!("/v2/octavia/amphorae/{id}/heartbeat_key"),
        None,
    );
    assert_eq!(a.status, 202, "{}", a.body);
    a.body["heartbeat_key_id"].as_u64().unwrap()
}

/// Watches an amphora for `d`, or until `done` says so: it must stay heard
/// (its last heartbeat under three intervals old), allocated to its load
/// balancer, and no heartbeat may be refused.
struct Heard<'a> {
    rig: &'a Rig,
    id: String,
    rejected: f64,
    /// The oldest `last_heartbeat_ms_ago` seen.
    worst: u64,
}

impl Heard<'_> {
    fn watch(&mut self, limit: Duration, what: &str, mut done: impl FnMut(&Value) -> bool) {
        let start = Instant::now();
        loop {
            let a = amphora(self.rig, &self.id);
            let ago = a["last_heartbeat_ms_ago"].as_u64().unwrap();
            self.worst = self.worst.max(ago);
            assert!(ago < 600, "{what}: {} unheard for {ago} ms: {a}", self.id);
            assert_eq!(a["status"], "ALLOCATED", "{what}: {a}");
            let rejected = metric_labeled(self.rig, "siphon_control_heartbeats_total", "rejected");
            assert_eq!(rejected, self.rejected, "{what}: heartbeats refused");
            if done(&a) {
                return;
            }
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}: {a}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn heartbeat_keys_rotated_under_live_heartbeats_drop_none() {
    if !root_or_skip("controller repair (VIPs are plumbed through netlink)") {
        return;
    }
    let served = Served::new("rotate", &["amp-k1", "amp-k2"]);
    let (rig, lb, vip) = (&served.rig, served.lb.clone(), served.vip);
    wait_keys_held(rig);
    let (c, _) = carrier_and_spare(rig, &lb);
    let carrier = rig.amphorae[c].id.clone();
    let held_key = |rig: &Rig| -> u64 {
        let held: Value = serde_json::from_slice(
            &std::fs::read(rig.amphorae[c].state_dir.join("heartbeat-key.json")).unwrap(),
        )
        .unwrap();
        held["key_id"].as_u64().unwrap()
    };
    let failovers = metric(rig, "siphon_control_failovers_total");
    let mut heard = Heard {
        rig,
        id: carrier.clone(),
        rejected: metric_labeled(rig, "siphon_control_heartbeats_total", "rejected"),
        worst: 0,
    };
    let mut key_id = amphora(heard.rig, &carrier)["heartbeat_key_id"]
        .as_u64()
        .unwrap();

    // Three rotations, each once the last one is held, heartbeats going on
    // every 200 ms throughout.
    for round in 1..=3 {
        let next = rotate(heard.rig, &carrier);
        assert_eq!(next, key_id + 1, "round {round}");
        key_id = next;
        let a = amphora(heard.rig, &carrier);
        assert_eq!(a["heartbeat_key_id"], key_id, "{a}");
        heard.watch(Duration::from_secs(5), "the new key held", |a| {
            a["heartbeat_key_acked"] == true
        });
        assert_eq!(held_key(heard.rig), key_id);
        // A few heartbeats under the new key.
        let until = Instant::now() + Duration::from_millis(700);
        heard.watch(
            Duration::from_secs(1),
            "heartbeats under the new key",
            |_| Instant::now() >= until,
        );
        assert_eq!(greetings(vip, 4).len(), 4);
        wait_served(vip, Duration::from_secs(2));
    }

    // Two more, back to back, while the agent cannot be reached to take
    // either (every connection slot of it taken), for longer than the
    // heartbeat timeout: it keeps signing with the key it holds, which
    // must still be taken.
    let agent = SocketAddr::from(([127, 0, 0, 1], heard.rig.amphorae[c].port()));
    let slots: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(agent).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = held_key(heard.rig);
    assert_eq!(rotate(heard.rig, &carrier), key_id + 1);
    assert_eq!(rotate(heard.rig, &carrier), key_id + 2);
    key_id += 2;
    let until = Instant::now() + Duration::from_millis(1_500);
    heard.watch(Duration::from_secs(3), "two rotations not held yet", |a| {
        assert_eq!(a["heartbeat_key_acked"], false, "{a}");
        Instant::now() >= until
    });
    assert_eq!(
        held_key(heard.rig),
        before,
        "the agent could not be reached"
    );
    drop(slots);
    heard.watch(Duration::from_secs(10), "the last key held", |a| {
        a["heartbeat_key_acked"] == true && a["heartbeat_key_id"] == key_id
    });
    assert_eq!(held_key(heard.rig), key_id);
    let until = Instant::now() + Duration::from_millis(700);
    heard.watch(
        Duration::from_secs(1),
        "heartbeats under the last key",
        |_| Instant::now() >= until,
    );
    let worst = heard.worst;
    let rig = heard.rig;
    println!("5 rotations: no heartbeat refused, heard at most {worst} ms ago");
    assert_eq!(metric(rig, "siphon_control_failovers_total"), failovers);
    let a = amphora(rig, &carrier);
    assert_eq!(a["loadbalancer_id"], Value::from(lb.clone()), "{a}");
    wait_served(vip, Duration::from_secs(2));
}
