//! The store on both backends: SQLite (a file) and PostgreSQL (a real
//! throwaway server, `siphon_testkit::postgres`). The same queries, the
//! same schema; on PostgreSQL, several controllers' stores side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use siphon_control::model::{Amphora, Counters, Listener, LoadBalancer, Pool, State};
use siphon_control::store::{Database, Db, Heard, Kind, Store, StoreError};
use siphon_control::store::{Fence, FENCE};
use siphon_testkit::postgres::Postgres;
use siphon_testkit::TempDir;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An API object: the fields every object has, and `extra`.
fn object<T: serde::de::DeserializeOwned>(
    id: &str,
    description: &str,
    extra: serde_json::Value,
) -> T {
    let mut v = json!({
        "id": id, "name": "", "description": description, "project_id": "",
        "admin_state_up": true, "provisioning_status": "ACTIVE",
        "operating_status": "ONLINE", "tags": [],
        "created_at": "2026-01-01T00:00:00", "updated_at": null,
    });
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::from_value(v).unwrap()
}

fn lb(id: &str, description: &str) -> LoadBalancer {
    object(
        id,
        description,
        json!({
            "vip_address": "198.18.0.10", "vip_subnet_id": "s", "vip_network_id": "n",
            "vip_port_id": "p", "vip_qos_policy_id": null, "provider": "siphon",
            "flavor_id": "", "availability_zone": null, "topology": "SINGLE",
            "amphora_count": 1,
        }),
    )
}

fn pool(id: &str, lb: &str) -> Pool {
    object(
        id,
        "",
        json!({
            "load_balancer_id": lb, "protocol": "TCP",
            "lb_algorithm": "ROUND_ROBIN", "session_persistence": null,
        }),
    )
}

fn listener(id: &str, lb: &str) -> Listener {
    object(
        id,
        "",
        json!({
            "load_balancer_id": lb, "protocol": "TCP", "protocol_port": 80,
            "connection_limit": -1, "default_pool_id": null,
            "timeout_client_data": 50000, "timeout_member_connect": 5000,
            "timeout_member_data": 50000, "timeout_tcp_inspect": 0,
            "allowed_cidrs": [],
        }),
    )
}

fn amphora(id: &str) -> Amphora {
    serde_json::from_value(json!({
        "id": id, "load_balancer_id": null, "status": "READY",
        "lb_network_ip": "198.18.1.1", "agent_port": 9443, "server_name": id,
        "ca_certificate": null, "vip_interface": "eth1", "generation": 0,
        "vips": [], "created_at": "2026-01-01T00:00:00", "updated_at": null,
    }))
    .unwrap()
}

/// A PostgreSQL store for `test`: the server, and how a controller names
/// its database.
fn postgres(test: &str) -> Option<(Postgres, Database)> {
    let pg = Postgres::start_or_skip(test)?;
    pg.create_database("siphon");
    let db = Database::Postgres {
        url: pg.url("siphon"),
        password_file: Some(pg.password_file.clone()),
        max_connections: 4,
    };
    Some((pg, db))
}

fn sqlite(dir: &TempDir) -> Database {
    Database::Sqlite(dir.path("control.db"))
}

async fn put_lb(db: &Db, l: LoadBalancer) {
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.put(l);
        Ok(())
    })
    .await
    .unwrap();
}

fn description(s: &State, id: &str) -> Option<String> {
    s.load_balancers
        .get(id)
        .map(|l| l.common.description.clone())
}

/// Writes, reads back after a reopen, deletes; stats and their cascade.
async fn round_trip(name: &Database) {
    let db = Db::open(name).await.unwrap();
    assert_eq!(db.schema_version().await.unwrap(), 3);
    put_lb(&db, lb("lb1", "first")).await;
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.put(pool("p1", "lb1"));
        tx.put(amphora("a1"));
        Ok(())
    })
    .await
    .unwrap();
    drop(db);
    let db = Db::open(name).await.unwrap();
    assert_eq!(db.read(|s| description(s, "lb1")).as_deref(), Some("first"));
    assert!(db.read(|s| s.pools.contains_key("p1")));
    assert_eq!(
        db.read(|s| s.amphorae.get("a1").cloned()),
        Some(amphora("a1"))
    );
    // Counters beyond BIGINT are capped instead of failing a write.
    let huge = Counters {
        bytes_in: u64::MAX,
        bytes_out: 7,
        active_connections: 1,
        total_connections: 2,
        request_errors: 0,
    };
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.put(listener("l1", "lb1"));
        Ok(())
    })
    .await
    .unwrap();
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.stats("l1", "a1", 1, huge);
        Ok(())
    })
    .await
    .unwrap();
    drop(db);
    let db = Db::open(name).await.unwrap();
    let got = db.read(|s| s.stats.get(&("l1".into(), "a1".into())).copied());
    assert_eq!(got.map(|c| (c.bytes_in, c.bytes_out)), Some((1 << 61, 7)));
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.delete(Kind::Listener, "l1");
        tx.delete(Kind::Pool, "p1");
        Ok(())
    })
    .await
    .unwrap();
    drop(db);
    let db = Db::open(name).await.unwrap();
    assert!(db.read(|s| s.stats.is_empty() && s.pools.is_empty() && s.listeners.is_empty()));
    // A child without its parent: the database refuses, nothing changes.
    let e = db
        .write(|_, tx| -> Result<(), StoreError> {
            tx.put(pool("p2", "no-such-lb"));
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Sql(_)), "{e}");
    assert!(db.read(|s| s.pools.is_empty()));
}

#[test]
fn sqlite_stores_reads_back_and_enforces_parents() {
    let dir = TempDir::new("store-sqlite");
    rt().block_on(round_trip(&sqlite(&dir)));
}

#[test]
fn postgres_stores_reads_back_and_enforces_parents() {
    let Some((_pg, db)) = postgres("postgres_stores_reads_back_and_enforces_parents") else {
        return;
    };
    rt().block_on(round_trip(&db));
}

#[test]
fn a_file_that_is_not_a_database_is_named_and_left_alone() {
    let dir = TempDir::new("store-garbage");
    let path = dir.path("control.db");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = rt()
        .block_on(Store::open(&Database::Sqlite(path.clone())))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not a database"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

/// A store made by a release that kept its schema version in SQLite's
/// `user_version` (schema 1) is migrated in place, its rows kept.
#[test]
fn an_sqlite_store_from_before_is_migrated_in_place() {
    let dir = TempDir::new("store-old");
    let path = dir.path("control.db");
    rt().block_on(async {
        use sqlx::Connection;
        let mut c =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .unwrap();
        sqlx::raw_sql(include_str!("../migrations/0001_initial.sql"))
            .execute(&mut c)
            .await
            .unwrap();
        let doc = serde_json::to_string(&lb("old", "kept")).unwrap();
        sqlx::query("INSERT INTO load_balancer (id, doc) VALUES ('old', $1)")
            .bind(doc)
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::query("PRAGMA user_version = 1")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        let db = Db::open(&Database::Sqlite(path.clone())).await.unwrap();
        assert_eq!(db.schema_version().await.unwrap(), 3);
        assert_eq!(db.read(|s| description(s, "old")).as_deref(), Some("kept"));
        put_lb(&db, lb("new", "")).await;
    });
}

/// A word the controller does not know, found in the database (a newer
/// controller's, a hand edit), stops the load with an error naming the
/// row and the word: never a silent default.
#[test]
fn an_unknown_word_in_the_database_is_an_error_not_a_default() {
    let dir = TempDir::new("store-word");
    let name = sqlite(&dir);
    rt().block_on(async {
        let db = Db::open(&name).await.unwrap();
        put_lb(&db, lb("lb1", "")).await;
        db.write(|_, tx| -> Result<(), StoreError> {
            tx.put(pool("p1", "lb1"));
            Ok(())
        })
        .await
        .unwrap();
        drop(db);
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            dir.path("control.db").display()
        ))
        .await
        .unwrap();
        sqlx::query("UPDATE pool SET doc = replace(doc, 'ROUND_ROBIN', 'FASTEST')")
            .execute(&mut c)
            .await
            .unwrap();
        let e = Db::open(&name).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{text}");
        assert!(text.contains("p1") && text.contains("FASTEST"), "{text}");
    });
}

/// Three controllers' stores on one PostgreSQL: each reads the others'
/// committed writes (after `refresh`, and always inside a write), deletes
/// included, and a cache too far behind the change log reloads whole.
#[test]
fn every_controller_reads_every_committed_write() {
    let Some((pg, name)) = postgres("every_controller_reads_every_committed_write") else {
        return;
    };
    rt().block_on(async {
        let a = Db::open(&name).await.unwrap();
        let b = Db::open(&name).await.unwrap();
        let c = Db::open(&name).await.unwrap();
        put_lb(&a, lb("lb1", "from a")).await;
        b.refresh().await.unwrap();
        assert_eq!(b.read(|s| description(s, "lb1")).as_deref(), Some("from a"));
        // A write decides on the latest state, refreshed or not.
        let seen = c
            .write(|s, tx| -> Result<Option<String>, StoreError> {
                let d = description(s, "lb1");
                tx.put(lb("lb1", "from c"));
                Ok(d)
            })
            .await
            .unwrap();
        assert_eq!(seen.as_deref(), Some("from a"));
        b.write(|_, tx| -> Result<(), StoreError> {
            tx.delete(Kind::LoadBalancer, "lb1");
            Ok(())
        })
        .await
        .unwrap();
        a.refresh().await.unwrap();
        assert_eq!(a.read(|s| s.load_balancers.len()), 0);
        // The log pruned past what `c` holds: `c` reloads everything.
        put_lb(&a, lb("lb2", "")).await;
        pg.psql("siphon", "DELETE FROM change_log");
        put_lb(&a, lb("lb3", "")).await;
        c.refresh().await.unwrap();
        let mut ids: Vec<String> = c.read(|s| s.load_balancers.keys().cloned().collect());
        ids.sort();
        assert_eq!(ids, ["lb2", "lb3"]);
    });
}

/// Conflicting read-modify-writes spread over three controllers: none is
/// lost, and of many trying to take the same spare exactly one does.
#[test]
fn concurrent_writes_from_several_controllers_lose_nothing() {
    let Some((_pg, name)) = postgres("concurrent_writes_from_several_controllers_lose_nothing")
    else {
        return;
    };
    rt().block_on(async {
        let mut dbs = Vec::new();
        for _ in 0..3 {
            dbs.push(Arc::new(Db::open(&name).await.unwrap()));
        }
        put_lb(&dbs[0], lb("counter", "0")).await;
        dbs[0]
            .write(|_, tx| -> Result<(), StoreError> {
                tx.put(amphora("spare"));
                Ok(())
            })
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let db = dbs[i % 3].clone();
            tasks.push(tokio::spawn(async move {
                db.write(|s, tx| -> Result<(), StoreError> {
                    let n: u32 = description(s, "counter").unwrap().parse().unwrap();
                    tx.put(lb("counter", &(n + 1).to_string()));
                    Ok(())
                })
                .await
                .unwrap();
                // Take the spare if nobody did.
                db.write(|s, tx| -> Result<bool, StoreError> {
                    let a = s.amphorae.get("spare").unwrap();
                    if a.load_balancer_id.is_some() {
                        return Ok(false);
                    }
                    let mut a = a.clone();
                    a.load_balancer_id = Some("counter".into());
                    a.server_name = format!("taken by {i}");
                    tx.put(a);
                    Ok(true)
                })
                .await
                .unwrap()
            }));
        }
        let mut took = 0;
        for t in tasks {
            took += usize::from(t.await.unwrap());
        }
        assert_eq!(took, 1, "the spare was handed out {took} times");
        for db in &dbs {
            db.refresh().await.unwrap();
            assert_eq!(
                db.read(|s| description(s, "counter")).as_deref(),
                Some("60")
            );
        }
    });
}

/// PostgreSQL stops: writes fail at once as "unavailable" (the API's 503)
/// and change nothing, reads keep the cache and know how stale it is;
/// once it is back, everything works again without a restart.
#[test]
fn a_database_outage_refuses_writes_and_heals() {
    let Some((mut pg, name)) = postgres("a_database_outage_refuses_writes_and_heals") else {
        return;
    };
    rt().block_on(async {
        let db = Db::open(&name).await.unwrap();
        put_lb(&db, lb("lb1", "before")).await;
        assert!(db.stale_for().is_none());
        pg.stop();
        let t = Instant::now();
        let e = db
            .write(|_, tx| -> Result<(), StoreError> {
                tx.put(lb("lb1", "during"));
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(db.refresh().await.unwrap_err().is_unavailable());
        assert!(db.stale_for().is_some());
        // API reads answer from the cache at once: one a second tries
        // the database (for at most READ_WAIT), the others do not wait.
        let t = Instant::now();
        assert!(db.refresh_read().await.unwrap_err().is_unavailable());
        assert!(db.refresh_read().await.unwrap_err().is_unavailable());
        assert!(
            t.elapsed() < siphon_control::store::READ_WAIT + Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            db.read(|s| description(s, "lb1")).as_deref(),
            Some("before")
        );
        pg.start_server();
        let mut healed = false;
        for _ in 0..50 {
            if db.refresh_read().await.is_ok() {
                healed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(healed, "the store did not reconnect");
        assert!(db.stale_for().is_none());
        put_lb(&db, lb("lb1", "after")).await;
        drop(db);
        let db = Db::open(&name).await.unwrap();
        assert_eq!(db.read(|s| description(s, "lb1")).as_deref(), Some("after"));
    });
}

fn counters(bytes_in: u64, total: u64, active: u64) -> Counters {
    Counters {
        bytes_in,
        bytes_out: 0,
        active_connections: active,
        total_connections: total,
        request_errors: 0,
    }
}

/// Counters as reported, stored by any number of controllers in any
/// order: each heartbeat counts once, an older one not at all, and a
/// dataplane restart (counters going down) adds the new values whole.
async fn counted_once(a: &Db, b: &Db) {
    put_lb(a, lb("lb1", "")).await;
    a.write(|_, tx| -> Result<(), StoreError> {
        tx.put(listener("l1", "lb1"));
        Ok(())
    })
    .await
    .unwrap();
    let total = |db: &Db| {
        db.read(|s| {
            s.stats
                .get(&("l1".into(), "a1".into()))
                .map(|c| (c.bytes_in, c.total_connections, c.active_connections))
        })
    };
    report(a, 1, counters(100, 10, 3)).await;
    report(b, 1, counters(100, 10, 3)).await; // the same beat, heard by b
    assert_eq!(total(b), Some((100, 10, 3)));
    report(b, 2, counters(150, 12, 2)).await;
    report(a, 1, counters(100, 10, 3)).await; // a's late batch
    assert_eq!(total(a), Some((150, 12, 2)));
    report(a, 3, counters(30, 1, 1)).await; // the dataplane restarted
    b.refresh().await.unwrap();
    assert_eq!(total(b), Some((180, 13, 1)));
}

#[test]
fn counters_count_each_heartbeat_once_on_sqlite() {
    let dir = TempDir::new("store-counted");
    rt().block_on(async {
        let db = Db::open(&sqlite(&dir)).await.unwrap();
        counted_once(&db, &db).await;
    });
}

async fn report(db: &Db, seq: u64, c: Counters) {
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.stats("l1", "a1", seq, c);
        Ok(())
    })
    .await
    .unwrap();
}

/// Claims on the database's clock: one holder at a time, taken over once
/// expired (with a new fence), and a write made under a lost claim is
/// refused while the new holder's goes through.
async fn claims(db: &Db) {
    let store = db.store();
    let ttl = Duration::from_millis(1_000);
    let first = store
        .take_claim("loadbalancer:x", "ctl-a", ttl)
        .await
        .unwrap();
    assert_eq!(first, Some(1));
    assert_eq!(
        store
            .take_claim("loadbalancer:x", "ctl-b", ttl)
            .await
            .unwrap(),
        None
    );
    let a = Fence {
        job: "loadbalancer:x".into(),
        holder: "ctl-a".into(),
        number: 1,
    };
    assert!(store.renew_claim(&a, ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let second = store
        .take_claim("loadbalancer:x", "ctl-b", ttl)
        .await
        .unwrap();
    assert_eq!(second, Some(2), "taken over once expired");
    assert!(
        !store.renew_claim(&a, ttl).await.unwrap(),
        "a's claim is gone"
    );
    let late = FENCE
        .scope(a.clone(), put_lb_result(db, lb("fenced", "a")))
        .await
        .unwrap_err();
    assert!(matches!(late, StoreError::ClaimLost { .. }), "{late}");
    let b = Fence {
        job: "loadbalancer:x".into(),
        holder: "ctl-b".into(),
        number: 2,
    };
    FENCE
        .scope(b.clone(), put_lb_result(db, lb("fenced", "b")))
        .await
        .unwrap();
    assert_eq!(db.read(|s| description(s, "fenced")).as_deref(), Some("b"));
    // Released: anyone may take it at once, with a higher fence.
    store.release_claim(&b).await.unwrap();
    assert_eq!(
        store
            .take_claim("loadbalancer:x", "ctl-a", ttl)
            .await
            .unwrap(),
        Some(3)
    );
}

async fn put_lb_result(db: &Db, l: LoadBalancer) -> Result<(), StoreError> {
    db.write(|_, tx| -> Result<(), StoreError> {
        tx.put(l);
        Ok(())
    })
    .await
}

#[test]
fn claims_expire_fence_and_hand_over_on_sqlite() {
    let dir = TempDir::new("store-claims");
    rt().block_on(async { claims(&Db::open(&sqlite(&dir)).await.unwrap()).await });
}

/// Two controllers hear amphorae: each sees when the other last heard
/// each one (when the beat came, not when it was stored), and the newest
/// sequence number taken by either.
async fn heard(a: &Db) {
    let row = |amphora, controller, seq, age| Heard {
        amphora,
        controller,
        seq,
        age,
    };
    let now = Duration::ZERO;
    a.store()
        .hear(&[
            row("amp-1", "ctl-a", 41, now),
            row("amp-1", "ctl-b", 42, now),
            // Heard 20 s before it was stored.
            row("amp-2", "ctl-b", 7, Duration::from_secs(20)),
        ])
        .await
        .unwrap();
    // An older beat, stored late: neither its number nor its time goes
    // back.
    a.store()
        .hear(&[row("amp-1", "ctl-b", 40, Duration::from_secs(60))])
        .await
        .unwrap();
    let mut seqs = a.store().heard_seqs().await.unwrap();
    seqs.sort();
    assert_eq!(seqs, [("amp-1".into(), 42), ("amp-2".into(), 7)]);
    let mut ages = a.store().heard_elsewhere("ctl-a").await.unwrap();
    ages.sort();
    assert_eq!(ages.len(), 2, "{ages:?}");
    assert!(ages[0].1 < 5_000, "{ages:?}");
    assert!((20_000..25_000).contains(&ages[1].1), "{ages:?}");
    let mine = a.store().heard_elsewhere("ctl-b").await.unwrap();
    assert_eq!(mine.len(), 1, "only ctl-a's rows: {mine:?}");
}

#[test]
fn heartbeats_heard_are_shared_on_sqlite() {
    let dir = TempDir::new("store-heard");
    rt().block_on(async { heard(&Db::open(&sqlite(&dir)).await.unwrap()).await });
}

#[test]
fn counters_claims_and_heartbeats_across_controllers_on_postgres() {
    let Some((_pg, name)) =
        postgres("counters_claims_and_heartbeats_across_controllers_on_postgres")
    else {
        return;
    };
    rt().block_on(async {
        let a = Db::open(&name).await.unwrap();
        let b = Db::open(&name).await.unwrap();
        counted_once(&a, &b).await;
        claims(&b).await;
        heard(&a).await;
    });
}

/// `siphon-control copy-store`: a single-node SQLite store into an empty
/// PostgreSQL database, through the CLI; everything arrives (counters
/// with their baselines, so the next heartbeat adds only what is new),
/// and a second copy into the now non-empty database is refused.
#[test]
fn copy_store_moves_an_sqlite_install_to_postgres() {
    let Some((pg, name)) = postgres("copy_store_moves_an_sqlite_install_to_postgres") else {
        return;
    };
    let dir = TempDir::new("store-copy");
    let from = sqlite(&dir);
    let rt = rt();
    let before = rt.block_on(async {
        let db = Db::open(&from).await.unwrap();
        put_lb(&db, lb("lb1", "moved")).await;
        db.write(|_, tx| -> Result<(), StoreError> {
            tx.put(listener("l1", "lb1"));
            tx.put(pool("p1", "lb1"));
            let mut a = amphora("a1");
            a.load_balancer_id = Some("lb1".into());
            tx.put(a);
            tx.put(amphora("spare"));
            Ok(())
        })
        .await
        .unwrap();
        db.store()
            .hear(&[Heard {
                amphora: "a1",
                controller: "old-controller",
                seq: 9,
                age: Duration::ZERO,
            }])
            .await
            .unwrap();
        report(&db, 9, counters(500, 5, 1)).await;
        db.read(|s| s.clone())
    });
    let config = dir.path("control.toml");
    let Database::Postgres { url, .. } = &name else {
        unreachable!()
    };
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\npassword_file = \"{}\"\n[auth]\nmode = \"noauth\"\n",
            pg.password_file.display()
        ),
    )
    .unwrap();
    let copy = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_siphon-control"))
            .arg("--config")
            .arg(&config)
            .arg("copy-store")
            .arg("--from")
            .arg(dir.path("control.db"))
            .output()
            .unwrap()
    };
    let out = copy();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("5 objects, 1 counter rows, 1 heartbeat records"),
        "{text}"
    );
    rt.block_on(async {
        let db = Db::open(&name).await.unwrap();
        let after = db.read(|s| s.clone());
        assert_eq!(
            after.load_balancers.get("lb1"),
            before.load_balancers.get("lb1")
        );
        assert_eq!(after.amphorae.get("a1"), before.amphorae.get("a1"));
        assert_eq!(after.amphorae.len(), 2);
        assert_eq!(after.stats, before.stats);
        assert_eq!(db.store().heard_seqs().await.unwrap(), [("a1".into(), 9)]);
        // The next report adds only what is new since the copied one.
        report(&db, 10, counters(650, 6, 2)).await;
        let c = db.read(|s| s.stats[&("l1".to_owned(), "a1".to_owned())]);
        assert_eq!((c.bytes_in, c.total_connections), (650, 6));
    });
    let again = copy();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(err.contains("not empty"), "{err}");
}
