#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking
//! The linux-ecmp driver's netlink layer against a real kernel, in a
//! network namespace the test creates: nexthops, a resilient group, the
//! VIP's route through it, a member removed and added, everything deleted.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use siphon_control::distributor::nexthop::{Resilience, Rtnl};
use siphon_control::distributor::{Driver, IdleBound, LinuxEcmp, Spread, Target};
use siphon_testkit::netns::Netns;
use siphon_testkit::root_or_skip;

fn ip_json(ns: &Netns, args: &[&str]) -> Value {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-j"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn group_members(ns: &Netns, id: &str) -> Vec<u64> {
    let v = ip_json(ns, &["nexthop", "show", "id", id]);
    v[0]["group"]
        .as_array()
        .map(|g| g.iter().filter_map(|m| m["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// A namespace standing for the router, with one interface on
/// 198.18.NET.0/24 (its peer outside at .254).
struct Router {
    ns: Netns,
    inside: String,
    ifindex: u32,
    path: PathBuf,
}

impl Router {
    fn create(tag: &str, net: u8) -> Router {
        let ns = Netns::create(tag).unwrap();
        let n = std::process::id() % 10_000;
        let (out, inside) = (format!("{tag}o{n}"), format!("{tag}i{n}"));
        ns.veth(
            &out,
            &format!("198.18.{net}.254/24"),
            &inside,
            &format!("198.18.{net}.1/24"),
            1500,
        )
        .unwrap();
        let ifindex = ns
            .enter(|| nix::net::if_::if_nametoindex(inside.as_str()).unwrap())
            .unwrap();
        let path = PathBuf::from(format!("/run/netns/{}", ns.name));
        Router {
            ns,
            inside,
            ifindex,
            path,
        }
    }
}

const RES: Resilience = Resilience {
    buckets: 128,
    idle_timer_s: 30,
    unbalanced_timer_s: 600,
};

#[test]
fn a_vip_routes_over_a_resilient_group_that_follows_its_members() {
    if !root_or_skip("nexthop groups in a network namespace") {
        return;
    }
    let Router {
        ns, ifindex, path, ..
    } = Router::create("nh", 50);
    let mut rtnl = Rtnl::open(Some(&path)).unwrap();

    for (id, last) in [(1, 11), (2, 12), (3, 13)] {
        let gw: IpAddr = format!("198.18.50.{last}").parse().unwrap();
        rtnl.set_gateway(id, gw, ifindex).unwrap();
    }
    rtnl.set_group(100, &[1, 2, 3], &RES).unwrap();
    let vip: IpAddr = "198.18.99.10".parse().unwrap();
    rtnl.set_route(vip, 100).unwrap();

    let g = ip_json(&ns, &["nexthop", "show", "id", "100"]);
    assert_eq!(g[0]["type"], "resilient", "{g}");
    assert_eq!(g[0]["resilient_args"]["buckets"], 128, "{g}");
    assert_eq!(g[0]["resilient_args"]["idle_timer"], 30, "{g}");
    assert_eq!(g[0]["resilient_args"]["unbalanced_timer"], 600, "{g}");
    assert_eq!(g[0]["protocol"], "77", "{g}");
    assert_eq!(group_members(&ns, "100"), [1, 2, 3]);
    let r = ip_json(&ns, &["route", "show", "198.18.99.10"]);
    assert_eq!(r[0]["nhid"], 100, "{r}");
    assert_eq!(r[0]["protocol"], "77", "{r}");

    // Member 2 fails over, comes back; repeating a request changes nothing.
    rtnl.set_group(100, &[1, 3], &RES).unwrap();
    assert_eq!(group_members(&ns, "100"), [1, 3]);
    rtnl.set_group(100, &[1, 2, 3], &RES).unwrap();
    rtnl.set_group(100, &[1, 2, 3], &RES).unwrap();
    rtnl.set_route(vip, 100).unwrap();
    assert_eq!(group_members(&ns, "100"), [1, 2, 3]);

    // A bad request is the kernel's error, named.
    let e = rtnl
        .set_group(101, &[1, 999], &RES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("group 101"), "{e}");

    rtnl.delete_route(vip).unwrap();
    rtnl.delete_route(vip).unwrap();
    for id in [100, 1, 2, 3, 100] {
        rtnl.delete_nexthop(id).unwrap();
    }
    assert_eq!(ip_json(&ns, &["nexthop", "show"]), Value::Array(vec![]));
    assert_eq!(
        ip_json(&ns, &["route", "show", "198.18.99.10"]),
        Value::Array(vec![])
    );
}

#[test]
fn the_linux_ecmp_driver_leaves_out_what_it_cannot_set_up_and_replaces_leftovers() {
    if !root_or_skip("the linux-ecmp driver in a network namespace") {
        return;
    }
    let Router {
        ns,
        inside,
        ifindex,
        path,
    } = Router::create("ecmp", 51);
    // Left by an earlier run: a group at a target's id, and the VIP's
    // group with another bucket count.
    let mut rtnl = Rtnl::open(Some(&path)).unwrap();
    rtnl.set_gateway(7, "198.18.51.7".parse().unwrap(), ifindex)
        .unwrap();
    rtnl.set_group(11, &[7], &RES).unwrap();
    let small = Resilience { buckets: 32, ..RES };
    rtnl.set_group(20, &[7], &small).unwrap();

    let cfg = siphon_control::config::LinuxEcmp {
        netns: Some(path.clone()),
        interface: inside.clone(),
        buckets: 128,
        idle_timer_s: 30,
        idle_margin_s: 5,
        unbalanced_timer_s: 0,
        first_id: 10,
        resync_s: 10,
    };
    let mut driver = LinuxEcmp::open(&cfg).unwrap();
    let target = |id: u32, addr: &str, amphora: &str| Target {
        id,
        address: addr.parse().unwrap(),
        amphora: amphora.into(),
    };
    let spread = Spread {
        group: 20,
        vip: "198.18.98.1".parse().unwrap(),
        targets: vec![
            target(11, "198.18.51.11", "a1"),
            target(12, "198.18.51.12", "a2"),
            // Not on the interface's network: the kernel refuses it.
            target(13, "198.19.77.13", "a3"),
        ],
        // Shorter than idle_timer_s: that one holds.
        idle: IdleBound::Within(20_000),
    };
    let skipped = driver.apply(&spread).unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0.amphora, "a3");
    assert!(skipped[0].1.contains("nexthop 13"), "{}", skipped[0].1);
    assert_eq!(group_members(&ns, "20"), [11, 12]);
    let g = ip_json(&ns, &["nexthop", "show", "id", "20"]);
    assert_eq!(g[0]["resilient_args"]["buckets"], 128, "{g}");
    assert_eq!(g[0]["resilient_args"]["idle_timer"], 30, "{g}");
    let r = ip_json(&ns, &["route", "show", "198.18.98.1"]);
    assert_eq!(r[0]["nhid"], 20, "{r}");
    // A listener's longer data timeout (100.5 s) lengthens the group's
    // idle timer past it, by the margin; one without a timeout gets the
    // longest Octavia allows (24 days).
    let idle_timer = |driver: &mut LinuxEcmp, idle| {
        driver
            .apply(&Spread {
                idle,
                ..spread.clone()
            })
            .unwrap();
        ip_json(&ns, &["nexthop", "show", "id", "20"])[0]["resilient_args"]["idle_timer"].clone()
    };
    assert_eq!(idle_timer(&mut driver, IdleBound::Within(100_500)), 106);
    // (iproute2 prints it with six significant digits: 2.0736e+06.)
    let longest = idle_timer(&mut driver, IdleBound::Unbounded);
    let longest = longest.as_f64().unwrap();
    assert!(
        (longest - f64::from(24 * 86_400 + 5)).abs() < 10.0,
        "{longest}"
    );
    // Applying again changes nothing; withdrawing removes route and group.
    driver.apply(&spread).unwrap();
    assert_eq!(group_members(&ns, "20"), [11, 12]);
    let g = ip_json(&ns, &["nexthop", "show", "id", "20"]);
    assert_eq!(g[0]["resilient_args"]["idle_timer"], 30, "{g}");
    driver.withdraw(20, spread.vip).unwrap();
    assert_eq!(
        ip_json(&ns, &["route", "show", "198.18.98.1"]),
        Value::Array(vec![])
    );
    for t in &spread.targets {
        driver.forget(t).unwrap();
    }
    rtnl.delete_nexthop(7).unwrap();
    assert_eq!(ip_json(&ns, &["nexthop", "show"]), Value::Array(vec![]));
}
