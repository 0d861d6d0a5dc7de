#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The `siphon` command line against a running controller (no agents:
//! what is checked here is the CLI's side).

use std::process::Command;

use serde_json::Value;
use siphon_control::config::{AgentTls, Auth, ControlConfig, Push, VipSubnet};
use siphon_testkit::free_port;
use siphon_testkit::pki::Ca;
use siphon_testkit::TempDir;

fn siphon(endpoint: &str, token: &str, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_siphon"))
        .args(["--endpoint", endpoint])
        .env("SIPHON_TOKEN", token)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_registers_creates_lists_and_reports_refusals() {
    let rt = siphon_testkit::runtime();
    let dir = TempDir::new("cli");
    let subnet = VipSubnet {
        id: "vips".into(),
        name: "vips".into(),
        network_id: "net".into(),
        network_name: String::new(),
        cidr: "198.18.5.0/24".parse().unwrap(),
        gateway_ip: Some("198.18.5.1".parse().unwrap()),
    };
    let auth = Auth::Token {
        token: Some("cli-admin-token-0123".into()),
        token_file: None,
    };
    let config = ControlConfig {
        listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        ..ControlConfig::local(dir.path("control.db").into(), auth, vec![subnet])
    };
    let handle = rt.block_on(siphon_control::start(config)).unwrap();
    let ep = format!("http://{}", handle.addr);

    let (ok, _, err) = siphon(&ep, "wrong", &["loadbalancer", "list"]);
    assert!(!ok && err.contains("401"), "{err}");

    let (ok, _, err) = siphon(
        &ep,
        "cli-admin-token-0123",
        &[
            "loadbalancer",
            "create",
            "--name",
            "web",
            "--vip-subnet-id",
            "vips",
        ],
    );
    assert!(!ok && err.contains("No spare amphora"), "{err}");

    let (ok, v, err) = siphon(
        &ep,
        "cli-admin-token-0123",
        &[
            "amphora",
            "register",
            "--id",
            "amp-1",
            "--address",
            "127.0.0.1",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(v["amphora"]["status"], "READY");

    let (ok, v, err) = siphon(
        &ep,
        "cli-admin-token-0123",
        &[
            "loadbalancer",
            "create",
            "--name",
            "web",
            "--vip-subnet-id",
            "vips",
            "--set",
            "description=front door",
        ],
    );
    assert!(ok, "{err}");
    // The gateway is skipped.
    assert_eq!(v["loadbalancer"]["vip_address"], "198.18.5.2");
    assert_eq!(v["loadbalancer"]["description"], "front door");
    let id = v["loadbalancer"]["id"].as_str().unwrap().to_owned();

    let (ok, v, _) = siphon(
        &ep,
        "cli-admin-token-0123",
        &["loadbalancer", "list", "name=web"],
    );
    assert!(ok);
    assert_eq!(v["loadbalancers"][0]["id"], id.as_str());
    let (_, v, _) = siphon(&ep, "cli-admin-token-0123", &["amphora", "show", "amp-1"]);
    assert_eq!(v["amphora"]["loadbalancer_id"], id.as_str());
    let (ok, _, err) = siphon(
        &ep,
        "cli-admin-token-0123",
        &[
            "listener",
            "create",
            "--protocol",
            "TCP",
            "--protocol-port",
            "80",
            "--loadbalancer",
            &id,
        ],
    );
    assert!(
        !ok && err.contains("immutable") && err.contains("409"),
        "{err}"
    );
    rt.block_on(handle.stop());
}

#[test]
fn a_push_no_amphora_takes_ends_in_error_with_the_reason() {
    let rt = siphon_testkit::runtime();
    let dir = TempDir::new("unreachable");
    let ca = Ca::new("test CA");
    ca.issue_to(&["siphon-control"], &dir.path("c.crt"), &dir.path("c.key"));
    std::fs::write(dir.path("ca.crt"), ca.pem()).unwrap();
    // Nothing listens on this port: every attempt is refused.
    let dead_port = free_port();
    let config = ControlConfig {
        listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        database: dir.path("control.db").into(),
        auth: Auth::Noauth,
        vip_subnets: vec![VipSubnet {
            id: "vips".into(),
            name: String::new(),
            network_id: "net".into(),
            network_name: String::new(),
            cidr: "198.18.6.0/24".parse().unwrap(),
            gateway_ip: None,
        }],
        amphorae: vec![siphon_control::config::AmphoraEntry {
            id: "amp-gone".into(),
            address: "127.0.0.1".parse().unwrap(),
            port: dead_port,
            server_name: None,
            ca: None,
            vip_interface: "lo".into(),
            vrrp_ip: None,
        }],
        agent_tls: Some(AgentTls {
            cert: dir.path("c.crt"),
            key: dir.path("c.key"),
            ca: dir.path("ca.crt"),
        }),
        push: Push {
            attempts: 3,
            backoff_ms: 50,
            timeout_ms: 1_000,
        },
        health: None,
        distributor: Default::default(),
        cluster: Default::default(),
        limits: Default::default(),
    };
    let handle = rt.block_on(siphon_control::start(config)).unwrap();
    let ep = format!("http://{}", handle.addr);
    let (ok, v, err) = siphon(
        &ep,
        "",
        &[
            "loadbalancer",
            "create",
            "--name",
            "doomed",
            "--vip-subnet-id",
            "vips",
            "--wait",
        ],
    );
    assert!(!ok, "{v}");
    assert!(
        err.contains("ERROR") && err.contains("amp-gone") && err.contains(&dead_port.to_string()),
        "{err}"
    );
    let (_, v, _) = siphon(
        &ep,
        "",
        &[
            "loadbalancer",
            "show",
            v["loadbalancer"]["id"].as_str().unwrap(),
        ],
    );
    assert_eq!(v["loadbalancer"]["provisioning_status"], "ERROR");
    assert!(
        v["loadbalancer"]["provisioning_error"]
            .as_str()
            .unwrap()
            .contains("amp-gone"),
        "{v}"
    );
    let (_, a, _) = siphon(&ep, "", &["amphora", "show", "amp-gone"]);
    assert!(
        a["amphora"]["error"].as_str().unwrap().contains("connect"),
        "{a}"
    );
    // An LB in ERROR may be deleted (and here that fails the same way).
    let id = v["loadbalancer"]["id"].as_str().unwrap();
    let (ok, _, err) = siphon(&ep, "", &["loadbalancer", "delete", id]);
    assert!(ok, "{err}");
    rt.block_on(handle.stop());
}

#[test]
fn migrate_creates_the_schema_is_idempotent_and_refuses_a_newer_one() {
    let dir = TempDir::new("migrate");
    let db = dir.path("state/control.db");
    let config = dir.path("control.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"{}\"\n[auth]\nmode = \"noauth\"\n",
            db.display()
        ),
    )
    .unwrap();
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_siphon-control"))
            .arg("--config")
            .arg(&config)
            .arg("migrate")
            .output()
            .unwrap()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let first = migrate();
    assert!(first.status.success(), "{}", text(&first.stderr));
    let want = format!("{}: schema version 3\n", db.display());
    assert_eq!(text(&first.stdout), want);
    let again = migrate();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), want, "a second run changes nothing");
    // A schema from a newer release: refused, and left as it is.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let sql = |q: &'static str| {
        rt.block_on(async {
            use sqlx::{Connection, Row};
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                .await
                .unwrap();
            let rows = sqlx::query(q).fetch_all(&mut c).await.unwrap();
            rows.first().map(|r| r.get::<i64, _>(0))
        })
    };
    sql("UPDATE schema_version SET version = 99");
    let newer = migrate();
    assert!(!newer.status.success());
    let err = text(&newer.stderr);
    assert!(err.contains("99"), "{err}");
    assert_eq!(sql("SELECT version FROM schema_version"), Some(99));
}
