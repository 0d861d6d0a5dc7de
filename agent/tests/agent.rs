#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The agent against real peers: mutual TLS with rcgen-made certificates
//! (accepted; refused without a certificate, from another CA, expired),
//! certificate rotations (accepted, and refused when they would lock the
//! controller out), config pushes end to end through a real dataplane to a
//! real backend (idempotent re-push, a rejected config leaving the old one
//! running and persisted, a restarted dataplane getting its config back,
//! corrupt state set aside), heartbeats on real UDP sockets with bootstrap
//! and pushed keys, VIPs through netlink in a network namespace, and the
//! HTTPS server's limits against a real agent process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use siphon_agent::config::{AgentConfig, Limits, TlsFiles};
use siphon_proto::http::{self, Request, Target};
use siphon_testkit::agent::AgentToml;
use siphon_testkit::dataplane::Dataplane;
use siphon_testkit::pki::Ca;
use siphon_testkit::process::{self, Proc};
use siphon_testkit::{connect_greeting, free_port, Backend};
use siphon_testkit::{eventually, TempDir};

/// A PKI: the controller CA (client certificates), the agent's CA and its
/// server certificate for 127.0.0.1.
struct Pki {
    controller: Ca,
    server_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            controller: Ca::new("controller CA"),
            server_ca: Ca::new("amphora CA"),
        }
    }
}

/// Writes the agent's TLS files and config into `dir`.
fn agent_config(dir: &TempDir, pki: &Pki, dataplane: &Path) -> AgentConfig {
    let (cert, key) = pki.server_ca.issue(&["127.0.0.1"], false);
    std::fs::write(dir.path("agent.crt"), cert).unwrap();
    std::fs::write(dir.path("agent.key"), key).unwrap();
    std::fs::write(dir.path("controller-ca.crt"), pki.controller.cert.pem()).unwrap();
    std::fs::write(dir.path("amphora-ca.crt"), pki.server_ca.cert.pem()).unwrap();
    AgentConfig {
        amphora_id: "amp-1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        local_socket: dir.path("agent.sock"),
        dataplane_socket: dataplane.to_owned(),
        state_dir: dir.path("state"),
        tls: TlsFiles {
            cert: dir.path("agent.crt"),
            key: dir.path("agent.key"),
            client_ca: dir.path("controller-ca.crt"),
            server_ca: Some(dir.path("amphora-ca.crt")),
            server_name: Some("127.0.0.1".into()),
        },
        heartbeat: None,
        limits: Limits::default(),
        bgp: None,
    }
}

/// A controller-side client: trusts the agent's CA, presents `identity`.
fn client_tls(server_ca: &Ca, identity: Option<(String, String)>) -> tokio_rustls::TlsConnector {
    client_tls_trusting(server_ca.cert.der(), identity)
}

/// A controller-side client trusting `server_ca` (DER) for the agent.
fn client_tls_trusting(
    server_ca: &CertificateDer<'static>,
    identity: Option<(String, String)>,
) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            b.with_client_auth_cert(
                chain,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTPS request; Err when the TLS handshake or the exchange fails.
fn https(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let target = Target::Tls {
        addr: addr.to_string(),
        name: ServerName::IpAddress(addr.ip().into()),
        config: tls.config().clone(),
    };
    let mut req = Request::new(method, path);
    if let Some(body) = body {
        req = req.json(body.into_bytes());
    }
    let r = http::send_blocking(&target, req).map_err(|e| e.to_string())?;
    Ok((r.status, r.body))
}

/// One request to the agent's local (Unix socket) API.
fn local(socket: &Path, method: Method, path: &str, body: &Value) -> http::Reply {
    let req = Request::new(method, path).json(body.to_string().into_bytes());
    http::send_blocking(&Target::Unix(socket.to_owned()), req).unwrap()
}

fn push_body(generation: u64, port: u16, b: &Backend, weight: u32) -> String {
    serde_json::json!({
        "generation": generation,
        "listeners": [{"id": "web", "protocol": "TCP", "bind_addresses": ["127.0.0.1"],
                        "protocol_port": port, "default_pool_id": "p"}],
        "pools": [{"id": "p", "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
                   "members": [{"id": "b", "address": "127.0.0.1",
                                "protocol_port": b.addr.port(), "weight": weight}]}]
    })
    .to_string()
}

#[test]
fn mutual_tls_accepts_the_controller_and_refuses_everyone_else() {
    let dir = TempDir::new("mtls");
    let pki = Pki::new();
    let agent = siphon_agent::start(&agent_config(&dir, &pki, &dir.path("dp.sock"))).unwrap();
    let good = client_tls(
        &pki.server_ca,
        Some(pki.controller.issue(&["controller"], false)),
    );
    let (code, body) = https(&good, agent.addr, Method::GET, "/v1/info", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["id"], "amp-1");
    assert!(info["uptime_seconds"].is_u64());

    let stranger = Ca::new("someone else");
    for (what, tls) in [
        ("no certificate", client_tls(&pki.server_ca, None)),
        (
            "another CA",
            client_tls(&pki.server_ca, Some(stranger.issue(&["x"], false))),
        ),
        (
            "expired",
            client_tls(
                &pki.server_ca,
                Some(pki.controller.issue(&["controller"], true)),
            ),
        ),
    ] {
        let r = https(&tls, agent.addr, Method::GET, "/v1/info", None);
        assert!(r.is_err(), "{what}: {r:?}");
    }
    // The controller still gets in after the refusals.
    assert_eq!(
        https(&good, agent.addr, Method::GET, "/v1/info", None)
            .unwrap()
            .0,
        200
    );
}

#[test]
fn pushes_reach_the_dataplane_persist_and_come_back_after_a_restart() {
    let dir = TempDir::new("push");
    let pki = Pki::new();
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let dp_socket = dir.path("dp.sock");
    let dp = Dataplane::start(&dp_socket);
    let cfg = agent_config(&dir, &pki, &dp_socket);
    let agent = siphon_agent::start(&cfg).unwrap();
    let tls = client_tls(
        &pki.server_ca,
        Some(pki.controller.issue(&["controller"], false)),
    );
    let port = free_port();
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let push =
        |body: String| https(&tls, agent.addr, Method::PUT, "/v1/config", Some(body)).unwrap();
    let get = |path: &str| https(&tls, agent.addr, Method::GET, path, None).unwrap();
    let generation =
        |text: &str| serde_json::from_str::<Value>(text).unwrap()["generation"].clone();

    // Push: applied, persisted, traffic flows.
    let (code, body) = push(push_body(5, port, &b, 1));
    assert_eq!(code, 200, "{body}");
    assert_eq!(generation(&body), 5);
    assert_eq!(connect_greeting(front).unwrap().1, "b");
    let on_disk = std::fs::read_to_string(dir.path("state/config.json")).unwrap();
    assert_eq!(generation(&on_disk), 5);

    // The same push again: 200, same generation.
    let (code, _) = push(push_body(5, port, &b, 1));
    assert_eq!(code, 200);

    // Rejected by the dataplane: relayed, nothing persisted or changed.
    let (code, body) = push(push_body(6, port, &b, 999));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("weight"), "{body}");
    assert_eq!(
        std::fs::read_to_string(dir.path("state/config.json")).unwrap(),
        on_disk
    );
    let (_, body) = get("/v1/config");
    assert_eq!(generation(&body), 5);
    assert_eq!(dp.generation(), 5);
    // A stale one: the dataplane's 409 passes through.
    let (code, _) = push(push_body(4, port, &b, 1));
    assert_eq!(code, 409);
    // A generation JSON clients could not keep exact: 400, nothing applied
    // or persisted; 2^53 itself is fine.
    let (code, body) = push(push_body(9_007_199_254_740_993, port, &b, 1));
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("generation must be at most 2^53 so JSON clients keep it exact"),
        "{body}"
    );
    assert_eq!(dp.generation(), 5);
    assert_eq!(
        std::fs::read_to_string(dir.path("state/config.json")).unwrap(),
        on_disk
    );
    // Status and stats come from the dataplane.
    let (code, body) = get("/v1/status");
    assert_eq!(code, 200);
    assert_eq!(generation(&body), 5);

    // The dataplane dies and a fresh, empty one starts: the agent puts the
    // persisted config back within a second.
    drop(dp);
    let dp = Dataplane::start(&dp_socket);
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(1), || dp.generation() == 5));
    eprintln!("config back after {:?}", t.elapsed());
    assert_eq!(connect_greeting(front).unwrap().1, "b");

    // The agent dies: traffic keeps flowing.
    drop(agent);
    assert_eq!(connect_greeting(front).unwrap().1, "b");

    // A new agent on the same state re-applies nothing new, serves the
    // persisted config.
    let agent = siphon_agent::start(&cfg).unwrap();
    let (_, body) = https(&tls, agent.addr, Method::GET, "/v1/config", None).unwrap();
    assert_eq!(generation(&body), 5);
}

#[test]
fn heartbeats_arrive_signed_and_forged_stale_or_replayed_ones_are_rejected() {
    use siphon_agent::heartbeat::{HeartbeatError, Verifier};
    let dir = TempDir::new("hb");
    let pki = Pki::new();
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let dp_socket = dir.path("dp.sock");
    let dp = Dataplane::start(&dp_socket);
    let port = free_port();
    let cfg_json = push_body(5, port, &b, 1);
    assert!(dp.apply(&cfg_json).is_success());

    let manager = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let secret = "a shared heartbeat key, 32 bytes";
    std::fs::write(dir.path("hb.key"), format!("{secret}\n")).unwrap();
    let mut cfg = agent_config(&dir, &pki, &dp_socket);
    cfg.heartbeat = Some(siphon_agent::config::Heartbeat {
        destinations: vec![manager.local_addr().unwrap()],
        interval_ms: 100,
        key_file: Some(dir.path("hb.key")),
    });
    let agent = siphon_agent::start(&cfg).unwrap();

    // Sub-second interval: about ten in a second.
    let mut verifier = Verifier::new(secret.as_bytes(), Duration::from_secs(5));
    let mut got = Vec::new();
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    while start.elapsed() < Duration::from_secs(1) {
        let n = manager.recv(&mut buf).unwrap();
        let d = buf[..n].to_vec();
        let beat = verifier.verify(&d, std::time::SystemTime::now()).unwrap();
        got.push((beat, d));
    }
    assert!(got.len() >= 5, "{} heartbeats in 1 s", got.len());
    let (last, datagram) = got.last().unwrap().clone();
    assert_eq!(last.amphora_id, "amp-1");
    assert_eq!(last.generation, Some(5));
    // Applied to the dataplane directly: nothing persisted by the agent.
    assert_eq!(last.persisted_generation, None);
    assert_eq!(
        siphon_agent::heartbeat::envelope(&datagram).unwrap(),
        siphon_agent::heartbeat::Envelope {
            amphora_id: "amp-1",
            key_id: siphon_agent::heartbeat::BOOTSTRAP_KEY_ID
        }
    );
    assert_eq!(last.listeners[0].id, "web");
    assert_eq!(
        last.listeners[0].operating_status,
        siphon_proto::OperatingStatus::Online
    );
    assert_eq!(
        last.members[0].operating_status,
        siphon_proto::OperatingStatus::NoMonitor
    );
    assert!(got.windows(2).all(|w| w[1].0.seq > w[0].0.seq));

    // Replayed, forged, signed with another key, or old: all refused.
    let now = std::time::SystemTime::now();
    assert!(matches!(
        verifier.verify(&datagram, now),
        Err(HeartbeatError::Replayed { .. })
    ));
    let mut forged = datagram.clone();
    let n = forged.len();
    forged[n - 3] ^= 0x20;
    let mut fresh = Verifier::new(secret.as_bytes(), Duration::from_secs(5));
    assert_eq!(fresh.verify(&forged, now), Err(HeartbeatError::BadMac));
    let mut wrong_key = Verifier::new(b"not the key at all, 32 bytes ...", Duration::from_secs(5));
    assert_eq!(
        wrong_key.verify(&datagram, now),
        Err(HeartbeatError::BadMac)
    );
    let an_hour_later = now + Duration::from_secs(3600);
    assert!(matches!(
        fresh.verify(&datagram, an_hour_later),
        Err(HeartbeatError::Stale { .. })
    ));
    drop(agent);
}

/// The certificate the agent presents (DER), through `tls`.
fn served_cert(tls: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = tls.connect(name, tcp).await.unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    })
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn certificates_rotate_without_a_restart() {
    let dir = TempDir::new("rotate");
    let pki = Pki::new();
    let cfg = agent_config(&dir, &pki, &dir.path("dp.sock"));
    let agent = siphon_agent::start(&cfg).unwrap();
    let old_controller = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    assert_eq!(
        https(&old_controller, agent.addr, Method::GET, "/v1/info", None)
            .unwrap()
            .0,
        200
    );

    // A new agent certificate (new key) from the CA the controller trusts
    // for agents, and a new controller CA.
    let next_controller = Ca::new("controller CA 2");
    let (cert, key) = pki.server_ca.issue(&["127.0.0.1"], false);
    let body =
        serde_json::json!({"cert": cert, "key": key, "client_ca": next_controller.cert.pem()});
    let (code, reply) = https(
        &old_controller,
        agent.addr,
        Method::PUT,
        "/v1/certificates",
        Some(body.to_string()),
    )
    .unwrap();
    assert_eq!(code, 200, "{reply}");

    // From the next handshake on: the new controller is in, the old one out,
    // and the agent presents its new certificate.
    let new_controller = client_tls(&pki.server_ca, Some(next_controller.issue(&["c"], false)));
    assert_eq!(
        https(&new_controller, agent.addr, Method::GET, "/v1/info", None)
            .unwrap()
            .0,
        200
    );
    assert_eq!(served_cert(&new_controller, agent.addr), der_of(&cert));
    assert!(https(&old_controller, agent.addr, Method::GET, "/v1/info", None).is_err());
    // Written to the configured files: a restarted agent keeps them.
    assert_eq!(std::fs::read_to_string(&cfg.tls.cert).unwrap(), cert);
    drop(agent);
    let agent = siphon_agent::start(&cfg).unwrap();
    assert_eq!(
        https(&new_controller, agent.addr, Method::GET, "/v1/info", None)
            .unwrap()
            .0,
        200
    );

    // Garbage is refused and changes nothing.
    let bad = serde_json::json!({"cert": "not a cert", "key": key, "client_ca": next_controller.cert.pem()});
    let (code, _) = https(
        &new_controller,
        agent.addr,
        Method::PUT,
        "/v1/certificates",
        Some(bad.to_string()),
    )
    .unwrap();
    assert_eq!(code, 400);
    assert_eq!(
        https(&new_controller, agent.addr, Method::GET, "/v1/info", None)
            .unwrap()
            .0,
        200
    );
    assert_eq!(std::fs::read_to_string(&cfg.tls.cert).unwrap(), cert);
}

/// A CA whose leaves the test shapes (validity dates included).
struct OwnCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl OwnCa {
    fn new(name: &str) -> OwnCa {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        OwnCa { cert, key }
    }

    /// PEM certificate and key for `names`, valid from year `from` to year
    /// `to` (None: rcgen's default, valid now).
    fn leaf(&self, names: &[&str], years: Option<(i32, i32)>) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        if let Some((from, to)) = years {
            p.not_before = rcgen::date_time_ymd(from, 1, 1);
            p.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[test]
fn rotations_that_would_lock_the_controller_out_are_refused() {
    let dir = TempDir::new("rotate-refused");
    let pki = Pki::new();
    let mut cfg = agent_config(&dir, &pki, &dir.path("dp.sock"));
    // The agent's CA is one whose leaves this test shapes.
    let amphora_ca = OwnCa::new("amphora CA");
    let (cert, key) = amphora_ca.leaf(&["127.0.0.1"], None);
    std::fs::write(&cfg.tls.cert, &cert).unwrap();
    std::fs::write(&cfg.tls.key, &key).unwrap();
    std::fs::write(dir.path("amphora-ca.crt"), amphora_ca.cert.pem()).unwrap();
    let agent = siphon_agent::start(&cfg).unwrap();
    let controller = client_tls_trusting(
        amphora_ca.cert.der(),
        Some(pki.controller.issue(&["c"], false)),
    );
    let next_controller = Ca::new("controller CA 2");
    let rotate = |addr, cert: &str, key: &str, client_ca: &str| {
        let body = serde_json::json!({"cert": cert, "key": key, "client_ca": client_ca});
        https(
            &controller,
            addr,
            Method::PUT,
            "/v1/certificates",
            Some(body.to_string()),
        )
        .unwrap()
    };

    let (_, other_key) = amphora_ca.leaf(&["127.0.0.1"], None);
    let (good_cert, good_key) = amphora_ca.leaf(&["127.0.0.1"], None);
    let cases = [
        (
            "expired",
            amphora_ca.leaf(&["127.0.0.1"], Some((2020, 2021))),
            "expired",
        ),
        (
            "not yet valid",
            amphora_ca.leaf(&["127.0.0.1"], Some((2099, 2100))),
            "not valid yet",
        ),
        (
            "wrong name",
            amphora_ca.leaf(&["amp-2"], None),
            "not valid for name",
        ),
        (
            "foreign CA",
            OwnCa::new("foreign").leaf(&["127.0.0.1"], None),
            "UnknownIssuer",
        ),
        (
            "key of another certificate",
            (good_cert.clone(), other_key),
            "does not match",
        ),
    ];
    for (what, (new_cert, new_key), reason) in cases {
        let (code, body) = rotate(agent.addr, &new_cert, &new_key, &next_controller.cert.pem());
        assert_eq!(code, 400, "{what}: {body}");
        let e = serde_json::from_str::<Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned();
        eprintln!("{what}: {e}");
        assert!(e.contains(reason), "{what}: {e}");
        // Nothing written, nothing swapped: the old controller gets in and
        // is served the old certificate.
        assert_eq!(
            std::fs::read_to_string(&cfg.tls.cert).unwrap(),
            cert,
            "{what}"
        );
        assert_eq!(
            std::fs::read_to_string(&cfg.tls.key).unwrap(),
            key,
            "{what}"
        );
        assert_eq!(
            https(&controller, agent.addr, Method::GET, "/v1/info", None)
                .unwrap()
                .0,
            200,
            "{what}"
        );
        assert_eq!(
            served_cert(&controller, agent.addr),
            der_of(&cert),
            "{what}"
        );
    }
    // A client CA that does not parse.
    let (code, body) = rotate(agent.addr, &good_cert, &good_key, "not a CA");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("client_ca"), "{body}");
    assert_eq!(served_cert(&controller, agent.addr), der_of(&cert));
    // The good one passes.
    let (code, body) = rotate(
        agent.addr,
        &good_cert,
        &good_key,
        &pki.controller.cert.pem(),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(served_cert(&controller, agent.addr), der_of(&good_cert));
    drop(agent);

    // Without tls.server_ca, rotation is refused and says why.
    cfg.tls.server_ca = None;
    let agent = siphon_agent::start(&cfg).unwrap();
    let (good_cert, good_key) = amphora_ca.leaf(&["127.0.0.1"], None);
    let (code, body) = rotate(
        agent.addr,
        &good_cert,
        &good_key,
        &pki.controller.cert.pem(),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("tls.server_ca"), "{body}");
}

/// `ip -o addr show dev IF` inside the namespace.
fn addresses(ns: &siphon_testkit::netns::Netns, dev: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-o", "addr", "show", "dev", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vips_are_plumbed_through_netlink_and_only_the_agents_own_are_removed() {
    let test = "vips_are_plumbed_through_netlink_and_only_the_agents_own_are_removed";
    if !siphon_testkit::root_or_skip(test) {
        return;
    }
    let ns = siphon_testkit::netns::Netns::create("vip").unwrap();
    // A veth pair (this kernel may have no dummy interfaces); the
    // namespace end is the VIP interface, its 198.18.6.2/24 the management
    // address.
    let outside = format!("sphv{}", std::process::id() % 100_000);
    ns.veth(&outside, "198.18.6.1/24", "vip0", "198.18.6.2/24", 1500)
        .unwrap();
    let dir = TempDir::new("vips");
    let pki = Pki::new();
    let cfg = agent_config(&dir, &pki, &dir.path("dp.sock"));
    // The agent's threads start inside the namespace; its local socket is
    // a file, reachable from here.
    let agent = ns.enter(|| siphon_agent::start(&cfg).unwrap()).unwrap();
    let put = |agent: &siphon_agent::Handle, body: Value| {
        let r = local(&agent.local_socket, Method::PUT, "/v1/vips", &body);
        (
            r.status,
            serde_json::from_str::<Value>(&r.body).unwrap_or_default(),
        )
    };
    let owned = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path("state/vips.json")).unwrap())
            .unwrap()
    };

    let add =
        serde_json::json!({"interface": "vip0", "add": ["198.18.7.10", "2001:db8:7::10/128"]});
    let (code, body) = put(&agent, add.clone());
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["added"].as_array().unwrap().len(), 2);
    let shown = addresses(&ns, "vip0");
    assert!(
        shown.contains("198.18.7.10/32") && shown.contains("2001:db8:7::10/128"),
        "{shown}"
    );
    assert_eq!(
        owned(),
        serde_json::json!({"vip0": ["198.18.7.10/32", "2001:db8:7::10/128"]})
    );
    // Again: nothing new, no error, still ours.
    let (code, body) = put(&agent, add);
    assert_eq!(code, 200);
    assert_eq!(body["already_present"].as_array().unwrap().len(), 2);
    assert_eq!(owned()["vip0"].as_array().unwrap().len(), 2);

    // The management address: asked to add, it is there already, and it
    // does not become ours; removing it (or loopback's) is refused, and
    // nothing else in that request happens.
    let (code, body) = put(
        &agent,
        serde_json::json!({"interface": "vip0", "add": ["198.18.6.2/24"]}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["already_present"][0], "198.18.6.2/24");
    for (interface, addr) in [
        ("vip0", "198.18.6.2/24"),
        ("vip0", "198.18.6.2"),
        ("lo", "127.0.0.1/8"),
    ] {
        let (code, body) = put(
            &agent,
            serde_json::json!({"interface": interface, "add": ["198.18.7.20"],
                               "remove": ["198.18.7.10", addr]}),
        );
        assert_eq!(code, 400, "{addr}: {body}");
        let e = body["error"].as_str().unwrap();
        assert!(e.contains("not a VIP this agent added"), "{e}");
    }
    let shown = addresses(&ns, "vip0");
    assert!(shown.contains("198.18.6.2/24"), "{shown}");
    assert!(shown.contains("198.18.7.10/32"), "{shown}");
    assert!(!shown.contains("198.18.7.20"), "{shown}");
    assert!(addresses(&ns, "lo").contains("127.0.0.1/8"));

    // Addresses that cannot be VIPs: 400 up front, nothing changed.
    for bad in [
        "224.0.0.5",
        "ff02::1",
        "127.0.0.2",
        "169.254.0.9",
        "0.0.0.0",
        "255.255.255.255",
        "198.18.0.0/7",
        "not-an-ip",
    ] {
        let (code, body) = put(
            &agent,
            serde_json::json!({"interface": "vip0", "add": ["198.18.7.11", bad]}),
        );
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    assert!(!addresses(&ns, "vip0").contains("198.18.7.11"));
    let (code, body) = put(
        &agent,
        serde_json::json!({"interface": "nope0", "add": ["198.18.7.12"]}),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no interface"));

    // A restarted agent still knows its own: it removes them.
    drop(agent);
    let agent = ns.enter(|| siphon_agent::start(&cfg).unwrap()).unwrap();
    let (code, body) = put(
        &agent,
        serde_json::json!({"interface": "vip0", "remove": ["198.18.7.10/32"]}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["removed"][0], "198.18.7.10/32");
    // Again (a retry whose first answer was lost): absent, fine.
    let (code, body) = put(
        &agent,
        serde_json::json!({"interface": "vip0", "remove": ["198.18.7.10/32"]}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["absent"][0], "198.18.7.10/32");
    let shown = addresses(&ns, "vip0");
    assert!(
        !shown.contains("198.18.7.10")
            && shown.contains("2001:db8:7::10")
            && shown.contains("198.18.6.2/24"),
        "{shown}"
    );
    // Ours but removed behind the agent's back: absent, and forgotten.
    ns.ip(&["addr", "del", "2001:db8:7::10/128", "dev", "vip0"])
        .unwrap();
    let (code, body) = put(
        &agent,
        serde_json::json!({"interface": "vip0", "remove": ["2001:db8:7::10/128"]}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["absent"][0], "2001:db8:7::10/128");
    assert_eq!(owned(), serde_json::json!({}));
    drop(agent);

    // A corrupt vips.json: set aside, the agent starts owning nothing.
    std::fs::write(dir.path("state/vips.json"), b"[[[").unwrap();
    let agent = ns.enter(|| siphon_agent::start(&cfg).unwrap()).unwrap();
    assert_eq!(
        std::fs::read(dir.path("state/vips.json.corrupt")).unwrap(),
        b"[[["
    );
    let (code, _) = put(
        &agent,
        serde_json::json!({"interface": "vip0", "add": ["198.18.7.30"]}),
    );
    assert_eq!(code, 200);
    assert_eq!(owned(), serde_json::json!({"vip0": ["198.18.7.30/32"]}));
    drop(agent);
}

/// The hardware address of `dev`, as `ip` prints it (`-n NS` when in a
/// namespace).
fn mac_of(ns: Option<&siphon_testkit::netns::Netns>, dev: &str) -> String {
    let mut cmd = std::process::Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", &ns.name]);
    }
    let out = cmd
        .args(["-o", "link", "show", "dev", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no hardware address: {text}"))
        .to_owned()
}

/// What this namespace's neighbour table says of `addr` on `dev`.
fn neighbour(dev: &str, addr: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["neigh", "show", addr, "dev", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_vip_added_is_announced_and_the_neighbours_forget_the_node_that_had_it() {
    let test = "a_vip_added_is_announced_and_the_neighbours_forget_the_node_that_had_it";
    if !siphon_testkit::root_or_skip(test) {
        return;
    }
    // This namespace is the router; the VIP is on the link's subnet and
    // was, before, at another node (a made-up hardware address, learned
    // as a dynamic entry would be).
    let ns = siphon_testkit::netns::Netns::create("garp").unwrap();
    let outside = format!("spha{}", std::process::id() % 100_000);
    ns.veth(&outside, "198.18.8.1/24", "vip0", "198.18.8.2/24", 1500)
        .unwrap();
    siphon_testkit::netns::ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:8::1/64",
        "dev",
        &outside,
        "nodad",
    ])
    .unwrap();
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:8::2/64",
        "dev",
        "vip0",
        "nodad",
    ])
    .unwrap();
    let old = "02:00:5e:00:00:99";
    for vip in ["198.18.8.10", "2001:db8:8::10"] {
        siphon_testkit::netns::ip(&[
            "neigh",
            "replace",
            vip,
            "lladdr",
            old,
            "dev",
            &outside,
            "nud",
            "reachable",
        ])
        .unwrap();
        assert!(neighbour(&outside, vip).contains(old));
    }
    let mac = mac_of(Some(&ns), "vip0");
    let dir = TempDir::new("garp");
    let pki = Pki::new();
    let cfg = agent_config(&dir, &pki, &dir.path("dp.sock"));
    let agent = ns.enter(|| siphon_agent::start(&cfg).unwrap()).unwrap();
    let body = serde_json::json!({"interface": "vip0", "add": ["198.18.8.10", "2001:db8:8::10"]});
    let r = local(&agent.local_socket, Method::PUT, "/v1/vips", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    // Every announcement repeats within two seconds; the first does it.
    for vip in ["198.18.8.10", "2001:db8:8::10"] {
        let moved = siphon_testkit::eventually(Duration::from_secs(4), || {
            neighbour(&outside, vip).contains(&mac)
        });
        assert!(
            moved,
            "{vip}: still {:?}, want {mac}",
            neighbour(&outside, vip)
        );
    }
    // And traffic goes there: a listener on each VIP in the namespace
    // takes a connection from here (the IPv6 one once its duplicate
    // address detection is over).
    for vip in ["198.18.8.10:0", "[2001:db8:8::10]:0"] {
        let mut bound = None;
        siphon_testkit::eventually(Duration::from_secs(5), || {
            bound = ns.enter(|| std::net::TcpListener::bind(vip)).unwrap().ok();
            bound.is_some()
        });
        let l = bound.unwrap_or_else(|| panic!("cannot bind {vip}"));
        let to = l.local_addr().unwrap();
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{to}: {e}"));
    }
    drop(agent);
}

/// The VIPs listed in the next heartbeat on `manager` that `until`
/// accepts (checked with `verifier`); panics after 5 s.
fn vips_reported(
    manager: &std::net::UdpSocket,
    verifier: &mut siphon_agent::heartbeat::Verifier,
    what: &str,
    mut until: impl FnMut(&Option<Vec<String>>) -> bool,
) -> Option<Vec<String>> {
    let mut last = None;
    let ok = receive_until(manager, Duration::from_secs(5), |d| {
        let beat = verifier.verify(d, std::time::SystemTime::now()).unwrap();
        last = beat.vips;
        until(&last)
    });
    assert!(ok, "{what}: the heartbeats said {last:?}");
    last
}

#[test]
fn heartbeats_list_the_vips_held_and_a_vip_deleted_by_hand_is_added_again() {
    let test = "heartbeats_list_the_vips_held_and_a_vip_deleted_by_hand_is_added_again";
    if !siphon_testkit::root_or_skip(test) {
        return;
    }
    let ns = siphon_testkit::netns::Netns::create("vipr").unwrap();
    let outside = format!("sphr{}", std::process::id() % 100_000);
    ns.veth(&outside, "198.18.9.1/24", "vip0", "198.18.9.2/24", 1500)
        .unwrap();
    let dir = TempDir::new("vipr");
    let pki = Pki::new();
    // The health manager, inside the namespace with the agent.
    let manager = ns
        .enter(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let secret = "a shared heartbeat key, 32 bytes";
    std::fs::write(dir.path("hb.key"), format!("{secret}\n")).unwrap();
    let mut cfg = agent_config(&dir, &pki, &dir.path("dp.sock"));
    cfg.heartbeat = Some(siphon_agent::config::Heartbeat {
        destinations: vec![manager.local_addr().unwrap()],
        interval_ms: 50,
        key_file: Some(dir.path("hb.key")),
    });
    let agent = ns.enter(|| siphon_agent::start(&cfg).unwrap()).unwrap();
    let mut verifier =
        siphon_agent::heartbeat::Verifier::new(secret.as_bytes(), Duration::from_secs(5));
    let put = |body: Value| {
        let r = local(&agent.local_socket, Method::PUT, "/v1/vips", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str::<Value>(&r.body).unwrap()
    };

    // Nothing asked for: an empty list (said, and empty), even with no
    // dataplane to answer.
    vips_reported(&manager, &mut verifier, "no VIPs", |v| {
        v.as_deref() == Some(&[])
    });
    // Two VIPs added, and the management address asked for (there
    // already: held, though never the agent's).
    put(serde_json::json!({"interface": "vip0",
                           "add": ["198.18.10.10", "2001:db8:a::10/128", "198.18.9.2/24"]}));
    let all = vec![
        "198.18.9.2/24".to_owned(),
        "198.18.10.10/32".to_owned(),
        "2001:db8:a::10/128".to_owned(),
    ];
    vips_reported(&manager, &mut verifier, "three VIPs", |v| {
        v.as_ref() == Some(&all)
    });

    // Someone deletes one by hand: the next heartbeats leave it out.
    ns.ip(&["addr", "del", "198.18.10.10/32", "dev", "vip0"])
        .unwrap();
    assert!(!addresses(&ns, "vip0").contains("198.18.10.10"));
    vips_reported(&manager, &mut verifier, "the VIP deleted", |v| {
        v.as_deref() == Some(&[all[0].clone(), all[2].clone()])
    });
    // Still the agent's (vips.json), and asked for again it is added
    // again, not skipped.
    let owned: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("state/vips.json")).unwrap())
            .unwrap();
    assert_eq!(
        owned,
        serde_json::json!({"vip0": ["198.18.10.10/32", "2001:db8:a::10/128"]})
    );
    let body = put(serde_json::json!({"interface": "vip0", "add": ["198.18.10.10"]}));
    assert_eq!(
        body["added"],
        serde_json::json!(["198.18.10.10/32"]),
        "{body}"
    );
    assert_eq!(body["already_present"], serde_json::json!([]), "{body}");
    assert!(addresses(&ns, "vip0").contains("198.18.10.10/32"));
    vips_reported(&manager, &mut verifier, "the VIP back", |v| {
        v.as_ref() == Some(&all)
    });
    // Once more: there, so left alone.
    let body = put(serde_json::json!({"interface": "vip0", "add": ["198.18.10.10"]}));
    assert_eq!(
        body["already_present"],
        serde_json::json!(["198.18.10.10/32"]),
        "{body}"
    );

    // The interface gone: none held.
    ns.ip(&["link", "del", "vip0"]).unwrap();
    vips_reported(&manager, &mut verifier, "the interface gone", |v| {
        v.as_deref() == Some(&[])
    });
    drop(agent);
}

/// The `siphon-dataplane` binary (one worker) on `socket`.
fn spawn_dataplane(socket: &Path, log: &Path) -> Proc {
    let mut cmd = std::process::Command::new(process::binary("siphon-dataplane"));
    cmd.args(["run", "--workers", "1", "--socket"]).arg(socket);
    Proc::spawn(cmd, log)
}

#[test]
fn a_killed_dataplane_process_gets_its_config_back_within_a_second() {
    let dir = TempDir::new("kill");
    let pki = Pki::new();
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let socket = dir.path("dp.sock");
    let dp = spawn_dataplane(&socket, &dir.path("dp1.log"));
    let cfg = agent_config(&dir, &pki, &socket);
    let agent = siphon_agent::start(&cfg).unwrap();
    let tls = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    let port = free_port();
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(eventually(Duration::from_secs(10), || socket.exists()));
    let push = push_body(9, port, &b, 1);
    assert!(eventually(Duration::from_secs(10), || {
        https(
            &tls,
            agent.addr,
            Method::PUT,
            "/v1/config",
            Some(push.clone()),
        )
        .is_ok_and(|(code, _)| code == 200)
    }));
    assert_eq!(connect_greeting(front).unwrap().1, "b");

    // SIGKILL: the socket file stays behind, the listener goes.
    drop(dp);
    assert!(connect_greeting(front).is_err());
    let _dp = spawn_dataplane(&socket, &dir.path("dp2.log"));
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || connect_greeting(front).is_ok()),
        "{}",
        std::fs::read_to_string(dir.path("dp2.log")).unwrap_or_default()
    );
    let took = t.elapsed();
    eprintln!("traffic back {took:?} after the restart (process start included)");
    assert!(
        took < Duration::from_secs(1) + Duration::from_millis(500),
        "{took:?}"
    );
    drop(agent);
    assert_eq!(
        connect_greeting(front).unwrap().1,
        "b",
        "agent gone, traffic flows"
    );
}

/// Datagrams received on `socket` until `until` says stop or `limit` runs
/// out; each is checked by `until` as it comes.
fn receive_until(
    socket: &std::net::UdpSocket,
    limit: Duration,
    mut until: impl FnMut(&[u8]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            if until(&buf[..n]) {
                return true;
            }
        }
    }
    false
}

const PUSHED_KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn pushed_key_bytes() -> Vec<u8> {
    (0u8..32).collect()
}

#[test]
fn a_pushed_heartbeat_key_signs_every_later_heartbeat_and_survives_a_restart() {
    use siphon_agent::heartbeat::{envelope, key, open};
    let dir = TempDir::new("hbkey");
    let pki = Pki::new();
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let dp_socket = dir.path("dp.sock");
    let _dp = Dataplane::start(&dp_socket);
    let manager = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let bootstrap = "the fleet's bootstrap key, 32 b.";
    std::fs::write(dir.path("hb.key"), bootstrap).unwrap();
    let mut cfg = agent_config(&dir, &pki, &dp_socket);
    cfg.heartbeat = Some(siphon_agent::config::Heartbeat {
        destinations: vec![manager.local_addr().unwrap()],
        interval_ms: 50,
        key_file: Some(dir.path("hb.key")),
    });
    let agent = siphon_agent::start(&cfg).unwrap();
    let tls = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    let info_key_id = |addr| {
        let (code, body) = https(&tls, addr, Method::GET, "/v1/info", None).unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["heartbeat_key_id"].clone()
    };
    let put_key = |addr, body: &str| {
        https(
            &tls,
            addr,
            Method::PUT,
            "/v1/heartbeat-key",
            Some(body.to_owned()),
        )
        .unwrap()
    };

    // On the bootstrap key: key id 0, verified with the bootstrap secret.
    assert_eq!(info_key_id(agent.addr), 0);
    assert!(receive_until(&manager, Duration::from_secs(3), |d| {
        envelope(d).unwrap().key_id == 0 && open(d, &key(bootstrap.as_bytes())).is_ok()
    }));
    // A persisted config shows in the heartbeats.
    let port = free_port();
    let (code, body) = https(
        &tls,
        agent.addr,
        Method::PUT,
        "/v1/config",
        Some(push_body(12, port, &b, 1)),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");

    // Bad pushes: 400 with a JSON reason, nothing written, key unchanged.
    for bad in [
        format!(r#"{{"key_id": 0, "key": "{PUSHED_KEY_HEX}"}}"#),
        format!(r#"{{"key_id": 7, "key": "{}"}}"#, &PUSHED_KEY_HEX[2..]),
        format!(r#"{{"key_id": 7, "key": "{PUSHED_KEY_HEX}", "also": 1}}"#),
        r#"{"key_id": 7}"#.to_owned(),
        "not json".to_owned(),
    ] {
        let (code, body) = put_key(agent.addr, &bad);
        assert_eq!(code, 400, "{bad}: {body}");
        let reason: Value = serde_json::from_str(&body).unwrap();
        assert!(reason["error"].is_string(), "{body}");
    }
    assert!(!dir.path("state/heartbeat-key.json").exists());
    assert_eq!(info_key_id(agent.addr), 0);

    // The controller pushes key 7: persisted 0600, used from then on.
    let push = format!(r#"{{"key_id": 7, "key": "{PUSHED_KEY_HEX}"}}"#);
    let (code, body) = put_key(agent.addr, &push);
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["key_id"], 7);
    assert_eq!(put_key(agent.addr, &push).0, 200, "idempotent");
    assert_eq!(info_key_id(agent.addr), 7);
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir.path("state/heartbeat-key.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let own = key(&pushed_key_bytes());
    let mut signed_with_7 = 0;
    assert!(receive_until(&manager, Duration::from_secs(3), |d| {
        let e = envelope(d).unwrap();
        if e.key_id != 7 {
            // Sent before the push landed.
            assert_eq!(signed_with_7, 0, "a key-0 heartbeat after key 7 ones");
            return false;
        }
        let beat = open(d, &own).unwrap();
        assert_eq!(e.amphora_id, "amp-1");
        assert!(open(d, &key(bootstrap.as_bytes())).is_err());
        assert_eq!(beat.persisted_generation, Some(12));
        signed_with_7 += 1;
        signed_with_7 == 5
    }));

    // A restarted agent (same state directory) goes on with key 7 from its
    // first heartbeat.
    drop(agent);
    while manager.recv(&mut [0u8; 65536]).is_ok() {}
    let agent = siphon_agent::start(&cfg).unwrap();
    assert_eq!(info_key_id(agent.addr), 7);
    let mut first = true;
    assert!(receive_until(&manager, Duration::from_secs(3), |d| {
        assert_eq!(
            envelope(d).unwrap().key_id,
            7,
            "first after restart: {first}"
        );
        let beat = open(d, &own).unwrap();
        assert_eq!(beat.persisted_generation, Some(12));
        first = false;
        true
    }));
    drop(agent);

    // A corrupt key file: set aside, the agent starts on the bootstrap key.
    std::fs::write(
        dir.path("state/heartbeat-key.json"),
        b"{\"key_id\": 7, \"ke",
    )
    .unwrap();
    let agent = siphon_agent::start(&cfg).unwrap();
    assert_eq!(info_key_id(agent.addr), 0);
    assert_eq!(
        std::fs::read(dir.path("state/heartbeat-key.json.corrupt")).unwrap(),
        b"{\"key_id\": 7, \"ke"
    );
}

#[test]
fn without_any_key_nothing_is_sent_until_one_is_pushed() {
    use siphon_agent::heartbeat::{envelope, key, open};
    let dir = TempDir::new("nokey");
    let pki = Pki::new();
    let manager = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut cfg = agent_config(&dir, &pki, &dir.path("dp.sock"));
    cfg.heartbeat = Some(siphon_agent::config::Heartbeat {
        destinations: vec![manager.local_addr().unwrap()],
        interval_ms: 20,
        key_file: None,
    });
    let agent = siphon_agent::start(&cfg).unwrap();
    let tls = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    let (_, body) = https(&tls, agent.addr, Method::GET, "/v1/info", None).unwrap();
    assert!(serde_json::from_str::<Value>(&body).unwrap()["heartbeat_key_id"].is_null());
    assert!(!receive_until(&manager, Duration::from_millis(500), |_| {
        true
    }));
    let push = format!(r#"{{"key_id": 1, "key": "{PUSHED_KEY_HEX}"}}"#);
    let (code, body) = https(
        &tls,
        agent.addr,
        Method::PUT,
        "/v1/heartbeat-key",
        Some(push),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(receive_until(&manager, Duration::from_secs(3), |d| {
        envelope(d).unwrap().key_id == 1 && open(d, &key(&pushed_key_bytes())).is_ok()
    }));
}

#[test]
fn a_corrupt_config_file_is_set_aside_and_the_agent_starts_anyway() {
    let dir = TempDir::new("corrupt");
    let pki = Pki::new();
    let rt = siphon_testkit::runtime();
    let b = Backend::start(&rt, "b", "127.0.0.1");
    let dp_socket = dir.path("dp.sock");
    let dp = Dataplane::start(&dp_socket);
    let cfg = agent_config(&dir, &pki, &dp_socket);
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let garbage = b"{\"generation\": 3, \"listeners\": [ torn by a full disk";
    std::fs::write(dir.path("state/config.json"), garbage).unwrap();

    let agent = siphon_agent::start(&cfg).unwrap();
    assert_eq!(
        std::fs::read(dir.path("state/config.json.corrupt")).unwrap(),
        garbage
    );
    assert!(!dir.path("state/config.json").exists());
    let tls = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    let (code, body) = https(&tls, agent.addr, Method::GET, "/v1/config", None).unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no config pushed yet"), "{body}");

    // The controller pushes again: applied and persisted.
    let port = free_port();
    let (code, body) = https(
        &tls,
        agent.addr,
        Method::PUT,
        "/v1/config",
        Some(push_body(4, port, &b, 1)),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(dp.generation(), 4);
    let (code, _) = https(&tls, agent.addr, Method::GET, "/v1/config", None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        connect_greeting(SocketAddr::from(([127, 0, 0, 1], port)))
            .unwrap()
            .1,
        "b"
    );
}

/// The real `siphon-agent` binary, with its own file descriptors to count;
/// killed on drop.
struct AgentProcess {
    child: Proc,
    addr: SocketAddr,
    log: PathBuf,
}

impl AgentProcess {
    fn spawn(dir: &TempDir, pki: &Pki, limits: &str) -> AgentProcess {
        let cfg = agent_config(dir, pki, &dir.path("dp.sock"));
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let toml = AgentToml {
            id: "amp-1",
            listen: addr.to_string(),
            dir: &dir.0,
            dataplane_socket: &cfg.dataplane_socket,
            state_dir: &cfg.state_dir,
            client_ca: &cfg.tls.client_ca,
            heartbeat: None,
            limits,
        }
        .render();
        std::fs::write(dir.path("agent.toml"), toml).unwrap();
        let log = dir.path("agent.log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_siphon-agent"));
        cmd.arg("--config").arg(dir.path("agent.toml"));
        let child = Proc::spawn(cmd, &log);
        AgentProcess { child, addr, log }
    }

    /// Open file descriptors of the agent process.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends `bytes` on a new connection (over TLS with `tls`), then reads
/// until the agent closes it: how long that took after sending, and what
/// came back.
fn closed_after(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    bytes: &[u8],
) -> (Duration, String) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        bytes: &[u8],
    ) -> (Duration, String) {
        s.write_all(bytes).await.unwrap();
        s.flush().await.unwrap();
        let sent = Instant::now();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "still open after 20 s");
        (sent.elapsed(), String::from_utf8_lossy(&got).into_owned())
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        match tls {
            Some(tls) => {
                let name = ServerName::IpAddress(addr.ip().into());
                exchange(tls.connect(name, tcp).await.unwrap(), bytes).await
            }
            None => exchange(tcp, bytes).await,
        }
    })
}

fn wait_ready(tls: &tokio_rustls::TlsConnector, agent: &AgentProcess) {
    assert!(
        eventually(Duration::from_secs(10), || https(
            tls,
            agent.addr,
            Method::GET,
            "/v1/info",
            None
        )
        .is_ok_and(|(code, _)| code == 200)),
        "{}",
        agent.log()
    );
}

#[test]
fn silent_slow_and_idle_clients_are_closed_after_the_timeouts() {
    let dir = TempDir::new("timeouts");
    let pki = Pki::new();
    let agent = AgentProcess::spawn(
        &dir,
        &pki,
        "header_read_timeout_ms = 500\nidle_timeout_ms = 1500\nmax_connections = 64",
    );
    let tls = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    wait_ready(&tls, &agent);
    let around = |what: &str, took: Duration, low_ms: u64, high_ms: u64| {
        eprintln!("{what}: closed after {took:?}");
        assert!(
            took >= Duration::from_millis(low_ms) && took <= Duration::from_millis(high_ms),
            "{what}: closed after {took:?}"
        );
    };

    // A TCP connection that never starts its handshake.
    let (took, _) = closed_after(agent.addr, None, b"");
    around("silent TCP", took, 400, 3000);
    // Half a request head over TLS.
    let (took, _) = closed_after(
        agent.addr,
        Some(&tls),
        b"GET /v1/info HTTP/1.1\r\nHost: agent\r\n",
    );
    around("half a request head", took, 400, 3000);
    // A kept-alive connection after its request: hyper's header-read clock
    // runs while it waits for the next request.
    let (took, reply) = closed_after(
        agent.addr,
        Some(&tls),
        b"GET /v1/info HTTP/1.1\r\nHost: agent\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    around("idle keep-alive", took, 400, 3000);
    // A request body that stops arriving: the idle timeout, not the
    // header-read one.
    let (took, _) = closed_after(
        agent.addr,
        Some(&tls),
        b"PUT /v1/heartbeat-key HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"key_id\": 1,",
    );
    around("stalled body", took, 1300, 4500);
    // None of it got in the controller's way.
    assert_eq!(
        https(&tls, agent.addr, Method::GET, "/v1/info", None)
            .unwrap()
            .0,
        200
    );
}

#[test]
fn idle_clients_cannot_exhaust_the_agent_and_the_controller_still_gets_in() {
    const CAP: usize = 4;
    const SILENT: usize = 24;
    let dir = TempDir::new("cap");
    let pki = Pki::new();
    let agent = AgentProcess::spawn(
        &dir,
        &pki,
        &format!("header_read_timeout_ms = 500\nidle_timeout_ms = 60000\nmax_connections = {CAP}"),
    );
    let tls = client_tls(&pki.server_ca, Some(pki.controller.issue(&["c"], false)));
    wait_ready(&tls, &agent);
    std::thread::sleep(Duration::from_millis(300));
    let baseline = agent.fds();

    // Many clients connect and say nothing.
    let silent: Vec<std::net::TcpStream> = (0..SILENT)
        .map(|_| std::net::TcpStream::connect(agent.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let held = agent.fds();
    eprintln!("agent fds: {baseline} at rest, {held} with {SILENT} silent clients (cap {CAP})");
    assert!(
        held <= baseline + CAP,
        "{held} fds with {SILENT} silent clients, {baseline} at rest: the cap of {CAP} does not hold"
    );

    // The controller asks meanwhile: it waits its turn in the backlog and
    // gets in once the silent ones ahead of it time out (batches of CAP,
    // 500 ms each).
    let t = Instant::now();
    let (code, _) = https(&tls, agent.addr, Method::GET, "/v1/info", None).unwrap();
    assert_eq!(code, 200);
    let took = t.elapsed();
    eprintln!("controller in after {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Every silent one was closed by the agent (EOF, or a reset).
    for mut s in silent {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = s.read(&mut [0u8; 16]);
        assert!(
            matches!(r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
    // Refusals are logged at warn, the first one and then at most one line
    // per 10 s: one line for this burst.
    let log = agent.log();
    assert_eq!(log.matches("TLS handshake refused").count(), 1, "{log}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent.fds() <= baseline + 1,
        "{} fds after, {baseline} before",
        agent.fds()
    );
}

/// The router's BIRD: takes /32 and /128 VIPs of 198.18.109.0/24 and
/// 2001:db8:109::/64 from any amphora on its link, over BGP with BFD,
/// and installs them (several next hops merged: ECMP) in its kernel.
const ROUTER_BIRD: &str = r#"
router id 198.18.9.1;
protocol device {}
protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }
protocol kernel k4 { merge paths on; ipv4 { import none; export all; }; }
protocol kernel k6 { merge paths on; ipv6 { import none; export all; }; }
protocol bgp amps4 {
  local 198.18.9.1 as 64512; neighbor range 198.18.9.0/24 as 64513;
  bfd on; hold time 3; keepalive time 1;
  ipv4 { import where net ~ [ 198.18.109.0/24{32,32} ]; export none; };
}
protocol bgp amps6 {
  local 2001:db8:9::1 as 64512; neighbor range 2001:db8:9::/64 as 64513;
  bfd on; hold time 3; keepalive time 1;
  ipv6 { import where net ~ [ 2001:db8:109::/64{128,128} ]; export none; };
}
"#;

/// Whether `ns`'s routing table has a route to `vip` through a next hop.
fn routed(ns: &siphon_testkit::netns::Netns, vip: &str) -> bool {
    let family = if vip.contains(':') { "-6" } else { "-4" };
    let out = std::process::Command::new("ip")
        .args([family, "-n", &ns.name, "route", "show", vip])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("via")
}

#[test]
fn vips_are_announced_over_bgp_only_while_the_dataplane_serves_them() {
    use siphon_testkit::bird::Bird;
    use siphon_testkit::netns::Netns;
    let test = "vips_are_announced_over_bgp_only_while_the_dataplane_serves_them";
    if !siphon_testkit::root_or_skip(test) {
        return;
    }
    // A router and an amphora on one link.
    let router_ns = Netns::create("bgp-rt").unwrap();
    let amp = Netns::create("bgp-amp").unwrap();
    router_ns.bridge("br0").unwrap();
    router_ns
        .ip(&["addr", "add", "198.18.9.1/24", "dev", "br0"])
        .unwrap();
    router_ns
        .ip(&["addr", "add", "2001:db8:9::1/64", "dev", "br0", "nodad"])
        .unwrap();
    router_ns
        .plug(
            "br0",
            "p-amp",
            Some(&amp),
            "eth0",
            &["198.18.9.2/24", "2001:db8:9::2/64"],
        )
        .unwrap();
    let Some(router) = Bird::start_or_skip(test, &router_ns, "router", ROUTER_BIRD) else {
        return;
    };
    // The amphora's BIRD starts on a file with nothing in it; the agent
    // owns that file from then on.
    let Some(mut speaker) = Bird::start_or_skip(test, &amp, "amphora", "protocol device {}\n")
    else {
        return;
    };
    let dir = TempDir::new("bgp");
    let socket = dir.path("dp.sock");
    let mut dataplane = Dataplane::start_in(Some(&amp), &socket);
    let pki = Pki::new();
    let mut cfg = agent_config(&dir, &pki, &socket);
    cfg.bgp = Some(siphon_agent::bgp::BgpSettings {
        bird_socket: speaker.socket.clone(),
        bird_config: speaker.config.clone(),
        withdraw_delay_ms: 300,
    });
    let agent = amp.enter(|| siphon_agent::start(&cfg).unwrap()).unwrap();
    let call = |method: Method, path: &str, body: Value| {
        let r = local(&agent.local_socket, method, path, &body);
        let v = serde_json::from_str::<Value>(&r.body).unwrap_or_default();
        (r.status, v)
    };
    let b = Backend::start(&siphon_testkit::runtime(), "b", "127.0.0.1");
    let body: Value = serde_json::from_str(&push_body(1, free_port(), &b, 1)).unwrap();
    assert_eq!(call(Method::PUT, "/v1/config", body).0, 200);
    let vips = ["198.18.109.10", "2001:db8:109::10"];
    let (code, body) = call(
        Method::PUT,
        "/v1/vips",
        serde_json::json!({"interface": "lo", "add": vips}),
    );
    assert_eq!(code, 200, "{body}");
    let peering = serde_json::json!({
        "local_as": 64513,
        "router_id": "198.18.9.2",
        "peers": [{"address": "198.18.9.1", "asn": 64512, "password": "not shown"},
                  {"address": "2001:db8:9::1", "asn": 64512}],
        "hold_time_s": 3,
        "bfd": {"min_rx_ms": 100, "min_tx_ms": 100, "multiplier": 3}
    });
    // The router has no password for the IPv4 session: first without.
    let mut plain = peering.clone();
    plain["peers"][0]
        .as_object_mut()
        .unwrap()
        .remove("password");
    let (code, body) = call(Method::PUT, "/v1/bgp", plain.clone());
    assert_eq!(code, 204, "{body}");

    // Both VIPs routed to the amphora by the router, from BGP.
    let announced = |want: bool| {
        eventually(Duration::from_secs(15), || {
            vips.iter().all(|v| routed(&router_ns, v) == want)
        })
    };
    assert!(
        announced(true),
        "not announced: {}\n{}",
        router.birdc("show protocols"),
        speaker.birdc("show protocols all")
    );
    let up = eventually(Duration::from_secs(5), || {
        let s = call(Method::GET, "/v1/bgp", Value::Null).1;
        let sessions = s["status"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        sessions.len() == 2
            && sessions
                .iter()
                .all(|x| x["state"] == "Established" && x["bfd"] == "Up")
            && s["status"]["announced"].as_array().map_or(0, Vec::len) == 2
    });
    assert!(up, "{}", call(Method::GET, "/v1/bgp", Value::Null).1);

    // A peering BIRD would refuse, or one that would inject config: 400,
    // nothing changes.
    for bad in [
        serde_json::json!({"local_as": 0, "peers": plain["peers"]}),
        serde_json::json!({"local_as": 64513, "peers": []}),
        serde_json::json!({"local_as": 64513, "peers": [{"address": "198.18.9.1", "asn": 64512,
            "password": "x\"; }; protocol kernel { ipv4 { export all; }; }; #"}]}),
    ] {
        let (code, body) = call(Method::PUT, "/v1/bgp", bad);
        assert_eq!(code, 400, "{body}");
    }
    let shown = call(Method::GET, "/v1/bgp", Value::Null).1;
    assert_eq!(shown["peering"], plain, "{shown}");
    assert!(vips.iter().all(|v| routed(&router_ns, v)));

    // The dataplane dies: both VIPs withdrawn.
    drop(dataplane);
    let killed = Instant::now();
    assert!(announced(false), "still announced with the dataplane dead");
    let withdrawn = killed.elapsed();
    // Back (empty): the agent puts its config back, then announces.
    dataplane = Dataplane::start_in(Some(&amp), &socket);
    let back = Instant::now();
    assert!(announced(true), "not announced again");
    eprintln!(
        "dataplane killed: withdrawn from the router after {} ms; back: announced again after {} ms",
        withdrawn.as_millis(),
        back.elapsed().as_millis()
    );
    assert!(withdrawn < Duration::from_secs(2), "{withdrawn:?}");

    // A password shown blanked.
    let (code, _) = call(Method::PUT, "/v1/bgp", peering);
    assert_eq!(code, 204);
    let shown = call(Method::GET, "/v1/bgp", Value::Null).1;
    assert_eq!(shown["peering"]["peers"][0]["password"], "***", "{shown}");
    // BIRD killed right after the agent brought it a new peering, and started
    // again by its supervisor: the agent's file is whole, BIRD takes it,
    // and the VIPs are announced again with the new peering.
    let (code, _) = call(Method::PUT, "/v1/bgp", plain.clone());
    assert_eq!(code, 204);
    let restarted = Instant::now();
    speaker.restart(&amp);
    assert!(announced(true), "not announced after BIRD's restart");
    assert!(
        eventually(Duration::from_secs(5), || {
            let b = call(Method::GET, "/v1/bgp", Value::Null).1;
            b["status"]["error"].is_null() && b["peering"] == plain
        }),
        "{}",
        call(Method::GET, "/v1/bgp", Value::Null).1
    );
    eprintln!(
        "BIRD killed after a peering change and restarted: announced again {} ms later (a new BGP session)",
        restarted.elapsed().as_millis()
    );

    // The agent stops: withdrawn first, the routers given the delay.
    let stopping = Instant::now();
    drop(agent);
    let stopped = stopping.elapsed();
    assert!(
        vips.iter().all(|v| !routed(&router_ns, v)),
        "still routed once the agent stopped"
    );
    assert!(stopped >= Duration::from_millis(300), "{stopped:?}");
    drop(dataplane);
}
