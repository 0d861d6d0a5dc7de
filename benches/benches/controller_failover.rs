//! Three controllers on one PostgreSQL, hearing `AMPHORAE` (1,000)
//! simulated amphorae that each send a signed heartbeat every second to
//! all three, as agents do:
//!
//! - each controller's CPU while it hears them (`STEADY_S`, 20 s, after
//!   `WARMUP_S`, 10 s), from its runtime's threads in `/proc/self/task`
//!   (each controller runs on a runtime of its own whose threads carry its
//!   name);
//! - the time from an amphora's last heartbeat to its failover being
//!   decided (the amphora `ERROR`, a spare carrying its load balancer),
//!   for `VICTIMS` (5) amphorae silenced one after another, seen through
//!   one controller's API polled every 5 ms.
//!
//! The amphorae exist only as heartbeats: the store holds them (each
//! `ALLOCATED` to a load balancer of its own, its own heartbeat key held,
//! generation 1, its VIP) and the beats report exactly that, so no
//! controller finds anything to repair. Their agents' port refuses
//! connections, so a failover's push to the spare fails after the
//! decision, which is what is timed.
//!
//! `cargo bench -p siphon-benches --bench controller_failover` (as root:
//! the PostgreSQL server runs as `postgres`).
#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench stops on a broken fixture

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use siphon_benches::control_fixture::*;
use siphon_control::config::{AgentTls, Cluster, ControlConfig, Health, Push};
use siphon_control::store::{Database, Object, Op};
use siphon_proto::heartbeat::{self, Heartbeat, ListenerBeat};
use siphon_proto::keys::PushedKey;
use siphon_proto::status::OperatingStatus;
use siphon_testkit::pki::Ca;

const NAMES: [&str; 3] = ["ctl-a", "ctl-b", "ctl-c"];

/// One simulated amphora: what its heartbeats say.
struct Amp {
    id: String,
    listener: String,
    vip: String,
    key: PushedKey,
}

/// `n` amphorae, each carrying a load balancer of its own (one listener),
/// and `spares` spare amphorae; all with their own keys.
fn fleet(n: usize, spares: usize) -> (Vec<Op>, Vec<Amp>) {
    let mut ops = Vec::new();
    let mut amps = Vec::new();
    let created = time_of(1_700_000_000);
    for i in 0..n + spares {
        let secret: [u8; 32] = std::array::from_fn(|b| (i * 31 + b * 7) as u8 ^ 0x5a);
        let key = PushedKey::new(1, secret).expect("key");
        let amp_id = id(6, i);
        let carries = i < n;
        let (lb, listener) = (id(1, i), id(2, i));
        let vip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
        if carries {
            ops.push(Op::Put(Box::new(Object::LoadBalancer(object(with(
                common(&lb, format!("lb-{i}"), &created),
                json!({
                    "vip_address": vip, "vip_subnet_id": "bench-subnet",
                    "vip_network_id": "bench-net", "vip_port_id": id(9, i),
                    "vip_qos_policy_id": null, "provider": "siphon", "flavor_id": "",
                    "availability_zone": null, "topology": "SINGLE", "amphora_count": 1,
                }),
            ))))));
            ops.push(Op::Put(Box::new(Object::Listener(object(with(
                common(&listener, format!("listener-{i}"), &created),
                json!({"load_balancer_id": lb, "protocol": "TCP", "protocol_port": 80,
                       "connection_limit": -1, "default_pool_id": null,
                       "timeout_client_data": 50000, "timeout_member_connect": 5000,
                       "timeout_member_data": 50000, "timeout_tcp_inspect": 0,
                       "allowed_cidrs": []}),
            ))))));
        }
        let vips = if carries { vec![vip.clone()] } else { vec![] };
        let mut a = amphora(
            &amp_id,
            carries.then_some(lb.as_str()),
            u64::from(carries),
            &vips,
        );
        a["heartbeat_key"] = serde_json::to_value(&key).expect("key");
        a["heartbeat_key_acked"] = json!(true);
        ops.push(Op::Put(Box::new(Object::Amphora(object(a)))));
        amps.push(Amp {
            id: amp_id,
            listener: if carries { listener } else { String::new() },
            vip: if carries {
                format!("{vip}/32")
            } else {
                String::new()
            },
            key,
        });
    }
    (ops, amps)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The signed heartbeat `a` sends now.
fn beat(a: &Amp, seq: u64) -> Vec<u8> {
    let carries = !a.listener.is_empty();
    let b = Heartbeat {
        amphora_id: a.id.clone(),
        seq,
        sent_ms: now_ms(),
        generation: Some(u64::from(carries)),
        persisted_generation: carries.then_some(1),
        listeners: if carries {
            vec![ListenerBeat {
                id: a.listener.clone(),
                operating_status: OperatingStatus::Online,
                active_connections: 0,
                total_connections: 0,
                bytes_in: 0,
                bytes_out: 0,
            }]
        } else {
            vec![]
        },
        members: vec![],
        truncated: false,
        vips: carries.then(|| vec![a.vip.clone()]),
        bgp: None,
    };
    heartbeat::seal(&heartbeat::key(a.key.secret()), a.key.key_id, &b)
}

/// `[health]` as an empty table in the config gives it: every default.
fn default_health() -> Health {
    serde_json::from_value(json!({})).expect("health defaults")
}

/// A controller of the three: agents (whose port refuses) over mutual
/// TLS, the health manager with its defaults, one push attempt.
fn config(name: &str, db: &Database, dir: &std::path::Path) -> ControlConfig {
    ControlConfig {
        agent_tls: Some(AgentTls {
            cert: dir.join("client.crt"),
            key: dir.join("client.key"),
            ca: dir.join("amphora-ca.crt"),
        }),
        push: Push {
            attempts: 1,
            backoff_ms: 100,
            timeout_ms: 1_000,
        },
        health: Some(Health {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..default_health()
        }),
        cluster: Cluster {
            name: Some(name.into()),
            ..Cluster::default()
        },
        ..control_config(db.clone())
    }
}

fn main() {
    let n = env("AMPHORAE", 1_000);
    let victims = env("VICTIMS", 5);
    let warmup = Duration::from_secs(env("WARMUP_S", 10) as u64);
    let steady = Duration::from_secs(env("STEADY_S", 20) as u64);
    let Some((pg, db)) = postgres("controller_failover") else {
        return;
    };
    let dir = siphon_testkit::TempDir::new("failover-bench");
    let ca = Ca::new("amphora CA");
    ca.issue_to(
        &["siphon-control"],
        &dir.path("client.crt"),
        &dir.path("client.key"),
    );
    std::fs::write(dir.path("amphora-ca.crt"), ca.pem()).expect("ca");

    let (ops, amps) = fleet(n, victims + 5);
    let setup = tokio::runtime::Runtime::new().expect("runtime");
    store(&setup, &db, &ops);

    // Each controller on a runtime of its own, whose threads carry its
    // name: their CPU is told apart.
    let controllers: Vec<(tokio::runtime::Runtime, siphon_control::Handle)> = NAMES
        .iter()
        .map(|name| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(*name)
                .enable_all()
                .build()
                .expect("runtime");
            let h = rt
                .block_on(siphon_control::start(config(name, &db, &dir.0)))
                .expect("controller");
            (rt, h)
        })
        .collect();
    let to: Vec<SocketAddr> = controllers
        .iter()
        .map(|(_, h)| h.heartbeat_addr.expect("heartbeat listener"))
        .collect();
    let api = controllers[0].1.addr;

    // Every amphora beats once a second, spread over the second; a
    // silenced one stops (its last beat's time is kept).
    let silenced: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; amps.len()]));
    let mute: Arc<Mutex<Vec<bool>>> = Arc::new(Mutex::new(vec![false; amps.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (silenced, mute, stop) = (silenced.clone(), mute.clone(), stop.clone());
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
            let start = Instant::now();
            let mut seq = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let mut sent = 0u64;
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for (i, a) in amps.iter().enumerate() {
                    // Beat i of round r is due at r s + i/len s.
                    let due = Duration::from_secs(u64::from(round))
                        + Duration::from_secs(1) * i as u32 / amps.len() as u32;
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    if mute.lock().unwrap()[i] {
                        continue;
                    }
                    seq += 1;
                    let d = beat(a, seq);
                    for t in &to {
                        let _ = sock.send_to(&d, t);
                    }
                    sent += 1;
                    silenced.lock().unwrap()[i] = Some(Instant::now());
                }
                round += 1;
            }
            sent
        })
    };

    std::thread::sleep(warmup);
    let cpu0: Vec<Duration> = NAMES.iter().map(|n| threads_cpu(n)).collect();
    let t0 = Instant::now();
    std::thread::sleep(steady);
    let wall = t0.elapsed();
    let cpu: Vec<f64> = NAMES
        .iter()
        .zip(&cpu0)
        .map(|(n, c)| (threads_cpu(n) - *c).as_secs_f64() / wall.as_secs_f64() * 100.0)
        .collect();
    let mut conn = Conn::open(api);
    let (status, _) = conn.get("/v2/octavia/amphorae?limit=1");
    assert_eq!(status, 200);
    let errors_before = count_errors(&mut conn);
    assert_eq!(
        errors_before, 0,
        "amphorae failed over before any was silenced"
    );

    // Silence amphorae one at a time; time from the last beat each sent
    // to its failover, as the API shows it.
    let mut took = Vec::new();
    for v in 0..victims {
        let i = v * (n / victims.max(1));
        mute.lock().unwrap()[i] = true;
        // The beat in flight when muted may still go: wait one round.
        std::thread::sleep(Duration::from_millis(50));
        let last = silenced.lock().unwrap()[i].expect("it beat");
        let path = format!("/v2/octavia/amphorae/{}", id(6, i));
        loop {
            let (status, body) = get_json(&mut conn, &path);
            assert_eq!(status, 200);
            if body["amphora"]["status"] == "ERROR" {
                took.push(last.elapsed());
                break;
            }
            assert!(
                last.elapsed() < Duration::from_secs(60),
                "{path} not failed over: {body}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    let failed_over = count_errors(&mut conn);

    let h = default_health();
    println!("\n## Three controllers on PostgreSQL, {n} amphorae heartbeating every second\n");
    println!(
        "heartbeat_timeout {} ms, check_interval {} ms; {sent} heartbeats sent (each to all three); {failed_over} amphorae failed over ({victims} silenced)\n",
        h.heartbeat_timeout_ms, h.check_interval_ms
    );
    println!(
        "| controller | CPU, % of one core ({} s) |\n|---|---:|",
        steady.as_secs()
    );
    for (name, c) in NAMES.iter().zip(&cpu) {
        println!("| {name} | {c:.1} |");
    }
    println!(
        "\neach, in order: {}",
        took.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    took.sort();
    println!(
        "\nlast heartbeat → failover decided: min {:.2} s, median {:.2} s, max {:.2} s (target ≤ {:.2} s)",
        took.first().map_or(0.0, Duration::as_secs_f64),
        took.get(took.len() / 2).map_or(0.0, Duration::as_secs_f64),
        took.last().map_or(0.0, Duration::as_secs_f64),
        (h.heartbeat_timeout_ms + h.check_interval_ms) as f64 / 1000.0
    );
    for (rt, handle) in controllers {
        rt.block_on(handle.stop());
    }
    drop(pg);
}

/// The status and JSON body of `GET path`.
fn get_json(conn: &mut Conn, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = conn.get_body(path);
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// How many amphorae are `ERROR`.
fn count_errors(conn: &mut Conn) -> usize {
    let (_, body) = get_json(conn, "/v2/octavia/amphorae?status=ERROR");
    body["amphorae"].as_array().map_or(0, Vec::len)
}
