//! Control-side benchmarks of siphon-dataplane, on loopback:
//!
//! 1. **Live apply**: a 1,000-listener config (1,000 pools of 2 members)
//!    applied to a running dataplane, then re-applied 50 times with member
//!    weights changed and one listener toggled, while client threads open
//!    connections through the listeners without pause. Reports apply times
//!    and failed connections (the target is zero).
//! 2. **Health thread CPU**: 1,000 members checked every second (TCP, then
//!    HTTP); the `siphon-health` thread's CPU time over the run, from
//!    `/proc/self/task/*/stat`.
//!
//! `cargo run --release -p siphon-benches --bin control-bench` (as root
//! the fd limit is raised as needed). Environment: `LISTENERS` (1000),
//! `APPLIES` (50), `MEMBERS` (1000), `SECONDS` (10) per health run,
//! `WORKERS` (nproc), `CLIENTS` (4).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use siphon_dataplane::{Config, Options, Server};
use siphon_proto::config::load::Format;
use siphon_testkit::http::HttpBackend;
use siphon_testkit::Backend;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    siphon_testkit::raise_fd_limit();
    let workers = env(
        "WORKERS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let rt = siphon_testkit::runtime();
    println!("# siphon-dataplane control benchmarks ({workers} workers)\n");
    apply_bench(&rt, workers)?;
    health_bench(&rt, workers)?;
    Ok(())
}

/// `n` consecutive free ports on 127.0.0.1 (checked by binding them).
fn free_ports(n: usize) -> Result<u16> {
    'start: for base in (20000u16..60000).step_by(1000) {
        for p in base..base + n as u16 {
            if TcpListener::bind(("127.0.0.1", p)).is_err() {
                continue 'start;
            }
        }
        return Ok(base);
    }
    bail!("no range of {n} free ports")
}

fn apply_config(generation: u64, base: u16, n: usize, backends: &[&Backend]) -> Result<Config> {
    let mut t = format!("generation = {generation}\n");
    for i in 0..n {
        // Every other generation drops the last listener: its sockets go
        // and come back, the others keep theirs.
        if generation % 2 == 1 && i == n - 1 {
            continue;
        }
        t += &format!(
            "[[listeners]]\nid = \"l{i}\"\nprotocol = \"TCP\"\nbind_addresses = [\"127.0.0.1\"]\n\
             protocol_port = {}\ndefault_pool_id = \"p{i}\"\n",
            base + i as u16
        );
    }
    for i in 0..n {
        let w = 1 + (generation as usize + i) % 5;
        t += &format!(
            "[[pools]]\nid = \"p{i}\"\nprotocol = \"TCP\"\nlb_algorithm = \"ROUND_ROBIN\"\nmembers = [\n"
        );
        for (k, b) in backends.iter().enumerate() {
            t += &format!(
                "  {{ id = \"m{k}\", address = \"127.0.0.1\", protocol_port = {}, weight = {} }},\n",
                b.addr.port(),
                w + k
            );
        }
        t += "]\n";
    }
    let c = Config::parse(&t, Format::Toml).map_err(anyhow::Error::msg)?;
    c.validate()?;
    Ok(c)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn apply_bench(rt: &Arc<tokio::runtime::Runtime>, workers: usize) -> Result<()> {
    let n = env("LISTENERS", 1000);
    let applies = env("APPLIES", 50);
    let clients = env("CLIENTS", 4);
    let b0 = Backend::start(rt, "b0", "127.0.0.1");
    let b1 = Backend::start(rt, "b1", "127.0.0.1");
    let base = free_ports(n)?;
    let opts = Options {
        workers,
        ..Options::default()
    };
    let first = apply_config(2, base, n, &[&b0, &b1])?;
    let t = Instant::now();
    let server = Server::start(first, opts).context("starting")?;
    let cold = t.elapsed();

    // Clients connect to the listeners that never change, round after
    // round, and check the greeting: any refused, reset or silent
    // connection counts as failed.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let port = base + (i % (n - 1)) as u16;
                    i += clients;
                    let addr = SocketAddr::from(([127, 0, 0, 1], port));
                    match one_connection(addr) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("connection to {addr} failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::with_capacity(applies);
    for g in 0..applies as u64 {
        let cfg = apply_config(3 + g, base, n, &[&b0, &b1])?;
        let t = Instant::now();
        server.apply(cfg).context("apply")?;
        times.push(t.elapsed());
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    server.shutdown(Duration::from_secs(2));
    times.sort();
    println!("## Live apply: {n} listeners, {n} pools × 2 members, ROUND_ROBIN\n");
    println!("| measure | value |\n|---|---:|");
    println!(
        "| first apply (binds {} sockets) | {:.1} ms |",
        n * workers,
        ms(cold)
    );
    println!(
        "| re-apply median ({applies} applies) | {:.1} ms |",
        ms(percentile(&times, 0.5))
    );
    println!("| re-apply p95 | {:.1} ms |", ms(percentile(&times, 0.95)));
    println!("| re-apply max | {:.1} ms |", ms(percentile(&times, 1.0)));
    println!(
        "| connections during the applies | {} |",
        ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed)
    );
    println!(
        "| failed connections | {} |\n",
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Connect, read the greeting, echo a few bytes, close.
fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 3];
    s.read_exact(&mut greeting)?;
    s.write_all(b"ping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    if &back != b"ping" {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn health_config(kind: &str, members: usize, target: SocketAddr) -> Result<Config> {
    let pools = members.div_ceil(100);
    let mut t = String::from("generation = 1\n");
    for p in 0..pools {
        t += &format!("[[pools]]\nid = \"p{p}\"\nprotocol = \"TCP\"\nlb_algorithm = \"ROUND_ROBIN\"\nmembers = [\n");
        // Members of a pool need distinct addresses: 127.1.x.y, all
        // answered by one backend bound to 0.0.0.0.
        for m in 0..100.min(members - p * 100) {
            t += &format!(
                "  {{ id = \"m{m}\", address = \"127.1.{}.{}\", protocol_port = {} }},\n",
                m / 250,
                m % 250 + 1,
                target.port()
            );
        }
        t += &format!(
            "]\n[pools.healthmonitor]\ntype = \"{kind}\"\ndelay = 1\ntimeout = 1\nmax_retries = 1\nmax_retries_down = 3\n"
        );
    }
    let c = Config::parse(&t, Format::Toml).map_err(anyhow::Error::msg)?;
    c.validate()?;
    Ok(c)
}

/// CPU seconds (user + system) of this process's thread named `name`.
fn thread_cpu(name: &str) -> Result<f64> {
    // /proc counts in USER_HZ clock ticks, 100 a second on Linux.
    let ticks = 100.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let dir = task?.path();
        if std::fs::read_to_string(dir.join("comm"))?.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        // Fields after the parenthesised name; utime and stime are the
        // 14th and 15th fields of the whole line.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        return Ok((utime + stime) / ticks);
    }
    bail!("no thread named {name}")
}

fn health_bench(rt: &Arc<tokio::runtime::Runtime>, workers: usize) -> Result<()> {
    let members = env("MEMBERS", 1000);
    let seconds = env("SECONDS", 10) as u64;
    let tcp = Backend::start(rt, "t", "0.0.0.0");
    let http = HttpBackend::start_on(rt, "0.0.0.0", 200);
    println!("## Health checks: {members} members, delay 1 s, one core = 100 %\n");
    println!("| monitor | checks run | health thread CPU | members down |\n|---|---:|---:|---:|");
    for (kind, target, count) in [("TCP", tcp.addr, None), ("HTTP", http.addr, Some(&http))] {
        let opts = Options {
            workers,
            ..Options::default()
        };
        let server = Server::start(health_config(kind, members, target)?, opts)?;
        // One interval to settle (every member's first check).
        std::thread::sleep(Duration::from_secs(1));
        let before_req = count.map_or(0, |h| h.requests());
        let before_accept = tcp.accepted();
        let cpu0 = thread_cpu("siphon-health")?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        let cpu = thread_cpu("siphon-health")? - cpu0;
        let wall = t.elapsed().as_secs_f64();
        let checks = match count {
            Some(h) => h.requests() - before_req,
            None => tcp.accepted() - before_accept,
        };
        let down = server
            .status()
            .pools
            .iter()
            .flat_map(|p| p.members.iter())
            .filter(|m| m.operating_status == siphon_dataplane::OperatingStatus::Error)
            .count();
        println!(
            "| {kind} | {checks} in {wall:.1} s ({:.0}/s) | {:.1} % | {down} |",
            checks as f64 / wall,
            100.0 * cpu / wall
        );
        server.shutdown(Duration::from_secs(1));
    }
    println!();
    Ok(())
}
