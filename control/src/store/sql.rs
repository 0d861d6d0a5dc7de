//! The store's SQL: one set of queries for SQLite and PostgreSQL, through
//! `sqlx`'s `Any` driver (the URL picks the backend at run time).
//!
//! Every write transaction also appends its changed rows to `change_log`
//! under one number (`seq`); a controller's cache knows the last number it
//! holds, and catching up is reading the rows changed since. On
//! PostgreSQL, writers take one advisory transaction lock first, so
//! controllers write one at a time and each decides on the latest state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};

use super::{Database, Fence, Kind, Object, Op, StoreError};
use crate::model::{Amphora, Counters, HealthMonitor, Listener, LoadBalancer, Member, Pool, State};

/// Migrations, in order; entry `i` moves the schema to version `i + 1`.
/// Each must run unchanged on SQLite and PostgreSQL.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_several_controllers.sql"),
    include_str!("../../migrations/0003_tombstones.sql"),
];

/// The advisory lock every writer takes on PostgreSQL ("SIPHON").
const WRITE_LOCK: i64 = 0x5349_5048_4f4e;

/// How long a request waits for a database connection before it is told
/// the database is unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Changes kept in `change_log`; a cache further behind reloads whole.
const KEEP_CHANGES: i64 = 10_000;

/// Stats rows are logged under this kind, per listener.
pub const STATS: &str = "listener_stats";

/// How long deletes are remembered in `tombstone`.
const KEEP_TOMBSTONES: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug)]
pub struct Store {
    pub(super) pool: AnyPool,
    /// How to connect outside the pool ([`Store::reach`]).
    options: AnyConnectOptions,
    postgres: bool,
    name: String,
}

/// What changed since a cache's number.
#[derive(Debug)]
pub enum Caught {
    /// Nothing.
    Current,
    /// Too far behind (or the database was replaced): everything.
    Whole(i64, Box<State>),
    Rows {
        head: i64,
        puts: Vec<Object>,
        deletes: Vec<(Kind, String)>,
        /// Listener → its stats rows now (all amphorae).
        stats: Vec<(String, Vec<(String, Counters)>)>,
    },
}

const KINDS: [Kind; 6] = [
    Kind::LoadBalancer,
    Kind::Listener,
    Kind::Pool,
    Kind::Member,
    Kind::HealthMonitor,
    Kind::Amphora,
];

impl Store {
    /// Connects to (creating an SQLite file if needed) and migrates `db`.
    pub async fn open(db: &Database) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let name = db.name();
        let at = |source: sqlx::Error| StoreError::Open {
            name: name.clone(),
            source,
        };
        let url = db.connect_url()?;
        let options: AnyConnectOptions = url.parse().map_err(at)?;
        let postgres = db.is_postgres();
        // One connection first, so what is wrong (a file that is not a
        // database, a refused password) is said as it is, not as a pool
        // that timed out retrying.
        {
            use sqlx::{ConnectOptions, Connection};
            let mut probe = options.connect().await.map_err(at)?;
            sqlite_pragmas(&mut probe, !postgres).await.map_err(at)?;
            probe.close().await.map_err(at)?;
        }
        let max = match db {
            Database::Postgres {
                max_connections, ..
            } => *max_connections,
            // One writer at a time anyway; a few readers beside it.
            Database::Sqlite(_) => 4,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| Box::pin(sqlite_pragmas(conn, !postgres)))
            .connect_with(options.clone())
            .await
            .map_err(at)?;
        let store = Store {
            pool,
            options,
            postgres,
            name,
        };
        // Whatever fails from here names the database too: a file that
        // is not a database fails at the first statement, not the open.
        store.migrate().await.map_err(|e| match e {
            StoreError::Sql(source) | StoreError::Unavailable(source) => StoreError::Open {
                name: store.name.clone(),
                source,
            },
            e => e,
        })?;
        Ok(store)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// A write transaction: on PostgreSQL, once every other controller's
    /// writer is out of the way.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        if !self.postgres {
            // SQLite: the write lock from the start. A deferred
            // transaction that read first and writes after another
            // connection wrote (a claim's renewal) fails at once with
            // SQLITE_BUSY_SNAPSHOT; IMMEDIATE waits its turn instead
            // (busy_timeout).
            return Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// A read transaction that sees one snapshot throughout.
    pub async fn begin_read(&self) -> Result<Transaction<'static, Any>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    async fn migrate(&self) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        let found: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_version")
            .fetch_optional(&mut *tx)
            .await?;
        let found = match found {
            Some(v) => v,
            None => {
                // SQLite stores from before this table kept their version
                // in `user_version`.
                let v: i64 = if self.postgres {
                    0
                } else {
                    sqlx::query_scalar("PRAGMA user_version")
                        .fetch_one(&mut *tx)
                        .await?
                };
                sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                    .bind(v)
                    .execute(&mut *tx)
                    .await?;
                v
            }
        };
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("UPDATE schema_version SET version = $1")
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await?;
            tracing::info!(database = %self.name, version = i + 1, "database migrated");
        }
        tx.commit().await?;
        Ok(known)
    }

    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT version FROM schema_version")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Writes `ops` in one transaction, all or none (bulk loads, tools);
    /// running controllers' caches catch up through the change log.
    pub async fn commit(&self, ops: &[Op]) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let (seq, _) = write_ops(&mut tx, ops).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Now on the database's clock, in milliseconds since the epoch:
    /// claims expire by it, whatever the controllers' clocks say.
    fn clock(&self) -> &'static str {
        if self.postgres {
            "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
        } else {
            "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
        }
    }

    /// Takes the claim on `job` for `holder` unless another holds it
    /// unexpired; the fencing number, or `None`.
    pub async fn take_claim(
        &self,
        job: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let now = self.clock();
        let sql = format!(
            "INSERT INTO claim (job, holder, fence, expires_at) VALUES ($1, $2, 1, {now} + $3) \
             ON CONFLICT (job) DO UPDATE SET holder = excluded.holder, \
             fence = claim.fence + 1, expires_at = excluded.expires_at \
             WHERE claim.expires_at < {now} RETURNING fence"
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(job)
            .bind(holder)
            .bind(millis(ttl))
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Extends a claim still held; `false` when another took it over.
    pub async fn renew_claim(&self, f: &Fence, ttl: Duration) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE claim SET expires_at = {} + $4 WHERE job = $1 AND holder = $2 AND fence = $3",
            self.clock()
        );
        let done = sqlx::query(&sql)
            .bind(&f.job)
            .bind(&f.holder)
            .bind(f.number)
            .bind(millis(ttl))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a claim (kept as a row, expired, so fences only grow).
    pub async fn release_claim(&self, f: &Fence) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE claim SET expires_at = 0 WHERE job = $1 AND holder = $2 AND fence = $3",
        )
        .bind(&f.job)
        .bind(&f.holder)
        .bind(f.number)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How long ago (milliseconds, database clock) controllers other
    /// than `me` last heard each amphora.
    pub async fn heard_elsewhere(&self, me: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = format!(
            "SELECT amphora_id, {} - MAX(heard_at) FROM heard WHERE controller <> $1 \
             GROUP BY amphora_id",
            self.clock()
        );
        let rows = sqlx::query(&sql).bind(me).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)?.max(0))))
            .collect()
    }

    /// The newest heartbeat sequence number any controller took, per
    /// amphora.
    pub async fn heard_seqs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query("SELECT amphora_id, MAX(seq) FROM heard GROUP BY amphora_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)?.max(0) as u64)))
            .collect()
    }

    /// The number of the latest change.
    /// Records that `controller` heard each amphora (`age` ago), outside
    /// any write transaction: each controller writes its own rows only,
    /// so this needs neither the writers' turn nor the change log, and
    /// costs the other controllers nothing.
    pub async fn hear(&self, rows: &[Heard<'_>]) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            hear(self, &mut conn, chunk).await?;
        }
        Ok(())
    }

    /// Whether the database takes a new connection within `limit`: one
    /// made outside the pool, so that an outage is told as the network or
    /// the server tells it (refused, no route, a refused password) and at
    /// once, not as a pool that kept retrying until its acquire timeout.
    pub async fn reach(&self, limit: Duration) -> Result<(), StoreError> {
        use sqlx::{ConnectOptions, Connection};
        match tokio::time::timeout(limit, self.options.connect()).await {
            Ok(Ok(conn)) => {
                // Closed politely when it can be; it was only a probe.
                let _ = conn.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(StoreError::from(e)),
            Err(_) => Err(StoreError::Slow(limit)),
        }
    }

    pub async fn head(&self) -> Result<i64, StoreError> {
        head(&mut *self.pool.acquire().await?).await
    }
}

/// WAL: readers never wait for the writer; NORMAL is durable across a
/// process crash, which is what a controller restart needs.
async fn sqlite_pragmas(conn: &mut AnyConnection, sqlite: bool) -> Result<(), sqlx::Error> {
    if sqlite {
        for pragma in [
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = NORMAL",
            "PRAGMA foreign_keys = ON",
            "PRAGMA busy_timeout = 5000",
        ] {
            sqlx::query(pragma).execute(&mut *conn).await?;
        }
    }
    Ok(())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether the claim `f` is still its holder's, with that fence (expired
/// or not: nobody else took it then).
pub async fn holds(conn: &mut AnyConnection, f: &Fence) -> Result<bool, StoreError> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM claim WHERE job = $1 AND holder = $2 AND fence = $3")
            .bind(&f.job)
            .bind(&f.holder)
            .bind(f.number)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

pub(super) async fn head(conn: &mut AnyConnection) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM change_log")
            .fetch_one(conn)
            .await?,
    )
}

/// Everything, and the number of the change it is as of.
pub async fn load(conn: &mut AnyConnection) -> Result<(i64, State), StoreError> {
    let head = head(conn).await?;
    let mut s = State::default();
    for kind in KINDS {
        for (id, doc) in docs(conn, kind, None).await? {
            put_state(&mut s, parse(kind, id, &doc)?);
        }
    }
    for (l, a, c) in stats(conn, None).await? {
        s.stats.insert((l, a), c);
    }
    Ok((head, s))
}

/// What changed after `since`.
pub async fn catch_up(conn: &mut AnyConnection, since: i64) -> Result<Caught, StoreError> {
    let head = head(conn).await?;
    if head == since {
        return Ok(Caught::Current);
    }
    let oldest: i64 = sqlx::query_scalar("SELECT COALESCE(MIN(seq), 0) FROM change_log")
        .fetch_one(&mut *conn)
        .await?;
    if head < since || since + 1 < oldest {
        let (head, state) = load(conn).await?;
        return Ok(Caught::Whole(head, Box::new(state)));
    }
    let rows = sqlx::query("SELECT DISTINCT kind, id FROM change_log WHERE seq > $1")
        .bind(since)
        .fetch_all(&mut *conn)
        .await?;
    let mut changed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        changed
            .entry(r.try_get(0)?)
            .or_default()
            .insert(r.try_get(1)?);
    }
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    for kind in KINDS {
        let Some(ids) = changed.get(kind.table()) else {
            continue;
        };
        let mut found = BTreeSet::new();
        for (id, doc) in docs(conn, kind, Some(since)).await? {
            found.insert(id.clone());
            puts.push(parse(kind, id, &doc)?);
        }
        for id in ids.difference(&found) {
            deletes.push((kind, id.clone()));
        }
    }
    let mut by_listener: BTreeMap<String, Vec<(String, Counters)>> = changed
        .get(STATS)
        .into_iter()
        .flatten()
        .map(|l| (l.clone(), Vec::new()))
        .collect();
    if !by_listener.is_empty() {
        for (l, a, c) in stats(conn, Some(since)).await? {
            by_listener.entry(l).or_default().push((a, c));
        }
    }
    Ok(Caught::Rows {
        head,
        puts,
        deletes,
        stats: by_listener.into_iter().collect(),
    })
}

/// Milliseconds since the epoch (0 before it).
fn epoch_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a follower of the changes is told (see [`changed_since`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    /// The rows changed in `(since, upto]`: `(kind, id)`, kind the table
    /// or [`STATS`]. A row of an object table whose object is gone was
    /// deleted.
    Rows(Vec<(String, String)>),
    /// `since` is further back than the change log reaches: everything
    /// is to be read again, and these objects were deleted up to `upto`
    /// (within [`KEEP_TOMBSTONES`]).
    Everything { deleted: Vec<(String, String)> },
}

/// What changed after `since`, up to `upto` (the change a cache holds).
pub async fn changed_since(
    conn: &mut AnyConnection,
    since: i64,
    upto: i64,
) -> Result<Followed, StoreError> {
    let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM change_log")
        .fetch_one(&mut *conn)
        .await?;
    let pairs = |rows: Vec<sqlx::any::AnyRow>| -> Result<Vec<(String, String)>, StoreError> {
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    };
    if since <= 0 || since > upto || oldest.is_some_and(|o| since + 1 < o) {
        let rows = sqlx::query("SELECT DISTINCT kind, id FROM tombstone WHERE seq <= $1")
            .bind(upto)
            .fetch_all(&mut *conn)
            .await?;
        return Ok(Followed::Everything {
            deleted: pairs(rows)?,
        });
    }
    let rows = sqlx::query(
        "SELECT DISTINCT kind, id FROM change_log WHERE seq > $1 AND seq <= $2 ORDER BY kind, id",
    )
    .bind(since)
    .bind(upto)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Followed::Rows(pairs(rows)?))
}

/// `(id, doc)` of a table: all rows, or those changed after `since`.
async fn docs(
    conn: &mut AnyConnection,
    kind: Kind,
    since: Option<i64>,
) -> Result<Vec<(String, String)>, StoreError> {
    let table = kind.table();
    let rows = match since {
        None => {
            sqlx::query(&format!("SELECT id, doc FROM {table} ORDER BY id"))
                .fetch_all(&mut *conn)
                .await?
        }
        Some(since) => {
            sqlx::query(&format!(
                "SELECT id, doc FROM {table} WHERE id IN \
                 (SELECT id FROM change_log WHERE seq > $1 AND kind = $2)"
            ))
            .bind(since)
            .bind(table)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

async fn stats(
    conn: &mut AnyConnection,
    since: Option<i64>,
) -> Result<Vec<(String, String, Counters)>, StoreError> {
    const COLUMNS: &str = "SELECT listener_id, amphora_id, bytes_in, bytes_out, \
                           active_connections, total_connections, request_errors \
                           FROM listener_stats";
    let rows = match since {
        None => sqlx::query(COLUMNS).fetch_all(&mut *conn).await?,
        Some(since) => {
            sqlx::query(&format!(
                "{COLUMNS} WHERE listener_id IN \
                 (SELECT id FROM change_log WHERE seq > $1 AND kind = $2)"
            ))
            .bind(since)
            .bind(STATS)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    let count = |r: &sqlx::any::AnyRow, i: usize| -> Result<u64, sqlx::Error> {
        Ok(r.try_get::<i64, _>(i)?.max(0) as u64)
    };
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                Counters {
                    bytes_in: count(r, 2)?,
                    bytes_out: count(r, 3)?,
                    active_connections: count(r, 4)?,
                    total_connections: count(r, 5)?,
                    request_errors: count(r, 6)?,
                },
            ))
        })
        .collect()
}

fn parse(kind: Kind, id: String, doc: &str) -> Result<Object, StoreError> {
    fn de<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(doc)
    }
    let r = match kind {
        Kind::LoadBalancer => de::<LoadBalancer>(doc).map(Object::LoadBalancer),
        Kind::Listener => de::<Listener>(doc).map(Object::Listener),
        Kind::Pool => de::<Pool>(doc).map(Object::Pool),
        Kind::Member => de::<Member>(doc).map(Object::Member),
        Kind::HealthMonitor => de::<HealthMonitor>(doc).map(Object::HealthMonitor),
        Kind::Amphora => de::<Amphora>(doc).map(Object::Amphora),
    };
    r.map_err(|e| StoreError::Corrupt {
        table: kind.table(),
        id,
        message: e.to_string(),
    })
}

fn put_state(s: &mut State, o: Object) {
    super::apply(s, vec![Op::Put(Box::new(o))]);
}

/// Writes `ops` and their change-log rows; returns the change's number
/// and the stats rows it moved (per listener), read back.
pub async fn write_ops(
    conn: &mut AnyConnection,
    ops: &[Op],
) -> Result<(i64, Vec<(String, Vec<(String, Counters)>)>), StoreError> {
    let seq = head(conn).await? + 1;
    let mut logged: BTreeSet<(&'static str, &str)> = BTreeSet::new();
    let mut counted = Vec::new();
    for op in ops {
        match op {
            Op::Put(o) => {
                put(conn, o).await?;
                logged.insert((o.kind().table(), o.id()));
            }
            Op::Delete(kind, id) => {
                sqlx::query(&format!("DELETE FROM {} WHERE id = $1", kind.table()))
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                logged.insert((kind.table(), id));
                if *kind != Kind::Amphora {
                    sqlx::query(
                        "INSERT INTO tombstone (seq, kind, id, deleted_at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(seq)
                    .bind(kind.table())
                    .bind(id)
                    .bind(epoch_ms(std::time::SystemTime::now()))
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Op::Stats {
                listener,
                amphora,
                seq,
                raw,
            } => {
                counted.push((listener.as_str(), amphora.as_str(), *seq, *raw));
                logged.insert((STATS, listener));
            }
        }
    }
    for chunk in counted.chunks(ROWS_PER_STATEMENT) {
        count(conn, chunk).await?;
    }
    for (kind, id) in logged {
        sqlx::query("INSERT INTO change_log (seq, kind, id) VALUES ($1, $2, $3)")
            .bind(seq)
            .bind(kind)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    if seq % 100 == 0 {
        sqlx::query("DELETE FROM change_log WHERE seq <= $1")
            .bind(seq - KEEP_CHANGES)
            .execute(&mut *conn)
            .await?;
        let horizon = std::time::SystemTime::now()
            .checked_sub(KEEP_TOMBSTONES)
            .unwrap_or(std::time::UNIX_EPOCH);
        sqlx::query("DELETE FROM tombstone WHERE deleted_at < $1")
            .bind(epoch_ms(horizon))
            .execute(&mut *conn)
            .await?;
    }
    let mut stats_now = Vec::new();
    if !counted.is_empty() {
        let mut by_listener: BTreeMap<String, Vec<(String, Counters)>> = BTreeMap::new();
        for (l, a, c) in stats(conn, Some(seq - 1)).await? {
            by_listener.entry(l).or_default().push((a, c));
        }
        stats_now = by_listener.into_iter().collect();
    }
    Ok((seq, stats_now))
}

/// Rows per multi-row statement (a row binds up to 8 values; PostgreSQL
/// takes 65,535 per statement).
const ROWS_PER_STATEMENT: usize = 500;

/// The counted columns: totals move by what the dataplane counted since
/// the last report kept (`raw_*`).
const COUNTED: [&str; 4] = [
    "bytes_in",
    "bytes_out",
    "total_connections",
    "request_errors",
];

/// A total stops growing here, and a reported counter is taken up to
/// [`RAW_CAP`]: their sum stays inside BIGINT whatever an agent reports,
/// so no heartbeat can make a write fail.
const TOTAL_CAP: i64 = 1 << 62;
const RAW_CAP: u64 = 1 << 61;

/// Upserts counters as reported, for heartbeats newer than the stored one.
async fn count(
    conn: &mut AnyConnection,
    rows: &[(&str, &str, u64, Counters)],
) -> Result<(), StoreError> {
    // Per row, 8 parameters: listener, amphora, the five counters as
    // reported, seq. The four counted ones go in twice: totals start at
    // the first report (everything counted so far), and as the raw
    // baseline.
    let values: Vec<String> = (0..rows.len())
        .map(|i| {
            let p: Vec<String> = [1, 2, 3, 4, 5, 6, 7, 3, 4, 6, 7, 8]
                .iter()
                .map(|k| format!("${}", i * 8 + k))
                .collect();
            format!("({})", p.join(", "))
        })
        .collect();
    let mut set: Vec<String> = Vec::new();
    for c in COUNTED {
        set.push(format!(
            "{c} = CASE WHEN listener_stats.{c} >= {TOTAL_CAP} THEN listener_stats.{c} \
             WHEN excluded.raw_{c} >= listener_stats.raw_{c} \
             THEN listener_stats.{c} + excluded.raw_{c} - listener_stats.raw_{c} \
             ELSE listener_stats.{c} + excluded.raw_{c} END"
        ));
        set.push(format!("raw_{c} = excluded.raw_{c}"));
    }
    set.push("active_connections = excluded.active_connections".into());
    set.push("seq = excluded.seq".into());
    let sql = format!(
        "INSERT INTO listener_stats (listener_id, amphora_id, bytes_in, bytes_out, \
         active_connections, total_connections, request_errors, raw_bytes_in, raw_bytes_out, \
         raw_total_connections, raw_request_errors, seq) VALUES {} \
         ON CONFLICT (listener_id, amphora_id) DO UPDATE SET {} \
         WHERE excluded.seq > listener_stats.seq",
        values.join(", "),
        set.join(", ")
    );
    let raw = |v: u64| clamp(v.min(RAW_CAP));
    let mut q = sqlx::query(&sql);
    for (l, a, seq, c) in rows {
        q = q
            .bind(*l)
            .bind(*a)
            .bind(raw(c.bytes_in))
            .bind(raw(c.bytes_out))
            .bind(raw(c.active_connections))
            .bind(raw(c.total_connections))
            .bind(raw(c.request_errors))
            .bind(clamp(*seq));
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// One row of the `heard` table: `controller` took `amphora`'s heartbeat
/// `seq`, which came `age` ago.
#[derive(Debug, Clone, Copy)]
pub struct Heard<'a> {
    pub amphora: &'a str,
    pub controller: &'a str,
    pub seq: u64,
    pub age: Duration,
}

/// Records each row (its time on the database's clock, minus its age),
/// keeping the newest sequence number and the newest time.
async fn hear(
    store: &Store,
    conn: &mut AnyConnection,
    rows: &[Heard<'_>],
) -> Result<(), StoreError> {
    let now = store.clock();
    let values: Vec<String> = (0..rows.len())
        .map(|i| {
            let n = i * 4;
            format!("(${}, ${}, ${}, {now} - ${})", n + 1, n + 2, n + 3, n + 4)
        })
        .collect();
    let sql = format!(
        "INSERT INTO heard (amphora_id, controller, seq, heard_at) VALUES {} \
         ON CONFLICT (amphora_id, controller) DO UPDATE SET \
         heard_at = CASE WHEN excluded.heard_at > heard.heard_at THEN excluded.heard_at ELSE heard.heard_at END, \
         seq = CASE WHEN excluded.seq > heard.seq THEN excluded.seq ELSE heard.seq END",
        values.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for r in rows {
        let age_ms = i64::try_from(r.age.as_millis()).unwrap_or(i64::MAX);
        q = q
            .bind(r.amphora)
            .bind(r.controller)
            .bind(clamp(r.seq))
            .bind(age_ms);
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// Counters are stored as BIGINT; beyond its range they stay at its top.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn put(conn: &mut AnyConnection, o: &Object) -> Result<(), StoreError> {
    fn json<T: serde::Serialize>(v: &T) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(v).unwrap_or_default()
    }
    // The document, and the relationship column beside it (kept in step
    // too: an amphora moves between load balancers).
    let (doc, parent) = match o {
        Object::LoadBalancer(lb) => (json(lb), None),
        Object::Listener(l) => (
            json(l),
            Some(("load_balancer_id", Some(&*l.load_balancer_id))),
        ),
        Object::Pool(p) => (
            json(p),
            Some(("load_balancer_id", Some(&*p.load_balancer_id))),
        ),
        Object::Member(m) => (json(m), Some(("pool_id", Some(&*m.pool_id)))),
        Object::HealthMonitor(h) => (json(h), Some(("pool_id", Some(&*h.pool_id)))),
        Object::Amphora(a) => (
            json(a),
            Some(("load_balancer_id", a.load_balancer_id.as_deref())),
        ),
    };
    let table = o.kind().table();
    let sql = match parent {
        None => format!(
            "INSERT INTO {table} (id, doc) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc"
        ),
        Some((column, _)) => format!(
            "INSERT INTO {table} (id, doc, {column}) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, {column} = excluded.{column}"
        ),
    };
    let mut q = sqlx::query(&sql).bind(o.id()).bind(doc);
    if let Some((_, value)) = parent {
        q = q.bind(value);
    }
    q.execute(&mut *conn).await?;
    Ok(())
}
