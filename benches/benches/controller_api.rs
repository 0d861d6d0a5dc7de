//! `siphon-control`'s API at scale, over loopback HTTP: a controller whose
//! store holds `LBS` load balancers (10,000 by default), each with two
//! listeners, two pools (a health monitor each) and four members, written
//! straight into SQLite in one transaction and loaded by the real
//! controller (`siphon_control::start`), then:
//!
//! - `get_one`: `GET /v2/lbaas/loadbalancers/{id}` (a different load
//!   balancer each time), one keep-alive connection;
//! - `list_100`: `GET /v2/lbaas/loadbalancers?limit=100&marker=...` (a page
//!   somewhere in the store each time);
//! - throughput: `CLIENTS` (8) keep-alive clients on their own threads for
//!   `SECONDS` (5) each, on `get_one` and on `list_100`;
//! - `create`: `POST /v2/lbaas/loadbalancers`, `CREATES` (1,000) of them
//!   over `CLIENTS` clients, each taking one of as many spare amphorae
//!   (in the fixture; no agents run, so they stay `PENDING_CREATE`).
//!
//! `STORE=postgres` runs the same on a throwaway PostgreSQL server
//! (`siphon_testkit::postgres`: Debian's `postgresql`, as root) instead
//! of an SQLite file.
//!
//! Criterion times each request; the p50/p99 printed in the summary are
//! over every request criterion made. Run with
//! `cargo bench -p siphon-benches --bench controller_api`; environment:
//! `LBS`, `CLIENTS`, `SECONDS`, `MEASURE_S` (criterion's measurement time,
//! 5), `CREATES`, `STORE` (`sqlite` or `postgres`).
#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench stops on a broken fixture

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use serde_json::json;
use siphon_benches::control_fixture::*;
use siphon_control::store::{Database, Object, Op};

/// Every object of `n` load balancers, in parent-first order.
fn fixture(n: usize) -> Vec<Op> {
    let mut ops = Vec::with_capacity(n * 11);
    for i in 0..n {
        // One created a second, as if over a few hours.
        let t = 1_700_000_000 + i as i64;
        let created = time_of(t);
        let lb = id(1, i);
        ops.push(Op::Put(Box::new(Object::LoadBalancer(object(with(
            common(&lb, format!("lb-{i}"), &created),
            json!({
                "vip_address": format!("198.18.{}.{}", i / 250, i % 250 + 1),
                "vip_subnet_id": "bench-subnet", "vip_network_id": "bench-net",
                "vip_port_id": id(9, i), "vip_qos_policy_id": null, "provider": "siphon",
                "flavor_id": "", "availability_zone": null, "topology": "SINGLE",
                "amphora_count": 1,
            }),
        ))))));
        for k in 0..2 {
            let pool = id(3, i * 2 + k);
            ops.push(Op::Put(Box::new(Object::Pool(object(with(
                common(&pool, format!("pool-{i}-{k}"), &created),
                json!({"load_balancer_id": lb, "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
                       "session_persistence": null}),
            ))))));
            ops.push(Op::Put(Box::new(Object::Listener(object(with(
                common(&id(2, i * 2 + k), format!("listener-{i}-{k}"), &created),
                json!({"load_balancer_id": lb, "protocol": "TCP", "protocol_port": 80 + k,
                       "connection_limit": -1, "default_pool_id": pool,
                       "timeout_client_data": 50000, "timeout_member_connect": 5000,
                       "timeout_member_data": 50000, "timeout_tcp_inspect": 0,
                       "allowed_cidrs": []}),
            ))))));
            ops.push(Op::Put(Box::new(Object::HealthMonitor(object(with(
                common(&id(5, i * 2 + k), String::new(), &created),
                json!({"load_balancer_id": lb, "pool_id": pool, "type": "TCP", "delay": 5,
                       "timeout": 5, "max_retries": 3, "max_retries_down": 3,
                       "http_method": null, "url_path": null, "expected_codes": null,
                       "http_version": null, "domain_name": null}),
            ))))));
            for m in 0..2 {
                ops.push(Op::Put(Box::new(Object::Member(object(with(
                    common(&id(4, i * 4 + k * 2 + m), String::new(), &created),
                    json!({"load_balancer_id": lb, "pool_id": pool,
                           "address": format!("10.{}.{}.{}", i / 250 % 250, i % 250, m + 10),
                           "protocol_port": 8080, "weight": 1, "backup": false,
                           "subnet_id": null, "monitor_address": null, "monitor_port": null}),
                ))))));
            }
        }
    }
    ops
}

/// `n` spare amphorae (`READY`, carrying nothing) for the creates.
fn spares(n: usize) -> Vec<Op> {
    (0..n)
        .map(|i| {
            Op::Put(Box::new(Object::Amphora(object(amphora(
                &id(6, i),
                None,
                0,
                &[],
            )))))
        })
        .collect()
}

/// The path of the `i`-th request of a kind.
fn path(kind: &str, ids: &[String], i: usize) -> String {
    // Spread over the store, not in id order.
    let k = (i.wrapping_mul(7919)) % ids.len();
    match kind {
        "get_one" => format!("/v2/lbaas/loadbalancers/{}", ids[k]),
        _ => format!("/v2/lbaas/loadbalancers?limit=100&marker={}", ids[k]),
    }
}

/// CPU time the controller's runtime threads (`tokio-rt-worker`) have
/// used, from `/proc/self/task/*/stat` (utime + stime, in clock ticks of
/// 10 ms): the clients share the machine, so this says what the
/// controller itself costs per request.
fn server_cpu() -> Duration {
    threads_cpu("tokio-rt-worker")
}

/// `clients` keep-alive clients for `seconds`: requests/s, and the
/// controller's CPU time per request.
fn throughput(
    addr: SocketAddr,
    kind: &'static str,
    ids: &Arc<Vec<String>>,
    clients: usize,
    seconds: u64,
) -> (f64, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, done, ids) = (stop.clone(), done.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                let mut i = c * 1_000_003;
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = conn.get(&path(kind, &ids, i));
                    assert_eq!(status, 200);
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    let t = Instant::now();
    let cpu = server_cpu();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let cpu = server_cpu().saturating_sub(cpu);
    let wall = t.elapsed().as_secs_f64();
    for t in threads {
        t.join().expect("client thread");
    }
    (n as f64 / wall, cpu / n.max(1) as u32)
}

/// `n` load balancer creates over `clients` keep-alive clients: every
/// request's latency (sorted), and creates/s.
fn creates(addr: SocketAddr, n: usize, clients: usize) -> (Vec<Duration>, f64) {
    let t = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                let mut mine = Vec::new();
                for i in (c..n).step_by(clients) {
                    let body = format!(
                        r#"{{"loadbalancer": {{"name": "new-{i}", "vip_subnet_id": "bench-subnet"}}}}"#
                    );
                    let t = Instant::now();
                    let (status, _) = conn.post("/v2/lbaas/loadbalancers", &body);
                    mine.push(t.elapsed());
                    assert_eq!(status, 201, "create {i}");
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let rate = all.len() as f64 / t.elapsed().as_secs_f64();
    all.sort();
    (all, rate)
}

fn main() {
    let n = env("LBS", 10_000);
    let clients = env("CLIENTS", 8);
    let seconds = env("SECONDS", 5) as u64;
    let measure = env("MEASURE_S", 5) as u64;

    let dir = std::env::temp_dir().join(format!("siphon-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let n_creates = env("CREATES", 1_000);
    let on_postgres = std::env::var("STORE").is_ok_and(|s| s == "postgres");
    // The server lives until the end of the run (stopped and removed on
    // drop).
    let mut server = None;
    let db = if on_postgres {
        let Some((pg, db)) = postgres("controller_api") else {
            return;
        };
        server = Some(pg);
        db
    } else {
        Database::Sqlite(dir.join("control.db"))
    };
    let t = Instant::now();
    let mut ops = fixture(n);
    ops.extend(spares(n_creates));
    let objects = ops.len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    store(&rt, &db, &ops);
    drop(ops);
    let stored = t.elapsed();
    let config = control_config(db.clone());
    let t = Instant::now();
    let handle = rt
        .block_on(siphon_control::start(config))
        .expect("controller");
    let loaded = t.elapsed();
    let addr = handle.addr;
    let ids: Arc<Vec<String>> = Arc::new((0..n).map(|i| id(1, i)).collect());

    let mut conn = Conn::open(addr);
    let (status, len) = conn.get(&path("list_100", &ids, 1));
    assert_eq!(status, 200, "list answered {status}");
    let (status, _) = conn.get(&path("get_one", &ids, 1));
    assert_eq!(status, 200, "get answered {status}");

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(measure));
    let mut latencies = Vec::new();
    for kind in ["get_one", "list_100"] {
        let samples: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let mut i = 0usize;
        let mut g = c.benchmark_group(format!("controller_api_{n}_lbs"));
        // Flat: the same number of requests per sample, so that a slow
        // controller (the 'before' figures) still finishes in minutes.
        g.sampling_mode(SamplingMode::Flat);
        g.bench_function(kind, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut mine = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    let p = path(kind, &ids, i);
                    i += 1;
                    let t = Instant::now();
                    let (status, _) = conn.get(&p);
                    let d = t.elapsed();
                    assert_eq!(status, 200);
                    total += d;
                    mine.push(d);
                }
                samples.lock().expect("samples").extend(mine);
                total
            })
        });
        g.finish();
        let mut s = std::mem::take(&mut *samples.lock().expect("samples"));
        s.sort();
        latencies.push((kind, s));
    }
    let rates: Vec<(&str, (f64, Duration))> = ["get_one", "list_100"]
        .into_iter()
        .map(|kind| (kind, throughput(addr, kind, &ids, clients, seconds)))
        .collect();
    c.final_summary();
    let (created, create_rate) = creates(addr, n_creates, clients);

    let backend = if on_postgres { "PostgreSQL" } else { "SQLite" };
    println!("\n## siphon-control API on {backend}, {n} load balancers ({objects} objects)\n");
    println!(
        "stored in {:.1} s, loaded by the controller in {:.1} s; a page of 100: {len} bytes\n",
        stored.as_secs_f64(),
        loaded.as_secs_f64()
    );
    println!(
        "| request | p50 | p99 | requests | {clients} clients, req/s | controller CPU/request | req/s per 2 cores of controller CPU |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for ((kind, s), (_, (rate, cpu))) in latencies.iter().zip(&rates) {
        println!(
            "| {kind} | {:.2} ms | {:.2} ms | {} | {rate:.0} | {:.3} ms | {:.0} |",
            ms(percentile(s, 0.5)),
            ms(percentile(s, 0.99)),
            s.len(),
            ms(*cpu),
            2.0 / cpu.as_secs_f64().max(1e-9)
        );
    }
    println!(
        "| create | {:.2} ms | {:.2} ms | {} | {create_rate:.0} | | |",
        ms(percentile(&created, 0.5)),
        ms(percentile(&created, 0.99)),
        created.len()
    );
    rt.block_on(handle.stop());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
