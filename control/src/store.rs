//! The controller's store: SQLite (bundled, nothing to install), one file.
//!
//! The whole state is loaded at start and kept in memory ([`Db`]); every
//! change is a list of [`Op`]s written in one transaction *before* the
//! in-memory state moves, so a failed write changes nothing anywhere.
//! Schema changes are numbered migrations in `control/migrations/`, applied
//! in order and recorded in SQLite's `user_version`.

use std::path::Path;
use std::sync::{Mutex, RwLock};

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::model::{Amphora, Counters, HealthMonitor, Listener, LoadBalancer, Member, Pool, State};

/// Migrations, in order; entry `i` moves the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../migrations/0001_initial.sql")];

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("database schema version {found} is newer than this controller knows ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database holds a document that does not parse ({table} {id}): {message}")]
    Corrupt {
        table: &'static str,
        id: String,
        message: String,
    },
}

/// One stored object.
#[derive(Debug, Clone)]
pub enum Object {
    LoadBalancer(LoadBalancer),
    Listener(Listener),
    Pool(Pool),
    Member(Member),
    HealthMonitor(HealthMonitor),
    Amphora(Amphora),
}

/// The tables objects live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    LoadBalancer,
    Listener,
    Pool,
    Member,
    HealthMonitor,
    Amphora,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::LoadBalancer => "load_balancer",
            Kind::Listener => "listener",
            Kind::Pool => "pool",
            Kind::Member => "member",
            Kind::HealthMonitor => "health_monitor",
            Kind::Amphora => "amphora",
        }
    }
}

/// One change.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Box<Object>),
    Delete(Kind, String),
    Stats {
        listener: String,
        amphora: String,
        counters: Counters,
    },
}

impl Op {
    pub fn put(o: impl Into<Object>) -> Op {
        Op::Put(Box::new(o.into()))
    }
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`;
    /// `:memory:` gives a private in-memory one.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // Whatever fails from here names the file too: a file that is not
        // a database fails at the first statement, not at the open.
        let at = |e: StoreError| match e {
            StoreError::Sql(source) => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
            e => e,
        };
        // WAL: readers never wait for the writer; NORMAL is durable across
        // a process crash, which is what a controller restart needs.
        let setup = || -> Result<(), rusqlite::Error> {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
        };
        setup().map_err(|e| at(e.into()))?;
        let mut store = Store { conn };
        store.migrate().map_err(at)?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "database migrated");
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Everything, as the controller starts with it.
    pub fn load(&self) -> Result<State, StoreError> {
        let mut s = State::default();
        for lb in self.docs::<LoadBalancer>(Kind::LoadBalancer)? {
            s.load_balancers.insert(lb);
        }
        for l in self.docs::<Listener>(Kind::Listener)? {
            s.listeners.insert(l);
        }
        for p in self.docs::<Pool>(Kind::Pool)? {
            s.pools.insert(p);
        }
        for m in self.docs::<Member>(Kind::Member)? {
            s.members.insert(m);
        }
        for h in self.docs::<HealthMonitor>(Kind::HealthMonitor)? {
            s.health_monitors.insert(h);
        }
        for a in self.docs::<Amphora>(Kind::Amphora)? {
            s.amphorae.insert(a);
        }
        let mut stmt = self.conn.prepare(
            "SELECT listener_id, amphora_id, bytes_in, bytes_out, active_connections, \
             total_connections, request_errors FROM listener_stats",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                Counters {
                    bytes_in: r.get::<_, i64>(2)? as u64,
                    bytes_out: r.get::<_, i64>(3)? as u64,
                    active_connections: r.get::<_, i64>(4)? as u64,
                    total_connections: r.get::<_, i64>(5)? as u64,
                    request_errors: r.get::<_, i64>(6)? as u64,
                },
            ))
        })?;
        for row in rows {
            let (k, v) = row?;
            s.stats.insert(k, v);
        }
        Ok(s)
    }

    fn docs<T: serde::de::DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>, StoreError> {
        let table = kind.table();
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT id, doc FROM {table} ORDER BY rowid"))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, doc) = row?;
            out.push(serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt {
                table,
                id,
                message: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Writes `ops` in one transaction: all of them or none.
    pub fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for op in ops {
            match op {
                Op::Put(o) => put(&tx, o)?,
                Op::Delete(kind, id) => {
                    tx.execute(
                        &format!("DELETE FROM {} WHERE id = ?1", kind.table()),
                        params![id],
                    )?;
                }
                Op::Stats {
                    listener,
                    amphora,
                    counters: c,
                } => {
                    // A listener deleted meanwhile has no row to count for.
                    let exists: Option<i64> = tx
                        .query_row(
                            "SELECT 1 FROM listener WHERE id = ?1",
                            params![listener],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if exists.is_none() {
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO listener_stats VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                         ON CONFLICT (listener_id, amphora_id) DO UPDATE SET \
                         bytes_in = ?3, bytes_out = ?4, active_connections = ?5, \
                         total_connections = ?6, request_errors = ?7",
                        params![
                            listener,
                            amphora,
                            c.bytes_in as i64,
                            c.bytes_out as i64,
                            c.active_connections as i64,
                            c.total_connections as i64,
                            c.request_errors as i64
                        ],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn put(tx: &rusqlite::Transaction<'_>, o: &Object) -> Result<(), StoreError> {
    fn json<T: serde::Serialize>(v: &T) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(v).unwrap_or_default()
    }
    match o {
        Object::LoadBalancer(lb) => tx.execute(
            "INSERT INTO load_balancer (id, doc) VALUES (?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET doc = ?2",
            params![lb.common.id, json(lb)],
        )?,
        Object::Listener(l) => tx.execute(
            "INSERT INTO listener (id, load_balancer_id, doc) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET doc = ?3",
            params![l.common.id, l.load_balancer_id, json(l)],
        )?,
        Object::Pool(p) => tx.execute(
            "INSERT INTO pool (id, load_balancer_id, doc) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET doc = ?3",
            params![p.common.id, p.load_balancer_id, json(p)],
        )?,
        Object::Member(m) => tx.execute(
            "INSERT INTO member (id, pool_id, doc) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET doc = ?3",
            params![m.common.id, m.pool_id, json(m)],
        )?,
        Object::HealthMonitor(h) => tx.execute(
            "INSERT INTO health_monitor (id, pool_id, doc) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET doc = ?3",
            params![h.common.id, h.pool_id, json(h)],
        )?,
        Object::Amphora(a) => tx.execute(
            "INSERT INTO amphora (id, load_balancer_id, doc) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET load_balancer_id = ?2, doc = ?3",
            params![a.id, a.load_balancer_id, json(a)],
        )?,
    };
    Ok(())
}

/// Applies `ops` to the in-memory state (after they were committed).
pub fn apply(state: &mut State, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put(o) => match *o {
                Object::LoadBalancer(v) => {
                    state.load_balancers.insert(v);
                }
                Object::Listener(v) => {
                    state.listeners.insert(v);
                }
                Object::Pool(v) => {
                    state.pools.insert(v);
                }
                Object::Member(v) => {
                    state.members.insert(v);
                }
                Object::HealthMonitor(v) => {
                    state.health_monitors.insert(v);
                }
                Object::Amphora(v) => {
                    state.amphorae.insert(v);
                }
            },
            Op::Delete(kind, id) => match kind {
                Kind::LoadBalancer => {
                    state.load_balancers.remove(&id);
                }
                Kind::Listener => {
                    state.listeners.remove(&id);
                    let gone: Vec<(String, String)> =
                        state.stats_of(&id).map(|(k, _)| k.clone()).collect();
                    for k in gone {
                        state.stats.remove(&k);
                    }
                }
                Kind::Pool => {
                    state.pools.remove(&id);
                }
                Kind::Member => {
                    state.members.remove(&id);
                }
                Kind::HealthMonitor => {
                    state.health_monitors.remove(&id);
                }
                Kind::Amphora => {
                    state.amphorae.remove(&id);
                }
            },
            Op::Stats {
                listener,
                amphora,
                counters,
            } => {
                if state.listeners.contains_key(&listener) {
                    state.stats.insert((listener, amphora), counters);
                }
            }
        }
    }
}

/// A change being built: the ops to write, in order.
#[derive(Debug, Default)]
pub struct Tx {
    ops: Vec<Op>,
}

impl Tx {
    pub fn put(&mut self, o: impl Into<Object>) {
        self.ops.push(Op::Put(Box::new(o.into())));
    }

    pub fn delete(&mut self, kind: Kind, id: &str) {
        self.ops.push(Op::Delete(kind, id.to_owned()));
    }

    pub fn stats(&mut self, listener: &str, amphora: &str, counters: Counters) {
        self.ops.push(Op::Stats {
            listener: listener.to_owned(),
            amphora: amphora.to_owned(),
            counters,
        });
    }

    /// Puts a copy of row `id` of `table` changed by `f`; nothing when
    /// there is no such row.
    pub fn edit<T: Clone + Into<Object>>(
        &mut self,
        table: &crate::model::Table<T>,
        id: &str,
        f: impl FnOnce(&mut T),
    ) {
        if let Some(row) = table.get(id) {
            let mut row = row.clone();
            f(&mut row);
            self.put(row);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

macro_rules! object_from {
    ($($t:ident),*) => {
        $(impl From<$t> for Object {
            fn from(v: $t) -> Object {
                Object::$t(v)
            }
        })*
    };
}
object_from!(LoadBalancer, Listener, Pool, Member, HealthMonitor, Amphora);

/// The store and the state it holds, kept in step.
///
/// Readers share the state (an `RwLock`), so lists and gets, which write
/// their JSON while they read, run on every core at once; writers take
/// the store in turn (a `Mutex`: one SQLite connection), build their
/// change against the state, commit it, and only then hold the state
/// exclusively, for the apply alone.
#[derive(Debug)]
pub struct Db {
    store: Mutex<Store>,
    state: RwLock<State>,
}

// A panic while holding a lock cannot leave the state half applied
// (commit happens first, then a plain apply), so a poisoned lock is used
// as it is.
fn unpoisoned<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        let store = Store::open(path)?;
        let state = store.load()?;
        Ok(Db {
            store: Mutex::new(store),
            state: RwLock::new(state),
        })
    }

    /// Reads the current state.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let state = unpoisoned(self.state.read());
        f(&state)
    }

    /// Runs `f` on the current state; the ops it records are committed
    /// and applied only if it returns `Ok`, all of them or none.
    pub fn write<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&State, &mut Tx) -> Result<R, E>,
    ) -> Result<R, E> {
        // Writers go one at a time, so the state `f` saw is still the
        // state when its ops are applied.
        let mut store = unpoisoned(self.store.lock());
        let mut tx = Tx::default();
        let r = {
            let state = unpoisoned(self.state.read());
            f(&state, &mut tx)?
        };
        if !tx.ops.is_empty() {
            store.commit(&tx.ops)?;
            let mut state = unpoisoned(self.state.write());
            apply(&mut state, tx.ops);
        }
        Ok(r)
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        unpoisoned(self.store.lock()).schema_version()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;
    use crate::model::LbAlgorithm;

    #[test]
    fn a_file_that_is_not_a_database_is_named_and_left_alone() {
        let dir = siphon_testkit::TempDir::new("store-garbage");
        let path = dir.path("control.db");
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("not a database"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }

    fn pool() -> Pool {
        serde_json::from_value(serde_json::json!({
            "id": "p1", "name": "", "description": "", "project_id": "",
            "admin_state_up": true, "provisioning_status": "ACTIVE",
            "operating_status": "ONLINE", "tags": [],
            "created_at": "2026-01-01T00:00:00", "updated_at": null,
            "load_balancer_id": "lb1", "protocol": "TCP",
            "lb_algorithm": "ROUND_ROBIN", "session_persistence": null
        }))
        .unwrap()
    }

    /// A word the controller does not know, found in the database (a
    /// newer controller's, a hand edit), stops the load with an error
    /// naming the row and the word: never a silent default.
    #[test]
    fn an_unknown_word_in_the_database_is_an_error_not_a_default() {
        let path = std::env::temp_dir().join(format!("siphon-store-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut store = Store::open(&path).unwrap();
        // The pool alone: its load balancer's row does not matter here.
        store
            .conn
            .pragma_update(None, "foreign_keys", "OFF")
            .unwrap();
        store.commit(&[Op::put(pool())]).unwrap();
        assert_eq!(
            store.load().unwrap().pools.get("p1").unwrap().lb_algorithm,
            LbAlgorithm::RoundRobin
        );
        store
            .conn
            .execute(
                "UPDATE pool SET doc = replace(doc, 'ROUND_ROBIN', 'FASTEST')",
                [],
            )
            .unwrap();
        let e = store.load().unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{text}");
        assert!(text.contains("p1") && text.contains("FASTEST"), "{text}");
        drop(store);
        let _ = std::fs::remove_file(&path);
    }
}
