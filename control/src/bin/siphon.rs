//! `siphon`: the command line for siphon-control's API.
//!
//! ```text
//! siphon loadbalancer create --name web --vip-subnet-id SUBNET --wait
//! siphon listener create --name web-80 --protocol TCP --protocol-port 80 --loadbalancer LB --wait
//! siphon pool create --name web --protocol TCP --lb-algorithm MAGLEV --listener L --wait
//! siphon member create POOL --address 198.18.0.10 --protocol-port 8080 --wait
//! siphon loadbalancer status LB
//! ```
//!
//! Answers are printed as JSON; a refusal exits 1 with the controller's
//! message. `--set key=value` passes any other field (the value is read
//! as JSON when it parses, else as a string).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde_json::{json, Map, Value};
use siphon_control::client::{Answer, Client};

#[derive(Debug, Parser)]
#[command(
    name = "siphon",
    version,
    about = "Command line for siphon-control (Octavia v2 API)"
)]
struct Cli {
    /// Controller API.
    #[arg(long, env = "SIPHON_ENDPOINT", default_value = "http://127.0.0.1:9876")]
    endpoint: String,
    /// Admin token (sent as X-Auth-Token).
    #[arg(long, env = "SIPHON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load balancers.
    #[command(subcommand)]
    Loadbalancer(LbCmd),
    /// Listeners.
    #[command(subcommand)]
    Listener(ListenerCmd),
    /// Pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Members of a pool.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Health monitors.
    #[command(subcommand)]
    Healthmonitor(HmCmd),
    /// Amphorae (the nodes that carry load balancers).
    #[command(subcommand)]
    Amphora(AmphoraCmd),
}

#[derive(Debug, Args)]
struct Extra {
    /// Any other field: key=value (value as JSON when it parses).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Wait until the load balancer is ACTIVE again (or ERROR).
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Args)]
struct Listing {
    /// Filters and options as the API takes them, e.g. name=web, limit=10.
    #[arg(value_name = "KEY=VALUE")]
    query: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum LbCmd {
    List(Listing),
    Show {
        id: String,
    },
    Create {
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        vip_subnet_id: Option<String>,
        #[arg(long)]
        vip_network_id: Option<String>,
        #[arg(long)]
        vip_address: Option<String>,
        /// SINGLE or ACTIVE_ACTIVE.
        #[arg(long)]
        topology: Option<String>,
        #[arg(long)]
        amphora_count: Option<u32>,
        #[command(flatten)]
        extra: Extra,
    },
    Set {
        id: String,
        #[command(flatten)]
        extra: Extra,
    },
    Delete {
        id: String,
        /// Delete listeners, pools and members with it.
        #[arg(long)]
        cascade: bool,
        #[arg(long)]
        wait: bool,
    },
    Status {
        id: String,
    },
    Stats {
        id: String,
    },
    Failover {
        id: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ListenerCmd {
    List(Listing),
    Show {
        id: String,
    },
    Create {
        #[arg(long, default_value = "")]
        name: String,
        /// TCP or UDP.
        #[arg(long)]
        protocol: String,
        #[arg(long)]
        protocol_port: u16,
        #[arg(long)]
        loadbalancer: String,
        #[arg(long)]
        default_pool: Option<String>,
        #[command(flatten)]
        extra: Extra,
    },
    Set {
        id: String,
        #[command(flatten)]
        extra: Extra,
    },
    Delete {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    Stats {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    List(Listing),
    Show {
        id: String,
    },
    Create {
        #[arg(long, default_value = "")]
        name: String,
        /// TCP, UDP, PROXY or PROXYV2.
        #[arg(long)]
        protocol: String,
        /// ROUND_ROBIN, LEAST_CONNECTIONS, SOURCE_IP, SOURCE_IP_PORT, MAGLEV.
        #[arg(long)]
        lb_algorithm: String,
        #[arg(long)]
        listener: Option<String>,
        #[arg(long)]
        loadbalancer: Option<String>,
        #[command(flatten)]
        extra: Extra,
    },
    Set {
        id: String,
        #[command(flatten)]
        extra: Extra,
    },
    Delete {
        id: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum MemberCmd {
    List {
        pool: String,
        #[command(flatten)]
        listing: Listing,
    },
    Show {
        pool: String,
        id: String,
    },
    Create {
        pool: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        protocol_port: u16,
        #[arg(long)]
        weight: Option<u16>,
        #[command(flatten)]
        extra: Extra,
    },
    Set {
        pool: String,
        id: String,
        #[command(flatten)]
        extra: Extra,
    },
    Delete {
        pool: String,
        id: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HmCmd {
    List(Listing),
    Show {
        id: String,
    },
    Create {
        #[arg(long)]
        pool: String,
        /// TCP, HTTP, HTTPS, TLS-HELLO, UDP-CONNECT, PING.
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        delay: u32,
        #[arg(long)]
        timeout: u32,
        #[arg(long)]
        max_retries: u8,
        #[command(flatten)]
        extra: Extra,
    },
    Set {
        id: String,
        #[command(flatten)]
        extra: Extra,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AmphoraCmd {
    List(Listing),
    Show {
        id: String,
    },
    /// Registers an amphora whose agent is reachable at ADDRESS:PORT.
    Register {
        #[arg(long)]
        id: String,
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 9443)]
        port: u16,
        /// Interface the agent plumbs VIPs on.
        #[arg(long)]
        vip_interface: Option<String>,
        /// Name in the agent's certificate (default: the id).
        #[arg(long)]
        server_name: Option<String>,
        /// Its address on the VIP network, where the distributor sends VIP
        /// traffic (default: ADDRESS).
        #[arg(long)]
        vrrp_ip: Option<String>,
    },
    Delete {
        id: String,
    },
    Stats {
        id: String,
    },
    Failover {
        id: String,
    },
    /// A new heartbeat key for the amphora (the old one is taken for
    /// health.key_grace_ms more).
    RotateKey {
        id: String,
    },
}

/// `key=value` pairs into a JSON object (values as JSON when they parse).
fn fields(pairs: &[String], into: &mut Map<String, Value>) -> anyhow::Result<()> {
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("{p:?}: expected KEY=VALUE"))?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        into.insert(k.to_owned(), v);
    }
    Ok(())
}

fn query(path: &str, l: &Listing) -> String {
    if l.query.is_empty() {
        return path.to_owned();
    }
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for p in &l.query {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        s.append_pair(k, v);
    }
    format!("{path}?{}", s.finish())
}

struct Run {
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Run {
    fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
        let a = self
            .rt
            .block_on(self.client.call(method, path, body.as_ref()))?;
        if a.status >= 400 {
            bail!(
                "{} ({})",
                a.fault().unwrap_or(&a.body.to_string()),
                a.status
            );
        }
        Ok(a)
    }

    fn print(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
        let a = self.call(method, path, body)?;
        if !a.body.is_null() {
            println!("{}", serde_json::to_string_pretty(&a.body)?);
        }
        Ok(a)
    }

    /// GETs `path` and prints the answer.
    fn get(&self, path: &str) -> anyhow::Result<()> {
        self.print(Method::GET, path, None).map(drop)
    }

    /// Polls the load balancer until it leaves `PENDING_*`.
    fn wait(&self, lb: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let a = self.rt.block_on(self.client.call(
                Method::GET,
                &format!("/v2/lbaas/loadbalancers/{lb}"),
                None,
            ))?;
            if a.status == 404 {
                return Ok(());
            }
            match a.body["loadbalancer"]["provisioning_status"].as_str() {
                Some("ACTIVE") => return Ok(()),
                Some("ERROR") => bail!(
                    "load balancer {lb} is in ERROR: {}",
                    a.body["loadbalancer"]["provisioning_error"]
                        .as_str()
                        .unwrap_or("see the amphorae")
                ),
                _ if start.elapsed() > Duration::from_secs(300) => {
                    bail!("load balancer {lb} still pending after 300 s")
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The load balancer an object belongs to, for `--wait`.
    fn lb_of(&self, v: &Value) -> Option<String> {
        let o = v.as_object()?.values().next()?;
        o.get("loadbalancers")
            .and_then(|l| l[0]["id"].as_str())
            .map(str::to_owned)
    }

    fn create(
        &self,
        path: &str,
        key: &str,
        mut m: Map<String, Value>,
        extra: &Extra,
        lb: Option<String>,
    ) -> anyhow::Result<()> {
        fields(&extra.set, &mut m)?;
        let a = self.print(Method::POST, path, Some(json!({ key: m })))?;
        if extra.wait {
            let lb = lb.or_else(|| self.lb_of(&a.body)).or_else(|| {
                a.body[key]["id"]
                    .as_str()
                    .filter(|_| key == "loadbalancer")
                    .map(str::to_owned)
            });
            if let Some(lb) = lb {
                self.wait(&lb)?;
            }
        }
        Ok(())
    }

    fn set(&self, path: &str, key: &str, extra: &Extra, lb: Option<String>) -> anyhow::Result<()> {
        let mut m = Map::new();
        fields(&extra.set, &mut m)?;
        let a = self.print(Method::PUT, path, Some(json!({ key: m })))?;
        if extra.wait {
            if let Some(lb) = lb.or_else(|| self.lb_of(&a.body)) {
                self.wait(&lb)?;
            }
        }
        Ok(())
    }

    /// Deletes, first finding the load balancer to wait on.
    fn delete(&self, path: &str, key: &str, wait: bool) -> anyhow::Result<()> {
        let lb = if wait {
            let a = self.call(Method::GET, path, None)?;
            self.lb_of(&a.body).or_else(|| {
                a.body[key]["id"]
                    .as_str()
                    .filter(|_| key == "loadbalancer")
                    .map(str::to_owned)
            })
        } else {
            None
        };
        self.call(Method::DELETE, path, None)?;
        if let Some(lb) = lb {
            self.wait(&lb)?;
        }
        Ok(())
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("siphon: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let r = Run {
        client: Client::new(&cli.endpoint, cli.token.clone())?,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    const LB: &str = "/v2/lbaas/loadbalancers";
    const LISTENERS: &str = "/v2/lbaas/listeners";
    const POOLS: &str = "/v2/lbaas/pools";
    const HMS: &str = "/v2/lbaas/healthmonitors";
    const AMPS: &str = "/v2/octavia/amphorae";
    let opt = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    match cli.command {
        Command::Loadbalancer(c) => match c {
            LbCmd::List(l) => r.get(&query(LB, &l))?,
            LbCmd::Show { id } => r.get(&format!("{LB}/{id}"))?,
            LbCmd::Create {
                name,
                vip_subnet_id,
                vip_network_id,
                vip_address,
                topology,
                amphora_count,
                extra,
            } => {
                let mut m = Map::new();
                m.insert("name".into(), json!(name));
                opt(&mut m, "vip_subnet_id", vip_subnet_id.map(Value::from));
                opt(&mut m, "vip_network_id", vip_network_id.map(Value::from));
                opt(&mut m, "vip_address", vip_address.map(Value::from));
                opt(&mut m, "topology", topology.map(Value::from));
                opt(&mut m, "amphora_count", amphora_count.map(Value::from));
                r.create(LB, "loadbalancer", m, &extra, None)?;
            }
            LbCmd::Set { id, extra } => r.set(
                &format!("{LB}/{id}"),
                "loadbalancer",
                &extra,
                Some(id.clone()),
            )?,
            LbCmd::Delete { id, cascade, wait } => {
                r.call(
                    Method::DELETE,
                    &format!("{LB}/{id}{}", if cascade { "?cascade=true" } else { "" }),
                    None,
                )?;
                if wait {
                    r.wait(&id)?;
                }
            }
            LbCmd::Status { id } => r.get(&format!("{LB}/{id}/status"))?,
            LbCmd::Stats { id } => r.get(&format!("{LB}/{id}/stats"))?,
            LbCmd::Failover { id, wait } => {
                r.call(Method::PUT, &format!("{LB}/{id}/failover"), None)?;
                if wait {
                    r.wait(&id)?;
                }
            }
        },
        Command::Listener(c) => match c {
            ListenerCmd::List(l) => r.get(&query(LISTENERS, &l))?,
            ListenerCmd::Show { id } => r.get(&format!("{LISTENERS}/{id}"))?,
            ListenerCmd::Create {
                name,
                protocol,
                protocol_port,
                loadbalancer,
                default_pool,
                extra,
            } => {
                let mut m = Map::new();
                m.insert("name".into(), json!(name));
                m.insert("protocol".into(), json!(protocol));
                m.insert("protocol_port".into(), json!(protocol_port));
                m.insert("loadbalancer_id".into(), json!(loadbalancer));
                opt(&mut m, "default_pool_id", default_pool.map(Value::from));
                r.create(LISTENERS, "listener", m, &extra, Some(loadbalancer.clone()))?;
            }
            ListenerCmd::Set { id, extra } => {
                r.set(&format!("{LISTENERS}/{id}"), "listener", &extra, None)?
            }
            ListenerCmd::Delete { id, wait } => {
                r.delete(&format!("{LISTENERS}/{id}"), "listener", wait)?
            }
            ListenerCmd::Stats { id } => r.get(&format!("{LISTENERS}/{id}/stats"))?,
        },
        Command::Pool(c) => match c {
            PoolCmd::List(l) => r.get(&query(POOLS, &l))?,
            PoolCmd::Show { id } => r.get(&format!("{POOLS}/{id}"))?,
            PoolCmd::Create {
                name,
                protocol,
                lb_algorithm,
                listener,
                loadbalancer,
                extra,
            } => {
                let mut m = Map::new();
                m.insert("name".into(), json!(name));
                m.insert("protocol".into(), json!(protocol));
                m.insert("lb_algorithm".into(), json!(lb_algorithm));
                opt(&mut m, "listener_id", listener.map(Value::from));
                opt(&mut m, "loadbalancer_id", loadbalancer.map(Value::from));
                r.create(POOLS, "pool", m, &extra, None)?;
            }
            PoolCmd::Set { id, extra } => r.set(&format!("{POOLS}/{id}"), "pool", &extra, None)?,
            PoolCmd::Delete { id, wait } => r.delete(&format!("{POOLS}/{id}"), "pool", wait)?,
        },
        Command::Member(c) => {
            let lb_of_pool = |pool: &str| -> anyhow::Result<Option<String>> {
                Ok(r.lb_of(&r.call(Method::GET, &format!("{POOLS}/{pool}"), None)?.body))
            };
            match c {
                MemberCmd::List { pool, listing } => drop(r.print(
                    Method::GET,
                    &query(&format!("{POOLS}/{pool}/members"), &listing),
                    None,
                )?),
                MemberCmd::Show { pool, id } => r.get(&format!("{POOLS}/{pool}/members/{id}"))?,
                MemberCmd::Create {
                    pool,
                    name,
                    address,
                    protocol_port,
                    weight,
                    extra,
                } => {
                    let mut m = Map::new();
                    m.insert("name".into(), json!(name));
                    m.insert("address".into(), json!(address));
                    m.insert("protocol_port".into(), json!(protocol_port));
                    opt(&mut m, "weight", weight.map(Value::from));
                    let lb = if extra.wait { lb_of_pool(&pool)? } else { None };
                    r.create(&format!("{POOLS}/{pool}/members"), "member", m, &extra, lb)?;
                }
                MemberCmd::Set { pool, id, extra } => {
                    let lb = if extra.wait { lb_of_pool(&pool)? } else { None };
                    r.set(
                        &format!("{POOLS}/{pool}/members/{id}"),
                        "member",
                        &extra,
                        lb,
                    )?;
                }
                MemberCmd::Delete { pool, id, wait } => {
                    let lb = if wait { lb_of_pool(&pool)? } else { None };
                    r.call(
                        Method::DELETE,
                        &format!("{POOLS}/{pool}/members/{id}"),
                        None,
                    )?;
                    if let Some(lb) = lb {
                        r.wait(&lb)?;
                    }
                }
            }
        }
        Command::Healthmonitor(c) => match c {
            HmCmd::List(l) => r.get(&query(HMS, &l))?,
            HmCmd::Show { id } => r.get(&format!("{HMS}/{id}"))?,
            HmCmd::Create {
                pool,
                kind,
                delay,
                timeout,
                max_retries,
                extra,
            } => {
                let mut m = Map::new();
                m.insert("pool_id".into(), json!(pool));
                m.insert("type".into(), json!(kind));
                m.insert("delay".into(), json!(delay));
                m.insert("timeout".into(), json!(timeout));
                m.insert("max_retries".into(), json!(max_retries));
                let lb = if extra.wait {
                    r.lb_of(&r.call(Method::GET, &format!("{POOLS}/{pool}"), None)?.body)
                } else {
                    None
                };
                r.create(HMS, "healthmonitor", m, &extra, lb)?;
            }
            HmCmd::Set { id, extra } => {
                r.set(&format!("{HMS}/{id}"), "healthmonitor", &extra, None)?
            }
            HmCmd::Delete { id } => drop(r.call(Method::DELETE, &format!("{HMS}/{id}"), None)?),
        },
        Command::Amphora(c) => match c {
            AmphoraCmd::List(l) => r.get(&query(AMPS, &l))?,
            AmphoraCmd::Show { id } => r.get(&format!("{AMPS}/{id}"))?,
            AmphoraCmd::Register {
                id,
                address,
                port,
                vip_interface,
                server_name,
                vrrp_ip,
            } => {
                let mut m = Map::new();
                m.insert("id".into(), json!(id));
                m.insert("lb_network_ip".into(), json!(address));
                m.insert("agent_port".into(), json!(port));
                opt(&mut m, "vip_interface", vip_interface.map(Value::from));
                opt(&mut m, "server_name", server_name.map(Value::from));
                opt(&mut m, "vrrp_ip", vrrp_ip.map(Value::from));
                drop(r.print(Method::POST, AMPS, Some(json!({ "amphora": m })))?);
            }
            AmphoraCmd::Delete { id } => {
                drop(r.call(Method::DELETE, &format!("{AMPS}/{id}"), None)?)
            }
            AmphoraCmd::Stats { id } => r.get(&format!("{AMPS}/{id}/stats"))?,
            AmphoraCmd::Failover { id } => {
                drop(r.call(Method::PUT, &format!("{AMPS}/{id}/failover"), None)?)
            }
            AmphoraCmd::RotateKey { id } => {
                drop(r.print(Method::PUT, &format!("{AMPS}/{id}/heartbeat_key"), None)?)
            }
        },
    }
    Ok(())
}
