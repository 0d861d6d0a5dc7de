#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! Siphon behind a real Octavia: Octavia's API and driver agent (19.0.0,
//! from PyPI, pinned in `integrations/octavia-provider/test-requirements.txt`)
//! with Siphon's provider driver and provider agent, siphon-control, and
//! real amphorae (agent + dataplane) in front of real backends, all on
//! loopback. The test drives Octavia only, with the stock `openstack` CLI
//! (and raw HTTP for what needs another project), as an Octavia user
//! would; it reads siphon-control's API to check what reached Siphon.
//!
//! How Octavia runs here (and why) is written down in
//! `integrations/octavia-provider/harness/octavia_harness.py`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use siphon_testkit::process::{self, Proc};
use siphon_testkit::{
    free_port, free_udp_port, root_or_skip, udp_client, udp_who, Backend, TempDir, UdpBackend,
};

/// The provider package and its harness.
fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../integrations/octavia-provider")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A venv under `target/` with Octavia and the stock clients (installed
/// from PyPI once per requirements file), and the provider package
/// (installed again on every run, so the test runs the checkout's code).
fn octavia_venv() -> PathBuf {
    // Both tests of this file want it; one installs.
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(install_octavia_venv).clone()
}

fn install_octavia_venv() -> PathBuf {
    let venv = process::target_dir().join("octavia-venv");
    let req = provider_dir().join("test-requirements.txt");
    let wanted = std::fs::read_to_string(&req).unwrap();
    let marker = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        run(Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv));
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&req));
        std::fs::write(&marker, wanted).unwrap();
    }
    // Built from a copy, so the checkout gets no build/ or egg-info.
    let build = TempDir::new("octavia-provider-build");
    run(Command::new("cp")
        .arg("-r")
        .arg(provider_dir())
        .arg(build.path("src")));
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--force-reinstall",
        ])
        .arg(build.path("src")));
    venv
}

/// Octavia's API and driver agent, configured for Siphon.
struct Octavia {
    venv: PathBuf,
    endpoint: String,
    api: Proc,
    agent: Proc,
    _dir: TempDir,
}

impl Octavia {
    fn start(rig: &Rig) -> Octavia {
        let venv = octavia_venv();
        let dir = TempDir::new("octavia");
        let port = free_port();
        let siphon = format!("http://{}", rig.handle.as_ref().unwrap().addr);
        let token = dir.path("siphon-token");
        std::fs::write(&token, TOKEN).unwrap();
        let conf = dir.path("octavia.conf");
        let d = |f: &str| dir.path(f).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "[DEFAULT]\n\
                 debug = False\n\
                 [api_settings]\n\
                 bind_host = 127.0.0.1\n\
                 bind_port = {port}\n\
                 auth_strategy = testing\n\
                 enabled_provider_drivers = siphon:Siphon L4 load balancer\n\
                 default_provider_driver = siphon\n\
                 [database]\n\
                 connection = sqlite:///{db}\n\
                 pool_timeout =\n\
                 [driver_agent]\n\
                 status_socket_path = {status}\n\
                 stats_socket_path = {stats}\n\
                 get_socket_path = {get}\n\
                 enabled_provider_agents = siphon\n\
                 [controller_worker]\n\
                 network_driver = network_noop_driver\n\
                 [siphon]\n\
                 endpoint = {siphon}\n\
                 token_file = {token}\n\
                 poll_wait = 5\n",
                db = d("octavia.db"),
                status = d("status.sock"),
                stats = d("stats.sock"),
                get = d("get.sock"),
                token = token.display(),
            ),
        )
        .unwrap();
        let harness = provider_dir().join("harness/octavia_harness.py");
        let python = venv.join("bin/python");
        run(Command::new(&python).arg(&harness).arg("mkdb").arg(&conf));
        let mut cmd = Command::new(&python);
        cmd.arg(&harness).arg("api").arg(&conf);
        let api = Proc::spawn_group(cmd, &dir.path("octavia-api.log"));
        let mut cmd = Command::new(&python);
        cmd.arg(&harness).arg("driver-agent").arg(&conf);
        let agent = Proc::spawn_group(cmd, &dir.path("octavia-driver-agent.log"));
        let o = Octavia {
            venv,
            endpoint: format!("http://127.0.0.1:{port}"),
            api,
            agent,
            _dir: dir,
        };
        assert!(
            o.api
                .wait_log("octavia-api listening", 1, Duration::from_secs(60)),
            "Octavia's API did not start: {}",
            o.api.log_text()
        );
        assert!(
            o.agent.wait_log(
                "Siphon provider agent following",
                1,
                Duration::from_secs(60)
            ),
            "the provider agent did not start: {}",
            o.agent.log_text()
        );
        o
    }

    /// The stock CLI against Octavia (no Keystone: the endpoint given,
    /// the identity from the harness), with the network lookups it makes
    /// (`--vip-subnet-id`) answered by the harness from siphon-control's
    /// subnets. Ok(JSON) or Err(its output).
    fn try_cli(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(self.venv.join("bin/openstack"))
            .args(args)
            .env_remove("OS_CLOUD")
            .env("OS_AUTH_TYPE", "none")
            .env("OS_ENDPOINT", format!("{}/v2.0", self.endpoint))
            .env(
                "OS_NETWORK_ENDPOINT_OVERRIDE",
                format!("{}/neutron/v2.0", self.endpoint),
            )
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(serde_json::from_str(&stdout).unwrap_or(Value::Null))
    }

    /// `openstack LINE` (words split at whitespace); its JSON.
    fn cli(&self, line: &str) -> Value {
        let args: Vec<&str> = line.split_whitespace().collect();
        self.try_cli(&args)
            .unwrap_or_else(|e| panic!("openstack {line}: {e}"))
    }

    /// `openstack LINE` refused with Octavia's 501 and `words` from the
    /// driver.
    fn refused(&self, line: &str, words: &str) {
        let args: Vec<&str> = line.split_whitespace().collect();
        match self.try_cli(&args) {
            Ok(v) => panic!("openstack {line} was taken: {v}"),
            Err(e) => assert!(
                e.contains(words) && e.contains("HTTP 501"),
                "openstack {line}: {e}"
            ),
        }
    }

    /// A Python script (`lines`) with openstacksdk's `load_balancer` proxy
    /// on Octavia as `conn` (and `subnet`, siphon-control's VIP subnet);
    /// what it prints, as JSON.
    fn sdk(&self, lines: &[&str]) -> Value {
        let o = &self.endpoint;
        let prelude = [
            "import json, openstack".to_owned(),
            "from openstack import exceptions".to_owned(),
            format!(
                "conn = openstack.connect(auth_type='none', endpoint='{o}', \
                 load_balancer_endpoint_override='{o}', \
                 network_endpoint_override='{o}/neutron/v2.0')"
            ),
            format!("subnet = '{SUBNET}'"),
        ];
        let script = prelude
            .iter()
            .map(String::as_str)
            .chain(lines.iter().copied())
            .collect::<Vec<_>>()
            .join("\n");
        let out = run(Command::new(self.venv.join("bin/python"))
            .arg("-c")
            .arg(script));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Polls `openstack LINE` until `ok` holds for its JSON (what a user
    /// waiting on a status does).
    fn wait(&self, line: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let v = self.cli(line);
            if ok(&v) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "{what}: not after 40 s: {v}\n--- driver agent:\n{}",
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_owned()
}

/// The status tree's member entry for `id`.
fn tree_member<'a>(tree: &'a Value, id: &str) -> Option<&'a Value> {
    tree["loadbalancer"]["listeners"]
        .as_array()?
        .iter()
        .flat_map(|l| l["pools"].as_array().into_iter().flatten())
        .flat_map(|p| p["members"].as_array().into_iter().flatten())
        .find(|m| m["id"] == id)
}

/// Which amphorae siphon-control gives load balancer `lb`.
fn amphorae_of(rig: &Rig, lb: &str) -> Vec<String> {
    let a = rig.get(&format!("/v2/octavia/amphorae?loadbalancer_id={lb}"));
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["amphorae"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| s(x, "id"))
        .collect()
}

/// The provider's own unit tests (its translations and refusals on
/// octavia-lib's models), in the pinned environment.
#[test]
fn provider_unit_tests_pass() {
    let venv = octavia_venv();
    let out = Command::new(venv.join("bin/python"))
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(provider_dir().join("tests"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    println!("{text}");
}

#[test]
fn octavia_fronts_siphon_through_the_provider() {
    if !root_or_skip("Octavia provider (VIPs are plumbed through netlink)") {
        return;
    }
    let rig = &Rig::new("octavia", &["oa1", "oa2", "oa3", "oa4"]);
    let o = Octavia::start(rig);
    let b1 = Backend::start(&rig.rt, "b1", "127.0.0.1");
    let b2 = Backend::start(&rig.rt, "b2", "127.0.0.1");
    let u1 = UdpBackend::start(&rig.rt, "u1", "127.0.0.1");
    let (tcp_port, udp_port) = (free_port(), free_udp_port());

    // The provider, as Octavia lists it, and what its flavors take.
    let providers = o.cli("loadbalancer provider list -f json");
    assert!(lists(&providers, "name", "siphon"), "{providers}");
    let caps = o.cli("loadbalancer provider capability list siphon -f json");
    assert!(lists(&caps, "name", "topology"), "{caps}");
    assert!(lists(&caps, "name", "amphora_count"), "{caps}");

    // ---- The basic flow.
    let lb = o.cli(&format!(
        "loadbalancer create --name web --vip-subnet-id {SUBNET} --provider siphon --wait -f json"
    ));
    let lb_id = s(&lb, "id");
    let vip = s(&lb, "vip_address");
    assert!(vip.starts_with(&format!("{}.", rig.vip_net)), "{lb}");
    let lb = o.cli("loadbalancer show web -f json");
    assert_eq!(s(&lb, "provisioning_status"), "ACTIVE", "{lb}");
    assert_eq!(s(&lb, "provider"), "siphon", "{lb}");
    // The same object in Siphon, under Octavia's id and project.
    let ours = rig.get(&format!("/v2/lbaas/loadbalancers/{lb_id}"));
    assert_eq!(ours.status, 200, "{}", ours.body);
    assert_eq!(ours.body["loadbalancer"]["vip_address"], vip.as_str());
    assert_eq!(s(&lb, "project_id"), "siphon-demo");
    assert_eq!(ours.body["loadbalancer"]["project_id"], "siphon-demo");

    let tcp = o.cli(&format!(
        "loadbalancer listener create --name tcp --protocol TCP --protocol-port {tcp_port} web --wait -f json"
    ));
    o.cli(&format!(
        "loadbalancer listener create --name udp --protocol UDP --protocol-port {udp_port} web --wait -f json"
    ));
    let tcp_pool = o.cli(
        "loadbalancer pool create --name tcp-pool --protocol TCP --lb-algorithm ROUND_ROBIN --listener tcp --wait -f json",
    );
    o.cli("loadbalancer pool create --name udp-pool --protocol UDP --lb-algorithm SOURCE_IP --listener udp --wait -f json");
    let member = |name: &str, port: u16, pool: &str| {
        let m = o.cli(&format!(
            "loadbalancer member create --name {name} --address 127.0.0.1 --protocol-port {port} {pool} --wait -f json"
        ));
        s(&m, "id")
    };
    let m1 = member("m1", b1.addr.port(), "tcp-pool");
    let m2 = member("m2", b2.addr.port(), "tcp-pool");
    member("u1", u1.addr.port(), "udp-pool");
    o.cli("loadbalancer healthmonitor create --name tcp-check --type TCP --delay 1 --timeout 1 --max-retries 1 tcp-pool --wait -f json");
    let pool_id = s(&tcp_pool, "id");
    let ours = rig.get(&format!("/v2/lbaas/pools/{pool_id}/members/{m1}"));
    assert_eq!(ours.status, 200, "{}", ours.body);
    assert_eq!(ours.body["member"]["project_id"], "siphon-demo");

    // Traffic through the amphora to both backends, over TCP and UDP.
    let vip_tcp: SocketAddr = format!("{vip}:{tcp_port}").parse().unwrap();
    let vip_udp: SocketAddr = format!("{vip}:{udp_port}").parse().unwrap();
    let got = greetings(vip_tcp, 6);
    assert!(got.iter().any(|g| g.contains("b1")), "{got:?}");
    assert!(got.iter().any(|g| g.contains("b2")), "{got:?}");
    let c = udp_client("127.0.0.1:0");
    assert!(udp_who(&c, vip_udp).unwrap().contains("u1"));

    // The status tree: ONLINE down to the members, as the amphora's health
    // checks and heartbeats find them.
    let status = "loadbalancer status show web";
    let member_is = |t: &Value, id: &str, want: &str| {
        tree_member(t, id).is_some_and(|m| m["operating_status"] == want)
    };
    o.wait(status, "status tree ONLINE", |t| {
        t["loadbalancer"]["operating_status"] == "ONLINE"
            && member_is(t, &m1, "ONLINE")
            && member_is(t, &m2, "ONLINE")
    });
    // A member the monitor takes down is ERROR in Octavia, and back.
    let b2_addr = b2.addr;
    b2.stop();
    let t = o.wait(status, "member m2 ERROR", |t| member_is(t, &m2, "ERROR"));
    println!("status tree with m2 down: {t}");
    let got = greetings(vip_tcp, 4);
    assert!(got.iter().all(|g| g.contains("b1")), "{got:?}");
    let _b2 = Backend::start_at(&rig.rt, "b2", b2_addr);
    o.wait(status, "member m2 ONLINE again", |t| {
        member_is(t, &m2, "ONLINE") && t["loadbalancer"]["operating_status"] == "ONLINE"
    });

    // ---- Stats, from the amphora's counters through the driver agent.
    let stats = o.wait("loadbalancer stats show web -f json", "stats", |v| {
        v["bytes_out"].as_u64().unwrap_or(0) > 0
            && v["total_connections"].as_u64().unwrap_or(0) >= 10
    });
    println!("load-balancer stats through Octavia: {stats}");
    o.wait(
        "loadbalancer listener stats show udp -f json",
        "UDP listener stats",
        |v| v["bytes_in"].as_u64().unwrap_or(0) > 0,
    );

    // ---- Updates reach Siphon.
    o.cli("loadbalancer listener set --connection-limit 500 tcp --wait");
    let ours = rig.get(&format!("/v2/lbaas/listeners/{}", s(&tcp, "id")));
    assert_eq!(
        ours.body["listener"]["connection_limit"], 500,
        "{}",
        ours.body
    );
    o.cli(&format!(
        "loadbalancer member set --weight 0 tcp-pool {m2} --wait"
    ));
    let got = greetings(vip_tcp, 4);
    assert!(
        got.iter().all(|g| g.contains("b1")),
        "weight 0 still served: {got:?}"
    );
    // A change the amphorae do not see is still reported back.
    o.cli("loadbalancer set --description through-octavia web --wait");
    let ours = rig.get(&format!("/v2/lbaas/loadbalancers/{lb_id}"));
    assert_eq!(ours.body["loadbalancer"]["description"], "through-octavia");
    o.cli("loadbalancer listener set --name tcp-renamed tcp --wait");
    o.cli("loadbalancer listener set --name tcp tcp-renamed --wait");

    // ---- Refusals: the driver's words, as Octavia's 501.
    o.refused(
        "loadbalancer listener create --protocol HTTP --protocol-port 8080 web",
        "Siphon does not support the listener protocol HTTP",
    );
    o.refused("loadbalancer pool create --protocol TCP --lb-algorithm ROUND_ROBIN --loadbalancer web --enable-tls", "Siphon does not support the TLS option tls_enabled");
    o.refused(
        "loadbalancer l7policy create --action REJECT tcp",
        "Siphon does not support L7 policies",
    );
    o.refused("loadbalancer pool create --protocol TCP --lb-algorithm ROUND_ROBIN --loadbalancer web --session-persistence type=HTTP_COOKIE", "Siphon does not support session persistence HTTP_COOKIE");
    // None of them reached Siphon, and the load balancer is not left locked.
    let pools = rig.get("/v2/lbaas/pools");
    assert_eq!(
        pools.body["pools"].as_array().unwrap().len(),
        2,
        "{}",
        pools.body
    );
    let lb = o.cli("loadbalancer show web -f json");
    assert_eq!(s(&lb, "provisioning_status"), "ACTIVE", "{lb}");

    // ---- Failover through Octavia's API reaches Siphon; traffic returns.
    let before = amphorae_of(rig, &lb_id);
    assert_eq!(before.len(), 1, "{before:?}");
    o.cli("loadbalancer failover web");
    o.wait(
        "loadbalancer show web -f json",
        "ACTIVE after failover",
        |v| v["provisioning_status"] == "ACTIVE",
    );
    let after = amphorae_of(rig, &lb_id);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(before, after, "the failover kept the amphora");
    let start = Instant::now();
    while !greetings(vip_tcp, 1)[0].contains("b1") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no traffic after the failover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "traffic through the VIP {:?} after the failover was ACTIVE",
        start.elapsed()
    );

    // ---- Deletes: one member, then the whole tree with --cascade.
    o.cli(&format!("loadbalancer member delete tcp-pool {m2} --wait"));
    let members = o.cli("loadbalancer member list tcp-pool -f json");
    assert!(!lists(&members, "id", &m2), "{members}");
    let gone = rig.get(&format!("/v2/lbaas/pools/{pool_id}/members/{m2}"));
    assert_eq!(gone.status, 404, "{}", gone.body);

    // ---- Batch member update: the pool becomes the list (m1 kept, b2
    // back as a new member m3); the same list again changes nothing in
    // Siphon, and Octavia's load balancer and members are released all
    // the same.
    let batch = format!(
        "[{{'address': '127.0.0.1', 'protocol_port': {}, 'name': 'm1'}}, \
         {{'address': '127.0.0.1', 'protocol_port': {}, 'name': 'm3'}}]",
        b1.addr.port(),
        b2_addr.port()
    );
    for round in ["a new member", "the same list again"] {
        let put = format!(
            "r = conn.load_balancer.put('/lbaas/pools/{pool_id}/members', json={{'members': {batch}}})"
        );
        let wait = format!(
            "conn.load_balancer.wait_for_load_balancer('{lb_id}', status='ACTIVE', failures=['ERROR'], interval=0.5, wait=40)"
        );
        let active = o.sdk(&[
            &put,
            "assert r.status_code == 202, (r.status_code, r.text)",
            &wait,
            &format!(
                "print(json.dumps(sorted(m.name for m in conn.load_balancer.members('{pool_id}') \
                 if m.provisioning_status == 'ACTIVE')))"
            ),
        ]);
        assert_eq!(active, json!(["m1", "m3"]), "batch, {round}");
    }
    let members = o.cli("loadbalancer member list tcp-pool -f json");
    let m3 = members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "m3")
        .map(|m| s(m, "id"))
        .unwrap();
    let ours = rig.get(&format!("/v2/lbaas/pools/{pool_id}/members/{m3}"));
    assert_eq!(ours.status, 200, "{}", ours.body);
    let start = Instant::now();
    while !greetings(vip_tcp, 4).iter().any(|g| g.contains("b2")) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "b2 not served after the batch"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    o.cli("loadbalancer delete --cascade web --wait");
    let left = o.cli("loadbalancer list -f json");
    assert!(!lists(&left, "id", &lb_id), "{left}");
    assert_eq!(
        rig.get(&format!("/v2/lbaas/loadbalancers/{lb_id}")).status,
        404
    );
    let listeners = o.cli("loadbalancer listener list -f json");
    assert_eq!(listeners, json!([]), "children left in Octavia");

    // ---- Quotas are Octavia's: a project with a quota of one load
    // balancer gets its second refused there, and Siphon never sees it.
    let quota = o.sdk(&[
        "conn.load_balancer.update_quota('quota-project', load_balancer=1)",
        "first = conn.load_balancer.create_load_balancer(name='q1', project_id='quota-project', vip_subnet_id=subnet, provider='siphon')",
        "try:",
        "    conn.load_balancer.create_load_balancer(name='q2', project_id='quota-project', vip_subnet_id=subnet, provider='siphon')",
        "    second = 'created'",
        "except exceptions.HttpException as e:",
        "    second = f'{e.status_code} {e.details}'",
        "print(json.dumps({'first': first.id, 'second': second}))",
    ]);
    let second = s(&quota, "second");
    assert!(
        second.starts_with("403") && second.contains("Quota"),
        "{quota}"
    );
    let theirs = rig.get("/v2/lbaas/loadbalancers?project_id=quota-project");
    let theirs = theirs.body["loadbalancers"].as_array().unwrap().len();
    assert_eq!(
        theirs, 1,
        "Siphon holds {theirs} load balancers of the project"
    );
    let q = s(&quota, "first");
    o.wait(
        &format!("loadbalancer show {q} -f json"),
        "quota LB ACTIVE",
        |v| v["provisioning_status"] == "ACTIVE",
    );
    o.cli(&format!("loadbalancer delete {q} --wait"));

    // ---- Flavors select Siphon's active-active.
    o.refused(r#"loadbalancer flavorprofile create --name bad --provider siphon --flavor-data {"topology":"RING"}"#, "Siphon does not support topology 'RING'");
    o.cli(r#"loadbalancer flavorprofile create --name aa3 --provider siphon --flavor-data {"topology":"ACTIVE_ACTIVE","amphora_count":3} -f json"#);
    o.cli("loadbalancer flavor create --name aa3 --flavorprofile aa3 --enable -f json");
    let aa = o.cli(&format!(
        "loadbalancer create --name aa --flavor aa3 --vip-subnet-id {SUBNET} --wait -f json"
    ));
    let aa_id = s(&aa, "id");
    let ours = rig.get(&format!("/v2/lbaas/loadbalancers/{aa_id}"));
    assert_eq!(
        ours.body["loadbalancer"]["topology"], "ACTIVE_ACTIVE",
        "{}",
        ours.body
    );
    assert_eq!(amphorae_of(rig, &aa_id).len(), 3);
    o.cli("loadbalancer delete aa --wait");

    // Availability zones: Siphon has none, and says so.
    o.refused(r#"loadbalancer availabilityzoneprofile create --name az --provider siphon --availability-zone-data {"compute_zone":"nova"}"#, "Siphon does not support availability zone metadata");
}
