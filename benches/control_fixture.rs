//! What the controller benchmarks share: objects shaped as the
//! controller stores them (deterministic ids, Octavia's timestamps), a
//! keep-alive HTTP/1.1 client, and percentiles.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench stops on a broken fixture

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};
use siphon_control::config::{Auth, ControlConfig, VipSubnet};
use siphon_control::store::{Database, Op, Store};
use siphon_testkit::postgres::Postgres;

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deterministic UUID-shaped id (ids sort like random UUIDs would:
/// not in creation order).
pub fn id(kind: u32, i: usize) -> String {
    let h = (i as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(17)
        ^ u64::from(kind);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        h as u16 & 0xfff,
        kind,
        i
    )
}

pub fn common(id: &str, name: String, created: &str) -> Value {
    json!({
        "id": id, "name": name, "description": "", "project_id": "bench",
        "admin_state_up": true, "provisioning_status": "ACTIVE",
        "operating_status": "ONLINE", "tags": [], "created_at": created,
        "updated_at": null, "deployed": true,
    })
}

pub fn with(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}

pub fn object<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("fixture matches the model")
}

/// An amphora as the controller stores it: `ALLOCATED` to `lb` with
/// `vips` and `generation` pushed, or a spare (`READY`) without one.
pub fn amphora(id: &str, lb: Option<&str>, generation: u64, vips: &[String]) -> Value {
    json!({
        "id": id, "load_balancer_id": lb,
        "status": if lb.is_some() { "ALLOCATED" } else { "READY" },
        "lb_network_ip": "127.0.0.1", "agent_port": 9, "server_name": id,
        "ca_certificate": null, "vip_interface": "eth1", "generation": generation,
        "vips": vips, "created_at": time_of(1_700_000_000), "updated_at": null,
    })
}

/// Octavia's timestamp format for a Unix time.
pub fn time_of(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// One keep-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Conn {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    /// GETs `path`; the status and the body's length.
    pub fn get(&mut self, path: &str) -> (u16, usize) {
        let (status, body) = self.get_body(path);
        (status, body.len())
    }

    /// GETs `path`; the status and the body.
    pub fn get_body(&mut self, path: &str) -> (u16, Vec<u8>) {
        write!(self.writer, "GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").expect("send");
        self.answer()
    }

    /// POSTs `body` (JSON) to `path`; the status and the body's length.
    pub fn post(&mut self, path: &str, body: &str) -> (u16, usize) {
        write!(
            self.writer,
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let (status, body) = self.answer();
        (status, body.len())
    }

    fn answer(&mut self) -> (u16, Vec<u8>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, body)
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A throwaway PostgreSQL server with an empty database `siphon`, and how
/// a controller names it; `None` (with the reason printed) without root
/// or Debian's `postgresql`.
pub fn postgres(bench: &str) -> Option<(Postgres, Database)> {
    let pg = Postgres::start_or_skip(bench)?;
    pg.create_database("siphon");
    let db = Database::Postgres {
        url: pg.url("siphon"),
        password_file: Some(pg.password_file.clone()),
        max_connections: 8,
    };
    Some((pg, db))
}

/// A controller on `database` for the benches: any free port, no auth,
/// VIPs from 198.18.0.0/15 (`bench-subnet`), no agents, no health manager.
pub fn control_config(database: Database) -> ControlConfig {
    let subnet = VipSubnet {
        id: "bench-subnet".into(),
        name: "bench".into(),
        network_id: "bench-net".into(),
        network_name: String::new(),
        cidr: "198.18.0.0/15".parse().expect("cidr"),
        gateway_ip: None,
    };
    ControlConfig::local(database, Auth::Noauth, vec![subnet])
}

/// CPU time this process's threads named `name` have used (utime +
/// stime from `/proc/self/task/*/stat`, in clock ticks of 10 ms).
pub fn threads_cpu(name: &str) -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is the 3rd field, utime the
        // 14th, stime the 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        ticks += rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum::<u64>();
    }
    Duration::from_millis(ticks * 10)
}

/// Writes `ops` into the store `db` names (migrating it first), in one
/// transaction.
pub fn store(rt: &tokio::runtime::Runtime, db: &Database, ops: &[Op]) {
    rt.block_on(async {
        Store::open(db)
            .await
            .expect("store")
            .commit(ops)
            .await
            .expect("fixture stored");
    });
}
